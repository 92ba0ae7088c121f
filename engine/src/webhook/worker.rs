//! The loop that moves one endpoint's cursor: read a batch, POST it until
//! the endpoint acknowledges it, store the cursor, repeat.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;

use super::Endpoint;
use super::cursor::{Cursor, CursorError};
use super::reader::LogReader;
use super::sender::Sender;

/// How often an idle worker looks for new lines. Cores write their lines
/// at least every 100 ms, so events reach the endpoint within about
/// 300 ms when it is up.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// The maximum time a sleeping worker takes to notice shutdown.
const SHUTDOWN_CHECK_INTERVAL: Duration = Duration::from_millis(50);

/// Exponential backoff with a cap and jitter: the `n`th consecutive
/// failure waits a random time in the upper half of
/// `min(initial * 2^(n-1), max)`.
#[derive(Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max: max.max(initial),
            failures: 0,
        }
    }

    /// Counts one more failure and returns the wait before the next try.
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let doublings = self.failures.min(31);
        self.failures = self.failures.saturating_add(1);
        let ceiling = self
            .initial
            .checked_mul(1u32 << doublings)
            .unwrap_or(self.max)
            .min(self.max);
        let floor = ceiling / 2;
        floor + ceiling.saturating_sub(floor).mul_f64(rng.r#gen::<f64>())
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }
}

/// Runs one endpoint until `shutdown` is set. A request in flight when
/// shutdown comes finishes (within the endpoint's timeout) and its cursor
/// is stored, so a graceful stop resends nothing.
pub fn run(endpoint: Endpoint, log_dir: PathBuf, cursor_path: PathBuf, shutdown: Arc<AtomicBool>) {
    let name = endpoint.name.clone();
    tracing::info!(endpoint = %name, "webhook: started");
    let sender = Sender::new(&endpoint.url, endpoint.secret.clone(), endpoint.timeout);
    let mut reader = LogReader::new(&log_dir, &name, &endpoint.events);
    let mut backoff = Backoff::new(endpoint.retry_initial_delay, endpoint.retry_max_delay);
    let mut rng = rand::thread_rng();
    let mut cursor = load_cursor(&cursor_path, &name);

    while !shutdown.load(Ordering::Acquire) {
        let batch = match reader.read_batch(&cursor, endpoint.batch_size) {
            Ok(batch) => batch,
            Err(error) => {
                tracing::error!(endpoint = %name, dir = %log_dir.display(), %error, "webhook: reading the delivery log failed; retrying");
                sleep_unless_shutdown(backoff.next_delay(&mut rng), &shutdown);
                continue;
            }
        };
        if batch.events.is_empty() {
            if batch.end != cursor {
                // Only filtered or invalid lines were passed.
                store_cursor(&batch.end, &cursor_path, &name);
                cursor = batch.end;
            }
            sleep_unless_shutdown(POLL_INTERVAL, &shutdown);
            continue;
        }
        let full = batch.events.len() >= endpoint.batch_size;
        let body = match serde_json::to_vec(&serde_json::json!({ "events": batch.events })) {
            Ok(body) => body,
            Err(error) => {
                // Serialising a `serde_json::Value` does not fail. Should it,
                // the batch is kept and read again, so nothing is lost.
                tracing::error!(endpoint = %name, %error, "webhook: a batch failed to serialise");
                sleep_unless_shutdown(backoff.next_delay(&mut rng), &shutdown);
                continue;
            }
        };
        if !post_until_acknowledged(&sender, &body, &name, &mut backoff, &shutdown) {
            break;
        }
        tracing::debug!(endpoint = %name, events = batch.events.len(), body_bytes = body.len(), "webhook: batch acknowledged");
        store_cursor(&batch.end, &cursor_path, &name);
        cursor = batch.end;
        if !full {
            sleep_unless_shutdown(POLL_INTERVAL, &shutdown);
        }
    }
    tracing::info!(endpoint = %name, "webhook: stopped");
}

/// POSTs `body` until a 2xx response, waiting with backoff between tries.
/// Returns `false` when shutdown came first. Every failure is retried,
/// 4xx included, because skipping a batch would lose its events; a
/// receiver that rejects a batch for good stalls its endpoint, and the log
/// shows the status each time.
fn post_until_acknowledged(
    sender: &Sender,
    body: &[u8],
    name: &str,
    backoff: &mut Backoff,
    shutdown: &AtomicBool,
) -> bool {
    let mut rng = rand::thread_rng();
    loop {
        match sender.post(body) {
            Ok(()) => {
                if backoff.failures() > 0 {
                    tracing::info!(endpoint = %name, failures = backoff.failures(), "webhook: endpoint acknowledged again");
                }
                backoff.reset();
                return true;
            }
            Err(error) => {
                let delay = backoff.next_delay(&mut rng);
                tracing::warn!(
                    endpoint = %name,
                    %error,
                    failures = backoff.failures(),
                    retry_in_ms = delay.as_millis() as u64,
                    "webhook: batch not acknowledged; retrying"
                );
                if !sleep_unless_shutdown(delay, shutdown) {
                    return false;
                }
            }
        }
    }
}

/// Loads the endpoint's cursor. A cursor that cannot be parsed is moved
/// aside to `<name>.cursor.invalid` and the endpoint starts again from the
/// oldest log file: receivers see duplicates, which their idempotency
/// keys absorb, but lose nothing.
fn load_cursor(path: &Path, name: &str) -> Cursor {
    match Cursor::load(path) {
        Ok(cursor) => cursor,
        Err(error @ CursorError::Invalid { .. }) => {
            let mut aside = path.as_os_str().to_owned();
            aside.push(".invalid");
            let renamed = std::fs::rename(path, &aside);
            tracing::error!(
                endpoint = %name,
                %error,
                moved_to = %Path::new(&aside).display(),
                moved = renamed.is_ok(),
                "webhook: invalid cursor; resending from the oldest delivery log file"
            );
            Cursor::default()
        }
        Err(error @ CursorError::Read { .. }) => {
            tracing::error!(endpoint = %name, %error, "webhook: cursor unreadable; resending from the oldest delivery log file");
            Cursor::default()
        }
    }
}

fn store_cursor(cursor: &Cursor, path: &Path, name: &str) {
    if let Err(error) = cursor.store(path) {
        tracing::error!(
            endpoint = %name,
            path = %path.display(),
            %error,
            "webhook: storing the cursor failed; after a restart the events since the last stored cursor are sent again"
        );
    }
}

/// Sleeps for `duration` in short steps. Returns `false` when shutdown
/// was requested.
fn sleep_unless_shutdown(duration: Duration, shutdown: &AtomicBool) -> bool {
    let deadline = Instant::now() + duration;
    loop {
        if shutdown.load(Ordering::Acquire) {
            return false;
        }
        let now = Instant::now();
        if now >= deadline {
            return true;
        }
        std::thread::sleep((deadline - now).min(SHUTDOWN_CHECK_INTERVAL));
    }
}
