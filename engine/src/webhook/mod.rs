//! Webhooks: delivery log events pushed to HTTP endpoints in signed
//! batches, at least once.
//!
//! Each `[[webhook]]` endpoint has its own thread. Like the control thread,
//! it may run only on the bulk lane's CPUs, or on every allocated CPU when
//! no executor serves bulk mail alone. So this control-plane work stays off
//! the transactional cores whenever the allocation has a bulk core. It reads
//! the per-core delivery log files after the endpoint's durable cursor,
//! POSTs up to `batch_size` selected events as `{"events":[...]}`, and
//! stores the cursor (with fsync) only after a 2xx answer. An endpoint that
//! is down therefore receives every event once it is back, also across
//! rotations and restarts. An event is sent twice only when its batch was
//! acknowledged but the cursor was not stored: the 2xx was lost, or the
//! process died between the answer and the fsync. Receivers remove such
//! duplicates by `idempotency_key`.
//!
//! NOTE: the delivery log itself is written without fsync, so a power loss
//! can drop its last lines before any endpoint reads them; the spool keeps
//! the outcomes, but they are not sent again.

mod cursor;
mod reader;
mod sender;
mod worker;

#[cfg(test)]
mod tests;

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::thread::JoinHandle;
use std::time::Duration;

use caduceus_policy::config::{Config, WebhookConfig, WebhookEvent};
use ring::digest;
use serde_json::{Map, Value};

pub use cursor::{Cursor, CursorError, Position};
pub use reader::{Batch, LogReader, MAX_LINE_BYTES};
pub use sender::{SIGNATURE_HEADER, SendError, Sender, WebhookSecret};
pub use worker::Backoff;

/// The shortest accepted secret. HMAC-SHA-256 keys shorter than the hash
/// output weaken it (RFC 2104 §3), and 16 bytes is a floor for secrets that
/// operators type.
pub const MIN_SECRET_BYTES: usize = 16;

/// One endpoint, checked and with its secret loaded.
#[derive(Debug)]
pub struct Endpoint {
    pub name: String,
    pub url: String,
    pub events: Vec<WebhookEvent>,
    pub secret: WebhookSecret,
    pub batch_size: usize,
    pub timeout: Duration,
    pub retry_initial_delay: Duration,
    pub retry_max_delay: Duration,
}

/// Checks every `[[webhook]]` table, reads the secrets and creates
/// `<state_dir>/webhooks/` (mode 0700). Runs before the engine drops root,
/// so that secret files may stay readable by root only.
pub fn prepare(config: &Config) -> Result<Vec<Endpoint>, String> {
    config.check_webhooks()?;
    if config.webhooks.is_empty() {
        return Ok(Vec::new());
    }
    let dir = cursor_dir(config);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|error| {
            format!(
                "cannot create {}: {error}; check that state_dir is writable",
                dir.display()
            )
        })?;
    config.webhooks.iter().map(prepare_endpoint).collect()
}

fn prepare_endpoint(webhook: &WebhookConfig) -> Result<Endpoint, String> {
    let name = webhook.name.as_str();
    check_url(webhook.url.as_str()).map_err(|reason| format!("webhook {name:?}: {reason}"))?;
    let secret = read_secret(&webhook.secret_file)
        .map_err(|reason| format!("webhook {name:?}: {reason}"))?;
    let mut events = webhook.events.clone();
    events.dedup();
    Ok(Endpoint {
        name: name.to_string(),
        url: webhook.url.as_str().to_string(),
        events,
        secret,
        batch_size: webhook.batch_size.get() as usize,
        timeout: webhook.timeout.get(),
        retry_initial_delay: webhook.retry_initial_delay.get(),
        retry_max_delay: webhook.retry_max_delay.get(),
    })
}

fn check_url(url: &str) -> Result<(), String> {
    let uri: ureq::http::Uri = url
        .parse()
        .map_err(|error| format!("invalid url: {error}"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err("the url must start with http:// or https://".into()),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("the url has no host".into());
    }
    if uri
        .authority()
        .is_some_and(|authority| authority.as_str().contains('@'))
    {
        return Err(
            "the url carries credentials; put no user or password in it, the signature authenticates the sender"
                .into(),
        );
    }
    Ok(())
}

/// Reads a secret file: mode 0600 or stricter, at least
/// [`MIN_SECRET_BYTES`] after trailing whitespace is removed.
fn read_secret(path: &Path) -> Result<WebhookSecret, String> {
    let metadata = std::fs::metadata(path)
        .map_err(|error| format!("secret_file {}: {error}", path.display()))?;
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "secret_file {} has mode {mode:04o}; allow only its owner (chmod 0600)",
            path.display()
        ));
    }
    let bytes =
        std::fs::read(path).map_err(|error| format!("secret_file {}: {error}", path.display()))?;
    let length = bytes
        .iter()
        .rposition(|byte| !byte.is_ascii_whitespace())
        .map_or(0, |last| last + 1);
    if length < MIN_SECRET_BYTES {
        return Err(format!(
            "secret_file {} holds {length} bytes; use at least {MIN_SECRET_BYTES}, such as the output of `openssl rand -hex 32`",
            path.display()
        ));
    }
    Ok(WebhookSecret::new(&bytes[..length]))
}

/// `<state_dir>/webhooks/`, where cursors live.
pub fn cursor_dir(config: &Config) -> PathBuf {
    config.state_dir.join("webhooks")
}

/// Starts one thread per endpoint, restricted to `cpus` (the control-plane
/// CPUs). Each stops once `shutdown` is set and its request in flight has
/// finished.
pub fn spawn(
    endpoints: Vec<Endpoint>,
    config: &Config,
    cpus: Vec<usize>,
    shutdown: Arc<AtomicBool>,
) -> Result<Vec<JoinHandle<()>>, String> {
    let mut threads = Vec::new();
    for endpoint in endpoints {
        let log_dir = config.log_dir();
        let cursor_path = cursor_dir(config).join(format!("{}.cursor", endpoint.name));
        let shutdown = shutdown.clone();
        let thread_name = format!("caduceus-webhook-{}", endpoint.name);
        let name = endpoint.name.clone();
        let cpus = cpus.clone();
        let thread = std::thread::Builder::new()
            .name(thread_name)
            .spawn(move || {
                crate::runtime::pin_current_thread(&cpus);
                worker::run(endpoint, log_dir, cursor_path, shutdown)
            })
            .map_err(|error| format!("cannot start the thread of webhook {name:?}: {error}"))?;
        threads.push(thread);
    }
    Ok(threads)
}

/// Computes the idempotency key of a delivery log event: the lowercase hex SHA-256
/// of its message id, recipient, event and attempt, each followed by a NUL
/// byte. A field the event lacks counts as empty; the attempt is written in
/// decimal. The same event read twice, even from a resent batch, gets the
/// same key, and two different events get different keys.
pub fn idempotency_key(fields: &Map<String, Value>) -> String {
    let text = |name: &str| match fields.get(name) {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Number(number)) => number.to_string(),
        _ => String::new(),
    };
    let mut context = digest::Context::new(&digest::SHA256);
    for name in ["message_id", "recipient", "event", "attempt"] {
        context.update(text(name).as_bytes());
        context.update(&[0]);
    }
    hex::encode(context.finish().as_ref())
}
