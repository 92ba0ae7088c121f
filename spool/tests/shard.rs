//! Shard behaviour over real segment files: round trips, encryption, key
//! rotation, recovery and reclamation.

mod common;

use std::rc::Rc;

use caduceus_spool::{AppendError, Keyring, Outcome, RecipientState, Shard, SpoolError, inspect};
use common::{body, envelope, options, run, test_keyring};

fn segment_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| {
            path.extension()
                .is_some_and(|extension| extension == "spool")
        })
        .collect();
    files.sort();
    files
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

fn round_trip(keyring: Option<Keyring>) {
    let dir = tempfile::tempdir().unwrap();
    let encrypted = keyring.is_some();
    let keyring_again = keyring.as_ref().map(|_| test_keyring(1, 7));
    let (written, records) = run(async {
        let (shard, recovered, _) = Shard::open(options(dir.path(), keyring)).await.unwrap();
        assert!(recovered.is_empty());
        let mut written = Vec::new();
        let mut records = Vec::new();
        for tag in 0..20 {
            let envelope = envelope(tag, 2);
            let body = body(tag, 2048);
            let (record, seq) = shard.append_message(&envelope, &body).unwrap();
            shard.durable(seq).await.unwrap();
            let stored = shard.read_message(record).unwrap();
            assert_eq!(stored.envelope, envelope);
            assert_eq!(stored.body, body);
            written.push((envelope, body));
            records.push(record);
        }
        shard.close().await.unwrap();
        (written, records)
    });

    // Reopen: every message comes back from disk, pending.
    run(async {
        let (shard, recovered, report) = Shard::open(options(dir.path(), keyring_again))
            .await
            .unwrap();
        assert_eq!(report.records, 20);
        assert!(report.quarantined.is_empty());
        assert_eq!(recovered.len(), 20);
        for (message, (envelope, body)) in recovered.iter().zip(&written) {
            assert_eq!(&message.envelope, envelope);
            assert_eq!(message.states.len(), 2);
            let stored = shard.read_message(message.record).unwrap();
            assert_eq!(&stored.body, body);
        }
        assert_eq!(
            recovered
                .iter()
                .map(|message| message.record)
                .collect::<Vec<_>>(),
            records
        );
        shard.close().await.unwrap();
    });

    let files = segment_files(dir.path());
    assert!(!files.is_empty());
    let raw: Vec<u8> = files
        .iter()
        .flat_map(|path| std::fs::read(path).unwrap())
        .collect();
    assert_eq!(contains(&raw, b"odd patient 5-1"), !encrypted);
    assert_eq!(contains(&raw, b"confidential-5"), !encrypted);
}

#[test]
fn round_trip_without_encryption() {
    round_trip(None);
}

#[test]
fn round_trip_with_encryption() {
    round_trip(Some(test_keyring(1, 7)));
}

/// No address, sender, ORCPT, ENVID, subject or body text may appear in a
/// segment file when encryption is on, checked like `strings` would.
#[test]
fn encrypted_segment_has_no_clear_text() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let (shard, _, _) = Shard::open(options(dir.path(), Some(test_keyring(1, 9))))
            .await
            .unwrap();
        for tag in 0..10 {
            let (record, _) = shard
                .append_message(&envelope(tag, 3), &body(tag, 500))
                .unwrap();
            shard
                .append_outcome(record, 1, Outcome::Delivered, 1)
                .unwrap();
        }
        shard.close().await.unwrap();
    });
    for path in segment_files(dir.path()) {
        let raw = std::fs::read(&path).unwrap();
        // Collect printable runs of 4 or more bytes, as strings(1) does.
        let mut runs = Vec::new();
        let mut current = Vec::new();
        for &byte in &raw {
            if byte.is_ascii_graphic() || byte == b' ' {
                current.push(byte);
            } else {
                if current.len() >= 4 {
                    runs.push(String::from_utf8(current.clone()).unwrap());
                }
                current.clear();
            }
        }
        for run in &runs {
            for forbidden in [
                "example",
                "patient",
                "clinic",
                "envid",
                "rfc822",
                "Subject",
                "confidential",
                "xxxx",
            ] {
                assert!(
                    !run.contains(forbidden),
                    "{} contains {run:?}",
                    path.display()
                );
            }
        }
    }
}

