//! Tests of the receiver over real loopback sockets.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::*;

/// A minimal blocking SMTP client for the tests.
struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Client {
    fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).expect("connect to the receiver");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        let writer = stream.try_clone().expect("clone");
        Client {
            reader: BufReader::new(stream),
            writer,
        }
    }

    /// Returns the reply code, or 0 when the connection closed.
    fn reply(&mut self) -> u16 {
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) | Err(_) => return 0,
                Ok(_) => {}
            }
            if line.as_bytes().get(3) != Some(&b'-') {
                return line
                    .get(..3)
                    .and_then(|code| code.parse().ok())
                    .unwrap_or(0);
            }
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("write");
    }

    fn command(&mut self, line: &str) -> u16 {
        self.send(format!("{line}\r\n").as_bytes());
        self.reply()
    }

    fn start(addr: SocketAddr) -> Client {
        let mut client = Client::connect(addr);
        assert_eq!(client.reply(), 220);
        assert_eq!(client.command("EHLO client.test"), 250);
        client
    }

    /// Sends one message and returns the reply code after the final dot.
    fn message(&mut self, recipient: &str, wire_content: &[u8]) -> u16 {
        assert_eq!(self.command("MAIL FROM:<s@sender.test>"), 250);
        let rcpt = self.command(&format!("RCPT TO:<{recipient}>"));
        if rcpt != 250 {
            return rcpt;
        }
        assert_eq!(self.command("DATA"), 354);
        self.send(wire_content);
        self.send(b".\r\n");
        self.reply()
    }
}

fn loopback(last_octet: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, last_octet], 0))
}

fn summary_script() -> Script {
    Script {
        recording: Recording::Summary,
        ..Script::default()
    }
}

#[test]
fn receiver_serves_many_addresses_on_one_port() {
    let receiver =
        ScriptedReceiver::start_many(&[loopback(1), loopback(2), loopback(3)], Script::default())
            .expect("start");
    let port = receiver.addr().port();
    assert!(receiver.addrs().iter().all(|addr| addr.port() == port));
    for addr in receiver.addrs() {
        let mut client = Client::start(*addr);
        assert_eq!(
            client.message("r@a.test", b"Subject: x\r\n\r\nbody\r\n"),
            250
        );
    }
    let received = receiver
        .wait_for(3, Duration::from_secs(10))
        .expect("messages");
    assert_eq!(received.len(), 3);
}

#[test]
fn summary_keeps_no_bytes_and_checksums_body() {
    let receiver = ScriptedReceiver::start(loopback(1), summary_script()).expect("start");
    let injected_at_us = micros_since_epoch();
    let content = format!(
        "Subject: x\r\n{INJECTED_HEADER}: {injected_at_us}\r\n{LANE_HEADER}: bulk\r\n\r\n..dotted\r\nbody\r\n"
    );
    let mut client = Client::start(receiver.addr());
    assert_eq!(client.message("r@Mail.Example", content.as_bytes()), 250);
    assert!(receiver.wait_for_accepted(1, Duration::from_secs(10)));
    assert!(receiver.received().is_empty());
    assert!(receiver.commands().is_empty());
    let summary = receiver.summary();
    assert_eq!(summary.messages.len(), 1);
    let message = &summary.messages[0];
    assert_eq!(message.domain, "mail.example");
    assert_eq!(message.lane.as_deref(), Some("bulk"));
    assert_eq!(message.injected_at_us, Some(injected_at_us));
    // RFC 5321 §4.5.2: the receiver removes the stuffed dot.
    assert_eq!(message.body_checksum, fnv1a(b".dotted\r\nbody\r\n"));
    assert_eq!(message.size_bytes, content.len() as u64 - 1);
    assert_eq!(summary.lanes.len(), 1);
    assert_eq!(summary.lanes[0].key, "bulk");
    assert_eq!(summary.lanes[0].latency_us.len(), 1);
    assert_eq!(summary.domains[0].key, "mail.example");
}

