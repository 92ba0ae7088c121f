use std::cell::RefCell;
use std::time::{Duration, UNIX_EPOCH};

use super::*;

/// An admission that accepts everything except listed recipients and
/// records what it saw.
#[derive(Default)]
struct TestAdmission {
    refused_recipients: Vec<String>,
    refuse_mail: bool,
    rcpt_calls: RefCell<usize>,
}

impl Admission for TestAdmission {
    fn admit_mail(&self, _lane: Lane) -> Result<(), Reply> {
        if self.refuse_mail {
            return Err(reply(451, 4, 3, 1, "Try again later"));
        }
        Ok(())
    }

    fn admit_rcpt(
        &self,
        _lane: Lane,
        _category: Category,
        _sender: &str,
        recipient: &SubmittedRecipient,
    ) -> Result<(), Reply> {
        *self.rcpt_calls.borrow_mut() += 1;
        if self.refused_recipients.contains(&recipient.address) {
            return Err(reply(550, 5, 7, 1, "Recipient suppressed"));
        }
        Ok(())
    }

    async fn submit(&self, _submission: Submission) -> Result<(), Reply> {
        Ok(())
    }
}

fn limits() -> SessionLimits {
    SessionLimits::from(&IngressConfig::default())
}

fn new_session(limits: SessionLimits) -> Session {
    Session::new(
        Lane::Transactional,
        Category::Transactional,
        Rc::from("mta.example.com"),
        PeerCredentials {
            uid: 1000,
            gid: 1000,
            pid: 4242,
        },
        limits,
    )
}

/// Drives a session with a test admission, accepting every submission.
struct Harness {
    session: Session,
    admission: TestAdmission,
    submissions: Vec<Submission>,
}

impl Harness {
    fn new() -> Harness {
        Harness::with(limits(), TestAdmission::default())
    }

    fn with(limits: SessionLimits, admission: TestAdmission) -> Harness {
        let mut harness = Harness {
            session: new_session(limits),
            admission,
            submissions: Vec::new(),
        };
        let greeting = harness.session.take_output();
        assert_eq!(greeting, b"220 mta.example.com ESMTP Caduceus\r\n");
        harness
    }

    /// Pushes bytes and returns every reply produced until more input is
    /// needed.
    fn send(&mut self, bytes: &[u8]) -> String {
        self.session.push_input(bytes);
        let now = UNIX_EPOCH + Duration::from_secs(1_704_207_845);
        let mut output = Vec::new();
        loop {
            match self.session.advance(&self.admission, now) {
                Progress::NeedInput | Progress::Close => break,
                Progress::Submit(submission) => {
                    let message_id = submission.message_id;
                    self.submissions.push(*submission);
                    self.session.finish_submission(message_id, Ok(()));
                }
            }
        }
        output.extend(self.session.take_output());
        String::from_utf8(output).expect("replies are UTF-8")
    }

    fn ready(&mut self) {
        let reply = self.send(b"EHLO client.example.com\r\n");
        assert!(reply.starts_with("250-mta.example.com\r\n"), "{reply}");
    }
}

/// Extracts the code and enhanced status of each final reply line, such as
/// `250 2.1.0`, or only the code for replies without a status.
fn codes(replies: &str) -> Vec<String> {
    replies
        .split("\r\n")
        .filter(|line| !line.is_empty() && line.as_bytes().get(3) == Some(&b' '))
        .map(|line| {
            let code = &line[..3];
            match EnhancedStatus::parse_prefix(&line[4..]) {
                Some((status, _)) => format!("{code} {status}"),
                None => code.to_string(),
            }
        })
        .collect()
}

#[test]
fn ehlo_advertises_extensions() {
    let mut harness = Harness::new();
    let reply = harness.send(b"EHLO client.example.com\r\n");
    assert_eq!(
        reply,
        "250-mta.example.com\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-SIZE 52428800\r\n250-ENHANCEDSTATUSCODES\r\n250 DSN\r\n"
    );
}

