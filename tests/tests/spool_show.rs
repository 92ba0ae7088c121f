//! `caduceus spool show` end to end: the envelope from the running engine
//! and from the files of a stopped one, the content only through the
//! running engine with a `content_viewed` audit record, and clear errors
//! for unknown and invalid ids.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;

use caduceus_tests::{Engine, Lane, Swaks};
use common::{CARE_SENDER, WAIT, binary, control_audit, engine_config, state_dir};

/// A marker that appears only in the body, never in the envelope.
const BODY_MARKER: &str = "body-marker-5c1e0b";
const SUBJECT: &str = "screening results ready";

/// Runs `caduceus ARGS --config CONFIG` and returns (success, stdout,
/// stderr).
fn run_caduceus(args: &[&str], config: &Path) -> (bool, String, String) {
    let output = Command::new(binary())
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("run caduceus");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn own_uid() -> u64 {
    let output = Command::new("id").arg("-u").output().expect("run id -u");
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .expect("id -u prints a number")
}

/// Returns the control stream's records whose event is `event`.
fn control_events(state: &Path, event: &str) -> Vec<serde_json::Value> {
    control_audit(state)
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).expect("audit line is JSON"))
        .filter(|record| record["event"] == event)
        .collect()
}

/// Sends one raw JSON line to the control socket and returns the reply.
fn control_request(socket: &Path, request: &str) -> serde_json::Value {
    control_request_bytes(socket, format!("{request}\n").as_bytes())
}

/// Sends raw bytes to the control socket and returns the reply line.
fn control_request_bytes(socket: &Path, request: &[u8]) -> serde_json::Value {
    let mut stream = UnixStream::connect(socket).expect("connect to the control socket");
    // The engine stops reading an over-long request after its limit and
    // closes the socket, so the rest of such a write may fail.
    if let Err(error) = stream.write_all(request) {
        assert_eq!(error.kind(), std::io::ErrorKind::BrokenPipe, "{error}");
    }
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .expect("read the reply");
    serde_json::from_str(&line).expect("the reply is JSON")
}

/// Starts an engine whose `held.test` mail stays queued, submits one
/// message with two recipients there, and returns the engine and the
/// message id.
fn engine_with_queued_message(state: &Path) -> (Engine, String) {
    let config = format!(
        "{}\n[[rule]]\ndomain = \"held.test\"\nroute = \"127.0.0.1:9\"\nhold = true\n",
        engine_config(None)
    );
    let engine = Engine::start(&config, &state.join("engine")).expect("engine start");
    let body = format!("Subject: {SUBJECT}\r\n\r\nYour results: {BODY_MARKER}\r\n");
    let output = Swaks::socket(engine.socket(Lane::Bulk))
        .from(CARE_SENDER)
        .to("patient.one@held.test")
        .to("patient.two@held.test")
        .data(body.as_bytes())
        .run()
        .expect("swaks");
    assert!(output.status.success(), "swaks failed: {output:?}");
    let log = common::wait_for_log(&engine, |entry| entry["event"] == "received", WAIT);
    let received: Vec<_> = log
        .iter()
        .filter(|entry| entry["event"] == "received")
        .collect();
    assert_eq!(received.len(), 1, "{log:?}");
    let message_id = received[0]["message_id"]
        .as_str()
        .expect("message id in the delivery log")
        .to_string();
    (engine, message_id)
}

fn assert_envelope(stdout: &str, message_id: &str) {
    assert!(
        stdout.contains(&format!("message id:   {message_id}")),
        "{stdout}"
    );
    assert!(stdout.contains("lane:         bulk"), "{stdout}");
    assert!(stdout.contains("category:     care"), "{stdout}");
    assert!(
        stdout.contains(&format!("sender:       <{CARE_SENDER}>")),
        "{stdout}"
    );
    assert!(stdout.contains("recipients:   2"), "{stdout}");
    assert!(
        stdout.contains("<patient.one@held.test> pending"),
        "{stdout}"
    );
    assert!(
        stdout.contains("<patient.two@held.test> pending"),
        "{stdout}"
    );
    // Encryption is on by default, so the record is sealed with key 1.
    assert!(stdout.contains(", key id 1"), "{stdout}");
    assert!(!stdout.contains(BODY_MARKER), "body leaked: {stdout}");
    assert!(!stdout.contains(SUBJECT), "subject leaked: {stdout}");
}

