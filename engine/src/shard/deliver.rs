//! Delivery: workers per destination, connection reuse, per-recipient
//! outcomes, retries and bounces.
//!
//! A destination is a recipient domain. Each destination runs at most
//! `max_connections` workers; a worker holds one connection and takes
//! messages from the destination's ready queue until it is empty, then
//! parks the connection in the destination's idle pool.

use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use caduceus_policy::lists::{self, Change, ChangeOp, Reason};
use caduceus_policy::{DEFAULT_RULE_ID, EffectiveRule, Lane, Policy, Route, Rule};
use caduceus_spool::{
    CommitSeq, Envelope, MessageId, Outcome, ReadError, Recipient, RecipientState, RecordRef,
    StoredMessage, notify,
};
use rand::Rng;

use super::Shard;
use super::mesh::{MeshMessage, PeerReceiver};
use super::queue::{Deferral, IdleConnection, QueuedMessage, WorkItem};
use super::throttle::{self, TokenBucket};
use crate::deliverylog::{Entry, Event, now_us};
use crate::dns::DnsError;
use crate::dsn::{DsnAction, DsnInput, DsnRecipient, build_dsn};
use crate::outbound::{
    ConnectParams, Connection, OutboundMessage, OutboundRecipient, RecipientResult, SessionError,
};
use crate::smtp::{EnhancedStatus, Reply};

/// Starts workers for every destination that has ready mail.
pub fn dispatch_all(shard: &Rc<Shard>) {
    let domains: Vec<Rc<str>> = shard.queue.borrow().destinations.keys().cloned().collect();
    for domain in domains {
        dispatch(shard, &domain);
    }
}

/// Starts workers for one destination, up to its connection limit.
pub fn dispatch(shard: &Rc<Shard>, domain: &str) {
    if shard.draining.get() {
        return;
    }
    if !shard.mesh.home_everywhere(domain) {
        hand_off(shard, domain);
    }
    let policy = shard.current_policy();
    loop {
        let key = {
            let queue = shard.queue.borrow();
            let Some((key, destination)) = queue.destinations.get_key_value(domain) else {
                return;
            };
            let Some(first) = destination.ready.front() else {
                return;
            };
            let lane = queue
                .messages
                .get(&first.record)
                .map_or(Lane::Bulk, |message| message.envelope.lane);
            let rule = policy.for_domain(domain, lane);
            let connections = destination.backoff.connections(rule.max_connections.max(1));
            let limit_reached = destination.active_workers >= connections
                || destination.active_workers as usize >= destination.ready.len();
            let global_limit =
                shard.inflight.get() >= shard.config.delivery.max_concurrent_deliveries;
            // Mail of a lane that a reload has barred from the destination
            // waits like held mail, so that the reload can be undone.
            let barred = rule.hold || !rule.lane_allowed;
            if destination.held || barred || limit_reached || global_limit {
                return;
            }
            key.clone()
        };
        if let Some(destination) = shard.queue.borrow_mut().destinations.get_mut(&key) {
            destination.active_workers += 1;
        }
        shard.inflight.set(shard.inflight.get() + 1);
        let worker_shard = shard.clone();
        let spawned = glommio::spawn_local_into(
            async move { worker(worker_shard, key).await },
            shard.delivery_queue,
        );
        match spawned {
            Ok(task) => {
                task.detach();
            }
            Err(error) => {
                tracing::error!(core = shard.index, domain, %error, "delivery: worker failed to start");
                return;
            }
        }
    }
}

/// Delivers the ready mail of one destination over one connection.
async fn worker(shard: Rc<Shard>, domain: Rc<str>) {
    let policy = shard.current_policy();
    let mut connection: Option<Connection> = take_idle(&shard, &domain);
    // A connection from the idle pool may have been closed by the server
    // meanwhile, so RSET checks it before its first use here (RFC 5321 §3.8).
    let mut from_pool = connection.is_some();
    loop {
        let item = {
            let mut queue = shard.queue.borrow_mut();
            let Some(destination) = queue.destinations.get_mut(&domain) else {
                break;
            };
            if destination.held || shard.draining.get() {
                break;
            }
            destination.ready.pop_front()
        };
        let Some(item) = item else {
            break;
        };
        let Some((envelope, attempts)) = snapshot(&shard, &item) else {
            continue;
        };
        // A reference into the worker's policy snapshot: no copy of the
        // rule (and its retry schedule) per message.
        let (rule, site) = rule_for(&shard, &policy, &domain, envelope.lane).await;
        if rule.hold || !rule.lane_allowed {
            // Held by policy: the item waits at the front of the queue until
            // a reload lifts the hold (the scheduler dispatches again).
            if let Some(destination) = shard.queue.borrow_mut().destinations.get_mut(&domain) {
                destination.ready.push_front(item);
            }
            break;
        }
        let now = now_us();
        let lifetime_us = rule.max_queue_lifetime().as_micros() as u64;
        let expires_at = envelope
            .expires_at_us
            .min(envelope.received_at_us.saturating_add(lifetime_us));
        if now >= expires_at {
            expire(&shard, &item, &envelope, &attempts, rule.settings());
            continue;
        }
        if pace(&shard, &policy, &domain, rule, site).await == Paced::Interrupted {
            // A new worker paces the item again under the policy now in
            // force, unless the engine is draining.
            if let Some(destination) = shard.queue.borrow_mut().destinations.get_mut(&domain) {
                destination.ready.push_front(item);
            }
            break;
        }
        let stored = match read_stored(&shard, &item) {
            Ok(stored) => stored,
            Err(error) => {
                tracing::error!(core = shard.index, owner = item.owner, message_id = %envelope.message_id, %error, "delivery: spool record unreadable; recipients stay pending");
                if item.owner == shard.index {
                    unschedule(&shard, &item);
                } else {
                    return_to_owner(&shard, &item, &attempts, UNREADABLE_RETRY);
                }
                continue;
            }
        };
        let results = deliver_item(
            &shard,
            &domain,
            rule,
            &envelope,
            &stored.body,
            &item,
            &mut connection,
            from_pool,
        )
        .await;
        from_pool = false;
        adjust_backoff(&shard, &domain, rule, &results);
        record_results(
            &shard,
            &item,
            &envelope,
            &attempts,
            &stored.body,
            rule.settings(),
            results,
        );
        if let Some(open) = &connection
            && open.messages_sent() >= rule.max_messages_per_connection.max(1)
            && let Some(done) = connection.take()
        {
            done.quit().await;
        }
    }
    if let Some(open) = connection {
        if shard.draining.get() {
            open.quit().await;
        } else if let Some(destination) = shard.queue.borrow_mut().destinations.get_mut(&domain) {
            destination.idle.push(IdleConnection {
                connection: open,
                idle_since: Instant::now(),
            });
        }
    }
    if let Some(destination) = shard.queue.borrow_mut().destinations.get_mut(&domain) {
        destination.active_workers = destination.active_workers.saturating_sub(1);
    }
    shard.inflight.set(shard.inflight.get().saturating_sub(1));
    // Work may have arrived while this worker was finishing.
    dispatch(&shard, &domain);
}

