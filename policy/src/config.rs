//! The engine's configuration file.
//!
//! Every section and key has a default, so an empty file is a valid
//! configuration. Unknown keys are rejected so that a misspelt setting is an
//! error rather than a silent default.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::duration::ConfigDuration;
use crate::{Category, Lane, TlsMode};

/// The whole configuration file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory for the spool, sockets, logs and keys.
    pub state_dir: PathBuf,
    /// The host name used in greetings, EHLO, Received headers and DSNs.
    pub hostname: String,
    /// How recipients appear in the delivery log, audit log and metrics.
    pub recipient_logging: RecipientLogging,
    /// The unprivileged user that `serve` switches to after opening its
    /// sockets when started as root. `None` means refuse to run as root.
    pub user: Option<String>,
    pub ingress: IngressConfig,
    pub lanes: LanesConfig,
    pub delivery: DeliveryConfig,
    pub dns: DnsConfig,
    pub tls: TlsConfig,
    pub spool: SpoolConfig,
    pub audit: AuditConfig,
    pub metrics: MetricsConfig,
    pub delivery_log: DeliveryLogConfig,
    /// HTTP endpoints that receive delivery log events, one `[[webhook]]`
    /// table each.
    #[serde(rename = "webhook")]
    pub webhooks: Vec<WebhookConfig>,
    /// Per-destination rules, tried most specific first.
    #[serde(rename = "rule")]
    pub rules: Vec<RuleConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            state_dir: PathBuf::from("/var/lib/caduceus"),
            hostname: default_hostname(),
            recipient_logging: RecipientLogging::Hmac,
            user: None,
            ingress: IngressConfig::default(),
            lanes: LanesConfig::default(),
            delivery: DeliveryConfig::default(),
            dns: DnsConfig::default(),
            tls: TlsConfig::default(),
            spool: SpoolConfig::default(),
            audit: AuditConfig::default(),
            metrics: MetricsConfig::default(),
            delivery_log: DeliveryLogConfig::default(),
            webhooks: Vec::new(),
            rules: Vec::new(),
        }
    }
}

fn default_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

impl Config {
    /// The control socket, always `<state_dir>/run/control.sock`.
    pub fn control_socket(&self) -> PathBuf {
        self.state_dir.join("run").join("control.sock")
    }

    /// The submission socket of a lane.
    pub fn lane_socket(&self, lane: Lane) -> PathBuf {
        let lane_config = self.lanes.get(lane);
        match &lane_config.socket {
            Some(path) => path.clone(),
            None => self
                .state_dir
                .join("run")
                .join(format!("{}.sock", lane.as_str())),
        }
    }

    pub fn spool_dir(&self) -> PathBuf {
        self.state_dir.join("spool")
    }

    pub fn log_dir(&self) -> PathBuf {
        self.state_dir.join("log")
    }

