use std::io::Write;
use std::path::Path;
use std::time::Duration;

use caduceus_policy::config::{Config, WebhookEvent};
use serde_json::{Map, Value, json};

use super::*;
use crate::deliverylog::LogFileId;

fn file(core: u16, generation: u32) -> LogFileId {
    LogFileId {
        core,
        day: 20_261_204,
        generation,
    }
}

fn write_file(dir: &Path, id: LogFileId, text: &str) {
    std::fs::write(dir.join(id.file_name()), text).expect("write log file");
}

fn append(dir: &Path, id: LogFileId, text: &str) {
    let mut handle = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.join(id.file_name()))
        .expect("open log file");
    handle.write_all(text.as_bytes()).expect("append");
}

fn line(event: &str, message_id: &str) -> String {
    format!("{}\n", json!({ "event": event, "message_id": message_id }))
}

fn message_ids(batch: &Batch) -> Vec<String> {
    batch
        .events
        .iter()
        .map(|event| event["message_id"].as_str().unwrap_or("").to_string())
        .collect()
}

fn reader(dir: &Path) -> LogReader {
    LogReader::new(dir, "test", &WebhookEvent::ALL)
}

#[test]
fn reader_follows_rotation_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_file(
        dir.path(),
        file(0, 0),
        &(line("received", "a") + &line("delivered", "a")),
    );
    write_file(dir.path(), file(0, 1), &line("received", "b"));
    let mut reader = reader(dir.path());
    let batch = reader.read_batch(&Cursor::default(), 100).expect("read");
    assert_eq!(message_ids(&batch), ["a", "a", "b"]);
    let position = batch.end.position(0).expect("core 0 position");
    assert_eq!(position.file, file(0, 1));
    assert_eq!(position.offset_bytes, line("received", "b").len() as u64);

    // Nothing new: the same cursor comes back.
    let again = reader.read_batch(&batch.end, 100).expect("read again");
    assert!(again.events.is_empty());
    assert_eq!(again.end, batch.end);
}

#[test]
fn reader_stops_at_batch_size_and_resumes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text: String = (0..10).map(|n| line("received", &n.to_string())).collect();
    write_file(dir.path(), file(0, 0), &text);
    let mut reader = reader(dir.path());
    let first = reader.read_batch(&Cursor::default(), 4).expect("read");
    assert_eq!(message_ids(&first), ["0", "1", "2", "3"]);
    let second = reader.read_batch(&first.end, 100).expect("read");
    assert_eq!(message_ids(&second), ["4", "5", "6", "7", "8", "9"]);
}

#[test]
fn reader_leaves_line_being_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_file(
        dir.path(),
        file(0, 0),
        &(line("received", "a") + "{\"event\":\"deliv"),
    );
    let mut reader = reader(dir.path());
    let batch = reader.read_batch(&Cursor::default(), 100).expect("read");
    assert_eq!(message_ids(&batch), ["a"]);
    append(dir.path(), file(0, 0), "ered\",\"message_id\":\"a\"}\n");
    let batch = reader.read_batch(&batch.end, 100).expect("read");
    assert_eq!(message_ids(&batch), ["a"]);
    assert_eq!(batch.events[0]["event"], "delivered");
}

#[test]
fn reader_skips_torn_line_of_complete_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_file(
        dir.path(),
        file(0, 0),
        &(line("received", "a") + "{\"event\":\"deliv"),
    );
    write_file(dir.path(), file(0, 1), &line("received", "b"));
    let mut reader = reader(dir.path());
    let batch = reader.read_batch(&Cursor::default(), 100).expect("read");
    assert_eq!(message_ids(&batch), ["a", "b"]);
}

#[test]
fn reader_skips_invalid_lines() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = line("received", "a")
        + "not json\n"
        + "[1,2]\n"
        + "{\"no_event\":true}\n"
        + "\n"
        + &line("bounced", "b");
    write_file(dir.path(), file(0, 0), &text);
    let mut reader = reader(dir.path());
    let batch = reader.read_batch(&Cursor::default(), 100).expect("read");
    assert_eq!(message_ids(&batch), ["a", "b"]);
    assert_eq!(
        batch.end.position(0).map(|position| position.offset_bytes),
        Some(text.len() as u64)
    );
}

#[test]
fn reader_skips_overlong_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let long = format!(
        "{{\"event\":\"received\",\"message_id\":\"{}\"}}\n",
        "x".repeat(MAX_LINE_BYTES as usize + 10)
    );
    let text = line("received", "a") + &long + &line("received", "b");
    write_file(dir.path(), file(0, 0), &text);
    let mut reader = reader(dir.path());
    let batch = reader.read_batch(&Cursor::default(), 100).expect("read");
    assert_eq!(message_ids(&batch), ["a", "b"]);
}

