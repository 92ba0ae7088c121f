//! Checks of values that parse as TOML but make no sense to the engine.
//!
//! Each problem is reported with the dotted key of the offending value, so
//! that the loader can point at its line and column and `Policy::compile`
//! can name it for a configuration built in code.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use crate::Lane;
use crate::compiled::Route;
use crate::config::{Config, LaneConfig, LanesConfig, RuleConfig, SPOOL_ENVELOPE_HEADROOM_BYTES};
use crate::domain::{DomainPattern, check_host_name};
use crate::duration::ConfigDuration;

/// The maximum number of rules in one configuration. Rule ids are `u32` with
/// `u32::MAX` reserved, and the compiled name arena must stay under 4 GiB at
/// 253 octets a name.
pub(crate) const MAX_RULES: usize = 1 << 20;

/// One step of a key path: a table key or an array index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum KeyPart {
    Key(&'static str),
    Index(usize),
}

/// The position of a value in the config, such as `lanes.bulk.cores[1]`.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub(crate) struct KeyPath(pub Vec<KeyPart>);

impl KeyPath {
    pub fn new(keys: &[&'static str]) -> KeyPath {
        KeyPath(keys.iter().map(|key| KeyPart::Key(key)).collect())
    }

    pub fn key(&self, key: &'static str) -> KeyPath {
        let mut parts = self.0.clone();
        parts.push(KeyPart::Key(key));
        KeyPath(parts)
    }

    pub fn index(&self, index: usize) -> KeyPath {
        let mut parts = self.0.clone();
        parts.push(KeyPart::Index(index));
        KeyPath(parts)
    }

    fn rule(index: usize) -> KeyPath {
        KeyPath(vec![KeyPart::Key("rule"), KeyPart::Index(index)])
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (position, part) in self.0.iter().enumerate() {
            match part {
                KeyPart::Key(key) if position == 0 => f.write_str(key)?,
                KeyPart::Key(key) => write!(f, ".{key}")?,
                KeyPart::Index(index) => write!(f, "[{index}]")?,
            }
        }
        Ok(())
    }
}

/// One invalid value and what to do about it.
#[derive(Clone, Debug)]
pub(crate) struct Issue {
    pub path: KeyPath,
    pub message: String,
}

/// The normalised pattern of a rule and the kind of name it matches.
#[derive(Clone, Debug, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub(crate) enum Matcher {
    Domain(DomainPattern),
    MxHost(DomainPattern),
}

/// The parts of a rule that validation already had to work out.
#[derive(Clone, Debug)]
pub(crate) struct CheckedRule {
    pub matcher: Matcher,
    pub route: Option<Route>,
    /// Token bucket size; 0 when the rule sets no rate.
    pub burst: u32,
}

/// Validates everything in `config`. `online_cpus` is the sorted list of CPU
/// ids of this machine. `None` skips the check that lane cores exist, because
/// a policy may be compiled on another machine than the one that runs it.
///
/// Returns the checked rules, one per `[[rule]]` in order, or every problem
/// found.
pub(crate) fn check_config(
    config: &Config,
    online_cpus: Option<&[usize]>,
) -> Result<Vec<CheckedRule>, Vec<Issue>> {
    let mut issues = Vec::new();
    check_general(config, &mut issues);
    check_ingress(config, &mut issues);
    for lane in Lane::ALL {
        check_lane(lane, config.lanes.get(lane), &mut issues);
    }
    check_cores(config, online_cpus, &mut issues);
    check_delivery(config, &mut issues);
    check_dns(config, &mut issues);
    check_spool(config, &mut issues);
    let rules = check_rules(&config.rules, &config.lanes, &mut issues);
    if issues.is_empty() {
        Ok(rules)
    } else {
        Err(issues)
    }
}

fn issue(issues: &mut Vec<Issue>, path: KeyPath, message: impl Into<String>) {
    issues.push(Issue {
        path,
        message: message.into(),
    });
}

fn check_nonzero_duration(issues: &mut Vec<Issue>, path: KeyPath, value: ConfigDuration) {
    if value.get().is_zero() {
        issue(
            issues,
            path,
            "must be longer than zero; write a duration such as \"30s\"",
        );
    }
}

fn check_nonzero_count(issues: &mut Vec<Issue>, path: KeyPath, value: u64) {
    if value == 0 {
        issue(issues, path, "must be at least 1");
    }
}