    /// Resolves relative paths against the directory of the config file.
    pub fn resolve_relative_paths(&mut self, config_dir: &Path) {
        if self.state_dir.is_relative() {
            self.state_dir = config_dir.join(&self.state_dir);
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecipientLogging {
    /// Recipient addresses in the clear.
    Clear,
    /// HMAC-SHA-256 of the normalised address under the site key.
    Hmac,
}

/// Limits of the SMTP server on the submission sockets.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngressConfig {
    /// The largest message accepted, in bytes, as advertised with SIZE.
    pub max_message_size_bytes: u64,
    /// Recipients accepted per transaction; more get `452 4.5.3`.
    pub max_recipients: u32,
    /// The longest command or text line, CRLF included. RFC 5321 §4.5.3.1
    /// sets 512 octets for commands and 1000 for text lines as minimums.
    pub max_line_length_bytes: u32,
    /// How long the server waits for the next command.
    pub command_timeout: ConfigDuration,
    /// How long the server waits for the next chunk of DATA.
    pub data_timeout: ConfigDuration,
    /// The most `Received:` headers a message may carry before it is
    /// rejected as a loop (RFC 5321 §6.3 asks for at least 100).
    pub max_received_headers: u32,
}

impl Default for IngressConfig {
    fn default() -> Self {
        IngressConfig {
            max_message_size_bytes: 50 * 1024 * 1024,
            max_recipients: 1000,
            max_line_length_bytes: 1000,
            command_timeout: ConfigDuration::from_secs(300),
            data_timeout: ConfigDuration::from_secs(600),
            max_received_headers: 100,
        }
    }
}

/// Both lanes. Each key left out of a `[lanes.NAME]` table keeps that lane's
/// own default from [`LaneConfig::default_for`], so a table that sets only
/// `cores` is valid.
#[derive(Clone, Debug)]
pub struct LanesConfig {
    pub transactional: LaneConfig,
    pub bulk: LaneConfig,
    /// Lets a CPU serve both lanes. This gives up the transactional lane's
    /// isolation, so it exists for benchmarks that need more executors in
    /// a lane than the machine has spare CPUs (for example two bulk
    /// executors on a two-CPU machine).
    pub allow_shared_cpus: bool,
}

impl<'de> Deserialize<'de> for LanesConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Default, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        struct LanesOverrides {
            transactional: LaneOverrides,
            bulk: LaneOverrides,
            allow_shared_cpus: bool,
        }
        let overrides = LanesOverrides::deserialize(deserializer)?;
        Ok(LanesConfig {
            transactional: overrides
                .transactional
                .apply(LaneConfig::default_for(Lane::Transactional)),
            bulk: overrides.bulk.apply(LaneConfig::default_for(Lane::Bulk)),
            allow_shared_cpus: overrides.allow_shared_cpus,
        })
    }
}

/// The keys of one `[lanes.NAME]` table as written, before the lane's
/// defaults fill in the rest. The names match [`LaneConfig`].
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct LaneOverrides {
    cores: Option<Vec<usize>>,
    socket: Option<PathBuf>,
    socket_mode: Option<String>,
    socket_owner: Option<String>,
    socket_group: Option<String>,
    allowed_uids: Option<Vec<u32>>,
    allowed_gids: Option<Vec<u32>>,
    default_category: Option<Category>,
    source_addresses: Option<Vec<IpAddr>>,
    source_rate: Option<f64>,
    source_burst: Option<u32>,
    source_max_connections: Option<u32>,
    helo_name: Option<String>,
    max_queue_lifetime: Option<ConfigDuration>,
    retry_schedule: Option<Vec<ConfigDuration>>,
}

impl LaneOverrides {
    fn apply(self, defaults: LaneConfig) -> LaneConfig {
        LaneConfig {
            cores: self.cores.unwrap_or(defaults.cores),
            socket: self.socket.or(defaults.socket),
            socket_mode: self.socket_mode.unwrap_or(defaults.socket_mode),
            socket_owner: self.socket_owner.or(defaults.socket_owner),
            socket_group: self.socket_group.or(defaults.socket_group),
            allowed_uids: self.allowed_uids.unwrap_or(defaults.allowed_uids),
            allowed_gids: self.allowed_gids.unwrap_or(defaults.allowed_gids),
            default_category: self.default_category.unwrap_or(defaults.default_category),
            source_addresses: self.source_addresses.unwrap_or(defaults.source_addresses),
            source_rate: self.source_rate.or(defaults.source_rate),
            source_burst: self.source_burst.or(defaults.source_burst),
            source_max_connections: self
                .source_max_connections
                .or(defaults.source_max_connections),
            helo_name: self.helo_name.or(defaults.helo_name),
            max_queue_lifetime: self
                .max_queue_lifetime
                .unwrap_or(defaults.max_queue_lifetime),
            retry_schedule: self.retry_schedule.unwrap_or(defaults.retry_schedule),
        }
    }
}

impl Default for LanesConfig {
    fn default() -> Self {
        LanesConfig {
            transactional: LaneConfig::default_for(Lane::Transactional),
            bulk: LaneConfig::default_for(Lane::Bulk),
            allow_shared_cpus: false,
        }
    }
}

