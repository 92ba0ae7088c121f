//! Compaction over the fault-injecting storage: relocated copies carry each
//! recipient's state, the old segment goes only once the copies are durable,
//! and a power cut at any point recovers every live message exactly once.

mod common;

use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use caduceus_spool::sim::{SimDisk, SimStorage};
use caduceus_spool::{
    AppendError, MessageId, Outcome, RecipientState, RecordRef, RecoveredMessage, Shard,
    SpoolOptions,
};
use common::{body, envelope, run, test_keyring};

const SEGMENT_BYTES: u64 = 64 * 1024;

fn sim_options(encrypted: bool) -> SpoolOptions {
    SpoolOptions {
        dir: "/nonexistent".into(),
        shard: 2,
        segment_size_bytes: SEGMENT_BYTES,
        commit_max_wait: Duration::from_micros(100),
        commit_max_batch: 8,
        keyring: encrypted.then(|| test_keyring(7, 0x33)),
        reserve_bytes: 0,
        list_appends: Default::default(),
    }
}

async fn open(disk: &SimDisk, encrypted: bool) -> (Rc<Shard<SimStorage>>, Vec<RecoveredMessage>) {
    let (shard, messages, report) =
        Shard::open_with_storage(sim_options(encrypted), disk.storage())
            .await
            .unwrap();
    assert!(report.quarantined.is_empty(), "{:?}", report.quarantined);
    (shard, messages)
}

/// What the test expects recovery to return for one message.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Expected {
    body: Vec<u8>,
    states: Vec<RecipientState>,
}

/// Fills segment 1 with 20 messages of 3 recipients, and makes all but
/// three of them final. The three survivors have one delivered, one
/// deferred and one untouched recipient. Returns the survivors by message
/// id, and the first segment after the filled one.
async fn fill_mostly_dead_segment(
    shard: &Shard<SimStorage>,
) -> (BTreeMap<MessageId, (RecordRef, Expected)>, u32) {
    let mut survivors = BTreeMap::new();
    let mut last_seq = None;
    for tag in 0..20u32 {
        let envelope = envelope(tag, 3);
        let body = body(tag, 800);
        let (record, seq) = shard.append_message(&envelope, &body).unwrap();
        assert_eq!(
            record.segment, 1,
            "the test needs every message in segment 1"
        );
        last_seq = Some(seq);
        if tag % 7 == 3 {
            shard
                .append_outcome(record, 0, Outcome::Delivered, 1)
                .unwrap();
            shard
                .append_outcome(
                    record,
                    1,
                    Outcome::Deferred {
                        next_attempt_us: 1_800_000_000_000_000 + u64::from(tag),
                    },
                    2 + tag,
                )
                .unwrap();
            let states = vec![
                RecipientState::Delivered,
                RecipientState::Pending {
                    attempts: 2 + tag,
                    next_attempt_us: 1_800_000_000_000_000 + u64::from(tag),
                },
                RecipientState::Pending {
                    attempts: 0,
                    next_attempt_us: 0,
                },
            ];
            survivors.insert(envelope.message_id, (record, Expected { body, states }));
        } else {
            for index in 0..3 {
                last_seq = Some(
                    shard
                        .append_outcome(record, index, Outcome::Delivered, 1)
                        .unwrap(),
                );
            }
        }
        // The deliveries' outcomes are durable before the release, as the
        // engine's contract requires.
        if tag % 7 != 3 {
            shard.durable(last_seq.unwrap()).await.unwrap();
            shard.release(record);
        }
    }
    shard.durable(last_seq.unwrap()).await.unwrap();
    // One more message rolls the active segment over, so segment 1 is sealed.
    let (record, seq) = shard
        .append_message(&envelope(99, 1), &body(99, 45_000))
        .unwrap();
    shard.durable(seq).await.unwrap();
    assert_ne!(record.segment, 1);
    let seq = shard
        .append_outcome(record, 0, Outcome::Delivered, 1)
        .unwrap();
    shard.durable(seq).await.unwrap();
    shard.release(record);
    (survivors, record.segment)
}

fn by_id(messages: &[RecoveredMessage]) -> BTreeMap<MessageId, &RecoveredMessage> {
    let mut map = BTreeMap::new();
    for message in messages {
        let previous = map.insert(message.envelope.message_id, message);
        assert!(
            previous.is_none(),
            "message {} recovered twice, at {} and {}",
            message.envelope.message_id,
            previous.map_or_else(String::new, |found| found.record.to_string()),
            message.record
        );
    }
    map
}

