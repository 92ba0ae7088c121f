//! The compiled, read-only form of the per-destination rules.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use crate::config::{Config, RuleConfig};
use crate::domain::{DomainPattern, normalise_domain};
use crate::error::ConfigError;
use crate::suffix_table::{SlotSettings, SuffixTable, TableEntry};
use crate::validate::{CheckedRule, Matcher, check_config};
use crate::{Category, Lane, TlsMode};

/// The `rule_id` of the settings that apply when no rule matches.
pub const DEFAULT_RULE_ID: u32 = u32::MAX;

/// A fixed next hop that replaces the MX hosts of the recipient domain.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum Route {
    Addr(SocketAddr),
    /// A host name in lowercase A-label form, resolved by A and AAAA lookups
    /// (not MX) at delivery time.
    Host {
        host: String,
        port: u16,
    },
}

impl Route {
    /// Parses `host:port`, `ip:port` or `[ipv6]:port`. The port is required
    /// and must not be 0.
    pub fn parse(text: &str) -> Result<Route, String> {
        let invalid = |reason: &str| {
            format!(
                "invalid route {text:?}: {reason}; write HOST:PORT such as \"relay.example.net:25\", \"192.0.2.25:2525\" or \"[2001:db8::25]:25\""
            )
        };
        let (host, port_text) = if let Some(rest) = text.strip_prefix('[') {
            let (address, port) = rest
                .split_once("]:")
                .ok_or_else(|| invalid("an IPv6 address in brackets must be followed by :PORT"))?;
            let address: Ipv6Addr = address
                .parse()
                .map_err(|_| invalid("the text in brackets is not an IPv6 address"))?;
            (HostPart::Ip(IpAddr::V6(address)), port)
        } else {
            let (host, port) = text
                .rsplit_once(':')
                .ok_or_else(|| invalid("the port is missing"))?;
            if host.contains(':') {
                return Err(invalid("put an IPv6 address in brackets"));
            }
            match host.parse::<IpAddr>() {
                Ok(address) => (HostPart::Ip(address), port),
                Err(_) => {
                    let host =
                        normalise_domain(host).map_err(|error| invalid(&error.to_string()))?;
                    (HostPart::Name(host), port)
                }
            }
        };
        let port = port_text
            .parse::<u16>()
            .ok()
            .filter(|port| *port != 0)
            .ok_or_else(|| invalid("the port must be a number from 1 to 65535"))?;
        Ok(match host {
            HostPart::Ip(address) => Route::Addr(SocketAddr::new(address, port)),
            HostPart::Name(host) => Route::Host { host, port },
        })
    }
}

enum HostPart {
    Ip(IpAddr),
    Name(String),
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Route::Addr(address) => write!(f, "{address}"),
            Route::Host { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// The delivery settings for one destination in one lane, with every default
/// already merged in.
#[derive(Clone, Debug, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct EffectiveRule {
    /// Index of the `[[rule]]` in the config, from 0; [`DEFAULT_RULE_ID`]
    /// when no rule matched. Destinations that share a rule id share its
    /// throttle, which is how an `mx` rule groups every domain hosted there.
    pub rule_id: u32,
    pub tls: TlsMode,
    /// `None` means deliver to the MX hosts of the recipient domain.
    pub route: Option<Route>,
    /// Messages per second; `None` means unlimited.
    pub rate_per_sec: Option<f64>,
    /// Messages the token bucket holds; 0 when `rate_per_sec` is `None`.
    pub burst: u32,
    /// Concurrent connections per destination per core.
    pub max_connections: u32,
    pub max_messages_per_connection: u32,
    /// Delays between attempts; the last one repeats until expiry. Never
    /// empty and never zero.
    pub retry_schedule: Box<[Duration]>,
    pub max_queue_lifetime: Duration,
    /// Deliveries wait until an operator releases them.
    pub hold: bool,
    /// False when the rule's `lanes` leaves out this lane: recipients get
    /// `550 5.7.1` at RCPT, and queued mail waits as if held.
    pub lane_allowed: bool,
    /// Source addresses for connections in this lane: the rule's
    /// `source_addresses` that are in the lane's pool, in the rule's order.
    /// Empty means the lane's own `source_addresses`.
    pub source_addresses: Box<[IpAddr]>,
}

/// A compiled rule's description, kept for `explain`.
#[derive(Clone, Debug, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub(crate) struct RuleSource {
    pub config: RuleConfig,
    pub matcher: Matcher,
}

