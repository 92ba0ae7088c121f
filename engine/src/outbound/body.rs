//! Preparing a spooled message for DATA: line-end repair, 7-bit and
//! line-length conversion, dot-stuffing, and xtext for DSN parameters.
//!
//! Conversion rules (documented in docs/outbound.md):
//! - Bare CR and bare LF become CRLF, because RFC 5321 §2.3.8 forbids
//!   sending them and a receiver may read them as line ends (SMTP smuggling).
//! - A body with a NUL octet fails permanently with 5.6.0: RFC 2045 §2.7–2.8
//!   forbids NUL in 7bit and 8bit data, and the client does not speak
//!   BINARYMIME over BDAT.
//! - A MIME leaf part with an octet above 0x7F (when the server lacks
//!   8BITMIME) or a line over 998 octets is re-encoded: text parts as
//!   quoted-printable, other parts as base64 (RFC 2045 §6.7, §6.8), with
//!   `Content-Transfer-Encoding` rewritten. Multipart bodies are walked
//!   recursively along their boundaries.
//! - What cannot be re-encoded fails permanently with 5.6.3: 8-bit or
//!   over-long header lines, a `message/*` part that needs conversion, a part
//!   already declared quoted-printable or base64 that still breaks the rules,
//!   and a multipart body whose boundary is missing.

use std::borrow::Cow;

use base64::Engine as _;

use crate::smtp::{EnhancedStatus, Reply};

/// RFC 5322 §2.1.1: at most 998 octets per line, not counting CRLF.
pub const MAX_LINE_OCTETS: usize = 998;

/// RFC 2045 §6.7 rule 5: encoded lines are at most 76 characters.
const MAX_ENCODED_LINE: usize = 76;

/// Multipart nesting deeper than this is refused rather than converted, so a
/// hostile body cannot drive the recursion without bound.
const MAX_MULTIPART_DEPTH: usize = 16;

/// The findings of one pass over the body.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BodyScan {
    pub has_nul: bool,
    pub has_8bit: bool,
    pub has_bare_line_end: bool,
    pub max_line_octets: usize,
}

pub fn scan(body: &[u8]) -> BodyScan {
    let mut result = BodyScan::default();
    let mut line_start = 0;
    let mut index = 0;
    while index < body.len() {
        let byte = body[index];
        match byte {
            0 => result.has_nul = true,
            0x80..=0xff => result.has_8bit = true,
            b'\r' | b'\n' => {
                let crlf = byte == b'\r' && body.get(index + 1) == Some(&b'\n');
                if !crlf {
                    result.has_bare_line_end = true;
                }
                result.max_line_octets = result.max_line_octets.max(index - line_start);
                index += if crlf { 2 } else { 1 };
                line_start = index;
                continue;
            }
            _ => {}
        }
        index += 1;
    }
    result.max_line_octets = result.max_line_octets.max(body.len() - line_start);
    result
}

/// Rewrites every bare CR and bare LF as CRLF.
pub fn normalize_line_ends(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / 64);
    let mut index = 0;
    while index < body.len() {
        match body[index] {
            b'\r' if body.get(index + 1) == Some(&b'\n') => {
                out.extend_from_slice(b"\r\n");
                index += 2;
                continue;
            }
            b'\r' | b'\n' => out.extend_from_slice(b"\r\n"),
            other => out.push(other),
        }
        index += 1;
    }
    out
}

/// A body ready for DATA, and whether it still carries 8-bit octets (so
/// MAIL needs `BODY=8BITMIME`).
#[derive(Debug)]
pub struct PreparedBody<'a> {
    pub bytes: Cow<'a, [u8]>,
    pub eight_bit: bool,
}