#[test]
fn pipelined_transaction_in_one_write() {
    let mut harness = Harness::new();
    harness.ready();
    let replies = harness.send(
        b"MAIL FROM:<app@example.com>\r\nRCPT TO:<a@example.net>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n",
    );
    assert_eq!(
        codes(&replies),
        ["250 2.1.0", "250 2.1.5", "250 2.1.5", "354"]
    );
    let replies = harness.send(b"Subject: s\r\n\r\nbody\r\n.\r\nQUIT\r\n");
    assert_eq!(codes(&replies), ["250 2.0.0", "221 2.0.0"]);
    assert_eq!(harness.submissions.len(), 1);
    let submission = &harness.submissions[0];
    assert!(replies.contains(&format!("queued as {}", hex::encode(submission.message_id))));
    assert_eq!(submission.sender, "app@example.com");
    let domains: Vec<&str> = submission
        .recipients
        .iter()
        .map(|r| r.domain.as_str())
        .collect();
    assert_eq!(domains, ["example.net", "example.org"]);
    assert!(harness.session.is_closed());
}

#[test]
fn two_messages_pipelined_after_dot() {
    let mut harness = Harness::new();
    harness.ready();
    let replies = harness.send(
        b"MAIL FROM:<a@example.com>\r\nRCPT TO:<x@example.net>\r\nDATA\r\nSubject: 1\r\n\r\none\r\n.\r\nMAIL FROM:<b@example.com>\r\nRCPT TO:<y@example.net>\r\nDATA\r\nSubject: 2\r\n\r\ntwo\r\n.\r\n",
    );
    assert_eq!(
        codes(&replies),
        [
            "250 2.1.0",
            "250 2.1.5",
            "354",
            "250 2.0.0",
            "250 2.1.0",
            "250 2.1.5",
            "354",
            "250 2.0.0"
        ]
    );
    assert_eq!(harness.submissions.len(), 2);
    assert!(harness.submissions[1].body.ends_with(b"\r\n\r\ntwo\r\n"));
}

#[test]
fn sequence_errors() {
    let mut harness = Harness::new();
    assert_eq!(
        codes(&harness.send(b"MAIL FROM:<a@example.com>\r\n")),
        ["503 5.5.1"]
    );
    harness.ready();
    assert_eq!(
        codes(&harness.send(b"RCPT TO:<a@example.net>\r\n")),
        ["503 5.5.1"]
    );
    assert_eq!(codes(&harness.send(b"DATA\r\n")), ["503 5.5.1"]);
    assert_eq!(
        codes(&harness.send(b"MAIL FROM:<a@example.com>\r\n")),
        ["250 2.1.0"]
    );
    assert_eq!(
        codes(&harness.send(b"MAIL FROM:<a@example.com>\r\n")),
        ["503 5.5.1"]
    );
    assert_eq!(codes(&harness.send(b"DATA\r\n")), ["554 5.5.1"]);
    assert_eq!(codes(&harness.send(b"RSET\r\n")), ["250 2.0.0"]);
    assert_eq!(
        codes(&harness.send(b"RCPT TO:<a@example.net>\r\n")),
        ["503 5.5.1"]
    );
}

#[test]
fn simple_commands_replies() {
    let mut harness = Harness::new();
    harness.ready();
    let replies =
        harness.send(b"NOOP\r\nVRFY someone\r\nHELP\r\nSTARTTLS\r\nFROB\r\nEXPN list\r\n");
    assert_eq!(
        codes(&replies),
        [
            "250 2.0.0",
            "252 2.1.5",
            "214 2.0.0",
            "502 5.5.1",
            "500 5.5.2",
            "502 5.5.1"
        ]
    );
}

#[test]
fn null_sender_accepted() {
    let mut harness = Harness::new();
    harness.ready();
    let replies = harness.send(
        b"MAIL FROM:<>\r\nRCPT TO:<gone@example.net>\r\nDATA\r\nSubject: b\r\n\r\nx\r\n.\r\n",
    );
    assert_eq!(
        codes(&replies),
        ["250 2.1.0", "250 2.1.5", "354", "250 2.0.0"]
    );
    assert_eq!(harness.submissions[0].sender, "");
}

#[test]
fn too_many_errors_closes() {
    let mut harness = Harness::new();
    let mut input = Vec::new();
    for _ in 0..MAX_PROTOCOL_ERRORS + 5 {
        input.extend_from_slice(b"FROB\r\n");
    }
    let replies = harness.send(&input);
    let codes = codes(&replies);
    assert_eq!(
        codes.len() as u32,
        MAX_PROTOCOL_ERRORS + 1,
        "no replies after the 421"
    );
    assert_eq!(codes.last().map(String::as_str), Some("421 4.7.0"));
    assert!(harness.session.is_closed());
}

