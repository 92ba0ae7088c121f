//! One SMTP session of the scripted receiver, on a blocking socket.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use super::summary::MessageSummary;
use super::{
    CommandRecord, Counters, DomainScript, FNV1A_OFFSET_BASIS, INJECTED_HEADER, LANE_HEADER, Plan,
    Received, Recording, Response, Script, Shared, fnv1a_update, header_value, lock,
    micros_since_epoch,
};

/// RFC 5321 §4.5.3.1.4 sets 512 octets for a command line. The receiver allows
/// more, so that it records an over-long command instead of failing on it.
const MAX_COMMAND_LINE_BYTES: usize = 4096;

/// Header bytes the summary recording keeps while a message is read, to find
/// the lane and injection-time fields. Fields past this are not searched.
const MAX_SUMMARY_HEADER_BYTES: usize = 64 * 1024;

/// Bytes read from the socket at a time.
const READ_CHUNK_BYTES: usize = 64 * 1024;

enum Transport {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ServerConnection, TcpStream>>),
}

impl Transport {
    fn tcp(&self) -> &TcpStream {
        match self {
            Transport::Plain(stream) => stream,
            Transport::Tls(stream) => stream.get_ref(),
        }
    }
}

impl Read for Transport {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(stream) => stream.read(buffer),
            Transport::Tls(stream) => stream.read(buffer),
        }
    }
}

impl Write for Transport {
    fn write(&mut self, buffer: &[u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(stream) => stream.write(buffer),
            Transport::Tls(stream) => stream.write(buffer),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Transport::Plain(stream) => stream.flush(),
            Transport::Tls(stream) => stream.flush(),
        }
    }
}

/// Whether the session goes on after a reply.
enum Flow {
    Replied(u16),
    Closed,
}

struct Transaction {
    mail_from: String,
    mail_parameters: String,
    rcpt_to: Vec<String>,
}

/// Reason that reading from the peer stopped.
enum ReadEnd {
    Closed,
    TooLong,
}

/// The part of a message's content kept after the final dot.
struct Content {
    keep_raw: bool,
    /// Full recording: the content, cut off at the size limit.
    raw: Vec<u8>,
    /// Summary recording: the header section, cut off at
    /// [`MAX_SUMMARY_HEADER_BYTES`].
    header: Vec<u8>,
    in_header: bool,
    body_checksum: u64,
    size_bytes: usize,
}

impl Content {
    fn new(keep_raw: bool) -> Content {
        Content {
            keep_raw,
            raw: Vec::new(),
            header: Vec::new(),
            in_header: true,
            body_checksum: FNV1A_OFFSET_BASIS,
            size_bytes: 0,
        }
    }

    /// Adds one unstuffed line, given without its CRLF.
    fn push_line(&mut self, line: &[u8], limit_bytes: usize) {
        self.size_bytes += line.len() + 2;
        if self.keep_raw && self.size_bytes <= limit_bytes {
            self.raw.extend_from_slice(line);
            self.raw.extend_from_slice(b"\r\n");
        }
        if self.in_header {
            // RFC 5322 §2.1: the first empty line ends the header section.
            if line.is_empty() {
                self.in_header = false;
            } else if !self.keep_raw && self.header.len() < MAX_SUMMARY_HEADER_BYTES {
                self.header.extend_from_slice(line);
                self.header.extend_from_slice(b"\r\n");
            }
        } else {
            self.body_checksum = fnv1a_update(self.body_checksum, line);
            self.body_checksum = fnv1a_update(self.body_checksum, b"\r\n");
        }
    }

    fn header_section(&self) -> &[u8] {
        if self.keep_raw {
            &self.raw
        } else {
            &self.header
        }
    }
}

pub(super) struct Session<'a> {
    id: u64,
    peer: SocketAddr,
    local: SocketAddr,
    transport: Option<Transport>,
    /// Bytes read but not yet consumed start at `pending_start`.
    pending: Vec<u8>,
    pending_start: usize,
    shared: &'a Shared,
    ehlo: Option<String>,
    tls_version: Option<String>,
    transaction: Option<Transaction>,
    /// The BDAT chunks of the current message so far, and when the first
    /// arrived, in microseconds since the epoch.
    chunks: Vec<u8>,
    chunks_started_micros: Option<u64>,
    /// Messages whose final dot or last chunk this connection read.
    messages: u32,
}

