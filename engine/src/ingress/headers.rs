//! Header checks and changes on a completely received message.
//!
//! The submission sockets are a submission service in the sense of
//! RFC 6409, so a missing `Date:` or `Message-ID:` is added here
//! (RFC 6409 §8.2, §8.3), and the injection header `X-Caduceus-Category` is
//! read and removed before the message is stored.

use std::time::{SystemTime, UNIX_EPOCH};

use caduceus_policy::Category;

use crate::smtp::{EnhancedStatus, Reply};

/// The header a submitting application uses to set the message category.
pub const CATEGORY_HEADER: &str = "X-Caduceus-Category";

/// The submission details recorded in the Received header.
#[derive(Clone, Debug)]
pub struct ReceivedInfo<'a> {
    pub helo: &'a str,
    /// `SMTP` after HELO, `ESMTP` after EHLO, `UTF8SMTP` for an SMTPUTF8
    /// transaction (RFC 6531 §3.7.3).
    pub protocol: &'a str,
    pub uid: u32,
    pub pid: u32,
    pub hostname: &'a str,
    pub queue_id_hex: &'a str,
}

/// A message after the header step.
#[derive(Debug, PartialEq, Eq)]
pub struct PreparedMessage {
    pub body: Vec<u8>,
    /// The category from `X-Caduceus-Category`, or `None` when the message
    /// named none.
    pub category_override: Option<Category>,
}

/// One header field, continuation lines included, as a byte range of the
/// message.
struct Field {
    start: usize,
    end: usize,
    name_end: usize,
}

/// The header section of a message.
struct HeaderSection {
    fields: Vec<Field>,
    /// The offset of the body: after the empty separator line, or at the
    /// first line that is not a header field when there is no separator.
    body_start: usize,
    /// Whether the header section ended with an empty line.
    has_separator: bool,
}

fn parse_header_section(message: &[u8]) -> HeaderSection {
    let mut fields: Vec<Field> = Vec::new();
    let mut offset = 0;
    while offset < message.len() {
        // The DATA scanner rejects bare CR and LF, so every line ends in CRLF
        // except possibly the last.
        let line_end = message[offset..]
            .windows(2)
            .position(|pair| pair == b"\r\n")
            .map(|position| offset + position + 2)
            .unwrap_or(message.len());
        let line = &message[offset..line_end];
        if line == b"\r\n" {
            return HeaderSection {
                fields,
                body_start: line_end,
                has_separator: true,
            };
        }
        let continuation = matches!(line.first(), Some(b' ' | b'\t'));
        if continuation && let Some(last) = fields.last_mut() {
            last.end = line_end;
        } else if let Some(name_end) = field_name_end(line) {
            fields.push(Field {
                start: offset,
                end: line_end,
                name_end: offset + name_end,
            });
        } else {
            return HeaderSection {
                fields,
                body_start: offset,
                has_separator: false,
            };
        }
        offset = line_end;
    }
    HeaderSection {
        fields,
        body_start: message.len(),
        has_separator: false,
    }
}

/// RFC 5322 §3.6.8: field-name = 1*ftext, printable ASCII except the colon.
fn field_name_end(line: &[u8]) -> Option<usize> {
    let colon = line.iter().position(|byte| *byte == b':')?;
    let name = &line[..colon];
    let valid = !name.is_empty() && name.iter().all(|byte| (33..=126).contains(byte));
    valid.then_some(colon)
}

fn reject(code: u16, class: u8, subject: u16, detail: u16, text: &str) -> Reply {
    Reply::new(code, EnhancedStatus::new(class, subject, detail), text)
}

fn parse_category(value: &[u8]) -> Option<Category> {
    let unfolded: Vec<u8> = value
        .iter()
        .copied()
        .filter(|byte| !matches!(byte, b'\r' | b'\n'))
        .collect();
    let text = std::str::from_utf8(&unfolded)
        .ok()?
        .trim_matches([' ', '\t']);
    if text.eq_ignore_ascii_case("transactional") {
        Some(Category::Transactional)
    } else if text.eq_ignore_ascii_case("care") {
        Some(Category::Care)
    } else if text.eq_ignore_ascii_case("marketing") {
        Some(Category::Marketing)
    } else {
        None
    }
}

