//! Compaction: copying the few live messages of a mostly dead segment
//! forward, so the segment can be deleted.
//!
//! A segment is deleted once no live message needs it. A segment whose other
//! messages were delivered long ago stays alive as long as one of its
//! messages keeps being deferred, so without compaction disk use grows with
//! the share of slow destinations. Compaction runs in two steps:
//!
//! 1. [`Shard::relocate`] appends a relocated record for each chosen message:
//!    the envelope, the body and every recipient's current state, sealed
//!    again under the active key. The shard's live index moves to the new
//!    location at once, so outcomes for the old location are rejected from
//!    then on, and the caller re-keys its own queue from
//!    [`Relocation::moved`] before it yields.
//! 2. [`Shard::complete_relocation`] waits until the group commit made the
//!    copies durable and only then drops the old copies' pins, which deletes
//!    the segments nothing else needs.
//!
//! A crash between the two steps leaves both copies on disk; recovery keeps
//! the newer one (see `recovery.rs`).

use super::commit::wait_durable;
use super::{LiveMessage, Shard, SpaceUse};
use crate::error::{AppendError, CommitError};
use crate::format::{BuildError, SEALED_OUTCOME_RECORD_BYTES};
use crate::storage::{Segment, Storage};
use crate::{CommitSeq, RecordRef};

/// A sealed segment whose live bytes fall below this percentage of its size
/// is worth compacting. At 25 %, copying the live messages costs at most a
/// quarter of the space it frees, and a segment still being emptied by
/// normal deliveries is left alone.
pub const COMPACTION_LIVE_PERCENT: u64 = 25;

/// How much of one segment live messages still use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentUsage {
    pub segment: u32,
    /// The preallocated size of the segment file.
    pub size_bytes: u64,
    /// The message records of live messages in this segment, plus one
    /// outcome record's size for each live message whose outcome records are
    /// here. The outcome part is an estimate, because a message may have
    /// several outcome records in one segment.
    pub live_bytes: u64,
    /// Live messages whose message or outcome records are in this segment.
    pub live_messages: u32,
    /// The segment that appends go to; it is never compacted.
    pub active: bool,
    /// Damaged records were found here; the file is kept for an operator and
    /// never compacted.
    pub quarantined: bool,
}

impl SegmentUsage {
    /// Returns true when compaction would let this segment be deleted for
    /// a copy of at most [`COMPACTION_LIVE_PERCENT`] of its size.
    pub fn worth_compacting(&self) -> bool {
        !self.active
            && !self.quarantined
            && self.live_messages > 0
            && self.live_bytes.saturating_mul(100) < self.size_bytes * COMPACTION_LIVE_PERCENT
    }
}

/// The result of [`Shard::relocate`]. Pass it to
/// [`Shard::complete_relocation`]; dropping it instead keeps the old
/// segments until the next open, which is safe but wastes their space.
#[derive(Debug, Default)]
#[must_use = "the old copies are only released by Shard::complete_relocation"]
pub struct Relocation {
    moved: Vec<(RecordRef, RecordRef)>,
    copied_bytes: u64,
    skipped: u32,
    deferred_by_budget: u32,
    /// The latest copy in each segment that received copies. A failed sync
    /// fails only its own segment, so every segment's copies are waited for.
    last_seqs: Vec<CommitSeq>,
    /// Pins the old copies held: segment and live bytes, dropped once the
    /// new copies are durable.
    old_pins: Vec<(u32, u64)>,
}

impl Relocation {
    /// Returns each moved message's old and new location.
    pub fn moved(&self) -> &[(RecordRef, RecordRef)] {
        &self.moved
    }

    /// Returns the total length of the relocated records written.
    pub fn copied_bytes(&self) -> u64 {
        self.copied_bytes
    }

    /// Returns how many messages the segment still needs because the caller
    /// refused to move them or they could not be copied.
    pub fn skipped(&self) -> u32 {
        self.skipped
    }

    /// Returns how many messages were left for a later call because the
    /// byte budget ran out.
    pub fn deferred_by_budget(&self) -> u32 {
        self.deferred_by_budget
    }
}