impl LanesConfig {
    pub fn get(&self, lane: Lane) -> &LaneConfig {
        match lane {
            Lane::Transactional => &self.transactional,
            Lane::Bulk => &self.bulk,
        }
    }
}

/// One lane: its cores, its socket and its delivery defaults.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaneConfig {
    /// CPU ids whose executors serve this lane. Empty means the default
    /// allocation: on 2 or more CPUs, CPU 0 serves transactional mail and the
    /// rest serve bulk; on 1 CPU both lanes share it.
    #[serde(default)]
    pub cores: Vec<usize>,
    /// Submission socket; default `<state_dir>/run/<lane>.sock`.
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// Permission bits of the socket file, as an octal string such as "0660".
    #[serde(default = "default_socket_mode")]
    pub socket_mode: String,
    /// Owner and group of the socket file, by name or numeric id.
    #[serde(default)]
    pub socket_owner: Option<String>,
    #[serde(default)]
    pub socket_group: Option<String>,
    /// When either list is non-empty, only peers whose uid or gid (from
    /// SO_PEERCRED) is listed may submit; others get `554 5.7.1`.
    #[serde(default)]
    pub allowed_uids: Vec<u32>,
    #[serde(default)]
    pub allowed_gids: Vec<u32>,
    /// The category of a message that names none.
    pub default_category: Category,
    /// Source addresses for outbound connections; empty means the kernel's
    /// choice.
    #[serde(default)]
    pub source_addresses: Vec<IpAddr>,
    /// Messages per second that each source address sends, over all
    /// destinations together; `None` means unlimited.
    #[serde(default)]
    pub source_rate: Option<f64>,
    /// Messages each source address's token bucket holds; one second's
    /// worth of `source_rate` when `None`.
    #[serde(default)]
    pub source_burst: Option<u32>,
    /// Connections open at once from each source address, over all
    /// destinations together; `None` means unlimited.
    #[serde(default)]
    pub source_max_connections: Option<u32>,
    /// EHLO name for this lane's connections; default `hostname`.
    #[serde(default)]
    pub helo_name: Option<String>,
    /// The longest a message stays queued before it bounces as expired.
    pub max_queue_lifetime: ConfigDuration,
    /// Delays between attempts; the last one repeats until expiry. Each
    /// delay gets up to 20% random jitter.
    pub retry_schedule: Vec<ConfigDuration>,
}

fn default_socket_mode() -> String {
    "0660".to_string()
}

impl LaneConfig {
    /// Parses `socket_mode`: three or four octal digits, such as "0660" or
    /// "660", at most 0777. The error names the value and the fix.
    pub fn socket_mode_bits(&self) -> Result<u32, String> {
        let text = self.socket_mode.as_str();
        let invalid = || {
            format!(
                "{text:?} is not an octal file mode; write three or four octal digits such as \"0660\""
            )
        };
        if !(3..=4).contains(&text.len())
            || !text.bytes().all(|digit| (b'0'..=b'7').contains(&digit))
        {
            return Err(invalid());
        }
        let bits = u32::from_str_radix(text, 8).map_err(|_| invalid())?;
        if bits > 0o777 {
            return Err(format!(
                "{text:?} sets setuid, setgid or sticky bits, which mean nothing on a socket; use permission bits only, such as \"0660\""
            ));
        }
        Ok(bits)
    }
}

impl LaneConfig {
    pub fn default_for(lane: Lane) -> LaneConfig {
        let (default_category, lifetime_secs, schedule_secs): (Category, u64, &[u64]) = match lane {
            Lane::Transactional => (
                Category::Transactional,
                86_400,
                &[10, 30, 60, 300, 900, 1800, 3600],
            ),
            Lane::Bulk => (
                Category::Marketing,
                5 * 86_400,
                &[300, 900, 1800, 3600, 7200, 14_400],
            ),
        };
        LaneConfig {
            cores: Vec::new(),
            socket: None,
            socket_mode: default_socket_mode(),
            socket_owner: None,
            socket_group: None,
            allowed_uids: Vec::new(),
            allowed_gids: Vec::new(),
            default_category,
            source_addresses: Vec::new(),
            source_rate: None,
            source_burst: None,
            source_max_connections: None,
            helo_name: None,
            max_queue_lifetime: ConfigDuration::from_secs(lifetime_secs),
            retry_schedule: schedule_secs
                .iter()
                .map(|secs| ConfigDuration::from_secs(*secs))
                .collect(),
        }
    }
}