/// Checks the Received count, takes the category header out, adds any
/// missing Date and Message-ID, and prepends the Received header.
///
/// Rejections: more than `max_received_headers` Received fields gets
/// `554 5.4.6` (RFC 5321 §6.3, a routing loop), and an
/// `X-Caduceus-Category` that is repeated or names no known category gets
/// `554 5.6.0`, because the content is malformed rather than refused by
/// policy.
pub fn prepare_message(
    message: &[u8],
    received: &ReceivedInfo<'_>,
    max_received_headers: u32,
    now: SystemTime,
) -> Result<PreparedMessage, Reply> {
    let section = parse_header_section(message);
    let field_named = |field: &Field, name: &str| {
        message[field.start..field.name_end]
            .trim_ascii_end()
            .eq_ignore_ascii_case(name.as_bytes())
    };

    let received_count = section
        .fields
        .iter()
        .filter(|field| field_named(field, "Received"))
        .count();
    if received_count > max_received_headers as usize {
        return Err(reject(
            554,
            5,
            4,
            6,
            "Message rejected: too many Received headers, probably a mail loop",
        ));
    }

    let mut category_override = None;
    let category_fields: Vec<&Field> = section
        .fields
        .iter()
        .filter(|field| field_named(field, CATEGORY_HEADER))
        .collect();
    if category_fields.len() > 1 {
        return Err(reject(
            554,
            5,
            6,
            0,
            "Message rejected: more than one X-Caduceus-Category header",
        ));
    }
    if let Some(field) = category_fields.first() {
        let value = &message[field.name_end + 1..field.end];
        let Some(category) = parse_category(value) else {
            return Err(reject(
                554,
                5,
                6,
                0,
                "Message rejected: X-Caduceus-Category must be transactional, care or marketing",
            ));
        };
        category_override = Some(category);
    }

    let has_date = section
        .fields
        .iter()
        .any(|field| field_named(field, "Date"));
    let has_message_id = section
        .fields
        .iter()
        .any(|field| field_named(field, "Message-ID"));
    let date = format_rfc5322_date(now);

    let mut body = Vec::with_capacity(message.len() + 512);
    write_received(&mut body, received, &date);
    let mut copied_until = 0;
    for field in category_fields {
        body.extend_from_slice(&message[copied_until..field.start]);
        copied_until = field.end;
    }
    body.extend_from_slice(&message[copied_until..section.fields_end()]);
    if !has_date {
        body.extend_from_slice(format!("Date: {date}\r\n").as_bytes());
    }
    if !has_message_id {
        let message_id = format!(
            "Message-ID: <{}@{}>\r\n",
            received.queue_id_hex, received.hostname
        );
        body.extend_from_slice(message_id.as_bytes());
    }
    if !section.has_separator && section.body_start < message.len() {
        // A message whose first non-header line follows the fields directly
        // gets the empty separator line, so that the added fields are not
        // read as body text.
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(&message[section.fields_end()..]);
    Ok(PreparedMessage {
        body,
        category_override,
    })
}

impl HeaderSection {
    /// Returns the end of the last header field, where added fields go.
    fn fields_end(&self) -> usize {
        self.fields.last().map(|field| field.end).unwrap_or(0)
    }
}

/// RFC 5321 §4.4 trace field, folded so that no line passes 78 characters
/// for usual host names.
fn write_received(out: &mut Vec<u8>, received: &ReceivedInfo<'_>, date: &str) {
    let text = format!(
        "Received: from {} (uid {} pid {})\r\n\tby {} (Caduceus) with {} id {};\r\n\t{}\r\n",
        received.helo,
        received.uid,
        received.pid,
        received.hostname,
        received.protocol,
        received.queue_id_hex,
        date
    );
    out.extend_from_slice(text.as_bytes());
}

/// Formats a time as an RFC 5322 §3.3 date-time in UTC with a numeric zone,
/// such as `Tue, 02 Jan 2024 15:04:05 +0000`.
pub fn format_rfc5322_date(time: SystemTime) -> String {
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    // A clock before 1970 is a broken host; the epoch is the closest date.
    let seconds = time
        .duration_since(UNIX_EPOCH)
        .map(|duration| duration.as_secs())
        .unwrap_or(0);
    let days = seconds / 86_400;
    let second_of_day = seconds % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{}, {:02} {} {:04} {:02}:{:02}:{:02} +0000",
        WEEKDAYS[(days % 7) as usize],
        day,
        MONTHS[(month - 1) as usize],
        year,
        second_of_day / 3600,
        second_of_day / 60 % 60,
        second_of_day % 60
    )
}

