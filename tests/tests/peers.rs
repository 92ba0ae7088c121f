//! Smoke tests of the harness itself: each peer starts, serves and records
//! what the engine's end-to-end tests will rely on.
//!
//! Each test uses its own 127.0.0.x address, so tests that run in parallel
//! never compete for a port.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use caduceus_tests::{
    DnsRecord, Dnsmasq, Engine, Lane, Plan, Postfix, PostfixOptions, Response, Script,
    ScriptedReceiver, SmtpClient, SmtpSourceOptions, Swaks, TestCa, free_port, smtp_source,
};
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{RData, RecordType};

const WAIT: Duration = Duration::from_secs(30);

fn loopback(last_octet: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last_octet))
}

fn listen_addr(last_octet: u8) -> SocketAddr {
    let ip = loopback(last_octet);
    SocketAddr::new(ip, free_port(ip).expect("no free port on loopback"))
}

fn stdout_of(output: &std::process::Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A message with every header field Postfix would otherwise add, so that the
/// delivered copy can be compared byte for byte.
const MESSAGE: &[u8] = b"From: sender@caduceus.test\r\n\
To: alice@example.test\r\n\
Subject: harness check\r\n\
Date: Fri, 04 Dec 2026 12:00:00 +0000\r\n\
Message-ID: <harness-check@caduceus.test>\r\n\
\r\n\
First line.\r\n\
..a line that starts with a dot\r\n\
Last line.\r\n";

#[test]
fn postfix_receives_over_starttls() {
    let ca = TestCa::new().expect("test CA");
    let listen = listen_addr(31);
    let ip = listen.ip().to_string();
    let options = PostfixOptions {
        tls: Some(ca.issue(&["postfix.caduceus.test", &ip])),
        ..PostfixOptions::receiver(listen, &["example.test"])
    };
    let postfix = Postfix::start(options).expect("postfix start");
    let ca_dir = tempfile::tempdir().expect("tempdir");
    let ca_file = ca.write_ca(ca_dir.path()).expect("write CA");

    let output = Swaks::server(listen)
        .from("sender@caduceus.test")
        .to("alice@example.test")
        .data(MESSAGE)
        .starttls(Some(&ca_file))
        .run()
        .expect("swaks");
    assert!(
        output.status.success(),
        "swaks failed:\n{}",
        stdout_of(&output)
    );

    let messages = postfix.wait_for_messages(1, WAIT).expect("delivery");
    assert_eq!(messages.len(), 1);
    let message = &messages[0];
    assert_eq!(message.recipient, "alice@example.test");
    // Maildir stores LF line endings; swaks dot-stuffed the line with the
    // leading dot, and Postfix removed the stuffing again.
    let expected = String::from_utf8_lossy(MESSAGE).replace("\r\n", "\n");
    assert_eq!(
        String::from_utf8_lossy(message.original_content()),
        expected
    );
    let raw = String::from_utf8_lossy(&message.raw);
    assert!(
        raw.contains("using TLSv1."),
        "the Received field shows no TLS:\n{raw}"
    );
}

#[test]
fn postfix_recipient_access_and_deferral() {
    let listen = listen_addr(32);
    let options = PostfixOptions {
        recipient_access: vec![(
            "nobody@example.test".to_string(),
            "550 5.1.1 no such user".to_string(),
        )],
        defer_first: vec![("later@example.test".to_string(), 1)],
        ..PostfixOptions::receiver(listen, &["example.test"])
    };
    let postfix = Postfix::start(options).expect("postfix start");

    let rejected = Swaks::server(listen)
        .to("nobody@example.test")
        .run()
        .expect("swaks");
    let transcript = stdout_of(&rejected);
    assert!(!rejected.status.success());
    // Postfix puts the address and its own words before the table's text.
    assert!(transcript.contains("<** 550 5.1.1 "), "{transcript}");
    assert!(transcript.contains("no such user"), "{transcript}");

    let first = Swaks::server(listen)
        .to("later@example.test")
        .run()
        .expect("swaks");
    let transcript = stdout_of(&first);
    assert!(!first.status.success());
    assert!(transcript.contains("<** 450 4.2.0 "), "{transcript}");
    assert!(transcript.contains("try later"), "{transcript}");

    let second = Swaks::server(listen)
        .to("later@example.test")
        .run()
        .expect("swaks");
    assert!(second.status.success(), "{}", stdout_of(&second));

    let messages = postfix.wait_for_messages(1, WAIT).expect("delivery");
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].recipient, "later@example.test");
}

