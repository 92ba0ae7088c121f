//! The group committer: it gathers appends into batches and makes each
//! batch durable with fdatasync.

use std::future::poll_fn;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::Instant;

use super::{Inner, SpaceUse, create_segment};
use crate::error::CommitError;
use crate::storage::{Segment, Storage};

#[derive(Default)]
pub(super) struct CommitState {
    /// The sequence number of the latest append.
    pub(super) appended: u64,
    /// The latest sequence number covered by a started sync.
    pub(super) sync_started: u64,
    /// The latest sequence number covered by a completed sync.
    pub(super) synced: u64,
    /// Bytes of every record appended since the shard opened.
    pub(super) appended_bytes: u64,
    /// `appended_bytes` when the latest sync started.
    pub(super) sync_started_bytes: u64,
    pub(super) failed: Option<CommitError>,
    /// Segments written since the last sync started.
    pub(super) dirty: Vec<u32>,
    pub(super) waiters: Vec<Waker>,
    pub(super) committer: Option<Waker>,
    pub(super) closing: bool,
    pub(super) committer_done: bool,
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
}

pub(super) async fn wait_durable<S: Storage>(
    inner: &Inner<S>,
    seq: u64,
) -> Result<(), CommitError> {
    poll_fn(|context| {
        let mut commit = inner.commit.borrow_mut();
        if commit.synced >= seq {
            return Poll::Ready(Ok(()));
        }
        if let Some(error) = &commit.failed {
            return Poll::Ready(Err(error.clone()));
        }
        if commit.committer_done {
            return Poll::Ready(Err(CommitError::Closed));
        }
        commit.waiters.push(context.waker().clone());
        Poll::Pending
    })
    .await
}

/// Runs the group commit loop: one fdatasync per dirty segment covers every
/// append made before it started.
pub(super) async fn run_committer<S: Storage>(inner: Rc<Inner<S>>) {
    loop {
        // Sleep until there is something to sync or the shard closes.
        poll_fn(|context| {
            let mut commit = inner.commit.borrow_mut();
            if commit.pending() > 0 || commit.closing {
                return Poll::Ready(());
            }
            commit.committer = Some(context.waker().clone());
            Poll::Pending
        })
        .await;

        let (closing, pending, failed) = {
            let commit = inner.commit.borrow();
            (commit.closing, commit.pending(), commit.failed.is_some())
        };
        if failed || (closing && pending == 0) {
            if closing {
                break;
            }
            // After a failed sync no append is accepted, so wait for close.
            inner.commit.borrow_mut().committer = None;
            poll_fn(|context| {
                let mut commit = inner.commit.borrow_mut();
                if commit.closing {
                    return Poll::Ready(());
                }
                commit.committer = Some(context.waker().clone());
                Poll::Pending
            })
            .await;
            break;
        }

        gather_batch(&inner).await;
        sync_dirty(&inner).await;
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

async fn sync_dirty<S: Storage>(inner: &Inner<S>) {
    let (target, batch_records, batch_bytes, dirty) = {
        let mut commit = inner.commit.borrow_mut();
        let batch_records = commit.appended - commit.sync_started;
        let batch_bytes = commit.appended_bytes - commit.sync_started_bytes;
        commit.sync_started = commit.appended;
        commit.sync_started_bytes = commit.appended_bytes;
        (
            commit.appended,
            batch_records,
            batch_bytes,
            std::mem::take(&mut commit.dirty),
        )
    };
    let handles: Vec<(u32, Rc<S::Segment>)> = {
        let segments = inner.segments.borrow();
        dirty
            .iter()
            .filter_map(|id| segments.get(id).map(|entry| (*id, entry.segment.clone())))
            .collect()
    };
    let started = Instant::now();
    let mut failure = None;
    for (id, segment) in handles {
        let call_started = Instant::now();
        let result = segment.sync().await;
        let latency_us = call_started.elapsed().as_micros() as u64;
        inner
            .commit_stats
            .borrow_mut()
            .record_fsync(latency_us, result.is_ok());
        if let Err(error) = result {
            failure = Some((id, error));
            break;
        }
    }
    let mut commit = inner.commit.borrow_mut();
    match failure {
        None => {
            commit.synced = target;
            if batch_records > 0 {
                inner
                    .commit_stats
                    .borrow_mut()
                    .record_commit(batch_records, batch_bytes);
            }
            tracing::trace!(
                shard = inner.shard,
                seq = target,
                sync_us = started.elapsed().as_micros() as u64,
                "spool: commit synced"
            );
        }
        Some((segment, error)) => {
            tracing::error!(
                shard = inner.shard,
                segment,
                path = %inner.storage.describe(segment),
                %error,
                "spool: fdatasync failed; the shard rejects appends until restarted. Check the kernel log (dmesg) for I/O errors and the disk for free space, then restart the engine"
            );
            commit.failed = Some(CommitError::SyncFailed {
                segment,
                reason: error.to_string(),
            });
        }
    }
    commit.wake_waiters();
}

fn refresh_free_bytes<S: Storage>(inner: &Inner<S>) {
    match inner.storage.free_bytes() {
        Ok(free_bytes) => inner.free_bytes.set(free_bytes),
        Err(error) => {
            tracing::warn!(shard = inner.shard, %error, "spool: checking free disk space failed")
        }
    }
}

/// Creates the next segment ahead of time, so a roll-over in the append path
/// does not wait for file creation and fallocate.
fn prepare_standby<S: Storage>(inner: &Inner<S>) {
    if inner.standby.borrow().is_some() || inner.commit.borrow().failed.is_some() {
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
    match create_segment(inner, SpaceUse::NewMessage) {
        Ok(standby) => *inner.standby.borrow_mut() = Some(standby),
        Err(error) => {
            tracing::warn!(shard = inner.shard, %error, "spool: preparing the next segment failed; will retry after the next sync")
        }
    }
}
