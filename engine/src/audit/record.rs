//! The JSON encoding of audit records, written straight into a stream's
//! buffer without building an intermediate value or string.
//!
//! A record is one JSON object: the chain fields `seq`, `prev` and
//! `at_us`, then `event` and the event's own fields in a fixed order, with
//! absent optional fields left out. Strings are escaped as serde_json's
//! compact serializer escapes them, which is how earlier versions wrote
//! these lines, so files written before and after this encoder look the
//! same. `verify` hashes the stored bytes and never re-encodes a record, so
//! it reads either.

use caduceus_spool::{MessageId, RecordRef};

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

/// A writer of one record's fields after its opening chain fields.
pub struct Fields<'a> {
    out: &'a mut Vec<u8>,
}

impl<'a> Fields<'a> {
    /// Appends fields to `out`, which already contains the object's opening
    /// brace and at least one field.
    pub fn new(out: &'a mut Vec<u8>) -> Fields<'a> {
        Fields { out }
    }

    /// Writes `,"key":`. Keys are fixed ASCII names that need no escaping.
    fn key(&mut self, key: &str) {
        self.out.extend_from_slice(b",\"");
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    pub fn str(&mut self, key: &str, value: &str) {
        self.key(key);
        write_escaped(self.out, value);
    }

    /// Writes the field when `value` is `Some`, and nothing otherwise.
    pub fn opt_str(&mut self, key: &str, value: Option<&str>) {
        if let Some(value) = value {
            self.str(key, value);
        }
    }

    pub fn u64(&mut self, key: &str, value: u64) {
        self.key(key);
        write_u64(self.out, value);
    }

    /// Writes the field when `value` is `Some`, and nothing otherwise.
    pub fn opt_u64(&mut self, key: &str, value: Option<u64>) {
        if let Some(value) = value {
            self.u64(key, value);
        }
    }

    pub fn bool(&mut self, key: &str, value: bool) {
        self.key(key);
        self.out
            .extend_from_slice(if value { b"true" } else { b"false" });
    }

    /// Writes a message id as 32 lowercase hex digits, as its `Display`
    /// does.
    pub fn message_id(&mut self, key: &str, id: &MessageId) {
        self.key(key);
        self.out.push(b'"');
        write_hex(self.out, &id.0);
        self.out.push(b'"');
    }

    /// Writes a spool location as `"segment:offset"`, the form
    /// [`super::reconcile::location`] returns.
    pub fn location(&mut self, key: &str, record: RecordRef) {
        self.key(key);
        self.out.push(b'"');
        write_u64(self.out, u64::from(record.segment));
        self.out.push(b':');
        write_u64(self.out, record.offset);
        self.out.push(b'"');
    }

    /// Writes a JSON array of strings.
    pub fn str_list(&mut self, key: &str, values: &[String]) {
        self.key(key);
        self.out.push(b'[');
        for (index, value) in values.iter().enumerate() {
            if index > 0 {
                self.out.push(b',');
            }
            write_escaped(self.out, value);
        }
        self.out.push(b']');
    }
}

/// Writes the opening of a record: `{"seq":…,"prev":"…","at_us":…`.
pub fn write_chain_fields(out: &mut Vec<u8>, seq: u64, prev: &[u8; 32], at_us: u64) {
    out.extend_from_slice(b"{\"seq\":");
    write_u64(out, seq);
    out.extend_from_slice(b",\"prev\":\"");
    write_hex(out, prev);
    out.extend_from_slice(b"\",\"at_us\":");
    write_u64(out, at_us);
}

fn write_u64(out: &mut Vec<u8>, value: u64) {
    let mut buffer = itoa::Buffer::new();
    out.extend_from_slice(buffer.format(value).as_bytes());
}

/// Appends the lowercase hex digits of `bytes`.
pub fn write_hex(out: &mut Vec<u8>, bytes: &[u8]) {
    out.reserve(bytes.len() * 2);
    for byte in bytes {
        out.push(HEX_DIGITS[usize::from(byte >> 4)]);
        out.push(HEX_DIGITS[usize::from(byte & 0x0f)]);
    }
}

/// Appends `value` as a JSON string. Like serde_json, it escapes `"`, `\`
/// and the control characters below U+0020 (with the short forms `\b`,
/// `\t`, `\n`, `\f` and `\r` where JSON has them), and copies everything
/// else, U+007F and non-ASCII characters included, unchanged.
fn write_escaped(out: &mut Vec<u8>, value: &str) {
    let bytes = value.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut copied = 0;
    let mut index = 0;
    while index < bytes.len() {
        // Most values need no escaping, so eight bytes are tested at once
        // and only a word that may contain a special byte is walked.
        if let Some(chunk) = bytes.get(index..index + 8) {
            let word = u64::from_le_bytes(chunk.try_into().expect("the chunk has eight bytes"));
            if !word_needs_escape(word) {
                index += 8;
                continue;
            }
        }
        let byte = bytes[index];
        index += 1;
        let short = match byte {
            b'"' => b'"',
            b'\\' => b'\\',
            0x08 => b'b',
            b'\t' => b't',
            b'\n' => b'n',
            0x0c => b'f',
            b'\r' => b'r',
            0x00..=0x1f => b'u',
            _ => continue,
        };
        out.extend_from_slice(&bytes[copied..index - 1]);
        copied = index;
        out.push(b'\\');
        out.push(short);
        if short == b'u' {
            out.extend_from_slice(b"00");
            write_hex(out, &[byte]);
        }
    }
    out.extend_from_slice(&bytes[copied..]);
    out.push(b'"');
}

/// Returns true when any of the eight bytes of `word` is below 0x20 or is
/// `"` or `\`. It uses the exact "has a zero byte" test: `x - 0x01…01`
/// sets the high bit of the lowest byte that was zero (or below the
/// subtracted value), and `& !x` drops bytes that had the high bit set.
fn word_needs_escape(word: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH_BITS: u64 = 0x8080_8080_8080_8080;
    let below_space = word.wrapping_sub(ONES * 0x20) & !word;
    let quote = word ^ (ONES * u64::from(b'"'));
    let backslash = word ^ (ONES * u64::from(b'\\'));
    let has_quote = quote.wrapping_sub(ONES) & !quote;
    let has_backslash = backslash.wrapping_sub(ONES) & !backslash;
    (below_space | has_quote | has_backslash) & HIGH_BITS != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn escaped(value: &str) -> String {
        let mut out = Vec::new();
        write_escaped(&mut out, value);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn escaping_matches_serde_json() {
        let mut every_char: String = (0u8..=0x7f).map(char::from).collect();
        every_char.push_str("é€😀");
        for value in [
            "",
            "plain",
            "a\"b\\c",
            "\u{8}\u{c}\n\r\t",
            "\u{0}\u{1f}\u{7f}",
            "hmac:ab,cd",
            &every_char,
        ] {
            let expected = serde_json::to_string(value).unwrap();
            assert_eq!(escaped(value), expected, "{value:?}");
        }
    }

    #[test]
    fn escaping_at_every_position() {
        for special in ['"', '\\', '\n', '\u{1}', '\u{1f}'] {
            for length in 1..=20 {
                for position in 0..length {
                    let mut value: String = "abcdefghijklmnopqrst"[..length].to_string();
                    value.replace_range(position..=position, &special.to_string());
                    let expected = serde_json::to_string(&value).unwrap();
                    assert_eq!(escaped(&value), expected, "{value:?}");
                }
            }
        }
    }

    #[test]
    fn word_test_flags_only_special_bytes() {
        for byte in 0u8..=255 {
            let special = byte < 0x20 || byte == b'"' || byte == b'\\';
            for position in 0..8 {
                let mut bytes = [b'a'; 8];
                bytes[position] = byte;
                let word = u64::from_le_bytes(bytes);
                assert_eq!(
                    word_needs_escape(word),
                    special,
                    "byte {byte:#x} at {position}"
                );
            }
        }
    }

    #[test]
    fn fields_match_serde_output() {
        let mut out = b"{\"x\":1".to_vec();
        let mut fields = Fields::new(&mut out);
        fields.u64("max", u64::MAX);
        fields.u64("zero", 0);
        fields.bool("yes", true);
        fields.opt_u64("absent", None);
        fields.opt_str("missing", None);
        fields.message_id("id", &MessageId([0xab; 16]));
        fields.location(
            "spool",
            RecordRef {
                segment: 7,
                offset: 4096,
            },
        );
        fields.str_list("files", &["a".to_string(), "b\"".to_string()]);
        fields.str_list("none", &[]);
        out.push(b'}');
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            format!(
                "{{\"x\":1,\"max\":18446744073709551615,\"zero\":0,\"yes\":true,\"id\":\"{}\",\"spool\":\"7:4096\",\"files\":[\"a\",\"b\\\"\"],\"none\":[]}}",
                "ab".repeat(16)
            )
        );
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["max"], u64::MAX);
    }
}
