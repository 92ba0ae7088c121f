//! Tamper-evidence tests over streams built by the real writer.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::AuditEvent;
use super::chain::{
    LEGACY_CHECKPOINT_FILE, Record, StreamWriter, checkpoint_file_name, file_name,
    list_checkpoint_files, list_streams,
};
use super::date::{DAY_US, Date};
use super::key::AuditKey;
use super::record::Fields;
use super::verify::{ProblemKind, Report, latest_checkpoints, parse_anchors, verify};

/// 2026-12-04 00:00 UTC plus one hour.
const BASE_US: u64 = 20_791 * DAY_US + 3_600_000_000;
const RECORDS: u64 = 10_000;
const RETENTION: Duration = Duration::from_secs(2190 * 86_400);

/// An `admin` record that owns its destination, so that tests can build
/// one per index.
struct AdminRecord {
    destination: String,
}

impl Record for AdminRecord {
    fn write_fields(&self, fields: &mut Fields<'_>) {
        AuditEvent::Admin {
            operator_uid: 1000,
            command: "queue.hold",
            destination: Some(&self.destination),
            address_hmac: None,
        }
        .write_fields(fields);
    }
}

fn admin_event(index: u64) -> AdminRecord {
    AdminRecord {
        destination: format!("d{index}.example"),
    }
}

/// Writes `RECORDS` records through the writer, syncing every 100, and
/// closes the stream (which writes a final checkpoint).
fn build_stream() -> (tempfile::TempDir, PathBuf, String) {
    let directory = tempfile::tempdir().unwrap();
    let dir = directory.path().join("audit");
    let key = Arc::new(AuditKey::generate().unwrap());
    let public = key.public_hex().to_string();
    let (mut writer, _) = StreamWriter::open(&dir, "core-0", key, RETENTION, BASE_US).unwrap();
    for index in 0..RECORDS {
        writer.stage(&admin_event(index), BASE_US + index).unwrap();
        if index % 100 == 99 {
            writer.write_and_sync().unwrap();
        }
    }
    writer.close().unwrap();
    let file = dir.join(file_name("core-0", Date::from_unix_us(BASE_US)));
    (directory, file, public)
}

fn lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut text = lines.join("\n");
    text.push('\n');
    fs::write(path, text).unwrap();
}

fn only_problem(report: &Report) -> &super::verify::Problem {
    assert_eq!(
        report.problems.len(),
        1,
        "expected one problem, got {:#?}",
        report.problems
    );
    &report.problems[0]
}

#[test]
fn untouched_stream_verifies() {
    let (directory, file, public) = build_stream();
    let report = verify(&directory.path().join("audit"), &public, &[]);
    assert!(report.problems.is_empty(), "{:#?}", report.problems);
    let summary = &report.streams["core-0"];
    assert_eq!(summary.records, RECORDS);
    assert_eq!(summary.first_seq, 1);
    assert_eq!(summary.last_seq, RECORDS);
    // Every 1000 records plus the close.
    assert!(summary.checkpoints_checked >= RECORDS / 1000);
    assert_eq!(lines(&file).len() as u64, RECORDS);
}

#[test]
fn edited_byte_names_the_record() {
    let (directory, file, public) = build_stream();
    let mut content = fs::read(&file).unwrap();
    let line_starts: Vec<usize> = std::iter::once(0)
        .chain(
            content
                .iter()
                .enumerate()
                .filter(|(_, byte)| **byte == b'\n')
                .map(|(index, _)| index + 1),
        )
        .collect();
    // Change one digit of the destination in record 5000 (line 5000).
    let line_start = line_starts[4999];
    let line_end = line_starts[5000] - 1;
    let position = (line_start..line_end)
        .rev()
        .find(|index| content[*index].is_ascii_digit())
        .unwrap();
    content[position] = if content[position] == b'9' {
        b'8'
    } else {
        b'9'
    };
    fs::write(&file, content).unwrap();

    let report = verify(&directory.path().join("audit"), &public, &[]);
    let problem = &report.problems[0];
    assert_eq!(problem.kind, ProblemKind::Edited, "{problem}");
    assert_eq!(problem.line, Some(5000), "{problem}");
    assert_eq!(problem.seq, Some(5000), "{problem}");
    assert_eq!(
        problem.file.as_deref(),
        file.file_name().and_then(|name| name.to_str())
    );
}

#[test]
fn deleted_line_names_the_gap() {
    let (directory, file, public) = build_stream();
    let mut all = lines(&file);
    all.remove(6999);
    write_lines(&file, &all);

    let report = verify(&directory.path().join("audit"), &public, &[]);
    // The checkpoint at seq 7000 also names the missing record.
    assert!(
        report
            .problems
            .iter()
            .all(|problem| problem.kind == ProblemKind::Removed),
        "{:#?}",
        report.problems
    );
    let problem = &report.problems[0];
    assert_eq!(problem.line, Some(7000), "{problem}");
    assert_eq!(problem.seq, Some(7001), "{problem}");
    assert!(problem.detail.contains("7000..=7000"), "{problem}");
}