#[test]
fn helo_then_parameters_rejected() {
    let mut harness = Harness::new();
    assert_eq!(
        codes(&harness.send(b"HELO client.example.com\r\n")),
        ["250"]
    );
    assert_eq!(
        codes(&harness.send(b"MAIL FROM:<a@example.com> SIZE=10\r\n")),
        ["555 5.5.4"]
    );
    assert_eq!(
        codes(&harness.send(b"MAIL FROM:<a@example.com>\r\n")),
        ["250 2.1.0"]
    );
}

#[test]
fn declared_size_over_limit() {
    let mut harness = Harness::new();
    harness.ready();
    assert_eq!(
        codes(&harness.send(b"MAIL FROM:<a@example.com> SIZE=999999999999\r\n")),
        ["552 5.3.4"]
    );
}

#[test]
fn admission_refusals_passed_through() {
    let admission = TestAdmission {
        refused_recipients: vec!["blocked@example.net".into()],
        ..TestAdmission::default()
    };
    let mut harness = Harness::with(limits(), admission);
    harness.ready();
    let replies = harness.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<blocked@example.net>\r\nRCPT TO:<ok@example.net>\r\n");
    assert_eq!(codes(&replies), ["250 2.1.0", "550 5.7.1", "250 2.1.5"]);

    let admission = TestAdmission {
        refuse_mail: true,
        ..TestAdmission::default()
    };
    let mut harness = Harness::with(limits(), admission);
    harness.ready();
    assert_eq!(
        codes(&harness.send(b"MAIL FROM:<a@example.com>\r\n")),
        ["451 4.3.1"]
    );
}

#[test]
fn command_line_limits() {
    let mut harness = Harness::new();
    harness.ready();
    let mut long = b"NOOP ".to_vec();
    long.extend(vec![b'x'; 600]);
    long.extend_from_slice(b"\r\nNOOP\r\n");
    assert_eq!(codes(&harness.send(&long)), ["500 5.5.2", "250 2.0.0"]);

    // A line with no CRLF for far longer than any limit is skipped as it
    // arrives, so the buffer stays small.
    for _ in 0..100 {
        assert_eq!(harness.send(&[b'y'; 4096]), "");
        assert!(
            harness.session.input.len() - harness.session.input_start
                < MAX_PARAMETER_LINE_BYTES + 4096
        );
    }
    assert_eq!(
        codes(&harness.send(b"\r\nNOOP\r\n")),
        ["500 5.5.2", "250 2.0.0"]
    );

    // MAIL and RCPT may exceed 512 octets for DSN parameters.
    let mut rcpt_line =
        b"MAIL FROM:<a@example.com>\r\nRCPT TO:<a@example.net> ORCPT=rfc822;".to_vec();
    rcpt_line.extend(vec![b'r'; 520]);
    rcpt_line.extend_from_slice(b"@example.net\r\n");
    assert_eq!(codes(&harness.send(&rcpt_line)), ["250 2.1.0", "250 2.1.5"]);
}

#[test]
fn bare_line_endings_in_commands() {
    let mut harness = Harness::new();
    harness.ready();
    let replies =
        harness.send(b"MAIL FROM:<a@example.com>\nRCPT TO:<victim@example.net>\r\nNOOP\r\n");
    assert_eq!(codes(&replies), ["500 5.5.2", "250 2.0.0"]);
    let replies = harness.send(b"NOOP\rRSET\r\n");
    assert_eq!(codes(&replies), ["500 5.5.2"]);
}