/// The settings for one destination in one lane, as a lookup returns them.
///
/// The public fields are the settings that the delivery path reads for
/// every message. A lookup copies them out of the table slot that matched,
/// so reading them costs nothing beyond the lookup. The route, the retry
/// schedule and the queue lifetime sit in the rule's full settings, one
/// more read away: [`Rule::settings`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rule<'p> {
    /// As [`EffectiveRule::rule_id`].
    pub rule_id: u32,
    pub tls: TlsMode,
    pub rate_per_sec: Option<f64>,
    pub burst: u32,
    pub max_connections: u32,
    pub max_messages_per_connection: u32,
    pub hold: bool,
    /// As [`EffectiveRule::lane_allowed`], for the lane of the lookup.
    pub lane_allowed: bool,
    settings: &'p EffectiveRule,
}

impl<'p> Rule<'p> {
    fn new(rule_id: u32, hot: SlotSettings, lane: Lane, settings: &'p EffectiveRule) -> Rule<'p> {
        Rule {
            lane_allowed: hot.barred_lanes & lane_bit(lane) == 0,
            rule_id,
            tls: hot.tls,
            rate_per_sec: hot.rate_per_sec,
            burst: hot.burst,
            max_connections: hot.max_connections,
            max_messages_per_connection: hot.max_messages_per_connection,
            hold: hot.hold,
            settings,
        }
    }

    /// Returns the view of `settings` read directly, as for the defaults,
    /// which have no slot.
    fn full(settings: &'p EffectiveRule) -> Rule<'p> {
        Rule {
            rule_id: settings.rule_id,
            tls: settings.tls,
            rate_per_sec: settings.rate_per_sec,
            burst: settings.burst,
            max_connections: settings.max_connections,
            max_messages_per_connection: settings.max_messages_per_connection,
            hold: settings.hold,
            lane_allowed: settings.lane_allowed,
            settings,
        }
    }

    /// Returns every setting of the rule in this lane.
    pub fn settings(&self) -> &'p EffectiveRule {
        self.settings
    }

    /// Returns the fixed next hop, or `None` to deliver to the MX hosts.
    pub fn route(&self) -> Option<&'p Route> {
        self.settings.route.as_ref()
    }

    pub fn max_queue_lifetime(&self) -> Duration {
        self.settings.max_queue_lifetime
    }
}

/// Returns the bit of `lane` in [`SlotSettings::barred_lanes`].
fn lane_bit(lane: Lane) -> u8 {
    1 << lane as u8
}

impl SlotSettings {
    /// Returns the slot settings of a rule, given its settings in each lane.
    /// The fields other than the lane mask are the same in every lane, so
    /// the first lane's are taken.
    fn of(lanes: &LaneRules) -> SlotSettings {
        let rule = &lanes[0];
        let barred_lanes = Lane::ALL
            .iter()
            .zip(lanes)
            .filter(|(_, settings)| !settings.lane_allowed)
            .fold(0, |mask, (lane, _)| mask | lane_bit(*lane));
        SlotSettings {
            barred_lanes,
            tls: rule.tls,
            rate_per_sec: rule.rate_per_sec,
            burst: rule.burst,
            max_connections: rule.max_connections,
            max_messages_per_connection: rule.max_messages_per_connection,
            hold: rule.hold,
        }
    }
}