/// Returns the rule for a destination and, when it is an `mx` rule, its
/// id, whose token bucket every domain of that MX site shares.
///
/// A `domain` rule wins. Only without one are the domain's MX hosts, in
/// preference order, matched against the `mx` rules. The lookup goes
/// through the resolver's cache. A failed lookup leaves the defaults,
/// because the delivery's own lookup then reports the failure.
async fn rule_for<'p>(
    shard: &Shard,
    policy: &'p Policy,
    domain: &str,
    lane: Lane,
) -> (Rule<'p>, Option<u32>) {
    let rule = policy.for_domain(domain, lane);
    if rule.rule_id != DEFAULT_RULE_ID || !policy.has_mx_rules() {
        return (rule, None);
    }
    let Ok(targets) = shard.resolver.resolve_mx(domain).await else {
        return (rule, None);
    };
    targets
        .iter()
        .find_map(|target| policy.for_mx_host(&target.host, lane))
        .map_or((rule, None), |site| (site, Some(site.rule_id)))
}

/// Waits for the destination's token bucket when its rule sets a rate, or
/// for the bucket of its MX site (`site`, an `mx` rule's id). The bucket's
/// rate is the rule's rate scaled by the destination's backoff factor.
/// The outcome of a wait in [`pace`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Paced {
    /// A token was taken, so the delivery may go ahead.
    Ready,
    /// The engine began to drain, or a reload replaced `policy`, whose
    /// rule set the rate. The item has not been delivered.
    Interrupted,
}

/// The maximum time a pacing wait sleeps before it checks for a drain or
/// a reload. A rule's rate can make one token take minutes, and neither a
/// corrected rate nor SIGTERM should wait for it.
const PACE_RECHECK: Duration = Duration::from_secs(1);

async fn pace(
    shard: &Shard,
    policy: &Arc<Policy>,
    domain: &str,
    rule: Rule<'_>,
    site: Option<u32>,
) -> Paced {
    let Some(rate) = rule.rate_per_sec else {
        return Paced::Ready;
    };
    loop {
        let wait = {
            let mut queue = shard.queue.borrow_mut();
            let queue = &mut *queue;
            let Some(destination) = queue.destinations.get_mut(domain) else {
                return Paced::Ready;
            };
            let now = Instant::now();
            let effective = rate * destination.backoff.factor();
            let bucket = match site {
                Some(site) => queue
                    .site_buckets
                    .entry(site)
                    .or_insert_with(|| TokenBucket::new(effective, rule.burst, now)),
                None => destination
                    .bucket
                    .get_or_insert_with(|| TokenBucket::new(effective, rule.burst, now)),
            };
            if (bucket.rate_per_sec() - effective).abs() > f64::EPSILON {
                bucket.set_rate(effective, now);
            }
            bucket.take(now)
        };
        match wait {
            Ok(()) => return Paced::Ready,
            Err(duration) => glommio::timer::sleep(duration.min(PACE_RECHECK)).await,
        }
        if shard.draining.get() || !Arc::ptr_eq(policy, &shard.current_policy()) {
            return Paced::Interrupted;
        }
    }
}

/// Cuts the destination's limits on push-back replies and raises them
/// again after successful deliveries, logging each change.
fn adjust_backoff(shard: &Shard, domain: &str, rule: Rule<'_>, results: &ItemResults) {
    let patterns = &shard.config.delivery.push_back_patterns;
    let now = Instant::now();
    let mut queue = shard.queue.borrow_mut();
    let Some(destination) = queue.destinations.get_mut(domain) else {
        return;
    };
    for attempt in &results.per_recipient {
        let change = match attempt {
            Attempt::Transient(reply) if throttle::is_push_back(reply, patterns) => destination
                .backoff
                .push_back(now)
                .map(|change| (change, Some(reply))),
            Attempt::Delivered(_) => destination.backoff.success().map(|change| (change, None)),
            _ => None,
        };
        if let Some((change, reply)) = change {
            let connections = destination.backoff.connections(rule.max_connections.max(1));
            let rate = rule.rate_per_sec.map(|rate| rate * change.to);
            if change.to < change.from {
                tracing::warn!(core = shard.index, domain, factor = change.to, connections, rate_per_sec = ?rate, reply = %reply.map(Reply::to_diagnostic).unwrap_or_default(), "throttle: receiver pushed back; limits cut");
            } else {
                tracing::info!(core = shard.index, domain, factor = change.to, connections, rate_per_sec = ?rate, "throttle: limits raised after successful deliveries");
            }
        }
    }
}

fn take_idle(shard: &Shard, domain: &str) -> Option<Connection> {
    let mut queue = shard.queue.borrow_mut();
    let destination = queue.destinations.get_mut(domain)?;
    destination.idle.pop().map(|idle| idle.connection)
}

/// The envelope and attempt counts of an item's recipients, or `None` when
/// the message is gone (deleted by the operator meanwhile).
fn snapshot(shard: &Shard, item: &WorkItem) -> Option<(Rc<Envelope>, Vec<u32>)> {
    let queue = shard.queue.borrow();
    let message = queue.entry(item)?;
    let attempts = item
        .recipients
        .iter()
        .map(|index| message.attempts(*index as usize))
        .collect();
    Some((message.envelope.clone(), attempts))
}

fn unschedule(shard: &Shard, item: &WorkItem) {
    let mut queue = shard.queue.borrow_mut();
    if let Some(message) = queue.entry_mut(item) {
        for index in &item.recipients {
            message.scheduled[*index as usize] = false;
        }
    }
    if item.owner != queue.own {
        queue.forget_handed_if_done(item.owner, item.record);
    }
}

/// Reads a work item's record from this executor's shard, or through the
/// read-only mapping of its owner's segment.
fn read_stored(shard: &Shard, item: &WorkItem) -> Result<StoredMessage, ReadError> {
    if item.owner == shard.index {
        shard.spool.read_message(item.record)
    } else {
        shard.reader.read_message(item.owner, item.record)
    }
}

