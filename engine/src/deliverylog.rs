//! The delivery log: one JSON line per event (received, delivered, deferred,
//! bounced, expired, deleted).
//!
//! Each core writes its own files, `<state_dir>/log/delivery.<core>.<YYYYMMDD>.<n>.log`,
//! so no file, buffer or rotation state is shared between executors. A core
//! starts generation `n + 1` before a write would take the current file past
//! `delivery_log.max_file_bytes`, and generation 0 of a new name when the UTC
//! day changes. Lines are buffered per core and written with one `write(2)`
//! of whole lines when the buffer passes 64 KiB or when the core's flush
//! timer fires, so logging costs no syscall per message and a reader that
//! stops at the last newline never reads half a line.
//!
//! Readers order one core's files by day, then generation. Lines of
//! different cores have no common order beyond their `at_us` timestamps.
//!
//! Subjects and bodies never appear. Recipients appear in the clear or as
//! HMAC-SHA-256 under the site key, per `recipient_logging`.

use std::cell::RefCell;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use caduceus_policy::config::RecipientLogging;
use caduceus_policy::{Category, Lane, SiteKey};
use serde::Serialize;

const FLUSH_THRESHOLD_BYTES: usize = 64 * 1024;

/// The kind of a delivery log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Event {
    Received,
    Delivered,
    Deferred,
    Bounced,
    Expired,
    Deleted,
}

/// One delivery log line. Optional fields are left out when unknown.
#[derive(Debug, Serialize)]
pub struct Entry<'a> {
    pub event: Event,
    pub message_id: &'a str,
    pub lane: Lane,
    pub category: Category,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recipient: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recipients: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote_host: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote_ip: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply_code: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
    /// `TLSv1.2`, `TLSv1.3` or `none`; absent when no connection was made.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_version: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cipher: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_resumed: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    pub received_at_us: u64,
    pub at_us: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_us: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_uid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<&'a str>,
}

impl<'a> Entry<'a> {
    pub fn new(
        event: Event,
        message_id: &'a str,
        lane: Lane,
        category: Category,
        received_at_us: u64,
    ) -> Self {
        Entry {
            event,
            message_id,
            lane,
            category,
            recipient: None,
            recipients: None,
            remote_host: None,
            remote_ip: None,
            reply_code: None,
            reply: None,
            tls_version: None,
            tls_cipher: None,
            tls_resumed: None,
            attempt: None,
            received_at_us,
            at_us: now_us(),
            next_attempt_us: None,
            peer_uid: None,
            peer_pid: None,
            size_bytes: None,
            note: None,
        }
    }
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_micros() as u64)
        .unwrap_or(0)
}

/// Computes the UTC day of a timestamp as `YYYYMMDD`, such as 20261204.
pub fn utc_day(at_us: u64) -> u32 {
    // Converts days since 1970-01-01 to a proleptic Gregorian date with the
    // era-based method: 400-year eras of 146,097 days, with years counted
    // from March so that the leap day falls at the end of a year.
    let days = (at_us / 86_400_000_000) as i64 + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year * 10_000 + month * 100 + day) as u32
}

/// One delivery log file: the core that writes it, the UTC day it was
/// started (`YYYYMMDD`) and its generation within that day. The derived
/// order (core, day, generation) is the order in which a core wrote them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LogFileId {
    pub core: u16,
    pub day: u32,
    pub generation: u32,
}

impl LogFileId {
    /// Parses a file name written by [`LogFileId::file_name`]; any other
    /// name, such as the single `delivery.log` of earlier versions, is
    /// `None`.
    pub fn parse(file_name: &str) -> Option<LogFileId> {
        let inner = file_name.strip_prefix("delivery.")?.strip_suffix(".log")?;
        let mut parts = inner.split('.');
        let core = parse_digits(parts.next()?)?;
        let day_text = parts.next()?;
        if day_text.len() != 8 {
            return None;
        }
        let day = parse_digits(day_text)?;
        let generation = parse_digits(parts.next()?)?;
        if parts.next().is_some() {
            return None;
        }
        Some(LogFileId {
            core: u16::try_from(core).ok()?,
            day: u32::try_from(day).ok()?,
            generation: u32::try_from(generation).ok()?,
        })
    }