/// Prepares `body` for a server that does (`server_8bit`) or does not offer
/// 8BITMIME. Borrows the body when nothing needs to change. A permanent
/// reply is returned when the body cannot be sent.
pub fn prepare(body: &[u8], server_8bit: bool) -> Result<PreparedBody<'_>, Reply> {
    let found = scan(body);
    if found.has_nul {
        return Err(Reply::new(
            554,
            EnhancedStatus::new(5, 6, 0),
            "message contains NUL octets and cannot be sent as 7bit or 8bit data",
        ));
    }
    let needs_7bit = found.has_8bit && !server_8bit;
    let too_long = found.max_line_octets > MAX_LINE_OCTETS;
    if !found.has_bare_line_end && !needs_7bit && !too_long {
        return Ok(PreparedBody {
            bytes: Cow::Borrowed(body),
            eight_bit: found.has_8bit,
        });
    }

    let normalized = if found.has_bare_line_end {
        Cow::Owned(normalize_line_ends(body))
    } else {
        Cow::Borrowed(body)
    };
    if !needs_7bit && !too_long {
        return Ok(PreparedBody {
            bytes: normalized,
            eight_bit: found.has_8bit,
        });
    }

    let mut out = Vec::with_capacity(normalized.len() + normalized.len() / 8);
    convert_entity(&normalized, needs_7bit, 0, &mut out).map_err(|reason| {
        Reply::new(
            554,
            EnhancedStatus::new(5, 6, 3),
            format!("conversion required but not supported: {reason}"),
        )
    })?;
    let eight_bit = scan(&out).has_8bit;
    Ok(PreparedBody {
        bytes: Cow::Owned(out),
        eight_bit,
    })
}

/// The parsed header fields of a MIME entity that conversion needs.
struct EntityHeader {
    /// Lowercase `type/subtype`; `text/plain` when absent (RFC 2045 §5.2).
    content_type: String,
    boundary: Option<String>,
    /// Lowercase transfer encoding; `7bit` when absent (RFC 2045 §6.1).
    transfer_encoding: String,
}

/// Splits an entity at the empty line that ends its header. Returns the
/// header including its final CRLF and the body after the empty line.
fn split_entity(entity: &[u8]) -> (&[u8], &[u8]) {
    if entity.starts_with(b"\r\n") {
        return (&[], &entity[2..]);
    }
    match find(entity, b"\r\n\r\n") {
        Some(at) => (&entity[..at + 2], &entity[at + 4..]),
        None => (entity, &[]),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// Unfolds the header (RFC 5322 §2.2.3) into `(name, value)` pairs.
fn header_fields(header: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(header);
    let mut fields: Vec<(String, String)> = Vec::new();
    for line in text.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = fields.last_mut() {
                value.push(' ');
                value.push_str(line.trim());
            }
        } else if let Some((name, value)) = line.split_once(':') {
            fields.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
    }
    fields
}

fn parse_entity_header(header: &[u8]) -> EntityHeader {
    let mut parsed = EntityHeader {
        content_type: "text/plain".to_string(),
        boundary: None,
        transfer_encoding: "7bit".to_string(),
    };
    for (name, value) in header_fields(header) {
        match name.as_str() {
            "content-type" => {
                let mut params = value.split(';');
                if let Some(media_type) = params.next() {
                    parsed.content_type = media_type.trim().to_ascii_lowercase();
                }
                for param in params {
                    if let Some((key, param_value)) = param.split_once('=')
                        && key.trim().eq_ignore_ascii_case("boundary")
                    {
                        let trimmed = param_value.trim();
                        let unquoted = trimmed
                            .strip_prefix('"')
                            .and_then(|inner| inner.strip_suffix('"'))
                            .unwrap_or(trimmed);
                        parsed.boundary = Some(unquoted.to_string());
                    }
                }
            }
            "content-transfer-encoding" => {
                parsed.transfer_encoding = value.trim().to_ascii_lowercase();
            }
            _ => {}
        }
    }
    parsed
}

/// Converts one entity (a whole message or a MIME part) into `out`.
fn convert_entity(
    entity: &[u8],
    needs_7bit: bool,
    depth: usize,
    out: &mut Vec<u8>,
) -> Result<(), &'static str> {
    let (header, body) = split_entity(entity);
    let header_scan = scan(header);
    if header_scan.max_line_octets > MAX_LINE_OCTETS {
        return Err("a header line is longer than 998 octets");
    }
    if needs_7bit && header_scan.has_8bit {
        return Err("a header field contains 8-bit octets");
    }

    let body_scan = scan(body);
    let body_ok =
        body_scan.max_line_octets <= MAX_LINE_OCTETS && !(needs_7bit && body_scan.has_8bit);
    if body_ok {
        out.extend_from_slice(entity);
        return Ok(());
    }

    let parsed = parse_entity_header(header);
    if parsed.content_type.starts_with("multipart/") {
        if depth >= MAX_MULTIPART_DEPTH {
            return Err("multipart nesting is too deep");
        }
        let boundary = parsed
            .boundary
            .ok_or("a multipart part has no boundary parameter")?;
        out.extend_from_slice(header);
        out.extend_from_slice(b"\r\n");
        return convert_multipart(body, &boundary, needs_7bit, depth, out);
    }
    if parsed.content_type.starts_with("message/") {
        return Err("an encapsulated message would need conversion");
    }
    if !matches!(
        parsed.transfer_encoding.as_str(),
        "7bit" | "8bit" | "binary"
    ) {
        return Err("a part with an encoded transfer encoding still breaks the line rules");
    }

    write_header_with_encoding(header, &parsed, out);
    if parsed.content_type.starts_with("text/") {
        encode_quoted_printable(body, out);
    } else {
        encode_base64(body, out);
    }
    Ok(())
}

