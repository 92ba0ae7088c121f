//! The stub resolver: MX and address lookups for outbound delivery.
//!
//! hickory-proto encodes and decodes the messages. The queries go out over
//! glommio UDP and TCP sockets on the calling core, so each core owns one
//! [`Resolver`] (shared there through `Rc`) with its own cache and no locks.
//! The recursive nameservers come from `dns.nameservers` or from
//! /etc/resolv.conf.

mod answer;
mod cache;
mod error;
mod resolv_conf;
mod transport;

#[cfg(test)]
mod mock_server;
#[cfg(test)]
mod tests;

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use caduceus_policy::config::DnsConfig;
use glommio::channels::local_channel::{self, LocalSender};
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{Name, RData, RecordType};
use rand::seq::SliceRandom;

use answer::{Answer, TimedAnswer};
use cache::{Cache, CacheKey};

pub use error::{DnsError, ResolverError};
pub use resolv_conf::{ResolvConf, parse_nameserver, parse_resolv_conf};

/// The file that lists the nameservers when `dns.nameservers` is empty.
pub const RESOLV_CONF_PATH: &str = "/etc/resolv.conf";

/// Cached answers per core. An entry costs a few hundred bytes, so the
/// cache stays within a few megabytes.
// NOTE: fixed because DnsConfig has no setting for it.
pub const CACHE_MAX_ENTRIES: usize = 10_000;

/// The most MX targets resolved for one domain, taken in preference order.
/// It bounds the work a hostile zone with hundreds of MX records can cause.
pub const MAX_MX_TARGETS: usize = 10;

/// One delivery target of a domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MxTarget {
    /// The MX exchange (or the domain itself for an implicit MX), in
    /// lowercase A-label form and without the trailing dot.
    pub host: String,
    pub preference: u16,
    /// The IPv4 addresses, then the IPv6 ones, in the order the nameserver
    /// returned them; or why the host has none.
    pub addrs: Result<Vec<IpAddr>, DnsError>,
}

/// A stub resolver for one core. See the module documentation.
pub struct Resolver {
    nameservers: Vec<SocketAddr>,
    /// The wait for one answer from one nameserver.
    timeout: Duration,
    /// Rounds over `nameservers` before a query fails temporarily.
    attempts: u32,
    max_cache_ttl: Duration,
    negative_cache_ttl: Duration,
    cache: RefCell<Cache>,
    /// Queries in flight, each with the lookups waiting for its result.
    in_flight: RefCell<HashMap<CacheKey, Vec<Waiter>>>,
}

impl Resolver {
    /// Builds a resolver from `config`. When `config.nameservers` is empty,
    /// the nameservers come from /etc/resolv.conf, and so do `timeout` and
    /// `attempts` when its `options` line sets them.
    pub fn new(config: &DnsConfig) -> Result<Resolver, ResolverError> {
        Self::with_resolv_conf(config, Path::new(RESOLV_CONF_PATH))
    }

    /// Like [`Resolver::new`], with another resolv.conf file.
    pub fn with_resolv_conf(
        config: &DnsConfig,
        resolv_conf_path: &Path,
    ) -> Result<Resolver, ResolverError> {
        let mut timeout = config.timeout.get();
        let mut attempts = config.attempts;
        let nameservers = if config.nameservers.is_empty() {
            let text = std::fs::read_to_string(resolv_conf_path).map_err(|source| {
                ResolverError::ResolvConfUnreadable {
                    path: resolv_conf_path.to_path_buf(),
                    source,
                }
            })?;
            let conf = parse_resolv_conf(&text);
            for reason in &conf.skipped {
                tracing::warn!(path = %resolv_conf_path.display(), reason = %reason, "dns: skipped a resolv.conf line");
            }
            if conf.nameservers.is_empty() {
                return Err(ResolverError::NoNameservers {
                    path: resolv_conf_path.to_path_buf(),
                });
            }
            timeout = conf.timeout.unwrap_or(timeout);
            attempts = conf.attempts.unwrap_or(attempts);
            conf.nameservers
        } else {
            config
                .nameservers
                .iter()
                .map(|value| parse_nameserver(value))
                .collect::<Result<Vec<_>, _>>()?
        };
        if timeout.is_zero() {
            return Err(ResolverError::ZeroTimeout);
        }
        if attempts == 0 {
            return Err(ResolverError::ZeroAttempts);
        }

        tracing::info!(
            nameservers = ?nameservers,
            timeout_ms = timeout.as_millis(),
            attempts,
            "dns: resolver ready"
        );
        Ok(Resolver {
            nameservers,
            timeout,
            attempts,
            max_cache_ttl: config.max_cache_ttl.get(),
            negative_cache_ttl: config.negative_cache_ttl.get(),
            cache: RefCell::new(Cache::new(CACHE_MAX_ENTRIES)),
            in_flight: RefCell::new(HashMap::new()),
        })
    }