fn assert_recovered_once(
    shard: &Shard<SimStorage>,
    recovered: &[RecoveredMessage],
    expected: &BTreeMap<MessageId, (RecordRef, Expected)>,
    label: &str,
) {
    let found = by_id(recovered);
    assert_eq!(found.len(), expected.len(), "{label}: live message count");
    for (id, (_, expected)) in expected {
        let message = found
            .get(id)
            .unwrap_or_else(|| panic!("{label}: lost message {id}"));
        assert_eq!(message.states, expected.states, "{label}: states of {id}");
        let stored = shard.read_message(message.record).unwrap();
        assert_eq!(stored.body, expected.body, "{label}: body of {id}");
        assert_eq!(stored.envelope.message_id, *id);
    }
}

#[test]
fn mostly_dead_segment_is_a_candidate() {
    let disk = SimDisk::new();
    run(async {
        let (shard, _) = open(&disk, true).await;
        let (survivors, active) = fill_mostly_dead_segment(&shard).await;
        let usage = shard.segment_usage();
        let first = usage.iter().find(|usage| usage.segment == 1).unwrap();
        assert_eq!(first.live_messages, survivors.len() as u32);
        assert!(first.live_bytes > 0);
        assert!(first.worth_compacting(), "{first:?}");
        let current = usage.iter().find(|usage| usage.segment == active).unwrap();
        assert!(current.active);
        assert!(!current.worth_compacting());
        let candidates = shard.compaction_candidates();
        assert_eq!(
            candidates
                .iter()
                .map(|usage| usage.segment)
                .collect::<Vec<_>>(),
            vec![1]
        );
        shard.close().await.unwrap();
    });
}

#[test]
fn compaction_moves_states_and_deletes_segment() {
    for encrypted in [false, true] {
        let disk = SimDisk::new();
        let expected = run(async {
            let (shard, _) = open(&disk, encrypted).await;
            let (survivors, active) = fill_mostly_dead_segment(&shard).await;
            let relocation = shard.relocate(1, u64::MAX, |_| true).unwrap();
            assert_eq!(relocation.moved().len(), survivors.len());
            assert_eq!(relocation.skipped(), 0);
            let mut expected = survivors.clone();
            for (old, new) in relocation.moved() {
                assert_eq!(new.segment, active, "copies go to the active segment");
                // The old location no longer takes outcomes.
                assert!(matches!(
                    shard.append_outcome(*old, 2, Outcome::Delivered, 1),
                    Err(AppendError::UnknownMessage(_))
                ));
                let id = shard.read_message(*new).unwrap().envelope.message_id;
                let entry = expected.get_mut(&id).unwrap();
                assert_eq!(entry.0, *old);
                entry.0 = *new;
            }
            // The old segment is still needed until the copies are durable.
            assert!(disk.segments().contains(&1));
            shard.complete_relocation(relocation).await.unwrap();
            assert!(!disk.segments().contains(&1), "segment 1 was not deleted");
            assert!(shard.compaction_candidates().is_empty());

            // An outcome for a new location updates the state the next copy
            // or recovery sees.
            let (id, (record, entry)) = expected.iter_mut().next().unwrap();
            let seq = shard
                .append_outcome(*record, 2, Outcome::Bounced, 1)
                .unwrap();
            entry.states[2] = RecipientState::Bounced;
            shard.durable(seq).await.unwrap();
            assert_eq!(
                shard.read_message(*record).unwrap().envelope.message_id,
                *id
            );
            shard.close().await.unwrap();
            expected
        });
        run(async {
            let (shard, recovered) = open(&disk, encrypted).await;
            assert_recovered_once(&shard, &recovered, &expected, "after compaction");
            shard.close().await.unwrap();
        });
    }
}

#[test]
fn refused_messages_keep_their_segment() {
    let disk = SimDisk::new();
    run(async {
        let (shard, _) = open(&disk, false).await;
        let (survivors, _) = fill_mostly_dead_segment(&shard).await;
        let refused = survivors.values().next().unwrap().0;
        let relocation = shard
            .relocate(1, u64::MAX, |record| record != refused)
            .unwrap();
        assert_eq!(relocation.moved().len(), survivors.len() - 1);
        assert_eq!(relocation.skipped(), 1);
        shard.complete_relocation(relocation).await.unwrap();
        assert!(
            disk.segments().contains(&1),
            "segment 1 still holds a live message"
        );
        // The refused message still takes outcomes at its old location.
        shard
            .append_outcome(refused, 2, Outcome::Delivered, 1)
            .unwrap();

        // A later call moves it, and the segment goes.
        let relocation = shard.relocate(1, u64::MAX, |_| true).unwrap();
        assert_eq!(relocation.moved().len(), 1);
        shard.complete_relocation(relocation).await.unwrap();
        assert!(!disk.segments().contains(&1));
        shard.close().await.unwrap();
    });
}

