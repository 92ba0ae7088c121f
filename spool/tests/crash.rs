//! The real record, commit and recovery code over the fault-injecting
//! storage: power cuts, torn writes, flipped bytes and failed syncs.

mod common;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use caduceus_spool::format::{RECORD_LENGTH_OFFSET, UncheckedRecord};
use caduceus_spool::sim::{SimDisk, SimStorage};
use caduceus_spool::{AppendError, CommitError, Envelope, RecordRef, Shard, SpoolOptions};
use common::{body, envelope, run, test_keyring};
use proptest::prelude::*;

fn sim_options(encrypted: bool) -> SpoolOptions {
    SpoolOptions {
        dir: "/nonexistent".into(),
        shard: 1,
        segment_size_bytes: 32 * 1024,
        commit_max_wait: Duration::from_micros(100),
        commit_max_batch: 8,
        keyring: encrypted.then(|| test_keyring(4, 0x5a)),
        reserve_bytes: 0,
        list_appends: Default::default(),
    }
}

async fn open(
    disk: &SimDisk,
    encrypted: bool,
) -> (
    Rc<Shard<SimStorage>>,
    Vec<caduceus_spool::RecoveredMessage>,
    caduceus_spool::RecoveryReport,
) {
    Shard::open_with_storage(sim_options(encrypted), disk.storage())
        .await
        .unwrap()
}

/// Asserts that the record at `record` lies wholly in the durable prefix of
/// its segment and checks out there.
fn assert_durable(disk: &SimDisk, record: RecordRef) {
    let durable = disk.durable_bytes(record.segment).expect("segment exists");
    let checked = UncheckedRecord(&durable[record.offset as usize..])
        .check()
        .unwrap_or_else(|error| panic!("acknowledged record {record} is not durable: {error}"));
    let end = record.offset + u64::from(checked.header.length_bytes);
    assert!(
        end <= disk.durable_prefix_bytes(record.segment),
        "acknowledged record {record} ends at {end}, past the durable prefix {}",
        disk.durable_prefix_bytes(record.segment)
    );
}

#[test]
fn acknowledged_records_survive_power_cut() {
    for torn_bytes in [0, 1, 63, 64, 100, 700, 5000] {
        for encrypted in [false, true] {
            let disk = SimDisk::new();
            let (acknowledged, crashed): (BTreeMap<RecordRef, (Envelope, Vec<u8>)>, SimDisk) =
                run(async {
                    let (shard, _, _) = open(&disk, encrypted).await;
                    let mut acknowledged = BTreeMap::new();
                    // Enough messages to roll over several 32 KiB segments.
                    for tag in 0..40 {
                        let envelope = envelope(tag, 2);
                        let body = body(tag, 1500 + tag as usize * 7);
                        let (record, seq) = shard.append_message(&envelope, &body).unwrap();
                        if tag % 3 == 0 {
                            shard.durable(seq).await.unwrap();
                            assert_durable(&disk, record);
                            acknowledged.insert(record, (envelope, body));
                        }
                    }
                    // Appends after the last acknowledgement are not synced yet.
                    for tag in 100..103 {
                        shard
                            .append_message(&envelope(tag, 1), &body(tag, 900))
                            .unwrap();
                    }
                    // Every acknowledged record is durable at the moment of the cut.
                    for record in acknowledged.keys() {
                        assert_durable(&disk, *record);
                    }
                    (acknowledged, disk.crash(torn_bytes))
                });
            run(async {
                let (shard, recovered, report) = open(&crashed, encrypted).await;
                assert!(
                    report.quarantined.is_empty(),
                    "torn={torn_bytes}: {:?}",
                    report.quarantined
                );
                assert!(report.torn_tail_truncated <= 1);
                let recovered: BTreeMap<_, _> = recovered
                    .into_iter()
                    .map(|message| (message.record, message))
                    .collect();
                for (record, (envelope, body)) in &acknowledged {
                    let found = recovered
                        .get(record)
                        .unwrap_or_else(|| panic!("torn={torn_bytes}: lost {record}"));
                    assert_eq!(&found.envelope, envelope);
                    assert_eq!(&shard.read_message(*record).unwrap().body, body);
                }
                shard.close().await.unwrap();
            });
        }
    }
}