/// How long a handed-over recipient whose record this executor could not
/// read waits at its owner before it is handed over again.
const UNREADABLE_RETRY: Duration = Duration::from_secs(60);

/// Gives handed-over recipients back to their owner without an attempt:
/// the owner records them as deferred for `delay` and hands them over again
/// then.
fn return_to_owner(shard: &Rc<Shard>, item: &WorkItem, attempts: &[u32], delay: Duration) {
    let next_attempt_us = now_us().saturating_add(delay.as_micros() as u64);
    for (index, attempts) in item.recipients.iter().zip(attempts) {
        let state = RecipientState::Pending {
            attempts: *attempts,
            next_attempt_us,
        };
        shard.mesh.send(
            item.owner,
            MeshMessage::Outcome {
                record: item.record,
                index: *index,
                state,
                outcome: Outcome::Deferred { next_attempt_us },
                attempts: *attempts,
            },
        );
    }
    unschedule(shard, item);
}

/// Hands the ready mail of a destination whose home is another executor to
/// that executor. Items this executor delivers itself stay queued.
fn hand_off(shard: &Rc<Shard>, domain: &str) {
    let mut queue = shard.queue.borrow_mut();
    let own = queue.own;
    let items: Vec<WorkItem> = match queue.destinations.get_mut(domain) {
        Some(destination) if !destination.ready.is_empty() => destination.ready.drain(..).collect(),
        _ => return,
    };
    let mut local_items = std::collections::VecDeque::new();
    for item in items {
        let Some(message) = queue
            .messages
            .get(&item.record)
            .filter(|_| item.owner == own)
        else {
            local_items.push_back(item);
            continue;
        };
        let home = shard.mesh.home(message.envelope.lane, domain);
        if home == own {
            local_items.push_back(item);
            continue;
        }
        let handoff = MeshMessage::Handoff {
            record: item.record,
            envelope: Box::new((*message.envelope).clone()),
            states: message.states.clone(),
            recipients: item.recipients.clone(),
        };
        // The recipients stay `scheduled` here until their outcomes come
        // back, so no timer or compaction touches them meanwhile.
        if !shard.mesh.send(home, handoff) {
            local_items.push_back(item);
        }
    }
    if let Some(destination) = queue.destinations.get_mut(domain) {
        local_items.extend(destination.ready.drain(..));
        destination.ready = local_items;
    }
}

/// Serves what one peer executor sends: hand-offs to deliver here, and
/// outcomes of this executor's messages that the peer delivered.
pub async fn serve_peer(shard: Rc<Shard>, peer: u16, receiver: PeerReceiver) {
    while let Some(message) = receiver.recv().await {
        match message {
            MeshMessage::Handoff {
                record,
                envelope,
                states,
                recipients,
            } => accept_handoff(&shard, peer, record, *envelope, states, recipients),
            MeshMessage::Outcome {
                record,
                index,
                state,
                outcome,
                attempts,
            } => accept_outcome(&shard, peer, record, index, state, outcome, attempts),
        }
    }
}

fn accept_handoff(
    shard: &Rc<Shard>,
    owner: u16,
    record: RecordRef,
    envelope: Envelope,
    states: Vec<RecipientState>,
    recipients: Vec<u32>,
) {
    let count = envelope.recipients.len();
    if states.len() != count
        || recipients.is_empty()
        || recipients.iter().any(|index| *index as usize >= count)
    {
        tracing::error!(core = shard.index, owner, %record, "mesh: malformed hand-off dropped; the owner retries it after a restart");
        return;
    }
    let domain_name = envelope.recipients[recipients[0] as usize].domain.clone();
    let domain = {
        let mut queue = shard.queue.borrow_mut();
        let domain = queue.intern(&domain_name);
        match queue.handed.entry((owner, record)) {
            std::collections::hash_map::Entry::Occupied(mut entry) => {
                let message = entry.get_mut();
                for index in &recipients {
                    message.states[*index as usize] = states[*index as usize];
                    message.scheduled[*index as usize] = true;
                }
            }
            std::collections::hash_map::Entry::Vacant(entry) => {
                let mut message = QueuedMessage::new(Rc::new(envelope), states);
                for index in &recipients {
                    message.scheduled[*index as usize] = true;
                }
                entry.insert(message);
            }
        }
        queue
            .destinations
            .entry(domain.clone())
            .or_default()
            .ready
            .push_back(WorkItem {
                owner,
                record,
                recipients,
            });
        domain
    };
    dispatch(shard, &domain);
}

/// Records the outcome a peer reports for a recipient of this executor's
/// message, as if this executor had made the attempt.
#[allow(clippy::too_many_arguments)]
fn accept_outcome(
    shard: &Rc<Shard>,
    peer: u16,
    record: RecordRef,
    index: u32,
    state: RecipientState,
    outcome: Outcome,
    attempts: u32,
) {
    let domain = {
        let queue = shard.queue.borrow();
        let Some(message) = queue.messages.get(&record) else {
            tracing::warn!(core = shard.index, peer, %record, "mesh: outcome for a message no longer queued here; ignored");
            return;
        };
        let Some(recipient) = message.envelope.recipients.get(index as usize) else {
            tracing::error!(core = shard.index, peer, %record, index, "mesh: outcome for a recipient the message does not have; ignored");
            return;
        };
        if message.states[index as usize].is_final() {
            return;
        }
        recipient.domain.clone()
    };
    if let Err(error) = shard.spool.append_outcome(record, index, outcome, attempts) {
        tracing::error!(core = shard.index, %record, recipient = index, %error, "delivery: outcome record failed to append");
    }
    let mut queue = shard.queue.borrow_mut();
    let domain = queue.intern(&domain);
    let Some(message) = queue.messages.get_mut(&record) else {
        return;
    };
    message.states[index as usize] = state;
    message.scheduled[index as usize] = false;
    if message.is_final() {
        queue.messages.remove(&record);
        drop(queue);
        crate::audit::release(&shard.spool, record);
        return;
    }
    if let Outcome::Deferred { next_attempt_us } = outcome {
        queue.deferrals.push(std::cmp::Reverse(Deferral {
            due_us: next_attempt_us,
            record,
            domain,
        }));
    }
}

/// The result for one recipient of one attempt.
enum Attempt {
    Delivered(Reply),
    Transient(Reply),
    Permanent(Reply),
    /// The pooled connection was stale; try again at once without
    /// charging an attempt (RFC 5321 §3.8: a server may close an idle
    /// connection with 421 at any time).
    Retry,
}