    pub fn file_name(&self) -> String {
        format!(
            "delivery.{}.{:08}.{}.log",
            self.core, self.day, self.generation
        )
    }
}

impl fmt::Display for LogFileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file_name())
    }
}

/// Parses plain ASCII digits, rejecting signs and empty text that
/// `str::parse` would accept or report less clearly.
fn parse_digits(text: &str) -> Option<u64> {
    if text.is_empty() || text.len() > 10 || !text.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Lists the delivery log files in `dir`, sorted by core, day and
/// generation. Names that are not delivery log files are skipped.
pub fn list_files(dir: &Path) -> std::io::Result<Vec<LogFileId>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(id) = entry.file_name().to_str().and_then(LogFileId::parse) {
            files.push(id);
        }
    }
    files.sort();
    Ok(files)
}

/// The file a core appends to, with the bytes already in it.
struct ActiveFile {
    file: File,
    id: LogFileId,
    size_bytes: u64,
}

/// One core's writer of its delivery log files.
pub struct DeliveryLog {
    dir: PathBuf,
    max_file_bytes: u64,
    active: RefCell<ActiveFile>,
    buffer: RefCell<Vec<u8>>,
    recipient_logging: RecipientLogging,
    site_key: SiteKey,
}

impl DeliveryLog {
    /// Opens core `core`'s current file in `dir`: its newest file when that
    /// was started today, is below `max_file_bytes` and ends with a whole
    /// line, otherwise a new generation. A file whose last line is torn (by
    /// a power loss) is never appended to, so the torn bytes cannot merge
    /// with the next line.
    pub fn open(
        dir: &Path,
        core: u16,
        max_file_bytes: u64,
        recipient_logging: RecipientLogging,
        site_key: SiteKey,
    ) -> std::io::Result<DeliveryLog> {
        let today = utc_day(now_us());
        let newest = list_files(dir)?
            .into_iter()
            .filter(|id| id.core == core)
            .max();
        let active = match newest {
            Some(id) if id.day == today => match reopen(dir, id, max_file_bytes)? {
                Some(active) => active,
                None => create(dir, next_id(id, today))?,
            },
            Some(id) => create(dir, next_id(id, today))?,
            None => create(
                dir,
                LogFileId {
                    core,
                    day: today,
                    generation: 0,
                },
            )?,
        };
        Ok(DeliveryLog {
            dir: dir.to_path_buf(),
            max_file_bytes,
            active: RefCell::new(active),
            buffer: RefCell::new(Vec::with_capacity(FLUSH_THRESHOLD_BYTES * 2)),
            recipient_logging,
            site_key,
        })
    }

    /// The recipient as the log shows it: the address, or its HMAC.
    pub fn recipient_field(&self, address: &str) -> String {
        match self.recipient_logging {
            RecipientLogging::Clear => address.to_string(),
            RecipientLogging::Hmac => format!("hmac:{}", self.site_key.hmac_hex(address)),
        }
    }

    /// Returns the file the next write goes to.
    pub fn current_file(&self) -> LogFileId {
        self.active.borrow().id
    }

    pub fn write(&self, entry: &Entry<'_>) {
        let mut buffer = self.buffer.borrow_mut();
        if serde_json::to_writer(&mut *buffer, entry).is_err() {
            tracing::error!(
                message_id = entry.message_id,
                "delivery log: entry failed to serialise"
            );
            return;
        }
        buffer.push(b'\n');
        if buffer.len() >= FLUSH_THRESHOLD_BYTES {
            self.write_out(&mut buffer);
        }
    }

    pub fn flush(&self) {
        let mut buffer = self.buffer.borrow_mut();
        self.write_out(&mut buffer);
    }

    fn write_out(&self, buffer: &mut Vec<u8>) {
        if buffer.is_empty() {
            return;
        }
        let mut active = self.active.borrow_mut();
        self.rotate_if_due(&mut active, buffer.len() as u64);
        // One write of whole lines: the file gains whole lines only, so a
        // reader that stops at the last newline never splits a line.
        match active.file.write_all(buffer) {
            Ok(()) => active.size_bytes += buffer.len() as u64,
            Err(error) => {
                tracing::error!(
                    core = active.id.core,
                    file = %active.id,
                    %error,
                    bytes = buffer.len(),
                    "delivery log: write failed; these lines are lost from the log (the spool still has the outcomes)"
                );
            }
        }
        buffer.clear();
    }