#[test]
fn reader_filters_events_but_passes_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = line("received", "a") + &line("deferred", "a") + &line("delivered", "a");
    write_file(dir.path(), file(0, 0), &text);
    let mut reader = LogReader::new(dir.path(), "test", &[WebhookEvent::Delivered]);
    let batch = reader.read_batch(&Cursor::default(), 100).expect("read");
    assert_eq!(batch.events.len(), 1);
    assert_eq!(batch.events[0]["event"], "delivered");
    assert_eq!(
        batch.end.position(0).map(|position| position.offset_bytes),
        Some(text.len() as u64)
    );
}

#[test]
fn reader_moves_past_deleted_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_file(dir.path(), file(0, 3), &line("received", "c"));
    let mut cursor = Cursor::default();
    cursor.set(Position {
        file: file(0, 1),
        offset_bytes: 17,
    });
    let batch = reader(dir.path()).read_batch(&cursor, 100).expect("read");
    assert_eq!(message_ids(&batch), ["c"]);
}

#[test]
fn reader_reads_every_core() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_file(dir.path(), file(0, 0), &line("received", "zero"));
    write_file(dir.path(), file(1, 0), &line("received", "one"));
    std::fs::write(dir.path().join("delivery.log"), line("received", "legacy"))
        .expect("write legacy file");
    let batch = reader(dir.path())
        .read_batch(&Cursor::default(), 100)
        .expect("read");
    let mut ids = message_ids(&batch);
    ids.sort();
    assert_eq!(ids, ["one", "zero"]);
    assert!(batch.end.position(0).is_some());
    assert!(batch.end.position(1).is_some());
}

#[test]
fn reader_alternates_first_core() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_file(dir.path(), file(0, 0), &line("received", "zero"));
    write_file(dir.path(), file(1, 0), &line("received", "one"));
    let mut reader = reader(dir.path());
    let first = reader.read_batch(&Cursor::default(), 1).expect("read");
    let second = reader.read_batch(&Cursor::default(), 1).expect("read");
    assert_ne!(message_ids(&first), message_ids(&second));
}

#[test]
fn cursor_round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ehr.cursor");
    assert_eq!(
        Cursor::load(&path).expect("missing is empty"),
        Cursor::default()
    );
    let mut cursor = Cursor::default();
    cursor.set(Position {
        file: file(0, 2),
        offset_bytes: 4096,
    });
    cursor.set(Position {
        file: file(5, 0),
        offset_bytes: 0,
    });
    cursor.store(&path).expect("store");
    assert_eq!(Cursor::load(&path).expect("load"), cursor);
    assert!(!dir.path().join("ehr.cursor.tmp").exists());
}

#[test]
fn cursor_rejects_invalid_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ehr.cursor");
    for text in [
        "",
        "{",
        "{\"version\":2,\"positions\":[]}",
        "{\"version\":1,\"positions\":[{\"file\":\"../etc/passwd\",\"offset_bytes\":0}]}",
        "{\"version\":1,\"positions\":[{\"file\":\"delivery.0.20261204.0.log\",\"offset_bytes\":-1}]}",
        "{\"version\":1,\"positions\":[{\"file\":\"delivery.0.20261204.0.log\",\"offset_bytes\":0},{\"file\":\"delivery.0.20261204.1.log\",\"offset_bytes\":0}]}",
    ] {
        std::fs::write(&path, text).expect("write cursor");
        assert!(
            matches!(Cursor::load(&path), Err(CursorError::Invalid { .. })),
            "{text:?} was accepted"
        );
    }
}