fn check_general(config: &Config, issues: &mut Vec<Issue>) {
    if let Err(reason) = check_host_name(&config.hostname) {
        issue(
            issues,
            KeyPath::new(&["hostname"]),
            format!(
                "{:?} is not a valid host name: {reason}; set hostname to this machine's fully qualified domain name in ASCII (A-label) form",
                config.hostname
            ),
        );
    }
    if config.state_dir.as_os_str().is_empty() {
        issue(
            issues,
            KeyPath::new(&["state_dir"]),
            "must not be empty; set a directory such as \"/var/lib/caduceus\"",
        );
    }
    if config.user.as_deref() == Some("") {
        issue(
            issues,
            KeyPath::new(&["user"]),
            "must not be empty; name a user or remove the key",
        );
    }
}

fn check_ingress(config: &Config, issues: &mut Vec<Issue>) {
    let ingress = &config.ingress;
    let path = KeyPath::new(&["ingress"]);
    check_nonzero_count(
        issues,
        path.key("max_message_size_bytes"),
        ingress.max_message_size_bytes,
    );
    check_nonzero_count(
        issues,
        path.key("max_recipients"),
        ingress.max_recipients.into(),
    );
    check_nonzero_count(
        issues,
        path.key("max_received_headers"),
        ingress.max_received_headers.into(),
    );
    // RFC 5321 §4.5.3.1.6: a text line of 1000 octets including CRLF must be
    // accepted, so a smaller limit rejects valid mail.
    if ingress.max_line_length_bytes < 1000 {
        issue(
            issues,
            path.key("max_line_length_bytes"),
            format!(
                "{} is below the 1000 octets RFC 5321 §4.5.3.1.6 requires; set at least 1000",
                ingress.max_line_length_bytes
            ),
        );
    }
    check_nonzero_duration(issues, path.key("command_timeout"), ingress.command_timeout);
    check_nonzero_duration(issues, path.key("data_timeout"), ingress.data_timeout);
}

fn check_lane(lane: Lane, lane_config: &LaneConfig, issues: &mut Vec<Issue>) {
    let path = KeyPath(vec![KeyPart::Key("lanes"), KeyPart::Key(lane.as_str())]);
    if let Err(reason) = lane_config.socket_mode_bits() {
        issue(issues, path.key("socket_mode"), reason);
    }
    for (key, value) in [
        ("socket_owner", &lane_config.socket_owner),
        ("socket_group", &lane_config.socket_group),
    ] {
        if value.as_deref() == Some("") {
            issue(
                issues,
                path.key(key),
                "must not be empty; name a user or group, or remove the key",
            );
        }
    }
    if let Some(helo_name) = &lane_config.helo_name
        && let Err(reason) = check_host_name(helo_name)
    {
        issue(
            issues,
            path.key("helo_name"),
            format!("{helo_name:?} is not a valid host name: {reason}"),
        );
    }
    check_rate_pair(
        lane_config.source_rate,
        lane_config.source_burst,
        &path,
        ("source_rate", "source_burst"),
        issues,
    );
    if lane_config.source_max_connections == Some(0) {
        issue(
            issues,
            path.key("source_max_connections"),
            "must be at least 1 connection; remove the key for no limit",
        );
    }
    for (index, address) in lane_config.source_addresses.iter().enumerate() {
        if lane_config.source_addresses[..index].contains(address) {
            issue(
                issues,
                path.key("source_addresses").index(index),
                format!("lists {address} twice; remove one"),
            );
        }
    }
    let source_limits =
        lane_config.source_rate.is_some() || lane_config.source_max_connections.is_some();
    if source_limits && lane_config.source_addresses.is_empty() {
        issue(
            issues,
            path.key("source_addresses"),
            "is empty, so source_rate and source_max_connections have no address to apply to; list the lane's source addresses or remove those keys",
        );
    }
    check_nonzero_duration(
        issues,
        path.key("max_queue_lifetime"),
        lane_config.max_queue_lifetime,
    );
    check_retry_schedule(
        issues,
        path.key("retry_schedule"),
        &lane_config.retry_schedule,
    );
}

fn check_retry_schedule(issues: &mut Vec<Issue>, path: KeyPath, schedule: &[ConfigDuration]) {
    if schedule.is_empty() {
        issue(
            issues,
            path,
            "must list at least one delay, such as [\"1m\", \"10m\", \"1h\"]; the last delay repeats until the message expires",
        );
        return;
    }
    for (index, delay) in schedule.iter().enumerate() {
        check_nonzero_duration(issues, path.index(index), *delay);
    }
}