#[test]
fn postfix_relays_smtp_source_mail() {
    let receiver = ScriptedReceiver::start(SocketAddr::new(loopback(34), 0), Script::default())
        .expect("receiver start");
    let listen = listen_addr(33);
    let _relay =
        Postfix::start(PostfixOptions::relay(listen, receiver.addr())).expect("postfix start");

    let options = SmtpSourceOptions {
        messages: 3,
        sessions: 1,
        to: "someone@elsewhere.test".to_string(),
        ..SmtpSourceOptions::default()
    };
    let output = smtp_source(&listen.to_string(), &options).expect("smtp-source");
    assert!(output.status.success(), "{}", stdout_of(&output));

    let received = receiver.wait_for(3, WAIT).expect("relayed messages");
    assert_eq!(received.len(), 3);
    for message in &received {
        assert_eq!(message.rcpt_to, vec!["someone@elsewhere.test".to_string()]);
        assert_eq!(message.mail_from, "sender@caduceus.test");
        assert_eq!(message.reply_code, Some(250));
    }
}

#[test]
fn dnsmasq_answers_mx_null_mx_and_nxdomain() {
    let dnsmasq = Dnsmasq::start(&[
        DnsRecord::Mx {
            domain: "example.test".into(),
            host: "mx1.example.test".into(),
            preference: 10,
        },
        DnsRecord::A {
            name: "mx1.example.test".into(),
            addr: loopback(35),
        },
        DnsRecord::Mx {
            domain: "nullmx.test".into(),
            host: ".".into(),
            preference: 0,
        },
    ])
    .expect("dnsmasq start");

    let mx = dnsmasq
        .query("example.test.", RecordType::MX)
        .expect("MX query");
    assert_eq!(mx.metadata.response_code, ResponseCode::NoError);
    let exchanges: Vec<(u16, String)> = mx
        .answers
        .iter()
        .filter_map(|record| match &record.data {
            RData::MX(mx) => Some((mx.preference, mx.exchange.to_ascii())),
            _ => None,
        })
        .collect();
    assert_eq!(exchanges, vec![(10, "mx1.example.test.".to_string())]);

    let null_mx = dnsmasq
        .query("nullmx.test.", RecordType::MX)
        .expect("null MX query");
    let null_exchanges: Vec<(u16, String)> = null_mx
        .answers
        .iter()
        .filter_map(|record| match &record.data {
            RData::MX(mx) => Some((mx.preference, mx.exchange.to_ascii())),
            _ => None,
        })
        .collect();
    assert_eq!(null_exchanges, vec![(0, ".".to_string())]);

    let unknown = dnsmasq
        .query("unknown.example.test.", RecordType::A)
        .expect("A query");
    assert_eq!(unknown.metadata.response_code, ResponseCode::NXDomain);

    let no_aaaa = dnsmasq
        .query("mx1.example.test.", RecordType::AAAA)
        .expect("AAAA query");
    assert_eq!(no_aaaa.metadata.response_code, ResponseCode::NoError);
    assert!(no_aaaa.answers.is_empty());

    let outside = dnsmasq
        .query("other.invalid.", RecordType::A)
        .expect("A query");
    assert_eq!(outside.metadata.response_code, ResponseCode::Refused);
}

