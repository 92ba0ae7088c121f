//! `inspect::find_message`, which `caduceus spool show` uses on a stopped
//! engine: it folds outcome records into recipient states, follows a
//! relocated copy, and counts records it cannot open.

mod common;

use caduceus_spool::inspect::find_message;
use caduceus_spool::{MessageId, Outcome, RecipientState, Shard};
use common::{body, envelope, options, run, test_keyring};

/// Writes three two-recipient messages, defers recipient 0 of the second
/// one twice and delivers its recipient 1, then closes the shard. Returns
/// the second message's id.
fn write_spool(dir: &std::path::Path, encrypted: bool) -> MessageId {
    let keyring = encrypted.then(|| test_keyring(1, 7));
    run(async {
        let (shard, _, _) = Shard::open(options(dir, keyring)).await.unwrap();
        let mut records = Vec::new();
        let mut ids = Vec::new();
        for tag in 0..3 {
            let envelope = envelope(tag, 2);
            let (record, seq) = shard.append_message(&envelope, &body(tag, 600)).unwrap();
            shard.durable(seq).await.unwrap();
            records.push(record);
            ids.push(envelope.message_id);
        }
        let target = records[1];
        shard
            .append_outcome(target, 0, Outcome::Deferred { next_attempt_us: 5 }, 1)
            .unwrap();
        shard
            .append_outcome(target, 0, Outcome::Deferred { next_attempt_us: 9 }, 2)
            .unwrap();
        let seq = shard
            .append_outcome(target, 1, Outcome::Delivered, 1)
            .unwrap();
        shard.durable(seq).await.unwrap();
        shard.close().await.unwrap();
        ids[1]
    })
}

#[test]
fn find_folds_outcomes_encrypted() {
    let dir = tempfile::tempdir().unwrap();
    let message_id = write_spool(dir.path(), true);
    let keyring = test_keyring(1, 7);

    let report = find_message(dir.path(), message_id, Some(&keyring)).unwrap();
    assert_eq!(report.unreadable_records, 0);
    assert_eq!(report.copies.len(), 1);
    let found = &report.copies[0];
    assert_eq!(found.envelope.message_id, message_id);
    assert_eq!(found.key_id, 1);
    assert_eq!(found.body_bytes, 600);
    assert_eq!(found.record_bytes % 16, 0);
    assert_eq!(
        found.states,
        vec![
            RecipientState::Pending {
                attempts: 2,
                next_attempt_us: 9
            },
            RecipientState::Delivered,
        ]
    );
}

#[test]
fn find_unknown_id_is_empty() {
    let dir = tempfile::tempdir().unwrap();
    write_spool(dir.path(), false);

    let report = find_message(dir.path(), MessageId([0xee; 16]), None).unwrap();
    assert!(report.copies.is_empty());
    assert_eq!(report.unreadable_records, 0);
}

#[test]
fn find_without_key_counts_unreadable() {
    let dir = tempfile::tempdir().unwrap();
    let message_id = write_spool(dir.path(), true);

    let report = find_message(dir.path(), message_id, None).unwrap();
    assert!(report.copies.is_empty());
    // Three messages and three outcomes, all sealed.
    assert_eq!(report.unreadable_records, 6);
}

#[test]
fn find_with_wrong_key_counts_unreadable() {
    let dir = tempfile::tempdir().unwrap();
    let message_id = write_spool(dir.path(), true);
    let wrong = test_keyring(1, 8);

    let report = find_message(dir.path(), message_id, Some(&wrong)).unwrap();
    assert!(report.copies.is_empty());
    assert_eq!(report.unreadable_records, 6);
}

#[test]
fn find_follows_relocated_copy() {
    let dir = tempfile::tempdir().unwrap();
    let keyring = test_keyring(1, 7);
    let options = options(dir.path(), Some(keyring.clone()));
    let (message_id, new_location) = run(async {
        let (shard, _, _) = Shard::open(options).await.unwrap();
        // Two 100 KB messages fill most of the 256 KiB segment 1, so the
        // third rolls over to a new segment and segment 1 can be compacted.
        // That is segment 2, or 3 when the prepared segment 2 was not ready.
        let mut records = Vec::new();
        let mut ids = Vec::new();
        for tag in 0..3 {
            let envelope = envelope(tag, 2);
            let (record, seq) = shard
                .append_message(&envelope, &body(tag, 100_000))
                .unwrap();
            shard.durable(seq).await.unwrap();
            records.push(record);
            ids.push(envelope.message_id);
        }
        assert_eq!(records[1].segment, 1);
        assert!(records[2].segment > 1);
        let seq = shard
            .append_outcome(records[1], 0, Outcome::Deferred { next_attempt_us: 7 }, 1)
            .unwrap();
        shard.durable(seq).await.unwrap();

        let relocation = shard.relocate(1, u64::MAX, |_| true).unwrap();
        let new_location = relocation
            .moved()
            .iter()
            .find(|(old, _)| *old == records[1])
            .map(|(_, new)| *new)
            .expect("message 1 moved");
        shard.complete_relocation(relocation).await.unwrap();
        let seq = shard
            .append_outcome(new_location, 1, Outcome::Bounced, 1)
            .unwrap();
        shard.durable(seq).await.unwrap();
        shard.close().await.unwrap();
        (ids[1], new_location)
    });

    let report = find_message(dir.path(), message_id, Some(&keyring)).unwrap();
    assert_eq!(report.copies.len(), 1);
    let found = &report.copies[0];
    assert_eq!(found.record, new_location);
    assert_eq!(found.body_bytes, 100_000);
    assert_eq!(
        found.states,
        vec![
            RecipientState::Pending {
                attempts: 1,
                next_attempt_us: 7
            },
            RecipientState::Bounced,
        ]
    );
}
