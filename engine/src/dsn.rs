//! Delivery status notifications: RFC 3464 reports inside an RFC 6522
//! `multipart/report`, with the RFC 3461 `RET` and `ENVID` choices and the
//! RFC 6533 `message/global-delivery-status` form for SMTPUTF8 messages.
//!
//! The caller decides whether a DSN is due (never for a null sender, per
//! RFC 5321 §4.5.5, and not for `NOTIFY=NEVER` recipients) and sends the
//! result with the null reverse-path.

use std::time::{SystemTime, UNIX_EPOCH};

use mail_builder::MessageBuilder;
use mail_builder::headers::content_type::ContentType;
use mail_builder::headers::date::Date;
use mail_builder::headers::raw::Raw;
use mail_builder::mime::MimePart;

use crate::outbound::{MAX_LINE_OCTETS, Ret, xtext};
use crate::smtp::EnhancedStatus;

/// The `Action` field of a per-recipient report (RFC 3464 §2.3.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DsnAction {
    Failed,
    Delayed,
    Delivered,
    Relayed,
    Expanded,
}

impl DsnAction {
    pub fn as_str(self) -> &'static str {
        match self {
            DsnAction::Failed => "failed",
            DsnAction::Delayed => "delayed",
            DsnAction::Delivered => "delivered",
            DsnAction::Relayed => "relayed",
            DsnAction::Expanded => "expanded",
        }
    }
}

/// One recipient in the report.
#[derive(Clone, Copy, Debug)]
pub struct DsnRecipient<'a> {
    /// The recipient address as it was sent to the MX, without `<>`.
    pub final_recipient: &'a str,
    /// The decoded `ORCPT` value, `type;address` or just an address.
    pub original_recipient: Option<&'a str>,
    pub action: DsnAction,
    pub status: EnhancedStatus,
    /// The MX host that sent the diagnostic reply, if one replied.
    pub remote_mta: Option<&'a str>,
    /// The SMTP reply, one line (see `Reply::to_diagnostic`).
    pub diagnostic: Option<&'a str>,
    pub last_attempt_unix_us: Option<u64>,
    /// For `delayed`: when the queue gives up on this recipient.
    pub will_retry_until_unix_us: Option<u64>,
}

/// Everything a DSN reports about one message.
#[derive(Clone, Copy, Debug)]
pub struct DsnInput<'a> {
    /// The reporting host's name; also the domain of the DSN's `From` and
    /// `Message-ID`.
    pub reporting_mta: &'a str,
    /// The original envelope sender, who receives the DSN. Never empty.
    pub sender: &'a str,
    /// The decoded `ENVID` of the original message.
    pub envid: Option<&'a str>,
    pub arrival_unix_us: u64,
    pub recipients: &'a [DsnRecipient<'a>],
    /// The original message as spooled.
    pub original: &'a [u8],
    /// `Headers` returns only the header (`text/rfc822-headers`); `Full` and
    /// `None` return the whole message.
    pub ret: Option<Ret>,
    /// The original used SMTPUTF8, so the report is the RFC 6533 form.
    pub smtputf8: bool,
}

/// Builds a complete DSN message: header fields (`From: MAILER-DAEMON@…`,
/// `To`, `Subject`, `Date` with a numeric zone, `Message-ID`,
/// `Auto-Submitted: auto-replied` per RFC 3834 §5) and a
/// `multipart/report; report-type=delivery-status` body with the
/// explanation, the delivery-status part and the original or its header.
pub fn build_dsn(input: &DsnInput<'_>) -> Vec<u8> {
    debug_assert!(
        !input.sender.is_empty(),
        "RFC 5321 §4.5.5: no DSN is sent to the null reverse-path"
    );
    let reporting_mta = single_line(input.reporting_mta);
    let sender = single_line(input.sender);
    let daemon = format!("MAILER-DAEMON@{reporting_mta}");
    let message_id = format!("{:032x}.dsn@{reporting_mta}", rand::random::<u128>());

    let report = MimePart::new(
        ContentType::new("multipart/report").attribute("report-type", "delivery-status"),
        vec![
            MimePart::new("text/plain", explanation(input, &reporting_mta)),
            status_part(input, &reporting_mta),
            original_part(input),
        ],
    );

    let message = MessageBuilder::new()
        .from(("Mail Delivery System", daemon.as_str()))
        .to(sender.as_str())
        .subject(subject(input.recipients))
        .date(Date::new(unix_seconds(now_unix_us())))
        .message_id(message_id)
        .header("Auto-Submitted", Raw::new("auto-replied"))
        .body(report);
    // Invariant: writing into a Vec cannot fail. mail-builder panics only on
    // a multipart Content-Type that is not a ContentType value, and every
    // Content-Type above is one.
    message
        .write_to_vec()
        .expect("writing a DSN into memory cannot fail")
}