#[test]
fn receiver_defers_then_accepts() {
    let script = Script {
        recipients: vec![(
            "greylisted@example.test".to_string(),
            Plan::first(2, Response::reply(450, "4.2.0 try later")),
        )],
        ..Script::default()
    };
    let receiver =
        ScriptedReceiver::start(SocketAddr::new(loopback(36), 0), script).expect("receiver");

    for attempt in 1..=3 {
        let output = Swaks::server(receiver.addr())
            .to("greylisted@example.test")
            .run()
            .expect("swaks");
        let transcript = stdout_of(&output);
        if attempt < 3 {
            assert!(!output.status.success(), "attempt {attempt}: {transcript}");
            assert!(transcript.contains("450 4.2.0 try later"), "{transcript}");
        } else {
            assert!(output.status.success(), "attempt {attempt}: {transcript}");
        }
    }

    let received = receiver.wait_for(1, WAIT).expect("message");
    assert_eq!(received.len(), 1);
    assert_eq!(
        received[0].rcpt_to,
        vec!["greylisted@example.test".to_string()]
    );
    let rcpt_codes: Vec<Option<u16>> = receiver
        .commands()
        .iter()
        .filter(|command| command.line.to_ascii_uppercase().starts_with("RCPT"))
        .map(|command| command.reply_code)
        .collect();
    assert_eq!(rcpt_codes, vec![Some(450), Some(450), Some(250)]);
}

#[test]
fn receiver_drops_after_final_dot() {
    let script = Script {
        message: Plan::first(1, Response::Drop),
        ..Script::default()
    };
    let receiver =
        ScriptedReceiver::start(SocketAddr::new(loopback(37), 0), script).expect("receiver");

    let mut client = SmtpClient::connect_tcp(receiver.addr()).expect("connect");
    assert_eq!(client.read_reply().expect("greeting").code, 220);
    assert_eq!(client.command("EHLO client.test").expect("EHLO").code, 250);
    let mail = client.command("MAIL FROM:<a@caduceus.test>").expect("MAIL");
    assert_eq!(mail.code, 250);
    assert_eq!(
        client
            .command("RCPT TO:<b@example.test>")
            .expect("RCPT")
            .code,
        250
    );
    assert_eq!(client.command("DATA").expect("DATA").code, 354);
    // A bare LF before a dot is content, not the end of the data
    // (RFC 5321 §4.1.1.4).
    client
        .send_raw(b"Subject: x\r\n\r\nbody\n.\r\n..stuffed\r\n.\r\n")
        .expect("content");
    assert!(
        client.read_reply().is_err(),
        "the receiver replied after the dot"
    );

    let received = receiver.wait_for(1, WAIT).expect("message");
    assert_eq!(received[0].reply_code, None);
    assert_eq!(
        received[0].raw,
        b"Subject: x\r\n\r\nbody\n.\r\n.stuffed\r\n"
    );
    assert!(received[0].received_micros >= received[0].data_started_micros);

    // The plan drops only the first message; the next one is accepted.
    let output = Swaks::server(receiver.addr())
        .to("b@example.test")
        .run()
        .expect("swaks");
    assert!(output.status.success(), "{}", stdout_of(&output));
    let received = receiver.wait_for(2, WAIT).expect("second message");
    assert_eq!(received[1].reply_code, Some(250));
}

#[test]
fn receiver_starttls_verified_by_swaks() {
    let ca = TestCa::new().expect("test CA");
    let ip = loopback(38);
    let script = Script {
        starttls: Some(
            ca.server_config(&["mx.caduceus.test", &ip.to_string()])
                .expect("server config"),
        ),
        ..Script::default()
    };
    let receiver = ScriptedReceiver::start(SocketAddr::new(ip, 0), script).expect("receiver");
    let ca_dir = tempfile::tempdir().expect("tempdir");
    let ca_file = ca.write_ca(ca_dir.path()).expect("write CA");

    let output = Swaks::server(receiver.addr())
        .to("b@example.test")
        .data(MESSAGE)
        .starttls(Some(&ca_file))
        .run()
        .expect("swaks");
    assert!(output.status.success(), "{}", stdout_of(&output));

    let received = receiver.wait_for(1, WAIT).expect("message");
    assert_eq!(received[0].raw, MESSAGE);
    let version = received[0].tls_version.as_deref().unwrap_or("none");
    assert!(version.starts_with("TLSv1_"), "TLS version {version}");
}