impl<'a> Session<'a> {
    pub(super) fn new(
        id: u64,
        peer: SocketAddr,
        local: SocketAddr,
        stream: TcpStream,
        shared: &'a Shared,
    ) -> Session<'a> {
        let _ = stream.set_read_timeout(Some(shared.script.idle_timeout));
        let _ = stream.set_nodelay(true);
        Session {
            id,
            peer,
            local,
            transport: Some(Transport::Plain(stream)),
            pending: Vec::new(),
            pending_start: 0,
            shared,
            ehlo: None,
            tls_version: None,
            transaction: None,
            chunks: Vec::new(),
            chunks_started_micros: None,
            messages: 0,
        }
    }

    fn script(&self) -> &'a Script {
        &self.shared.script
    }

    fn full_recording(&self) -> bool {
        self.script().recording == Recording::Full
    }

    pub(super) fn run(&mut self) {
        let response = {
            let mut counters = lock(&self.shared.counters);
            counters.greeting += 1;
            self.script()
                .greeting
                .response(counters.greeting - 1)
                .clone()
        };
        let greeting_delay = self
            .script()
            .domains
            .iter()
            .filter(|domain| domain.greeting_addresses.contains(&self.local.ip()))
            .map(|domain| domain.greeting_delay)
            .max()
            .unwrap_or_default();
        let response = if greeting_delay.is_zero() {
            response
        } else {
            Response::stall(greeting_delay, response)
        };
        let greeting = format!("{} ESMTP caduceus-sink", self.script().hostname);
        if let Flow::Closed = self.respond(&response, 220, &greeting) {
            return;
        }
        loop {
            let line = match self.read_line() {
                Ok(line) => line,
                Err(ReadEnd::Closed) => return,
                Err(ReadEnd::TooLong) => {
                    if self.send(500, "5.5.2 Line too long").is_err() {
                        return;
                    }
                    continue;
                }
            };
            let text = String::from_utf8_lossy(&line).into_owned();
            let micros = micros_since_epoch();
            let flow = self.dispatch(&text);
            let reply_code = match flow {
                Flow::Replied(code) => Some(code),
                Flow::Closed => None,
            };
            if self.full_recording() {
                lock(&self.shared.commands).push(CommandRecord {
                    connection: self.id,
                    micros,
                    line: text,
                    reply_code,
                });
            }
            if reply_code.is_none() {
                return;
            }
        }
    }

    fn dispatch(&mut self, line: &str) -> Flow {
        let (verb, argument) = match line.split_once(' ') {
            Some((verb, argument)) => (verb.to_ascii_uppercase(), argument.trim()),
            None => (line.to_ascii_uppercase(), ""),
        };
        match verb.as_str() {
            "EHLO" | "HELO" => self.ehlo(&verb, argument),
            "STARTTLS" => self.starttls(),
            "MAIL" => self.mail(argument),
            "RCPT" => self.rcpt(argument),
            "DATA" => self.data(),
            "BDAT" => self.bdat(argument),
            "RSET" => {
                self.transaction = None;
                self.chunks.clear();
                self.chunks_started_micros = None;
                self.reply(250, "2.0.0 Ok")
            }
            "NOOP" => self.reply(250, "2.0.0 Ok"),
            "VRFY" => self.reply(252, "2.5.0 Cannot verify"),
            "QUIT" => {
                let _ = self.send(221, "2.0.0 Bye");
                self.close();
                Flow::Closed
            }
            _ => self.reply(500, "5.5.2 Command not recognized"),
        }
    }

    fn ehlo(&mut self, verb: &str, argument: &str) -> Flow {
        let response = self.next_response(|counters| &mut counters.ehlo, |script| &script.ehlo);
        let script = self.script();
        let mut lines = vec![script.hostname.clone()];
        if verb == "EHLO" {
            lines.push("PIPELINING".into());
            if script.chunking {
                lines.push("CHUNKING".into());
            }
            lines.push(format!("SIZE {}", script.max_message_bytes));
            lines.push("8BITMIME".into());
            lines.push("SMTPUTF8".into());
            lines.push("ENHANCEDSTATUSCODES".into());
            if script.starttls.is_some() && self.tls_version.is_none() {
                lines.push("STARTTLS".into());
            }
        }
        let flow = self.respond(&response, 250, &lines.join("\n"));
        if let Flow::Replied(200..=299) = flow {
            self.ehlo = Some(argument.to_string());
            self.transaction = None;
        }
        flow
    }

    fn starttls(&mut self) -> Flow {
        let Some(config) = self.script().starttls.clone() else {
            return self.reply(502, "5.5.1 STARTTLS not offered");
        };
        if self.tls_version.is_some() {
            return self.reply(503, "5.5.1 TLS already active");
        }
        if self.send(220, "2.0.0 Ready to start TLS").is_err() {
            return Flow::Closed;
        }
        // RFC 3207 §4.2: nothing sent before the handshake may be used after
        // it, so pipelined plaintext is discarded (CVE-2011-0411).
        self.pending.clear();
        self.pending_start = 0;
        let Some(Transport::Plain(tcp)) = self.transport.take() else {
            return Flow::Closed;
        };
        let Ok(connection) = rustls::ServerConnection::new(config) else {
            return Flow::Closed;
        };

        let mut stream = rustls::StreamOwned::new(connection, tcp);
        while stream.conn.is_handshaking() {
            if stream.conn.complete_io(&mut stream.sock).is_err() {
                lock(&self.shared.tls).failed += 1;
                let _ = stream.sock.shutdown(Shutdown::Both);
                return Flow::Closed;
            }
        }
        {
            let mut counts = lock(&self.shared.tls);
            counts.handshakes += 1;
            if stream.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                counts.resumed += 1;
            }
        }
        self.tls_version = stream
            .conn
            .protocol_version()
            .map(|version| format!("{version:?}"));
        self.transport = Some(Transport::Tls(Box::new(stream)));
        // RFC 3207 §4.2: the client must send EHLO again.
        self.ehlo = None;
        self.transaction = None;
        Flow::Replied(220)
    }

    fn mail(&mut self, argument: &str) -> Flow {
        if self.ehlo.is_none() {
            return self.reply(503, "5.5.1 EHLO first");
        }
        if self.transaction.is_some() {
            return self.reply(503, "5.5.1 Nested MAIL command");
        }
        let Some((address, parameters)) = parse_path(argument, "FROM:") else {
            return self.reply(501, "5.5.4 Syntax: MAIL FROM:<address>");
        };
        let response = self.next_response(|counters| &mut counters.mail, |script| &script.mail);
        let flow = self.respond(&response, 250, "2.1.0 Ok");
        if let Flow::Replied(200..=299) = flow {
            self.transaction = Some(Transaction {
                mail_from: address,
                mail_parameters: parameters,
                rcpt_to: Vec::new(),
            });
        }
        flow
    }

    fn rcpt(&mut self, argument: &str) -> Flow {
        if self.transaction.is_none() {
            return self.reply(503, "5.5.1 MAIL first");
        }
        let Some((address, _)) = parse_path(argument, "TO:") else {
            return self.reply(501, "5.5.4 Syntax: RCPT TO:<address>");
        };
        let script = self.script();
        let rule = script
            .recipients
            .iter()
            .position(|(planned, _)| planned.eq_ignore_ascii_case(&address));
        let domain_rule = domain_of(&address).and_then(|domain| {
            script
                .domains
                .iter()
                .position(|rule| rule.domain.eq_ignore_ascii_case(domain))
        });
        let response = {
            let mut counters = lock(&self.shared.counters);
            match (rule, domain_rule) {
                (Some(index), _) => {
                    let uses = counters.recipients.entry(index).or_insert(0);
                    *uses += 1;
                    script.recipients[index].1.response(*uses - 1).clone()
                }
                (None, Some(index)) => {
                    let uses = counters.domain_rcpt.entry(index).or_insert(0);
                    *uses += 1;
                    let draw = script_draw(script.seed, &script.domains[index].domain, *uses, 1);
                    domain_rcpt_response(&script.domains[index], draw, self.messages)
                }
                (None, None) => {
                    counters.rcpt += 1;
                    script.rcpt.response(counters.rcpt - 1).clone()
                }
            }
        };
        let flow = self.respond(&response, 250, "2.1.5 Ok");
        match &flow {
            Flow::Replied(200..=299) => {
                if let Some(transaction) = self.transaction.as_mut() {
                    transaction.rcpt_to.push(address);
                }
            }
            Flow::Replied(code @ 500..=599) if !self.full_recording() => {
                lock(&self.shared.summary).record_rejection(&address, *code);
            }
            _ => {}
        }
        flow
    }

    fn data(&mut self) -> Flow {
        let has_recipients = self
            .transaction
            .as_ref()
            .is_some_and(|transaction| !transaction.rcpt_to.is_empty());
        if !has_recipients {
            // RFC 5321 §3.3: DATA without an accepted recipient gets 503 or
            // 554.
            return self.reply(554, "5.5.1 No valid recipients");
        }
        let response = self.next_response(|counters| &mut counters.data, |script| &script.data);
        let flow = self.respond(&response, 354, "End data with <CR><LF>.<CR><LF>");
        if !matches!(flow, Flow::Replied(354)) {
            return flow;
        }
        let data_started_micros = micros_since_epoch();

        let Some(content) = self.read_content() else {
            return Flow::Closed;
        };
        self.complete_message(content, data_started_micros)
    }

    /// Handles `BDAT <size> [LAST]` (RFC 3030): reads the chunk, which the
    /// client sends right after the command line, then replies. The reply
    /// to the last chunk is the message's reply, as after a final dot.
    fn bdat(&mut self, argument: &str) -> Flow {
        let mut words = argument.split_ascii_whitespace();
        let size = words.next().and_then(|word| word.parse::<usize>().ok());
        let (size, last) = match (size, words.next(), words.next()) {
            (Some(size), None, None) => (size, false),
            (Some(size), Some(word), None) if word.eq_ignore_ascii_case("LAST") => (size, true),
            _ => return self.reply(501, "5.5.4 Syntax: BDAT chunk-size [LAST]"),
        };
        self.chunks_started_micros
            .get_or_insert_with(micros_since_epoch);
        if !self.read_chunk(size) {
            return Flow::Closed;
        }
        let has_recipients = self
            .transaction
            .as_ref()
            .is_some_and(|transaction| !transaction.rcpt_to.is_empty());
        if !has_recipients {
            // The chunk was read, so commands and replies stay in step.
            self.chunks.clear();
            self.chunks_started_micros = None;
            return self.reply(554, "5.5.1 No valid recipients");
        }
        if !last {
            return self.reply(250, &format!("2.0.0 {size} octets received"));
        }
        let mut content = Content::new(self.full_recording());
        let limit_bytes = self.script().max_message_bytes;
        let chunks = std::mem::take(&mut self.chunks);
        let mut lines = chunks.split(|byte| *byte == b'\n').peekable();
        while let Some(line) = lines.next() {
            // The split leaves an empty piece after a final CRLF.
            if lines.peek().is_none() && line.is_empty() {
                break;
            }
            content.push_line(line.strip_suffix(b"\r").unwrap_or(line), limit_bytes);
        }
        let started = self
            .chunks_started_micros
            .take()
            .unwrap_or_else(micros_since_epoch);
        self.complete_message(content, started)
    }

    /// Appends the next `size` bytes of input to `chunks`. Returns false
    /// when the connection closed first.
    fn read_chunk(&mut self, size: usize) -> bool {
        let mut remaining = size;
        loop {
            let available = (self.pending.len() - self.pending_start).min(remaining);
            let start = self.pending_start;
            self.chunks
                .extend_from_slice(&self.pending[start..start + available]);
            self.pending_start += available;
            remaining -= available;
            if remaining == 0 {
                return true;
            }
            self.pending.clear();
            self.pending_start = 0;
            let Some(transport) = self.transport.as_mut() else {
                return false;
            };
            self.pending.resize(READ_CHUNK_BYTES, 0);
            match transport.read(&mut self.pending) {
                Ok(0) | Err(_) => {
                    self.pending.clear();
                    self.close();
                    return false;
                }
                Ok(len) => self.pending.truncate(len),
            }
        }
    }

    /// Replies to a message whose content is read, after DATA or the last
    /// BDAT chunk, and records it.
    fn complete_message(&mut self, content: Content, data_started_micros: u64) -> Flow {
        let received_micros = micros_since_epoch();
        self.messages += 1;
        let too_large = content.size_bytes > self.script().max_message_bytes;
        let response = if too_large {
            Response::reply(552, "5.3.4 Message too big")
        } else {
            self.message_response()
        };
        let sequence = self.shared.next_message.fetch_add(1, Ordering::AcqRel) + 1;
        let flow = self.respond(&response, 250, &format!("2.0.0 Ok: queued as {sequence}"));
        let reply_code = match flow {
            Flow::Replied(code) => Some(code),
            Flow::Closed => None,
        };
        if matches!(reply_code, Some(200..=299)) {
            self.shared.accepted.fetch_add(1, Ordering::AcqRel);
        }
        let Some(transaction) = self.transaction.take() else {
            return flow;
        };
        if self.full_recording() {
            lock(&self.shared.received).push(Received {
                connection: self.id,
                peer: self.peer,
                ehlo: self.ehlo.clone().unwrap_or_default(),
                tls_version: self.tls_version.clone(),
                mail_from: transaction.mail_from,
                mail_parameters: transaction.mail_parameters,
                rcpt_to: transaction.rcpt_to,
                raw: content.raw,
                data_started_micros,
                received_micros,
                reply_code,
            });
        } else {
            let header = content.header_section();
            let summary = MessageSummary {
                connection: self.id,
                domain: transaction
                    .rcpt_to
                    .first()
                    .and_then(|address| domain_of(address))
                    .unwrap_or_default()
                    .to_ascii_lowercase(),
                recipients: u32::try_from(transaction.rcpt_to.len()).unwrap_or(u32::MAX),
                lane: header_value(header, LANE_HEADER),
                injected_at_us: header_value(header, INJECTED_HEADER)
                    .and_then(|value| value.parse().ok()),
                received_at_us: received_micros,
                size_bytes: content.size_bytes as u64,
                body_checksum: content.body_checksum,
                tls: self.tls_version.is_some(),
                reply_code,
            };
            lock(&self.shared.summary).record(summary);
        }
        flow
    }

    /// Returns the reply after the final dot: the `message` plan, unless a
    /// domain script of the first recipient drops this one.
    fn message_response(&self) -> Response {
        let script = self.script();
        let domain_rule = self
            .transaction
            .as_ref()
            .and_then(|transaction| transaction.rcpt_to.first())
            .and_then(|address| domain_of(address))
            .and_then(|domain| {
                script
                    .domains
                    .iter()
                    .position(|rule| rule.domain.eq_ignore_ascii_case(domain))
            });
        let mut counters = lock(&self.shared.counters);
        if let Some(index) = domain_rule {
            let rule = &script.domains[index];
            if rule.drop_after_dot_fraction > 0.0 {
                let uses = counters.domain_message.entry(index).or_insert(0);
                *uses += 1;
                let draw = script_draw(script.seed, &rule.domain, *uses, 2);
                if draw < rule.drop_after_dot_fraction {
                    return Response::Drop;
                }
            }
        }
        counters.message += 1;
        script.message.response(counters.message - 1).clone()
    }

    /// Reads the message content up to the line that is a single dot and
    /// undoes dot-stuffing (RFC 5321 §4.5.2). Only CRLF ends a line, so a
    /// bare LF or CR followed by a dot stays content. Content beyond the size
    /// limit is counted but not kept.
    fn read_content(&mut self) -> Option<Content> {
        let limit_bytes = self.script().max_message_bytes;
        let mut content = Content::new(self.full_recording());
        loop {
            let (start, end) = self.next_line_bounds(usize::MAX).ok()?;
            let line = &self.pending[start..end];
            if line == b"." {
                break;
            }
            let unstuffed: &[u8] = line.strip_prefix(b".").unwrap_or(line);
            content.push_line(unstuffed, limit_bytes);
        }
        Some(content)
    }

    fn next_response(
        &self,
        counter: impl FnOnce(&mut Counters) -> &mut usize,
        plan: impl FnOnce(&Script) -> &Plan,
    ) -> Response {
        let mut counters = lock(&self.shared.counters);
        let uses = counter(&mut counters);
        *uses += 1;
        plan(self.script()).response(*uses - 1).clone()
    }

    /// Carries out `response`, where `Accept` means `accept_code` with
    /// `accept_text`.
    fn respond(&mut self, response: &Response, accept_code: u16, accept_text: &str) -> Flow {
        match response {
            Response::Accept => self.reply(accept_code, accept_text),
            Response::Reply { code, text } => self.reply(*code, text),
            Response::Close421 => {
                let _ = self.send(421, "4.3.2 Service shutting down");
                self.close();
                Flow::Closed
            }
            Response::Drop => {
                self.close();
                Flow::Closed
            }
            Response::Stall { duration, then } => {
                let deadline = Instant::now() + *duration;
                while Instant::now() < deadline {
                    if self.shared.stopping.load(Ordering::SeqCst) {
                        self.close();
                        return Flow::Closed;
                    }
                    thread::sleep(Duration::from_millis(10).min(*duration));
                }
                self.respond(then, accept_code, accept_text)
            }
        }
    }

    fn reply(&mut self, code: u16, text: &str) -> Flow {
        match self.send(code, text) {
            Ok(()) => Flow::Replied(code),
            Err(_) => Flow::Closed,
        }
    }

    fn send(&mut self, code: u16, text: &str) -> io::Result<()> {
        let lines: Vec<&str> = text.split('\n').collect();
        let mut reply = String::new();
        for (index, line) in lines.iter().enumerate() {
            let separator = if index + 1 == lines.len() { ' ' } else { '-' };
            reply.push_str(&format!("{code}{separator}{line}\r\n"));
        }
        let transport = self
            .transport
            .as_mut()
            .ok_or_else(|| io::Error::other("connection closed"))?;
        transport.write_all(reply.as_bytes())?;
        transport.flush()
    }

    fn close(&mut self) {
        if let Some(transport) = self.transport.take() {
            let _ = transport.tcp().shutdown(Shutdown::Both);
        }
    }

    fn read_line(&mut self) -> Result<Vec<u8>, ReadEnd> {
        let (start, end) = self.next_line_bounds(MAX_COMMAND_LINE_BYTES)?;
        Ok(self.pending[start..end].to_vec())
    }

    /// Finds the next CRLF-terminated line, reading more when needed, and
    /// returns its bounds in `pending` without the CRLF. The line stays in
    /// `pending` until the next call. A line longer than `max_bytes` is
    /// consumed and reported as `TooLong`.
    fn next_line_bounds(&mut self, max_bytes: usize) -> Result<(usize, usize), ReadEnd> {
        // Drop what earlier calls consumed, but only once it is at least half
        // of the buffer, so that reading a large message line by line does
        // not move the rest of the buffer for every line.
        if self.pending_start > 0 && self.pending_start * 2 >= self.pending.len() {
            self.pending.drain(..self.pending_start);
            self.pending_start = 0;
        }
        let mut searched = self.pending_start;
        loop {
            if let Some(offset) = self.pending[searched..]
                .iter()
                .position(|&byte| byte == b'\n')
            {
                let newline = searched + offset;
                if newline > self.pending_start && self.pending[newline - 1] == b'\r' {
                    let start = self.pending_start;
                    let end = newline - 1;
                    self.pending_start = newline + 1;
                    if end - start > max_bytes {
                        return Err(ReadEnd::TooLong);
                    }
                    return Ok((start, end));
                }
                // A bare LF is content, not a line end.
                searched = newline + 1;
                continue;
            }
            searched = self.pending.len();
            let transport = self.transport.as_mut().ok_or(ReadEnd::Closed)?;
            let old_len = self.pending.len();
            self.pending.resize(old_len + READ_CHUNK_BYTES, 0);
            match transport.read(&mut self.pending[old_len..]) {
                Ok(0) | Err(_) => {
                    self.pending.truncate(old_len);
                    self.close();
                    return Err(ReadEnd::Closed);
                }
                Ok(len) => self.pending.truncate(old_len + len),
            }
        }
    }
}

