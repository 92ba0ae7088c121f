//! The delivery log: one JSON line per event (received, delivered, deferred,
//! bounced, expired, deleted).
//!
//! Each core opens `<state_dir>/log/delivery.log` with `O_APPEND` and writes
//! whole lines with one `write(2)` each, so cores never share a buffer and
//! lines from different cores never interleave. Lines are buffered per core
//! and written when the buffer passes 64 KiB or when the core's flush timer
//! fires (every 100 ms), so logging costs no syscall per message.
//!
//! Subjects and bodies never appear. Recipients appear in the clear or as
//! HMAC-SHA-256 under the site key, per `recipient_logging`.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
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

/// One core's writer of the shared delivery log file.
pub struct DeliveryLog {
    file: File,
    buffer: RefCell<Vec<u8>>,
    recipient_logging: RecipientLogging,
    site_key: SiteKey,
}

impl DeliveryLog {
    pub fn open(
        path: &Path,
        recipient_logging: RecipientLogging,
        site_key: SiteKey,
    ) -> std::io::Result<DeliveryLog> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(DeliveryLog {
            file,
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
            Self::write_out(&self.file, &mut buffer);
        }
    }

    pub fn flush(&self) {
        let mut buffer = self.buffer.borrow_mut();
        Self::write_out(&self.file, &mut buffer);
    }

    fn write_out(mut file: &File, buffer: &mut Vec<u8>) {
        if buffer.is_empty() {
            return;
        }
        // One write of whole lines: with O_APPEND the kernel places it at
        // the end of the file as a unit, so cores never interleave.
        if let Err(error) = file.write_all(buffer) {
            tracing::error!(%error, bytes = buffer.len(), "delivery log: write failed; these lines are lost from the log (the spool still has the outcomes)");
        }
        buffer.clear();
    }
}

impl Drop for DeliveryLog {
    fn drop(&mut self) {
        self.flush();
    }
}
