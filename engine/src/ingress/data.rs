//! The streaming DATA scanner.
//!
//! It finds the end of the mail data, removes dot-stuffing and checks the
//! content while the bytes arrive, in chunks of any size. Only
//! `<CRLF>.<CRLF>` ends the data (RFC 5321 §4.1.1.4). A bare CR or bare LF
//! is never a line ending: it marks the message invalid, the scanner keeps
//! reading to the real terminator, and the whole message is rejected. So the
//! bytes after a fake terminator such as `<LF>.<CRLF>` stay message content
//! and never run as commands (the SMTP smuggling family, CVE-2023-51764).

use crate::smtp::{EnhancedStatus, Reply};

/// The scanner's position in the current line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Position {
    /// At the start of a line: the previous bytes were CRLF, or DATA just
    /// began.
    LineStart,
    /// A `.` at the start of a line was read and not stored yet.
    DotAtLineStart,
    /// `.` then CR at the start of a line: LF next ends the data.
    DotCarriageReturn,
    /// Inside a line.
    InLine,
    /// A CR inside a line was read and not stored yet.
    CarriageReturn,
}

/// Why a completely received message is rejected, in the order the checks
/// are applied: the first problem found decides the reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataProblem {
    /// A CR or LF that was not part of a CRLF pair.
    BareLineEnding,
    /// A NUL byte, which 7bit and 8bit content must not contain
    /// (RFC 2045 §2.7, §2.8).
    Nul,
    /// A line longer than the configured limit, CRLF included.
    LineTooLong,
    /// More bytes than the configured maximum message size.
    TooLarge,
}

impl DataProblem {
    /// Builds the reply sent after the final dot.
    pub fn reply(self) -> Reply {
        match self {
            DataProblem::BareLineEnding => Reply::new(
                550,
                EnhancedStatus::new(5, 5, 2),
                "Message rejected: bare CR or LF found; lines must end with CRLF",
            ),
            DataProblem::Nul => Reply::new(
                554,
                EnhancedStatus::new(5, 6, 0),
                "Message rejected: NUL bytes are not allowed in message content",
            ),
            DataProblem::LineTooLong => Reply::new(
                500,
                EnhancedStatus::new(5, 5, 2),
                "Message rejected: line too long",
            ),
            DataProblem::TooLarge => Reply::new(
                552,
                EnhancedStatus::new(5, 3, 4),
                "Message rejected: message size exceeds fixed maximum message size",
            ),
        }
    }
}

/// Scans one message's DATA.
#[derive(Debug)]
pub struct DataScanner {
    max_message_size_bytes: u64,
    max_line_length_bytes: u64,
    position: Position,
    /// Content bytes of the current line so far, without dot-stuffing.
    line_length_bytes: u64,
    /// Content bytes of the whole message so far, without dot-stuffing.
    message_size_bytes: u64,
    bare_line_ending: bool,
    nul: bool,
    line_too_long: bool,
    too_large: bool,
    finished: bool,
    /// The unstuffed message. Emptied and no longer filled once the message
    /// is known to be rejected, so a rejected message costs no memory.
    body: Vec<u8>,
}

impl DataScanner {
    pub fn new(max_message_size_bytes: u64, max_line_length_bytes: u32) -> DataScanner {
        DataScanner {
            max_message_size_bytes,
            max_line_length_bytes: u64::from(max_line_length_bytes),
            position: Position::LineStart,
            line_length_bytes: 0,
            message_size_bytes: 0,
            bare_line_ending: false,
            nul: false,
            line_too_long: false,
            too_large: false,
            finished: false,
            body: Vec::new(),
        }
    }

    /// Consumes bytes until the end of data or the end of `input`. Returns
    /// how many bytes belong to the data, the terminator included. When that
    /// is less than `input.len()`, the data ended and the rest of `input`
    /// is the next commands.
    pub fn scan(&mut self, input: &[u8]) -> usize {
        let mut index = 0;
        while index < input.len() && !self.finished {
            let byte = input[index];
            match self.position {
                Position::LineStart => match byte {
                    b'.' => self.position = Position::DotAtLineStart,
                    _ => self.in_line(byte),
                },
                Position::DotAtLineStart => match byte {
                    b'\r' => self.position = Position::DotCarriageReturn,
                    // RFC 5321 §4.5.2: a leading dot on a line with other
                    // characters is removed, whatever follows it.
                    _ => self.in_line(byte),
                },
                Position::DotCarriageReturn => match byte {
                    b'\n' => self.finished = true,
                    _ => {
                        // `.` then a bare CR: the dot was stuffing, the CR
                        // is content and invalid.
                        self.bare_line_ending = true;
                        self.emit(b"\r");
                        self.in_line(byte);
                    }
                },
                Position::InLine => {
                    let run_length = input[index..]
                        .iter()
                        .position(|b| matches!(b, b'\r' | b'\n' | 0))
                        .unwrap_or(input.len() - index);
                    if run_length > 0 {
                        self.emit(&input[index..index + run_length]);
                        index += run_length;
                        continue;
                    }
                    self.in_line(byte);
                }
                Position::CarriageReturn => {
                    if byte == b'\n' {
                        self.emit(b"\r\n");
                        self.end_line();
                    } else {
                        self.bare_line_ending = true;
                        self.emit(b"\r");
                        self.in_line(byte);
                    }
                }
            }
            index += 1;
        }
        index
    }