#[test]
fn budget_bounds_each_call() {
    let disk = SimDisk::new();
    run(async {
        let (shard, _) = open(&disk, true).await;
        let (survivors, _) = fill_mostly_dead_segment(&shard).await;
        let mut moved = 0;
        let mut calls = 0;
        while disk.segments().contains(&1) {
            // A budget of one byte copies exactly one message per call.
            let relocation = shard.relocate(1, 1, |_| true).unwrap();
            assert_eq!(relocation.moved().len(), 1);
            assert_eq!(
                relocation.deferred_by_budget() as usize,
                survivors.len() - moved - 1
            );
            moved += relocation.moved().len();
            shard.complete_relocation(relocation).await.unwrap();
            calls += 1;
            assert!(calls <= survivors.len(), "compaction does not progress");
        }
        assert_eq!(moved, survivors.len());
        shard.close().await.unwrap();
    });
}

#[test]
fn active_and_unknown_segments_are_not_compacted() {
    let disk = SimDisk::new();
    run(async {
        let (shard, _) = open(&disk, false).await;
        let (_, active) = fill_mostly_dead_segment(&shard).await;
        let relocation = shard.relocate(active, u64::MAX, |_| true).unwrap();
        assert!(relocation.moved().is_empty());
        shard.complete_relocation(relocation).await.unwrap();
        let relocation = shard.relocate(4242, u64::MAX, |_| true).unwrap();
        assert!(relocation.moved().is_empty());
        shard.complete_relocation(relocation).await.unwrap();
        shard.close().await.unwrap();
    });
}

/// A power cut after the copies are durable but before the old segment is
/// deleted leaves both copies; recovery keeps the newer one only.
#[test]
fn power_cut_before_deletion_keeps_one_copy() {
    for encrypted in [false, true] {
        let disk = SimDisk::new();
        let (expected, crashed) = run(async {
            let (shard, _) = open(&disk, encrypted).await;
            let (survivors, _) = fill_mostly_dead_segment(&shard).await;
            let relocation = shard.relocate(1, u64::MAX, |_| true).unwrap();
            // A sync that covers the copies, without completing the
            // relocation, so the old segment is still on disk.
            let (_, seq) = shard
                .append_message(&envelope(500, 1), &body(500, 10))
                .unwrap();
            shard.durable(seq).await.unwrap();
            assert!(disk.segments().contains(&1));
            let crashed = disk.crash(0);
            let expected = survivors;
            let extra = shard.read_message(relocation.moved()[0].1).unwrap();
            assert!(expected.contains_key(&extra.envelope.message_id));
            drop(relocation);
            shard.close().await.unwrap();
            // The unrelated message appended for the sync is live too.
            (expected, crashed)
        });
        run(async {
            let (shard, recovered) = open(&crashed, encrypted).await;
            let found = by_id(&recovered);
            assert_eq!(
                found.len(),
                expected.len() + 1,
                "survivors plus the extra message"
            );
            for (id, (old, expected)) in &expected {
                let message = found[id];
                assert_ne!(message.record, *old, "recovery kept the old copy of {id}");
                assert_eq!(message.states, expected.states);
                assert_eq!(
                    shard.read_message(message.record).unwrap().body,
                    expected.body
                );
            }
            // Segment 1 held nothing live any more, so recovery deleted it.
            assert!(!crashed.segments().contains(&1));
            shard.close().await.unwrap();
        });
    }
}

