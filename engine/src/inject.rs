//! A blocking SMTP client for the lane sockets, used by `caduceus demo` and
//! the benchmark generator to inject mail the way a large sender does:
//! one connection, many messages, commands pipelined (RFC 2920). The same
//! client speaks to any SMTP server over TCP, so the benchmarks inject into
//! Postfix with it too.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// How long the client waits for any one reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// A reply that was not the one the injector needed, or an I/O failure.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("socket I/O failed: {0}")]
    Io(#[from] io::Error),
    #[error("{stage} was answered {reply:?}")]
    Rejected { stage: &'static str, reply: String },
}

/// One message to inject.
#[derive(Clone, Copy, Debug)]
pub struct Outgoing<'a> {
    pub sender: &'a str,
    pub recipients: &'a [String],
    /// The message as it should arrive, before dot-stuffing.
    pub body: &'a [u8],
}

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(stream) => Stream::Unix(stream.try_clone()?),
            Stream::Tcp(stream) => Stream::Tcp(stream.try_clone()?),
        })
    }
}

impl Read for Stream {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(stream) => stream.read(buffer),
            Stream::Tcp(stream) => stream.read(buffer),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buffer: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(stream) => stream.write(buffer),
            Stream::Tcp(stream) => stream.write(buffer),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Unix(stream) => stream.flush(),
            Stream::Tcp(stream) => stream.flush(),
        }
    }
}

/// The replies to one message's MAIL, RCPT and DATA commands.
struct EnvelopeReplies {
    outcome: Result<(), InjectError>,
    /// Whether the server replied 354 to DATA and now expects content.
    data_open: bool,
}

pub struct InjectClient {
    reader: BufReader<Stream>,
    writer: Stream,
    buffer: Vec<u8>,
}

impl InjectClient {
    /// Connects to a lane socket, reads the greeting and sends EHLO.
    pub fn connect(path: &Path, helo: &str) -> Result<InjectClient, InjectError> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
        InjectClient::start(Stream::Unix(stream), helo)
    }

    /// Connects to an SMTP server over TCP, reads the greeting and sends
    /// EHLO.
    pub fn connect_tcp(addr: SocketAddr, helo: &str) -> Result<InjectClient, InjectError> {
        let stream = TcpStream::connect_timeout(&addr, REPLY_TIMEOUT)?;
        stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
        stream.set_nodelay(true)?;
        InjectClient::start(Stream::Tcp(stream), helo)
    }

    fn start(stream: Stream, helo: &str) -> Result<InjectClient, InjectError> {
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
        let message = Outgoing {
            sender,
            recipients,
            body,
        };
        let mut results = self.send_pipelined(&[message])?;
        results.pop().unwrap_or_else(|| {
            Err(InjectError::Io(io::Error::other(
                "no reply for the message",
            )))
        })
    }

    /// Sends `messages` in one pipelined stream: each message's content goes
    /// out in the same write as the next message's MAIL, RCPT and DATA
    /// commands, which RFC 2920 §3.1 allows because content may open a
    /// command group. That saves one round trip per message.
    ///
    /// Returns one result per message: the final reply text, or the reply
    /// that rejected it. An I/O failure ends the session and is returned as
    /// the outer error; the outcome of the message in flight is then
    /// unknown.
    pub fn send_pipelined(
        &mut self,
        messages: &[Outgoing<'_>],
    ) -> Result<Vec<Result<String, InjectError>>, InjectError> {
        let mut results = Vec::with_capacity(messages.len());
        let Some(first) = messages.first() else {
            return Ok(results);
        };
        self.buffer.clear();
        push_envelope(first, &mut self.buffer);
        self.writer.write_all(&self.buffer)?;
        let mut pending = Some(self.read_envelope_replies(first)?);
        for (index, message) in messages.iter().enumerate() {
            let next = messages.get(index + 1);
            // Set at the end of every iteration that has a next message.
            let Some(envelope) = pending.take() else {
                break;
            };
            self.buffer.clear();
            if envelope.data_open {
                if envelope.outcome.is_ok() {
                    stuff_body(message.body, &mut self.buffer);
                } else {
                    // A 354 after every recipient was refused: end the
                    // content at once, so nothing reaches the recipients.
                    self.buffer.extend_from_slice(b".\r\n");
                }
            }
            if let Some(next) = next {
                push_envelope(next, &mut self.buffer);
            }
            self.writer.write_all(&self.buffer)?;
            let outcome = if envelope.data_open {
                let done = self.read_reply()?;
                match envelope.outcome {
                    Ok(()) if done.starts_with('2') => Ok(done),
                    Ok(()) => Err(InjectError::Rejected {
                        stage: "end of DATA",
                        reply: done,
                    }),
                    Err(error) => Err(error),
                }
            } else {
                envelope.outcome.map(|()| String::new())
            };
            results.push(outcome);
            if let Some(next) = next {
                pending = Some(self.read_envelope_replies(next)?);
            }
        }
        Ok(results)
    }

    /// Reads the replies to MAIL, each RCPT and DATA of `message`.
    fn read_envelope_replies(
        &mut self,
        message: &Outgoing<'_>,
    ) -> Result<EnvelopeReplies, InjectError> {
        let mail = self.read_reply()?;
        let mut accepted = 0;
        let mut first_rejection = None;
        for _ in message.recipients {
            let reply = self.read_reply()?;
            if reply.starts_with('2') {
                accepted += 1;
            } else if first_rejection.is_none() {
                first_rejection = Some(reply);
            }
        }
        let data = self.read_reply()?;
        let data_open = data.starts_with("354");
        let outcome = if !mail.starts_with('2') {
            Err(InjectError::Rejected {
                stage: "MAIL",
                reply: mail,
            })
        } else if accepted == 0 || !data_open {
            Err(InjectError::Rejected {
                stage: "RCPT",
                reply: first_rejection.unwrap_or(data),
            })
        } else {
            Ok(())
        };
        Ok(EnvelopeReplies { outcome, data_open })
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
                    "the server closed the connection",
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

/// Appends the MAIL, RCPT and DATA commands of `message`.
fn push_envelope(message: &Outgoing<'_>, out: &mut Vec<u8>) {
    out.extend_from_slice(format!("MAIL FROM:<{}>\r\n", message.sender).as_bytes());
    for recipient in message.recipients {
        out.extend_from_slice(format!("RCPT TO:<{recipient}>\r\n").as_bytes());
    }
    out.extend_from_slice(b"DATA\r\n");
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