    pub fn nameservers(&self) -> &[SocketAddr] {
        &self.nameservers
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The delivery targets of `domain` in the order to try them (RFC 5321
    /// §5.1).
    ///
    /// MX targets are sorted by preference, equal preferences in random
    /// order, and each gets its A and AAAA records. A domain without MX
    /// records (NODATA) gets an implicit MX: the domain itself at
    /// preference 0. Returns an error when no target can be used:
    /// - `NullMx` when any MX exchange is the root name. This includes a
    ///   null MX published next to real MX records, which RFC 7505 §3
    ///   forbids. Such a domain has declared that it takes no mail, so
    ///   Caduceus sends it nothing. The root name and the other targets are
    ///   never looked up.
    /// - `Temporary` when no target has an address and at least one failed
    ///   temporarily.
    /// - `NoUsableMx` when every target is permanently unusable, for
    ///   example an exchange written like an IP address (`192.0.2.10.`),
    ///   which is looked up as a name and does not exist. The address in
    ///   it is never used.
    ///
    /// Each query takes at most attempts × nameservers × timeout, and the
    /// MX query and the address queries run one after the other, so the
    /// whole call takes at most twice that. The targets' address queries
    /// run concurrently.
    pub async fn resolve_mx(&self, domain: &str) -> Result<Vec<MxTarget>, DnsError> {
        let name = parse_domain(domain)?;
        let result = self.resolve_mx_name(&name).await;
        match &result {
            Ok(targets) => {
                tracing::debug!(domain = %domain, targets = targets.len(), "dns: MX resolved");
            }
            Err(error) => {
                tracing::info!(domain = %domain, error = %error, "dns: MX resolution failed");
            }
        }
        result
    }

    /// Looks up the A and AAAA addresses of `name`, IPv4 first. The name is always
    /// looked up as a name, even when it reads like an IP address.
    pub async fn resolve_host(&self, name: &str) -> Result<Vec<IpAddr>, DnsError> {
        let parsed = parse_domain(name)?;
        self.resolve_addresses(&parsed).await
    }

    async fn resolve_mx_name(&self, domain: &Name) -> Result<Vec<MxTarget>, DnsError> {
        let records = match self.lookup(domain, RecordType::MX).await? {
            Answer::NxDomain => return Err(DnsError::NxDomain),
            Answer::NoData => return self.implicit_mx(domain).await,
            Answer::Records(records) => records,
        };
        let mut exchanges: Vec<(u16, Name)> = records
            .iter()
            .filter_map(|record| match record {
                RData::MX(mx) => Some((mx.preference, mx.exchange.to_lowercase())),
                _ => None,
            })
            .collect();
        if exchanges.iter().any(|(_, exchange)| exchange.is_root()) {
            if exchanges.len() > 1 {
                tracing::warn!(domain = %domain, mx_records = exchanges.len(), "dns: null MX published next to other MX records (RFC 7505 §3); treated as null MX");
            }
            return Err(DnsError::NullMx);
        }

        // Shuffle, then sort stably by preference, so that hosts of equal
        // preference come in random order (RFC 5321 §5.1).
        exchanges.shuffle(&mut rand::thread_rng());
        exchanges.sort_by_key(|(preference, _)| *preference);
        let mut seen = HashSet::new();
        exchanges.retain(|(_, exchange)| seen.insert(exchange.clone()));
        if exchanges.len() > MAX_MX_TARGETS {
            tracing::warn!(domain = %domain, mx_records = exchanges.len(), limit = MAX_MX_TARGETS, "dns: too many MX targets; using the most preferred");
            exchanges.truncate(MAX_MX_TARGETS);
        }

        let lookups = exchanges
            .iter()
            .map(|(_, exchange)| self.resolve_addresses(exchange))
            .collect();
        let addresses = join_all(lookups).await;
        let targets: Vec<MxTarget> = exchanges
            .iter()
            .zip(addresses)
            .map(|((preference, exchange), addrs)| MxTarget {
                host: host_text(exchange),
                preference: *preference,
                addrs,
            })
            .collect();

        if targets.iter().any(|target| target.addrs.is_ok()) {
            return Ok(targets);
        }
        let temporary: Vec<String> = targets
            .iter()
            .filter_map(|target| match &target.addrs {
                Err(DnsError::Temporary(reason)) => Some(format!("{}: {reason}", target.host)),
                _ => None,
            })
            .collect();
        if !temporary.is_empty() {
            return Err(DnsError::Temporary(format!(
                "no MX target has an address yet ({})",
                temporary.join("; ")
            )));
        }
        Err(DnsError::NoUsableMx {
            hosts: targets.into_iter().map(|target| target.host).collect(),
        })
    }

    /// RFC 5321 §5.1: with no MX records the domain itself is the target,
    /// as if it had an MX of preference 0.
    async fn implicit_mx(&self, domain: &Name) -> Result<Vec<MxTarget>, DnsError> {
        let addresses = self.resolve_addresses(domain).await?;
        Ok(vec![MxTarget {
            host: host_text(domain),
            preference: 0,
            addrs: Ok(addresses),
        }])
    }

    /// Looks up A and AAAA together. Any address is a success, even when
    /// the other type failed. Otherwise a temporary failure wins over
    /// NXDOMAIN, and NXDOMAIN over NODATA.
    async fn resolve_addresses(&self, name: &Name) -> Result<Vec<IpAddr>, DnsError> {
        let (ipv4, ipv6) = futures_lite::future::zip(
            self.lookup(name, RecordType::A),
            self.lookup(name, RecordType::AAAA),
        )
        .await;

        let mut addresses = Vec::new();
        for result in [&ipv4, &ipv6] {
            if let Ok(Answer::Records(records)) = result {
                addresses.extend(records.iter().filter_map(|record| match record {
                    RData::A(a) => Some(IpAddr::V4(a.0)),
                    RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
                    _ => None,
                }));
            }
        }
        if !addresses.is_empty() {
            return Ok(addresses);
        }
        for result in [&ipv4, &ipv6] {
            if let Err(error) = result {
                return Err(error.clone());
            }
        }
        if matches!(ipv4, Ok(Answer::NxDomain)) || matches!(ipv6, Ok(Answer::NxDomain)) {
            return Err(DnsError::NxDomain);
        }
        Err(DnsError::NoAddresses)
    }

    /// Resolves `(name, qtype)` from the cache, from a query already in
    /// flight for the same key, or with a new query.
    async fn lookup(&self, name: &Name, qtype: RecordType) -> Result<Answer, DnsError> {
        let key: CacheKey = (name.to_lowercase(), qtype);
        if let Some(answer) = self.cache.borrow_mut().get(&key, Instant::now()) {
            return Ok(answer);
        }

        let waiter = {
            let mut in_flight = self.in_flight.borrow_mut();
            match in_flight.get_mut(&key) {
                Some(waiters) => {
                    let (sender, receiver) = local_channel::new_bounded(1);
                    waiters.push(sender);
                    Some(receiver)
                }
                None => {
                    in_flight.insert(key.clone(), Vec::new());
                    None
                }
            }
        };
        if let Some(receiver) = waiter {
            if let Some(result) = receiver.recv().await {
                return result;
            }
            // The query we waited for was cancelled, so its sender is gone.
            // Query without sharing rather than wait again.
            return self.query_and_cache(&key).await;
        }

        // The guard removes the in-flight entry even if this future is
        // dropped mid-query, which wakes the waiters with `None`.
        let guard = InFlightGuard {
            resolver: self,
            key: &key,
        };
        let result = self.query_and_cache(&key).await;
        let waiters = self.in_flight.borrow_mut().remove(&key).unwrap_or_default();
        drop(guard);
        for waiter in waiters {
            // The channel has room for one result and nothing else sends on
            // it, so this cannot fail for want of room. A waiter that went
            // away is no error.
            let _ = waiter.try_send(result.clone());
        }
        result
    }

    async fn query_and_cache(&self, key: &CacheKey) -> Result<Answer, DnsError> {
        let (name, qtype) = key;
        let timed = self.query_nameservers(name, *qtype).await?;
        if let Some(ttl) = timed.ttl {
            self.cache
                .borrow_mut()
                .insert(key.clone(), timed.answer.clone(), ttl, Instant::now());
        }
        Ok(timed.answer)
    }

    /// Sends the query to each nameserver in turn, for `attempts` rounds,
    /// until one gives NOERROR or NXDOMAIN. Any other response code, a
    /// timeout or a transport error moves on to the next nameserver.
    async fn query_nameservers(
        &self,
        name: &Name,
        qtype: RecordType,
    ) -> Result<TimedAnswer, DnsError> {
        let mut last_failure = String::new();
        for round in 1..=self.attempts {
            for &server in &self.nameservers {
                let failure = match transport::exchange(server, name, qtype, self.timeout).await {
                    Ok(response) => match response.metadata.response_code {
                        ResponseCode::NoError | ResponseCode::NXDomain => {
                            return answer::read_answer(
                                &response,
                                name,
                                qtype,
                                self.max_cache_ttl,
                                self.negative_cache_ttl,
                            )
                            .map_err(DnsError::Temporary);
                        }
                        code => format!("{server} returned {code}"),
                    },
                    Err(error) => format!("{server}: {error}"),
                };
                tracing::debug!(name = %name, qtype = %qtype, round, failure = %failure, "dns: query failed, trying the next nameserver");
                last_failure = failure;
            }
        }
        tracing::warn!(
            name = %name,
            qtype = %qtype,
            attempts = self.attempts,
            nameservers = self.nameservers.len(),
            last_failure = %last_failure,
            "dns: query failed on every nameserver"
        );
        Err(DnsError::Temporary(format!(
            "{qtype} query for {name} failed on every nameserver; last: {last_failure}"
        )))
    }
}

/// A lookup waiting for the result of a query already in flight.
type Waiter = LocalSender<Result<Answer, DnsError>>;

struct InFlightGuard<'a> {
    resolver: &'a Resolver,
    key: &'a CacheKey,
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.resolver.in_flight.borrow_mut().remove(self.key);
    }
}

