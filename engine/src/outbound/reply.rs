//! Parsing of server replies (RFC 5321 §4.2) and of the EHLO keywords.

use crate::smtp::{EnhancedStatus, Reply};

/// The longest reply line accepted, CRLF included. RFC 5321 §4.5.3.1.5 sets
/// 512 octets; real servers exceed it, so the client allows eight times that
/// before treating the server as broken.
pub const MAX_REPLY_LINE_BYTES: usize = 4096;

/// The maximum number of lines accepted in one reply. EHLO replies with a few dozen
/// keywords are common, and nothing legitimate comes near this.
pub const MAX_REPLY_LINES: usize = 256;

/// The reason a reply could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplyError {
    /// A line did not start with three digits followed by `-`, a space or
    /// the line end.
    Malformed(String),
    /// The lines of one reply carried different codes.
    MixedCodes,
    LineTooLong,
    TooManyLines,
}

impl std::fmt::Display for ReplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplyError::Malformed(line) => write!(f, "malformed reply line {line:?}"),
            ReplyError::MixedCodes => f.write_str("reply lines carry different codes"),
            ReplyError::LineTooLong => {
                write!(f, "reply line longer than {MAX_REPLY_LINE_BYTES} octets")
            }
            ReplyError::TooManyLines => write!(f, "reply longer than {MAX_REPLY_LINES} lines"),
        }
    }
}

/// Parses one complete reply from the start of `buffer`.
///
/// Returns `Ok(None)` when the final line (`code SP text` or a bare code)
/// has not arrived yet, so the caller reads more and calls again. Nothing is
/// consumed until the whole reply is there. On success returns the reply and
/// the number of bytes it occupied. A bare LF is accepted as a line end on
/// receive, because rejecting a reply the server meant is worse than reading
/// it.
pub fn parse_reply(buffer: &[u8]) -> Result<Option<(Reply, usize)>, ReplyError> {
    let mut offset = 0;
    let mut code: Option<u16> = None;
    let mut raw_lines: Vec<String> = Vec::new();

    loop {
        let rest = &buffer[offset..];
        let Some(newline) = rest.iter().position(|&byte| byte == b'\n') else {
            if rest.len() > MAX_REPLY_LINE_BYTES {
                return Err(ReplyError::LineTooLong);
            }
            return Ok(None);
        };
        if newline + 1 > MAX_REPLY_LINE_BYTES {
            return Err(ReplyError::LineTooLong);
        }
        let mut line = &rest[..newline];
        if let Some(stripped) = line.strip_suffix(b"\r") {
            line = stripped;
        }
        offset += newline + 1;

        let line_text = String::from_utf8_lossy(line);
        let bytes = line_text.as_bytes();
        if bytes.len() < 3 || !bytes[..3].iter().all(u8::is_ascii_digit) {
            return Err(ReplyError::Malformed(line_text.into_owned()));
        }
        let line_code: u16 = line_text[..3]
            .parse()
            .map_err(|_| ReplyError::Malformed(line_text.to_string()))?;
        if !(200..600).contains(&line_code) {
            return Err(ReplyError::Malformed(line_text.into_owned()));
        }
        match code {
            None => code = Some(line_code),
            Some(first) if first != line_code => return Err(ReplyError::MixedCodes),
            Some(_) => {}
        }
        let (is_last, text) = match bytes.get(3) {
            None => (true, ""),
            Some(b' ') => (true, &line_text[4..]),
            Some(b'-') => (false, &line_text[4..]),
            Some(_) => return Err(ReplyError::Malformed(line_text.into_owned())),
        };
        raw_lines.push(text.to_string());
        if raw_lines.len() > MAX_REPLY_LINES {
            return Err(ReplyError::TooManyLines);
        }
        if is_last {
            // The loop sets `code` on its first line, and a reply has at
            // least one line by the time `is_last` is seen.
            let code = code.unwrap_or(line_code);
            return Ok(Some((build_reply(code, raw_lines), offset)));
        }
    }
}

/// Moves the enhanced status (RFC 2034 §4) out of the text of every line.
/// The status is kept only when its class matches the reply code's first
/// digit, as RFC 3463 §2 requires.
fn build_reply(code: u16, raw_lines: Vec<String>) -> Reply {
    let class = (code / 100) as u8;
    let first_status = raw_lines
        .first()
        .and_then(|line| EnhancedStatus::parse_prefix(line))
        .map(|(status, _)| status)
        .filter(|status| status.class == class);

    let lines = raw_lines
        .into_iter()
        .map(
            |line| match (first_status, EnhancedStatus::parse_prefix(&line)) {
                (Some(expected), Some((status, rest))) if status == expected => rest.to_string(),
                _ => line,
            },
        )
        .collect();
    Reply {
        code,
        status: first_status,
        lines,
    }
}