#[test]
fn recipient_cap_with_100000_rcpts() {
    let limits = SessionLimits {
        max_recipients: 100,
        ..limits()
    };
    let mut harness = Harness::with(limits, TestAdmission::default());
    harness.ready();
    assert_eq!(
        codes(&harness.send(b"MAIL FROM:<app@example.com>\r\n")),
        ["250 2.1.0"]
    );
    let mut accepted = 0;
    let mut capped = 0;
    let mut chunk = Vec::new();
    for index in 0..100_000 {
        chunk.extend_from_slice(format!("RCPT TO:<r{index}@example.net>\r\n").as_bytes());
        if chunk.len() > 60_000 || index == 99_999 {
            let replies = harness.send(&chunk);
            chunk.clear();
            for code in codes(&replies) {
                match code.as_str() {
                    "250 2.1.5" => accepted += 1,
                    "452 4.5.3" => capped += 1,
                    other => panic!("unexpected reply {other}"),
                }
            }
            let transaction = harness.session.transaction.as_ref().expect("transaction");
            assert!(transaction.recipients.len() <= 100);
            assert!(
                harness.session.input.capacity() < 256 * 1024,
                "input buffer grew"
            );
        }
    }
    assert_eq!(accepted, 100);
    assert_eq!(capped, 99_900);
    assert_eq!(
        *harness.admission.rcpt_calls.borrow(),
        100,
        "capped recipients never reach admission"
    );
    // Still responsive, and the transaction can be completed.
    let replies = harness.send(b"NOOP\r\nDATA\r\nSubject: s\r\n\r\nx\r\n.\r\n");
    assert_eq!(codes(&replies), ["250 2.0.0", "354", "250 2.0.0"]);
    assert_eq!(harness.submissions[0].recipients.len(), 100);
}

/// Builds the smuggling reproduction around one fake end-of-data.
fn smuggling_input(fake_end: &[u8]) -> Vec<u8> {
    let mut input =
        b"From: app@example.com\r\nTo: user@example.net\r\nSubject: one\r\n\r\nfirst message"
            .to_vec();
    input.extend_from_slice(fake_end);
    input.extend_from_slice(
        b"MAIL FROM:<ceo@example.org>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\nFrom: ceo@example.org\r\nTo: victim@example.net\r\nSubject: smuggled\r\n\r\nsecond message\r\n.\r\n",
    );
    input
}

const SMUGGLING_VARIANTS: [&[u8]; 6] = [
    b"\n.\r\n",
    b"\n.\n",
    b"\r\n.\n",
    b"\r.\r\n",
    b"\r.\n",
    b"\r\n.\r\r\n",
];

#[test]
fn smuggling_variants_rejected_once() {
    for variant in SMUGGLING_VARIANTS {
        let mut harness = Harness::new();
        harness.ready();
        let replies =
            harness.send(b"MAIL FROM:<app@example.com>\r\nRCPT TO:<user@example.net>\r\nDATA\r\n");
        assert_eq!(codes(&replies), ["250 2.1.0", "250 2.1.5", "354"]);
        let replies = harness.send(&smuggling_input(variant));
        assert_eq!(codes(&replies), ["550 5.5.2"], "variant {variant:?}");
        assert!(
            harness.submissions.is_empty(),
            "variant {variant:?} queued a message"
        );
        // The session is back in command state and sends one reply per
        // command.
        assert_eq!(
            codes(&harness.send(b"NOOP\r\n")),
            ["250 2.0.0"],
            "variant {variant:?}"
        );
    }
}

#[test]
fn smuggling_variants_split_reads() {
    for variant in SMUGGLING_VARIANTS {
        let input = smuggling_input(variant);
        for split in 0..input.len() {
            let mut harness = Harness::new();
            harness.ready();
            harness.send(b"MAIL FROM:<app@example.com>\r\nRCPT TO:<user@example.net>\r\nDATA\r\n");
            let mut replies = harness.send(&input[..split]);
            replies.push_str(&harness.send(&input[split..]));
            assert_eq!(
                codes(&replies),
                ["550 5.5.2"],
                "variant {variant:?} split {split}"
            );
            assert!(harness.submissions.is_empty());
        }
    }
}

#[test]
fn dot_unstuffing_stored_bytes() {
    let mut harness = Harness::new();
    harness.ready();
    harness.send(b"MAIL FROM:<app@example.com>\r\nRCPT TO:<user@example.net>\r\nDATA\r\n");
    let replies = harness.send(b"Subject: u\r\n\r\n..\r\n...\r\n..a\r\n.b\r\nend\r\n\r\n.\r\n");
    assert_eq!(codes(&replies), ["250 2.0.0"]);
    let submission = &harness.submissions[0];
    let id = hex::encode(submission.message_id);
    let date = "Tue, 02 Jan 2024 15:04:05 +0000";
    let expected = format!(
        "Received: from client.example.com (uid 1000 pid 4242)\r\n\tby mta.example.com (Caduceus) with ESMTP id {id};\r\n\t{date}\r\n\
         Subject: u\r\nDate: {date}\r\nMessage-ID: <{id}@mta.example.com>\r\n\
         \r\n.\r\n..\r\n.a\r\nb\r\nend\r\n\r\n"
    );
    assert_eq!(String::from_utf8_lossy(&submission.body), expected);
}