/// Checks a domain from an address or configuration and converts it to a
/// fully qualified name in A-label form (RFC 5890 §2.3.2.1).
fn parse_domain(domain: &str) -> Result<Name, DnsError> {
    let invalid = |reason: String| DnsError::InvalidName(format!("{domain:?}: {reason}"));
    let relative = domain.strip_suffix('.').unwrap_or(domain);
    if relative.is_empty() {
        return Err(invalid("the name is empty".to_string()));
    }
    let ascii = idna::domain_to_ascii(relative)
        .map_err(|error| invalid(format!("not a valid IDNA name ({error})")))?;
    // Host names are letters, digits and hyphens (RFC 1123 §2.1). The
    // underscore is also let through because some internal names use it.
    // Anything else, such as the brackets of an address literal, is no
    // name to look up.
    for label in ascii.split('.') {
        if label.is_empty() {
            return Err(invalid("it has an empty label".to_string()));
        }
        if !label
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_')
        {
            return Err(invalid(format!(
                "label {label:?} has characters other than letters, digits, '-' and '_'"
            )));
        }
    }
    Name::from_ascii(format!("{ascii}.")).map_err(|error| invalid(error.to_string()))
}

fn host_text(name: &Name) -> String {
    let text = name.to_lowercase().to_ascii();
    match text.strip_suffix('.') {
        Some(relative) => relative.to_string(),
        None => text,
    }
}

/// Polls every future until all are done, and returns their outputs in
/// order.
async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    futures_lite::future::poll_fn(|context| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(context) {
                    Poll::Ready(value) => *output = Some(value),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    // Every slot is `Some` once the poll above returns, so nothing is lost.
    outputs.into_iter().flatten().collect()
}