/// The connection facts that go into the delivery log.
#[derive(Default, Clone)]
struct RemoteInfo {
    host: Option<String>,
    ip: Option<IpAddr>,
    tls_version: Option<&'static str>,
    tls_cipher: Option<String>,
    tls_resumed: Option<bool>,
}

struct ItemResults {
    per_recipient: Vec<Attempt>,
    remote: RemoteInfo,
}

#[allow(clippy::too_many_arguments)]
async fn deliver_item(
    shard: &Rc<Shard>,
    domain: &str,
    rule: Rule<'_>,
    envelope: &Envelope,
    body: &[u8],
    item: &WorkItem,
    connection: &mut Option<Connection>,
    from_pool: bool,
) -> ItemResults {
    let recipients: Vec<OutboundRecipient<'_>> = item
        .recipients
        .iter()
        .map(|index| {
            let recipient = &envelope.recipients[*index as usize];
            OutboundRecipient {
                address: &recipient.address,
                notify: recipient.notify,
                orcpt: recipient.orcpt.as_deref(),
            }
        })
        .collect();
    let message = OutboundMessage {
        sender: &envelope.sender,
        recipients: &recipients,
        body,
        body_8bit: envelope.body_8bit,
        smtputf8: envelope.smtputf8,
        envid: envelope.envid.as_deref(),
        ret: envelope.ret,
    };
    // A stale pooled connection is replaced once; a second failure counts.
    for round in 0..2 {
        if let Some(open) = connection.as_mut()
            && from_pool
            && round == 0
        {
            open.check_stale_on_send();
        }
        if connection.is_none() {
            match connect(shard, domain, rule, envelope.lane).await {
                Ok(open) => *connection = Some(open),
                Err(failure) => {
                    let per_recipient = item
                        .recipients
                        .iter()
                        .map(|_| failure.to_attempt())
                        .collect();
                    return ItemResults {
                        per_recipient,
                        remote: failure.remote,
                    };
                }
            }
        }
        let Some(open) = connection.as_mut() else {
            continue;
        };
        let remote = remote_info(open);
        if let Some(address) = open.source()
            && !shard.sources.unlimited(envelope.lane)
        {
            shard.sources.pace(envelope.lane, address).await;
        }
        match open.send(&message).await {
            Ok(results) => {
                // A session that failed midway (421, a closed connection)
                // still returns results. The next message must not reuse
                // the connection, because it would get this session's
                // failure without reaching the server.
                if !open.is_usable() {
                    *connection = None;
                }
                let per_recipient = results
                    .into_iter()
                    .map(|result| match result {
                        RecipientResult::Delivered(reply) => Attempt::Delivered(reply),
                        RecipientResult::Transient(reply) => Attempt::Transient(reply),
                        RecipientResult::Permanent(reply) => Attempt::Permanent(reply),
                    })
                    .collect();
                return ItemResults {
                    per_recipient,
                    remote,
                };
            }
            Err(SessionError::Stale) => {
                tracing::debug!(
                    core = shard.index,
                    domain,
                    "delivery: pooled connection was stale; reconnecting"
                );
                *connection = None;
                continue;
            }
            Err(error) => {
                *connection = None;
                let reply = error.reply();
                let permanent = error.is_permanent();
                let per_recipient = item
                    .recipients
                    .iter()
                    .map(|_| {
                        if permanent {
                            Attempt::Permanent(reply.clone())
                        } else {
                            Attempt::Transient(reply.clone())
                        }
                    })
                    .collect();
                return ItemResults {
                    per_recipient,
                    remote,
                };
            }
        }
    }
    ItemResults {
        per_recipient: item.recipients.iter().map(|_| Attempt::Retry).collect(),
        remote: RemoteInfo::default(),
    }
}

fn remote_info(connection: &Connection) -> RemoteInfo {
    let tls = connection.tls();
    RemoteInfo {
        host: Some(connection.remote_host().to_string()),
        ip: Some(connection.remote_addr().ip()),
        tls_version: Some(tls.map_or("none", |info| info.version)),
        tls_cipher: tls.map(|info| info.cipher.clone()),
        tls_resumed: tls.map(|info| info.resumed),
    }
}

/// The reason no connection could be opened.
struct ConnectFailure {
    reply: Reply,
    permanent: bool,
    remote: RemoteInfo,
}

impl ConnectFailure {
    fn to_attempt(&self) -> Attempt {
        if self.permanent {
            Attempt::Permanent(self.reply.clone())
        } else {
            Attempt::Transient(self.reply.clone())
        }
    }
}

/// Returns the hosts to try for a destination, in order: the policy route,
/// or the MX targets (RFC 5321 §5.1).
async fn targets(
    shard: &Shard,
    domain: &str,
    rule: Rule<'_>,
) -> Result<Vec<(String, Vec<SocketAddr>)>, ConnectFailure> {
    let port = shard.config.delivery.smtp_port;
    let dns_failure = |error: DnsError, name: &str| ConnectFailure {
        reply: error.reply(name),
        permanent: error.is_permanent(),
        remote: RemoteInfo::default(),
    };
    match rule.route() {
        Some(Route::Addr(addr)) => Ok(vec![(addr.ip().to_string(), vec![*addr])]),
        Some(Route::Host { host, port }) => {
            let addrs = shard
                .resolver
                .resolve_host(host)
                .await
                .map_err(|error| dns_failure(error, host))?;
            Ok(vec![(
                host.clone(),
                addrs
                    .into_iter()
                    .map(|ip| SocketAddr::new(ip, *port))
                    .collect(),
            )])
        }
        None => {
            let mx = shard
                .resolver
                .resolve_mx(domain)
                .await
                .map_err(|error| dns_failure(error, domain))?;
            let mut list = Vec::new();
            let mut last_error = None;
            for target in mx {
                match target.addrs {
                    Ok(addrs) => list.push((
                        target.host,
                        addrs
                            .into_iter()
                            .map(|ip| SocketAddr::new(ip, port))
                            .collect(),
                    )),
                    Err(error) => last_error = Some((error, target.host)),
                }
            }
            if list.is_empty() {
                let (error, host) = last_error.unwrap_or((
                    DnsError::Temporary("no usable MX host".into()),
                    domain.to_string(),
                ));
                return Err(dns_failure(error, &host));
            }
            Ok(list)
        }
    }
}

