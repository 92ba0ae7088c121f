//! End-to-end delivery: a sender submits on a lane socket, the engine
//! delivers to a real Postfix (or, where only a scripted peer can produce
//! the behaviour, to the scripted receiver), and the delivery log records
//! what happened.
//!
//! Each test owns a distinct 127.0.0.x range so that tests running in
//! parallel never compete for ports.

mod common;

use std::time::Duration;

use caduceus_tests::{
    DnsRecord, Dnsmasq, Engine, Lane, Plan, Postfix, PostfixOptions, Response, Script,
    ScriptedReceiver, Swaks, TestCa,
};
use common::{WAIT, engine_config, listen_addr, loopback, state_dir, wait_for_log, wait_until};

/// A message with Date and Message-ID, so that the engine adds only its
/// Received header and the delivered copy can be compared byte for byte.
const MESSAGE: &[u8] = b"From: Riverside Clinic <reminders@clinic.test>\r\n\
To: <alice@example.test>\r\n\
Subject: Your appointment tomorrow\r\n\
Date: Fri, 04 Dec 2026 12:00:00 +0000\r\n\
Message-ID: <reminder-1@clinic.test>\r\n\
\r\n\
Your appointment is tomorrow at 09:30.\r\n\
..this line started with a dot\r\n\
See you then.\r\n";

#[test]
fn tls_delivery_to_postfix_is_byte_identical() {
    let ca = TestCa::new().expect("test CA");
    let listen = listen_addr(41);
    let ip = listen.ip().to_string();
    let postfix = Postfix::start(PostfixOptions {
        tls: Some(ca.issue(&["mx.example.test", &ip])),
        ..PostfixOptions::receiver(listen, &["example.test"])
    })
    .expect("postfix start");
    let state = state_dir();
    let ca_file = ca.write_ca(state.path()).expect("write CA");
    let config = format!(
        "{}\n[tls]\nca_file = \"{}\"\n\n[[rule]]\ndomain = \"example.test\"\nroute = \"{listen}\"\ntls = \"verified\"\n",
        engine_config(None),
        ca_file.display()
    );
    let engine = Engine::start(&config, &state.path().join("engine")).expect("engine start");

    let output = Swaks::socket(engine.socket(Lane::Transactional))
        .from("reminders@clinic.test")
        .to("alice@example.test")
        .data(MESSAGE)
        .run()
        .expect("swaks");
    assert!(output.status.success(), "swaks failed: {output:?}");

    let messages = postfix
        .wait_for_messages(1, WAIT)
        .expect("Postfix received the message");
    let delivered = messages[0].original_content();
    let text = String::from_utf8_lossy(delivered).replace("\r\n", "\n");
    let expected_rest = String::from_utf8_lossy(MESSAGE).replace("\r\n", "\n");
    // The engine's Received header comes first (RFC 5321 §4.4), then the
    // message exactly as submitted.
    let (received, rest) = split_first_field(&text);
    assert!(
        received.starts_with("Received: from "),
        "first field: {received}"
    );
    assert!(received.contains("(Caduceus)"), "first field: {received}");
    // swaks dot-stuffs what it sends, so the content is MESSAGE exactly.
    assert_eq!(rest, expected_rest);

    let log = wait_for_log(&engine, |entry| entry["event"] == "delivered", WAIT);
    let delivered_entry = log
        .iter()
        .find(|entry| entry["event"] == "delivered")
        .expect("delivered entry");
    let version = delivered_entry["tls_version"].as_str().unwrap_or("");
    assert!(
        version == "TLSv1.3" || version == "TLSv1.2",
        "tls_version {version:?} in {delivered_entry}"
    );
    let cipher = delivered_entry["tls_cipher"].as_str().unwrap_or("");
    assert!(!cipher.is_empty(), "no cipher in {delivered_entry}");
    assert!(
        delivered_entry["recipient"]
            .as_str()
            .unwrap_or("")
            .starts_with("hmac:"),
        "recipient_logging defaults to hmac: {delivered_entry}"
    );
}

/// Splits the first header field (with continuation lines) from the rest.
fn split_first_field(text: &str) -> (String, String) {
    let mut lines = text.split_inclusive('\n');
    let mut field = lines.next().unwrap_or("").to_string();
    let mut rest = String::new();
    let mut in_field = true;
    for line in lines {
        if in_field && (line.starts_with(' ') || line.starts_with('\t')) {
            field.push_str(line);
        } else {
            in_field = false;
            rest.push_str(line);
        }
    }
    (field, rest)
}

