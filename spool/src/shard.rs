//! One core's spool shard: appends, group commit, reads, reclamation and
//! recovery.
//!
//! A shard is used from several tasks of one glommio executor, so its state
//! lives in `Cell`/`RefCell` behind an `Rc`. No borrow is held across an
//! `.await`.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::poll_fn;
use std::os::unix::fs::DirBuilderExt;
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::aead::NONCE_LEN;
use ring::rand::{SecureRandom, SystemRandom};

use crate::commit_stats::CommitStats;
use crate::error::{AppendError, CommitError, ReadError, SpoolError};
use crate::format::{
    BuildError, OpenError, OutcomeRecord, RecordBuilder, RecordHeader, SEALED_OUTCOME_RECORD_BYTES,
    SEGMENT_HEADER_BYTES, Sealing, SegmentHeader, UncheckedRecord, decode_message,
};
use crate::storage::{FileStorage, Segment, Storage};
use crate::{
    CommitSeq, Envelope, Keyring, Outcome, RecipientState, RecordRef, RecoveredMessage,
    RecoveryReport, SpoolOptions, StoredMessage,
};

mod commit;
mod compaction;
mod recovery;

use commit::{CommitState, run_committer, wait_durable};

pub use compaction::{COMPACTION_LIVE_PERCENT, Relocation, SegmentUsage};

/// Counters for `caduceus spool stats` and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardStats {
    pub segments: u32,
    /// Preallocated size of all segment files.
    pub bytes_on_disk: u64,
    /// Messages not yet released.
    pub live_records: u64,
    /// Bytes used in the active segment, header included.
    pub active_segment_used_bytes: u64,
}

pub(crate) struct SegmentEntry<G> {
    pub(crate) segment: Rc<G>,
    /// Records lie below this offset; appends go at it.
    pub(crate) write_offset: u64,
    /// Live messages whose message or outcome records are in this segment.
    pub(crate) pins: u32,
    /// The bytes that keep this segment alive: the message records of live
    /// messages, plus [`SEALED_OUTCOME_RECORD_BYTES`] per live message whose
    /// outcome records are here. Compaction compares it with the size.
    pub(crate) live_bytes: u64,
    /// Damaged records were found here; the file is kept for an operator.
    pub(crate) quarantined: bool,
    /// Segments that must outlive this one: they contain the final outcomes
    /// of released messages whose message records are here, or the
    /// relocated copies of messages whose older copies are here. Deleting
    /// one of them first would let recovery bring such a message back.
    pub(crate) holds: BTreeSet<u32>,
    /// How many other segments' `holds` contain this one.
    pub(crate) held_by: u32,
}

pub(crate) struct LiveMessage {
    /// Each recipient's state after the latest appended outcome, in envelope
    /// order. Compaction writes it into the relocated copy.
    pub(crate) states: Vec<RecipientState>,
    /// Segments other than the message's own that hold its outcome records.
    pub(crate) outcome_segments: Vec<u32>,
    /// The length of the message record, counted in its segment's
    /// `live_bytes`.
    pub(crate) record_bytes: u64,
}

/// The per-open nonce source: 4 fixed bytes (the shard number and 2 random
/// bytes) and a 64-bit counter seeded at random. Every sealed record takes
/// the next counter value, so nonces never repeat within an open, and the
/// random seed makes a repeat across opens under the same key negligible.
/// NOTE: AES-GCM keys should still be rotated before about 2^32 records.
struct NonceSource {
    prefix: [u8; 4],
    counter: Cell<u64>,
}

impl NonceSource {
    fn new(shard: u16) -> Result<NonceSource, SpoolError> {
        let mut seed = [0u8; 10];
        SystemRandom::new()
            .fill(&mut seed)
            .map_err(|_| SpoolError::Io {
                operation: "seeding the nonce counter",
                path: Default::default(),
                source: std::io::Error::other("the OS random number generator failed"),
            })?;
        let shard = shard.to_le_bytes();
        let mut counter = [0u8; 8];
        counter.copy_from_slice(&seed[2..]);
        Ok(NonceSource {
            prefix: [shard[0], shard[1], seed[0], seed[1]],
            counter: Cell::new(u64::from_le_bytes(counter)),
        })
    }

