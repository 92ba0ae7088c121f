//! Offline inspection for `caduceus spool stats|ls|show|verify`, run while
//! the engine is stopped. Nothing here writes to the spool.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{ReadError, SpoolError};
use crate::format::{OpenError, RecordKind, decode_message, decode_outcome, decode_relocated};
use crate::scan::{HeaderProblem, scan_segment};
use crate::storage::{FileStorage, Segment, parse_segment_file_name};
use crate::{Keyring, Outcome, RecordRef, StoredMessage};

/// A record's kind and content, as far as the given keyring can open it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordSummary {
    /// A message; `message_id` and `body_bytes` are only known when the payload
    /// could be opened.
    Message {
        message_id: Option<String>,
        body_bytes: Option<u64>,
        /// For a copy made by compaction, where the copy it replaces was;
        /// `None` for an original or when the payload could not be opened.
        relocated_from: Option<RecordRef>,
    },
    Outcome {
        message: Option<RecordRef>,
        recipient_index: Option<u32>,
        outcome: Option<Outcome>,
        attempts: Option<u32>,
    },
    /// The bytes at this offset are not a valid record.
    Damaged { reason: String },
    /// The rest of the segment after this offset is an interrupted write.
    TornTail { end_offset: u64 },
}

/// One record, or one damaged range, found by [`scan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InspectedRecord {
    pub shard: u16,
    pub record: RecordRef,
    pub length_bytes: u64,
    /// 0 when the payload is not encrypted.
    pub key_id: u32,
    pub lane: u8,
    pub category: u8,
    pub recipient_count: u32,
    pub received_at_us: u64,
    pub expires_at_us: u64,
    pub summary: RecordSummary,
    /// The reason the payload could not be opened, if it could not.
    pub payload_error: Option<String>,
}

fn segment_files(dir: &Path) -> Result<Vec<(u16, u32, PathBuf)>, SpoolError> {
    let io_error = |source| SpoolError::Io {
        operation: "listing the spool directory",
        path: dir.to_owned(),
        source,
    };
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_error)? {
        let entry = entry.map_err(io_error)?;
        if let Some((shard, segment)) = entry.file_name().to_str().and_then(parse_segment_file_name)
        {
            files.push((shard, segment, entry.path()));
        }
    }
    files.sort();
    Ok(files)
}

