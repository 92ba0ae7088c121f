//! Caduceus's message spool: append-only, memory-mapped, encrypted at rest.
//!
//! Each engine core owns one [`Shard`]: its own segment files, its own group
//! committer and its own in-memory index of live messages. A message is
//! appended once as a sealed record of envelope and body. Every later change
//! to a recipient's state is a small outcome record that refers back to it.
//! Committed records are never modified, so recovery replays the log and folds
//! outcomes into per-recipient state.
//!
//! The byte layout is specified in `format.rs` and in `docs/spool-format.md`.

mod commit_stats;
mod error;
pub mod format;
pub mod inspect;
mod keyring;
mod reader;
pub mod scan;
mod shard;
pub mod sim;
pub mod storage;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use caduceus_policy::{Category, Lane};

pub use commit_stats::{BATCH_MAX_BYTES, BATCH_MAX_RECORDS, CommitStats, FSYNC_MAX_US};
pub use error::{AppendError, CommitError, KeyError, ReadError, SpoolError};
pub use keyring::Keyring;
pub use reader::{MAX_CACHED_SEGMENTS, SpoolReader};
pub use shard::{COMPACTION_LIVE_PERCENT, Relocation, SegmentUsage, Shard, ShardStats};

/// A message's random 128-bit identifier.
///
/// Its text form is 32 lowercase hex digits, which is what logs and the CLI
/// show.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(pub [u8; 16]);

impl MessageId {
    /// Generates a random identifier from the operating system's CSPRNG.
    pub fn random() -> MessageId {
        let mut bytes = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
            .expect("the OS random number generator failed; no message id can be made safely");
        MessageId(bytes)
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = [0u8; 32];
        // `encode_to_slice` only fails on a length mismatch, and 16 bytes
        // always encode to 32 hex digits.
        hex::encode_to_slice(self.0, &mut text).expect("16 bytes encode to 32 hex digits");
        // Hex digits are ASCII, so this never fails.
        f.write_str(std::str::from_utf8(&text).expect("hex digits are ASCII"))
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({self})")
    }
}

/// The error returned when a message id's text form is not 32 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid message id {0:?}: expected 32 hex digits")]
pub struct ParseMessageIdError(pub String);

impl FromStr for MessageId {
    type Err = ParseMessageIdError;

    fn from_str(text: &str) -> Result<MessageId, ParseMessageIdError> {
        let mut bytes = [0u8; 16];
        if text.len() != 32 {
            return Err(ParseMessageIdError(text.to_owned()));
        }
        hex::decode_to_slice(text, &mut bytes).map_err(|_| ParseMessageIdError(text.to_owned()))?;
        Ok(MessageId(bytes))
    }
}

/// DSN `NOTIFY` flags of RFC 3461 §4.1, as a bit set; `0` means the client
/// gave no NOTIFY parameter.
pub mod notify {
    pub const SUCCESS: u8 = 1;
    pub const FAILURE: u8 = 2;
    pub const DELAY: u8 = 4;
    pub const NEVER: u8 = 8;
}

/// The DSN `RET` parameter of RFC 3461 §4.3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ret {
    Full,
    Headers,
}

/// One envelope recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    /// The forward-path text between `<` and `>`, exactly as received, for
    /// example `"odd user"@example.net`.
    pub address: String,
    /// The recipient's domain as a lowercase A-label.
    pub domain: String,
    /// A bit set of [`notify`] flags; `0` when not given.
    pub notify: u8,
    /// The decoded `ORCPT` parameter of RFC 3461 §4.2, such as
    /// `rfc822;user@example.net`.
    pub orcpt: Option<String>,
}

/// Everything about a message except its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub message_id: MessageId,
    /// Unix time in microseconds when the message was accepted.
    pub received_at_us: u64,
    /// Unix time in microseconds after which undelivered recipients expire.
    pub expires_at_us: u64,
    pub lane: Lane,
    pub category: Category,
    /// The reverse-path text without `<>`; empty for the null sender.
    pub sender: String,
    /// The DSN `ENVID` parameter of RFC 3461 §4.4, decoded.
    pub envid: Option<String>,
    pub ret: Option<Ret>,
    /// True when the client sent `BODY=8BITMIME` (RFC 6152).
    pub body_8bit: bool,
    /// True when the client sent `SMTPUTF8` (RFC 6531).
    pub smtputf8: bool,
    pub peer_uid: u32,
    pub peer_gid: u32,
    pub peer_pid: u32,
    pub recipients: Vec<Recipient>,
}

/// The location of a record: a segment of the owning shard and the byte
/// offset of the record's header within that segment file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecordRef {
    pub segment: u32,
    pub offset: u64,
}

