//! Per-core spool compaction.
//!
//! Each core owns its spool segments, so each core compacts its own. A
//! segment kept alive by a few long-deferred messages is found through the
//! spool's live-byte accounting, its live messages are copied into the
//! active segment, and the queue is re-keyed to the new locations before the
//! task yields. The spool deletes the old segment once the copies are
//! durable.
//!
//! Only messages with no recipient `scheduled` are moved. Such a message has
//! no work item in a ready queue and no delivery in flight. Its old
//! `RecordRef` is then only in `Queue::messages` and the deferral heap, and
//! `Queue::relocate` re-keys both. A message with a delivery in flight is
//! skipped and moved on a later pass.
//!
//! The task runs in its own task queue with a quarter of the default shares
//! and copies at most [`BUDGET_BYTES`] per tick, so deliveries and ingress on
//! the same core are delayed by a few milliseconds at most.

use std::rc::Rc;
use std::time::Duration;

use caduceus_spool::RecordRef;
use glommio::{Latency, Shares};

use super::Shard;

/// The pause between compaction passes while nothing is worth compacting.
const IDLE_TICK: Duration = Duration::from_millis(500);

/// The pause between compaction passes while there is work, so that
/// deliveries run in between.
const BUSY_TICK: Duration = Duration::from_millis(20);

/// The maximum message bytes copied per pass. Copying and sealing 1 MiB takes
/// about a millisecond on one core (estimate), which bounds the stall a
/// pass causes.
const BUDGET_BYTES: u64 = 1024 * 1024;

/// The maximum candidate segments tried per pass. Each try scans the
/// shard's live messages once, so this bounds a pass's cost when candidates
/// hold only messages that cannot move yet, such as mail for a held
/// destination, which waits in a ready queue.
const MAX_CANDIDATES_PER_PASS: usize = 4;

/// Starts the compaction task of one core, in its own task queue. The
/// returned handle cancels it.
pub(super) fn spawn(shard: &Rc<Shard>) -> glommio::task::JoinHandle<()> {
    let queue = glommio::executor().create_task_queue(
        Shares::Static(250),
        Latency::NotImportant,
        "compaction",
    );
    match glommio::spawn_local_into(run(shard.clone()), queue) {
        Ok(task) => task.detach(),
        Err(error) => {
            tracing::warn!(
                core = shard.index,
                %error,
                "compaction: own task queue unavailable; running in the default queue"
            );
            glommio::spawn_local(run(shard.clone())).detach()
        }
    }
}

async fn run(shard: Rc<Shard>) {
    // Rotates the first candidate tried while passes move nothing, so that
    // segments whose messages cannot move do not hide the others.
    let mut rotation = 0usize;
    loop {
        let busy = compact_pass(&shard, rotation).await;
        if !busy {
            rotation = rotation.wrapping_add(MAX_CANDIDATES_PER_PASS);
        }
        glommio::timer::sleep(if busy { BUSY_TICK } else { IDLE_TICK }).await;
    }
}

/// Compacts up to [`MAX_CANDIDATES_PER_PASS`] candidate segments, fewest
/// live bytes first after skipping `rotation` of them, until the pass has
/// copied [`BUDGET_BYTES`]. Returns true when it moved anything.
async fn compact_pass(shard: &Rc<Shard>, rotation: usize) -> bool {
    if shard.draining.get() {
        return false;
    }
    let mut candidates = shard.spool.compaction_candidates();
    if candidates.is_empty() {
        return false;
    }
    let start = rotation % candidates.len();
    candidates.rotate_left(start);
    candidates.truncate(MAX_CANDIDATES_PER_PASS);
    // A copy is a relocated record, which the audit start check skips, so
    // the records of the messages to copy must be durable first.
    if let Err(error) = crate::audit::sync_all().await {
        tracing::warn!(core = shard.index, %error, "compaction: waiting for a later pass");
        return false;
    }

    let mut remaining_bytes = BUDGET_BYTES;
    let mut moved_any = false;
    for candidate in candidates {
        let relocation = {
            let queue = shard.queue.borrow();
            shard
                .spool
                .relocate(candidate.segment, remaining_bytes, |record| {
                    is_movable(&queue, record)
                })
        };
        let relocation = match relocation {
            Ok(relocation) => relocation,
            Err(error) => {
                // Every append fails for the same reason now (disk reserve,
                // I/O error), so the other candidates would fail too.
                tracing::warn!(
                    core = shard.index,
                    segment = candidate.segment,
                    %error,
                    "compaction: copying live messages failed; retrying on a later pass"
                );
                return false;
            }
        };
        if relocation.moved().is_empty() {
            // Every message there has a delivery in flight or is final and
            // about to be released; a later pass tries again.
            continue;
        }
        // Re-key before yielding, so no delivery can start from an old
        // location that the spool no longer accepts outcomes for.
        shard.queue.borrow_mut().relocate(relocation.moved());
        moved_any = true;
        let copied_bytes = relocation.copied_bytes();
        let moved = relocation.moved().len();
        if let Err(error) = shard.spool.complete_relocation(relocation).await {
            tracing::error!(
                core = shard.index,
                segment = candidate.segment,
                %error,
                "compaction: the copies did not become durable; the old segment is kept"
            );
            return true;
        }
        tracing::info!(
            core = shard.index,
            segment = candidate.segment,
            moved,
            copied_bytes,
            live_bytes = candidate.live_bytes,
            size_bytes = candidate.size_bytes,
            "compaction: moved live messages out of a mostly unused segment"
        );
        remaining_bytes = remaining_bytes.saturating_sub(copied_bytes);
        if remaining_bytes == 0 {
            break;
        }
    }
    moved_any
}