/// Lists every record of every shard in `dir`. With a keyring, payloads are
/// opened so message ids and outcomes can be shown; without one, only the
/// clear metadata is listed. Damaged ranges appear as
/// [`RecordSummary::Damaged`] or [`RecordSummary::TornTail`].
pub fn scan(dir: &Path, keyring: Option<&Keyring>) -> Result<Vec<InspectedRecord>, SpoolError> {
    let mut found = Vec::new();
    for (shard, id, path) in segment_files(dir)? {
        let storage = FileStorage::new(dir, shard);
        let segment = storage
            .open_read_only(id)
            .map_err(|source| SpoolError::Io {
                operation: "opening a segment",
                path: path.clone(),
                source,
            })?;
        let blank = |record: RecordRef, summary| InspectedRecord {
            shard,
            record,
            length_bytes: 0,
            key_id: 0,
            lane: 0,
            category: 0,
            recipient_count: 0,
            received_at_us: 0,
            expires_at_us: 0,
            summary,
            payload_error: None,
        };
        let scan = segment.read(0, segment.len_bytes(), |bytes| {
            scan_segment(bytes, |offset, record| {
                let header = record.header;
                let opened = record.open(keyring);
                let payload_error = opened.as_ref().err().map(describe_open_error);
                let summary = match header.kind {
                    RecordKind::Message => {
                        let decoded = opened
                            .ok()
                            .and_then(|plain| decode_message(&header, &plain).ok());
                        RecordSummary::Message {
                            message_id: decoded
                                .as_ref()
                                .map(|(envelope, _)| envelope.message_id.to_string()),
                            body_bytes: decoded.as_ref().map(|(_, body)| body.len() as u64),
                            relocated_from: None,
                        }
                    }
                    RecordKind::Relocated => {
                        let decoded = opened
                            .ok()
                            .and_then(|plain| decode_relocated(&header, &plain).ok());
                        RecordSummary::Message {
                            message_id: decoded
                                .as_ref()
                                .map(|copy| copy.envelope.message_id.to_string()),
                            body_bytes: decoded.as_ref().map(|copy| copy.body.len() as u64),
                            relocated_from: decoded.as_ref().map(|copy| copy.previous),
                        }
                    }
                    RecordKind::Outcome => {
                        let decoded = opened.ok().and_then(|plain| decode_outcome(&plain).ok());
                        RecordSummary::Outcome {
                            message: decoded.map(|outcome| outcome.message),
                            recipient_index: decoded.map(|outcome| outcome.recipient_index),
                            outcome: decoded.map(|outcome| outcome.outcome),
                            attempts: decoded.map(|outcome| outcome.attempts),
                        }
                    }
                };
                found.push(InspectedRecord {
                    shard,
                    record: RecordRef {
                        segment: id,
                        offset,
                    },
                    length_bytes: u64::from(header.length_bytes),
                    key_id: header.key_id,
                    lane: header.lane,
                    category: header.category,
                    recipient_count: header.recipient_count,
                    received_at_us: header.received_at_us,
                    expires_at_us: header.expires_at_us,
                    summary,
                    payload_error,
                });
            })
        });
        match scan.header {
            Ok(_) | Err(HeaderProblem::Blank) => {}
            Err(HeaderProblem::Invalid(error)) => found.push(blank(
                RecordRef {
                    segment: id,
                    offset: 0,
                },
                RecordSummary::Damaged {
                    reason: format!("segment header: {error}"),
                },
            )),
        }
        for (offset, reason) in scan.quarantined {
            found.push(blank(
                RecordRef {
                    segment: id,
                    offset,
                },
                RecordSummary::Damaged { reason },
            ));
        }
        if let Some((start, end)) = scan.torn_tail {
            found.push(blank(
                RecordRef {
                    segment: id,
                    offset: start,
                },
                RecordSummary::TornTail { end_offset: end },
            ));
        }
    }
    found.sort_by_key(|record| (record.shard, record.record));
    Ok(found)
}

/// Reads one message for `caduceus spool show`. The caller audits the read,
/// because it exposes message content.
pub fn read_message(
    dir: &Path,
    shard: u16,
    record: RecordRef,
    keyring: Option<&Keyring>,
) -> Result<StoredMessage, ReadError> {
    let storage = FileStorage::new(dir, shard);
    let segment = storage
        .open_read_only(record.segment)
        .map_err(|_| ReadError::NoSegment {
            segment: record.segment,
        })?;
    let invalid = |reason: String| ReadError::Invalid { record, reason };
    if record.offset >= segment.len_bytes() {
        return Err(invalid("offset is past the end of the segment".into()));
    }
    segment.read(
        record.offset,
        segment.len_bytes() - record.offset,
        |bytes| {
            let checked = crate::format::UncheckedRecord(bytes)
                .check()
                .map_err(|error| invalid(error.to_string()))?;
            if !checked.header.kind.holds_message() {
                return Err(ReadError::NotMessage { record });
            }
            let plain = checked.open(keyring).map_err(|error| match error {
                OpenError::NoKeyring => ReadError::NoKeyring { record },
                OpenError::MissingKey(key_id) => ReadError::MissingKey { record, key_id },
                OpenError::Unauthentic => ReadError::Unauthentic { record },
                OpenError::Invalid(reason) => invalid(reason),
            })?;
            let (envelope, body) = decode_message(&checked.header, &plain).map_err(invalid)?;
            Ok(StoredMessage { envelope, body })
        },
    )
}

fn describe_open_error(error: &OpenError) -> String {
    match error {
        OpenError::NoKeyring => "encrypted; no keyring given".into(),
        OpenError::MissingKey(key_id) => {
            format!("encrypted with key id {key_id}, which the keyring lacks")
        }
        OpenError::Unauthentic => "authentication failed: wrong key or damaged data".into(),
        OpenError::Invalid(reason) => reason.clone(),
    }
}