#[test]
fn mx_failover_to_second_preference() {
    let port = caduceus_tests::free_port(loopback(43)).expect("free port");
    let postfix = Postfix::start(PostfixOptions::receiver(
        std::net::SocketAddr::new(loopback(43), port),
        &["failover.test"],
    ))
    .expect("postfix start");
    let dns = Dnsmasq::start(&[
        DnsRecord::Mx {
            domain: "failover.test".into(),
            host: "mx1.failover.test".into(),
            preference: 10,
        },
        DnsRecord::Mx {
            domain: "failover.test".into(),
            host: "mx2.failover.test".into(),
            preference: 20,
        },
        DnsRecord::A {
            name: "mx1.failover.test".into(),
            addr: loopback(42),
        },
        DnsRecord::A {
            name: "mx2.failover.test".into(),
            addr: loopback(43),
        },
    ])
    .expect("dnsmasq start");
    let state = state_dir();
    // Nothing listens on 127.0.0.42, the preferred MX.
    let config = format!(
        "{}\n[delivery]\nsmtp_port = {port}\n",
        engine_config(Some(dns.addr()))
    );
    let engine = Engine::start(&config, &state.path().join("engine")).expect("engine start");
    let output = Swaks::socket(engine.socket(Lane::Bulk))
        .from(common::CARE_SENDER)
        .to("bob@failover.test")
        .data(MESSAGE)
        .run()
        .expect("swaks");
    assert!(output.status.success(), "swaks failed: {output:?}");
    postfix
        .wait_for_messages(1, WAIT)
        .expect("the second MX received the message");
    let log = wait_for_log(&engine, |entry| entry["event"] == "delivered", WAIT);
    let delivered = log
        .iter()
        .find(|entry| entry["event"] == "delivered")
        .expect("delivered entry");
    assert_eq!(delivered["remote_ip"], "127.0.0.43", "{delivered}");
    assert_eq!(delivered["remote_host"], "mx2.failover.test", "{delivered}");
}

#[test]
fn temporary_failure_is_retried_and_delivered_once() {
    let receiver = ScriptedReceiver::start(
        common::any_port(45),
        Script {
            rcpt: Plan::first(
                1,
                Response::reply(450, "4.2.0 mailbox busy, try again later"),
            ),
            ..Script::default()
        },
    )
    .expect("receiver start");
    let state = state_dir();
    let config = format!(
        "{}\n[lanes.transactional]\nretry_schedule = [\"1s\"]\n\n[[rule]]\ndomain = \"example.test\"\nroute = \"{}\"\n",
        engine_config(None),
        receiver.addr()
    );
    let engine = Engine::start(&config, &state.path().join("engine")).expect("engine start");
    let output = Swaks::socket(engine.socket(Lane::Transactional))
        .from("reminders@clinic.test")
        .to("carol@example.test")
        .data(MESSAGE)
        .run()
        .expect("swaks");
    assert!(output.status.success(), "swaks failed: {output:?}");
    receiver.wait_for(1, WAIT).expect("delivered after a retry");
    let log = wait_for_log(&engine, |entry| entry["event"] == "delivered", WAIT);
    // Give a duplicate time to show up before counting.
    std::thread::sleep(Duration::from_secs(2));
    let accepted: Vec<_> = receiver
        .received()
        .into_iter()
        .filter(|message| message.reply_code == Some(250))
        .collect();
    assert_eq!(accepted.len(), 1, "exactly one copy was accepted");
    let deferred = log
        .iter()
        .filter(|entry| entry["event"] == "deferred")
        .count();
    assert_eq!(deferred, 1, "one deferral before the delivery: {log:?}");
    let delivered = log
        .iter()
        .find(|entry| entry["event"] == "delivered")
        .expect("delivered");
    assert_eq!(delivered["attempt"], 2, "{delivered}");
}