#[test]
fn inserted_line_is_named() {
    let (directory, file, public) = build_stream();
    let mut all = lines(&file);
    let copy = all[2999].clone();
    all.insert(3000, copy);
    write_lines(&file, &all);

    let report = verify(&directory.path().join("audit"), &public, &[]);
    let problem = &report.problems[0];
    assert_eq!(problem.kind, ProblemKind::Inserted, "{problem}");
    assert_eq!(problem.line, Some(3000), "{problem}");
}

#[test]
fn truncated_tail_is_reported() {
    let (directory, file, public) = build_stream();
    let mut all = lines(&file);
    all.truncate(9_500);
    write_lines(&file, &all);

    let report = verify(&directory.path().join("audit"), &public, &[]);
    assert!(!report.problems.is_empty());
    assert!(
        report
            .problems
            .iter()
            .all(|problem| problem.kind == ProblemKind::Truncated),
        "{:#?}",
        report.problems
    );
    assert!(
        report.problems[0].detail.contains("ends at seq 9500"),
        "{}",
        report.problems[0]
    );
}

#[test]
fn torn_last_line_is_reported() {
    let (directory, file, public) = build_stream();
    let mut content = fs::read(&file).unwrap();
    content.truncate(content.len() - 10);
    fs::write(&file, content).unwrap();

    let report = verify(&directory.path().join("audit"), &public, &[]);
    assert_eq!(report.problems[0].kind, ProblemKind::TornLine);
    assert_eq!(report.problems[0].line, Some(RECORDS));
}

/// An insider who recomputes every hash after an edit keeps the chain
/// consistent; the signed checkpoint still disagrees.
#[test]
fn rewritten_chain_fails_the_checkpoint() {
    let (directory, file, public) = build_stream();
    let mut all = lines(&file);
    all[1233] = all[1233].replace("d1233.example", "x1233.example");
    let mut previous = super::chain::line_hash(all[1232].as_bytes());
    for line in all.iter_mut().skip(1233) {
        let mut value: serde_json::Value = serde_json::from_str(line).unwrap();
        value["prev"] = serde_json::Value::String(previous);
        *line = serde_json::to_string(&value).unwrap();
        previous = super::chain::line_hash(line.as_bytes());
    }
    write_lines(&file, &all);

    let report = verify(&directory.path().join("audit"), &public, &[]);
    assert!(!report.problems.is_empty());
    assert!(
        report
            .problems
            .iter()
            .all(|problem| problem.kind == ProblemKind::Rewritten),
        "{:#?}",
        report.problems
    );
    assert_eq!(
        report.problems[0].seq,
        Some(2000),
        "first checkpoint after the edit"
    );
}

#[test]
fn anchor_detects_truncation_past_it() {
    let (directory, file, public) = build_stream();
    let dir = directory.path().join("audit");
    let anchors = parse_anchors(&latest_checkpoints(&dir).unwrap().join("\n")).unwrap();
    assert_eq!(anchors.len(), 1);
    assert_eq!(anchors[0].seq, RECORDS);

    // The insider cuts the stream and the checkpoint files back together.
    let mut all = lines(&file);
    all.truncate(8_000);
    write_lines(&file, &all);
    for (_, path) in list_checkpoint_files(&dir).unwrap() {
        fs::remove_file(path).unwrap();
    }

    let without = verify(&dir, &public, &[]);
    assert!(without.problems.is_empty(), "nothing on the host can tell");
    let with = verify(&dir, &public, &anchors);
    let problem = only_problem(&with);
    assert_eq!(problem.kind, ProblemKind::Truncated, "{problem}");
    assert!(problem.detail.contains("anchor"), "{problem}");
}

#[test]
fn forged_checkpoint_signature_is_rejected() {
    let (directory, _file, public) = build_stream();
    let dir = directory.path().join("audit");
    let path = dir.join(checkpoint_file_name(Date::from_unix_us(BASE_US)));
    let text = fs::read_to_string(&path)
        .unwrap()
        .replacen("\"seq\":1000,", "\"seq\":999,", 1);
    fs::write(&path, text).unwrap();
    let report = verify(&dir, &public, &[]);
    let problem = only_problem(&report);
    assert_eq!(problem.kind, ProblemKind::BadCheckpoint, "{problem}");
}

