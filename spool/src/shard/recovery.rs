//! Rebuilding a shard's state from its segments at open.
//!
//! Segments are replayed in id order and records in offset order, which is
//! the order they were appended in, so the last outcome record of a
//! recipient is its current state.
//!
//! Compaction copies a live message forward as a relocated record that
//! carries every recipient's state, and deletes the old segment only once the
//! copy is durable. A crash between the two leaves both copies. Recovery keeps
//! the relocated record and drops every earlier record with the same message
//! id, with the outcomes folded into it, so the message is neither lost nor
//! delivered twice. No outcome for the old copy can follow the relocated
//! record, because the shard stops accepting outcomes for the old location
//! when it makes the copy.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::rc::Rc;
use std::time::Instant;

use super::{LiveMessage, SegmentEntry};
use crate::error::SpoolError;
use crate::format::{
    OpenError, RecordKind, SEALED_OUTCOME_RECORD_BYTES, SEGMENT_HEADER_BYTES, decode_envelope,
    decode_outcome, message_body_len,
};
use crate::scan::{HeaderProblem, scan_segment};
use crate::storage::{Segment, Storage};
use crate::{
    AppendedMessage, Envelope, Keyring, ListAppends, MessageId, Outcome, RecipientState, RecordRef,
    RecoveredMessage, RecoveryReport,
};
use rkyv::util::AlignedVec;

pub(super) struct Recovered<G> {
    pub(super) segments: BTreeMap<u32, SegmentEntry<G>>,
    pub(super) next_segment: u32,
    pub(super) live: HashMap<RecordRef, LiveMessage>,
    pub(super) messages: Vec<RecoveredMessage>,
    pub(super) report: RecoveryReport,
}

struct Found {
    envelope: Envelope,
    states: Vec<RecipientState>,
    outcome_segments: Vec<u32>,
    record_bytes: u64,
}

/// One segment's contribution, gathered inside the read closure.
#[derive(Default)]
struct SegmentRecords {
    records: u64,
    quarantined: Vec<(u64, String)>,
    missing_key: Option<u32>,
}