/// The compiled delivery policy.
///
/// `Policy` is immutable once built: the engine shares it behind an `Arc`
/// and replaces the whole value on reload. Every lookup reads tables built
/// by [`Policy::compile`], so the hot path allocates nothing and takes no
/// locks.
///
/// A domain rule takes precedence over an MX rule: the engine calls
/// [`Policy::for_mx_host`] only when [`Policy::for_domain`] returns the
/// defaults (`rule_id == DEFAULT_RULE_ID`).
///
/// [`Policy::write_compiled`] stores the compiled tables as an rkyv archive
/// and [`Policy::open_compiled`] validates and loads them, so a start need
/// not parse and check the TOML rules again.
#[derive(Debug, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Policy {
    /// Domain rules. Each slot also carries its rule's [`SlotSettings`].
    recipient_domains: SuffixTable,
    mx_hosts: SuffixTable,
    sender_domains: SuffixTable,
    /// Every rule's settings in each lane, indexed by rule. A lookup only
    /// computes an address in here; the caller reads it for the route,
    /// the retry schedule or the queue lifetime.
    pub(crate) rules: Vec<LaneRules>,
    defaults: LaneRules,
    pub(crate) sources: Vec<RuleSource>,
}

/// A rule's settings in each lane, indexed by `Lane as usize`.
type LaneRules = [EffectiveRule; Lane::ALL.len()];

/// Removes one trailing dot, which names from DNS answers may carry.
#[inline]
fn without_root_dot(name: &str) -> &[u8] {
    name.strip_suffix('.').unwrap_or(name).as_bytes()
}

impl Policy {
    /// Validates `config` and compiles its rules and defaults.
    ///
    /// This does not check that the lanes' CPU ids exist, because a policy
    /// may be compiled on another machine; [`crate::load_config`] does.
    /// Errors carry no line numbers, because a `Config` does not keep its
    /// source text. They name the key instead.
    pub fn compile(config: &Config) -> Result<Policy, ConfigError> {
        let checked = check_config(config, None).map_err(|issues| {
            let first = &issues[0];
            ConfigError::invalid(
                "configuration",
                None,
                first.path.to_string(),
                first.message.clone(),
            )
        })?;

        let rule_settings: Vec<LaneRules> = config
            .rules
            .iter()
            .zip(&checked)
            .enumerate()
            .map(|(index, (rule, checked_rule))| {
                // `check_config` caps the rule count far below u32::MAX.
                let rule_id = index as u32;
                Lane::ALL.map(|lane| merge(config, lane, rule_id, Some((rule, checked_rule))))
            })
            .collect();
        let defaults = Lane::ALL.map(|lane| merge(config, lane, DEFAULT_RULE_ID, None));

        let duplicate = |(first, second): (u32, u32)| {
            ConfigError::invalid(
                "configuration",
                None,
                format!("rule[{second}]"),
                format!("matches the same names as rule[{first}]; merge the two rules into one"),
            )
        };
        let domain_entries = |include: fn(&RuleConfig) -> bool| {
            config
                .rules
                .iter()
                .zip(&checked)
                .enumerate()
                .filter(move |(_, (rule, _))| include(rule))
                .filter_map(|(index, (_, checked_rule))| match &checked_rule.matcher {
                    Matcher::Domain(pattern) => Some(entry(pattern, index, &rule_settings)),
                    Matcher::MxHost(_) => None,
                })
        };
        let recipient_domains = SuffixTable::build(domain_entries(|rule| {
            rule.has_delivery_settings() || rule.sender_category.is_none()
        }))
        .map_err(duplicate)?;
        let sender_domains =
            SuffixTable::build(domain_entries(|rule| rule.sender_category.is_some()))
                .map_err(duplicate)?;
        let mx_hosts = SuffixTable::build(checked.iter().enumerate().filter_map(
            |(index, checked_rule)| match &checked_rule.matcher {
                Matcher::MxHost(pattern) => Some(entry(pattern, index, &rule_settings)),
                Matcher::Domain(_) => None,
            },
        ))
        .map_err(duplicate)?;

        let sources = config
            .rules
            .iter()
            .zip(checked)
            .map(|(rule, checked_rule)| RuleSource {
                config: rule.clone(),
                matcher: checked_rule.matcher,
            })
            .collect();
        Ok(Policy {
            recipient_domains,
            mx_hosts,
            sender_domains,
            rules: rule_settings,
            defaults,
            sources,
        })
    }