#[test]
fn reopen_continues_chain_and_cuts_torn_tail() {
    let directory = tempfile::tempdir().unwrap();
    let dir = directory.path().join("audit");
    let key = Arc::new(AuditKey::generate().unwrap());
    let public = key.public_hex().to_string();
    let (mut writer, _) =
        StreamWriter::open(&dir, "core-1", key.clone(), RETENTION, BASE_US).unwrap();
    for index in 0..10 {
        writer.stage(&admin_event(index), BASE_US).unwrap();
    }
    writer.close().unwrap();
    drop(writer);
    let file = dir.join(file_name("core-1", Date::from_unix_us(BASE_US)));
    let mut content = fs::read(&file).unwrap();
    content.extend_from_slice(b"{\"seq\":11,\"prev\":\"ab");
    fs::write(&file, content).unwrap();

    let (mut writer, recovery) =
        StreamWriter::open(&dir, "core-1", key, RETENTION, BASE_US).unwrap();
    assert_eq!(recovery.torn_bytes, 20);
    assert_eq!(writer.head().seq, 10);
    writer.stage(&admin_event(10), BASE_US).unwrap();
    writer.close().unwrap();

    let report = verify(&dir, &public, &[]);
    assert!(report.problems.is_empty(), "{:#?}", report.problems);
    assert_eq!(report.streams["core-1"].last_seq, 11);
}

#[test]
fn rotation_continues_chain_and_retention_is_recorded() {
    let directory = tempfile::tempdir().unwrap();
    let dir = directory.path().join("audit");
    let key = Arc::new(AuditKey::generate().unwrap());
    let public = key.public_hex().to_string();
    let retention = Duration::from_secs(2 * 86_400);
    let (mut writer, _) =
        StreamWriter::open(&dir, "core-0", key.clone(), retention, BASE_US).unwrap();
    for day in 0..6u64 {
        for index in 0..5 {
            writer
                .stage(&admin_event(index), BASE_US + day * DAY_US + index)
                .unwrap();
        }
        writer.write_and_sync().unwrap();
    }
    writer.close().unwrap();

    let streams = list_streams(&dir).unwrap();
    let files: Vec<String> = streams[0].1.iter().map(|(day, _)| day.compact()).collect();
    // Days 0..=5 were written; with 2 days of retention, days 0, 1 and 2
    // were deleted by the rotations to days 3, 4 and 5 in turn.
    assert_eq!(files, ["20261207", "20261208", "20261209"]);
    let text = fs::read_to_string(&streams[0].1[0].1).unwrap();
    assert!(text.contains("retention_deleted"), "{text}");

    let report = verify(&dir, &public, &[]);
    assert!(report.problems.is_empty(), "{:#?}", report.problems);

    // Deleting the oldest remaining file without a retention record is
    // named.
    fs::remove_file(&streams[0].1[0].1).unwrap();
    let report = verify(&dir, &public, &[]);
    assert!(
        report
            .problems
            .iter()
            .any(|problem| problem.kind == ProblemKind::Removed),
        "{:#?}",
        report.problems
    );
}

#[test]
fn report_lists_outcomes_per_recipient() {
    let directory = tempfile::tempdir().unwrap();
    let dir = directory.path().join("audit");
    let key = Arc::new(AuditKey::generate().unwrap());
    let (mut writer, _) = StreamWriter::open(&dir, "core-0", key, RETENTION, BASE_US).unwrap();
    let accepted = AuditEvent::Accepted {
        message_id: caduceus_spool::MessageId([1; 16]),
        lane: "transactional",
        category: "care",
        peer_uid: 65534,
        peer_gid: 65534,
        peer_pid: 42,
        recipients: 2,
        size_bytes: 100,
        received_at_us: BASE_US,
        spool: Some(caduceus_spool::RecordRef {
            segment: 1,
            offset: 64,
        }),
        recovered: false,
        from_shard: None,
    };
    writer.stage(&accepted, BASE_US).unwrap();
    for (outcome, attempt) in [("deferred", 1), ("delivered", 2)] {
        let record = super::OutcomeRecord {
            outcome,
            message_id: "01010101010101010101010101010101",
            lane: "transactional",
            category: "care",
            recipient: Some("hmac:ab,cd"),
            remote_host: Some("mx.example"),
            remote_ip: Some("127.0.0.9"),
            reply_code: Some(250),
            tls_version: Some("TLSv1.3"),
            tls_cipher: Some("TLS13_AES_256_GCM_SHA384"),
            attempt: Some(attempt),
            received_at_us: BASE_US,
        };
        writer
            .stage(&AuditEvent::Outcome(record), BASE_US + 1000)
            .unwrap();
    }
    writer.close().unwrap();

    let day = Date::from_unix_us(BASE_US);
    let rows = super::report::build(&dir, day, day).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].peer_uid, Some(65534));
    assert_eq!(rows[0].recipients.len(), 2);
    assert_eq!(rows[0].recipients[0].outcome, "delivered");
    assert_eq!(rows[0].recipients[0].attempts, 2);
    assert_eq!(rows[0].recipients[1].outcome, "pending");
    let csv = super::report::to_csv(&rows);
    assert!(csv.contains("\"hmac:ab,cd\",delivered,2,250"), "{csv}");

    let next = Date::from_days(day.to_days() + 1);
    assert!(super::report::build(&dir, next, next).unwrap().is_empty());
}