/// Returns the domain of `address`: the part after the last `@`.
fn domain_of(address: &str) -> Option<&str> {
    address.rsplit_once('@').map(|(_, domain)| domain)
}

/// Returns a number in [0, 1) from the seed, the domain, the use count and a
/// stream id, with SplitMix64 (Steele, Lea and Flood, 2014) as the mixer.
fn script_draw(seed: u64, domain: &str, uses: u64, stream: u64) -> f64 {
    let mut state = seed
        ^ super::fnv1a(domain.to_ascii_lowercase().as_bytes())
        ^ uses.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ stream.rotate_left(32);
    state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut mixed = state;
    mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    mixed ^= mixed >> 31;
    // The top 53 bits fill an f64 mantissa exactly.
    (mixed >> 11) as f64 / (1u64 << 53) as f64
}

/// Returns the RCPT reply of a domain script for one draw.
fn domain_rcpt_response(rule: &DomainScript, draw: f64, messages_on_connection: u32) -> Response {
    if let Some(limit) = rule.close_421_after_messages
        && messages_on_connection >= limit
    {
        return Response::Close421;
    }
    if draw < rule.temporary_failure_fraction {
        Response::reply(451, "4.3.0 Temporary failure, try again later")
    } else if draw < rule.temporary_failure_fraction + rule.permanent_failure_fraction {
        Response::reply(550, "5.1.1 Mailbox unavailable")
    } else {
        Response::Accept
    }
}