#[test]
fn torn_tail_is_zeroed_once() {
    let disk = SimDisk::new();
    let crashed = run(async {
        let (shard, _, _) = open(&disk, true).await;
        for tag in 0..5 {
            let (_, seq) = shard
                .append_message(&envelope(tag, 1), &body(tag, 800))
                .unwrap();
            shard.durable(seq).await.unwrap();
        }
        shard
            .append_message(&envelope(9, 1), &body(9, 800))
            .unwrap();
        // Cut the power before the committer can sync the last append.
        disk.crash(300)
    });
    run(async {
        let (shard, recovered, report) = open(&crashed, true).await;
        assert_eq!(report.torn_tail_truncated, 1, "{report:?} {recovered:?}");
        assert!(report.quarantined.is_empty());
        assert_eq!(recovered.len(), 5);
        shard.close().await.unwrap();
    });
    run(async {
        let (shard, recovered, report) = open(&crashed, true).await;
        assert_eq!(report.torn_tail_truncated, 0);
        assert_eq!(recovered.len(), 5);
        shard.close().await.unwrap();
    });
}

fn flipped_record_is_quarantined(flip_at: impl Fn(RecordRef) -> u64) {
    let disk = SimDisk::new();
    let records = run(async {
        let (shard, _, _) = open(&disk, false).await;
        let mut records = Vec::new();
        for tag in 0..5 {
            let (record, seq) = shard
                .append_message(&envelope(tag, 1), &body(tag, 600))
                .unwrap();
            shard.durable(seq).await.unwrap();
            records.push(record);
        }
        shard.close().await.unwrap();
        records
    });
    let damaged = records[2];
    disk.flip_byte(damaged.segment, flip_at(damaged), 0x40);
    let crashed = disk.crash(0);
    run(async {
        let (shard, recovered, report) = open(&crashed, false).await;
        assert_eq!(report.quarantined.len(), 1, "{:?}", report.quarantined);
        assert_eq!(
            (report.quarantined[0].0, report.quarantined[0].1),
            (damaged.segment, damaged.offset)
        );
        let found: Vec<RecordRef> = recovered.iter().map(|message| message.record).collect();
        let expected: Vec<RecordRef> = records
            .iter()
            .copied()
            .filter(|record| *record != damaged)
            .collect();
        assert_eq!(found, expected);
        shard.close().await.unwrap();
    });
    // The quarantined segment is kept for an operator, not deleted.
    assert!(crashed.segments().contains(&damaged.segment));
}

#[test]
fn flipped_payload_byte_is_quarantined() {
    flipped_record_is_quarantined(|record| record.offset + 200);
}

#[test]
fn flipped_length_byte_is_quarantined() {
    flipped_record_is_quarantined(|record| record.offset + RECORD_LENGTH_OFFSET as u64 + 1);
}

#[test]
fn failed_sync_retires_only_its_segment() {
    let disk = SimDisk::new();
    let (good, later) = run(async {
        let (shard, _, _) = open(&disk, false).await;
        let (good, good_seq) = shard
            .append_message(&envelope(1, 1), &body(1, 100))
            .unwrap();
        shard.durable(good_seq).await.unwrap();

        disk.fail_next_syncs(1);
        let (first, first_seq) = shard
            .append_message(&envelope(2, 1), &body(2, 100))
            .unwrap();
        let (second, second_seq) = shard
            .append_message(&envelope(3, 1), &body(3, 100))
            .unwrap();
        assert_eq!(first.segment, good.segment);
        assert_eq!(second.segment, good.segment);
        let failed = shard.durable(first_seq).await;
        assert!(
            matches!(failed, Err(CommitError::SyncFailed { segment, .. }) if segment == good.segment),
            "{failed:?}"
        );
        assert!(matches!(
            shard.durable(second_seq).await,
            Err(CommitError::SyncFailed { .. })
        ));
        // A commit that was already durable stays so.
        shard.durable(good_seq).await.unwrap();
        assert_durable(&disk, good);

        // The next append goes to a fresh segment and commits normally.
        let (later, later_seq) = shard
            .append_message(&envelope(4, 1), &body(4, 100))
            .unwrap();
        assert_ne!(later.segment, good.segment);
        shard.durable(later_seq).await.unwrap();
        assert_durable(&disk, later);
        assert_eq!(shard.read_message(good).unwrap().body, body(1, 100));

        // The engine releases the messages whose commit failed. The retired
        // segment stays while the good message is live.
        shard.release(first);
        shard.release(second);
        assert!(disk.segments().contains(&good.segment));
        assert!(shard.close().await.is_err(), "close reports the failure");
        (good, later)
    });
    let (shard, recovered, report) = run(async {
        let (shard, recovered, report) = open(&disk.crash(0), false).await;
        (shard, recovered, report)
    });
    drop(shard);
    assert!(report.quarantined.is_empty(), "{:?}", report.quarantined);
    let records: Vec<RecordRef> = recovered.iter().map(|message| message.record).collect();
    assert_eq!(records, vec![good, later]);
}