fn check_cores(config: &Config, online_cpus: Option<&[usize]>, issues: &mut Vec<Issue>) {
    let mut owner: BTreeMap<usize, Lane> = BTreeMap::new();
    for lane in Lane::ALL {
        let path = KeyPath(vec![
            KeyPart::Key("lanes"),
            KeyPart::Key(lane.as_str()),
            KeyPart::Key("cores"),
        ]);
        for (index, cpu) in config.lanes.get(lane).cores.iter().enumerate() {
            if let Some(online) = online_cpus
                && online.binary_search(cpu).is_err()
            {
                issue(
                    issues,
                    path.index(index),
                    format!(
                        "CPU {cpu} does not exist on this machine, whose online CPUs are {}; list only those",
                        format_cpu_list(online)
                    ),
                );
                continue;
            }
            match owner.insert(*cpu, lane) {
                None => {}
                Some(previous) if previous == lane => issue(
                    issues,
                    path.index(index),
                    format!(
                        "CPU {cpu} is listed twice for lanes.{}; list it once",
                        lane.as_str()
                    ),
                ),
                Some(_) if config.lanes.allow_shared_cpus => {}
                Some(previous) => issue(
                    issues,
                    path.index(index),
                    format!(
                        "CPU {cpu} is listed for both lanes.{}.cores and lanes.{}.cores; a CPU serves one lane only, so remove it from one of them",
                        previous.as_str(),
                        lane.as_str()
                    ),
                ),
            }
        }
    }
}

/// Formats sorted CPU ids as ranges, such as `0-3,6`.
fn format_cpu_list(cpus: &[usize]) -> String {
    let mut ranges: Vec<String> = Vec::new();
    let mut index = 0;
    while index < cpus.len() {
        let start = cpus[index];
        let mut end = start;
        while index + 1 < cpus.len() && cpus[index + 1] == end + 1 {
            index += 1;
            end = cpus[index];
        }
        ranges.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        index += 1;
    }
    if ranges.is_empty() {
        "unknown".to_string()
    } else {
        ranges.join(",")
    }
}

fn check_delivery(config: &Config, issues: &mut Vec<Issue>) {
    let delivery = &config.delivery;
    let path = KeyPath::new(&["delivery"]);
    check_nonzero_count(issues, path.key("smtp_port"), delivery.smtp_port.into());
    check_nonzero_duration(
        issues,
        path.key("connect_timeout"),
        delivery.connect_timeout,
    );
    check_nonzero_duration(
        issues,
        path.key("greeting_timeout"),
        delivery.greeting_timeout,
    );
    check_nonzero_duration(
        issues,
        path.key("command_timeout"),
        delivery.command_timeout,
    );
    check_nonzero_duration(
        issues,
        path.key("data_done_timeout"),
        delivery.data_done_timeout,
    );
    check_nonzero_count(
        issues,
        path.key("max_connections_per_destination"),
        delivery.max_connections_per_destination.into(),
    );
    check_nonzero_count(
        issues,
        path.key("max_messages_per_connection"),
        delivery.max_messages_per_connection.into(),
    );
    check_nonzero_count(
        issues,
        path.key("max_concurrent_deliveries"),
        delivery.max_concurrent_deliveries.into(),
    );
}

fn check_dns(config: &Config, issues: &mut Vec<Issue>) {
    let dns = &config.dns;
    let path = KeyPath::new(&["dns"]);
    for (index, nameserver) in dns.nameservers.iter().enumerate() {
        if parse_nameserver(nameserver).is_none() {
            issue(
                issues,
                path.key("nameservers").index(index),
                format!(
                    "{nameserver:?} is not a nameserver address; write an IP address with an optional port, such as \"192.0.2.53\", \"192.0.2.53:5353\" or \"[2001:db8::53]:53\""
                ),
            );
        }
    }
    check_nonzero_duration(issues, path.key("timeout"), dns.timeout);
    check_nonzero_count(issues, path.key("attempts"), dns.attempts.into());
}

/// Parses a `dns.nameservers` entry; the port defaults to 53.
pub(crate) fn parse_nameserver(text: &str) -> Option<SocketAddr> {
    if let Ok(address) = text.parse::<IpAddr>() {
        return Some(SocketAddr::new(address, 53));
    }
    text.parse::<SocketAddr>()
        .ok()
        .filter(|address| address.port() != 0)
}