/// Stands in for `caduceus serve` until the engine binary serves: it creates
/// the lane sockets as plain files, appends one delivery log line per start,
/// and exits 0 on SIGTERM.
const FAKE_ENGINE: &str = r#"#!/bin/bash
set -eu
[[ $1 == serve && $2 == --config ]] || exit 64
state_dir=$(sed -n 's/^state_dir = "\(.*\)"$/\1/p' "$3")
mkdir -p "$state_dir/run" "$state_dir/log"
: > "$state_dir/run/transactional.sock"
: > "$state_dir/run/bulk.sock"
echo '{"event":"started"}' >> "$state_dir/log/delivery.log"
trap 'exit 0' TERM
# Block inside bash itself, so that SIGKILL leaves no child process behind.
# A run killed between mkfifo and rm leaves the fifo behind; remove it first.
rm -f "$state_dir/block"
mkfifo "$state_dir/block"
exec 3<> "$state_dir/block"
rm "$state_dir/block"
read -r -t 600 -u 3 || true
"#;

#[test]
fn engine_harness_start_stop_restart() {
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().expect("tempdir");
    let binary = dir.path().join("fake-caduceus");
    std::fs::write(&binary, FAKE_ENGINE).expect("write fake engine");
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755))
        .expect("chmod fake engine");
    let state_dir = dir.path().join("state");

    let mut engine =
        Engine::start_binary(&binary, "[lanes.bulk]\n", &state_dir).expect("engine start");
    let run_dir = state_dir.canonicalize().expect("state dir").join("run");
    assert_eq!(
        engine.socket(Lane::Transactional),
        run_dir.join("transactional.sock")
    );
    assert_eq!(engine.socket(Lane::Bulk), run_dir.join("bulk.sock"));
    assert_eq!(engine.delivery_log().expect("delivery log").len(), 1);

    engine.sigterm().expect("SIGTERM");
    let status = engine.wait_exit(WAIT).expect("exit");
    assert!(status.success(), "{status}");

    engine.restart().expect("restart");
    let log = engine.delivery_log().expect("delivery log");
    assert_eq!(log.len(), 2);
    assert_eq!(log[1]["event"], "started");

    engine.sigkill().expect("SIGKILL");
    let status = engine.wait_exit(WAIT).expect("exit");
    assert!(!status.success());
}

#[test]
fn engine_rejects_conflicting_state_dir() {
    let dir = tempfile::tempdir().expect("tempdir");
    let error = Engine::start_binary(
        std::path::Path::new("/bin/false"),
        "state_dir = \"/elsewhere\"\n",
        dir.path(),
    )
    .err()
    .expect("a conflicting state_dir must be rejected");
    assert!(error.to_string().contains("state_dir"), "{error}");
}

#[test]
fn receiver_rejects_hostile_input() {
    let script = Script {
        max_message_bytes: 64,
        ..Script::default()
    };
    let receiver =
        ScriptedReceiver::start(SocketAddr::new(loopback(39), 0), script).expect("receiver");
    let mut client = SmtpClient::connect_tcp(receiver.addr()).expect("connect");
    assert_eq!(client.read_reply().expect("greeting").code, 220);

    let long_line = format!("EHLO {}", "a".repeat(5000));
    assert_eq!(client.command(&long_line).expect("long line").code, 500);
    assert_eq!(client.command("EHLO client.test").expect("EHLO").code, 250);

    // RFC 5321 §3.3: DATA with no accepted recipient is rejected.
    let mail = client.command("MAIL FROM:<a@caduceus.test>").expect("MAIL");
    assert_eq!(mail.code, 250);
    assert_eq!(client.command("DATA").expect("DATA").code, 554);

    assert_eq!(
        client
            .command("RCPT TO:<b@example.test>")
            .expect("RCPT")
            .code,
        250
    );
    assert_eq!(client.command("DATA").expect("DATA").code, 354);
    let oversized = format!("Subject: big\r\n\r\n{}\r\n.\r\n", "x".repeat(100));
    client.send_raw(oversized.as_bytes()).expect("content");
    assert_eq!(client.read_reply().expect("reply after dot").code, 552);

    let received = receiver.wait_for(1, WAIT).expect("message record");
    assert_eq!(received[0].reply_code, Some(552));
    assert!(
        received[0].raw.len() <= 64,
        "kept {} bytes",
        received[0].raw.len()
    );
}