#[test]
fn retired_segment_deleted_when_released() {
    let disk = SimDisk::new();
    run(async {
        let (shard, _, _) = open(&disk, false).await;
        disk.fail_next_syncs(1);
        let (lost, lost_seq) = shard
            .append_message(&envelope(1, 1), &body(1, 100))
            .unwrap();
        assert!(shard.durable(lost_seq).await.is_err());
        let (kept, kept_seq) = shard
            .append_message(&envelope(2, 1), &body(2, 100))
            .unwrap();
        shard.durable(kept_seq).await.unwrap();
        assert!(disk.segments().contains(&lost.segment));
        shard.release(lost);
        assert!(
            !disk.segments().contains(&lost.segment),
            "a retired segment with no live message is deleted"
        );
        assert!(disk.segments().contains(&kept.segment));
        let _ = shard.close().await;
    });
}

#[test]
fn overlapping_commits_ack_only_durable_records() {
    // Enough appends for dozens of roll-overs, where one commit spans two
    // segments and a later commit covers only the second.
    const ROUNDS: u32 = 60;
    let disk = SimDisk::new();
    let acknowledged = run(async {
        let (shard, _, _) = open(&disk, true).await;
        let acknowledged = Rc::new(RefCell::new(Vec::new()));
        let mut appenders = Vec::new();
        // 16 appenders keep appending while commits of 8 run, so several
        // commits are in flight at once.
        for appender in 0..16u32 {
            let shard = shard.clone();
            let disk = disk.clone();
            let acknowledged = acknowledged.clone();
            appenders.push(glommio::spawn_local(async move {
                for round in 0..ROUNDS {
                    // Staggered think times keep the appenders out of step,
                    // so new commits start while earlier ones sync.
                    for _ in 0..(appender + round) % 4 {
                        futures_lite::future::yield_now().await;
                    }
                    let tag = appender * 100 + round;
                    let (record, seq) = shard
                        .append_message(&envelope(tag, 1), &body(tag, 700))
                        .unwrap();
                    shard.durable(seq).await.unwrap();
                    assert_durable(&disk, record);
                    acknowledged.borrow_mut().push(record);
                }
            }));
        }
        for appender in appenders {
            appender.await;
        }
        shard.close().await.unwrap();
        acknowledged.take()
    });
    assert_eq!(acknowledged.len(), 16 * ROUNDS as usize);
    let segments: std::collections::BTreeSet<u32> =
        acknowledged.iter().map(|record| record.segment).collect();
    assert!(segments.len() > 3, "only {segments:?} were written");
    let crashed = disk.crash(0);
    let recovered = run(async {
        let (shard, recovered, _) = open(&crashed, true).await;
        drop(shard);
        recovered
    });
    let recovered: std::collections::BTreeSet<RecordRef> =
        recovered.iter().map(|message| message.record).collect();
    for record in &acknowledged {
        assert!(recovered.contains(record), "acknowledged {record} lost");
    }
}