/// Returns true when the message is queued and none of its recipients sits
/// in a ready queue or has a delivery in flight. A message missing from the
/// queue is still between its append and its `250`, and stays put.
fn is_movable(queue: &super::queue::Queue, record: RecordRef) -> bool {
    queue
        .messages
        .get(&record)
        .is_some_and(|message| !message.scheduled.iter().any(|scheduled| *scheduled))
}

#[cfg(test)]
mod tests {
    use std::cmp::Reverse;
    use std::rc::Rc;

    use caduceus_policy::{Category, Lane};
    use caduceus_spool::{Envelope, MessageId, Recipient, RecipientState, RecordRef};

    use super::is_movable;
    use crate::shard::queue::{Queue, QueuedMessage};

    fn envelope(domains: &[&str]) -> Rc<Envelope> {
        Rc::new(Envelope {
            message_id: MessageId([7; 16]),
            received_at_us: 1,
            expires_at_us: u64::MAX,
            lane: Lane::Bulk,
            category: Category::Care,
            sender: "news@care.clinic.test".into(),
            envid: None,
            ret: None,
            body_8bit: false,
            smtputf8: false,
            peer_uid: 0,
            peer_gid: 0,
            peer_pid: 0,
            recipients: domains
                .iter()
                .map(|domain| Recipient {
                    address: format!("member@{domain}"),
                    domain: (*domain).into(),
                    notify: 0,
                    orcpt: None,
                })
                .collect(),
        })
    }

    fn at(segment: u32, offset: u64) -> RecordRef {
        RecordRef { segment, offset }
    }

    #[test]
    fn relocate_rekeys_message_and_deferrals() {
        let mut queue = Queue::default();
        let now_us = 1_000;
        let deferred = RecipientState::Pending {
            attempts: 2,
            next_attempt_us: 5_000,
        };
        let old = at(1, 64);
        let ready = queue.insert(
            old,
            QueuedMessage::new(
                envelope(&["slow.test", "other.test"]),
                vec![deferred, RecipientState::Delivered],
            ),
            now_us,
        );
        assert!(ready.is_empty());
        assert!(is_movable(&queue, old));

        let new = at(9, 4096);
        queue.relocate(&[(old, new)]);
        assert!(!queue.messages.contains_key(&old));
        assert_eq!(queue.messages[&new].states[0], deferred);
        let records: Vec<RecordRef> = queue
            .deferrals
            .iter()
            .map(|Reverse(deferral)| deferral.record)
            .collect();
        assert_eq!(records, vec![new]);

        // The deferral now makes the new location ready.
        let domains = queue.release_due(5_000);
        assert_eq!(domains.len(), 1);
        let item = &queue.destinations["slow.test"].ready[0];
        assert_eq!(item.record, new);
        assert_eq!(item.recipients, vec![0]);
        // A recipient in a ready queue pins the message where it is.
        assert!(!is_movable(&queue, new));
    }

    #[test]
    fn message_between_append_and_ack_is_not_movable() {
        let queue = Queue::default();
        assert!(!is_movable(&queue, at(3, 64)));
    }
}
