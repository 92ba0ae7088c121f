//! The standby segment that the committer creates ahead of time. A
//! roll-over takes it when it is ready. A roll-over that cannot wait
//! creates a later segment, and the prepared one is deleted, so segment ids
//! keep the order of their records.

mod common;

use std::time::Duration;

use caduceus_spool::sim::SimDisk;
use caduceus_spool::{Outcome, Shard, SpoolOptions};
use common::{body, envelope, options, run};

const SEGMENT_BYTES: u64 = 64 * 1024;

fn sim_options() -> SpoolOptions {
    SpoolOptions {
        dir: "/nonexistent".into(),
        shard: 4,
        segment_size_bytes: SEGMENT_BYTES,
        commit_max_wait: Duration::from_micros(100),
        commit_max_batch: 8,
        keyring: None,
        reserve_bytes: 0,
        list_appends: Default::default(),
    }
}

/// A roll-over while the standby is still being created uses a later id,
/// and the late standby is deleted instead of becoming active after it.
#[test]
fn slow_standby_gives_way_to_roll_over() {
    let disk = SimDisk::new();
    disk.set_create_ahead_delay(Duration::from_millis(50));
    run(async {
        let (shard, _, _) = Shard::open_with_storage(sim_options(), disk.storage())
            .await
            .unwrap();
        // Fill segment 1 past half, so the next commit starts the standby.
        let (first, seq) = shard
            .append_message(&envelope(1, 1), &body(1, 40_000))
            .unwrap();
        shard.durable(seq).await.unwrap();
        assert_eq!(first.segment, 1);

        // The standby (segment 2) is pending for 50 ms, so this roll-over
        // creates segment 3 at once.
        let (second, seq) = shard
            .append_message(&envelope(2, 1), &body(2, 40_000))
            .unwrap();
        shard.durable(seq).await.unwrap();
        assert_eq!(second.segment, 3);

        glommio::timer::sleep(Duration::from_millis(120)).await;
        assert!(
            !disk.segments().contains(&2),
            "the late standby was deleted: {:?}",
            disk.segments()
        );
        shard.close().await.unwrap();
    });

    run(async {
        let (shard, recovered, report) = Shard::open_with_storage(sim_options(), disk.storage())
            .await
            .unwrap();
        assert!(report.quarantined.is_empty(), "{:?}", report.quarantined);
        assert_eq!(recovered.len(), 2);
        shard.close().await.unwrap();
    });
}

/// A standby that is ready in time becomes the next active segment.
#[test]
fn ready_standby_becomes_active() {
    let disk = SimDisk::new();
    run(async {
        let (shard, _, _) = Shard::open_with_storage(sim_options(), disk.storage())
            .await
            .unwrap();
        let (first, seq) = shard
            .append_message(&envelope(1, 1), &body(1, 40_000))
            .unwrap();
        shard.durable(seq).await.unwrap();
        assert_eq!(first.segment, 1);
        // Let the creation task run.
        glommio::timer::sleep(Duration::from_millis(10)).await;
        assert_eq!(disk.segments(), vec![1, 2]);

        let (second, seq) = shard
            .append_message(&envelope(2, 1), &body(2, 40_000))
            .unwrap();
        shard.durable(seq).await.unwrap();
        assert_eq!(second.segment, 2);
        shard.close().await.unwrap();
    });
}

/// Over real files, messages spread over many prepared segments all come
/// back after a restart, in the order they were appended.
#[test]
fn prepared_segments_recover_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut appended = Vec::new();
    run(async {
        let (shard, _, _) = Shard::open(options(dir.path(), None)).await.unwrap();
        for tag in 0..60u32 {
            let envelope = envelope(tag, 1);
            let (record, seq) = shard.append_message(&envelope, &body(tag, 30_000)).unwrap();
            shard.durable(seq).await.unwrap();
            appended.push((envelope.message_id, record));
            // Give the standby time to be created, as between real bursts.
            if tag % 4 == 3 {
                glommio::timer::sleep(Duration::from_millis(20)).await;
            }
        }
        // Finish every third message, so some segments hold outcomes for
        // messages in earlier ones.
        for (index, (_, record)) in appended.iter().enumerate() {
            if index % 3 == 0 {
                let seq = shard
                    .append_outcome(*record, 0, Outcome::Delivered, 1)
                    .unwrap();
                shard.durable(seq).await.unwrap();
            }
        }
        shard.close().await.unwrap();
    });
    let segments: Vec<u32> = appended.iter().map(|(_, record)| record.segment).collect();
    assert!(
        segments.windows(2).all(|pair| pair[0] <= pair[1]),
        "segment ids follow append order: {segments:?}"
    );
    assert!(segments.last().unwrap() - segments[0] >= 5, "{segments:?}");

    run(async {
        let (shard, recovered, report) = Shard::open(options(dir.path(), None)).await.unwrap();
        assert!(report.quarantined.is_empty(), "{:?}", report.quarantined);
        let live: Vec<_> = appended
            .iter()
            .enumerate()
            .filter(|(index, _)| index % 3 != 0)
            .map(|(_, (id, _))| *id)
            .collect();
        let recovered_ids: Vec<_> = recovered
            .iter()
            .map(|message| message.envelope.message_id)
            .collect();
        assert_eq!(recovered_ids, live);
        shard.close().await.unwrap();
    });
}