/// The ESMTP extensions of the server that the client uses, from the EHLO
/// reply (RFC 5321 §4.1.1.1).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// True when the session started with HELO, so no extension is usable.
    pub helo_only: bool,
    pub pipelining: bool,
    /// BDAT (RFC 3030).
    pub chunking: bool,
    pub eight_bit_mime: bool,
    pub smtputf8: bool,
    pub dsn: bool,
    pub starttls: bool,
    pub enhanced_status_codes: bool,
    /// The SIZE limit (RFC 1870 §4). `Some(0)` means SIZE is offered without
    /// a limit, `None` that SIZE is not offered.
    pub size_limit_bytes: Option<u64>,
}

impl Capabilities {
    /// Reads the keywords from the lines after the first (the first line is
    /// the server's domain and greeting). Keywords are case-insensitive.
    pub fn from_ehlo(reply: &Reply) -> Capabilities {
        let mut capabilities = Capabilities::default();
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            match keyword.to_ascii_uppercase().as_str() {
                "PIPELINING" => capabilities.pipelining = true,
                "CHUNKING" => capabilities.chunking = true,
                "8BITMIME" => capabilities.eight_bit_mime = true,
                "SMTPUTF8" => capabilities.smtputf8 = true,
                "DSN" => capabilities.dsn = true,
                "STARTTLS" => capabilities.starttls = true,
                "ENHANCEDSTATUSCODES" => capabilities.enhanced_status_codes = true,
                "SIZE" => {
                    let limit = words.next().and_then(|word| word.parse().ok());
                    capabilities.size_limit_bytes = Some(limit.unwrap_or(0));
                }
                _ => {}
            }
        }
        capabilities
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_incomplete_until_final_line() {
        assert_eq!(parse_reply(b"220-mx.example.net ESMTP\r\n"), Ok(None));
        assert_eq!(parse_reply(b"250 o"), Ok(None));
    }

    #[test]
    fn reply_multiline_keeps_every_line() {
        let wire = b"550-5.1.1 The account does not exist.\r\n550-5.1.1 Check the address\r\n550 5.1.1 and try again.\r\nextra";
        let (reply, used) = parse_reply(wire).unwrap().unwrap();
        assert_eq!(used, wire.len() - "extra".len());
        assert_eq!(reply.code, 550);
        assert_eq!(reply.status, Some(EnhancedStatus::new(5, 1, 1)));
        assert_eq!(
            reply.lines,
            vec![
                "The account does not exist.",
                "Check the address",
                "and try again."
            ]
        );
    }

    #[test]
    fn reply_bare_code_line() {
        let (reply, _) = parse_reply(b"354\r\n").unwrap().unwrap();
        assert_eq!(reply.code, 354);
        assert_eq!(reply.lines, vec![String::new()]);
    }

    #[test]
    fn reply_rejects_garbage() {
        assert!(matches!(
            parse_reply(b"hello\r\n"),
            Err(ReplyError::Malformed(_))
        ));
        assert_eq!(
            parse_reply(b"250-a\r\n251 b\r\n"),
            Err(ReplyError::MixedCodes)
        );
        let long = vec![b'2'; MAX_REPLY_LINE_BYTES + 1];
        assert_eq!(parse_reply(&long), Err(ReplyError::LineTooLong));
    }

    #[test]
    fn reply_status_class_must_match_code() {
        let (reply, _) = parse_reply(b"250 5.1.1 odd\r\n").unwrap().unwrap();
        assert_eq!(reply.status, None);
        assert_eq!(reply.lines, vec!["5.1.1 odd"]);
    }

    #[test]
    fn ehlo_keywords_parsed() {
        let (reply, _) = parse_reply(
            b"250-mx.example.net\r\n250-size 1000\r\n250-8BITMIME\r\n250-PIPELINING\r\n250-DSN\r\n250 STARTTLS\r\n",
        )
        .unwrap()
        .unwrap();
        let capabilities = Capabilities::from_ehlo(&reply);
        assert!(capabilities.eight_bit_mime);
        assert!(capabilities.pipelining);
        assert!(capabilities.dsn);
        assert!(capabilities.starttls);
        assert!(!capabilities.smtputf8);
        assert_eq!(capabilities.size_limit_bytes, Some(1000));
    }
}
