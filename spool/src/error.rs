//! One error enum per operation, so the engine can map each case to its SMTP
//! reply: a full disk or failed segment is a temporary local problem (451/452
//! 4.3.x), a record larger than a segment is permanent (552 at DATA).

use std::io;
use std::path::PathBuf;

use crate::RecordRef;

/// Loading or parsing a keyring failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("reading keyring {path} failed: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "keyring {path} has mode {mode:04o}, which lets others read the spool keys; run `chmod 600 {path}`"
    )]
    InsecureMode { path: PathBuf, mode: u32 },
    #[error("keyring {path} line {line}: {reason}")]
    Syntax {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("invalid spool key: {0}")]
    InvalidKey(String),
    #[error("keyring has no key with id {0}")]
    UnknownKey(u32),
    #[error("the OS random number generator failed while making a spool key")]
    Random,
}

/// Opening or scanning a shard failed before it could accept appends.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error(
        "spool {operation} on {path} failed: {source}; check that the directory exists, is writable by this user and the disk is healthy"
    )]
    Io {
        operation: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "spool segment {segment} needs key id {key_id}, which the keyring lacks; add that key to the keyring file"
    )]
    MissingKey { segment: u32, key_id: u32 },
    #[error("invalid spool options: {0}")]
    InvalidOptions(String),
}

/// An append was rejected; nothing was written.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// Creating the next segment would leave less free disk space than
    /// `reserve_bytes`. Temporary: reply 452 4.3.1.
    #[error(
        "spool disk reserve reached: {free_bytes} bytes free, {reserve_bytes} reserved, next segment needs {segment_size_bytes}"
    )]
    DiskReserve {
        free_bytes: u64,
        reserve_bytes: u64,
        segment_size_bytes: u64,
    },
    /// Creating a segment file failed. Temporary: reply 451 4.3.0.
    #[error("spool {operation} failed: {source}")]
    Io {
        operation: &'static str,
        #[source]
        source: io::Error,
    },
    /// The record can never fit in a segment. Permanent: reply 552 at DATA.
    #[error(
        "spool record of {record_bytes} bytes exceeds the {max_record_bytes}-byte maximum per segment"
    )]
    TooLarge {
        record_bytes: u64,
        max_record_bytes: u64,
    },
    /// The outcome refers to a message this shard does not hold live.
    #[error("spool has no live message at {0}")]
    UnknownMessage(RecordRef),
    /// The recipient index is beyond the message's recipient list.
    #[error("message at {record} has {recipients} recipients; index {index} is out of range")]
    NoSuchRecipient {
        record: RecordRef,
        index: u32,
        recipients: u32,
    },
    /// The envelope cannot be stored as given.
    #[error("invalid envelope: {0}")]
    InvalidEnvelope(String),
    /// The shard was closed.
    #[error("spool shard is closed")]
    Closed,
}

/// The fdatasync that would have made a commit durable failed, or the shard
/// closed first.
///
/// After a failed fdatasync the data may or may not be on disk: Linux may have
/// dropped the dirty pages and cleared the error. The caller must treat the
/// affected messages as not accepted (reply 451) even though recovery may
/// later find some of them, which can deliver them twice but never loses one
/// that was acknowledged.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommitError {
    #[error("spool sync of segment {segment} failed: {reason}")]
    SyncFailed { segment: u32, reason: String },
    #[error("spool shard closed before the commit was synced")]
    Closed,
}

/// Reading a record back failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("spool has no segment {segment}")]
    NoSegment { segment: u32 },
    #[error("spool record at {record} is invalid: {reason}")]
    Invalid { record: RecordRef, reason: String },
    #[error("spool record at {record} is sealed with key id {key_id}, which the keyring lacks")]
    MissingKey { record: RecordRef, key_id: u32 },
    #[error("spool record at {record} is encrypted but no keyring was given")]
    NoKeyring { record: RecordRef },
    #[error("spool record at {record} failed authentication: wrong key or damaged data")]
    Unauthentic { record: RecordRef },
    #[error("spool record at {record} is not a message record")]
    NotMessage { record: RecordRef },
}