fn fields(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

#[test]
fn idempotency_key_separates_fields() {
    let base = fields(json!({
        "event": "deferred", "message_id": "m1", "recipient": "a@example.org", "attempt": 2,
        "at_us": 1
    }));
    let same_event_later = fields(json!({
        "event": "deferred", "message_id": "m1", "recipient": "a@example.org", "attempt": 2,
        "at_us": 99
    }));
    let next_attempt = fields(json!({
        "event": "deferred", "message_id": "m1", "recipient": "a@example.org", "attempt": 3
    }));
    let shifted = fields(json!({
        "event": "deferred", "message_id": "m1a", "recipient": "@example.org", "attempt": 2
    }));
    let key = idempotency_key(&base);
    assert_eq!(key.len(), 64);
    assert_eq!(key, idempotency_key(&same_event_later));
    assert_ne!(key, idempotency_key(&next_attempt));
    assert_ne!(key, idempotency_key(&shifted));
}

#[test]
fn signature_is_hmac_sha256_of_body() {
    // RFC 4231 §4.3, test case 2.
    let secret = WebhookSecret::new(b"Jefe");
    assert_eq!(
        secret.signature(b"what do ya want for nothing?"),
        "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
}

#[test]
fn backoff_doubles_to_cap_with_jitter() {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
    let mut rng = rand::thread_rng();
    let ceilings_ms = [100, 200, 400, 800, 1000, 1000, 1000];
    for ceiling_ms in ceilings_ms {
        let delay = backoff.next_delay(&mut rng);
        let ceiling = Duration::from_millis(ceiling_ms);
        assert!(delay <= ceiling, "{delay:?} above {ceiling:?}");
        assert!(delay >= ceiling / 2, "{delay:?} below half of {ceiling:?}");
    }
    for _ in 0..100 {
        assert!(backoff.next_delay(&mut rng) <= Duration::from_secs(1));
    }
    backoff.reset();
    assert!(backoff.next_delay(&mut rng) <= Duration::from_millis(100));
}

fn config_with(toml_text: &str) -> Result<Config, String> {
    caduceus_policy::parse_config(toml_text, "test.toml").map_err(|error| error.to_string())
}

#[test]
fn config_rejects_bad_webhooks() {
    let cases = [
        (
            "name = \"../x\"\nurl = \"http://127.0.0.1/\"\nsecret_file = \"/s\"",
            "name",
        ),
        (
            "name = \"a\"\nurl = \"ftp://127.0.0.1/\"\nsecret_file = \"/s\"",
            "url",
        ),
        (
            "name = \"a\"\nurl = \"http:///x\"\nsecret_file = \"/s\"",
            "url",
        ),
        (
            "name = \"a\"\nurl = \"http://127.0.0.1/\"\nsecret_file = \"/s\"\nevents = [\"opened\"]",
            "opened",
        ),
        (
            "name = \"a\"\nurl = \"http://127.0.0.1/\"\nsecret_file = \"/s\"\nbatch_size = 0",
            "batch_size",
        ),
        ("name = \"a\"\nurl = \"http://127.0.0.1/\"", "secret_file"),
    ];
    for (table, expected) in cases {
        let error = config_with(&format!("[[webhook]]\n{table}\n")).expect_err(table);
        assert!(error.contains(expected), "{table}: {error}");
    }
    let error = config_with("[delivery_log]\nmax_file_bytes = 10\n").expect_err("tiny file size");
    assert!(error.contains("max_file_bytes"), "{error}");
}

#[test]
fn prepare_rejects_duplicate_names_and_weak_secrets() {
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "0123456789abcdef0123\n").expect("write secret");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let table = |name: &str, url: &str, secret: &Path| {
        format!(
            "[[webhook]]\nname = \"{name}\"\nurl = \"{url}\"\nsecret_file = \"{}\"\n",
            secret.display()
        )
    };
    let state = format!("state_dir = \"{}\"\n", dir.path().join("state").display());

    let good = config_with(&(state.clone() + &table("ehr", "http://127.0.0.1:9/e", &secret)))
        .expect("config");
    let endpoints = prepare(&good).expect("prepare");
    assert_eq!(endpoints.len(), 1);
    assert_eq!(endpoints[0].events, WebhookEvent::ALL);
    let mode = std::fs::metadata(dir.path().join("state").join("webhooks"))
        .expect("cursor dir")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);

    let twice = state.clone()
        + &table("ehr", "http://127.0.0.1:9/e", &secret)
        + &table("ehr", "http://127.0.0.1:9/f", &secret);
    let error = prepare(&config_with(&twice).expect("config")).expect_err("duplicate names");
    assert!(error.contains("\"ehr\""), "{error}");

    let credentials = state.clone() + &table("ehr", "http://user:pw@127.0.0.1:9/e", &secret);
    let error = prepare(&config_with(&credentials).expect("config")).expect_err("credentials");
    assert!(error.contains("credentials"), "{error}");

    let short = dir.path().join("short");
    std::fs::write(&short, "tooshort  \n").expect("write secret");
    std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let error = prepare(
        &config_with(&(state.clone() + &table("ehr", "http://127.0.0.1:9/e", &short)))
            .expect("config"),
    )
    .expect_err("short secret");
    assert!(error.contains("8 bytes"), "{error}");

    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let error = prepare(&good).expect_err("readable secret");
    assert!(error.contains("0644"), "{error}");

    let missing = state + &table("ehr", "http://127.0.0.1:9/e", &dir.path().join("absent"));
    let error = prepare(&config_with(&missing).expect("config")).expect_err("missing secret");
    assert!(error.contains("absent"), "{error}");
}