    /// Starts the next file when the UTC day changed or when `pending_bytes`
    /// would take the current one past `max_file_bytes`. An empty file is
    /// kept whatever the batch size, so one large batch cannot create files
    /// without end. When the new file cannot be created, writing goes on in
    /// the current one rather than losing lines.
    fn rotate_if_due(&self, active: &mut ActiveFile, pending_bytes: u64) {
        // Only a later day counts: after the clock is set back, the current
        // file's newer day stays, rather than rotating on every write.
        let today = utc_day(now_us());
        let new_day = today > active.id.day;
        let too_large = active.size_bytes + pending_bytes > self.max_file_bytes;
        if !new_day && (!too_large || active.size_bytes == 0) {
            return;
        }
        let next = next_id(active.id, today);
        match create(&self.dir, next) {
            Ok(created) => {
                tracing::debug!(
                    core = active.id.core,
                    closed = %active.id,
                    closed_size_bytes = active.size_bytes,
                    opened = %next,
                    "delivery log: rotated"
                );
                *active = created;
            }
            Err(error) => {
                tracing::error!(
                    core = active.id.core,
                    file = %next,
                    %error,
                    "delivery log: cannot start the next file; writing on in the current one"
                );
            }
        }
    }
}

/// Returns the file after `id`: the next generation on the same day, or
/// generation 0 of `today`.
fn next_id(id: LogFileId, today: u32) -> LogFileId {
    if today > id.day {
        LogFileId {
            core: id.core,
            day: today,
            generation: 0,
        }
    } else {
        // A clock set back keeps the newer day, so names stay in write
        // order.
        LogFileId {
            generation: id.generation.saturating_add(1),
            ..id
        }
    }
}

/// Creates a new file. `create_new` makes a name clash (two engines on one
/// state directory) an error instead of a shared file.
fn create(dir: &Path, id: LogFileId) -> std::io::Result<ActiveFile> {
    let file = OpenOptions::new()
        .append(true)
        .create_new(true)
        .mode(0o640)
        .open(dir.join(id.file_name()))?;
    Ok(ActiveFile {
        file,
        id,
        size_bytes: 0,
    })
}

/// Opens `id` for appending, or returns `None` when it is full or its last
/// byte is not a newline.
fn reopen(dir: &Path, id: LogFileId, max_file_bytes: u64) -> std::io::Result<Option<ActiveFile>> {
    let mut file = OpenOptions::new()
        .read(true)
        .append(true)
        .open(dir.join(id.file_name()))?;
    let size_bytes = file.metadata()?.len();
    if size_bytes >= max_file_bytes {
        return Ok(None);
    }
    if size_bytes > 0 {
        let mut last = [0u8; 1];
        file.seek(SeekFrom::Start(size_bytes - 1))?;
        file.read_exact(&mut last)?;
        if last[0] != b'\n' {
            tracing::warn!(
                core = id.core,
                file = %id,
                "delivery log: the file ends inside a line; starting a new file"
            );
            return Ok(None);
        }
    }
    Ok(Some(ActiveFile {
        file,
        id,
        size_bytes,
    }))
}

impl Drop for DeliveryLog {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_day_known_dates() {
        assert_eq!(utc_day(0), 19_700_101);
        // 2000-02-29, a leap day in a year divisible by 400.
        assert_eq!(utc_day(951_782_400_000_000), 20_000_229);
        // 2026-12-04 23:59:59.999999 and the next microsecond.
        assert_eq!(utc_day(1_796_428_799_999_999), 20_261_204);
        assert_eq!(utc_day(1_796_428_800_000_000), 20_261_205);
    }

    #[test]
    fn file_name_round_trip() {
        let id = LogFileId {
            core: 3,
            day: 20_261_204,
            generation: 17,
        };
        assert_eq!(id.file_name(), "delivery.3.20261204.17.log");
        assert_eq!(LogFileId::parse(&id.file_name()), Some(id));
    }