/// Copies the header without its `Content-Transfer-Encoding` field, then
/// adds the new one.
fn write_header_with_encoding(header: &[u8], parsed: &EntityHeader, out: &mut Vec<u8>) {
    let mut skipping = false;
    for line in header.split_inclusive(|&byte| byte == b'\n') {
        let continuation = line.starts_with(b" ") || line.starts_with(b"\t");
        if !continuation {
            skipping =
                line.len() >= 26 && line[..26].eq_ignore_ascii_case(b"content-transfer-encoding:");
        }
        if !skipping {
            out.extend_from_slice(line);
        }
    }
    let encoding: &[u8] = if parsed.content_type.starts_with("text/") {
        b"quoted-printable"
    } else {
        b"base64"
    };
    out.extend_from_slice(b"Content-Transfer-Encoding: ");
    out.extend_from_slice(encoding);
    out.extend_from_slice(b"\r\n\r\n");
}

/// Converts each part between the boundary delimiters (RFC 2046 §5.1.1).
/// The preamble and epilogue must already be valid, since a receiver ignores
/// them and they cannot be re-encoded.
fn convert_multipart(
    body: &[u8],
    boundary: &str,
    needs_7bit: bool,
    depth: usize,
    out: &mut Vec<u8>,
) -> Result<(), &'static str> {
    let delimiter = format!("--{boundary}");
    let lines: Vec<&[u8]> = body.split_inclusive(|&byte| byte == b'\n').collect();
    let is_delimiter = |line: &[u8]| -> Option<bool> {
        let content = line.strip_suffix(b"\r\n").unwrap_or(line);
        let rest = content.strip_prefix(delimiter.as_bytes())?;
        let (closing, rest) = match rest.strip_prefix(b"--") {
            Some(after) => (true, after),
            None => (false, rest),
        };
        rest.iter()
            .all(|&byte| byte == b' ' || byte == b'\t')
            .then_some(closing)
    };

    let mut part_start: Option<usize> = None;
    let mut offset = 0;
    let mut closed = false;
    let mut preamble_end = None;
    for line in &lines {
        if let Some(closing) = is_delimiter(line) {
            match part_start {
                None => {
                    preamble_end = Some(offset);
                    check_untouched(&body[..offset], needs_7bit)?;
                    out.extend_from_slice(&body[..offset]);
                }
                Some(start) => {
                    // RFC 2046 §5.1.1: the CRLF before a delimiter belongs to
                    // the delimiter, not to the part.
                    let part_end = offset.saturating_sub(2).max(start);
                    convert_entity(&body[start..part_end], needs_7bit, depth + 1, out)?;
                    out.extend_from_slice(&body[part_end..offset]);
                }
            }
            out.extend_from_slice(line);
            offset += line.len();
            if closing {
                closed = true;
                break;
            }
            part_start = Some(offset);
            continue;
        }
        offset += line.len();
    }
    if preamble_end.is_none() {
        return Err("a multipart body contains no boundary delimiter");
    }
    if !closed {
        // A body that ends without the close delimiter: treat the rest as the
        // last part, as receivers do.
        if let Some(start) = part_start {
            convert_entity(&body[start..], needs_7bit, depth + 1, out)?;
        }
        return Ok(());
    }
    check_untouched(&body[offset..], needs_7bit)?;
    out.extend_from_slice(&body[offset..]);
    Ok(())
}