#[test]
fn terminator_split_across_reads() {
    let data: &[u8] = b"Subject: s\r\n\r\nline\r\n.\r\nNOOP\r\n";
    for split in 0..=data.len() {
        let mut harness = Harness::new();
        harness.ready();
        harness.send(b"MAIL FROM:<app@example.com>\r\nRCPT TO:<user@example.net>\r\nDATA\r\n");
        let mut replies = harness.send(&data[..split]);
        replies.push_str(&harness.send(&data[split..]));
        assert_eq!(codes(&replies), ["250 2.0.0", "250 2.0.0"], "split {split}");
        assert!(
            harness.submissions[0].body.ends_with(b"\r\n\r\nline\r\n"),
            "split {split}"
        );
    }
}

#[test]
fn nul_in_data_one_reply() {
    let mut harness = Harness::new();
    harness.ready();
    harness.send(b"MAIL FROM:<app@example.com>\r\nRCPT TO:<user@example.net>\r\nDATA\r\n");
    let replies = harness.send(b"Subject: nul\r\n\r\nab\x00cd\r\nafter-nul\r\n.\r\nQUIT\r\n");
    assert_eq!(codes(&replies), ["554 5.6.0", "221 2.0.0"]);
    assert!(harness.submissions.is_empty());
}

#[test]
fn oversize_message_rejected_after_dot() {
    let limits = SessionLimits {
        max_message_size_bytes: 1000,
        ..limits()
    };
    let mut harness = Harness::with(limits, TestAdmission::default());
    harness.ready();
    harness.send(b"MAIL FROM:<app@example.com>\r\nRCPT TO:<user@example.net>\r\nDATA\r\n");
    for _ in 0..100 {
        assert_eq!(
            harness.send(&[b"x".repeat(98).as_slice(), b"\r\n"].concat()),
            ""
        );
    }
    assert_eq!(codes(&harness.send(b".\r\n")), ["552 5.3.4"]);
}

/// A message of the declared SIZE must fit in a spool segment with its
/// envelope, so RCPT gets 452 once the recipients would not leave room.
#[test]
fn declared_size_limits_envelope() {
    let limits = SessionLimits {
        max_message_size_bytes: 1000,
        max_recipients: 1000,
        ..limits()
    };
    let mut harness = Harness::with(limits, TestAdmission::default());
    harness.ready();
    harness.send(b"MAIL FROM:<app@example.com> SIZE=1000\r\n");
    let local_part = "p".repeat(60);
    let mut accepted = 0;
    let mut capped = None;
    for index in 0..1000 {
        let command = format!("RCPT TO:<{local_part}{index}@example.net>\r\n");
        let replies = codes(&harness.send(command.as_bytes()));
        if replies == ["250 2.1.5"] {
            accepted += 1;
        } else {
            capped = Some(replies);
            break;
        }
    }
    assert_eq!(capped, Some(vec!["452 4.5.3".to_string()]));
    assert!(accepted > 300, "{accepted} recipients accepted");

    // Without SIZE=, the content's size is unknown until the final dot,
    // and only the recipient limit applies.
    harness.send(b"RSET\r\nMAIL FROM:<app@example.com>\r\n");
    for index in 0..1000 {
        let command = format!("RCPT TO:<{local_part}{index}@example.net>\r\n");
        assert_eq!(codes(&harness.send(command.as_bytes())), ["250 2.1.5"]);
    }
}

#[test]
fn long_data_line_rejected_after_dot() {
    let mut harness = Harness::new();
    harness.ready();
    harness.send(b"MAIL FROM:<app@example.com>\r\nRCPT TO:<user@example.net>\r\nDATA\r\n");
    let mut data = b"Subject: long\r\n\r\n<p>".to_vec();
    data.extend(vec![b'A'; 1500]);
    data.extend_from_slice(b"</p>\r\n.\r\n");
    assert_eq!(codes(&harness.send(&data)), ["500 5.5.2"]);
}