/// Creates a state directory with auditing on, for the tests that run an
/// executor's stream.
fn audited_state() -> (tempfile::TempDir, caduceus_policy::config::Config) {
    let directory = tempfile::tempdir().unwrap();
    let config = caduceus_policy::config::Config {
        state_dir: directory.path().to_path_buf(),
        ..Default::default()
    };
    std::fs::create_dir_all(directory.path().join("keys")).unwrap();
    (directory, config)
}

fn test_envelope(id: u8) -> caduceus_spool::Envelope {
    caduceus_spool::Envelope {
        message_id: caduceus_spool::MessageId([id; 16]),
        received_at_us: BASE_US,
        expires_at_us: BASE_US + DAY_US,
        lane: caduceus_policy::Lane::Transactional,
        category: caduceus_policy::Category::Care,
        sender: "clinic@example.org".into(),
        envid: None,
        ret: None,
        body_8bit: false,
        smtputf8: false,
        peer_uid: 4242,
        peer_gid: 4343,
        peer_pid: 99,
        recipients: vec![caduceus_spool::Recipient {
            address: "patient@example.net".into(),
            domain: "example.net".into(),
            notify: 0,
            orcpt: None,
        }],
    }
}

/// Runs one start of executor 3: installs its stream, opens its spool shard
/// with the audit check, runs `work` and, when `close` is set, closes the
/// stream. Without `close` the staged records are dropped, as a crash
/// would drop them. Returns what `work` returns.
fn run_core<T: Send + 'static>(
    config: &caduceus_policy::config::Config,
    close: bool,
    work: impl AsyncFnOnce(std::rc::Rc<caduceus_spool::Shard>) -> T + Send + 'static,
) -> T {
    let config = config.clone();
    glommio::LocalExecutorBuilder::default()
        .spawn(move || async move {
            let setup = super::AuditSetup::open(&config)
                .unwrap()
                .expect("auditing is on by default");
            super::install_core(&setup, 3).unwrap();
            let mut options = caduceus_spool::SpoolOptions::new(config.spool_dir(), 3);
            options.segment_size_bytes = 1 << 20;
            options.reserve_bytes = 0;
            options.list_appends = super::appends_to_check();
            let (spool, _, report) = caduceus_spool::Shard::open(options).await.unwrap();
            super::reconcile_spool(&spool, &report).unwrap();
            let result = work(spool.clone()).await;
            if close {
                super::close_core().await;
            } else {
                super::CORE.with(|core| core.borrow_mut().take());
            }
            spool.close().await.unwrap();
            result
        })
        .unwrap()
        .join()
        .unwrap()
}

fn audit_lines(state: &Path, stream: &str) -> Vec<serde_json::Value> {
    stream_files_of(state, stream)
        .iter()
        .flat_map(|path| {
            fs::read_to_string(path)
                .unwrap()
                .lines()
                .map(|line| serde_json::from_str(line).unwrap())
                .collect::<Vec<_>>()
        })
        .collect()
}

fn events_of<'a>(lines: &'a [serde_json::Value], event: &str) -> Vec<&'a serde_json::Value> {
    lines.iter().filter(|line| line["event"] == event).collect()
}

#[test]
fn accepted_record_synced_at_close() {
    let (directory, config) = audited_state();
    run_core(&config, true, async |spool| {
        let envelope = test_envelope(7);
        let (record, seq) = spool.append_message(&envelope, b"body").unwrap();
        super::accepted(&envelope, record, 123).unwrap();
        spool.durable(seq).await.unwrap();
    });
    let lines = audit_lines(directory.path(), "core-3");
    let accepted = events_of(&lines, "accepted");
    assert_eq!(accepted.len(), 1, "{lines:#?}");
    assert_eq!(accepted[0]["peer_uid"], 4242);
    assert_eq!(accepted[0]["size_bytes"], 123);
    assert_eq!(accepted[0]["received_at_us"], BASE_US);
    assert!(accepted[0]["spool"].as_str().unwrap().starts_with("1:"));
    assert!(accepted[0].get("recovered").is_none());

    let dir = directory.path().join("log").join("audit");
    let public = super::key::read_public_hex(&directory.path().join("keys")).unwrap();
    let report = verify(&dir, &public, &[]);
    assert!(report.problems.is_empty(), "{:#?}", report.problems);
    assert!(report.streams["core-3"].checkpoints_checked >= 1);
}