#[test]
fn key_rotation_keeps_old_records_readable() {
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("spool.keys");
    let spool_dir = dir.path().join("spool");
    let mut keyring = Keyring::load_or_create(&key_path).unwrap();
    assert_eq!(keyring.active_id(), 1);

    let first = run(async {
        let (shard, _, _) = Shard::open(options(&spool_dir, Some(keyring_clone(&key_path))))
            .await
            .unwrap();
        let (record, seq) = shard
            .append_message(&envelope(1, 1), &body(1, 100))
            .unwrap();
        shard.durable(seq).await.unwrap();
        shard.close().await.unwrap();
        record
    });

    assert_eq!(keyring.rotate().unwrap(), 2);
    keyring.save(&key_path).unwrap();
    let reloaded = Keyring::load_or_create(&key_path).unwrap();
    assert_eq!(reloaded.key_ids(), vec![1, 2]);
    assert_eq!(reloaded.active_id(), 2);

    let second = run(async {
        let (shard, recovered, _) = Shard::open(options(&spool_dir, Some(reloaded)))
            .await
            .unwrap();
        assert_eq!(recovered.len(), 1);
        assert_eq!(recovered[0].record, first);
        assert_eq!(shard.read_message(first).unwrap().body, body(1, 100));
        let (record, seq) = shard
            .append_message(&envelope(2, 1), &body(2, 100))
            .unwrap();
        shard.durable(seq).await.unwrap();
        shard.close().await.unwrap();
        record
    });

    let records = inspect::scan(&spool_dir, None).unwrap();
    let key_of = |record| {
        records
            .iter()
            .find(|found| found.record == record)
            .map(|found| found.key_id)
    };
    assert_eq!(key_of(first), Some(1));
    assert_eq!(key_of(second), Some(2));

    // Without key 1 the shard must refuse to open rather than drop mail.
    let only_second = Keyring::from_hex(2, &hex::encode([0u8; 32])).unwrap();
    let refused = run(Shard::open(options(&spool_dir, Some(only_second))));
    assert!(
        matches!(refused, Err(SpoolError::MissingKey { key_id: 1, .. })),
        "{:?}",
        refused.err()
    );
}

fn keyring_clone(path: &std::path::Path) -> Keyring {
    Keyring::load_or_create(path).unwrap()
}

#[test]
fn keyring_rejects_group_readable_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.keys");
    Keyring::load_or_create(&path).unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    let error = Keyring::load_or_create(&path).unwrap_err().to_string();
    assert!(error.contains("0640"), "{error}");
    assert!(
        error.contains(&format!("chmod 600 {}", path.display())),
        "{error}"
    );
}

#[test]
fn recovery_returns_only_pending_recipients() {
    let dir = tempfile::tempdir().unwrap();
    let (pending, partly, done) = run(async {
        let (shard, _, _) = Shard::open(options(dir.path(), Some(test_keyring(1, 3))))
            .await
            .unwrap();
        let (pending, _) = shard.append_message(&envelope(1, 2), &body(1, 10)).unwrap();
        let (partly, _) = shard.append_message(&envelope(2, 2), &body(2, 10)).unwrap();
        let (done, _) = shard.append_message(&envelope(3, 2), &body(3, 10)).unwrap();
        shard
            .append_outcome(
                pending,
                0,
                Outcome::Deferred {
                    next_attempt_us: 111,
                },
                1,
            )
            .unwrap();
        shard
            .append_outcome(
                pending,
                0,
                Outcome::Deferred {
                    next_attempt_us: 222,
                },
                2,
            )
            .unwrap();
        shard
            .append_outcome(partly, 0, Outcome::Delivered, 1)
            .unwrap();
        shard
            .append_outcome(done, 0, Outcome::Delivered, 1)
            .unwrap();
        let seq = shard.append_outcome(done, 1, Outcome::Bounced, 3).unwrap();
        shard.durable(seq).await.unwrap();
        shard.close().await.unwrap();
        (pending, partly, done)
    });
    run(async {
        let (shard, recovered, _) = Shard::open(options(dir.path(), Some(test_keyring(1, 3))))
            .await
            .unwrap();
        let records: Vec<_> = recovered.iter().map(|message| message.record).collect();
        assert_eq!(records, vec![pending, partly]);
        assert!(!records.contains(&done));
        assert_eq!(
            recovered[0].states,
            vec![
                RecipientState::Pending {
                    attempts: 2,
                    next_attempt_us: 222
                },
                RecipientState::Pending {
                    attempts: 0,
                    next_attempt_us: 0
                },
            ]
        );
        assert_eq!(
            recovered[1].states,
            vec![
                RecipientState::Delivered,
                RecipientState::Pending {
                    attempts: 0,
                    next_attempt_us: 0
                }
            ]
        );
        assert_eq!(shard.stats().live_records, 2);
        // The finished message is no longer live, so outcomes for it are rejected.
        assert!(matches!(
            shard.append_outcome(done, 0, Outcome::Delivered, 1),
            Err(AppendError::UnknownMessage(_))
        ));
        shard.close().await.unwrap();
    });
}