fn subject(recipients: &[DsnRecipient<'_>]) -> &'static str {
    let any = |action: DsnAction| recipients.iter().any(|r| r.action == action);
    if any(DsnAction::Failed) {
        "Undelivered Mail Returned to Sender"
    } else if any(DsnAction::Delayed) {
        "Delayed Mail (still being retried)"
    } else {
        "Successful Mail Delivery Report"
    }
}

/// Writes the human-readable first part (RFC 6522 §3). It names recipients
/// and replies but repeats nothing of the message content.
fn explanation(input: &DsnInput<'_>, reporting_mta: &str) -> String {
    let mut text = format!("This is the mail system at host {reporting_mta}.\r\n\r\n");
    let any = |action: DsnAction| input.recipients.iter().any(|r| r.action == action);
    if any(DsnAction::Failed) {
        text.push_str(
            "Your message could not be delivered to one or more recipients.\r\nIt will not be retried for them.\r\n",
        );
    }
    if any(DsnAction::Delayed) {
        text.push_str(
            "Delivery to one or more recipients is delayed.\r\nThe mail system will keep trying; no action is needed yet.\r\n",
        );
    }
    if any(DsnAction::Delivered) || any(DsnAction::Relayed) || any(DsnAction::Expanded) {
        text.push_str("Your message was delivered or relayed to one or more recipients.\r\n");
    }
    text.push_str("\r\n");
    for recipient in input.recipients {
        text.push_str(&format!(
            "<{}>: {} ({})",
            single_line(recipient.final_recipient),
            recipient.action.as_str(),
            recipient.status
        ));
        if let Some(remote) = recipient.remote_mta {
            text.push_str(&format!(", host {}", single_line(remote)));
        }
        text.push_str("\r\n");
        if let Some(diagnostic) = recipient.diagnostic {
            text.push_str(&format!("    {}\r\n", single_line(diagnostic)));
        }
    }
    text
}

/// Builds the `message/delivery-status` part (RFC 3464 §2), or
/// `message/global-delivery-status` (RFC 6533 §6) for SMTPUTF8 messages.
fn status_part(input: &DsnInput<'_>, reporting_mta: &str) -> MimePart<'static> {
    let mut fields = String::new();
    push_field(
        &mut fields,
        "Reporting-MTA",
        &format!("dns; {reporting_mta}"),
    );
    if let Some(envid) = input.envid {
        // RFC 3464 §2.2.1 carries the envelope id in the xtext form it had
        // in ENVID, which also keeps CR and LF out of the field.
        push_field(&mut fields, "Original-Envelope-Id", &xtext(envid));
    }
    push_field(
        &mut fields,
        "Arrival-Date",
        &rfc5322_date(input.arrival_unix_us),
    );

    for recipient in input.recipients {
        fields.push_str("\r\n");
        if let Some(original) = recipient.original_recipient {
            let (address_type, address) = match original.split_once(';') {
                Some((address_type, address)) if !address_type.contains('@') => {
                    (address_type.trim(), address.trim())
                }
                _ => ("rfc822", original),
            };
            push_field(
                &mut fields,
                "Original-Recipient",
                &format!(
                    "{};{}",
                    single_line(address_type),
                    typed_address(address, input.smtputf8).1
                ),
            );
        }
        let (address_type, address) = typed_address(recipient.final_recipient, input.smtputf8);
        push_field(
            &mut fields,
            "Final-Recipient",
            &format!("{address_type}; {address}"),
        );
        push_field(&mut fields, "Action", recipient.action.as_str());
        push_field(&mut fields, "Status", &recipient.status.to_string());
        if let Some(remote) = recipient.remote_mta {
            push_field(
                &mut fields,
                "Remote-MTA",
                &format!("dns; {}", single_line(remote)),
            );
        }
        if let Some(diagnostic) = recipient.diagnostic {
            push_field(
                &mut fields,
                "Diagnostic-Code",
                &format!("smtp; {}", single_line(diagnostic)),
            );
        }
        if let Some(at) = recipient.last_attempt_unix_us {
            push_field(&mut fields, "Last-Attempt-Date", &rfc5322_date(at));
        }
        if recipient.action == DsnAction::Delayed
            && let Some(until) = recipient.will_retry_until_unix_us
        {
            push_field(&mut fields, "Will-Retry-Until", &rfc5322_date(until));
        }
    }

    let (content_type, encoding) = if input.smtputf8 {
        ("message/global-delivery-status", "8bit")
    } else {
        ("message/delivery-status", "7bit")
    };
    MimePart::new(ContentType::new(content_type), fields.into_bytes()).transfer_encoding(encoding)
}

/// Builds the third part: the original message, or only its header for
/// `RET=HDRS` (RFC 3461 §4.3). RFC 2046 §5.2.1 forbids base64 and
/// quoted-printable for `message/rfc822`, so the encoding is set to 7bit or
/// 8bit explicitly (mail-builder would otherwise base64 it). An original that
/// is not valid 7bit or 8bit data (a NUL, a line over 998 octets) is
/// returned as its header only, since it cannot be carried unencoded.
fn original_part(input: &DsnInput<'_>) -> MimePart<'static> {
    let original = input.original;
    let header_end = if original.starts_with(b"\r\n") {
        0
    } else {
        original
            .windows(4)
            .position(|window| window == b"\r\n\r\n")
            .map_or(original.len(), |at| at + 2)
    };
    let header = &original[..header_end];
    let full_ok = valid_unencoded(original);
    let headers_only = input.ret == Some(Ret::Headers) || !full_ok;

    let (content_type, bytes) = if headers_only {
        ("text/rfc822-headers", header)
    } else if input.smtputf8 {
        ("message/global", original)
    } else {
        ("message/rfc822", original)
    };
    let encoding = if bytes.iter().any(|&byte| byte > 0x7f) {
        "8bit"
    } else {
        "7bit"
    };
    let content_type = if headers_only && input.smtputf8 {
        "message/global-headers"
    } else {
        content_type
    };
    MimePart::new(ContentType::new(content_type), bytes.to_vec()).transfer_encoding(encoding)
}

/// True when `bytes` may be sent as 7bit or 8bit MIME data: no NUL, CR
/// and LF only as CRLF, and no line over 998 octets (RFC 2045 §2.7, §2.8).
fn valid_unencoded(bytes: &[u8]) -> bool {
    let mut line_length = 0usize;
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            0 => return false,
            b'\r' if bytes.get(index + 1) == Some(&b'\n') => {
                line_length = 0;
                index += 2;
                continue;
            }
            b'\r' | b'\n' => return false,
            _ => line_length += 1,
        }
        if line_length > MAX_LINE_OCTETS {
            return false;
        }
        index += 1;
    }
    true
}

/// Returns the address type and address for a recipient field. RFC 6533 §3
/// uses type `utf-8` for non-ASCII addresses; outside a global report the
/// non-ASCII characters are written as `\x{HEX}` (utf-8-addr-xtext).
fn typed_address(address: &str, smtputf8: bool) -> (&'static str, String) {
    let address = single_line(address);
    if address.is_ascii() {
        return ("rfc822", address);
    }
    if smtputf8 {
        return ("utf-8", address);
    }
    let mut escaped = String::with_capacity(address.len() + 16);
    for character in address.chars() {
        if character.is_ascii() {
            escaped.push(character);
        } else {
            escaped.push_str(&format!("\\x{{{:X}}}", u32::from(character)));
        }
    }
    ("utf-8", escaped)
}

/// Replaces control characters, CR and LF included, with spaces, so a value
/// from a peer cannot start a new header field.
fn single_line(value: &str) -> String {
    value
        .chars()
        .map(|character| {
            if character.is_control() {
                ' '
            } else {
                character
            }
        })
        .collect()
}

/// Appends `name: value` CRLF, folding at spaces so lines stay near 78
/// characters (RFC 5322 §2.1.1). A word longer than a line stays whole.
fn push_field(out: &mut String, name: &str, value: &str) {
    const FOLD_AT: usize = 78;
    let mut line_length = name.len() + 1;
    out.push_str(name);
    out.push(':');
    for (index, word) in value.split(' ').enumerate() {
        if index > 0 && line_length + 1 + word.len() > FOLD_AT {
            out.push_str("\r\n");
            line_length = 0;
        }
        out.push(' ');
        out.push_str(word);
        line_length += 1 + word.len();
    }
    out.push_str("\r\n");
}

fn unix_seconds(unix_us: u64) -> i64 {
    i64::try_from(unix_us / 1_000_000).unwrap_or(i64::MAX)
}

/// Formats an RFC 5322 §3.3 date-time in UTC with the numeric zone `+0000`.
fn rfc5322_date(unix_us: u64) -> String {
    Date::new(unix_seconds(unix_us)).to_rfc822()
}

fn now_unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A parsed MIME entity: unfolded header fields and the raw body.
    struct Entity {
        fields: Vec<(String, String)>,
        body: String,
    }

    impl Entity {
        fn parse(text: &str) -> Entity {
            let (header, body) = text.split_once("\r\n\r\n").unwrap_or((text, ""));
            let mut fields: Vec<(String, String)> = Vec::new();
            for line in header.split("\r\n") {
                if line.starts_with([' ', '\t']) {
                    let last = fields.last_mut().expect("continuation without a field");
                    last.1.push(' ');
                    last.1.push_str(line.trim());
                } else if let Some((name, value)) = line.split_once(':') {
                    fields.push((name.to_ascii_lowercase(), value.trim().to_string()));
                }
            }
            Entity {
                fields,
                body: body.to_string(),
            }
        }

        fn field(&self, name: &str) -> Option<&str> {
            self.fields
                .iter()
                .find(|(field, _)| field == name)
                .map(|(_, value)| value.as_str())
        }

        /// Splits a multipart body along the boundary of its Content-Type.
        fn parts(&self) -> Vec<Entity> {
            let content_type = self.field("content-type").expect("no content type");
            let boundary = content_type
                .split(';')
                .find_map(|param| param.trim().strip_prefix("boundary="))
                .expect("no boundary")
                .trim_matches('"')
                .to_string();
            let delimiter = format!("\r\n--{boundary}");
            let body = format!("\r\n{}", self.body);
            let closing = format!("{delimiter}--");
            let inner = body.split(&closing).next().expect("no close delimiter");
            inner
                .split(&delimiter)
                .skip(1)
                .map(|part| Entity::parse(part.trim_start_matches("\r\n")))
                .collect()
        }
    }

    /// Splits a delivery-status body into its field groups, the per-message
    /// group first.
    fn status_groups(body: &str) -> Vec<Entity> {
        body.trim_end()
            .split("\r\n\r\n")
            .map(|group| Entity::parse(&format!("{group}\r\n\r\n")))
            .collect()
    }

    const ORIGINAL: &[u8] = b"From: app@example.com\r\nTo: nobody@example.net\r\nSubject: dsn test\r\nMessage-ID: <orig@example.com>\r\n\r\nsecret body line\r\n";

    fn failed<'a>(address: &'a str, diagnostic: &'a str) -> DsnRecipient<'a> {
        DsnRecipient {
            final_recipient: address,
            original_recipient: None,
            action: DsnAction::Failed,
            status: EnhancedStatus::new(5, 1, 1),
            remote_mta: Some("mx.example.net"),
            diagnostic: Some(diagnostic),
            last_attempt_unix_us: Some(1_704_207_845_000_000),
            will_retry_until_unix_us: None,
        }
    }

    fn two_failed_dsn(ret: Option<Ret>) -> String {
        let mut first = failed(
            "nobody@example.net",
            "550 5.1.1 <nobody@example.net>: Recipient address rejected: 550 5.1.1 User unknown in virtual mailbox table",
        );
        first.original_recipient = Some("rfc822;nobody@example.net");
        let recipients = [first, failed("also-gone@example.net", "550 5.1.1 no")];
        let input = DsnInput {
            reporting_mta: "mta.example.com",
            sender: "app@example.com",
            envid: Some("QQ314159"),
            arrival_unix_us: 1_704_207_800_000_000,
            recipients: &recipients,
            original: ORIGINAL,
            ret,
            smtputf8: false,
        };
        String::from_utf8(build_dsn(&input)).expect("DSN is not UTF-8")
    }

    #[test]
    fn dsn_two_failed_recipients() {
        let text = two_failed_dsn(Some(Ret::Headers));
        let message = Entity::parse(&text);

        assert_eq!(
            message.field("from"),
            Some("\"Mail Delivery System\" <MAILER-DAEMON@mta.example.com>")
        );
        assert_eq!(message.field("to"), Some("<app@example.com>"));
        assert_eq!(message.field("auto-submitted"), Some("auto-replied"));
        assert!(
            message
                .field("message-id")
                .is_some_and(|id| id.ends_with("@mta.example.com>"))
        );
        let content_type = message.field("content-type").unwrap();
        assert!(content_type.starts_with("multipart/report"));
        assert!(
            content_type.contains("report-type=\"delivery-status\"")
                || content_type.contains("report-type=delivery-status")
        );

        let parts = message.parts();
        assert_eq!(parts.len(), 3);
        assert!(
            parts[0]
                .field("content-type")
                .unwrap()
                .starts_with("text/plain")
        );
        assert_eq!(
            parts[1].field("content-type"),
            Some("message/delivery-status")
        );
        assert_eq!(parts[1].field("content-transfer-encoding"), Some("7bit"));

        let groups = status_groups(&parts[1].body);
        assert_eq!(groups.len(), 3, "one per-message group and two recipients");
        assert_eq!(
            groups[0].field("reporting-mta"),
            Some("dns; mta.example.com")
        );
        assert_eq!(groups[0].field("original-envelope-id"), Some("QQ314159"));
        assert!(groups[0].field("arrival-date").is_some());

        let finals: Vec<&str> = groups[1..]
            .iter()
            .map(|group| group.field("final-recipient").unwrap())
            .collect();
        assert_eq!(
            finals,
            vec![
                "rfc822; nobody@example.net",
                "rfc822; also-gone@example.net"
            ]
        );
        assert!(
            finals
                .iter()
                .all(|value| !value.contains("app@example.com"))
        );
        for group in &groups[1..] {
            assert_eq!(group.field("action"), Some("failed"));
            assert_eq!(group.field("status"), Some("5.1.1"));
            assert_eq!(group.field("remote-mta"), Some("dns; mx.example.net"));
            assert!(
                group
                    .field("diagnostic-code")
                    .unwrap()
                    .starts_with("smtp; 550 5.1.1")
            );
            assert!(group.field("last-attempt-date").is_some());
            assert!(group.field("will-retry-until").is_none());
        }
        assert_eq!(
            groups[1].field("original-recipient"),
            Some("rfc822;nobody@example.net")
        );
        assert!(
            groups[1]
                .field("diagnostic-code")
                .unwrap()
                .ends_with("User unknown in virtual mailbox table")
        );

        // RET=HDRS: the header only, never the body.
        assert_eq!(parts[2].field("content-type"), Some("text/rfc822-headers"));
        assert_eq!(parts[2].field("content-transfer-encoding"), Some("7bit"));
        assert!(parts[2].body.contains("Subject: dsn test"));
        assert!(!text.contains("secret body line"));
    }

    #[test]
    fn dsn_dates_have_numeric_zones() {
        let text = two_failed_dsn(None);
        let message = Entity::parse(&text);
        let groups = status_groups(&message.parts()[1].body);
        let mut dates = vec![message.field("date").unwrap().to_string()];
        dates.push(groups[0].field("arrival-date").unwrap().to_string());
        dates.push(groups[1].field("last-attempt-date").unwrap().to_string());
        for date in &dates {
            let zone = date.rsplit(' ').next().unwrap();
            assert_eq!(zone.len(), 5, "date {date:?}");
            assert!(zone.starts_with(['+', '-']), "date {date:?}");
            assert!(
                zone[1..].bytes().all(|byte| byte.is_ascii_digit()),
                "date {date:?}"
            );
        }
        assert_eq!(dates[1], "Tue, 2 Jan 2024 15:03:20 +0000");
    }

    #[test]
    fn dsn_full_return_is_unencoded_rfc822() {
        let text = two_failed_dsn(Some(Ret::Full));
        let parts = Entity::parse(&text).parts();
        assert_eq!(parts[2].field("content-type"), Some("message/rfc822"));
        assert_eq!(parts[2].field("content-transfer-encoding"), Some("7bit"));
        assert!(parts[2].body.contains("secret body line"));
        // The default (no RET) is the full message too.
        let parts = Entity::parse(&two_failed_dsn(None)).parts();
        assert_eq!(parts[2].field("content-type"), Some("message/rfc822"));
    }

    #[test]
    fn dsn_delayed_and_global() {
        let recipients = [DsnRecipient {
            final_recipient: "gr\u{e5}@example.net",
            original_recipient: None,
            action: DsnAction::Delayed,
            status: EnhancedStatus::new(4, 4, 2),
            remote_mta: None,
            diagnostic: Some("451 4.4.2 connection lost after end of data\r\nInjected: yes"),
            last_attempt_unix_us: Some(1_704_207_845_000_000),
            will_retry_until_unix_us: Some(1_704_639_845_000_000),
        }];
        let original = "From: app@example.com\r\nSubject: caf\u{e9}\r\n\r\nbody\r\n";
        let input = DsnInput {
            reporting_mta: "mta.example.com",
            sender: "app@example.com",
            envid: Some("id with space+"),
            arrival_unix_us: 1_704_207_800_000_000,
            recipients: &recipients,
            original: original.as_bytes(),
            ret: None,
            smtputf8: true,
        };
        let text = String::from_utf8(build_dsn(&input)).unwrap();

        let message = Entity::parse(&text);
        assert_eq!(
            message.field("subject"),
            Some("Delayed Mail (still being retried)")
        );

        let parts = message.parts();
        assert_eq!(
            parts[1].field("content-type"),
            Some("message/global-delivery-status")
        );
        assert_eq!(parts[1].field("content-transfer-encoding"), Some("8bit"));

        let groups = status_groups(&parts[1].body);
        assert_eq!(
            groups[0].field("original-envelope-id"),
            Some("id+20with+20space+2B")
        );
        assert_eq!(
            groups[1].field("final-recipient"),
            Some("utf-8; gr\u{e5}@example.net")
        );
        assert!(groups[1].field("will-retry-until").is_some());
        // The CR LF in the diagnostic cannot start a field of its own.
        assert!(groups[1].fields.iter().all(|(name, _)| name != "injected"));

        assert_eq!(parts[2].field("content-type"), Some("message/global"));
        assert_eq!(parts[2].field("content-transfer-encoding"), Some("8bit"));
    }

    #[test]
    fn dsn_unsendable_original_returns_headers() {
        let mut original = b"Subject: long\r\n\r\n".to_vec();
        original.extend(std::iter::repeat_n(b'A', 1200));
        original.extend_from_slice(b"\r\n");
        let recipients = [failed("a@example.net", "550 5.1.1 no")];
        let input = DsnInput {
            reporting_mta: "mta.example.com",
            sender: "app@example.com",
            envid: None,
            arrival_unix_us: 0,
            recipients: &recipients,
            original: &original,
            ret: Some(Ret::Full),
            smtputf8: false,
        };
        let text = String::from_utf8(build_dsn(&input)).unwrap();
        let parts = Entity::parse(&text).parts();
        assert_eq!(parts[2].field("content-type"), Some("text/rfc822-headers"));
        assert!(text.lines().all(|line| line.len() <= MAX_LINE_OCTETS));
    }
}