/// Converts days since 1970-01-01 to a proleptic Gregorian (year, month,
/// day), using 400-year eras of 146097 days.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    // Shift the epoch to 0000-03-01, so that leap days fall at the end of
    // each year.
    let shifted = days + 719_468;
    let era = shifted / 146_097;
    let day_of_era = shifted % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn info() -> ReceivedInfo<'static> {
        ReceivedInfo {
            helo: "client.example.com",
            protocol: "ESMTP",
            uid: 1000,
            pid: 4242,
            hostname: "mta.example.com",
            queue_id_hex: "00112233445566778899aabbccddeeff",
        }
    }

    fn at(seconds: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(seconds)
    }

    fn prepare(message: &[u8]) -> Result<PreparedMessage, Reply> {
        prepare_message(message, &info(), 100, at(1_704_207_845))
    }

    fn count_fields(message: &[u8], name: &str) -> usize {
        let text = String::from_utf8_lossy(message);
        let header = text
            .split("\r\n\r\n")
            .next()
            .unwrap_or_default()
            .to_string();
        header
            .split("\r\n")
            .filter(|line| {
                line.split(':')
                    .next()
                    .is_some_and(|field| field.eq_ignore_ascii_case(name))
            })
            .count()
    }

    /// Checks the shape `^[A-Z][a-z]{2}, \d{1,2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} [+-]\d{4}$`.
    fn is_rfc5322_date(text: &str) -> bool {
        let bytes = text.as_bytes();
        let pattern: &[&str] = &[
            "Aaa", ", ", "d", "D", " ", "Aaa", " ", "dddd", " ", "dd:dd:dd", " ", "sdddd",
        ];
        let mut index = 0;
        for part in pattern {
            if *part == "D" {
                if bytes.get(index).is_some_and(u8::is_ascii_digit) {
                    index += 1;
                }
                continue;
            }
            for (position, expected) in part.bytes().enumerate() {
                let Some(&byte) = bytes.get(index) else {
                    return false;
                };
                let ok = match expected {
                    b'A' if position == 0 => byte.is_ascii_uppercase(),
                    b'a' | b'A' => byte.is_ascii_lowercase(),
                    b'd' => byte.is_ascii_digit(),
                    b's' => byte == b'+' || byte == b'-',
                    literal => byte == literal,
                };
                if !ok {
                    return false;
                }
                index += 1;
            }
        }
        index == bytes.len()
    }

    #[test]
    fn date_format_known_instants() {
        assert_eq!(
            format_rfc5322_date(at(0)),
            "Thu, 01 Jan 1970 00:00:00 +0000"
        );
        assert_eq!(
            format_rfc5322_date(at(1_704_207_845)),
            "Tue, 02 Jan 2024 15:04:05 +0000"
        );
        assert_eq!(
            format_rfc5322_date(at(951_782_400)),
            "Tue, 29 Feb 2000 00:00:00 +0000"
        );
        assert_eq!(
            format_rfc5322_date(at(4_102_444_799)),
            "Thu, 31 Dec 2099 23:59:59 +0000"
        );
        // 2100 is not a leap year: 28 February is followed by 1 March.
        assert_eq!(
            format_rfc5322_date(at(4_107_542_400)),
            "Mon, 01 Mar 2100 00:00:00 +0000"
        );
        assert!(is_rfc5322_date("Tue, 02 Jan 2024 15:04:05 +0000"));
        assert!(!is_rfc5322_date("Tue, 02 Jan 2024 15:04:05 GMT"));
    }

    #[test]
    fn missing_date_and_message_id_added_once() {
        let message =
            b"From: app@example.com\r\nTo: user@example.net\r\nSubject: no date\r\n\r\nhi\r\n";
        let prepared = prepare(message).expect("accepted");
        let body = prepared.body;
        assert_eq!(count_fields(&body, "Date"), 1);
        assert_eq!(count_fields(&body, "Message-ID"), 1);
        assert_eq!(count_fields(&body, "Received"), 1);
        let text = String::from_utf8(body.clone()).expect("ASCII");
        let date_line = text
            .lines()
            .find(|line| line.starts_with("Date: "))
            .expect("Date line");
        assert!(is_rfc5322_date(&date_line["Date: ".len()..]), "{date_line}");
        assert!(
            text.contains("Message-ID: <00112233445566778899aabbccddeeff@mta.example.com>\r\n")
        );
        assert!(text.starts_with(
            "Received: from client.example.com (uid 1000 pid 4242)\r\n\tby mta.example.com (Caduceus) with ESMTP id 00112233445566778899aabbccddeeff;\r\n\tTue, 02 Jan 2024 15:04:05 +0000\r\n"
        ));
        assert!(text.ends_with("Subject: no date\r\nDate: Tue, 02 Jan 2024 15:04:05 +0000\r\nMessage-ID: <00112233445566778899aabbccddeeff@mta.example.com>\r\n\r\nhi\r\n"));
    }

    #[test]
    fn present_date_and_message_id_kept() {
        let message = b"Date: Mon, 01 Jan 2024 00:00:00 +0100\r\nmessage-id: <x@y>\r\n\r\nhi\r\n";
        let body = prepare(message).expect("accepted").body;
        assert_eq!(count_fields(&body, "Date"), 1);
        assert_eq!(count_fields(&body, "Message-ID"), 1);
        assert!(body.ends_with(message));
    }

    #[test]
    fn received_loop_rejected_over_limit() {
        let mut message = Vec::new();
        for relay in 0..101 {
            message.extend_from_slice(
                format!("Received: from relay{relay}.example.org by relay.example.org; Tue, 02 Jan 2024 15:04:05 +0000\r\n")
                    .as_bytes(),
            );
        }
        message.extend_from_slice(b"Subject: loop\r\n\r\nbody\r\n");
        let reply = prepare(&message).expect_err("101 Received headers must be rejected");
        assert_eq!(reply.code, 554);
        assert_eq!(reply.status, Some(EnhancedStatus::new(5, 4, 6)));

        let at_limit_start = message
            .iter()
            .position(|b| *b == b'\n')
            .map(|p| p + 1)
            .unwrap_or(0);
        assert!(
            prepare(&message[at_limit_start..]).is_ok(),
            "100 Received headers are allowed"
        );
    }

    #[test]
    fn category_header_read_and_removed() {
        let message = b"From: a@example.com\r\nX-Caduceus-Category:  Care\r\nSubject: s\r\n\r\nX-Caduceus-Category: marketing\r\n";
        let prepared = prepare(message).expect("accepted");
        assert_eq!(prepared.category_override, Some(Category::Care));
        let text = String::from_utf8(prepared.body).expect("ASCII");
        assert_eq!(
            text.matches("X-Caduceus-Category").count(),
            1,
            "only the body copy remains"
        );
        assert!(text.contains("From: a@example.com\r\nSubject: s\r\n"));
    }

    #[test]
    fn category_header_folded_value() {
        let message = b"x-caduceus-category:\r\n marketing\r\nSubject: s\r\n\r\nbody\r\n";
        let prepared = prepare(message).expect("accepted");
        assert_eq!(prepared.category_override, Some(Category::Marketing));
        assert!(
            !String::from_utf8_lossy(&prepared.body)
                .to_ascii_lowercase()
                .contains("caduceus-category")
        );
    }

    #[test]
    fn category_header_invalid_or_repeated() {
        for message in [
            &b"X-Caduceus-Category: promo\r\n\r\nbody\r\n"[..],
            b"X-Caduceus-Category: care\r\nX-Caduceus-Category: care\r\n\r\nbody\r\n",
        ] {
            let reply = prepare(message).expect_err("rejected");
            assert_eq!(reply.code, 554);
            assert_eq!(reply.status, Some(EnhancedStatus::new(5, 6, 0)));
        }
    }

    #[test]
    fn no_category_header_means_none() {
        assert_eq!(
            prepare(b"Subject: s\r\n\r\nb\r\n")
                .expect("accepted")
                .category_override,
            None
        );
    }

    #[test]
    fn body_without_header_gets_separator() {
        let body = prepare(b"just text\r\n").expect("accepted").body;
        let text = String::from_utf8(body).expect("ASCII");
        assert!(
            text.ends_with("@mta.example.com>\r\n\r\njust text\r\n"),
            "{text}"
        );
    }

    #[test]
    fn empty_message_gets_headers() {
        let body = prepare(b"").expect("accepted").body;
        assert_eq!(count_fields(&body, "Date"), 1);
        assert_eq!(count_fields(&body, "Message-ID"), 1);
    }
}