/// A crash after the spool's commit and before the audit flush: the next
/// start rebuilds the `accepted` record from the spool, once.
#[test]
fn accepted_record_rebuilt_after_crash() {
    let (directory, config) = audited_state();
    let audit_dir = directory.path().join("log").join("audit");
    // A first start, which leaves a reconciled empty spool behind.
    run_core(&config, true, async |_| ());
    let before: Vec<(PathBuf, Vec<u8>)> = fs::read_dir(&audit_dir)
        .unwrap()
        .map(|entry| {
            let path = entry.unwrap().path();
            let bytes = fs::read(&path).unwrap();
            (path, bytes)
        })
        .collect();
    let records = run_core(&config, false, async |spool| {
        let mut records = Vec::new();
        for id in [1, 2] {
            let envelope = test_envelope(id);
            let (record, seq) = spool.append_message(&envelope, b"body").unwrap();
            super::accepted(&envelope, record, 4).unwrap();
            spool.durable(seq).await.unwrap();
            records.push(super::reconcile::location(record));
        }
        records
    });
    // The audit files lose what the crash kept from the disk.
    for (path, bytes) in &before {
        fs::write(path, bytes).unwrap();
    }
    run_core(&config, true, async |_| ());
    let lines = audit_lines(directory.path(), "core-3");
    let accepted = events_of(&lines, "accepted");
    assert_eq!(accepted.len(), 2, "{lines:#?}");
    for (line, record) in accepted.iter().zip(&records) {
        assert_eq!(line["recovered"], true);
        assert_eq!(line["spool"], record.as_str());
        assert_eq!(line["peer_uid"], 4242);
        assert_eq!(line["size_bytes"], 4);
        assert_eq!(line["received_at_us"], BASE_US);
    }
    let reconciled = events_of(&lines, "spool_reconciled");
    assert_eq!(reconciled.last().unwrap()["recovered"], 2);
    assert_eq!(reconciled.last().unwrap()["spool"], records[1].as_str());

    // The next start finds nothing to rebuild.
    run_core(&config, true, async |_| ());
    let lines = audit_lines(directory.path(), "core-3");
    assert_eq!(events_of(&lines, "accepted").len(), 2);
    assert_eq!(
        events_of(&lines, "spool_reconciled").last().unwrap()["recovered"],
        0
    );
    let public = super::key::read_public_hex(&directory.path().join("keys")).unwrap();
    let report = verify(&audit_dir, &public, &[]);
    assert!(report.problems.is_empty(), "{:#?}", report.problems);
}

/// A finished message stays in the spool until its audit records are
/// durable, because the spool record is what a lost record is rebuilt
/// from.
#[test]
fn release_waits_for_the_audit_sync() {
    let (_directory, config) = audited_state();
    let (held, released) = run_core(&config, true, async |spool| {
        let envelope = test_envelope(9);
        let (record, seq) = spool.append_message(&envelope, b"body").unwrap();
        super::accepted(&envelope, record, 4).unwrap();
        spool.durable(seq).await.unwrap();
        super::release(&spool, record);
        let held = spool.stats().live_records;
        super::sync_all().await.unwrap();
        (held, spool.stats().live_records)
    });
    assert_eq!((held, released), (1, 0));
}

fn stream_files_of(state: &Path, stream: &str) -> Vec<PathBuf> {
    list_streams(&state.join("log").join("audit"))
        .unwrap()
        .into_iter()
        .find(|(name, _)| name == stream)
        .map(|(_, files)| files.into_iter().map(|(_, path)| path).collect())
        .unwrap_or_default()
}

/// Writes `per_day` records on each of `days` consecutive days from
/// `BASE_US` through one writer, syncing every 100, and closes it.
fn build_days(
    dir: &Path,
    stream: &str,
    key: &Arc<AuditKey>,
    retention: Duration,
    days: u64,
    per_day: u64,
) {
    let (mut writer, _) = StreamWriter::open(dir, stream, key.clone(), retention, BASE_US).unwrap();
    for day in 0..days {
        for index in 0..per_day {
            writer
                .stage(&admin_event(index), BASE_US + day * DAY_US + index)
                .unwrap();
            if index % 100 == 99 {
                writer.write_and_sync().unwrap();
            }
        }
        writer.write_and_sync().unwrap();
    }
    writer.close().unwrap();
}

/// Returns the days (YYYYMMDD) of the daily checkpoint files in `dir`.
fn checkpoint_days(dir: &Path) -> Vec<String> {
    list_checkpoint_files(dir)
        .unwrap()
        .into_iter()
        .filter_map(|(day, _)| day.map(Date::compact))
        .collect()
}