#[test]
fn show_running_then_stopped_engine() {
    let state = state_dir();
    let (mut engine, message_id) = engine_with_queued_message(state.path());
    let config = engine.state_dir().join("caduceus.toml");
    let uid = own_uid();

    // The envelope, from the owning core, with no content.
    let (success, stdout, stderr) = run_caduceus(&["spool", "show", &message_id], &config);
    assert!(success, "{stderr}");
    assert_envelope(&stdout, &message_id);
    assert!(!stdout.contains("engine stopped"), "{stdout}");
    let viewed = control_events(engine.state_dir(), "envelope_viewed");
    assert_eq!(viewed.len(), 1, "{viewed:?}");
    assert_eq!(viewed[0]["message_id"], message_id.as_str());
    assert_eq!(viewed[0]["operator_uid"], uid);
    assert!(control_events(engine.state_dir(), "content_viewed").is_empty());

    // The content, audited with the operator's uid and without the content.
    let (success, stdout, stderr) =
        run_caduceus(&["spool", "show", &message_id, "--content"], &config);
    assert!(success, "{stderr}");
    assert!(stdout.contains(BODY_MARKER), "{stdout}");
    assert!(stdout.contains(SUBJECT), "{stdout}");
    let viewed = control_events(engine.state_dir(), "content_viewed");
    assert_eq!(viewed.len(), 1, "{viewed:?}");
    assert_eq!(viewed[0]["message_id"], message_id.as_str());
    assert_eq!(viewed[0]["operator_uid"], uid);
    let audit = control_audit(engine.state_dir());
    assert!(
        !audit.contains(BODY_MARKER),
        "content in the audit: {audit}"
    );
    assert!(!audit.contains(SUBJECT), "subject in the audit: {audit}");

    // An id no message has.
    let unknown = "0123456789abcdef0123456789abcdef";
    let (success, stdout, stderr) = run_caduceus(&["spool", "show", unknown, "--content"], &config);
    assert!(!success, "{stdout}");
    assert!(stderr.contains(unknown), "{stderr}");
    assert!(
        stderr.contains("not in the running engine's queue"),
        "{stderr}"
    );
    assert_eq!(
        control_events(engine.state_dir(), "content_viewed").len(),
        1
    );

    // Text that is not an id.
    let (success, _, stderr) = run_caduceus(&["spool", "show", "not-an-id"], &config);
    assert!(!success);
    assert!(
        stderr.contains("invalid message id \"not-an-id\""),
        "{stderr}"
    );

    // Requests that bypass the CLI's own checks.
    let socket = engine.state_dir().join("run").join("control.sock");
    let cases = [
        (r#"{"command":"spool.show"}"#, "invalid message id \"\""),
        (
            r#"{"command":"spool.show","message_id":"zz"}"#,
            "invalid message id \"zz\"",
        ),
        (
            r#"{"command":"spool.show","message_id":12345,"content":true}"#,
            "invalid message id \"\"",
        ),
    ];
    for (request, expected) in cases {
        let response = control_request(&socket, request);
        assert_eq!(response["ok"], false, "{request}: {response}");
        let error = response["error"].as_str().unwrap_or_default();
        assert!(error.contains(expected), "{request}: {response}");
        assert!(response.get("message").is_none(), "{request}: {response}");
    }
    let response = control_request(
        &socket,
        &format!(r#"{{"command":"spool.show","message_id":"{message_id}","content":"yes"}}"#),
    );
    assert_eq!(response["ok"], false, "{response}");
    assert!(
        response["error"]
            .as_str()
            .unwrap_or_default()
            .contains("must be true or false"),
        "{response}"
    );
    assert!(response.get("message").is_none(), "{response}");
    let response = control_request_bytes(&socket, b"\xff\xfe\n");
    assert!(
        response["error"]
            .as_str()
            .unwrap_or_default()
            .contains("not UTF-8"),
        "{response}"
    );
    let mut long = vec![b' '; 2 << 20];
    long.push(b'\n');
    let response = control_request_bytes(&socket, &long);
    assert!(
        response["error"]
            .as_str()
            .unwrap_or_default()
            .contains("longer than"),
        "{response}"
    );
    assert_eq!(
        control_events(engine.state_dir(), "content_viewed").len(),
        1
    );

    engine.sigterm().expect("SIGTERM");
    let status = engine.wait_exit(WAIT).expect("engine exit");
    assert!(
        status.success(),
        "engine exit: {status:?}\n{}",
        engine.stderr()
    );

    // Stopped: the envelope comes from the spool files.
    let (success, stdout, stderr) = run_caduceus(&["spool", "show", &message_id], &config);
    assert!(success, "{stderr}");
    assert!(stdout.contains("engine stopped"), "{stdout}");
    assert_envelope(&stdout, &message_id);

    // Stopped: content is refused, since nothing could audit it.
    let (success, stdout, stderr) =
        run_caduceus(&["spool", "show", &message_id, "--content"], &config);
    assert!(!success, "{stdout}");
    assert!(!stdout.contains(BODY_MARKER), "{stdout}");
    assert!(stderr.contains("Start the engine"), "{stderr}");

    let (success, _, stderr) = run_caduceus(&["spool", "show", unknown], &config);
    assert!(!success);
    assert!(
        stderr.contains(&format!("message {unknown} not found in the spool")),
        "{stderr}"
    );

    // The new audit events keep the hash chain verifiable.
    let (success, stdout, stderr) = run_caduceus(&["audit", "verify"], &config);
    assert!(success, "{stdout}{stderr}");
}

#[test]
fn show_reports_deleted_recipient() {
    let state = state_dir();
    let config = format!(
        "{}\n[[rule]]\ndomain = \"held.test\"\nroute = \"127.0.0.1:9\"\nhold = true\n\
         [[rule]]\ndomain = \"kept.test\"\nroute = \"127.0.0.1:9\"\nhold = true\n",
        engine_config(None)
    );
    let mut engine = Engine::start(&config, &state.path().join("engine")).expect("engine start");
    let output = Swaks::socket(engine.socket(Lane::Bulk))
        .from(CARE_SENDER)
        .to("patient.one@held.test")
        .to("patient.two@kept.test")
        .data(format!("Subject: {SUBJECT}\r\n\r\nBody\r\n").as_bytes())
        .run()
        .expect("swaks");
    assert!(output.status.success(), "swaks failed: {output:?}");
    let log = common::wait_for_log(&engine, |entry| entry["event"] == "received", WAIT);
    let message_id = log
        .iter()
        .find(|entry| entry["event"] == "received")
        .and_then(|entry| entry["message_id"].as_str())
        .expect("message id in the delivery log")
        .to_string();

    let socket = engine.state_dir().join("run").join("control.sock");
    let response = control_request(
        &socket,
        r#"{"command":"queue.delete","destination":"held.test"}"#,
    );
    assert_eq!(response["ok"], true, "{response}");
    let config_path = engine.state_dir().join("caduceus.toml");
    let (success, stdout, stderr) = run_caduceus(&["spool", "show", &message_id], &config_path);
    assert!(success, "{stderr}");
    assert!(
        stdout.contains("<patient.one@held.test> deleted"),
        "{stdout}"
    );
    assert!(
        stdout.contains("<patient.two@kept.test> pending"),
        "{stdout}"
    );

    // The spool files contain the deleted outcome too, so the stopped
    // engine shows the same.
    engine.sigterm().expect("SIGTERM");
    let status = engine.wait_exit(WAIT).expect("engine exit");
    assert!(status.success(), "engine exit: {status:?}");
    let (success, stdout, stderr) = run_caduceus(&["spool", "show", &message_id], &config_path);
    assert!(success, "{stderr}");
    assert!(stdout.contains("engine stopped"), "{stdout}");
    assert!(
        stdout.contains("<patient.one@held.test> deleted"),
        "{stdout}"
    );
}