    fn next(&self) -> [u8; NONCE_LEN] {
        let value = self.counter.get().wrapping_add(1);
        self.counter.set(value);
        let mut nonce = [0u8; NONCE_LEN];
        nonce[..4].copy_from_slice(&self.prefix);
        nonce[4..].copy_from_slice(&value.to_le_bytes());
        nonce
    }
}

pub(crate) struct Inner<S: Storage> {
    storage: S,
    shard: u16,
    segment_size_bytes: u64,
    commit_max_wait: Duration,
    commit_max_batch: u32,
    reserve_bytes: u64,
    /// Replaced whole by [`Shard::set_keyring`] after a key rotation.
    keyring: RefCell<Option<Keyring>>,
    nonces: NonceSource,
    builder: RefCell<RecordBuilder>,
    segments: RefCell<BTreeMap<u32, SegmentEntry<S::Segment>>>,
    active: Cell<Option<u32>>,
    standby: RefCell<Option<(u32, Rc<S::Segment>)>>,
    /// Set while the committer creates the standby segment off the executor.
    standby_pending: Cell<bool>,
    /// When the committer last warned that it cannot prepare the standby.
    standby_warned_at: Cell<Option<std::time::Instant>>,
    next_segment: Cell<u32>,
    live: RefCell<HashMap<RecordRef, LiveMessage>>,
    commit: RefCell<CommitState>,
    /// Written only by the committer, taken by the shard's owner.
    commit_stats: RefCell<CommitStats>,
    free_bytes: Cell<u64>,
}

/// One core's spool shard.
pub struct Shard<S: Storage = FileStorage> {
    inner: Rc<Inner<S>>,
}

impl<S: Storage> Drop for Shard<S> {
    fn drop(&mut self) {
        // Let the committer sync what is pending and exit.
        let mut commit = self.inner.commit.borrow_mut();
        commit.closing = true;
        commit.wake_committer();
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_micros() as u64)
}

impl Shard<FileStorage> {
    /// Opens (creating the directory if needed) and recovers this shard's
    /// segments. Must be called inside a glommio executor; spawns the
    /// committer task.
    pub async fn open(
        options: SpoolOptions,
    ) -> Result<(Rc<Shard>, Vec<RecoveredMessage>, RecoveryReport), SpoolError> {
        // The spool contains message data, so the directory is private to the
        // engine's user.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&options.dir)
            .map_err(|source| SpoolError::Io {
                operation: "creating the spool directory",
                path: options.dir.clone(),
                source,
            })?;
        let storage = FileStorage::new(&options.dir, options.shard);
        Shard::open_with_storage(options, storage).await
    }
}