async fn connect(
    shard: &Rc<Shard>,
    domain: &str,
    rule: Rule<'_>,
    lane: Lane,
) -> Result<Connection, ConnectFailure> {
    let targets = targets(shard, domain, rule).await?;
    let lane_config = shard.config.lanes.get(lane);
    // The slot counts against the source address's connection cap until
    // the connection is dropped; a failed attempt gives it back here.
    let (source, mut slot) = match acquire_source(shard, lane, rule).await {
        Some((address, slot)) => (Some(address), Some(slot)),
        None => (None, None),
    };
    let helo = lane_config
        .helo_name
        .clone()
        .unwrap_or_else(|| shard.config.hostname.clone());
    let mut last: Option<(SessionError, RemoteInfo)> = None;
    for (host, addrs) in &targets {
        for addr in addrs {
            let params = ConnectParams {
                mx_host: host,
                addr: *addr,
                source,
                helo: &helo,
                tls_mode: rule.tls,
                timeouts: &shard.config.delivery,
            };
            match Connection::open(&shard.tls, &params).await {
                Ok(mut connection) => {
                    if let Some(slot) = slot.take() {
                        connection.attach_guard(slot);
                    }
                    return Ok(connection);
                }
                Err(error) => {
                    tracing::info!(core = shard.index, domain, host = host.as_str(), %addr, %error, "delivery: connection failed; trying the next host");
                    let remote = RemoteInfo {
                        host: Some(host.clone()),
                        ip: Some(addr.ip()),
                        ..RemoteInfo::default()
                    };
                    let try_next = error.try_next_mx();
                    last = Some((error, remote));
                    if !try_next {
                        break;
                    }
                }
            }
        }
    }
    match last {
        Some((error, remote)) => Err(ConnectFailure {
            reply: error.reply(),
            permanent: error.is_permanent(),
            remote,
        }),
        None => Err(ConnectFailure {
            reply: Reply::new(
                451,
                EnhancedStatus::new(4, 4, 4),
                format!("no usable address for {domain}"),
            ),
            permanent: false,
            remote: RemoteInfo::default(),
        }),
    }
}

/// Takes a connection slot of one of the source addresses for `rule`: the
/// rule's own in this lane, else the lane's. Returns `None` when the lane
/// has none.
///
/// When every address is at its connection cap, an idle pooled connection
/// from one of them is closed to free a slot. Otherwise idle connections
/// of other destinations would keep the slots until their idle timeout.
/// With no idle connection to close, the delivery waits for one to close.
async fn acquire_source(
    shard: &Rc<Shard>,
    lane: Lane,
    rule: Rule<'_>,
) -> Option<(IpAddr, Box<dyn std::any::Any>)> {
    let rule_addresses = &rule.settings().source_addresses;
    let addresses: &[IpAddr] = if rule_addresses.is_empty() {
        &shard.config.lanes.get(lane).source_addresses
    } else {
        rule_addresses
    };
    if addresses.is_empty() {
        return None;
    }
    loop {
        if let Some(acquired) = shard.sources.try_acquire(lane, addresses) {
            return Some(acquired);
        }
        let idle = {
            let mut queue = shard.queue.borrow_mut();
            queue.destinations.values_mut().find_map(|destination| {
                let position = destination.idle.iter().position(|idle| {
                    idle.connection
                        .source()
                        .is_some_and(|source| addresses.contains(&source))
                })?;
                Some(destination.idle.swap_remove(position).connection)
            })
        };
        match idle {
            // QUIT and drop it, which gives its slot back.
            Some(connection) => connection.quit().await,
            None => glommio::timer::sleep(super::sources::SLOT_POLL).await,
        }
    }
}

/// Applies the results of one attempt: durable outcome records, log lines,
/// retry timers and at most one DSN for the failures.
fn record_results(
    shard: &Rc<Shard>,
    item: &WorkItem,
    envelope: &Rc<Envelope>,
    attempts: &[u32],
    body: &[u8],
    rule: &EffectiveRule,
    results: ItemResults,
) {
    let now = now_us();
    let id = envelope.message_id.to_string();
    let remote = &results.remote;
    let mut failed: Vec<(u32, Reply, u32, bool)> = Vec::new();
    let mut relayed: Vec<(u32, Reply, u32, bool)> = Vec::new();
    let mut retry_now = Vec::new();
    let mut deferred_until: Option<u64> = None;
    let lifetime_us = rule.max_queue_lifetime.as_micros() as u64;
    let expires_at = envelope
        .expires_at_us
        .min(envelope.received_at_us.saturating_add(lifetime_us));

    for ((position, index), attempt) in item
        .recipients
        .iter()
        .enumerate()
        .zip(results.per_recipient)
    {
        let recipient = &envelope.recipients[*index as usize];
        let attempt_number = attempts[position] + 1;
        let (event, state, outcome, reply) = match attempt {
            Attempt::Retry => {
                retry_now.push(*index);
                continue;
            }
            Attempt::Delivered(reply) => {
                if recipient.notify & notify::SUCCESS != 0 {
                    relayed.push((*index, reply.clone(), attempt_number, false));
                }
                (
                    Event::Delivered,
                    RecipientState::Delivered,
                    Outcome::Delivered,
                    reply,
                )
            }
            Attempt::Permanent(reply) => {
                if is_no_such_user(&reply) {
                    suppress_hard_bounce(shard, &recipient.address);
                }
                failed.push((*index, reply.clone(), attempt_number, false));
                (
                    Event::Bounced,
                    RecipientState::Bounced,
                    Outcome::Bounced,
                    reply,
                )
            }
            Attempt::Transient(reply) => {
                let delay = retry_delay(&rule.retry_schedule, attempt_number);
                let next = next_attempt_at(now, delay);
                if next >= expires_at {
                    failed.push((*index, reply.clone(), attempt_number, true));
                    (
                        Event::Expired,
                        RecipientState::Expired,
                        Outcome::Expired,
                        reply,
                    )
                } else {
                    deferred_until = Some(deferred_until.map_or(next, |current| current.min(next)));
                    (
                        Event::Deferred,
                        RecipientState::Pending {
                            attempts: attempt_number,
                            next_attempt_us: next,
                        },
                        Outcome::Deferred {
                            next_attempt_us: next,
                        },
                        reply,
                    )
                }
            }
        };
        // Failures (bounce DSNs) are appended below, before their outcome
        // records, so that a durable bounce always has its DSN.
        if matches!(event, Event::Bounced | Event::Expired) {
            continue;
        }
        apply_outcome(shard, item, *index, state, outcome, attempt_number, None);
        log_attempt(
            shard,
            &id,
            envelope,
            recipient,
            event,
            &reply,
            attempt_number,
            remote,
            state,
        );
    }

    if !failed.is_empty() {
        let dsn = send_dsn(shard, envelope, body, &failed, DsnAction::Failed, remote);
        for (index, reply, attempt_number, expired) in &failed {
            let recipient = &envelope.recipients[*index as usize];
            let (event, state, outcome) = if *expired {
                (Event::Expired, RecipientState::Expired, Outcome::Expired)
            } else {
                (Event::Bounced, RecipientState::Bounced, Outcome::Bounced)
            };
            apply_outcome(shard, item, *index, state, outcome, *attempt_number, dsn);
            log_attempt(
                shard,
                &id,
                envelope,
                recipient,
                event,
                reply,
                *attempt_number,
                remote,
                state,
            );
        }
    }
    if !relayed.is_empty() {
        send_dsn(shard, envelope, body, &relayed, DsnAction::Relayed, remote);
    }

    let mut queue = shard.queue.borrow_mut();
    let domain: Option<Rc<str>> = item
        .recipients
        .first()
        .map(|index| queue.intern(&envelope.recipients[*index as usize].domain));
    let own = queue.own;
    let Some(message) = queue.entry_mut(item) else {
        return;
    };
    for index in &item.recipients {
        if !retry_now.contains(index) {
            message.scheduled[*index as usize] = false;
        }
    }
    if item.owner != own {
        // A handed-over message: its owner keeps the retry timers and
        // releases the record; a stale connection's retry stays here.
        if let Some(domain) = domain
            && !retry_now.is_empty()
        {
            queue
                .destinations
                .entry(domain)
                .or_default()
                .ready
                .push_back(WorkItem {
                    owner: item.owner,
                    record: item.record,
                    recipients: retry_now,
                });
        }
        queue.forget_handed_if_done(item.owner, item.record);
        return;
    }
    let final_now = message.is_final();
    if final_now {
        queue.messages.remove(&item.record);
        drop(queue);
        crate::audit::release(&shard.spool, item.record);
        return;
    }
    if let Some(domain) = domain {
        if !retry_now.is_empty() {
            let destination = queue.destinations.entry(domain.clone()).or_default();
            destination.ready.push_back(WorkItem {
                owner: item.owner,
                record: item.record,
                recipients: retry_now,
            });
        }
        if let Some(due_us) = deferred_until {
            queue.deferrals.push(std::cmp::Reverse(Deferral {
                due_us,
                record: item.record,
                domain,
            }));
        }
    }
}