#[test]
fn checkpoint_files_rotate_with_retention() {
    let directory = tempfile::tempdir().unwrap();
    let dir = directory.path().join("audit");
    let key = Arc::new(AuditKey::generate().unwrap());
    let public = key.public_hex().to_string();
    build_days(
        &dir,
        "core-0",
        &key,
        Duration::from_secs(2 * 86_400),
        6,
        1500,
    );

    // With 2 days of retention, the rotations to days 3, 4 and 5 deleted
    // the stream files and checkpoint files of days 0, 1 and 2.
    assert_eq!(checkpoint_days(&dir), ["20261207", "20261208", "20261209"]);
    assert!(!dir.join(LEGACY_CHECKPOINT_FILE).exists());
    let streams = list_streams(&dir).unwrap();
    assert_eq!(streams.len(), 1, "checkpoint files are not a stream");
    let text: String = streams[0]
        .1
        .iter()
        .map(|(_, path)| fs::read_to_string(path).unwrap())
        .collect();
    assert!(text.contains("\"event\":\"checkpoints_deleted\""), "{text}");
    assert!(text.contains("checkpoints-20261204.jsonl"));

    // Each remaining day has its 1000-record checkpoint and the rotation
    // or close checkpoint, and each names a stream file of its own day.
    for (day, path) in list_checkpoint_files(&dir).unwrap() {
        let day = day.expect("only daily files");
        let checkpoint_lines = lines(&path);
        assert!(checkpoint_lines.len() >= 2, "{checkpoint_lines:?}");
        for line in checkpoint_lines {
            let checkpoint: super::chain::Checkpoint = serde_json::from_str(&line).unwrap();
            assert_eq!(checkpoint.file, file_name("core-0", day));
        }
    }
    let report = verify(&dir, &public, &[]);
    assert!(report.problems.is_empty(), "{:#?}", report.problems);
    assert!(report.streams["core-0"].checkpoints_checked >= 6);
}

/// A chain rewritten with fresh hashes from an older day onward is caught
/// by that day's checkpoint, which sits in the rotated checkpoint file.
#[test]
fn rewritten_chain_fails_rotated_checkpoint() {
    let directory = tempfile::tempdir().unwrap();
    let dir = directory.path().join("audit");
    let key = Arc::new(AuditKey::generate().unwrap());
    let public = key.public_hex().to_string();
    build_days(&dir, "core-0", &key, RETENTION, 3, 500);

    // Edit record 123 on day 0, then rehash every later record of every
    // file, as an insider who has read the chain rule would.
    let files: Vec<PathBuf> = list_streams(&dir).unwrap()[0]
        .1
        .iter()
        .map(|(_, path)| path.clone())
        .collect();
    assert_eq!(files.len(), 3);
    let mut previous: Option<String> = None;
    for path in &files {
        let mut all = lines(path);
        for line in all.iter_mut() {
            let mut value: serde_json::Value = serde_json::from_str(line).unwrap();
            if value["seq"] == 123 {
                value["destination"] = serde_json::Value::String("forged.example".into());
            }
            if let Some(hash) = previous.take() {
                value["prev"] = serde_json::Value::String(hash);
            }
            *line = serde_json::to_string(&value).unwrap();
            previous = Some(super::chain::line_hash(line.as_bytes()));
        }
        write_lines(path, &all);
    }

    let report = verify(&dir, &public, &[]);
    assert!(!report.problems.is_empty(), "the rewrite went unnoticed");
    assert!(
        report
            .problems
            .iter()
            .all(|problem| problem.kind == ProblemKind::Rewritten),
        "{:#?}",
        report.problems
    );
    // The first checkpoint after the edit is day 0's rotation checkpoint
    // at seq 500, and only the rotated file of day 0 contains it.
    let first = &report.problems[0];
    assert_eq!(first.seq, Some(500), "{first}");
    let day_0 =
        fs::read_to_string(dir.join(checkpoint_file_name(Date::from_unix_us(BASE_US)))).unwrap();
    assert!(day_0.contains("\"seq\":500,"), "{day_0}");
}