/// Parses `FROM:<address> PARAMS` (or `TO:`) into the address without angle
/// brackets and the parameter string.
fn parse_path(argument: &str, keyword: &str) -> Option<(String, String)> {
    let head = argument.get(..keyword.len())?;
    if !head.eq_ignore_ascii_case(keyword) {
        return None;
    }
    let rest = argument[keyword.len()..].trim_start();
    let rest = rest.strip_prefix('<')?;
    let close = rest.find('>')?;
    Some((
        rest[..close].to_string(),
        rest[close + 1..].trim().to_string(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_draw_fraction_matches_rate() {
        let hits = (1..=10_000)
            .filter(|uses| script_draw(7, "example.org", *uses, 1) < 0.1)
            .count();
        assert!((800..1200).contains(&hits), "hits: {hits}");
    }

    #[test]
    fn script_draw_repeats_for_seed() {
        assert_eq!(
            script_draw(7, "Example.org", 3, 1),
            script_draw(7, "example.org", 3, 1)
        );
        assert_ne!(
            script_draw(7, "example.org", 3, 1),
            script_draw(8, "example.org", 3, 1)
        );
    }

    #[test]
    fn content_checksums_body_only() {
        let mut content = Content::new(false);
        for line in [
            &b"Subject: x"[..],
            b"X-Caduceus-Bench-Lane: bulk",
            b"",
            b"body",
            b"",
        ] {
            content.push_line(line, usize::MAX);
        }
        assert_eq!(content.body_checksum, super::super::fnv1a(b"body\r\n\r\n"));
        assert_eq!(
            header_value(content.header_section(), LANE_HEADER).as_deref(),
            Some("bulk")
        );
        assert_eq!(content.size_bytes, 10 + 2 + 27 + 2 + 2 + 4 + 2 + 2);
    }
}
