//! A blocking SMTP client for the lane sockets, used by `caduceus demo` and
//! the benchmark generator to inject mail the way a large sender does:
//! one connection, many messages, commands pipelined (RFC 2920).

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// A reply that was not the one the injector needed, or an I/O failure.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("socket I/O failed: {0}")]
    Io(#[from] io::Error),
    #[error("{stage} was answered {reply:?}")]
    Rejected { stage: &'static str, reply: String },
}

pub struct InjectClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    buffer: Vec<u8>,
}

impl InjectClient {
    /// Connects, reads the greeting and sends EHLO.
    pub fn connect(path: &Path, helo: &str) -> Result<InjectClient, InjectError> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(Duration::from_secs(120)))?;
        let writer = stream.try_clone()?;
        let mut client = InjectClient {
            reader: BufReader::new(stream),
            writer,
            buffer: Vec::with_capacity(64 * 1024),
        };
        client.expect("greeting", 220)?;
        client
            .writer
            .write_all(format!("EHLO {helo}\r\n").as_bytes())?;
        client.expect("EHLO", 250)?;
        Ok(client)
    }

    /// Sends one message: MAIL, every RCPT and DATA in one write, then the
    /// dot-stuffed body. Returns the text of the final `250` reply.
    pub fn send(
        &mut self,
        sender: &str,
        recipients: &[String],
        body: &[u8],
    ) -> Result<String, InjectError> {
        self.buffer.clear();
        self.buffer
            .extend_from_slice(format!("MAIL FROM:<{sender}>\r\n").as_bytes());
        for recipient in recipients {
            self.buffer
                .extend_from_slice(format!("RCPT TO:<{recipient}>\r\n").as_bytes());
        }
        self.buffer.extend_from_slice(b"DATA\r\n");
        self.writer.write_all(&self.buffer)?;
        let mail = self.read_reply()?;
        let mut accepted = 0;
        let mut first_rejection = None;
        for _ in recipients {
            let reply = self.read_reply()?;
            if reply.starts_with('2') {
                accepted += 1;
            } else if first_rejection.is_none() {
                first_rejection = Some(reply);
            }
        }
        let data = self.read_reply()?;
        if !mail.starts_with('2') {
            return Err(InjectError::Rejected {
                stage: "MAIL",
                reply: mail,
            });
        }
        if accepted == 0 || !data.starts_with("354") {
            return Err(InjectError::Rejected {
                stage: "RCPT",
                reply: first_rejection.unwrap_or(data),
            });
        }
        self.buffer.clear();
        stuff_body(body, &mut self.buffer);
        self.writer.write_all(&self.buffer)?;
        let done = self.read_reply()?;
        if !done.starts_with('2') {
            return Err(InjectError::Rejected {
                stage: "end of DATA",
                reply: done,
            });
        }
        Ok(done)
    }

    pub fn quit(mut self) {
        // The session is over either way; a failed QUIT changes nothing.
        let _ = self.writer.write_all(b"QUIT\r\n");
        let _ = self.read_reply();
    }

    fn expect(&mut self, stage: &'static str, code: u16) -> Result<String, InjectError> {
        let reply = self.read_reply()?;
        if reply.starts_with(&code.to_string()) {
            Ok(reply)
        } else {
            Err(InjectError::Rejected { stage, reply })
        }
    }

    /// Reads a whole reply, multi-line included, as one string.
    fn read_reply(&mut self) -> Result<String, InjectError> {
        let mut text = String::new();
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(InjectError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the engine closed the connection",
                )));
            }
            text.push_str(&line);
            let bytes = line.as_bytes();
            if bytes.len() < 4 || bytes[3] != b'-' {
                return Ok(text.trim_end().to_string());
            }
        }
    }
}

/// Appends `body` dot-stuffed (RFC 5321 §4.5.2) with the terminating
/// `.\r\n`, adding a CRLF first when the body does not end in one.
pub fn stuff_body(body: &[u8], out: &mut Vec<u8>) {
    let mut at_line_start = true;
    for &byte in body {
        if at_line_start && byte == b'.' {
            out.push(b'.');
        }
        out.push(byte);
        at_line_start = byte == b'\n';
    }
    if !body.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stuff_body_doubles_leading_dots() {
        let mut out = Vec::new();
        stuff_body(b"a\r\n.b\r\n..\r\n", &mut out);
        assert_eq!(out, b"a\r\n..b\r\n...\r\n.\r\n");
    }

    #[test]
    fn stuff_body_terminates_unfinished_line() {
        let mut out = Vec::new();
        stuff_body(b"last", &mut out);
        assert_eq!(out, b"last\r\n.\r\n");
    }
}
