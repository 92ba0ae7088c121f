//! The group committer gathers appends into batches and makes each batch
//! durable with fdatasync.
//!
//! Up to [`MAX_COMMITS_IN_FLIGHT`] batches sync at once. While one batch's
//! fdatasync runs, appends keep going and gather into the next batch, which
//! may start its own fdatasync before the first completes. A batch counts as
//! durable only once it and every batch started before it have completed,
//! so `synced` only grows and covers a prefix of the append order.
//!
//! A failed fdatasync retires its segment: no append goes there again, and
//! every record in it that no earlier successful sync covered is reported
//! as failed. Other segments are unaffected, so the shard keeps accepting.

use std::collections::{BTreeMap, VecDeque};
use std::future::poll_fn;
use std::io;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::Instant;

use super::{Inner, SpaceUse, next_segment_header, remove_if_unused, segment_creation_failed};
use crate::CommitSeq;
use crate::error::CommitError;
use crate::storage::{Segment, Storage};

/// The maximum number of commit batches whose fdatasync calls run at the
/// same time. Overlapping syncs shorten the wait of appends that arrive
/// while a sync runs. On the virtual disk of docs/benchmarks.md, two
/// threads calling `fdatasync` on one file completed 5 to 15 times as many
/// syncs per second as one thread. NOTE: 4 is an estimate, not tuned: four
/// threads there added about 40 % over two, and eight about 55 %.
pub(crate) const MAX_COMMITS_IN_FLIGHT: usize = 4;

#[derive(Default)]
pub(super) struct CommitState {
    /// The sequence number of the latest append.
    pub(super) appended: u64,
    /// The latest sequence number covered by a started sync.
    pub(super) sync_started: u64,
    /// The latest sequence number such that every batch up to it has
    /// completed its sync. Records of failed segments are excluded by
    /// `failed_segments`, not by this number.
    pub(super) synced: u64,
    /// Bytes of every record appended since the shard opened.
    pub(super) appended_bytes: u64,
    /// `appended_bytes` when the latest sync started.
    pub(super) sync_started_bytes: u64,
    /// Started batches in start order, the oldest first.
    pub(super) in_flight: VecDeque<InFlightBatch>,
    /// Segments retired after a failed sync, by segment id.
    pub(super) failed_segments: BTreeMap<u32, FailedSegment>,
    /// The first sync failure since the shard opened, which `close` returns.
    pub(super) first_failure: Option<CommitError>,
    /// Segments written since the last sync started.
    pub(super) dirty: Vec<u32>,
    pub(super) waiters: Vec<Waker>,
    pub(super) committer: Option<Waker>,
    pub(super) closing: bool,
    pub(super) committer_done: bool,
}

/// One batch whose fdatasync calls were started.
pub(super) struct InFlightBatch {
    /// The latest sequence number in the batch.
    target: u64,
    records: u64,
    bytes: u64,
    /// True once every sync of the batch has returned.
    done: bool,
    /// True when at least one of the batch's syncs failed.
    failed: bool,
}

/// A segment whose fdatasync failed.
pub(super) struct FailedSegment {
    /// Records of the segment up to this sequence number were covered by an
    /// earlier successful sync. Later ones may be lost.
    durable_through: u64,
    reason: String,
}

impl CommitState {
    pub(super) fn pending(&self) -> u64 {
        self.appended - self.sync_started
    }

    pub(super) fn wake_waiters(&mut self) {
        for waker in self.waiters.drain(..) {
            waker.wake();
        }
    }

    pub(super) fn wake_committer(&mut self) {
        if let Some(waker) = self.committer.take() {
            waker.wake();
        }
    }

    /// Returns `Ok` once a completed sync covers `seq`, `Err` if its segment
    /// failed first or the committer stopped, and `None` until one is known.
    fn durability(&self, seq: CommitSeq) -> Option<Result<(), CommitError>> {
        if let Some(failed) = self.failed_segments.get(&seq.segment)
            && seq.seq > failed.durable_through
        {
            return Some(Err(CommitError::SyncFailed {
                segment: seq.segment,
                reason: failed.reason.clone(),
            }));
        }
        if self.synced >= seq.seq {
            return Some(Ok(()));
        }
        if self.committer_done {
            return Some(Err(CommitError::Closed));
        }
        None
    }
}

pub(super) async fn wait_durable<S: Storage>(
    inner: &Inner<S>,
    seq: CommitSeq,
) -> Result<(), CommitError> {
    poll_fn(|context| {
        let mut commit = inner.commit.borrow_mut();
        if let Some(result) = commit.durability(seq) {
            return Poll::Ready(result);
        }
        commit.waiters.push(context.waker().clone());
        Poll::Pending
    })
    .await
}