/// Why one message was not copied.
enum CopyFailure {
    /// This message cannot be copied; others may be.
    Skip,
    /// No further append can succeed now (disk reserve, I/O, closed shard).
    Stop(AppendError),
}

impl<S: Storage + 'static> Shard<S> {
    /// Returns the live bytes of every segment, in segment order.
    pub fn segment_usage(&self) -> Vec<SegmentUsage> {
        let inner = &self.inner;
        let active = inner.active.get();
        inner
            .segments
            .borrow()
            .iter()
            .map(|(id, entry)| SegmentUsage {
                segment: *id,
                size_bytes: entry.segment.len_bytes(),
                live_bytes: entry.live_bytes,
                live_messages: entry.pins,
                active: active == Some(*id),
                quarantined: entry.quarantined,
            })
            .collect()
    }

    /// Returns the segments worth compacting (see
    /// [`SegmentUsage::worth_compacting`]), those with the fewest live bytes
    /// first.
    pub fn compaction_candidates(&self) -> Vec<SegmentUsage> {
        let mut candidates: Vec<SegmentUsage> = self
            .segment_usage()
            .into_iter()
            .filter(SegmentUsage::worth_compacting)
            .collect();
        candidates.sort_by_key(|usage| (usage.live_bytes, usage.segment));
        candidates
    }

    /// Copies the live messages that keep `segment` alive into the active
    /// segment, as relocated records that carry each recipient's current
    /// state. Stops once `budget_bytes` were copied (at least one message is
    /// copied when one is movable), so a caller can bound the work per call.
    ///
    /// `movable` is asked about each message first. The caller refuses
    /// messages that it cannot re-key yet, such as those with a delivery in
    /// flight. A message whose recipients are all final is skipped, because
    /// its release is due.
    ///
    /// Moved messages are live at their new location as soon as this
    /// returns, and appending an outcome for an old location fails with
    /// [`AppendError::UnknownMessage`]. The old copies stay on disk until
    /// [`Shard::complete_relocation`] sees the new ones durable.
    ///
    /// Returns an error only when the first copy already fails for a reason
    /// that applies to every append (disk reserve, I/O error, closed shard).
    /// A later failure of that kind ends the call with the moves done so far.
    pub fn relocate(
        &self,
        segment: u32,
        budget_bytes: u64,
        mut movable: impl FnMut(RecordRef) -> bool,
    ) -> Result<Relocation, AppendError> {
        let inner = &self.inner;
        self.check_open()?;
        let mut relocation = Relocation::default();
        let eligible = inner.active.get() != Some(segment)
            && inner
                .segments
                .borrow()
                .get(&segment)
                .is_some_and(|entry| !entry.quarantined);
        if !eligible {
            return Ok(relocation);
        }

        let mut pinning: Vec<RecordRef> = inner
            .live
            .borrow()
            .iter()
            .filter(|(record, live)| {
                record.segment == segment || live.outcome_segments.contains(&segment)
            })
            .map(|(record, _)| *record)
            .collect();
        pinning.sort_unstable();

        for old in pinning {
            if relocation.copied_bytes >= budget_bytes {
                relocation.deferred_by_budget += 1;
                continue;
            }
            let all_final = inner
                .live
                .borrow()
                .get(&old)
                .is_none_or(|live| live.states.iter().all(|state| state.is_final()));
            if all_final || !movable(old) {
                relocation.skipped += 1;
                continue;
            }
            match self.copy_forward(old, &mut relocation) {
                Ok(record_bytes) => relocation.copied_bytes += record_bytes,
                Err(CopyFailure::Skip) => relocation.skipped += 1,
                Err(CopyFailure::Stop(error)) => {
                    if relocation.moved.is_empty() {
                        return Err(error);
                    }
                    tracing::warn!(
                        shard = inner.shard,
                        segment,
                        moved = relocation.moved.len(),
                        %error,
                        "spool: compaction stopped early; the rest is retried later"
                    );
                    break;
                }
            }
        }
        if !relocation.moved.is_empty() {
            tracing::debug!(
                shard = inner.shard,
                segment,
                moved = relocation.moved.len(),
                copied_bytes = relocation.copied_bytes,
                skipped = relocation.skipped,
                deferred_by_budget = relocation.deferred_by_budget,
                "spool: compaction copied live messages forward"
            );
        }
        Ok(relocation)
    }

    /// Waits until the copies made by [`Shard::relocate`] are durable, then
    /// releases the old copies, deleting each segment that no live message
    /// needs any more.
    ///
    /// If the sync fails, the old copies are kept, so recovery finds every
    /// message in its old location at least. The error is the commit error
    /// that every other waiter of that sync gets too.
    pub async fn complete_relocation(&self, relocation: Relocation) -> Result<(), CommitError> {
        for seq in &relocation.last_seqs {
            wait_durable(&self.inner, *seq).await?;
        }
        // An old copy must not outlive its replacement, or recovery would
        // take the old copy's state for the current one.
        for (old, new) in &relocation.moved {
            self.hold(old.segment, new.segment);
        }
        for (segment, bytes) in relocation.old_pins {
            self.unpin(segment, bytes);
        }
        Ok(())
    }

    /// Copies one live message forward and moves its live entry. Returns the
    /// length of the new record.
    fn copy_forward(
        &self,
        old: RecordRef,
        relocation: &mut Relocation,
    ) -> Result<u64, CopyFailure> {
        let inner = &self.inner;
        let stored = self.read_message(old).map_err(|error| {
            tracing::error!(
                shard = inner.shard,
                record = %old,
                %error,
                "spool: compaction cannot read a live message; its segment is kept"
            );
            CopyFailure::Skip
        })?;
        let states = match inner.live.borrow().get(&old) {
            Some(live) => live.states.clone(),
            None => return Err(CopyFailure::Skip),
        };

        let mut builder = inner.builder.borrow_mut();
        let keyring = inner.keyring.borrow();
        let sealing = self.sealing(&keyring);
        let bytes = builder
            .relocated(&stored.envelope, &stored.body, old, &states, sealing)
            .map_err(|error| {
                let reason = match error {
                    BuildError::TooLarge { record_bytes } => {
                        format!("the copy would be {record_bytes} bytes")
                    }
                    BuildError::InvalidEnvelope(reason) => reason,
                };
                tracing::warn!(
                    shard = inner.shard,
                    record = %old,
                    reason,
                    "spool: compaction cannot copy a message; its segment is kept"
                );
                CopyFailure::Skip
            })?;
        let record_bytes = bytes.len() as u64;
        let new = match self.write_record(bytes, SpaceUse::StateChange) {
            Ok(new) => new,
            Err(error @ AppendError::TooLarge { .. }) => {
                tracing::warn!(
                    shard = inner.shard,
                    record = %old,
                    %error,
                    "spool: compaction cannot copy a message; its segment is kept"
                );
                return Err(CopyFailure::Skip);
            }
            Err(error) => return Err(CopyFailure::Stop(error)),
        };
        drop(builder);
        drop(keyring);

        let previous = {
            let mut live = inner.live.borrow_mut();
            // Looked up above, and nothing between can release it because
            // this runs without yielding.
            let previous = live.remove(&old).expect("message checked live above");
            live.insert(
                new,
                LiveMessage {
                    states,
                    outcome_segments: Vec::new(),
                    record_bytes,
                },
            );
            previous
        };
        self.pin(new.segment, record_bytes);
        relocation
            .old_pins
            .push((old.segment, previous.record_bytes));
        relocation.old_pins.extend(
            previous
                .outcome_segments
                .into_iter()
                .map(|segment| (segment, SEALED_OUTCOME_RECORD_BYTES)),
        );
        let seq = self.note_append(new.segment, record_bytes);
        // Appends fill one segment before the next, so a segment's copies
        // are consecutive in this list.
        match relocation.last_seqs.last_mut() {
            Some(last) if last.segment == new.segment => *last = seq,
            _ => relocation.last_seqs.push(seq),
        }
        relocation.moved.push((old, new));
        Ok(record_bytes)
    }
}