fn check_untouched(bytes: &[u8], needs_7bit: bool) -> Result<(), &'static str> {
    let found = scan(bytes);
    if found.max_line_octets > MAX_LINE_OCTETS || (needs_7bit && found.has_8bit) {
        return Err("a multipart preamble or epilogue would need conversion");
    }
    Ok(())
}

/// Quoted-printable per RFC 2045 §6.7. Line breaks of the text stay hard
/// breaks; long lines get soft breaks (`=` CRLF) so that no encoded line
/// exceeds 76 characters.
pub fn encode_quoted_printable(body: &[u8], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut lines = body.split(|&byte| byte == b'\n').peekable();
    while let Some(raw_line) = lines.next() {
        let is_last = lines.peek().is_none();
        if is_last && raw_line.is_empty() {
            break;
        }
        let line = raw_line.strip_suffix(b"\r").unwrap_or(raw_line);
        let mut column = 0;
        for (index, &byte) in line.iter().enumerate() {
            let at_line_end = index + 1 == line.len();
            // Rule 3: white space at the end of a line must be encoded, since
            // transports may strip it.
            let literal = matches!(byte, 33..=60 | 62..=126)
                || (matches!(byte, b' ' | b'\t') && !at_line_end);
            let width = if literal { 1 } else { 3 };
            // Keep one column free for the `=` of a soft break.
            if column + width > MAX_ENCODED_LINE - 1 {
                out.extend_from_slice(b"=\r\n");
                column = 0;
            }
            if literal {
                out.push(byte);
            } else {
                out.push(b'=');
                out.push(HEX[usize::from(byte >> 4)]);
                out.push(HEX[usize::from(byte & 0x0f)]);
            }
            column += width;
        }
        if !is_last {
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// Base64 per RFC 2045 §6.8, in lines of 76 characters.
pub fn encode_base64(body: &[u8], out: &mut Vec<u8>) {
    // 57 input octets encode to exactly 76 characters.
    for chunk in body.chunks(57) {
        out.extend_from_slice(
            base64::engine::general_purpose::STANDARD
                .encode(chunk)
                .as_bytes(),
        );
        out.extend_from_slice(b"\r\n");
    }
}

/// Encodes a value as xtext (RFC 3461 §4): `+`, `=`, controls, space and
/// octets outside printable ASCII become `+HH`.
pub fn xtext(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for &byte in value.as_bytes() {
        if (33..=126).contains(&byte) && byte != b'+' && byte != b'=' {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("+{byte:02X}"));
        }
    }
    out
}

/// Splits `body` into the pieces of its DATA form (RFC 5321 §4.5.2): a dot
/// is doubled at the start of every line, and the data ends with the CRLF.CRLF
/// terminator. The CRLF that ends the last line is part of the terminator
/// (§4.1.1.4), so a body that already ends in CRLF gets only `.` CRLF.
///
/// The body must have no bare CR or LF (see [`normalize_line_ends`]). The
/// pieces are slices of the body and short literals, so the caller decides
/// how to buffer them and no copy of the whole body is made.
pub fn dot_stuffed(body: &[u8]) -> DotStuffed<'_> {
    DotStuffed {
        body,
        start: 0,
        line_start: 0,
        state: StuffState::Scanning,
    }
}

pub struct DotStuffed<'a> {
    body: &'a [u8],
    /// Start of the body bytes not yet returned.
    start: usize,
    /// Start of the next line to inspect.
    line_start: usize,
    state: StuffState,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum StuffState {
    Scanning,
    ExtraDot,
    Terminator,
    Done,
}

impl<'a> Iterator for DotStuffed<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        loop {
            match self.state {
                StuffState::Scanning => {
                    let at = self.line_start;
                    if at >= self.body.len() {
                        self.state = StuffState::Terminator;
                        let rest = &self.body[self.start..];
                        if !rest.is_empty() {
                            return Some(rest);
                        }
                        continue;
                    }
                    self.line_start = match find(&self.body[at..], b"\r\n") {
                        Some(offset) => at + offset + 2,
                        None => self.body.len(),
                    };
                    if self.body[at] == b'.' {
                        let piece = &self.body[self.start..at];
                        self.start = at;
                        self.state = StuffState::ExtraDot;
                        if !piece.is_empty() {
                            return Some(piece);
                        }
                    }
                }
                StuffState::ExtraDot => {
                    self.state = StuffState::Scanning;
                    return Some(b".");
                }
                StuffState::Terminator => {
                    self.state = StuffState::Done;
                    let ends_line = self.body.is_empty() || self.body.ends_with(b"\r\n");
                    return Some(if ends_line { b".\r\n" } else { b"\r\n.\r\n" });
                }
                StuffState::Done => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stuffed(body: &[u8]) -> Vec<u8> {
        let prepared = prepare(body, true).unwrap();
        dot_stuffed(&prepared.bytes).flatten().copied().collect()
    }

    #[test]
    fn data_tail_cases() {
        // The four spool tails of the CRLF-01 table and their wire forms.
        let cases: [(&[u8], &[u8]); 5] = [
            (b"a: b\r\n\r\nlast line", b"a: b\r\n\r\nlast line\r\n.\r\n"),
            (b"a: b\r\n\r\nlast\r\n", b"a: b\r\n\r\nlast\r\n.\r\n"),
            (b"a: b\r\n\r\nlast\r\n.", b"a: b\r\n\r\nlast\r\n..\r\n.\r\n"),
            (b"a: b\r\n\r\nlast\r", b"a: b\r\n\r\nlast\r\n.\r\n"),
            (b"", b".\r\n"),
        ];
        for (spool, wire) in cases {
            assert_eq!(
                stuffed(spool),
                wire,
                "spool {:?}",
                String::from_utf8_lossy(spool)
            );
        }
    }

    #[test]
    fn dot_stuffing_every_line() {
        let body = b".first\r\n..\r\nmid.dle\r\n.\r\n";
        assert_eq!(stuffed(body), b"..first\r\n...\r\nmid.dle\r\n..\r\n.\r\n");
    }

    #[test]
    fn bare_line_ends_become_crlf() {
        assert_eq!(stuffed(b"a\n.b\rc\r\n"), b"a\r\n..b\r\nc\r\n.\r\n");
        // A bare CR before a dot never produces CR . CRLF on the wire.
        let wire = stuffed(b"x\r.\r\n");
        assert_eq!(wire, b"x\r\n..\r\n.\r\n");
    }

    #[test]
    fn nul_fails_permanently() {
        let reply = prepare(b"Subject: nul\r\n\r\nab\0cd\r\nafter-nul\r\n", true).unwrap_err();
        assert_eq!(reply.code, 554);
        assert_eq!(reply.status, Some(EnhancedStatus::new(5, 6, 0)));
    }

    #[test]
    fn eight_bit_text_becomes_quoted_printable() {
        let body = b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\nSubject: cafe\r\n\r\ncaf\xc3\xa9\r\n";
        let prepared = prepare(body, false).unwrap();
        let text = std::str::from_utf8(&prepared.bytes).unwrap();
        assert!(!prepared.eight_bit);
        assert!(text.contains("Content-Transfer-Encoding: quoted-printable\r\n"));
        assert!(!text.contains("8bit"));
        assert!(text.ends_with("\r\n\r\ncaf=C3=A9\r\n"));
    }

    #[test]
    fn eight_bit_kept_when_server_offers_8bitmime() {
        let body = b"Subject: x\r\n\r\ncaf\xc3\xa9\r\n";
        let prepared = prepare(body, true).unwrap();
        assert!(prepared.eight_bit);
        assert!(matches!(prepared.bytes, Cow::Borrowed(_)));
    }

    #[test]
    fn long_line_becomes_quoted_printable() {
        let mut body = b"MIME-Version: 1.0\r\nContent-Type: text/html; charset=us-ascii\r\nContent-Transfer-Encoding: 7bit\r\nSubject: long\r\n\r\n<p>".to_vec();
        body.extend(std::iter::repeat_n(b'A', 1500));
        body.extend_from_slice(b"</p>\r\n");
        let prepared = prepare(&body, true).unwrap();
        let found = scan(&prepared.bytes);
        assert!(found.max_line_octets <= MAX_ENCODED_LINE);
        let text = std::str::from_utf8(&prepared.bytes).unwrap();
        assert!(text.contains("Content-Transfer-Encoding: quoted-printable\r\n"));
        assert!(text.contains("=\r\n"));
        assert_eq!(text.matches('A').count(), 1500);
    }

    #[test]
    fn multipart_parts_converted_separately() {
        let body = b"Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\npreamble\r\n--b1\r\nContent-Type: text/plain\r\n\r\nplain ascii\r\n--b1\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\ncaf\xc3\xa9\r\n--b1\r\nContent-Type: application/octet-stream\r\n\r\n\xff\xfe\r\n--b1--\r\n";
        let prepared = prepare(body, false).unwrap();
        let text = std::str::from_utf8(&prepared.bytes).unwrap();
        assert!(text.contains("\r\n\r\nplain ascii\r\n--b1\r\n"));
        assert!(
            text.contains(
                "Content-Transfer-Encoding: quoted-printable\r\n\r\ncaf=C3=A9\r\n--b1\r\n"
            )
        );
        assert!(text.contains("Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n//4=\r\n\r\n--b1--\r\n"));
    }

    #[test]
    fn unconvertible_bodies_fail_with_5_6_3() {
        let cases: [&[u8]; 3] = [
            b"Subject: caf\xc3\xa9\r\n\r\nbody\r\n",
            b"Content-Type: multipart/mixed\r\n\r\n\xc3\xa9\r\n",
            b"Content-Type: message/rfc822\r\n\r\nSubject: x\r\n\r\n\xc3\xa9\r\n",
        ];
        for body in cases {
            let reply = prepare(body, false).unwrap_err();
            assert_eq!(reply.status, Some(EnhancedStatus::new(5, 6, 3)));
        }
    }

    #[test]
    fn xtext_encodes_specials() {
        assert_eq!(xtext("abc+0D\r\nX=1 y"), "abc+2B0D+0D+0AX+3D1+20y");
        assert_eq!(
            xtext("rfc822;gr\u{e5}@example.net"),
            "rfc822;gr+C3+A5@example.net"
        );
    }

    /// Undoes dot-stuffing: strips the terminator and one leading dot per
    /// line, as a receiver does (RFC 5321 §4.5.2).
    fn unstuff(wire: &[u8]) -> Vec<u8> {
        let content = if wire == b".\r\n" {
            &[][..]
        } else {
            &wire[..wire.len() - 3]
        };
        let mut out = Vec::new();
        for line in content.split_inclusive(|&byte| byte == b'\n') {
            out.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
        }
        out
    }

    fn decode_quoted_printable(encoded: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut index = 0;
        while index < encoded.len() {
            match encoded[index] {
                b'=' if encoded[index + 1..].starts_with(b"\r\n") => index += 3,
                b'=' => {
                    let hex = std::str::from_utf8(&encoded[index + 1..index + 3]).unwrap();
                    out.push(u8::from_str_radix(hex, 16).unwrap());
                    index += 3;
                }
                byte => {
                    out.push(byte);
                    index += 1;
                }
            }
        }
        out
    }

    #[test]
    fn smuggling_sequences_stay_content() {
        // The SMUG-01 end-of-data variants inside a body: after line-end
        // repair and stuffing, only the real terminator ends the data.
        for fake_end in [
            &b"\n.\r\n"[..],
            b"\n.\n",
            b"\r\n.\n",
            b"\r.\r\n",
            b"\r.\n",
            b"\r\n.\r\r\n",
        ] {
            let mut body = b"Subject: one\r\n\r\nfirst message".to_vec();
            body.extend_from_slice(fake_end);
            body.extend_from_slice(b"MAIL FROM:<ceo@example.org>\r\n");
            let wire = stuffed(&body);
            let first_end = wire.windows(5).position(|w| w == b"\r\n.\r\n");
            assert_eq!(first_end, Some(wire.len() - 5), "variant {fake_end:?}");
            assert!(String::from_utf8_lossy(&wire).contains("MAIL FROM:<ceo@example.org>"));
        }
    }

    proptest::proptest! {
        #[test]
        fn stuffing_round_trips(
            body in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::strategy::Just(b'.'),
                    proptest::strategy::Just(b'\r'),
                    proptest::strategy::Just(b'\n'),
                    proptest::strategy::Just(b'a'),
                    1u8..=255,
                ],
                0..300,
            )
        ) {
            let wire = stuffed(&body);
            let first_end = if wire == b".\r\n" {
                Some(0)
            } else {
                wire.windows(5).position(|w| w == b"\r\n.\r\n")
            };
            let expected_end = if wire == b".\r\n" { 0 } else { wire.len() - 5 };
            proptest::prop_assert_eq!(first_end, Some(expected_end));
            let found = scan(&wire);
            proptest::prop_assert!(!found.has_bare_line_end);

            let mut expected = normalize_line_ends(&body);
            if !expected.is_empty() && !expected.ends_with(b"\r\n") {
                expected.extend_from_slice(b"\r\n");
            }
            proptest::prop_assert_eq!(unstuff(&wire), expected);
        }

        #[test]
        fn quoted_printable_round_trips(
            lines in proptest::collection::vec(
                proptest::collection::vec(1u8..=255, 0..400),
                1..5,
            )
        ) {
            let mut text = Vec::new();
            for line in &lines {
                let clean: Vec<u8> = line.iter().copied().filter(|b| *b != b'\r' && *b != b'\n').collect();
                text.extend_from_slice(&clean);
                text.extend_from_slice(b"\r\n");
            }
            let mut encoded = Vec::new();
            encode_quoted_printable(&text, &mut encoded);
            proptest::prop_assert!(encoded.iter().all(|&b| b < 0x80));
            proptest::prop_assert!(scan(&encoded).max_line_octets <= MAX_ENCODED_LINE);
            proptest::prop_assert_eq!(decode_quoted_printable(&encoded), text);
        }
    }
}