/// Runs the group commit loop. It starts one batch of syncs, one fdatasync
/// per dirty segment, whenever a batch has gathered and fewer than
/// [`MAX_COMMITS_IN_FLIGHT`] batches are running. It exits once the shard
/// closes and every batch has completed.
pub(super) async fn run_committer<S: Storage + 'static>(inner: Rc<Inner<S>>) {
    loop {
        let start = poll_fn(|context| {
            let mut commit = inner.commit.borrow_mut();
            let slot_free = commit.in_flight.len() < MAX_COMMITS_IN_FLIGHT;
            if commit.pending() > 0 && slot_free {
                return Poll::Ready(true);
            }
            if commit.closing && commit.pending() == 0 && commit.in_flight.is_empty() {
                return Poll::Ready(false);
            }
            commit.committer = Some(context.waker().clone());
            Poll::Pending
        })
        .await;
        if !start {
            break;
        }

        gather_batch(&inner).await;
        start_batch(&inner);
        refresh_free_bytes(&inner);
        prepare_standby(&inner);
    }
    let mut commit = inner.commit.borrow_mut();
    commit.committer_done = true;
    commit.wake_waiters();
}

/// Waits up to `commit_max_wait` for `commit_max_batch` appends to gather.
async fn gather_batch<S: Storage>(inner: &Inner<S>) {
    let batch = u64::from(inner.commit_max_batch);
    if inner.commit_max_wait.is_zero() || inner.commit.borrow().pending() >= batch {
        return;
    }
    let started = Instant::now();
    let full = poll_fn(|context| {
        let mut commit = inner.commit.borrow_mut();
        if commit.pending() >= batch || commit.closing {
            return Poll::Ready(());
        }
        commit.committer = Some(context.waker().clone());
        Poll::Pending
    });
    futures_lite::future::or(full, glommio::timer::sleep(inner.commit_max_wait)).await;
    inner.commit.borrow_mut().committer = None;
    tracing::trace!(
        shard = inner.shard,
        waited_us = started.elapsed().as_micros() as u64,
        "spool: commit batch gathered"
    );
}

/// Takes every append since the previous batch as a new batch and spawns
/// the task that syncs its segments.
fn start_batch<S: Storage + 'static>(inner: &Rc<Inner<S>>) {
    let (target, dirty) = {
        let mut commit = inner.commit.borrow_mut();
        let batch = InFlightBatch {
            target: commit.appended,
            records: commit.appended - commit.sync_started,
            bytes: commit.appended_bytes - commit.sync_started_bytes,
            done: false,
            failed: false,
        };
        commit.sync_started = commit.appended;
        commit.sync_started_bytes = commit.appended_bytes;
        commit.in_flight.push_back(batch);
        (commit.appended, std::mem::take(&mut commit.dirty))
    };
    let handles: Vec<(u32, Rc<S::Segment>)> = {
        let segments = inner.segments.borrow();
        dirty
            .iter()
            .filter_map(|id| segments.get(id).map(|entry| (*id, entry.segment.clone())))
            .collect()
    };
    glommio::spawn_local(sync_batch(inner.clone(), target, handles)).detach();
}

/// Syncs every segment of one batch, retires the segments whose sync
/// failed, and then completes the batch.
async fn sync_batch<S: Storage>(
    inner: Rc<Inner<S>>,
    target: u64,
    handles: Vec<(u32, Rc<S::Segment>)>,
) {
    let started = Instant::now();
    let mut failed = false;
    // Every segment is synced even after one fails, because the batch's
    // records in the other segments are covered by no other sync.
    for (id, segment) in handles {
        let call_started = Instant::now();
        let result = segment.sync().await;
        let latency_us = call_started.elapsed().as_micros() as u64;
        inner
            .commit_stats
            .borrow_mut()
            .record_fsync(latency_us, result.is_ok());
        if let Err(error) = result {
            failed = true;
            retire_failed_segment(&inner, id, &error);
        }
    }
    tracing::trace!(
        shard = inner.shard,
        seq = target,
        sync_us = started.elapsed().as_micros() as u64,
        failed,
        "spool: commit batch synced"
    );
    complete_batch(&inner, target, failed);
}

/// Marks the batch ending at `target` as done, then advances `synced` over
/// every done batch at the front, so it never passes a batch still running.
fn complete_batch<S: Storage>(inner: &Inner<S>, target: u64, failed: bool) {
    let mut commit = inner.commit.borrow_mut();
    if let Some(batch) = commit
        .in_flight
        .iter_mut()
        .find(|batch| batch.target == target)
    {
        batch.done = true;
        batch.failed = failed;
    }
    while commit.in_flight.front().is_some_and(|batch| batch.done) {
        // Checked by the loop condition.
        let batch = commit.in_flight.pop_front().expect("front batch exists");
        commit.synced = batch.target;
        if !batch.failed && batch.records > 0 {
            inner
                .commit_stats
                .borrow_mut()
                .record_commit(batch.records, batch.bytes);
        }
    }
    commit.wake_waiters();
    commit.wake_committer();
}