/// A power cut before the copies are durable, clean or tearing the last
/// write, recovers every survivor exactly once from its old copy.
#[test]
fn power_cut_before_sync_keeps_old_copy() {
    for torn_bytes in [0, 1, 64, 200, 1000, 5000] {
        let disk = SimDisk::new();
        let (expected, crashed) = run(async {
            let (shard, _) = open(&disk, true).await;
            let (survivors, _) = fill_mostly_dead_segment(&shard).await;
            let relocation = shard.relocate(1, u64::MAX, |_| true).unwrap();
            assert_eq!(relocation.moved().len(), survivors.len());
            let crashed = disk.crash(torn_bytes);
            shard.complete_relocation(relocation).await.unwrap();
            shard.close().await.unwrap();
            (survivors, crashed)
        });
        run(async {
            let (shard, recovered) = open(&crashed, true).await;
            let label = format!("torn={torn_bytes}");
            assert_recovered_once(&shard, &recovered, &expected, &label);
            assert!(
                crashed.segments().contains(&1),
                "{label}: old copies are needed"
            );
            shard.close().await.unwrap();
        });
    }
}

/// Compacting a segment of relocated copies again, then cutting power,
/// still recovers one copy per message with the latest state.
#[test]
fn second_compaction_keeps_latest_state() {
    let disk = SimDisk::new();
    let (expected, crashed) = run(async {
        let (shard, _) = open(&disk, false).await;
        let (mut survivors, first_copies) = fill_mostly_dead_segment(&shard).await;
        let relocation = shard.relocate(1, u64::MAX, |_| true).unwrap();
        let moved: Vec<(RecordRef, RecordRef)> = relocation.moved().to_vec();
        shard.complete_relocation(relocation).await.unwrap();
        for (old, new) in moved {
            let entry = survivors
                .values_mut()
                .find(|(record, _)| *record == old)
                .unwrap();
            entry.0 = new;
            // Another deferral after the first move.
            shard
                .append_outcome(
                    new,
                    1,
                    Outcome::Deferred {
                        next_attempt_us: 1_900_000_000_000_000,
                    },
                    40,
                )
                .unwrap();
            entry.1.states[1] = RecipientState::Pending {
                attempts: 40,
                next_attempt_us: 1_900_000_000_000_000,
            };
        }
        // Roll over so the segment with the first copies is sealed.
        let (record, seq) = shard
            .append_message(&envelope(98, 1), &body(98, 45_000))
            .unwrap();
        assert_ne!(record.segment, first_copies);
        shard.durable(seq).await.unwrap();
        let seq = shard
            .append_outcome(record, 0, Outcome::Delivered, 1)
            .unwrap();
        shard.durable(seq).await.unwrap();
        shard.release(record);
        let relocation = shard.relocate(first_copies, u64::MAX, |_| true).unwrap();
        assert_eq!(relocation.moved().len(), survivors.len());
        let (_, seq) = shard
            .append_message(&envelope(501, 1), &body(501, 10))
            .unwrap();
        shard.durable(seq).await.unwrap();
        let crashed = disk.crash(0);
        shard.complete_relocation(relocation).await.unwrap();
        shard.close().await.unwrap();
        (survivors, crashed)
    });
    run(async {
        let (shard, recovered) = open(&crashed, false).await;
        let found = by_id(&recovered);
        for (id, (_, expected)) in &expected {
            assert_eq!(found[id].states, expected.states, "states of {id}");
        }
        assert_eq!(found.len(), expected.len() + 1);
        shard.close().await.unwrap();
    });
}

/// Below the disk reserve, new messages are rejected but outcomes and
/// compaction copies of acknowledged messages still get a new segment: the
/// reserve is kept for exactly that.
#[test]
fn reserve_admits_state_changes_only() {
    let disk = SimDisk::new();
    run(async {
        let mut options = sim_options(true);
        options.reserve_bytes = 1 << 30;
        let (shard, _, _) = Shard::open_with_storage(options.clone(), disk.storage())
            .await
            .unwrap();
        let (survivors, _) = fill_mostly_dead_segment(&shard).await;
        shard.close().await.unwrap();
        drop(shard);

        // After a restart every segment is read-only, so the next append of
        // any kind needs a new segment.
        let reserve_bytes = options.reserve_bytes;
        let (shard, recovered, _) = Shard::open_with_storage(options, disk.storage())
            .await
            .unwrap();
        // Recovery deleted the unused segments first, which freed space.
        disk.set_free_bytes(reserve_bytes + SEGMENT_BYTES - 1);
        assert_eq!(recovered.len(), survivors.len());
        let result = shard.append_message(&envelope(300, 1), &body(300, 10));
        assert!(
            matches!(result, Err(AppendError::DiskReserve { .. })),
            "{result:?}"
        );
        let record = recovered[0].record;
        let seq = shard
            .append_outcome(record, 2, Outcome::Delivered, 1)
            .unwrap();
        shard.durable(seq).await.unwrap();
        let relocation = shard.relocate(1, u64::MAX, |_| true).unwrap();
        assert_eq!(relocation.moved().len(), survivors.len());
        shard.complete_relocation(relocation).await.unwrap();
        assert!(!disk.segments().contains(&1));

        shard.close().await.unwrap();
    });
}