#[test]
fn anchor_verifies_across_checkpoint_rotation() {
    let directory = tempfile::tempdir().unwrap();
    let dir = directory.path().join("audit");
    let key = Arc::new(AuditKey::generate().unwrap());
    let public = key.public_hex().to_string();
    let retention = Duration::from_secs(2 * 86_400);
    build_days(&dir, "core-0", &key, retention, 2, 50);
    let early = parse_anchors(&latest_checkpoints(&dir).unwrap().join("\n")).unwrap();
    assert_eq!(early[0].seq, 100);

    // Four more days: retention deletes the files the early anchor names.
    let (mut writer, _) =
        StreamWriter::open(&dir, "core-0", key.clone(), retention, BASE_US + DAY_US).unwrap();
    for day in 2..6u64 {
        for index in 0..50 {
            writer
                .stage(&admin_event(index), BASE_US + day * DAY_US + index)
                .unwrap();
        }
        writer.write_and_sync().unwrap();
    }
    writer.close().unwrap();
    assert_eq!(checkpoint_days(&dir), ["20261207", "20261208", "20261209"]);
    let late = parse_anchors(&latest_checkpoints(&dir).unwrap().join("\n")).unwrap();
    assert_eq!(late.len(), 1);
    let report = verify(&dir, &public, &[early[0].clone(), late[0].clone()]);
    assert!(report.problems.is_empty(), "{:#?}", report.problems);

    // The insider cuts the newest day's file and every checkpoint file.
    let newest = dir.join(file_name(
        "core-0",
        Date::from_unix_us(BASE_US + 5 * DAY_US),
    ));
    let mut all = lines(&newest);
    all.truncate(10);
    write_lines(&newest, &all);
    for (_, path) in list_checkpoint_files(&dir).unwrap() {
        fs::remove_file(path).unwrap();
    }
    let with = verify(&dir, &public, &late);
    let problem = only_problem(&with);
    assert_eq!(problem.kind, ProblemKind::Truncated, "{problem}");
    assert!(problem.detail.contains("anchor"), "{problem}");
}

/// A stream that stopped writing keeps its newest file, so the checkpoint
/// file of that day is kept too, while older days' files expire.
#[test]
fn idle_stream_keeps_its_checkpoint_file() {
    let directory = tempfile::tempdir().unwrap();
    let dir = directory.path().join("audit");
    let key = Arc::new(AuditKey::generate().unwrap());
    let public = key.public_hex().to_string();
    let retention = Duration::from_secs(2 * 86_400);
    let (mut idle, _) =
        StreamWriter::open(&dir, "core-1", key.clone(), retention, BASE_US + DAY_US).unwrap();
    idle.stage(&admin_event(0), BASE_US + DAY_US).unwrap();
    idle.close().unwrap();
    drop(idle);
    build_days(&dir, "core-0", &key, retention, 6, 20);

    assert_eq!(
        checkpoint_days(&dir),
        ["20261205", "20261207", "20261208", "20261209"]
    );
    let report = verify(&dir, &public, &[]);
    assert!(report.problems.is_empty(), "{:#?}", report.problems);
    assert_eq!(report.streams["core-1"].checkpoints_checked, 1);
}

#[test]
fn legacy_checkpoint_file_is_still_verified() {
    let (directory, _file, public) = build_stream();
    let dir = directory.path().join("audit");
    let daily = dir.join(checkpoint_file_name(Date::from_unix_us(BASE_US)));
    fs::rename(&daily, dir.join(LEGACY_CHECKPOINT_FILE)).unwrap();
    let report = verify(&dir, &public, &[]);
    assert!(report.problems.is_empty(), "{:#?}", report.problems);
    assert!(report.streams["core-0"].checkpoints_checked >= RECORDS / 1000);
    assert_eq!(latest_checkpoints(&dir).unwrap().len(), 1);

    let path = dir.join(LEGACY_CHECKPOINT_FILE);
    let text = fs::read_to_string(&path)
        .unwrap()
        .replacen("\"seq\":1000,", "\"seq\":999,", 1);
    fs::write(&path, text).unwrap();
    let report = verify(&dir, &public, &[]);
    let problem = only_problem(&report);
    assert_eq!(problem.kind, ProblemKind::BadCheckpoint, "{problem}");
    assert_eq!(problem.file.as_deref(), Some(LEGACY_CHECKPOINT_FILE));
}

#[test]
fn checkpoint_stream_name_is_rejected() {
    let directory = tempfile::tempdir().unwrap();
    let key = Arc::new(AuditKey::generate().unwrap());
    let result = StreamWriter::open(directory.path(), "checkpoints", key, RETENTION, BASE_US);
    let error = result.err().expect("reserved name accepted");
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput);
}