#[test]
fn bare_lf_before_dot_stays_content() {
    let receiver = ScriptedReceiver::start(loopback(1), Script::default()).expect("start");
    let mut client = Client::start(receiver.addr());
    assert_eq!(
        client.message("r@a.test", b"Subject: x\r\n\r\na\n.\nb\r\n"),
        250
    );
    let received = receiver
        .wait_for(1, Duration::from_secs(10))
        .expect("message");
    assert_eq!(received[0].raw, b"Subject: x\r\n\r\na\n.\nb\r\n");
}

#[test]
fn overlong_command_gets_500_and_session_continues() {
    let receiver = ScriptedReceiver::start(loopback(1), Script::default()).expect("start");
    let mut client = Client::start(receiver.addr());
    let long = format!("NOOP {}", "x".repeat(10_000));
    assert_eq!(client.command(&long), 500);
    assert_eq!(client.command("NOOP"), 250);
}

#[test]
fn connection_cap_rejects_with_421() {
    let script = Script {
        max_connections: 1,
        ..Script::default()
    };
    let receiver = ScriptedReceiver::start(loopback(1), script).expect("start");
    let _first = Client::start(receiver.addr());
    let mut second = Client::connect(receiver.addr());
    assert_eq!(second.reply(), 421);
}

#[test]
fn domain_failure_fractions_reply_and_record() {
    let script = Script {
        domains: vec![
            DomainScript {
                domain: "temp.test".into(),
                temporary_failure_fraction: 1.0,
                ..DomainScript::default()
            },
            DomainScript {
                domain: "perm.test".into(),
                permanent_failure_fraction: 1.0,
                ..DomainScript::default()
            },
        ],
        ..summary_script()
    };
    let receiver = ScriptedReceiver::start(loopback(1), script).expect("start");
    let mut client = Client::start(receiver.addr());
    assert_eq!(client.message("a@temp.test", b""), 451);
    assert_eq!(client.command("RSET"), 250);
    assert_eq!(client.message("b@perm.test", b""), 550);
    assert_eq!(client.command("RSET"), 250);
    assert_eq!(client.message("c@other.test", b"\r\nbody\r\n"), 250);
    assert!(receiver.wait_for_accepted(1, Duration::from_secs(10)));
    let summary = receiver.summary();
    assert_eq!(
        summary.rejected_recipients,
        vec![("b@perm.test".to_string(), 550)]
    );
}

#[test]
fn domain_fraction_holds_over_many_recipients() {
    let script = Script {
        domains: vec![DomainScript {
            domain: "some.test".into(),
            temporary_failure_fraction: 0.2,
            ..DomainScript::default()
        }],
        seed: 11,
        ..Script::default()
    };
    let receiver = ScriptedReceiver::start(loopback(1), script).expect("start");
    let mut client = Client::start(receiver.addr());
    assert_eq!(client.command("MAIL FROM:<s@sender.test>"), 250);
    let failed = (0..500)
        .filter(|index| client.command(&format!("RCPT TO:<r{index}@some.test>")) == 451)
        .count();
    assert!((60..140).contains(&failed), "failed: {failed}");
}

#[test]
fn domain_closes_with_421_after_messages() {
    let script = Script {
        domains: vec![DomainScript {
            domain: "busy.test".into(),
            close_421_after_messages: Some(1),
            ..DomainScript::default()
        }],
        ..Script::default()
    };
    let receiver = ScriptedReceiver::start(loopback(1), script).expect("start");
    let mut client = Client::start(receiver.addr());
    assert_eq!(client.message("a@busy.test", b"\r\none\r\n"), 250);
    assert_eq!(client.message("b@busy.test", b""), 421);
    assert_eq!(client.reply(), 0, "the connection stays open after 421");
}

