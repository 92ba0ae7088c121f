//! Group-commit statistics: every durable record is counted once, in the
//! commit that synced it, and failed syncs are counted apart.

mod common;

use std::time::Duration;

use caduceus_spool::format::SEGMENT_HEADER_BYTES;
use caduceus_spool::sim::SimDisk;
use caduceus_spool::{Outcome, Shard, SpoolOptions};
use common::{body, envelope, run, test_keyring};

fn sim_options(commit_max_batch: u32) -> SpoolOptions {
    SpoolOptions {
        dir: "/nonexistent".into(),
        shard: 2,
        // One segment contains every record these tests write, so its used
        // bytes are the sum of the record sizes.
        segment_size_bytes: 1024 * 1024,
        commit_max_wait: Duration::from_millis(50),
        commit_max_batch,
        keyring: Some(test_keyring(5, 0x33)),
        reserve_bytes: 0,
        list_appends: Default::default(),
    }
}

#[test]
fn sequential_appends_commit_one_record_each() {
    let disk = SimDisk::new();
    run(async {
        let (shard, _, _) = Shard::open_with_storage(sim_options(1), disk.storage())
            .await
            .unwrap();
        let mut records = Vec::new();
        for tag in 0..20 {
            let (record, seq) = shard
                .append_message(&envelope(tag, 1), &body(tag, 1000))
                .unwrap();
            shard.durable(seq).await.unwrap();
            records.push(record);
        }
        let seq = shard
            .append_outcome(records[0], 0, Outcome::Delivered, 1)
            .unwrap();
        shard.durable(seq).await.unwrap();

        let stats = shard.take_commit_stats();
        assert_eq!(stats.commits(), 21);
        assert_eq!(stats.batch_records_total, 21);
        assert_eq!(stats.batch_records.max(), 1);
        assert_eq!(stats.fsync_us.len(), 21, "one segment, one sync per commit");
        assert_eq!(stats.fsync_failures, 0);
        let used_bytes = shard.stats().active_segment_used_bytes - SEGMENT_HEADER_BYTES as u64;
        assert_eq!(stats.batch_bytes_total, used_bytes);

        let again = shard.take_commit_stats();
        assert_eq!(again.commits(), 0, "taking resets the statistics");
        assert_eq!(again.batch_records_total, 0);
        shard.close().await.unwrap();
    });
}

#[test]
fn concurrent_appends_share_one_commit() {
    let disk = SimDisk::new();
    run(async {
        let (shard, _, _) = Shard::open_with_storage(sim_options(10), disk.storage())
            .await
            .unwrap();
        // Ten appends without yielding in between: the committer wakes
        // once, finds the full batch and syncs it with one fdatasync.
        let mut last = None;
        for tag in 0..10 {
            let (_, seq) = shard
                .append_message(&envelope(tag, 2), &body(tag, 500))
                .unwrap();
            last = Some(seq);
        }
        shard.durable(last.unwrap()).await.unwrap();

        let stats = shard.take_commit_stats();
        assert_eq!(stats.commits(), 1);
        assert_eq!(stats.batch_records.max(), 10);
        assert_eq!(stats.batch_records_total, 10);
        assert_eq!(stats.fsync_us.len(), 1);
        let used_bytes = shard.stats().active_segment_used_bytes - SEGMENT_HEADER_BYTES as u64;
        assert_eq!(stats.batch_bytes_total, used_bytes);
        assert_eq!(stats.batch_bytes.len(), 1);
        shard.close().await.unwrap();
    });
}

#[test]
fn failed_sync_is_counted_not_committed() {
    let disk = SimDisk::new();
    run(async {
        let (shard, _, _) = Shard::open_with_storage(sim_options(1), disk.storage())
            .await
            .unwrap();
        let (_, seq) = shard
            .append_message(&envelope(0, 1), &body(0, 100))
            .unwrap();
        shard.durable(seq).await.unwrap();
        disk.fail_next_syncs(1);
        let (_, seq) = shard
            .append_message(&envelope(1, 1), &body(1, 100))
            .unwrap();
        assert!(shard.durable(seq).await.is_err());

        let stats = shard.take_commit_stats();
        assert_eq!(stats.commits(), 1, "only the first commit succeeded");
        assert_eq!(stats.batch_records_total, 1);
        assert_eq!(stats.fsync_us.len(), 2, "the failed call is timed too");
        assert_eq!(stats.fsync_failures, 1);
        let _ = shard.close().await;
    });
}