/// Appends a large message, makes it final and durable and releases it, so
/// the active segment rolls over. Returns its segment.
async fn roll_over(shard: &Shard<SimStorage>, tag: u32) -> u32 {
    let (record, seq) = shard
        .append_message(&envelope(tag, 1), &body(tag, 45_000))
        .unwrap();
    shard.durable(seq).await.unwrap();
    let seq = shard
        .append_outcome(record, 0, Outcome::Delivered, 1)
        .unwrap();
    shard.durable(seq).await.unwrap();
    shard.release(record);
    record.segment
}

/// Delivers every recipient of `record` durably and releases it.
async fn finish(shard: &Shard<SimStorage>, record: RecordRef, recipients: u32) {
    let mut last = None;
    for index in 0..recipients {
        last = Some(
            shard
                .append_outcome(record, index, Outcome::Delivered, 1)
                .unwrap(),
        );
    }
    shard.durable(last.unwrap()).await.unwrap();
    shard.release(record);
}

/// A released message's record survives in a segment kept by another
/// message. The segment with its final outcome must survive as long, or a
/// restart would deliver the message again.
#[test]
fn final_outcomes_outlive_message_record() {
    let disk = SimDisk::new();
    run(async {
        let (shard, _) = open(&disk, true).await;
        // The first message stays live and keeps segment 1.
        shard
            .append_message(&envelope(1, 1), &body(1, 10_000))
            .unwrap();
        let (done, seq) = shard
            .append_message(&envelope(2, 1), &body(2, 10_000))
            .unwrap();
        shard.durable(seq).await.unwrap();
        let second = roll_over(&shard, 3).await;
        assert_eq!(second, 2);
        finish(&shard, done, 1).await;
        assert_eq!(roll_over(&shard, 4).await, 3);
        assert!(
            disk.segments().contains(&2),
            "segment 2 contains the final outcome of a message in segment 1"
        );
        shard.close().await.unwrap();
    });
    run(async {
        let (shard, recovered) = open(&disk, true).await;
        assert_eq!(recovered.len(), 1, "only the unfinished message is live");
        let kept = recovered[0].record;
        assert!(disk.segments().contains(&2), "recovery keeps the hold");
        finish(&shard, kept, 1).await;
        assert!(!disk.segments().contains(&1));
        assert!(
            !disk.segments().contains(&2),
            "deleting segment 1 frees segment 2"
        );
        shard.close().await.unwrap();
    });
}

/// An old copy kept by a message that could not move must not outlive the
/// segment of its relocated copy.
#[test]
fn old_copy_does_not_outlive_relocated_copy() {
    let disk = SimDisk::new();
    run(async {
        let (shard, _) = open(&disk, false).await;
        // The first message stays live and keeps segment 1.
        shard
            .append_message(&envelope(1, 1), &body(1, 10_000))
            .unwrap();
        let (moving, seq) = shard
            .append_message(&envelope(2, 2), &body(2, 10_000))
            .unwrap();
        shard.durable(seq).await.unwrap();
        assert_eq!(roll_over(&shard, 3).await, 2);
        let relocation = shard
            .relocate(1, u64::MAX, |record| record == moving)
            .unwrap();
        assert_eq!(relocation.moved().len(), 1);
        let moved = relocation.moved()[0].1;
        shard.complete_relocation(relocation).await.unwrap();
        assert!(
            disk.segments().contains(&1),
            "segment 1 still has a live message"
        );
        finish(&shard, moved, 2).await;
        assert_eq!(roll_over(&shard, 4).await, 3);
        assert!(
            disk.segments().contains(&moved.segment),
            "the copy's segment is held by the old copy's"
        );
        assert_eq!(shard.segment_usage().len(), 3);
        shard.close().await.unwrap();
    });
    run(async {
        let (shard, recovered) = open(&disk, false).await;
        assert_eq!(recovered.len(), 1, "the delivered message stays delivered");
        assert_eq!(recovered[0].record.segment, 1);
        shard.close().await.unwrap();
    });
}