/// Outbound SMTP client settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// TCP port of MX hosts. Only tests change it.
    pub smtp_port: u16,
    pub connect_timeout: ConfigDuration,
    /// Wait for the 220 greeting (RFC 5321 §4.5.3.2.1: 5 minutes).
    pub greeting_timeout: ConfigDuration,
    /// Wait for replies to EHLO, MAIL, RCPT and the DATA command.
    pub command_timeout: ConfigDuration,
    /// Wait for the reply to the final dot (RFC 5321 §4.5.3.2.6: 10 minutes).
    pub data_done_timeout: ConfigDuration,
    /// Concurrent connections per destination per core.
    pub max_connections_per_destination: u32,
    /// Messages sent over one connection before it is closed.
    pub max_messages_per_connection: u32,
    /// How long an unused pooled connection stays open.
    pub idle_timeout: ConfigDuration,
    /// Concurrent deliveries per core, all destinations together.
    pub max_concurrent_deliveries: u32,
    /// Texts (matched case-insensitively as substrings) that mark a 4xx
    /// reply as the receiver asking to slow down; with any 421 they put the
    /// destination into backoff.
    pub push_back_patterns: Vec<String>,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            smtp_port: 25,
            connect_timeout: ConfigDuration::from_secs(30),
            greeting_timeout: ConfigDuration::from_secs(300),
            command_timeout: ConfigDuration::from_secs(300),
            data_done_timeout: ConfigDuration::from_secs(600),
            max_connections_per_destination: 10,
            max_messages_per_connection: 100,
            idle_timeout: ConfigDuration::from_secs(30),
            max_concurrent_deliveries: 256,
            push_back_patterns: [
                "rate limit",
                "try again later",
                "too many",
                "temporarily deferred",
                "throttl",
                "reduce",
            ]
            .iter()
            .map(|pattern| pattern.to_string())
            .collect(),
        }
    }
}

/// The stub resolver.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Nameservers as `ip` or `ip:port`; empty means those in
    /// /etc/resolv.conf.
    pub nameservers: Vec<String>,
    /// Wait for one answer from one nameserver.
    pub timeout: ConfigDuration,
    /// Rounds over the nameserver list before a lookup fails temporarily.
    pub attempts: u32,
    /// Upper bound on cached TTLs.
    pub max_cache_ttl: ConfigDuration,
    /// How long NXDOMAIN and NODATA answers are cached when the SOA gives no
    /// shorter time (RFC 2308 §5).
    pub negative_cache_ttl: ConfigDuration,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            nameservers: Vec::new(),
            timeout: ConfigDuration::from_secs(5),
            attempts: 2,
            max_cache_ttl: ConfigDuration::from_secs(3600),
            negative_cache_ttl: ConfigDuration::from_secs(300),
        }
    }
}

/// TLS for outbound delivery.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// The mode for destinations that no rule covers.
    pub default_mode: TlsMode,
    /// Extra trust anchors (PEM) for `verified` mode, added to the system's.
    pub ca_file: Option<PathBuf>,
    /// Resume TLS sessions with tickets or ids cached per core.
    pub session_resumption: bool,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            default_mode: TlsMode::Opportunistic,
            ca_file: None,
            session_resumption: true,
        }
    }
}