/// Whether a permanent failure says the mailbox does not exist: status
/// X.1.1 (RFC 3463: bad destination mailbox address), or a 550 whose text
/// says so where the server gives no enhanced status.
fn is_no_such_user(reply: &Reply) -> bool {
    if !reply.is_permanent() {
        return false;
    }
    match reply.status {
        Some(status) => status.subject == 1 && status.detail == 1,
        None => {
            let text = reply.lines.join(" ").to_ascii_lowercase();
            reply.code == 550
                && [
                    "no such user",
                    "user unknown",
                    "unknown user",
                    "does not exist",
                ]
                .iter()
                .any(|phrase| text.contains(phrase))
        }
    }
}

/// Reports a hard bounce to the control thread, which adds the address to
/// the suppression list.
fn suppress_hard_bounce(shard: &Shard, address: &str) {
    let change = Change {
        op: ChangeOp::Add,
        entry: lists::Entry::Suppression(Reason::HardBounce),
        hmac: shard.site_key.hmac_address(address),
        time_unix_ms: now_us() / 1000,
    };
    if shard.auto_suppress.try_send(change).is_err() {
        tracing::warn!(core = shard.index, address_hmac = %hex::encode(&change.hmac[..8]), "lists: suppression channel full; this hard bounce is not suppressed");
    }
}

/// Records one recipient's outcome: appended to this executor's shard for
/// its own messages, or sent to the owner for a handed-over one (once
/// `dsn`, the commit of the DSN that reports it, is durable).
fn apply_outcome(
    shard: &Rc<Shard>,
    item: &WorkItem,
    index: u32,
    state: RecipientState,
    outcome: Outcome,
    attempts: u32,
    dsn: Option<CommitSeq>,
) {
    let record = item.record;
    if item.owner == shard.index {
        if let Err(error) = shard.spool.append_outcome(record, index, outcome, attempts) {
            // The outcome stays in memory; after a restart the recipient is
            // pending again and may be delivered twice, never lost.
            tracing::error!(core = shard.index, ?record, recipient = index, %error, "delivery: outcome record failed to append");
        }
    } else {
        let message = MeshMessage::Outcome {
            record,
            index,
            state,
            outcome,
            attempts,
        };
        shard
            .mesh
            .send_outcome_after(&shard.spool, item.owner, message, dsn);
    }
    let mut queue = shard.queue.borrow_mut();
    if let Some(message) = queue.entry_mut(item) {
        message.states[index as usize] = state;
    }
}

#[allow(clippy::too_many_arguments)]
fn log_attempt(
    shard: &Shard,
    id: &str,
    envelope: &Envelope,
    recipient: &Recipient,
    event: Event,
    reply: &Reply,
    attempt: u32,
    remote: &RemoteInfo,
    state: RecipientState,
) {
    let mut entry = Entry::new(
        event,
        id,
        envelope.lane,
        envelope.category,
        envelope.received_at_us,
    );
    entry.recipient = Some(shard.log.recipient_field(&recipient.address));
    entry.remote_host = remote.host.as_deref();
    entry.remote_ip = remote.ip.map(|ip| ip.to_string());
    entry.reply_code = Some(reply.code);
    entry.reply = Some(reply.to_diagnostic());
    entry.tls_version = remote.tls_version;
    entry.tls_cipher = remote.tls_cipher.as_deref();
    entry.tls_resumed = remote.tls_resumed;
    entry.attempt = Some(attempt);
    if let RecipientState::Pending {
        next_attempt_us, ..
    } = state
    {
        entry.next_attempt_us = Some(next_attempt_us);
    }
    shard.log.write(&entry);
    crate::audit::record_outcome(&entry);
    crate::metrics::record_event(&entry);
}

/// Returns the time, in microseconds since the epoch, that lies `delay`
/// after `now_us`, or `u64::MAX` when that is out of range.
fn next_attempt_at(now_us: u64, delay: Duration) -> u64 {
    let delay_us = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
    now_us.saturating_add(delay_us)
}