pub(super) async fn recover<S: Storage>(
    storage: &S,
    shard: u16,
    keyring: Option<&Keyring>,
    list_appends: ListAppends,
) -> Result<Recovered<S::Segment>, SpoolError> {
    let started = Instant::now();
    let io_error = |operation: &'static str, segment: Option<u32>| {
        let path =
            segment.map_or_else(Default::default, |segment| storage.describe(segment).into());
        move |source| SpoolError::Io {
            operation,
            path,
            source,
        }
    };
    let mut ids = storage.list().map_err(io_error("listing segments", None))?;
    ids.sort_unstable();

    let mut report = RecoveryReport::default();
    let mut found: BTreeMap<RecordRef, Found> = BTreeMap::new();
    let mut segments = BTreeMap::new();
    let mut blank = Vec::new();
    let mut orphan_outcomes = 0u64;
    // The latest record holding each message, to drop the older copies that
    // a relocated record replaces.
    let mut latest_copy: HashMap<MessageId, RecordRef> = HashMap::new();
    let mut superseded_copies = 0u64;
    // Pairs of segments where the first must be deleted before the second,
    // as the running shard keeps them (see `SegmentEntry::holds`).
    let mut holds: Vec<(u32, u32)> = Vec::new();

    for &id in &ids {
        let segment = storage
            .open(id)
            .map_err(io_error("opening a segment", Some(id)))?;
        report.segments += 1;
        let mut contributed = SegmentRecords::default();
        // One decryption buffer for the whole segment, not one per record.
        let mut plain = AlignedVec::new();
        let scan = segment.read(0, segment.len_bytes(), |bytes| {
            scan_segment(bytes, |offset, record| {
                let location = RecordRef {
                    segment: id,
                    offset,
                };
                match record.open_into(keyring, &mut plain) {
                    Ok(()) => {}
                    Err(OpenError::NoKeyring | OpenError::MissingKey(_)) => {
                        contributed.missing_key.get_or_insert(record.header.key_id);
                        return;
                    }
                    Err(OpenError::Unauthentic) => {
                        contributed.quarantined.push((
                            offset,
                            "authentication failed: wrong key for this key id, or damage".into(),
                        ));
                        return;
                    }
                    Err(OpenError::Invalid(reason)) => {
                        contributed.quarantined.push((offset, reason));
                        return;
                    }
                };
                match record.header.kind {
                    RecordKind::Message => match decode_envelope(&record.header, &plain) {
                        Ok((envelope, _)) => {
                            contributed.records += 1;
                            report.last_append = Some(location);
                            let listed = match list_appends {
                                ListAppends::Off => false,
                                ListAppends::All => true,
                                ListAppends::After(after) => location > after,
                            };
                            if listed {
                                report.appends.push(AppendedMessage {
                                    record: location,
                                    envelope: envelope.clone(),
                                    body_bytes: u64::from(message_body_len(&plain)),
                                });
                            }
                            let states = vec![
                                RecipientState::Pending {
                                    attempts: 0,
                                    next_attempt_us: 0,
                                };
                                envelope.recipients.len()
                            ];
                            // Two original records never share a random
                            // message id, so there is nothing to replace.
                            latest_copy.insert(envelope.message_id, location);
                            found.insert(
                                location,
                                Found {
                                    envelope,
                                    states,
                                    outcome_segments: Vec::new(),
                                    record_bytes: record.bytes.len() as u64,
                                },
                            );
                        }
                        Err(reason) => contributed.quarantined.push((offset, reason)),
                    },
                    RecordKind::Relocated => match decode_envelope(&record.header, &plain) {
                        Ok((envelope, states)) => {
                            contributed.records += 1;
                            // `decode_envelope` returns states for every
                            // relocated record.
                            let states = states.unwrap_or_default();
                            if let Some(older) = latest_copy.insert(envelope.message_id, location)
                                && found.remove(&older).is_some()
                            {
                                superseded_copies += 1;
                                holds.push((older.segment, id));
                            }
                            found.insert(
                                location,
                                Found {
                                    envelope,
                                    states,
                                    outcome_segments: Vec::new(),
                                    record_bytes: record.bytes.len() as u64,
                                },
                            );
                        }
                        Err(reason) => contributed.quarantined.push((offset, reason)),
                    },
                    RecordKind::Outcome => match decode_outcome(&plain) {
                        Ok(outcome) => {
                            contributed.records += 1;
                            let Some(message) = found.get_mut(&outcome.message) else {
                                // The message was released and its segment
                                // deleted before this outcome's segment.
                                orphan_outcomes += 1;
                                return;
                            };
                            let Some(state) =
                                message.states.get_mut(outcome.recipient_index as usize)
                            else {
                                contributed.quarantined.push((
                                    offset,
                                    format!(
                                        "recipient index {} out of range",
                                        outcome.recipient_index
                                    ),
                                ));
                                return;
                            };
                            *state = match outcome.outcome {
                                Outcome::Deferred { next_attempt_us } => RecipientState::Pending {
                                    attempts: outcome.attempts,
                                    next_attempt_us,
                                },
                                Outcome::Delivered => RecipientState::Delivered,
                                Outcome::Bounced => RecipientState::Bounced,
                                Outcome::Expired => RecipientState::Expired,
                                Outcome::Deleted => RecipientState::Deleted,
                            };
                            if id != outcome.message.segment
                                && !message.outcome_segments.contains(&id)
                            {
                                message.outcome_segments.push(id);
                            }
                        }
                        Err(reason) => contributed.quarantined.push((offset, reason)),
                    },
                }
            })
        });

        if let Some(key_id) = contributed.missing_key {
            return Err(SpoolError::MissingKey {
                segment: id,
                key_id,
            });
        }
        report.records += contributed.records;

        let header = match scan.header {
            Ok(header) => header,
            Err(HeaderProblem::Blank) => {
                blank.push(id);
                continue;
            }
            Err(HeaderProblem::Invalid(error)) => {
                tracing::error!(shard, segment = id, path = %storage.describe(id), %error, "spool: segment header is damaged; segment quarantined and left in place");
                report
                    .quarantined
                    .push((id, 0, format!("segment header: {error}")));
                segments.insert(id, quarantined_entry(segment));
                continue;
            }
        };
        if header.shard != shard || header.segment != id {
            tracing::error!(
                shard,
                segment = id,
                header_shard = header.shard,
                header_segment = header.segment,
                "spool: segment header names another shard or segment; segment quarantined"
            );
            report.quarantined.push((
                id,
                0,
                "segment header names another shard or segment".into(),
            ));
            segments.insert(id, quarantined_entry(segment));
            continue;
        }

        for (offset, reason) in scan
            .quarantined
            .iter()
            .chain(contributed.quarantined.iter())
        {
            tracing::error!(shard, segment = id, offset, reason = %reason, "spool: damaged record quarantined");
            report.quarantined.push((id, *offset, reason.clone()));
        }
        for (start, end) in &scan.unwritten_gaps {
            // Records after the gap were not acknowledged, so delivering them
            // may duplicate a message the client retries. They are kept
            // anyway, because if the disk lost a synced page instead, dropping
            // them would lose mail.
            tracing::warn!(
                shard,
                segment = id,
                offset = start,
                length_bytes = end - start,
                "spool: skipping unwritten gap before unsynced records"
            );
        }
        if let Some((start, end)) = scan.torn_tail {
            tracing::warn!(
                shard,
                segment = id,
                offset = start,
                length_bytes = end - start,
                "spool: zeroing torn final record"
            );
            segment.write(start, &vec![0u8; (end - start) as usize]);
            segment
                .sync()
                .await
                .map_err(io_error("syncing a repaired segment", Some(id)))?;
            report.torn_tail_truncated += 1;
        }
        let quarantined = !scan.quarantined.is_empty() || !contributed.quarantined.is_empty();
        segments.insert(
            id,
            SegmentEntry {
                segment: Rc::new(segment),
                write_offset: scan.valid_end,
                pins: 0,
                live_bytes: 0,
                quarantined,
                holds: BTreeSet::new(),
                held_by: 0,
            },
        );
    }

    let mut live = HashMap::new();
    let mut messages = Vec::new();
    for (record, message) in found {
        holds.extend(
            message
                .outcome_segments
                .iter()
                .map(|segment| (record.segment, *segment)),
        );
        if message.states.iter().all(|state| state.is_final()) {
            continue;
        }
        let pins = std::iter::once((record.segment, message.record_bytes)).chain(
            message
                .outcome_segments
                .iter()
                .map(|segment| (*segment, SEALED_OUTCOME_RECORD_BYTES)),
        );
        for (segment, bytes) in pins {
            if let Some(entry) = segments.get_mut(&segment) {
                entry.pins += 1;
                entry.live_bytes += bytes;
            }
        }
        live.insert(
            record,
            LiveMessage {
                states: message.states.clone(),
                outcome_segments: message.outcome_segments,
                record_bytes: message.record_bytes,
            },
        );
        messages.push(RecoveredMessage {
            record,
            envelope: message.envelope,
            states: message.states,
        });
    }

    for (holder, held) in holds {
        if holder == held || !segments.contains_key(&held) {
            continue;
        }
        let added = segments
            .get_mut(&holder)
            .is_some_and(|entry| entry.holds.insert(held));
        if added && let Some(entry) = segments.get_mut(&held) {
            entry.held_by += 1;
        }
    }

    // Every recovered segment is read-only from now on, so one that contains
    // no live message and that no remaining segment holds is garbage.
    let mut pending: Vec<u32> = segments.keys().copied().collect();
    for id in blank {
        if let Err(error) = storage.remove(id) {
            tracing::warn!(shard, segment = id, %error, "spool: deleting an unused segment failed");
        }
    }
    while let Some(id) = pending.pop() {
        let unused = segments
            .get(&id)
            .is_some_and(|entry| entry.pins == 0 && entry.held_by == 0 && !entry.quarantined);
        if !unused {
            continue;
        }
        // Checked above.
        let entry = segments.remove(&id).expect("segment checked above");
        for held in entry.holds {
            if let Some(held_entry) = segments.get_mut(&held) {
                held_entry.held_by -= 1;
                pending.push(held);
            }
        }
        if let Err(error) = storage.remove(id) {
            tracing::warn!(shard, segment = id, %error, "spool: deleting an unused segment failed");
        }
    }

    report.elapsed = started.elapsed();
    let seconds = report.elapsed.as_secs_f64();
    let records_per_second = if seconds > 0.0 {
        report.records as f64 / seconds
    } else {
        0.0
    };
    tracing::info!(
        shard,
        segments = report.segments,
        records = report.records,
        live_messages = messages.len(),
        orphan_outcomes,
        superseded_copies,
        torn_tails = report.torn_tail_truncated,
        quarantined = report.quarantined.len(),
        elapsed_ms = report.elapsed.as_millis() as u64,
        records_per_second = records_per_second as u64,
        "spool: recovery finished"
    );

    let next_segment = ids.last().map_or(1, |last| last.saturating_add(1));
    Ok(Recovered {
        segments,
        next_segment,
        live,
        messages,
        report,
    })
}

fn quarantined_entry<G: Segment>(segment: G) -> SegmentEntry<G> {
    SegmentEntry {
        segment: Rc::new(segment),
        // Nothing in a segment with a bad header is readable.
        write_offset: SEGMENT_HEADER_BYTES as u64,
        pins: 0,
        live_bytes: 0,
        quarantined: true,
        holds: BTreeSet::new(),
        held_by: 0,
    }
}