fn check_spool(config: &Config, issues: &mut Vec<Issue>) {
    let spool = &config.spool;
    let path = KeyPath::new(&["spool"]);
    // Ingress accepts a segment minus this headroom, so no message fits in a
    // smaller segment, and EHLO would advertise SIZE 0, which RFC 1870
    // section 3 defines as "no fixed maximum message size".
    if spool.segment_size_bytes <= SPOOL_ENVELOPE_HEADROOM_BYTES {
        issue(
            issues,
            path.key("segment_size_bytes"),
            format!(
                "{} leaves no room for a message beside the {SPOOL_ENVELOPE_HEADROOM_BYTES} bytes kept for the envelope and added headers; set it above {SPOOL_ENVELOPE_HEADROOM_BYTES} plus the largest message to accept",
                spool.segment_size_bytes
            ),
        );
    }
    check_nonzero_count(
        issues,
        path.key("commit_max_batch"),
        spool.commit_max_batch.into(),
    );
}

fn check_rules(
    rules: &[RuleConfig],
    lanes: &LanesConfig,
    issues: &mut Vec<Issue>,
) -> Vec<CheckedRule> {
    if rules.len() > MAX_RULES {
        issue(
            issues,
            KeyPath::new(&["rule"]),
            format!(
                "{} rules exceed the maximum of {MAX_RULES}; merge rules with wildcards such as \"*.example.com\"",
                rules.len()
            ),
        );
        return Vec::new();
    }
    let mut checked = Vec::with_capacity(rules.len());
    // Patterns seen so far, by kind and normalised text, to find duplicates.
    let mut seen: BTreeMap<(bool, String), usize> = BTreeMap::new();
    for (index, rule) in rules.iter().enumerate() {
        let path = KeyPath::rule(index);
        let Some(matcher) = check_matcher(rule, &path, issues) else {
            continue;
        };
        let (is_mx, pattern, key) = match &matcher {
            Matcher::Domain(pattern) => (false, pattern, "domain"),
            Matcher::MxHost(pattern) => (true, pattern, "mx"),
        };
        if let Some(first) = seen.insert((is_mx, pattern.to_string()), index) {
            issue(
                issues,
                path.key(key),
                format!(
                    "rule[{first}] already matches {key} {pattern}; merge the two rules into one"
                ),
            );
        }
        if is_mx && rule.sender_category.is_some() {
            issue(
                issues,
                path.key("sender_category"),
                "applies to sender domains, so it needs `domain`, not `mx`; move it to a rule with domain = \"...\"",
            );
        }
        check_rule_lanes(rule, is_mx, lanes, &path, issues);
        let route = check_rule_settings(rule, &path, issues);
        let burst = check_rate(rule, &path, issues);
        checked.push(CheckedRule {
            matcher,
            route,
            burst,
        });
    }
    checked
}

/// Checks a rule's `lanes` and `source_addresses`. Each lane the rule
/// allows must find at least one of the rule's addresses in its own pool,
/// so that the lanes keep separate source addresses.
fn check_rule_lanes(
    rule: &RuleConfig,
    is_mx: bool,
    lanes_config: &LanesConfig,
    path: &KeyPath,
    issues: &mut Vec<Issue>,
) {
    if let Some(lanes) = &rule.lanes {
        if is_mx {
            issue(
                issues,
                path.key("lanes"),
                "is checked when a recipient is accepted, before any MX lookup, so it needs `domain`, not `mx`; move it to a rule with domain = \"...\"",
            );
        }
        if lanes.is_empty() {
            issue(
                issues,
                path.key("lanes"),
                "is empty, so no mail could go to this destination; list at least one lane, or set hold = true to stop deliveries",
            );
        }
        for (index, lane) in lanes.iter().enumerate() {
            if lanes[..index].contains(lane) {
                issue(
                    issues,
                    path.key("lanes").index(index),
                    format!("lists {} twice; remove one", lane.as_str()),
                );
            }
        }
    }
    let Some(addresses) = &rule.source_addresses else {
        return;
    };
    if addresses.is_empty() {
        issue(
            issues,
            path.key("source_addresses"),
            "is empty; list addresses, or remove the key to use each lane's source_addresses",
        );
        return;
    }
    let allowed: Vec<Lane> = match &rule.lanes {
        Some(lanes) => lanes.clone(),
        None => Lane::ALL.to_vec(),
    };
    for (index, address) in addresses.iter().enumerate() {
        if addresses[..index].contains(address) {
            issue(
                issues,
                path.key("source_addresses").index(index),
                format!("lists {address} twice; remove one"),
            );
        } else if !allowed
            .iter()
            .any(|lane| lanes_config.get(*lane).source_addresses.contains(address))
        {
            issue(
                issues,
                path.key("source_addresses").index(index),
                format!(
                    "{address} is in the source_addresses of no lane this rule allows, so no connection would use it; add it to such a lane's source_addresses or remove it here"
                ),
            );
        }
    }
    for lane in allowed {
        let pool = &lanes_config.get(lane).source_addresses;
        if !addresses.iter().any(|address| pool.contains(address)) {
            issue(
                issues,
                path.key("source_addresses"),
                format!(
                    "contains no address of lanes.{0}.source_addresses, so {0} mail to this destination would have no source address; add one of them to that list, or set lanes to leave out {0}",
                    lane.as_str()
                ),
            );
        }
    }
}