/// The on-disk queue.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    /// Size of each preallocated segment file.
    pub segment_size_bytes: u64,
    /// The longest an append waits for its group commit to start.
    pub commit_max_wait: ConfigDuration,
    /// Appends that start a commit at once when this many are waiting.
    pub commit_max_batch: u32,
    /// Seal message content at rest. Turning it off is for benchmarks.
    pub encryption: bool,
    /// The key file (mode 0600); default `<state_dir>/keys/spool.key`,
    /// created on first start. `CADUCEUS_SPOOL_KEY` (hex) overrides it.
    pub key_file: Option<PathBuf>,
    /// Free space kept on the spool's filesystem; below it, ingress answers
    /// `452 4.3.1`.
    pub reserve_bytes: u64,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            segment_size_bytes: 64 * 1024 * 1024,
            commit_max_wait: ConfigDuration::from_micros(200),
            commit_max_batch: 256,
            encryption: true,
            key_file: None,
            reserve_bytes: 512 * 1024 * 1024,
        }
    }
}

/// The tamper-evident audit trail under `<state_dir>/log/audit/`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Write the audit trail. HIPAA deployments need it; turning it off is
    /// for measuring its cost.
    pub enabled: bool,
    /// How long daily audit files are kept before they are deleted (the
    /// deletion is itself audited). The default, 2190 days (6 years), is
    /// the documentation retention HIPAA asks for (45 CFR 164.316(b)(2)).
    pub retention: ConfigDuration,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            enabled: true,
            retention: ConfigDuration::from_secs(2190 * 86_400),
        }
    }
}

/// The Prometheus metrics and health endpoints.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// TCP address serving `/metrics`, `/healthz` and `/readyz`, such as
    /// `127.0.0.1:9464`. `None` (the default) serves nothing.
    pub listen: Option<SocketAddr>,
}

/// One per-destination rule. A rule matches by exactly one of `domain`
/// (`example.com` exactly, or `*.example.com` for every subdomain) and
/// `mx` (a host name pattern matched against the destination's MX hosts).
#[derive(Clone, Debug, Default, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub domain: Option<String>,
    pub mx: Option<String>,
    pub tls: Option<TlsMode>,
    /// Send to this `host:port` instead of looking up MX records.
    pub route: Option<String>,
    /// Messages per second, and the burst above it.
    pub rate: Option<f64>,
    pub burst: Option<u32>,
    pub max_connections: Option<u32>,
    pub max_messages_per_connection: Option<u32>,
    pub retry_schedule: Option<Vec<ConfigDuration>>,
    pub max_queue_lifetime: Option<ConfigDuration>,
    /// Hold deliveries to this destination until released.
    pub hold: Option<bool>,
    /// Category forced on mail from this sender domain.
    pub sender_category: Option<Category>,
    /// The lanes whose mail may go to this destination, or `None` for all.
    /// Recipients in another lane get `550 5.7.1` at RCPT.
    pub lanes: Option<Vec<Lane>>,
    /// Source addresses for connections to this destination, in place of
    /// the lane's. Each lane uses those of them in its own pool.
    pub source_addresses: Option<Vec<IpAddr>>,
}

impl RuleConfig {
    /// Returns whether the rule sets anything about delivery, as opposed to
    /// only `sender_category`. A rule that only sets a sender category stays out
    /// of the recipient table, so it never hides a wildcard rule above it.
    pub fn has_delivery_settings(&self) -> bool {
        self.tls.is_some()
            || self.route.is_some()
            || self.rate.is_some()
            || self.burst.is_some()
            || self.max_connections.is_some()
            || self.max_messages_per_connection.is_some()
            || self.retry_schedule.is_some()
            || self.max_queue_lifetime.is_some()
            || self.hold.is_some()
            || self.lanes.is_some()
            || self.source_addresses.is_some()
    }
}

/// Parses a `route` value written as an IP address and port. Validation and
/// [`crate::Route::parse`] also accept a host name in place of the address.
pub fn parse_route(route: &str) -> Result<SocketAddr, String> {
    route
        .parse::<SocketAddr>()
        .map_err(|_| format!("invalid route {route:?}: expected IP:PORT such as 127.0.0.1:2525"))
}

/// The per-core delivery log files under `<state_dir>/log/`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryLogConfig {
    /// A core starts a new file before a write would take its current file
    /// past this size. A new file also starts when the UTC day changes.
    /// Default 256 MiB; must be at least 4096.
    #[serde(deserialize_with = "deserialize_max_file_bytes")]
    pub max_file_bytes: u64,
}