    /// Handles one byte inside a line (not at its start).
    fn in_line(&mut self, byte: u8) {
        self.position = Position::InLine;
        match byte {
            b'\r' => self.position = Position::CarriageReturn,
            b'\n' => {
                // A bare LF does not end the line, so a `.` after it is
                // content, not a terminator.
                self.bare_line_ending = true;
                self.emit(b"\n");
            }
            0 => {
                self.nul = true;
                self.emit(&[0]);
            }
            _ => self.emit(&[byte]),
        }
    }

    fn end_line(&mut self) {
        self.position = Position::LineStart;
        self.line_length_bytes = 0;
    }

    fn emit(&mut self, bytes: &[u8]) {
        let length = bytes.len() as u64;
        self.line_length_bytes += length;
        self.message_size_bytes += length;
        if self.line_length_bytes > self.max_line_length_bytes {
            self.line_too_long = true;
        }
        if self.message_size_bytes > self.max_message_size_bytes {
            self.too_large = true;
        }
        if self.problem().is_some() {
            if !self.body.is_empty() {
                self.body = Vec::new();
            }
            return;
        }
        self.body.extend_from_slice(bytes);
    }

    /// Returns whether the terminating `<CRLF>.<CRLF>` was seen.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Returns the content size seen so far, in bytes, after unstuffing.
    pub fn message_size_bytes(&self) -> u64 {
        self.message_size_bytes
    }

    /// Returns the first problem found so far, in the precedence of
    /// [`DataProblem`].
    pub fn problem(&self) -> Option<DataProblem> {
        if self.bare_line_ending {
            Some(DataProblem::BareLineEnding)
        } else if self.nul {
            Some(DataProblem::Nul)
        } else if self.line_too_long {
            Some(DataProblem::LineTooLong)
        } else if self.too_large {
            Some(DataProblem::TooLarge)
        } else {
            None
        }
    }