fn check_matcher(rule: &RuleConfig, path: &KeyPath, issues: &mut Vec<Issue>) -> Option<Matcher> {
    match (&rule.domain, &rule.mx) {
        (Some(_), Some(_)) => {
            issue(
                issues,
                path.key("mx"),
                "a rule matches by either `domain` or `mx`, not both; split it into two rules",
            );
            None
        }
        (None, None) => {
            issue(
                issues,
                path.clone(),
                "the rule has neither `domain` nor `mx`; add domain = \"example.com\" (or \"*.example.com\") or mx = \"*.mx.example.net\"",
            );
            None
        }
        (Some(domain), None) => match DomainPattern::parse(domain) {
            Ok(pattern) => Some(Matcher::Domain(pattern)),
            Err(error) => {
                issue(
                    issues,
                    path.key("domain"),
                    format!("{error}; write a domain such as \"example.com\" or \"*.example.com\""),
                );
                None
            }
        },
        (None, Some(mx)) => match DomainPattern::parse(mx) {
            Ok(pattern) => Some(Matcher::MxHost(pattern)),
            Err(error) => {
                issue(
                    issues,
                    path.key("mx"),
                    format!(
                        "{error}; write an MX host name such as \"mx1.example.net\" or \"*.mail.protection.outlook.com\""
                    ),
                );
                None
            }
        },
    }
}

/// Checks every per-rule override except the rate; returns the parsed route.
fn check_rule_settings(
    rule: &RuleConfig,
    path: &KeyPath,
    issues: &mut Vec<Issue>,
) -> Option<Route> {
    if rule.max_connections == Some(0) {
        issue(
            issues,
            path.key("max_connections"),
            "must be at least 1; to stop deliveries to this destination, set hold = true",
        );
    }
    if rule.max_messages_per_connection == Some(0) {
        issue(
            issues,
            path.key("max_messages_per_connection"),
            "must be at least 1",
        );
    }
    if let Some(schedule) = &rule.retry_schedule {
        check_retry_schedule(issues, path.key("retry_schedule"), schedule);
    }
    if let Some(lifetime) = rule.max_queue_lifetime {
        check_nonzero_duration(issues, path.key("max_queue_lifetime"), lifetime);
    }
    let route = rule.route.as_deref()?;
    match Route::parse(route) {
        Ok(route) => Some(route),
        Err(message) => {
            issue(issues, path.key("route"), message);
            None
        }
    }
}

/// Checks `rate` and `burst`; returns the bucket size.
fn check_rate(rule: &RuleConfig, path: &KeyPath, issues: &mut Vec<Issue>) -> u32 {
    check_rate_pair(rule.rate, rule.burst, path, ("rate", "burst"), issues)
}

/// Checks a rate and its burst under the keys `names` of `path`. Returns
/// the bucket size, which is one second's worth of the rate when no burst
/// is given.
pub(crate) fn check_rate_pair(
    rate: Option<f64>,
    burst: Option<u32>,
    path: &KeyPath,
    names: (&'static str, &'static str),
    issues: &mut Vec<Issue>,
) -> u32 {
    let (rate_key, burst_key) = names;
    match (rate, burst) {
        (None, None) => 0,
        (None, Some(_)) => {
            issue(
                issues,
                path.key(burst_key),
                format!(
                    "has no effect without `{rate_key}`; add {rate_key} = N (messages per second) or remove {burst_key}"
                ),
            );
            0
        }
        (Some(rate), burst) => {
            if !(rate.is_finite() && rate > 0.0) {
                issue(
                    issues,
                    path.key(rate_key),
                    format!(
                        "{rate} is not a positive number of messages per second; write a value such as 0.5 or 20, or set hold = true to stop deliveries"
                    ),
                );
                return 0;
            }
            match burst {
                Some(0) => {
                    issue(issues, path.key(burst_key), "must be at least 1 message");
                    0
                }
                Some(burst) => burst,
                // One second's worth of messages, and at least one.
                None => rate.ceil().clamp(1.0, f64::from(u32::MAX)) as u32,
            }
        }
    }
}