impl Default for DeliveryLogConfig {
    fn default() -> Self {
        DeliveryLogConfig {
            max_file_bytes: 256 * 1024 * 1024,
        }
    }
}

/// The smallest `delivery_log.max_file_bytes`. Below it, every flush of a
/// busy core would start a new file.
pub const MIN_DELIVERY_LOG_FILE_BYTES: u64 = 4096;

fn deserialize_max_file_bytes<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<u64, D::Error> {
    let bytes = u64::deserialize(deserializer)?;
    if bytes < MIN_DELIVERY_LOG_FILE_BYTES {
        return Err(serde::de::Error::custom(format!(
            "max_file_bytes = {bytes} is too small; use at least {MIN_DELIVERY_LOG_FILE_BYTES}"
        )));
    }
    Ok(bytes)
}

/// One HTTP endpoint that receives delivery log events in signed batches.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Names the endpoint's cursor file, `<state_dir>/webhooks/<name>.cursor`.
    /// Renaming an endpoint starts it again from the oldest log file.
    pub name: WebhookName,
    /// `http://` or `https://` URL that receives each batch as a POST.
    pub url: WebhookUrl,
    /// The event kinds sent; default every kind.
    #[serde(default = "WebhookEvent::all")]
    pub events: Vec<WebhookEvent>,
    /// File holding the HMAC-SHA-256 key that signs each body (trailing
    /// whitespace ignored, at least 16 bytes). It is read before the engine
    /// drops root and must not be readable by group or others.
    pub secret_file: PathBuf,
    /// The maximum number of events in one POST; default 100, at most 10,000.
    #[serde(default = "default_webhook_batch_size")]
    pub batch_size: WebhookBatchSize,
    /// The whole request, from connect to the end of the response; default
    /// 10 s. A timed-out request counts as failed and is retried.
    #[serde(default = "default_webhook_timeout")]
    pub timeout: ConfigDuration,
    /// The wait after the first failed request; it doubles after each
    /// further failure up to `retry_max_delay`. Default 1 s.
    #[serde(default = "default_webhook_retry_initial_delay")]
    pub retry_initial_delay: ConfigDuration,
    /// The maximum wait between two attempts; default 5 minutes. Each wait
    /// is drawn at random from its upper half, so endpoints that failed
    /// together do not retry in step.
    #[serde(default = "default_webhook_retry_max_delay")]
    pub retry_max_delay: ConfigDuration,
}

fn default_webhook_batch_size() -> WebhookBatchSize {
    WebhookBatchSize(100)
}

fn default_webhook_timeout() -> ConfigDuration {
    ConfigDuration::from_secs(10)
}

fn default_webhook_retry_initial_delay() -> ConfigDuration {
    ConfigDuration::from_secs(1)
}

fn default_webhook_retry_max_delay() -> ConfigDuration {
    ConfigDuration::from_secs(300)
}

/// A webhook endpoint's name: 1 to 64 ASCII letters, digits, `-` or `_`, so
/// that it is safe as a file name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct WebhookName(String);

impl WebhookName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for WebhookName {
    type Error = String;

    fn try_from(name: String) -> Result<Self, Self::Error> {
        let valid_bytes = name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_');
        if name.is_empty() || name.len() > 64 || !valid_bytes {
            return Err(format!(
                "invalid webhook name {name:?}: use 1 to 64 ASCII letters, digits, '-' or '_'"
            ));
        }
        Ok(WebhookName(name))
    }
}

/// A webhook URL whose scheme is `http` or `https`. The engine parses it
/// fully at start.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct WebhookUrl(String);

impl WebhookUrl {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for WebhookUrl {
    type Error = String;