#[test]
fn missing_date_and_message_id_added() {
    let mut harness = Harness::new();
    harness.ready();
    harness.send(b"MAIL FROM:<app@example.com>\r\nRCPT TO:<user@example.net>\r\nDATA\r\n");
    let replies = harness.send(
        b"From: app@example.com\r\nTo: user@example.net\r\nSubject: no date\r\n\r\nhi\r\n.\r\n",
    );
    assert_eq!(codes(&replies), ["250 2.0.0"]);
    let submission = &harness.submissions[0];
    let text = String::from_utf8(submission.body.clone()).expect("ASCII");
    let header = text.split("\r\n\r\n").next().expect("header section");
    let dates: Vec<&str> = header
        .split("\r\n")
        .filter(|line| line.starts_with("Date: "))
        .collect();
    assert_eq!(dates, ["Date: Tue, 02 Jan 2024 15:04:05 +0000"]);
    let message_id = format!(
        "Message-ID: <{}@mta.example.com>",
        hex::encode(submission.message_id)
    );
    assert_eq!(
        header
            .split("\r\n")
            .filter(|line| line.starts_with("Message-ID:"))
            .count(),
        1
    );
    assert!(header.contains(&message_id));
    assert!(header.contains(&format!(
        "with ESMTP id {};",
        hex::encode(submission.message_id)
    )));
}

#[test]
fn quoted_local_parts_and_space_after_colon() {
    let mut harness = Harness::new();
    harness.ready();
    let replies = harness.send(
        b"MAIL FROM: <app@example.com>\r\nRCPT TO:<\"odd user\"@example.net>\r\nRCPT TO:<\"info@\"@example.net>\r\nRCPT TO:<\"a\\\"b\"@example.net>\r\nRCPT TO:<\"plain\"@example.net>\r\nDATA\r\nSubject: q\r\n\r\nx\r\n.\r\n",
    );
    assert_eq!(
        codes(&replies),
        [
            "250 2.1.0",
            "250 2.1.5",
            "250 2.1.5",
            "250 2.1.5",
            "250 2.1.5",
            "354",
            "250 2.0.0"
        ]
    );
    let addresses: Vec<&str> = harness.submissions[0]
        .recipients
        .iter()
        .map(|recipient| recipient.address.as_str())
        .collect();
    assert_eq!(
        addresses,
        [
            "\"odd user\"@example.net",
            "\"info@\"@example.net",
            "\"a\\\"b\"@example.net",
            "\"plain\"@example.net"
        ]
    );
    assert_eq!(harness.submissions[0].sender, "app@example.com");
}

#[test]
fn utf8_recipient_without_smtputf8() {
    let mut harness = Harness::new();
    harness.ready();
    let replies =
        harness.send(b"MAIL FROM:<app@example.com>\r\nRCPT TO:<gr\xc3\xa5@example.net>\r\n");
    assert_eq!(codes(&replies), ["250 2.1.0", "553 5.6.7"]);
    let replies = harness.send(b"RSET\r\nMAIL FROM:<app@example.com> SMTPUTF8\r\nRCPT TO:<gr\xc3\xa5@example.net>\r\nRCPT TO:<user\xe2\x81\xa0@example.net>\r\n");
    assert_eq!(
        codes(&replies),
        ["250 2.0.0", "250 2.1.0", "250 2.1.5", "553 5.1.3"]
    );
    let replies = harness.send(b"DATA\r\nSubject: u\r\n\r\nx\r\n.\r\n");
    assert_eq!(codes(&replies), ["354", "250 2.0.0"]);
    let submission = &harness.submissions[0];
    assert!(submission.smtputf8);
    assert_eq!(
        submission.recipients.len(),
        1,
        "the U+2060 address is not accepted"
    );
    assert_eq!(submission.recipients[0].address, "gr\u{e5}@example.net");
    assert!(String::from_utf8_lossy(&submission.body).contains("with UTF8SMTP id"));
}