    /// Returns the settings for a recipient domain in `lane`: those of the
    /// longest matching domain rule, or the defaults.
    ///
    /// `domain` must already be a lowercase A-label, as
    /// [`crate::normalise_domain`] returns; other forms match no rule.
    #[inline]
    pub fn for_domain(&self, domain: &str, lane: Lane) -> Rule<'_> {
        match self.recipient_domains.lookup(without_root_dot(domain)) {
            Some(slot_index) => self.hit(&self.recipient_domains, slot_index, lane),
            None => Rule::full(&self.defaults[lane as usize]),
        }
    }

    /// Returns the rule of an occupied slot of `table`. Reads the slot,
    /// which the lookup has just read, and only computes the address of
    /// the full settings.
    #[inline]
    fn hit(&self, table: &SuffixTable, slot_index: usize, lane: Lane) -> Rule<'_> {
        let (rule_index, hot) = table.hit(slot_index);
        // `check_tables` keeps every slot's rule index below the rule
        // count, so the fallback is never taken. It avoids a panic path.
        let settings = self
            .rules
            .get(rule_index as usize)
            .map_or(&self.defaults[lane as usize], |rule| &rule[lane as usize]);
        Rule::new(rule_index, hot, lane, settings)
    }

    /// Returns the settings of the longest `mx` rule that matches an MX host
    /// name, in lowercase A-label form with or without the trailing dot.
    pub fn for_mx_host(&self, host: &str, lane: Lane) -> Option<Rule<'_>> {
        self.mx_hosts
            .lookup(without_root_dot(host))
            .map(|slot_index| self.hit(&self.mx_hosts, slot_index, lane))
    }

    /// Returns true when the config has `mx` rules, so that a caller can
    /// skip the MX lookup that [`Policy::for_mx_host`] needs otherwise.
    pub fn has_mx_rules(&self) -> bool {
        !self.mx_hosts.is_empty()
    }

    /// Returns the settings used when no rule matches.
    pub fn defaults(&self, lane: Lane) -> Rule<'_> {
        Rule::full(&self.defaults[lane as usize])
    }

    /// Returns the category forced on mail from `sender_domain`, if a rule
    /// with `sender_category` matches it. The domain may be a U-label or
    /// contain capitals: the SMTP sender is kept as given, and a sender
    /// with SMTPUTF8 may use a U-label. A domain that is not valid matches
    /// no rule.
    pub fn sender_category(&self, sender_domain: &str) -> Option<Category> {
        let normalised;
        let domain = if sender_domain
            .bytes()
            .all(|byte| byte.is_ascii() && !byte.is_ascii_uppercase())
        {
            sender_domain
        } else {
            normalised = normalise_domain(sender_domain).ok()?;
            normalised.as_str()
        };
        let rule_index = self.sender_rule(domain)?;
        self.sources[rule_index as usize].config.sender_category
    }

    /// Returns the number of `[[rule]]` entries compiled.
    pub fn rule_count(&self) -> usize {
        self.sources.len()
    }

    /// Checks that every index in the tables points inside its table, for a
    /// policy read from a compiled file.
    pub(crate) fn check_tables(&self) -> Result<(), String> {
        let rule_count = self.sources.len();
        if rule_count >= DEFAULT_RULE_ID as usize {
            return Err(format!("{rule_count} rules is too many"));
        }
        let tables = [
            ("recipient domain", &self.recipient_domains),
            ("MX host", &self.mx_hosts),
            ("sender domain", &self.sender_domains),
        ];
        for (name, table) in tables {
            table
                .check(rule_count)
                .map_err(|problem| format!("{name} table: {problem}"))?;
        }
        if self.rules.len() != rule_count {
            return Err(format!(
                "{} rule settings for {rule_count} rules",
                self.rules.len()
            ));
        }
        for (rule_index, rules) in self.rules.iter().enumerate() {
            check_lane_rules(rules, rule_index as u32)
                .map_err(|problem| format!("rule {rule_index}: {problem}"))?;
        }
        let slot_tables = [
            ("recipient domain", &self.recipient_domains),
            ("MX host", &self.mx_hosts),
        ];
        for (name, table) in slot_tables {
            for (slot_index, rule_index) in table.occupied_slots() {
                let (_, stored) = table.hit(slot_index);
                if stored != SlotSettings::of(&self.rules[rule_index as usize]) {
                    return Err(format!(
                        "{name} table: slot {slot_index} carries settings that differ from rule {rule_index}"
                    ));
                }
            }
        }
        check_lane_rules(&self.defaults, DEFAULT_RULE_ID)
            .map_err(|problem| format!("defaults: {problem}"))
    }

    /// Computes the lookup filters, which compiled files do not store.
    pub(crate) fn rebuild_filters(&mut self) {
        self.recipient_domains.rebuild_filter();
        self.mx_hosts.rebuild_filter();
        self.sender_domains.rebuild_filter();
    }

    pub(crate) fn sender_rule(&self, sender_domain: &str) -> Option<u32> {
        self.sender_domains
            .lookup(without_root_dot(sender_domain))
            .map(|slot_index| self.sender_domains.rule_index(slot_index))
    }
}