#[test]
fn permanent_failure_sends_one_dsn_and_no_retry() {
    let listen = listen_addr(47);
    let postfix = Postfix::start(PostfixOptions {
        recipient_access: vec![(
            "nobody@example.test".into(),
            "550 5.1.1 no such user".into(),
        )],
        ..PostfixOptions::receiver(listen, &["example.test", "clinic.test"])
    })
    .expect("postfix start");
    let state = state_dir();
    let config = format!(
        "{}\n[[rule]]\ndomain = \"example.test\"\nroute = \"{listen}\"\n\n[[rule]]\ndomain = \"clinic.test\"\nroute = \"{listen}\"\n",
        engine_config(None)
    );
    let engine = Engine::start(&config, &state.path().join("engine")).expect("engine start");
    let output = Swaks::socket(engine.socket(Lane::Transactional))
        .from("reminders@clinic.test")
        .to("nobody@example.test")
        .data(MESSAGE)
        .run()
        .expect("swaks");
    assert!(output.status.success(), "swaks failed: {output:?}");
    postfix
        .wait_for_messages(1, WAIT)
        .expect("the DSN reached the sender's mailbox");
    std::thread::sleep(Duration::from_secs(2));
    let messages = postfix.messages();
    assert_eq!(messages.len(), 1, "only the DSN arrives");
    let dsn = String::from_utf8_lossy(&messages[0].raw);
    assert_eq!(messages[0].recipient, "reminders@clinic.test");
    assert!(dsn.contains("multipart/report"), "{dsn}");
    assert!(dsn.contains("report-type=\"delivery-status\""), "{dsn}");
    assert!(dsn.contains("Status: 5.1.1"), "{dsn}");
    assert!(
        dsn.contains("Final-Recipient: rfc822; nobody@example.test")
            || dsn.contains("Final-Recipient: rfc822;nobody@example.test"),
        "{dsn}"
    );
    assert!(
        dsn.contains("Return-Path: <>"),
        "a DSN has a null sender: {dsn}"
    );
    let log = wait_for_log(&engine, |entry| entry["event"] == "bounced", WAIT);
    assert_eq!(
        log.iter()
            .filter(|entry| entry["event"] == "bounced")
            .count(),
        1,
        "{log:?}"
    );
    assert_eq!(
        log.iter()
            .filter(|entry| entry["event"] == "deferred")
            .count(),
        0,
        "{log:?}"
    );
}

#[test]
fn null_mx_bounces_without_connecting() {
    let listen = listen_addr(49);
    let postfix =
        Postfix::start(PostfixOptions::receiver(listen, &["clinic.test"])).expect("postfix start");
    // A receiver on the address the domain's A record names, which must
    // never see a connection (RFC 7505 §3: no fallback to A/AAAA).
    let web = ScriptedReceiver::start(
        std::net::SocketAddr::new(loopback(50), listen.port()),
        Script::default(),
    )
    .expect("receiver start");
    let dns = Dnsmasq::start(&[
        DnsRecord::Mx {
            domain: "nomail.test".into(),
            host: ".".into(),
            preference: 0,
        },
        DnsRecord::A {
            name: "nomail.test".into(),
            addr: loopback(50),
        },
    ])
    .expect("dnsmasq start");
    let state = state_dir();
    let config = format!(
        "{}\n[delivery]\nsmtp_port = {}\n\n[[rule]]\ndomain = \"clinic.test\"\nroute = \"{listen}\"\n",
        engine_config(Some(dns.addr())),
        listen.port()
    );
    let engine = Engine::start(&config, &state.path().join("engine")).expect("engine start");
    let output = Swaks::socket(engine.socket(Lane::Transactional))
        .from("reminders@clinic.test")
        .to("someone@nomail.test")
        .data(MESSAGE)
        .run()
        .expect("swaks");
    assert!(output.status.success(), "swaks failed: {output:?}");
    let messages = postfix.wait_for_messages(1, WAIT).expect("the DSN arrived");
    let dsn = String::from_utf8_lossy(&messages[0].raw);
    assert!(dsn.contains("Status: 5.1.10"), "{dsn}");
    assert!(
        web.commands().is_empty(),
        "no connection to the A record's host"
    );
    let log = wait_for_log(&engine, |entry| entry["event"] == "bounced", WAIT);
    let bounced = log
        .iter()
        .find(|entry| entry["event"] == "bounced")
        .expect("bounced entry");
    assert_eq!(bounced["reply_code"], 556, "{bounced}");
    assert_eq!(bounced["attempt"], 1, "{bounced}");
}