    fn try_from(url: String) -> Result<Self, Self::Error> {
        let rest = url
            .strip_prefix("https://")
            .or_else(|| url.strip_prefix("http://"));
        match rest {
            Some(rest) if !rest.is_empty() && !rest.starts_with('/') => Ok(WebhookUrl(url)),
            _ => Err(format!(
                "invalid webhook url {url:?}: expected http://HOST[:PORT]/PATH or https://HOST[:PORT]/PATH"
            )),
        }
    }
}

/// The number of events in one webhook POST, from 1 to 10,000.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "u32")]
pub struct WebhookBatchSize(u32);

impl WebhookBatchSize {
    pub const MAX: u32 = 10_000;

    pub fn get(self) -> u32 {
        self.0
    }
}

impl TryFrom<u32> for WebhookBatchSize {
    type Error = String;

    fn try_from(size: u32) -> Result<Self, Self::Error> {
        if size == 0 || size > Self::MAX {
            return Err(format!(
                "invalid webhook batch_size {size}: use 1 to {}",
                Self::MAX
            ));
        }
        Ok(WebhookBatchSize(size))
    }
}

/// A delivery log event kind that a webhook can select, named as in the
/// log's `event` field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WebhookEvent {
    Received,
    Delivered,
    Deferred,
    Bounced,
    Expired,
    Deleted,
}

impl WebhookEvent {
    pub const ALL: [WebhookEvent; 6] = [
        WebhookEvent::Received,
        WebhookEvent::Delivered,
        WebhookEvent::Deferred,
        WebhookEvent::Bounced,
        WebhookEvent::Expired,
        WebhookEvent::Deleted,
    ];

    pub fn all() -> Vec<WebhookEvent> {
        Self::ALL.to_vec()
    }

    pub fn as_str(self) -> &'static str {
        match self {
            WebhookEvent::Received => "received",
            WebhookEvent::Delivered => "delivered",
            WebhookEvent::Deferred => "deferred",
            WebhookEvent::Bounced => "bounced",
            WebhookEvent::Expired => "expired",
            WebhookEvent::Deleted => "deleted",
        }
    }
}

/// Room left in a spool segment beside the message itself, for the segment
/// header, the record's envelope and framing, and the headers that ingress
/// prepends. An estimate: an envelope of many long recipients can exceed it.
/// Ingress then replies `452 4.5.3` at RCPT when MAIL declared `SIZE=`, and
/// `552 5.3.4` after the content when it did not.
pub const SPOOL_ENVELOPE_HEADROOM_BYTES: u64 = 64 * 1024;

impl Config {
    /// Returns the message size that ingress accepts and advertises with
    /// SIZE: `max_message_size_bytes`, lowered when one spool segment
    /// cannot contain a message that large.
    pub fn effective_max_message_size_bytes(&self) -> u64 {
        let segment_room = self
            .spool
            .segment_size_bytes
            .saturating_sub(SPOOL_ENVELOPE_HEADROOM_BYTES);
        self.ingress.max_message_size_bytes.min(segment_room)
    }

    /// Returns a warning when `spool.segment_size_bytes` lowers the message
    /// size limit below `ingress.max_message_size_bytes`.
    pub fn message_size_warning(&self) -> Option<String> {
        let effective = self.effective_max_message_size_bytes();
        (effective < self.ingress.max_message_size_bytes).then(|| {
            format!(
                "ingress.max_message_size_bytes = {} does not fit in a spool segment of spool.segment_size_bytes = {}, so ingress accepts and advertises SIZE {effective}; raise segment_size_bytes to at least {} or lower max_message_size_bytes",
                self.ingress.max_message_size_bytes,
                self.spool.segment_size_bytes,
                self.ingress.max_message_size_bytes + SPOOL_ENVELOPE_HEADROOM_BYTES
            )
        })
    }

    /// Checks what one `[[webhook]]` table cannot check alone: that no two
    /// endpoints share a name, and so a cursor file.
    pub fn check_webhooks(&self) -> Result<(), String> {
        let mut names = std::collections::HashSet::new();
        for webhook in &self.webhooks {
            if !names.insert(webhook.name.as_str()) {
                return Err(format!(
                    "two [[webhook]] tables are named {:?}; give each endpoint its own name",
                    webhook.name.as_str()
                ));
            }
        }
        Ok(())
    }
}