impl fmt::Display for RecordRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.segment, self.offset)
    }
}

/// The delivery state of one recipient, as folded from outcome records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecipientState {
    /// Not final yet. `next_attempt_us` is a unix time in microseconds; `0`
    /// means "as soon as possible" (no attempt was made yet).
    Pending {
        attempts: u32,
        next_attempt_us: u64,
    },
    Delivered,
    Bounced,
    Expired,
    /// An operator deleted the recipient before it was delivered.
    Deleted,
}

impl RecipientState {
    /// Returns true for states that never change again.
    pub fn is_final(self) -> bool {
        !matches!(self, RecipientState::Pending { .. })
    }
}

/// The result of one delivery attempt for one recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A temporary failure; retry at `next_attempt_us` (unix microseconds).
    Deferred {
        next_attempt_us: u64,
    },
    Delivered,
    Bounced,
    Expired,
    /// An operator deleted the recipient; no DSN is sent for it.
    Deleted,
}

/// One record's position in a shard's append order, and the segment that
/// contains it. [`Shard::durable`] resolves once a completed fdatasync
/// covers that record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CommitSeq {
    pub(crate) seq: u64,
    pub(crate) segment: u32,
}

impl CommitSeq {
    /// Returns the position as a number, for logs and metrics.
    pub fn get(self) -> u64 {
        self.seq
    }
}

/// A message found live by recovery, with the state of each recipient in the
/// order of [`Envelope::recipients`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveredMessage {
    pub record: RecordRef,
    pub envelope: Envelope,
    pub states: Vec<RecipientState>,
}

/// Recovery's findings while opening a shard.
#[derive(Debug, Clone, Default)]
pub struct RecoveryReport {
    /// Segment files scanned.
    pub segments: u32,
    /// Valid records found (messages and outcomes).
    pub records: u64,
    /// Segments whose torn final record was zeroed.
    pub torn_tail_truncated: u32,
    /// Damaged records left in place: segment, offset and the reason.
    pub quarantined: Vec<(u32, u64, String)>,
    pub elapsed: Duration,
    /// The records that [`SpoolOptions::list_appends`] selects, in append
    /// order.
    pub appends: Vec<AppendedMessage>,
    /// The location of the last original message record, which every
    /// later append follows.
    pub last_append: Option<RecordRef>,
}

/// A message read back from the spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub envelope: Envelope,
    pub body: Vec<u8>,
}

/// Settings for one shard.
#[derive(Debug, Clone)]
pub struct SpoolOptions {
    /// The spool directory, shared by all shards; created if missing.
    pub dir: PathBuf,
    /// The shard number, which is part of every segment's file name.
    pub shard: u16,
    /// The size of each segment file, preallocated in full. A record larger
    /// than this minus the segment header is rejected as too large.
    pub segment_size_bytes: u64,
    /// The maximum time the committer waits, once it sees pending appends, to
    /// gather more of them into one fdatasync. Zero syncs at once.
    pub commit_max_wait: Duration,
    /// The number of pending appends that starts a sync without waiting for
    /// `commit_max_wait`. Zero or one syncs at once.
    pub commit_max_batch: u32,
    /// The keys for sealing records; `None` stores records unencrypted.
    pub keyring: Option<Keyring>,
    /// Free disk space, in bytes, that the spool leaves untouched: a new
    /// segment is not created when it would leave less than this.
    pub reserve_bytes: u64,
    /// The selection of original message records that recovery lists in
    /// [`RecoveryReport::appends`], finished or not.
    pub list_appends: ListAppends,
}

/// Selects the original message records (not relocated copies) that
/// recovery lists with their envelopes. The audit trail uses it to find the
/// messages whose `accepted` records a crash kept from reaching its files.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ListAppends {
    /// List none.
    #[default]
    Off,
    /// List every original message record.
    All,
    /// List the original message records after this location in append
    /// order.
    After(RecordRef),
}

/// An original message record listed by recovery (see [`ListAppends`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendedMessage {
    pub record: RecordRef,
    pub envelope: Envelope,
    pub body_bytes: u64,
}

impl SpoolOptions {
    /// Returns options with a 64 MiB segment, a 2 ms / 256-append commit
    /// window, no encryption and a 1 GiB disk reserve.
    pub fn new(dir: impl Into<PathBuf>, shard: u16) -> SpoolOptions {
        SpoolOptions {
            dir: dir.into(),
            shard,
            segment_size_bytes: 64 * 1024 * 1024,
            commit_max_wait: Duration::from_millis(2),
            commit_max_batch: 256,
            keyring: None,
            reserve_bytes: 1024 * 1024 * 1024,
            list_appends: ListAppends::Off,
        }
    }
}