/// The delay before attempt `attempt_number + 1`: the schedule's entry for
/// this attempt (its last entry repeats), plus up to 20% random jitter so
/// that a burst of deferrals does not retry in lockstep.
pub fn retry_delay(schedule: &[Duration], attempt_number: u32) -> Duration {
    let base = schedule
        .get((attempt_number as usize).saturating_sub(1))
        .or(schedule.last())
        .copied()
        .unwrap_or(Duration::from_secs(300));
    let jitter_fraction: f64 = rand::thread_rng().gen_range(0.0..0.2);
    base + base.mul_f64(jitter_fraction)
}

fn expire(
    shard: &Rc<Shard>,
    item: &WorkItem,
    envelope: &Rc<Envelope>,
    attempts: &[u32],
    rule: &EffectiveRule,
) {
    let reply = Reply::new(
        451,
        EnhancedStatus::new(4, 4, 7),
        "delivery time expired before the message could be delivered",
    );
    let results = ItemResults {
        per_recipient: item
            .recipients
            .iter()
            .map(|_| Attempt::Transient(reply.clone()))
            .collect(),
        remote: RemoteInfo::default(),
    };
    // With a zero lifetime every transient result is past expiry, so
    // `record_results` turns each into an expired recipient with a DSN.
    let mut expired_rule = rule.clone();
    expired_rule.max_queue_lifetime = Duration::ZERO;
    let body = read_stored(shard, item)
        .map(|stored| stored.body)
        .unwrap_or_default();
    record_results(
        shard,
        item,
        envelope,
        attempts,
        &body,
        &expired_rule,
        results,
    );
}

/// Queues a DSN to the envelope sender for the given recipients, unless the
/// sender is null (RFC 5321 §4.5.5: never notify about a notification) or
/// the recipients asked for none (RFC 3461 §4.1).
fn send_dsn(
    shard: &Rc<Shard>,
    envelope: &Envelope,
    body: &[u8],
    recipients: &[(u32, Reply, u32, bool)],
    action: DsnAction,
    remote: &RemoteInfo,
) -> Option<CommitSeq> {
    if envelope.sender.is_empty() {
        return None;
    }
    let wanted: Vec<&(u32, Reply, u32, bool)> = recipients
        .iter()
        .filter(|(index, _, _, _)| {
            let notify_bits = envelope.recipients[*index as usize].notify;
            match action {
                DsnAction::Failed => notify_bits == 0 || notify_bits & notify::FAILURE != 0,
                _ => notify_bits & notify::SUCCESS != 0,
            }
        })
        .collect();
    if wanted.is_empty() {
        return None;
    }
    let now = now_us();
    let diagnostics: Vec<String> = wanted
        .iter()
        .map(|(_, reply, _, _)| reply.to_diagnostic())
        .collect();
    let remote_mta = remote.host.clone();
    let dsn_recipients: Vec<DsnRecipient<'_>> = wanted
        .iter()
        .zip(diagnostics.iter())
        .map(|((index, reply, _, expired), diagnostic)| {
            let recipient = &envelope.recipients[*index as usize];
            // RFC 3463 X.4.7: the message's lifetime ran out.
            let status = if *expired {
                EnhancedStatus::new(5, 4, 7)
            } else {
                reply.status.unwrap_or(if reply.is_permanent() {
                    EnhancedStatus::new(5, 0, 0)
                } else {
                    EnhancedStatus::new(4, 0, 0)
                })
            };
            DsnRecipient {
                final_recipient: &recipient.address,
                original_recipient: recipient.orcpt.as_deref(),
                action,
                status,
                remote_mta: remote_mta.as_deref(),
                diagnostic: Some(diagnostic.as_str()),
                last_attempt_unix_us: Some(now),
                will_retry_until_unix_us: None,
            }
        })
        .collect();
    let dsn = build_dsn(&DsnInput {
        reporting_mta: &shard.config.hostname,
        sender: &envelope.sender,
        envid: envelope.envid.as_deref(),
        arrival_unix_us: envelope.received_at_us,
        recipients: &dsn_recipients,
        original: body,
        ret: envelope.ret,
        smtputf8: envelope.smtputf8,
    });
    let lifetime_us = shard
        .config
        .lanes
        .get(envelope.lane)
        .max_queue_lifetime
        .get()
        .as_micros() as u64;
    let sender_domain = envelope
        .sender
        .rsplit_once('@')
        .map(|(_, domain)| domain.trim_end_matches('>').to_ascii_lowercase())
        .unwrap_or_default();
    let notification = Envelope {
        message_id: MessageId(rand::random()),
        received_at_us: now,
        expires_at_us: now.saturating_add(lifetime_us),
        lane: envelope.lane,
        category: caduceus_policy::Category::Transactional,
        sender: String::new(),
        envid: None,
        ret: None,
        body_8bit: dsn.iter().any(|byte| *byte >= 0x80),
        smtputf8: envelope.smtputf8,
        peer_uid: envelope.peer_uid,
        peer_gid: envelope.peer_gid,
        peer_pid: envelope.peer_pid,
        recipients: vec![Recipient {
            address: envelope.sender.clone(),
            domain: idna::domain_to_ascii(&sender_domain).unwrap_or(sender_domain),
            notify: notify::NEVER,
            orcpt: None,
        }],
    };
    match shard.spool.append_message(&notification, &dsn) {
        Ok((record, seq)) => {
            let id = notification.message_id.to_string();
            let mut entry = Entry::new(
                Event::Received,
                &id,
                notification.lane,
                notification.category,
                now,
            );
            entry.recipients = Some(1);
            entry.size_bytes = Some(dsn.len());
            entry.note = Some(match action {
                DsnAction::Failed => "dsn failed",
                _ => "dsn relayed",
            });
            shard.log.write(&entry);
            crate::audit::dsn_generated(&envelope.message_id.to_string(), &entry, record);
            crate::metrics::record_event(&entry);
            let states = vec![RecipientState::Pending {
                attempts: 0,
                next_attempt_us: now,
            }];
            let ready = shard.queue.borrow_mut().insert(
                record,
                QueuedMessage::new(Rc::new(notification), states),
                now,
            );
            for domain in ready {
                dispatch(shard, &domain);
            }
            Some(seq)
        }
        Err(error) => {
            tracing::error!(core = shard.index, message_id = %envelope.message_id, %error, "delivery: DSN could not be queued; the sender gets no notification");
            None
        }
    }
}