    /// Returns the unstuffed message, or the problem that rejects it.
    pub fn into_result(self) -> Result<Vec<u8>, DataProblem> {
        match self.problem() {
            Some(problem) => Err(problem),
            None => Ok(self.body),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT_BYTES: u64 = 1 << 20;

    /// Feeds `chunks` one after another and returns the bytes consumed in
    /// total and the result.
    fn scan_chunks(chunks: &[&[u8]]) -> (usize, Result<Vec<u8>, DataProblem>) {
        let mut scanner = DataScanner::new(LIMIT_BYTES, 1000);
        let mut consumed = 0;
        for chunk in chunks {
            consumed += scanner.scan(chunk);
            if scanner.is_finished() {
                break;
            }
        }
        assert!(scanner.is_finished(), "the terminator was not found");
        (consumed, scanner.into_result())
    }

    #[test]
    fn dot_unstuffing_on_every_line() {
        let input = b"Subject: u\r\n\r\n..\r\n...\r\n..a\r\n.b\r\nend\r\n\r\n.\r\n";
        let (consumed, result) = scan_chunks(&[input]);
        assert_eq!(consumed, input.len());
        assert_eq!(
            result.expect("valid message"),
            b"Subject: u\r\n\r\n.\r\n..\r\n.a\r\nb\r\nend\r\n\r\n"
        );
    }

    #[test]
    fn empty_message_ends_at_once() {
        let (consumed, result) = scan_chunks(&[b".\r\nQUIT\r\n"]);
        assert_eq!(consumed, 3);
        assert_eq!(result.expect("valid message"), b"");
    }

    #[test]
    fn terminator_split_at_every_offset() {
        let input: &[u8] = b"Subject: s\r\n\r\nbody\r\n..stuffed\r\n.\r\nNOOP\r\n";
        let data_length = input.len() - b"NOOP\r\n".len();
        for split in 0..=input.len() {
            let (consumed, result) = scan_chunks(&[&input[..split], &input[split..]]);
            assert_eq!(consumed, data_length, "split at {split}");
            assert_eq!(
                result.expect("valid message"),
                b"Subject: s\r\n\r\nbody\r\n.stuffed\r\n",
                "split at {split}"
            );
        }
    }

    #[test]
    fn terminator_one_byte_at_a_time() {
        let input: &[u8] = b"a\r\n.\r\n";
        let mut scanner = DataScanner::new(LIMIT_BYTES, 1000);
        for byte in input {
            assert!(!scanner.is_finished());
            assert_eq!(scanner.scan(std::slice::from_ref(byte)), 1);
        }
        assert!(scanner.is_finished());
        assert_eq!(scanner.into_result().expect("valid message"), b"a\r\n");
    }

    #[test]
    fn smuggling_terminators_are_content() {
        let variants: [&[u8]; 6] = [
            b"\n.\r\n",
            b"\n.\n",
            b"\r\n.\n",
            b"\r.\r\n",
            b"\r.\n",
            b"\r\n.\r\r\n",
        ];
        for variant in variants {
            let mut input = b"Subject: one\r\n\r\nfirst message".to_vec();
            input.extend_from_slice(variant);
            input.extend_from_slice(
                b"MAIL FROM:<ceo@example.org>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n",
            );
            input.extend_from_slice(b"second message\r\n.\r\n");
            let (consumed, result) = scan_chunks(&[&input]);
            assert_eq!(consumed, input.len(), "variant {variant:?} ended early");
            assert_eq!(
                result,
                Err(DataProblem::BareLineEnding),
                "variant {variant:?}"
            );
        }
    }

    #[test]
    fn nul_rejected_after_real_end() {
        let input = b"Subject: nul\r\n\r\nab\x00cd\r\nafter-nul\r\n.\r\n";
        let (consumed, result) = scan_chunks(&[input]);
        assert_eq!(consumed, input.len());
        assert_eq!(result, Err(DataProblem::Nul));
    }

    #[test]
    fn long_line_rejected_short_ok() {
        let mut scanner = DataScanner::new(LIMIT_BYTES, 1000);
        let mut input = vec![b'A'; 998];
        input.extend_from_slice(b"\r\n.\r\n");
        scanner.scan(&input);
        assert!(scanner.into_result().is_ok());

        let mut scanner = DataScanner::new(LIMIT_BYTES, 1000);
        let mut input = vec![b'A'; 999];
        input.extend_from_slice(b"\r\n.\r\n");
        assert_eq!(scanner.scan(&input), input.len());
        assert_eq!(scanner.into_result(), Err(DataProblem::LineTooLong));
    }

    #[test]
    fn stuffing_dot_not_counted_in_line_length() {
        let mut scanner = DataScanner::new(LIMIT_BYTES, 1000);
        let mut input = b".".to_vec();
        input.extend(vec![b'.'; 998]);
        input.extend_from_slice(b"\r\n.\r\n");
        scanner.scan(&input);
        assert_eq!(scanner.into_result().map(|body| body.len()), Ok(1000));
    }

    #[test]
    fn oversize_message_scanned_not_stored() {
        let mut scanner = DataScanner::new(100, 1000);
        let line = b"0123456789012345678\r\n";
        for _ in 0..50 {
            assert_eq!(scanner.scan(line), line.len());
        }
        assert!(
            scanner.body.is_empty(),
            "a rejected message must not be stored"
        );
        assert_eq!(scanner.scan(b".\r\n"), 3);
        assert_eq!(scanner.into_result(), Err(DataProblem::TooLarge));
    }

    #[test]
    fn bare_line_ending_outranks_size() {
        let mut scanner = DataScanner::new(4, 1000);
        let input = b"abcdef\nghi\r\n.\r\n";
        assert_eq!(scanner.scan(input), input.len());
        assert_eq!(scanner.into_result(), Err(DataProblem::BareLineEnding));
    }

    #[test]
    fn problem_replies_carry_codes() {
        let cases = [
            (DataProblem::BareLineEnding, 550, "5.5.2"),
            (DataProblem::Nul, 554, "5.6.0"),
            (DataProblem::LineTooLong, 500, "5.5.2"),
            (DataProblem::TooLarge, 552, "5.3.4"),
        ];
        for (problem, code, status) in cases {
            let reply = problem.reply();
            assert_eq!(reply.code, code);
            assert_eq!(reply.status.map(|s| s.to_string()).as_deref(), Some(status));
        }
    }
}