#[test]
fn group_commit_shares_one_sync() {
    let disk = SimDisk::new();
    run(async {
        let mut options = sim_options(false);
        options.commit_max_wait = Duration::from_millis(20);
        options.commit_max_batch = 1000;
        options.segment_size_bytes = 1024 * 1024;
        let (shard, _, _) = Shard::open_with_storage(options, disk.storage())
            .await
            .unwrap();
        let before = disk.syncs();
        let seqs: Vec<_> = (0..100)
            .map(|tag| {
                shard
                    .append_message(&envelope(tag, 1), &body(tag, 200))
                    .unwrap()
                    .1
            })
            .collect();
        for seq in seqs {
            shard.durable(seq).await.unwrap();
        }
        // 100 appends made without yielding are covered by one sync of the
        // one dirty segment.
        assert_eq!(disk.syncs() - before, 1);
        shard.close().await.unwrap();
    });
}

#[test]
fn full_batch_syncs_before_max_wait() {
    let disk = SimDisk::new();
    run(async {
        let mut options = sim_options(false);
        // A wait far longer than the test's timeout: only a full batch can
        // start the sync in time.
        options.commit_max_wait = Duration::from_secs(3600);
        options.commit_max_batch = 4;
        let (shard, _, _) = Shard::open_with_storage(options, disk.storage())
            .await
            .unwrap();
        let mut last = None;
        for tag in 0..4 {
            last = Some(
                shard
                    .append_message(&envelope(tag, 1), &body(tag, 100))
                    .unwrap()
                    .1,
            );
        }
        let durable = shard.durable(last.unwrap());
        let timeout = async {
            glommio::timer::sleep(Duration::from_secs(10)).await;
            Err(CommitError::Closed)
        };
        futures_lite::future::or(durable, timeout)
            .await
            .expect("a full batch is synced without waiting");
    });
}

#[test]
fn disk_reserve_rejects_new_segment() {
    let disk = SimDisk::new();
    run(async {
        let mut options = sim_options(false);
        options.reserve_bytes = 1 << 20;
        disk.set_free_bytes(options.reserve_bytes + options.segment_size_bytes - 1);
        let (shard, _, _) = Shard::open_with_storage(options, disk.storage())
            .await
            .unwrap();
        let result = shard.append_message(&envelope(1, 1), &body(1, 100));
        assert!(
            matches!(result, Err(AppendError::DiskReserve { .. })),
            "{result:?}"
        );
        disk.set_free_bytes(u64::MAX);
        let (_, seq) = shard
            .append_message(&envelope(1, 1), &body(1, 100))
            .unwrap();
        shard.durable(seq).await.unwrap();
        shard.close().await.unwrap();
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Random byte flips after the segment header: recovery never panics and
    /// keeps every synced message whose bytes were not touched.
    #[test]
    fn recovery_keeps_undamaged_records(
        flips in proptest::collection::vec((0usize..3, 64u64..32 * 1024, 1u8..=255), 1..6),
        torn_bytes in 0u64..2000,
        encrypted in any::<bool>(),
    ) {
        let disk = SimDisk::new();
        let (records, crashed): (Vec<(RecordRef, u64)>, SimDisk) = run(async {
            let (shard, _, _) = open(&disk, encrypted).await;
            let mut records = Vec::new();
            for tag in 0..30 {
                let (record, seq) = shard.append_message(&envelope(tag, 1), &body(tag, 1000)).unwrap();
                shard.durable(seq).await.unwrap();
                let durable = disk.durable_bytes(record.segment).unwrap();
                let length = UncheckedRecord(&durable[record.offset as usize..]).check().unwrap().header.length_bytes;
                records.push((record, u64::from(length)));
            }
            shard.append_message(&envelope(99, 1), &body(99, 1000)).unwrap();
            (records, disk.crash(torn_bytes))
        });
        let segments = crashed.segments();
        let mut damaged = Vec::new();
        for (segment_index, offset, mask) in &flips {
            let segment = segments[segment_index % segments.len()];
            crashed.flip_byte(segment, *offset, *mask);
            damaged.push((segment, *offset));
        }
        let recovered = run(async {
            let (shard, recovered, _) = open(&crashed, encrypted).await;
            shard.close().await.unwrap();
            recovered
        });
        let found: Vec<RecordRef> = recovered.iter().map(|message| message.record).collect();
        for (record, length) in records {
            let touched = damaged.iter().any(|&(segment, offset)| {
                segment == record.segment && offset >= record.offset && offset < record.offset + length
            });
            if !touched {
                prop_assert!(found.contains(&record), "lost undamaged record {record}; flips {damaged:?}");
            }
        }
    }
}