#[test]
fn held_destination_waits_for_release() {
    let receiver =
        ScriptedReceiver::start(common::any_port(52), Script::default()).expect("receiver start");
    let state = state_dir();
    let config = format!(
        "{}\n[[rule]]\ndomain = \"held.test\"\nroute = \"{}\"\n",
        engine_config(None),
        receiver.addr()
    );
    let engine = Engine::start(&config, &state.path().join("engine")).expect("engine start");
    let config_path = engine.state_dir().join("caduceus.toml");
    let output = common::caduceus(&["queue", "hold", "held.test", "--config"], &config_path);
    assert!(output.starts_with("held held.test"), "{output}");
    for index in 0..3 {
        let output = Swaks::socket(engine.socket(Lane::Bulk))
            .from(common::CARE_SENDER)
            .to(&format!("member{index}@held.test"))
            .data(MESSAGE)
            .run()
            .expect("swaks");
        assert!(output.status.success(), "swaks failed: {output:?}");
    }
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        receiver.received().is_empty(),
        "a held destination got mail"
    );
    let listing = common::caduceus(&["queue", "list", "--config"], &config_path);
    // One row per core that owns some of the mail; fixed-width columns,
    // so each row is as wide as the header.
    let header = listing.lines().next().unwrap_or_default();
    let mut pending = 0;
    for row in listing.lines().filter(|line| line.starts_with("held.test")) {
        let columns: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(columns.len(), 4, "{listing}");
        assert_eq!(columns[2], "yes", "{listing}");
        assert_eq!(row.len(), header.len(), "{listing}");
        pending += columns[1].parse::<u32>().expect("pending count");
    }
    assert_eq!(pending, 3, "{listing}");
    common::caduceus(&["queue", "release", "held.test", "--config"], &config_path);
    receiver.wait_for(3, WAIT).expect("delivered after release");
    let audit = common::control_audit(engine.state_dir());
    assert!(audit.contains("queue.hold"), "{audit}");
    assert!(audit.contains("\"operator_uid\":0"), "{audit}");
}

#[test]
fn hold_accepts_idn_and_rejects_non_domains() {
    let receiver =
        ScriptedReceiver::start(common::any_port(58), Script::default()).expect("receiver start");
    let state = state_dir();
    let config = format!(
        "{}\n[[rule]]\ndomain = \"xn--bcher-kva.test\"\nroute = \"{}\"\n",
        engine_config(None),
        receiver.addr()
    );
    let engine = Engine::start(&config, &state.path().join("engine")).expect("engine start");
    let config_path = engine.state_dir().join("caduceus.toml");
    // The U-label form names the destination that ingress stores as an
    // A-label.
    common::caduceus(&["queue", "hold", "bücher.test", "--config"], &config_path);
    let output = Swaks::socket(engine.socket(Lane::Transactional))
        .from("reminders@clinic.test")
        .to("reader@xn--bcher-kva.test")
        .data(MESSAGE)
        .run()
        .expect("swaks");
    assert!(output.status.success(), "swaks failed: {output:?}");
    std::thread::sleep(Duration::from_secs(2));
    assert!(receiver.received().is_empty(), "the IDN hold was ignored");

    for invalid in ["bad domain", "../../etc", "a@b.example", "*.example"] {
        let output = std::process::Command::new(common::binary())
            .args(["queue", "hold", invalid, "--config"])
            .arg(&config_path)
            .output()
            .expect("run caduceus");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{invalid:?} was accepted");
        assert!(stderr.contains("invalid domain"), "{invalid:?}: {stderr}");
    }
    let holds = std::fs::read_to_string(engine.state_dir().join("holds.json")).expect("holds");
    assert!(!holds.contains("bad domain"), "{holds}");

    // Case and a trailing dot do not matter either.
    common::caduceus(
        &["queue", "release", "XN--BCHER-KVA.TEST.", "--config"],
        &config_path,
    );
    receiver.wait_for(1, WAIT).expect("delivered after release");
}