/// Runs deferral timers, closes idle connections past their timeout and
/// checks the disk reserve.
pub async fn scheduler(shard: Rc<Shard>) {
    let idle_timeout = shard.config.delivery.idle_timeout.get();
    let mut last_reserve_check = Instant::now() - Duration::from_secs(10);
    loop {
        let now = now_us();
        let ready = shard.queue.borrow_mut().release_due(now);
        for domain in ready {
            dispatch(&shard, &domain);
        }
        let expired: Vec<Connection> = {
            let mut queue = shard.queue.borrow_mut();
            let mut closing = Vec::new();
            for destination in queue.destinations.values_mut() {
                let mut index = 0;
                while index < destination.idle.len() {
                    if destination.idle[index].idle_since.elapsed() >= idle_timeout {
                        closing.push(destination.idle.swap_remove(index).connection);
                    } else {
                        index += 1;
                    }
                }
            }
            closing
        };
        for connection in expired {
            glommio::spawn_local(connection.quit()).detach();
        }
        if last_reserve_check.elapsed() >= Duration::from_secs(1) {
            last_reserve_check = Instant::now();
            check_reserve(&shard);
            // Picks up destinations whose hold a policy reload lifted.
            dispatch_all(&shard);
        }
        let sleep_us = shard.queue.borrow().next_due_us().map_or(100_000, |due| {
            due.saturating_sub(now_us()).clamp(1_000, 100_000)
        });
        glommio::timer::sleep(Duration::from_micros(sleep_us)).await;
    }
}

fn check_reserve(shard: &Shard) {
    let dir = shard.config.spool_dir();
    match nix::sys::statvfs::statvfs(&dir) {
        Ok(stat) => {
            let free = stat.blocks_available() * stat.fragment_size();
            let below = free < shard.config.spool.reserve_bytes;
            if below != shard.below_reserve.get() {
                if below {
                    tracing::warn!(
                        core = shard.index,
                        free_bytes = free,
                        reserve_bytes = shard.config.spool.reserve_bytes,
                        "spool: free space below the reserve; ingress answers 452 4.3.1 until space is freed"
                    );
                } else {
                    tracing::info!(
                        core = shard.index,
                        free_bytes = free,
                        "spool: free space above the reserve again; ingress resumes"
                    );
                }
                shard.below_reserve.set(below);
            }
        }
        Err(error) => {
            tracing::warn!(core = shard.index, %error, dir = %dir.display(), "spool: statvfs failed; disk reserve not checked");
        }
    }
}

/// Closes every pooled connection, for shutdown.
pub async fn close_idle(shard: &Rc<Shard>) {
    let connections: Vec<Connection> = {
        let mut queue = shard.queue.borrow_mut();
        queue
            .destinations
            .values_mut()
            .flat_map(|destination| destination.idle.drain(..).map(|idle| idle.connection))
            .collect()
    };
    for connection in connections {
        connection.quit().await;
    }
}

/// Deletes every pending recipient of a destination without a DSN (operator
/// command). Recipients with a delivery in flight are left alone.
pub fn delete_domain(shard: &Rc<Shard>, domain: &str) -> usize {
    // Ready items leave their queue first, so that their recipients are
    // deleted too; only deliveries already in flight keep theirs.
    let ready: Vec<WorkItem> = shard
        .queue
        .borrow_mut()
        .destinations
        .get_mut(domain)
        .map(|destination| destination.ready.drain(..).collect())
        .unwrap_or_default();
    let mut count = 0;
    for item in &ready {
        if item.owner != shard.index {
            count += delete_handed(shard, item);
        }
        unschedule(shard, item);
    }
    let mut targets: Vec<(RecordRef, Vec<u32>, Rc<Envelope>)> = Vec::new();
    {
        let queue = shard.queue.borrow();
        for (record, message) in &queue.messages {
            let indexes: Vec<u32> = message
                .envelope
                .recipients
                .iter()
                .enumerate()
                .filter(|(index, recipient)| {
                    recipient.domain == domain
                        && !message.scheduled[*index]
                        && matches!(message.states[*index], RecipientState::Pending { .. })
                })
                .map(|(index, _)| index as u32)
                .collect();
            if !indexes.is_empty() {
                targets.push((*record, indexes, message.envelope.clone()));
            }
        }
    }
    for (record, indexes, envelope) in targets {
        let id = envelope.message_id.to_string();
        for index in indexes {
            let attempts = shard
                .queue
                .borrow()
                .messages
                .get(&record)
                .map_or(0, |message| message.attempts(index as usize));
            let item = WorkItem {
                owner: shard.index,
                record,
                recipients: vec![index],
            };
            apply_outcome(
                shard,
                &item,
                index,
                RecipientState::Deleted,
                Outcome::Deleted,
                attempts,
                None,
            );
            log_deleted(shard, &id, &envelope, index);
            count += 1;
        }
        let final_now = shard
            .queue
            .borrow()
            .messages
            .get(&record)
            .is_some_and(QueuedMessage::is_final);
        if final_now {
            shard.queue.borrow_mut().messages.remove(&record);
            crate::audit::release(&shard.spool, record);
        }
    }
    count
}

/// Deletes the recipients of a handed-over item that waits in a ready
/// queue here: the outcome goes to the owner, which appends it.
fn delete_handed(shard: &Rc<Shard>, item: &WorkItem) -> usize {
    let Some((envelope, attempts)) = snapshot(shard, item) else {
        return 0;
    };
    let id = envelope.message_id.to_string();
    for (index, attempts) in item.recipients.iter().zip(attempts) {
        apply_outcome(
            shard,
            item,
            *index,
            RecipientState::Deleted,
            Outcome::Deleted,
            attempts,
            None,
        );
        log_deleted(shard, &id, &envelope, *index);
    }
    item.recipients.len()
}

fn log_deleted(shard: &Shard, id: &str, envelope: &Envelope, index: u32) {
    let mut entry = Entry::new(
        Event::Deleted,
        id,
        envelope.lane,
        envelope.category,
        envelope.received_at_us,
    );
    entry.recipient = Some(
        shard
            .log
            .recipient_field(&envelope.recipients[index as usize].address),
    );
    entry.note = Some("deleted by operator");
    shard.log.write(&entry);
    crate::audit::record_outcome(&entry);
    crate::metrics::record_event(&entry);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_attempt_saturates_for_huge_delay() {
        // A retry_schedule entry near the largest duration the config
        // accepts (u64::MAX microseconds), plus up to 20% jitter, has more
        // microseconds than a u64 can store. `as u64` wrapped the value
        // around, to an arbitrary and much earlier retry time.
        let now = 1_000_000;
        let schedule = [Duration::from_micros(u64::MAX)];
        for _ in 0..20 {
            let delay = retry_delay(&schedule, 1);
            assert_eq!(next_attempt_at(now, delay), u64::MAX, "{delay:?}");
        }
        assert_eq!(next_attempt_at(now, Duration::from_secs(1)), 2_000_000);
    }
}