impl<S: Storage + 'static> Shard<S> {
    /// Opens a shard over any storage; [`Shard::open`] uses segment files in
    /// `options.dir`, tests use [`crate::sim::SimStorage`]. `options.dir` is
    /// only used by `open`.
    pub async fn open_with_storage(
        options: SpoolOptions,
        storage: S,
    ) -> Result<(Rc<Shard<S>>, Vec<RecoveredMessage>, RecoveryReport), SpoolError> {
        let minimum_segment_bytes = 2 * SEGMENT_HEADER_BYTES as u64;
        if options.segment_size_bytes < minimum_segment_bytes
            || !options.segment_size_bytes.is_multiple_of(4096)
        {
            return Err(SpoolError::InvalidOptions(format!(
                "segment_size_bytes {} must be a multiple of 4096 and at least 4096",
                options.segment_size_bytes
            )));
        }
        let recovered = recovery::recover(
            &storage,
            options.shard,
            options.keyring.as_ref(),
            options.list_appends,
        )
        .await?;
        let free_bytes = storage.free_bytes().unwrap_or(u64::MAX);
        let inner = Rc::new(Inner {
            storage,
            shard: options.shard,
            segment_size_bytes: options.segment_size_bytes,
            commit_max_wait: options.commit_max_wait,
            commit_max_batch: options.commit_max_batch.max(1),
            reserve_bytes: options.reserve_bytes,
            keyring: RefCell::new(options.keyring),
            nonces: NonceSource::new(options.shard)?,
            builder: RefCell::new(RecordBuilder::default()),
            segments: RefCell::new(recovered.segments),
            active: Cell::new(None),
            standby: RefCell::new(None),
            standby_pending: Cell::new(false),
            standby_warned_at: Cell::new(None),
            next_segment: Cell::new(recovered.next_segment),
            live: RefCell::new(recovered.live),
            commit: RefCell::new(CommitState::default()),
            commit_stats: RefCell::new(CommitStats::new()),
            free_bytes: Cell::new(free_bytes),
        });
        glommio::spawn_local(run_committer(inner.clone())).detach();
        let shard = Rc::new(Shard { inner });
        Ok((shard, recovered.messages, recovered.report))
    }

    /// Appends a message record. It is not durable until
    /// [`Shard::durable`] resolves for the returned sequence number, and the
    /// engine must not acknowledge the message before that.
    pub fn append_message(
        &self,
        envelope: &Envelope,
        body: &[u8],
    ) -> Result<(RecordRef, CommitSeq), AppendError> {
        let inner = &self.inner;
        self.check_open()?;
        let recipients = u32::try_from(envelope.recipients.len())
            .map_err(|_| AppendError::InvalidEnvelope("too many recipients".into()))?;
        if recipients == 0 {
            return Err(AppendError::InvalidEnvelope(
                "a message needs at least one recipient".into(),
            ));
        }
        let mut builder = inner.builder.borrow_mut();
        let keyring = inner.keyring.borrow();
        let sealing = self.sealing(&keyring);
        let bytes = builder
            .message(envelope, body, sealing)
            .map_err(|error| match error {
                BuildError::TooLarge { record_bytes } => AppendError::TooLarge {
                    record_bytes,
                    max_record_bytes: self.max_record_bytes(),
                },
                BuildError::InvalidEnvelope(reason) => AppendError::InvalidEnvelope(reason),
            })?;
        let record_bytes = bytes.len() as u64;
        let record = self.write_record(bytes, SpaceUse::NewMessage)?;
        drop(builder);
        drop(keyring);

        let pending = RecipientState::Pending {
            attempts: 0,
            next_attempt_us: 0,
        };
        inner.live.borrow_mut().insert(
            record,
            LiveMessage {
                states: vec![pending; recipients as usize],
                outcome_segments: Vec::new(),
                record_bytes,
            },
        );
        self.pin(record.segment, record_bytes);
        Ok((record, self.note_append(record.segment, record_bytes)))
    }

    /// Appends a per-recipient outcome record for a live message of this
    /// shard; `attempts` counts the delivery attempts made so far.
    pub fn append_outcome(
        &self,
        message: RecordRef,
        recipient_index: u32,
        outcome: Outcome,
        attempts: u32,
    ) -> Result<CommitSeq, AppendError> {
        let inner = &self.inner;
        self.check_open()?;
        let recipients = match inner.live.borrow().get(&message) {
            Some(live) => live.states.len() as u32,
            None => return Err(AppendError::UnknownMessage(message)),
        };
        if recipient_index >= recipients {
            return Err(AppendError::NoSuchRecipient {
                record: message,
                index: recipient_index,
                recipients,
            });
        }
        let record = OutcomeRecord {
            message,
            recipient_index,
            outcome,
            attempts,
        };
        let mut builder = inner.builder.borrow_mut();
        let keyring = inner.keyring.borrow();
        let bytes = builder.outcome(&record, self.sealing(&keyring));
        let record_bytes = bytes.len() as u64;
        let location = self.write_record(bytes, SpaceUse::StateChange)?;
        drop(builder);
        drop(keyring);

        let segment = location.segment;
        let newly_pinned = {
            let mut live = inner.live.borrow_mut();
            // Checked above, and nothing between can release it because this
            // runs without yielding.
            let entry = live.get_mut(&message).expect("message checked live above");
            entry.states[recipient_index as usize] = match outcome {
                Outcome::Deferred { next_attempt_us } => RecipientState::Pending {
                    attempts,
                    next_attempt_us,
                },
                Outcome::Delivered => RecipientState::Delivered,
                Outcome::Bounced => RecipientState::Bounced,
                Outcome::Expired => RecipientState::Expired,
                Outcome::Deleted => RecipientState::Deleted,
            };
            if segment != message.segment && !entry.outcome_segments.contains(&segment) {
                entry.outcome_segments.push(segment);
                true
            } else {
                false
            }
        };
        if newly_pinned {
            self.pin(segment, SEALED_OUTCOME_RECORD_BYTES);
        }
        Ok(self.note_append(segment, record_bytes))
    }

    /// Resolves when a completed fdatasync covers the record that returned
    /// `seq`.
    ///
    /// Returns an error if its segment's sync failed or the shard closed
    /// first. [`CommitError`] describes what a failure means for the data.
    /// The result covers that record only. After a failed sync, an earlier
    /// record in the failed segment can fail while a later one in the next
    /// segment succeeds, so a caller that needs several records waits for
    /// each.
    pub async fn durable(&self, seq: CommitSeq) -> Result<(), CommitError> {
        wait_durable(&self.inner, seq).await
    }

    /// Reads a message record back and decrypts it.
    pub fn read_message(&self, record: RecordRef) -> Result<StoredMessage, ReadError> {
        self.inspect_message(record).map(|(_, message)| message)
    }

    /// Reads a message record back and decrypts it, returning its clear
    /// header too (key id and record length), for `caduceus spool show`.
    pub fn inspect_message(
        &self,
        record: RecordRef,
    ) -> Result<(RecordHeader, StoredMessage), ReadError> {
        let inner = &self.inner;
        let segments = inner.segments.borrow();
        let entry = segments.get(&record.segment).ok_or(ReadError::NoSegment {
            segment: record.segment,
        })?;
        let invalid = |reason: String| ReadError::Invalid { record, reason };
        if record.offset < SEGMENT_HEADER_BYTES as u64 || record.offset >= entry.write_offset {
            return Err(invalid(format!(
                "offset is outside the segment's records, which end at {}",
                entry.write_offset
            )));
        }
        let length = entry.write_offset - record.offset;
        entry.segment.read(record.offset, length, |bytes| {
            let checked = UncheckedRecord(bytes)
                .check()
                .map_err(|error| invalid(error.to_string()))?;
            if !checked.header.kind.holds_message() {
                return Err(ReadError::NotMessage { record });
            }
            let plain = checked
                .open(inner.keyring.borrow().as_ref())
                .map_err(|error| open_error(record, error))?;
            let (envelope, body) = decode_message(&checked.header, &plain).map_err(invalid)?;
            Ok((checked.header, StoredMessage { envelope, body }))
        })
    }

    /// Marks a message as finished: every recipient is final and its final
    /// outcomes are durable. A segment that no live message needs any more
    /// and that is not the active one is deleted. Segments kept alive by a
    /// few long-deferred messages are reclaimed by [`Shard::relocate`].
    pub fn release(&self, record: RecordRef) {
        let inner = &self.inner;
        let Some(live) = inner.live.borrow_mut().remove(&record) else {
            tracing::warn!(shard = inner.shard, %record, "spool: release of a message that is not live; ignored");
            return;
        };
        // The message record must not outlive its final outcomes, or
        // recovery would find the message live again.
        for segment in &live.outcome_segments {
            self.hold(record.segment, *segment);
        }
        self.unpin(record.segment, live.record_bytes);
        for segment in live.outcome_segments {
            self.unpin(segment, SEALED_OUTCOME_RECORD_BYTES);
        }
    }

    /// Syncs everything appended so far and stops the committer. Appends are
    /// rejected afterwards. Returns the first sync failure since the shard
    /// opened, if there was one, even when later commits succeeded.
    pub async fn close(&self) -> Result<(), CommitError> {
        let inner = &self.inner;
        {
            let mut commit = inner.commit.borrow_mut();
            commit.closing = true;
            commit.wake_committer();
        }
        poll_fn(|context| {
            let mut commit = inner.commit.borrow_mut();
            if commit.committer_done {
                return Poll::Ready(match &commit.first_failure {
                    Some(error) => Err(error.clone()),
                    None => Ok(()),
                });
            }
            commit.waiters.push(context.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Returns the group-commit statistics gathered since the previous call
    /// and starts new ones. Call it outside the commit path, because the
    /// fresh histograms are allocated here.
    pub fn take_commit_stats(&self) -> CommitStats {
        std::mem::take(&mut *self.inner.commit_stats.borrow_mut())
    }

    /// Returns segment, byte and live-message counts.
    pub fn stats(&self) -> ShardStats {
        let inner = &self.inner;
        let segments = inner.segments.borrow();
        let active_segment_used_bytes = inner
            .active
            .get()
            .and_then(|id| segments.get(&id))
            .map_or(0, |entry| entry.write_offset);
        ShardStats {
            segments: segments.len() as u32,
            bytes_on_disk: segments
                .values()
                .map(|entry| entry.segment.len_bytes())
                .sum(),
            live_records: inner.live.borrow().len() as u64,
            active_segment_used_bytes,
        }
    }

    /// Returns `Err(DiskReserve)` when free disk space, as of the last sync,
    /// is below the reserve. The engine checks this at MAIL or RCPT so it can
    /// reply 452 4.3.1 before accepting data.
    pub fn check_reserve(&self) -> Result<(), AppendError> {
        let free_bytes = self.inner.free_bytes.get();
        if free_bytes < self.inner.reserve_bytes {
            return Err(AppendError::DiskReserve {
                free_bytes,
                reserve_bytes: self.inner.reserve_bytes,
                segment_size_bytes: self.inner.segment_size_bytes,
            });
        }
        Ok(())
    }

    /// Returns the size of the largest record a segment can contain.
    pub fn max_record_bytes(&self) -> u64 {
        self.inner.segment_size_bytes - SEGMENT_HEADER_BYTES as u64
    }

    fn check_open(&self) -> Result<(), AppendError> {
        let commit = self.inner.commit.borrow();
        if commit.closing {
            return Err(AppendError::Closed);
        }
        Ok(())
    }

    fn sealing<'k>(&self, keyring: &'k Option<Keyring>) -> Sealing<'k> {
        match keyring {
            None => Sealing::Clear,
            Some(keyring) => {
                let (key_id, key) = keyring.active_key();
                Sealing::Sealed {
                    key_id,
                    key,
                    nonce: self.inner.nonces.next(),
                }
            }
        }
    }

    /// Replaces the keyring after a key rotation. New records are sealed
    /// with its active key. It must contain every key of the current one,
    /// so that records sealed before stay readable.
    pub fn set_keyring(&self, keyring: Keyring) -> Result<(), String> {
        let mut current = self.inner.keyring.borrow_mut();
        let Some(old) = current.as_ref() else {
            return Err(
                "this spool shard is not encrypted, so it has no keyring to replace".into(),
            );
        };
        let new_ids = keyring.key_ids();
        if let Some(missing) = old.key_ids().into_iter().find(|id| !new_ids.contains(id)) {
            return Err(format!(
                "the new keyring lacks key {missing}, which records in the spool may still need"
            ));
        }
        *current = Some(keyring);
        Ok(())
    }

    /// Copies a built record into the active segment, rolling over to a new
    /// segment when it does not fit.
    fn write_record(&self, bytes: &[u8], space: SpaceUse) -> Result<RecordRef, AppendError> {
        let inner = &self.inner;
        let length = bytes.len() as u64;
        if length > self.max_record_bytes() {
            return Err(AppendError::TooLarge {
                record_bytes: length,
                max_record_bytes: self.max_record_bytes(),
            });
        }
        let fits = |segments: &BTreeMap<u32, SegmentEntry<S::Segment>>, id: u32| {
            segments
                .get(&id)
                .is_some_and(|entry| entry.write_offset + length <= entry.segment.len_bytes())
        };
        let active = match inner.active.get() {
            Some(id) if fits(&inner.segments.borrow(), id) => id,
            _ => self.roll_over(space)?,
        };
        let mut segments = inner.segments.borrow_mut();
        // `roll_over` inserted the active segment, and segments are only
        // removed when they are not active.
        let entry = segments
            .get_mut(&active)
            .expect("active segment is in the map");
        let offset = entry.write_offset;
        entry.segment.write(offset, bytes);
        entry.write_offset += length;
        Ok(RecordRef {
            segment: active,
            offset,
        })
    }

    /// Makes a new segment active, taking the standby segment if the
    /// committer prepared one.
    fn roll_over(&self, space: SpaceUse) -> Result<u32, AppendError> {
        let inner = &self.inner;
        let (id, segment) = match inner.standby.borrow_mut().take() {
            Some(standby) => standby,
            None => create_segment(inner, space)?,
        };
        let previous = inner.active.replace(Some(id));
        inner.segments.borrow_mut().insert(
            id,
            SegmentEntry {
                segment,
                write_offset: SEGMENT_HEADER_BYTES as u64,
                pins: 0,
                live_bytes: 0,
                quarantined: false,
                holds: BTreeSet::new(),
                held_by: 0,
            },
        );
        tracing::info!(
            shard = inner.shard,
            segment = id,
            "spool: new active segment"
        );
        if let Some(previous) = previous {
            self.remove_if_unused(previous);
        }
        Ok(id)
    }

    fn note_dirty(&self, segment: u32) {
        let mut commit = self.inner.commit.borrow_mut();
        if !commit.dirty.contains(&segment) {
            commit.dirty.push(segment);
        }
    }

    fn note_append(&self, segment: u32, record_bytes: u64) -> CommitSeq {
        self.note_dirty(segment);
        let mut commit = self.inner.commit.borrow_mut();
        commit.appended += 1;
        commit.appended_bytes += record_bytes;
        commit.wake_committer();
        CommitSeq {
            seq: commit.appended,
            segment,
        }
    }

    /// Counts one more live message in `segment`, which keeps `bytes` of it
    /// alive.
    fn pin(&self, segment: u32, bytes: u64) {
        if let Some(entry) = self.inner.segments.borrow_mut().get_mut(&segment) {
            entry.pins += 1;
            entry.live_bytes += bytes;
        }
    }

    fn unpin(&self, segment: u32, bytes: u64) {
        if let Some(entry) = self.inner.segments.borrow_mut().get_mut(&segment) {
            // A pin is taken for every reference counted here, so it cannot
            // underflow unless the bookkeeping is broken.
            assert!(
                entry.pins > 0 && entry.live_bytes >= bytes,
                "spool: segment {segment} unpinned more often than pinned"
            );
            entry.pins -= 1;
            entry.live_bytes -= bytes;
        }
        self.remove_if_unused(segment);
    }

    fn remove_if_unused(&self, segment: u32) {
        remove_if_unused(&self.inner, segment);
    }

    /// Keeps `held` until `holder` is deleted. Does nothing when either is
    /// gone or they are the same segment.
    fn hold(&self, holder: u32, held: u32) {
        if holder == held {
            return;
        }
        let mut segments = self.inner.segments.borrow_mut();
        if !segments.contains_key(&held) {
            return;
        }
        let added = segments
            .get_mut(&holder)
            .is_some_and(|entry| entry.holds.insert(held));
        if added && let Some(entry) = segments.get_mut(&held) {
            entry.held_by += 1;
        }
    }
}

/// Deletes `segment` if nothing needs it, then every segment that only its
/// hold kept.
pub(crate) fn remove_if_unused<S: Storage>(inner: &Inner<S>, segment: u32) {
    let mut pending = vec![segment];
    while let Some(segment) = pending.pop() {
        if inner.active.get() == Some(segment) {
            continue;
        }
        let mut segments = inner.segments.borrow_mut();
        let unused = segments
            .get(&segment)
            .is_some_and(|entry| entry.pins == 0 && entry.held_by == 0 && !entry.quarantined);
        if !unused {
            continue;
        }
        // Checked above.
        let entry = segments.remove(&segment).expect("segment checked above");
        for held in &entry.holds {
            if let Some(held_entry) = segments.get_mut(held) {
                held_entry.held_by -= 1;
                pending.push(*held);
            }
        }
        drop(segments);
        delete_segment_file(inner, segment);
    }
}

fn delete_segment_file<S: Storage>(inner: &Inner<S>, segment: u32) {
    match inner.storage.remove(segment) {
        Ok(()) => tracing::info!(
            shard = inner.shard,
            segment,
            "spool: deleted segment with no live messages"
        ),
        Err(error) => tracing::error!(
            shard = inner.shard,
            segment,
            path = %inner.storage.describe(segment),
            %error,
            "spool: deleting an unused segment failed; it will be deleted at the next open"
        ),
    }
}

fn open_error(record: RecordRef, error: OpenError) -> ReadError {
    match error {
        OpenError::NoKeyring => ReadError::NoKeyring { record },
        OpenError::MissingKey(key_id) => ReadError::MissingKey { record, key_id },
        OpenError::Unauthentic => ReadError::Unauthentic { record },
        OpenError::Invalid(reason) => ReadError::Invalid { record, reason },
    }
}

/// What a new segment is needed for, which decides whether the disk reserve
/// applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SpaceUse {
    /// A new message: the segment must leave `reserve_bytes` free.
    NewMessage,
    /// Outcomes and compaction copies of messages already acknowledged. The
    /// reserve exists so that these can still be written when new mail is
    /// refused, so only the segment itself must fit.
    StateChange,
}