#[test]
fn engine_runs_as_unprivileged_user() {
    let receiver =
        ScriptedReceiver::start(common::any_port(54), Script::default()).expect("receiver start");
    let state = state_dir();
    let config = format!(
        "{}\n[[rule]]\ndomain = \"example.test\"\nroute = \"{}\"\n",
        engine_config(None),
        receiver.addr()
    );
    let engine = Engine::start(&config, &state.path().join("engine")).expect("engine start");
    let pid = engine.pid().expect("engine pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let uid_line = status
        .lines()
        .find(|line| line.starts_with("Uid:"))
        .expect("Uid line");
    let nobody = nix::unistd::User::from_name("nobody")
        .expect("user lookup")
        .expect("user nobody exists");
    let fields: Vec<&str> = uid_line.split_whitespace().collect();
    for field in &fields[1..] {
        assert_eq!(
            *field,
            nobody.uid.as_raw().to_string(),
            "every uid (real, effective, saved, fs) is nobody: {uid_line}"
        );
    }
    let output = Swaks::socket(engine.socket(Lane::Transactional))
        .from("reminders@clinic.test")
        .to("dave@example.test")
        .data(MESSAGE)
        .run()
        .expect("swaks");
    assert!(output.status.success(), "swaks failed: {output:?}");
    receiver.wait_for(1, WAIT).expect("delivered");
    wait_until(WAIT, || {
        engine
            .delivery_log()
            .map(|log| log.iter().any(|entry| entry["event"] == "delivered"))
            .unwrap_or(false)
    });
}

#[test]
fn own_lifetime_expires_the_message_early() {
    let deferring = ScriptedReceiver::start(
        common::any_port(56),
        Script {
            rcpt: Plan::always(Response::reply(451, "4.3.0 try again later")),
            ..Script::default()
        },
    )
    .expect("deferring receiver start");
    let sender_mx =
        ScriptedReceiver::start(common::any_port(57), Script::default()).expect("receiver start");
    let state = state_dir();
    let config = format!(
        "{}\n[lanes.transactional]\nretry_schedule = [\"1s\"]\n\n[[rule]]\ndomain = \"example.test\"\nroute = \"{}\"\n\n[[rule]]\ndomain = \"clinic.test\"\nroute = \"{}\"\n",
        engine_config(None),
        deferring.addr(),
        sender_mx.addr()
    );
    let engine = Engine::start(&config, &state.path().join("engine")).expect("engine start");
    let reset = b"From: accounts@clinic.test\r\nTo: <erin@example.test>\r\nSubject: Password reset\r\nX-Caduceus-Lifetime: 3s\r\n\r\nUse this link within the hour.\r\n";
    let output = Swaks::socket(engine.socket(Lane::Transactional))
        .from("accounts@clinic.test")
        .to("erin@example.test")
        .data(reset)
        .run()
        .expect("swaks");
    assert!(output.status.success(), "swaks failed: {output:?}");
    let dsn = sender_mx.wait_for(1, WAIT).expect("the expiry DSN arrived");
    let text = String::from_utf8_lossy(&dsn[0].raw);
    assert!(text.contains("Status: 5.4.7"), "{text}");
    assert!(text.contains("Action: failed"), "{text}");
    assert!(
        !text.contains("X-Caduceus-Lifetime"),
        "the header was removed before the message was stored: {text}"
    );
    // The DSN can reach its receiver before the delivery log line is
    // written, so wait for the line rather than reading the log once.
    let log = wait_for_log(&engine, |entry| entry["event"] == "expired", WAIT);
    let expired = log
        .iter()
        .find(|entry| entry["event"] == "expired")
        .expect("expired entry");
    let age_us =
        expired["at_us"].as_u64().unwrap_or(0) - expired["received_at_us"].as_u64().unwrap_or(0);
    assert!(
        age_us < 30_000_000,
        "expired after its own 3 s lifetime, not the lane's day: {expired}"
    );
}

/// A session that a 421 ended must not carry the next message: with one
/// connection allowed, the second message of a released queue goes out
/// on a new connection and is delivered at its first attempt, instead of
/// being deferred with the first message's 421.
#[test]
fn connection_closed_by_421_is_not_reused() {
    let script = Script {
        mail: Plan::first(1, Response::Close421),
        ..Script::default()
    };
    let receiver = ScriptedReceiver::start(common::any_port(59), script).expect("receiver start");
    let state = state_dir();
    let config = format!(
        "{}\n[[rule]]\ndomain = \"closing.test\"\nroute = \"{}\"\nmax_connections = 1\n",
        engine_config(None),
        receiver.addr()
    );
    let engine = Engine::start(&config, &state.path().join("engine")).expect("engine start");
    let config_path = engine.state_dir().join("caduceus.toml");
    common::caduceus(&["queue", "hold", "closing.test", "--config"], &config_path);
    for index in 0..2 {
        let output = Swaks::socket(engine.socket(Lane::Bulk))
            .from(common::CARE_SENDER)
            .to(&format!("member{index}@closing.test"))
            .data(MESSAGE)
            .run()
            .expect("swaks");
        assert!(output.status.success(), "swaks failed: {output:?}");
    }
    common::caduceus(
        &["queue", "release", "closing.test", "--config"],
        &config_path,
    );

    let log = wait_for_log(&engine, |entry| entry["event"] == "delivered", WAIT);
    let delivered: Vec<_> = log
        .iter()
        .filter(|entry| entry["event"] == "delivered")
        .collect();
    assert_eq!(delivered[0]["attempt"], 1, "{log:#?}");
    let deferred = log
        .iter()
        .filter(|entry| entry["event"] == "deferred")
        .count();
    assert_eq!(deferred, 1, "{log:#?}");
}
