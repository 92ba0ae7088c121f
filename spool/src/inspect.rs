//! Offline inspection for `caduceus spool stats|ls|show|verify`, run while
//! the engine is stopped. Nothing here writes to the spool.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{ReadError, SpoolError};
use crate::format::{OpenError, RecordKind, decode_message, decode_outcome, decode_relocated};
use crate::scan::{HeaderProblem, scan_segment};
use crate::storage::{FileStorage, Segment, parse_segment_file_name};
use crate::{Envelope, Keyring, MessageId, Outcome, RecipientState, RecordRef, StoredMessage};

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

/// One copy of a message found by [`find_message`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundMessage {
    pub shard: u16,
    pub record: RecordRef,
    /// 0 when the payload is not encrypted.
    pub key_id: u32,
    /// The record's length on disk, header, tag and padding included.
    pub record_bytes: u64,
    pub body_bytes: u64,
    pub envelope: Envelope,
    /// Each recipient's state in envelope order, folded from the outcome
    /// records that follow this copy.
    pub states: Vec<RecipientState>,
}

/// The result of [`find_message`].
#[derive(Debug, Clone, Default)]
pub struct FindReport {
    /// The latest copy of the message in each shard that contains one,
    /// usually one. A second shard has a copy only when a crash interrupted the
    /// adoption of an orphaned shard.
    pub copies: Vec<FoundMessage>,
    /// Records whose payload could not be opened (no key, wrong key or
    /// damage), so they may belong to the message without being seen.
    pub unreadable_records: u64,
}

/// Finds a message by id in every shard of a stopped engine's spool, for
/// `caduceus spool show`, and folds its outcome records into per-recipient
/// states the way recovery does. The body is decrypted to learn its size
/// but not returned. Nothing is written.
pub fn find_message(
    dir: &Path,
    message_id: MessageId,
    keyring: Option<&Keyring>,
) -> Result<FindReport, SpoolError> {
    let mut report = FindReport::default();
    let mut current: Option<FoundMessage> = None;
    let mut current_shard = None;
    for (shard, id, path) in segment_files(dir)? {
        if current_shard != Some(shard) {
            report.copies.extend(current.take());
            current_shard = Some(shard);
        }
        let segment = FileStorage::new(dir, shard)
            .open_read_only(id)
            .map_err(|source| SpoolError::Io {
                operation: "opening a segment",
                path: path.clone(),
                source,
            })?;
        segment.read(0, segment.len_bytes(), |bytes| {
            scan_segment(bytes, |offset, record| {
                let header = record.header;
                let Ok(plain) = record.open(keyring) else {
                    report.unreadable_records += 1;
                    return;
                };
                let location = RecordRef {
                    segment: id,
                    offset,
                };
                let decoded = match header.kind {
                    RecordKind::Message => {
                        decode_message(&header, &plain).map(|(envelope, body)| {
                            let pending = RecipientState::Pending {
                                attempts: 0,
                                next_attempt_us: 0,
                            };
                            let states = vec![pending; envelope.recipients.len()];
                            (envelope, body.len(), states)
                        })
                    }
                    RecordKind::Relocated => decode_relocated(&header, &plain)
                        .map(|copy| (copy.envelope, copy.body.len(), copy.states)),
                    RecordKind::Outcome => {
                        match (decode_outcome(&plain), current.as_mut()) {
                            (Ok(outcome), Some(found)) if outcome.message == found.record => {
                                if let Some(state) =
                                    found.states.get_mut(outcome.recipient_index as usize)
                                {
                                    *state = state_after(outcome.outcome, outcome.attempts);
                                }
                            }
                            (Ok(_), _) => {}
                            (Err(_), _) => report.unreadable_records += 1,
                        }
                        return;
                    }
                };
                match decoded {
                    // A relocated copy replaces the earlier one, and the
                    // outcomes that follow it refer to its new location.
                    Ok((envelope, body_bytes, states)) if envelope.message_id == message_id => {
                        current = Some(FoundMessage {
                            shard,
                            record: location,
                            key_id: header.key_id,
                            record_bytes: u64::from(header.length_bytes),
                            body_bytes: body_bytes as u64,
                            envelope,
                            states,
                        });
                    }
                    Ok(_) => {}
                    Err(_) => report.unreadable_records += 1,
                }
            });
        });
    }
    report.copies.extend(current);
    Ok(report)
}

/// Returns a recipient's state after an outcome record.
fn state_after(outcome: Outcome, attempts: u32) -> RecipientState {
    match outcome {
        Outcome::Deferred { next_attempt_us } => RecipientState::Pending {
            attempts,
            next_attempt_us,
        },
        Outcome::Delivered => RecipientState::Delivered,
        Outcome::Bounced => RecipientState::Bounced,
        Outcome::Expired => RecipientState::Expired,
        Outcome::Deleted => RecipientState::Deleted,
    }
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