#[test]
fn domain_drops_connection_after_dot() {
    let script = Script {
        domains: vec![DomainScript {
            domain: "drop.test".into(),
            drop_after_dot_fraction: 1.0,
            ..DomainScript::default()
        }],
        ..summary_script()
    };
    let receiver = ScriptedReceiver::start(loopback(1), script).expect("start");
    let mut client = Client::start(receiver.addr());
    assert_eq!(client.message("a@drop.test", b"\r\nbody\r\n"), 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while receiver.summary().messages.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let summary = receiver.summary();
    assert_eq!(summary.messages.len(), 1);
    assert_eq!(summary.messages[0].reply_code, None);
    assert_eq!(receiver.accepted_count(), 0);
}

#[test]
fn slow_greeting_only_on_its_address() {
    let delay = Duration::from_millis(300);
    let script = Script {
        domains: vec![DomainScript {
            domain: "slow.test".into(),
            greeting_delay: delay,
            greeting_addresses: vec![IpAddr::from([127, 0, 0, 2])],
            ..DomainScript::default()
        }],
        ..Script::default()
    };
    let receiver =
        ScriptedReceiver::start_many(&[loopback(1), loopback(2)], script).expect("start");
    let started = Instant::now();
    let mut fast = Client::connect(receiver.addrs()[0]);
    assert_eq!(fast.reply(), 220);
    assert!(
        started.elapsed() < delay,
        "fast greeting took {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    let mut slow = Client::connect(receiver.addrs()[1]);
    assert_eq!(slow.reply(), 220);
    assert!(
        started.elapsed() >= delay,
        "slow greeting took {:?}",
        started.elapsed()
    );
}

#[test]
fn pipelined_injection_delivers_each_message() {
    use crate::inject::{InjectClient, Outgoing};
    let receiver = ScriptedReceiver::start(loopback(1), Script::default()).expect("start");
    let mut client = InjectClient::connect_tcp(receiver.addr(), "client.test").expect("connect");
    let recipients = [vec!["a@x.test".to_string()], vec!["b@x.test".to_string()]];
    let bodies: [&[u8]; 3] = [
        b"Subject: 1\r\n\r\n.one\r\n",
        b"Subject: 2\r\n\r\ntwo\r\n",
        b"Subject: 3\r\n\r\nthree",
    ];
    let messages: Vec<Outgoing<'_>> = bodies
        .iter()
        .enumerate()
        .map(|(index, body)| Outgoing {
            sender: "s@sender.test",
            recipients: &recipients[index % 2],
            body,
        })
        .collect();
    let results = client.send_pipelined(&messages).expect("session");
    assert!(results.iter().all(Result::is_ok), "results: {results:?}");
    client.quit();
    let received = receiver
        .wait_for(3, Duration::from_secs(10))
        .expect("messages");
    assert_eq!(received[0].raw, b"Subject: 1\r\n\r\n.one\r\n");
    assert_eq!(received[2].raw, b"Subject: 3\r\n\r\nthree\r\n");
    assert_eq!(received[1].rcpt_to, vec!["b@x.test".to_string()]);
}

/// A message in several BDAT chunks, with a line split across two of them:
/// each chunk but the last gets its own 250, and the content arrives whole.
#[test]
fn bdat_chunks_make_one_message() {
    let script = Script {
        chunking: true,
        ..Script::default()
    };
    let receiver = ScriptedReceiver::start(loopback(1), script).expect("start");
    let mut client = Client::connect(receiver.addr());
    assert_eq!(client.reply(), 220);
    client.send(b"EHLO client.test\r\n");
    let mut ehlo = String::new();
    loop {
        let mut line = String::new();
        client.reader.read_line(&mut line).expect("EHLO reply");
        ehlo.push_str(&line);
        if line.as_bytes().get(3) == Some(&b' ') {
            break;
        }
    }
    assert!(ehlo.contains("CHUNKING"), "{ehlo}");
    assert_eq!(client.command("MAIL FROM:<s@sender.test>"), 250);
    assert_eq!(client.command("RCPT TO:<r@a.test>"), 250);
    client.send(b"BDAT 16\r\nSubject: x\r\n\r\n.d");
    assert_eq!(client.reply(), 250);
    client.send(b"BDAT 8 LAST\r\not\r\nok\r\n");
    assert_eq!(client.reply(), 250);
    let received = receiver
        .wait_for(1, Duration::from_secs(10))
        .expect("message");
    assert_eq!(received[0].raw, b"Subject: x\r\n\r\n.dot\r\nok\r\n");
}