    #[test]
    fn file_name_rejects_others() {
        for name in [
            "delivery.log",
            "delivery.3.20261204.log",
            "delivery.3.2026124.0.log",
            "delivery.+3.20261204.0.log",
            "delivery.3.20261204.0.1.log",
            "delivery.70000.20261204.0.log",
            "delivery.3.20261204.0.log.tmp",
            "audit.log",
        ] {
            assert_eq!(LogFileId::parse(name), None, "{name}");
        }
    }

    fn entry(message_id: &str) -> Entry<'_> {
        Entry::new(
            Event::Received,
            message_id,
            Lane::Bulk,
            Category::Care,
            now_us(),
        )
    }

    fn read_lines(dir: &Path, core: u16) -> Vec<(LogFileId, String)> {
        let mut lines = Vec::new();
        for id in list_files(dir).expect("list").into_iter() {
            if id.core != core {
                continue;
            }
            let text = std::fs::read_to_string(dir.join(id.file_name())).expect("read");
            assert!(text.is_empty() || text.ends_with('\n'), "{id}: {text:?}");
            for line in text.lines() {
                lines.push((id, line.to_string()));
            }
        }
        lines
    }

    #[test]
    fn rotates_by_size_keeping_whole_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = SiteKey::from_bytes(&[7; 32]);
        let log =
            DeliveryLog::open(dir.path(), 2, 4096, RecipientLogging::Hmac, key).expect("open");
        for sequence in 0..200 {
            let id = format!("message-{sequence}");
            log.write(&entry(&id));
            if sequence % 10 == 9 {
                log.flush();
            }
        }
        log.flush();
        let lines = read_lines(dir.path(), 2);
        assert_eq!(lines.len(), 200);
        for (sequence, (_, line)) in lines.iter().enumerate() {
            let value: serde_json::Value = serde_json::from_str(line).expect("whole JSON line");
            assert_eq!(value["message_id"], format!("message-{sequence}"));
        }
        let files = list_files(dir.path()).expect("list");
        assert!(files.len() > 2, "{files:?}");
        for id in &files {
            let size = std::fs::metadata(dir.path().join(id.file_name()))
                .expect("metadata")
                .len();
            assert!(size <= 4096, "{id} has {size} bytes");
        }
    }

    #[test]
    fn reopen_appends_to_current_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = SiteKey::from_bytes(&[7; 32]);
        let first = DeliveryLog::open(dir.path(), 0, 1 << 20, RecipientLogging::Hmac, key.clone())
            .expect("open");
        first.write(&entry("one"));
        let file = first.current_file();
        drop(first);
        let second =
            DeliveryLog::open(dir.path(), 0, 1 << 20, RecipientLogging::Hmac, key).expect("reopen");
        assert_eq!(second.current_file(), file);
        second.write(&entry("two"));
        drop(second);
        assert_eq!(read_lines(dir.path(), 0).len(), 2);
    }

    #[test]
    fn torn_last_line_starts_new_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = SiteKey::from_bytes(&[7; 32]);
        let today = utc_day(now_us());
        let torn = LogFileId {
            core: 1,
            day: today,
            generation: 4,
        };
        std::fs::write(
            dir.path().join(torn.file_name()),
            b"{\"event\":\"received\"}\n{\"event\":\"deliv",
        )
        .expect("write torn file");
        let log =
            DeliveryLog::open(dir.path(), 1, 1 << 20, RecipientLogging::Hmac, key).expect("open");
        assert_eq!(
            log.current_file(),
            LogFileId {
                generation: 5,
                ..torn
            }
        );
    }

    #[test]
    fn older_day_starts_generation_zero() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = SiteKey::from_bytes(&[7; 32]);
        let old = LogFileId {
            core: 0,
            day: 20_200_101,
            generation: 9,
        };
        std::fs::write(dir.path().join(old.file_name()), b"").expect("write old file");
        let log =
            DeliveryLog::open(dir.path(), 0, 1 << 20, RecipientLogging::Hmac, key).expect("open");
        assert_eq!(log.current_file().day, utc_day(now_us()));
        assert_eq!(log.current_file().generation, 0);
    }
}