/// Creates the next segment file with its header, after checking the disk
/// reserve for `space`.
fn create_segment<S: Storage>(
    inner: &Inner<S>,
    space: SpaceUse,
) -> Result<(u32, Rc<S::Segment>), AppendError> {
    let header = next_segment_header(inner, space)?;
    let id = header.segment;
    let segment = inner
        .storage
        .create(id, inner.segment_size_bytes, &header.encode())
        .map_err(|source| segment_creation_failed(inner, id, source))?;
    inner.next_segment.set(id + 1);
    Ok((id, Rc::new(segment)))
}

/// Checks the disk reserve for `space` and returns the header of the next
/// segment. The caller advances `next_segment` once it uses the id.
fn next_segment_header<S: Storage>(
    inner: &Inner<S>,
    space: SpaceUse,
) -> Result<SegmentHeader, AppendError> {
    let free_bytes = inner
        .storage
        .free_bytes()
        .map_err(|source| AppendError::Io {
            operation: "checking free disk space",
            source,
        })?;
    inner.free_bytes.set(free_bytes);
    let reserve_bytes = match space {
        SpaceUse::NewMessage => inner.reserve_bytes,
        SpaceUse::StateChange => 0,
    };
    if free_bytes < reserve_bytes.saturating_add(inner.segment_size_bytes) {
        return Err(AppendError::DiskReserve {
            free_bytes,
            reserve_bytes: inner.reserve_bytes,
            segment_size_bytes: inner.segment_size_bytes,
        });
    }
    let id = inner.next_segment.get();
    if id == u32::MAX {
        return Err(AppendError::Io {
            operation: "choosing a segment id",
            source: std::io::Error::other(
                "segment ids are exhausted; move the spool aside and restart",
            ),
        });
    }
    Ok(SegmentHeader {
        shard: inner.shard,
        segment: id,
        size_bytes: inner.segment_size_bytes,
        created_at_us: now_us(),
    })
}

/// Logs a failed segment creation and returns it as an append error.
fn segment_creation_failed<S: Storage>(
    inner: &Inner<S>,
    segment: u32,
    source: std::io::Error,
) -> AppendError {
    tracing::error!(
        shard = inner.shard,
        segment,
        path = %inner.storage.describe(segment),
        error = %source,
        "spool: creating a segment failed; check free space and that the file system supports fallocate"
    );
    AppendError::Io {
        operation: "creating a segment",
        source,
    }
}