/// Every record kind, staged in order into a new stream, writes exactly
/// the bytes of `testdata/records-v1.jsonl`. That file was written by the
/// serde_json encoder of earlier versions from the same records, so a
/// stream keeps one format across the upgrade. The strings include
/// characters that JSON escapes and U+007F, which it does not.
#[test]
fn record_lines_match_earlier_encoder() {
    let directory = tempfile::tempdir().unwrap();
    let dir = directory.path().join("audit");
    let key = Arc::new(AuditKey::generate().unwrap());
    let (mut writer, _) = StreamWriter::open(&dir, "core-0", key, RETENTION, BASE_US).unwrap();

    let id = caduceus_spool::MessageId([
        0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd,
        0xef,
    ]);
    let id_text = id.to_string();
    let location = |segment, offset| caduceus_spool::RecordRef { segment, offset };
    let retention_files = [
        "core-0-20200101.jsonl".to_string(),
        "core-0-20200102.jsonl".into(),
    ];
    let checkpoint_files = ["checkpoints-20200101.jsonl".to_string()];

    let events = [
        AuditEvent::Started { pid: 4321 },
        AuditEvent::Accepted {
            message_id: id,
            lane: "bulk",
            category: "care",
            peer_uid: 1000,
            peer_gid: 100,
            peer_pid: 77,
            recipients: 3,
            size_bytes: 2048,
            received_at_us: BASE_US,
            spool: Some(location(7, 4096)),
            recovered: false,
            from_shard: None,
        },
        AuditEvent::Accepted {
            message_id: id,
            lane: "transactional",
            category: "marketing",
            peer_uid: 0,
            peer_gid: 0,
            peer_pid: 0,
            recipients: 1,
            size_bytes: 0,
            received_at_us: u64::MAX,
            spool: None,
            recovered: true,
            from_shard: Some(3),
        },
        AuditEvent::Adopted {
            message_id: id,
            from_shard: 2,
            lane: "bulk",
            category: "transactional",
            recipients: 5,
            spool: location(1, 0),
        },
        AuditEvent::SpoolReconciled {
            spool: Some(location(3, 128)),
            recovered: 2,
        },
        AuditEvent::SpoolReconciled {
            spool: None,
            recovered: 0,
        },
        AuditEvent::Outcome(super::OutcomeRecord {
            outcome: "delivered",
            message_id: &id_text,
            lane: "bulk",
            category: "care",
            recipient: Some("a\"b\\c\u{1}\u{7f}é\n\t@x.example"),
            remote_host: Some("mx.example"),
            remote_ip: Some("127.0.0.9"),
            reply_code: Some(250),
            tls_version: Some("TLSv1.3"),
            tls_cipher: Some("TLS13_AES_256_GCM_SHA384"),
            attempt: Some(1),
            received_at_us: BASE_US,
        }),
        AuditEvent::Outcome(super::OutcomeRecord {
            outcome: "deleted",
            message_id: &id_text,
            lane: "bulk",
            category: "care",
            recipient: None,
            remote_host: None,
            remote_ip: None,
            reply_code: None,
            tls_version: None,
            tls_cipher: None,
            attempt: None,
            received_at_us: 0,
        }),
        AuditEvent::Dsn {
            message_id: &id_text,
            dsn_message_id: "ffffffffffffffffffffffffffffffff",
            action: "failed",
            lane: "transactional",
            spool: location(9, 10),
        },
        AuditEvent::Admin {
            operator_uid: 1000,
            command: "suppress.add",
            destination: Some("d.example"),
            address_hmac: Some("hmac:00ff"),
        },
        AuditEvent::Admin {
            operator_uid: 0,
            command: "policy.reload",
            destination: None,
            address_hmac: None,
        },
        AuditEvent::EnvelopeViewed {
            operator_uid: 5,
            message_id: &id_text,
            shard: 1,
        },
        AuditEvent::ContentViewed {
            operator_uid: 6,
            message_id: &id_text,
            shard: 65535,
        },
        AuditEvent::RetentionDeleted {
            files: &retention_files,
            through_seq: 99,
            retention_days: 2190,
        },
        AuditEvent::RetentionDeleted {
            files: &[],
            through_seq: 0,
            retention_days: 0,
        },
        AuditEvent::CheckpointsDeleted {
            files: &checkpoint_files,
            retention_days: 7,
        },
        AuditEvent::TornTailDiscarded {
            file: "core-0-20261204.jsonl",
            bytes: 20,
        },
    ];
    for (index, event) in events.iter().enumerate() {
        writer.stage(event, BASE_US + index as u64).unwrap();
    }
    writer.write_out().unwrap();

    let written = fs::read(dir.join(file_name("core-0", Date::from_unix_us(BASE_US)))).unwrap();
    let expected: &[u8] = include_bytes!("testdata/records-v1.jsonl");
    let written_lines: Vec<&[u8]> = written.split(|byte| *byte == b'\n').collect();
    let expected_lines: Vec<&[u8]> = expected.split(|byte| *byte == b'\n').collect();
    assert_eq!(written_lines.len(), expected_lines.len());
    for (index, (written, expected)) in written_lines.iter().zip(&expected_lines).enumerate() {
        assert_eq!(
            String::from_utf8_lossy(written),
            String::from_utf8_lossy(expected),
            "line {}",
            index + 1
        );
    }
}