#[test]
fn deleted_outcome_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let record = run(async {
        let (shard, _, _) = Shard::open(options(dir.path(), Some(test_keyring(1, 3))))
            .await
            .unwrap();
        let (record, _) = shard.append_message(&envelope(1, 2), &body(1, 10)).unwrap();
        let seq = shard
            .append_outcome(record, 0, Outcome::Deleted, 0)
            .unwrap();
        shard.durable(seq).await.unwrap();
        shard.close().await.unwrap();
        record
    });
    run(async {
        let (shard, recovered, _) = Shard::open(options(dir.path(), Some(test_keyring(1, 3))))
            .await
            .unwrap();
        assert_eq!(recovered.len(), 1);
        assert_eq!(recovered[0].record, record);
        assert_eq!(
            recovered[0].states,
            vec![
                RecipientState::Deleted,
                RecipientState::Pending {
                    attempts: 0,
                    next_attempt_us: 0
                },
            ]
        );
        shard.close().await.unwrap();
    });
}

#[test]
fn reclamation_deletes_final_segments() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let mut opts = options(dir.path(), None);
        opts.segment_size_bytes = 16 * 1024;
        let (shard, _, _) = Shard::open(opts).await.unwrap();
        let shard: Rc<Shard> = shard;
        // 3 KiB bodies: four messages per 16 KiB segment.
        let mut records = Vec::new();
        for tag in 0..12 {
            let (record, seq) = shard
                .append_message(&envelope(tag, 1), &body(tag, 3000))
                .unwrap();
            shard.durable(seq).await.unwrap();
            records.push(record);
        }
        let first_segment = records[0].segment;
        let last_segment = records.last().unwrap().segment;
        assert!(last_segment >= first_segment + 2);
        let before = segment_files(dir.path()).len();

        // Finishing every message of the first segment deletes its file.
        for record in records
            .iter()
            .filter(|record| record.segment == first_segment)
        {
            let seq = shard
                .append_outcome(*record, 0, Outcome::Delivered, 1)
                .unwrap();
            shard.durable(seq).await.unwrap();
            shard.release(*record);
        }
        let after = segment_files(dir.path());
        assert_eq!(after.len(), before - 1);
        assert!(!after.iter().any(|path| {
            path.to_string_lossy()
                .contains(&format!("segment-{first_segment:010}"))
        }));

        // The active segment survives even when nothing in it is live.
        for record in records
            .iter()
            .filter(|record| record.segment == last_segment)
        {
            shard.release(*record);
        }
        assert!(segment_files(dir.path()).iter().any(|path| {
            path.to_string_lossy()
                .contains(&format!("segment-{last_segment:010}"))
        }));
        shard.close().await.unwrap();
    });
}

#[test]
fn oversized_record_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let mut opts = options(dir.path(), None);
        opts.segment_size_bytes = 8192;
        let (shard, _, _) = Shard::open(opts).await.unwrap();
        let result = shard.append_message(&envelope(1, 1), &body(1, 9000));
        assert!(
            matches!(result, Err(AppendError::TooLarge { .. })),
            "{result:?}"
        );
        // The shard keeps working after the rejection.
        let (_, seq) = shard
            .append_message(&envelope(2, 1), &body(2, 100))
            .unwrap();
        shard.durable(seq).await.unwrap();
        shard.close().await.unwrap();
    });
}

#[test]
fn closed_shard_rejects_appends() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let (shard, _, _) = Shard::open(options(dir.path(), None)).await.unwrap();
        shard.close().await.unwrap();
        assert!(matches!(
            shard.append_message(&envelope(1, 1), b"x"),
            Err(AppendError::Closed)
        ));
    });
}