#[test]
fn encoded_line_breaks_in_parameters() {
    let mut harness = Harness::new();
    harness.ready();
    let replies = harness.send(
        b"MAIL FROM:<app@example.com> AUTH=app+40example.com+0Ainjected-spool-line ENVID=abc+0D+0AX-Injected:+20yes\r\nMAIL FROM:<app@example.com> ENVID=abc+0D+0AX-Injected:+20yes\r\nMAIL FROM:<app@example.com> ENVID=QQ314159 RET=HDRS\r\nRCPT TO:<user@example.net> ORCPT=rfc822;user+0A+0Aevil@example.net\r\nRCPT TO:<user@example.net> NOTIFY=FAILURE ORCPT=rfc822;user+40example.net\r\nDATA\r\nSubject: s\r\n\r\nx\r\n.\r\n",
    );
    assert_eq!(
        codes(&replies),
        [
            "501 5.5.4",
            "501 5.5.4",
            "250 2.1.0",
            "501 5.5.4",
            "250 2.1.5",
            "354",
            "250 2.0.0"
        ]
    );
    let submission = &harness.submissions[0];
    assert_eq!(submission.recipients.len(), 1);
    assert_eq!(submission.envid.as_deref(), Some("QQ314159"));
    assert_eq!(submission.ret, Some(Ret::Headers));
    assert_eq!(
        submission.recipients[0].orcpt.as_deref(),
        Some("rfc822;user@example.net")
    );
    assert_eq!(submission.recipients[0].notify, command::NOTIFY_FAILURE);
}

#[test]
fn received_loop_rejected() {
    let mut harness = Harness::new();
    harness.ready();
    harness.send(b"MAIL FROM:<app@example.com>\r\nRCPT TO:<user@example.net>\r\nDATA\r\n");
    let mut data = Vec::new();
    for relay in 0..101 {
        data.extend_from_slice(
            format!("Received: from relay{relay}.example.org by mx.example.org; Tue, 02 Jan 2024 15:04:05 +0000\r\n")
                .as_bytes(),
        );
    }
    data.extend_from_slice(b"Subject: loop\r\n\r\nx\r\n.\r\n");
    assert_eq!(codes(&harness.send(&data)), ["554 5.4.6"]);
    assert!(harness.submissions.is_empty());
}

#[test]
fn category_header_overrides_and_is_removed() {
    let mut harness = Harness::new();
    harness.ready();
    harness.send(b"MAIL FROM:<app@example.com>\r\nRCPT TO:<user@example.net>\r\nDATA\r\n");
    let replies =
        harness.send(b"X-Caduceus-Category: marketing\r\nSubject: offer\r\n\r\nx\r\n.\r\n");
    assert_eq!(codes(&replies), ["250 2.0.0"]);
    let submission = &harness.submissions[0];
    assert_eq!(submission.category, Category::Marketing);
    assert!(!String::from_utf8_lossy(&submission.body).contains("X-Caduceus-Category"));

    harness.send(b"MAIL FROM:<app@example.com>\r\nRCPT TO:<user@example.net>\r\nDATA\r\n");
    let replies = harness.send(b"X-Caduceus-Category: newsletter\r\nSubject: s\r\n\r\nx\r\n.\r\n");
    assert_eq!(codes(&replies), ["554 5.6.0"]);

    harness.send(b"MAIL FROM:<app@example.com>\r\nRCPT TO:<user@example.net>\r\nDATA\r\n");
    harness.send(b"Subject: default\r\n\r\nx\r\n.\r\n");
    assert_eq!(harness.submissions[1].category, Category::Transactional);
}

#[test]
fn submission_failure_reply_sent_as_is() {
    let mut session = new_session(limits());
    let admission = TestAdmission::default();
    session.take_output();
    session.push_input(b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nSubject: s\r\n\r\nx\r\n.\r\nNOOP\r\n");
    let Progress::Submit(submission) = session.advance(&admission, SystemTime::now()) else {
        panic!("expected a submission");
    };
    assert!(session.in_data());
    session.finish_submission(
        submission.message_id,
        Err(reply(452, 4, 3, 1, "Spool full")),
    );
    assert!(matches!(
        session.advance(&admission, SystemTime::now()),
        Progress::NeedInput
    ));
    let output = String::from_utf8(session.take_output()).expect("UTF-8");
    assert!(
        output.ends_with(
            "354 End data with <CR><LF>.<CR><LF>\r\n452 4.3.1 Spool full\r\n250 2.0.0 Ok\r\n"
        ),
        "{output}"
    );
}