/// Stops appends to `segment` after its fdatasync failed, and fails every
/// record in it that no completed sync covers.
///
/// After a failed fdatasync Linux may have marked the unwritten pages clean,
/// so a later successful sync of the same file does not prove that they
/// reached the disk. Records written to the segment after the failure could
/// share such a page, so the segment takes no more appends: the next append
/// rolls over to a fresh segment. Records that an earlier sync covered stay
/// valid, and the segment is deleted as usual once nothing needs them.
fn retire_failed_segment<S: Storage>(inner: &Inner<S>, segment: u32, error: &io::Error) {
    tracing::error!(
        shard = inner.shard,
        segment,
        path = %inner.storage.describe(segment),
        %error,
        "spool: fdatasync failed; the segment takes no more appends, and messages appended to it since its last good sync get 451 4.3.0. Check the kernel log (dmesg) for I/O errors and the disk for free space"
    );
    {
        let mut commit = inner.commit.borrow_mut();
        let durable_through = commit.synced;
        let reason = error.to_string();
        commit
            .failed_segments
            .entry(segment)
            .or_insert_with(|| FailedSegment {
                durable_through,
                reason: reason.clone(),
            });
        if commit.first_failure.is_none() {
            commit.first_failure = Some(CommitError::SyncFailed { segment, reason });
        }
        commit.wake_waiters();
    }
    if inner.active.get() == Some(segment) {
        inner.active.set(None);
    }
    remove_if_unused(inner, segment);
}

fn refresh_free_bytes<S: Storage>(inner: &Inner<S>) {
    match inner.storage.free_bytes() {
        Ok(free_bytes) => inner.free_bytes.set(free_bytes),
        Err(error) => {
            tracing::warn!(shard = inner.shard, %error, "spool: checking free disk space failed")
        }
    }
}

/// The shortest time between two warnings that the standby segment cannot
/// be prepared.
const STANDBY_WARNING_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// Starts creating the next segment ahead of time, so a roll-over in the
/// append path does not wait for file creation, fallocate and syncs.
fn prepare_standby<S: Storage + 'static>(inner: &Rc<Inner<S>>) {
    if inner.standby.borrow().is_some() || inner.standby_pending.get() {
        return;
    }
    // Prepare only once the active segment is more than half full, so an idle
    // shard does not hold two preallocated segments.
    let active_half_full = inner.active.get().is_some_and(|id| {
        inner
            .segments
            .borrow()
            .get(&id)
            .is_some_and(|entry| entry.write_offset > entry.segment.len_bytes() / 2)
    });
    if !active_half_full {
        return;
    }
    let header = match next_segment_header(inner, SpaceUse::NewMessage) {
        Ok(header) => header,
        Err(error) => {
            // This fails again after every sync while the disk stays full,
            // so the warning waits STANDBY_WARNING_INTERVAL between lines.
            let now = Instant::now();
            let due = inner
                .standby_warned_at
                .get()
                .is_none_or(|last| now.duration_since(last) >= STANDBY_WARNING_INTERVAL);
            if due {
                inner.standby_warned_at.set(Some(now));
                tracing::warn!(shard = inner.shard, %error, "spool: preparing the next segment failed; will retry after each sync, and this warning repeats at most every 10 s");
            }
            return;
        }
    };
    // The id is taken now, so a roll-over that cannot wait for this segment
    // creates a later one, and segment ids keep the order of their records.
    let id = header.segment;
    inner.next_segment.set(id + 1);
    inner.standby_pending.set(true);
    let inner = inner.clone();
    glommio::spawn_local(async move {
        let created = inner
            .storage
            .create_ahead(id, inner.segment_size_bytes, header.encode().to_vec())
            .await;
        inner.standby_pending.set(false);
        let segment = match created {
            Ok(segment) => segment,
            Err(source) => {
                segment_creation_failed(&inner, id, source);
                return;
            }
        };
        // A roll-over while this segment was being created made a later
        // segment active, so records in this one would sort before older
        // records. It holds only its header and can go.
        if inner.next_segment.get() != id + 1 {
            drop(segment);
            if let Err(error) = inner.storage.remove(id) {
                tracing::warn!(shard = inner.shard, segment = id, %error, "spool: removing an unused prepared segment failed");
            }
            return;
        }
        *inner.standby.borrow_mut() = Some((id, Rc::new(segment)));
    })
    .detach();
}