#[test]
fn inspect_lists_records_and_damage() {
    use caduceus_spool::inspect::RecordSummary;
    use std::os::unix::fs::FileExt;

    let dir = tempfile::tempdir().unwrap();
    let (records, ids) = run(async {
        let (shard, _, _) = Shard::open(options(dir.path(), Some(test_keyring(1, 5))))
            .await
            .unwrap();
        let mut records = Vec::new();
        let mut ids = Vec::new();
        for tag in 0..3 {
            let envelope = envelope(tag, 1);
            ids.push(envelope.message_id.to_string());
            records.push(shard.append_message(&envelope, &body(tag, 300)).unwrap().0);
        }
        shard
            .append_outcome(records[0], 0, Outcome::Deferred { next_attempt_us: 5 }, 1)
            .unwrap();
        shard.close().await.unwrap();
        (records, ids)
    });

    let keyring = test_keyring(1, 5);
    let listed = inspect::scan(dir.path(), Some(&keyring)).unwrap();
    assert_eq!(listed.len(), 4);
    for (found, id) in listed.iter().zip(&ids) {
        assert_eq!(found.shard, 3);
        assert_eq!(
            found.summary,
            RecordSummary::Message {
                message_id: Some(id.clone()),
                body_bytes: Some(300),
                relocated_from: None,
            }
        );
    }
    assert!(matches!(
        listed[3].summary,
        RecordSummary::Outcome { message: Some(message), recipient_index: Some(0), attempts: Some(1), .. } if message == records[0]
    ));
    let stored = inspect::read_message(dir.path(), 3, records[1], Some(&keyring)).unwrap();
    assert_eq!(stored.body, body(1, 300));

    // Without a keyring only clear metadata is shown.
    let blind = inspect::scan(dir.path(), None).unwrap();
    assert_eq!(
        blind[0].summary,
        RecordSummary::Message {
            message_id: None,
            body_bytes: None,
            relocated_from: None,
        }
    );
    assert_eq!(
        blind[0].payload_error.as_deref(),
        Some("encrypted; no keyring given")
    );

    // A flipped byte inside the middle record shows up as damage.
    let path = segment_files(dir.path()).remove(0);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, records[1].offset + 100)
        .unwrap();
    file.write_all_at(&[byte[0] ^ 1], records[1].offset + 100)
        .unwrap();
    let listed = inspect::scan(dir.path(), Some(&keyring)).unwrap();
    let damaged: Vec<_> = listed
        .iter()
        .filter(|found| matches!(found.summary, RecordSummary::Damaged { .. }))
        .collect();
    assert_eq!(damaged.len(), 1);
    assert_eq!(damaged[0].record, records[1]);
}

#[test]
fn reader_reads_from_another_thread() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();
    let (sender, receiver) = std::sync::mpsc::channel();
    let (done_sender, done_receiver) = std::sync::mpsc::channel::<()>();

    // The delivery core: reads each record reference it is sent.
    let reader_thread = std::thread::spawn(move || {
        let keyring = std::sync::Arc::new(test_keyring(1, 8));
        let reader = caduceus_spool::SpoolReader::new(&path, Some(keyring));
        let mut bodies = Vec::new();
        while let Ok(record) = receiver.recv() {
            bodies.push(reader.read_message(3, record).unwrap().body);
        }
        let bad = caduceus_spool::RecordRef {
            segment: 1,
            offset: 1 << 40,
        };
        assert!(reader.read_message(3, bad).is_err());
        assert!(
            reader
                .read_message(
                    3,
                    caduceus_spool::RecordRef {
                        segment: 999,
                        offset: 64
                    }
                )
                .is_err()
        );
        done_sender.send(()).unwrap();
        bodies
    });

    // The owning core: appends and hands over references while appending more.
    run(async {
        let (shard, _, _) = Shard::open(options(dir.path(), Some(test_keyring(1, 8))))
            .await
            .unwrap();
        for tag in 0..50 {
            let (record, seq) = shard
                .append_message(&envelope(tag, 1), &body(tag, 1000))
                .unwrap();
            shard.durable(seq).await.unwrap();
            sender.send(record).unwrap();
        }
        drop(sender);
        shard.close().await.unwrap();
    });
    done_receiver.recv().unwrap();
    let bodies = reader_thread.join().unwrap();
    assert_eq!(bodies.len(), 50);
    for (tag, found) in bodies.iter().enumerate() {
        assert_eq!(found, &body(tag as u32, 1000));
    }
}