/// Returns the table entry of rule `index`, whose slot carries the rule's
/// [`SlotSettings`].
fn entry<'a>(
    pattern: &'a DomainPattern,
    index: usize,
    rule_settings: &[LaneRules],
) -> TableEntry<'a> {
    TableEntry {
        name: &pattern.name,
        wildcard: pattern.wildcard,
        rule_index: index as u32,
        settings: SlotSettings::of(&rule_settings[index]),
    }
}

/// Checks that each lane's settings belong to rule `rule_id` and have a
/// retry schedule.
fn check_lane_rules(rules: &LaneRules, rule_id: u32) -> Result<(), String> {
    for (lane, rule) in Lane::ALL.iter().zip(rules) {
        check_rule(*lane, rule, rule_id)?;
    }
    Ok(())
}

/// Checks that `rule`, the settings in `lane`, belong to rule `rule_id` and
/// have a retry schedule.
fn check_rule(lane: Lane, rule: &EffectiveRule, rule_id: u32) -> Result<(), String> {
    if rule.rule_id != rule_id {
        return Err(format!(
            "the {} lane's settings are for rule {}, not rule {rule_id}",
            lane.as_str(),
            rule.rule_id
        ));
    }
    if rule.retry_schedule.is_empty() {
        return Err(format!(
            "the {} lane's retry schedule is empty",
            lane.as_str()
        ));
    }
    Ok(())
}

/// Merges a rule's overrides with the lane and delivery defaults.
fn merge(
    config: &Config,
    lane: Lane,
    rule_id: u32,
    rule: Option<(&RuleConfig, &CheckedRule)>,
) -> EffectiveRule {
    let lane_config = config.lanes.get(lane);
    let lane_schedule = || {
        lane_config
            .retry_schedule
            .iter()
            .map(|delay| delay.get())
            .collect()
    };
    let Some((rule, checked)) = rule else {
        return EffectiveRule {
            rule_id,
            tls: config.tls.default_mode,
            route: None,
            rate_per_sec: None,
            burst: 0,
            max_connections: config.delivery.max_connections_per_destination,
            max_messages_per_connection: config.delivery.max_messages_per_connection,
            retry_schedule: lane_schedule(),
            max_queue_lifetime: lane_config.max_queue_lifetime.get(),
            hold: false,
            lane_allowed: true,
            source_addresses: Box::new([]),
        };
    };
    EffectiveRule {
        rule_id,
        tls: rule.tls.unwrap_or(config.tls.default_mode),
        route: checked.route.clone(),
        rate_per_sec: rule.rate,
        burst: checked.burst,
        max_connections: rule
            .max_connections
            .unwrap_or(config.delivery.max_connections_per_destination),
        max_messages_per_connection: rule
            .max_messages_per_connection
            .unwrap_or(config.delivery.max_messages_per_connection),
        retry_schedule: match &rule.retry_schedule {
            Some(schedule) => schedule.iter().map(|delay| delay.get()).collect(),
            None => lane_schedule(),
        },
        max_queue_lifetime: rule
            .max_queue_lifetime
            .unwrap_or(lane_config.max_queue_lifetime)
            .get(),
        hold: rule.hold.unwrap_or(false),
        lane_allowed: rule
            .lanes
            .as_ref()
            .is_none_or(|lanes| lanes.contains(&lane)),
        source_addresses: rule
            .source_addresses
            .iter()
            .flatten()
            .filter(|address| lane_config.source_addresses.contains(address))
            .copied()
            .collect(),
    }
}
