//! A scripted SMTP receiver: a mock MX whose replies the test chooses.
//!
//! Real MTAs cannot be configured to reply 421 in the middle of a session, to drop
//! the connection right after the final dot, or to stall before a reply, and
//! Postfix's logs carry one-second timestamps. This receiver does all of that
//! and records every message and command with microsecond timestamps, so
//! timing and retry tests assert against it.
//!
//! Each [`Plan`] counts its uses across all connections of one receiver: a
//! recipient planned as "450 twice, then accept" gets 450 on its first two RCPT
//! commands, whichever connections carry them.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::net::{micros_since_epoch, other_error, poll_until};

/// RFC 5321 §4.5.3.1.4 sets 512 octets for a command line. The receiver allows
/// more, so that it records an over-long command instead of failing on it.
const MAX_COMMAND_LINE_BYTES: usize = 4096;

/// One reply decision of a [`Plan`].
#[derive(Clone, Debug)]
pub enum Response {
    /// The normal success reply of the stage: 220 greeting, 250 to EHLO,
    /// MAIL and RCPT, 354 to DATA, 250 after the final dot.
    Accept,
    /// This reply. A `text` with `\n` becomes a multi-line reply.
    Reply { code: u16, text: String },
    /// `421 4.3.2 Service shutting down`, then close the connection
    /// (RFC 5321 §3.8).
    Close421,
    /// Close the connection without a reply.
    Drop,
    /// Wait `duration`, then respond with `then`.
    Stall {
        duration: Duration,
        then: Box<Response>,
    },
}

impl Response {
    /// Builds a reply with `code` and `text`, such as `(450, "4.2.0 try later")`.
    pub fn reply(code: u16, text: &str) -> Response {
        Response::Reply {
            code,
            text: text.to_string(),
        }
    }

    /// `then`, after a delay of `duration`.
    pub fn stall(duration: Duration, then: Response) -> Response {
        Response::Stall {
            duration,
            then: Box::new(then),
        }
    }
}

/// The responses to successive uses of one script point: `first[0]` for the
/// first use, `first[1]` for the second, and `then` for every use after them.
#[derive(Clone, Debug)]
pub struct Plan {
    pub first: Vec<Response>,
    pub then: Response,
}

impl Plan {
    /// Accept every time.
    pub fn accept() -> Plan {
        Plan::always(Response::Accept)
    }

    /// `response` every time.
    pub fn always(response: Response) -> Plan {
        Plan {
            first: Vec::new(),
            then: response,
        }
    }

    /// `response` for the first `times` uses, then accept.
    pub fn first(times: usize, response: Response) -> Plan {
        Plan {
            first: vec![response; times],
            then: Response::Accept,
        }
    }

    fn response(&self, use_index: usize) -> &Response {
        self.first.get(use_index).unwrap_or(&self.then)
    }
}

/// The replies of the receiver at each point of a session.
#[derive(Clone, Debug)]
pub struct Script {
    /// Name in the greeting and the EHLO reply.
    pub hostname: String,
    /// Per connection, before the greeting.
    pub greeting: Plan,
    /// Per EHLO or HELO command.
    pub ehlo: Plan,
    /// Per MAIL command.
    pub mail: Plan,
    /// Per RCPT command for one address (compared case-insensitively).
    pub recipients: Vec<(String, Plan)>,
    /// Per RCPT command for any address not in `recipients`.
    pub rcpt: Plan,
    /// Per DATA command that has at least one accepted recipient.
    pub data: Plan,
    /// Per message, after its final dot.
    pub message: Plan,
    /// Offer STARTTLS with this configuration. `None` means not offered.
    pub starttls: Option<Arc<rustls::ServerConfig>>,
    /// Connections beyond this many at once get `421` and are closed.
    pub max_connections: usize,
    /// Messages larger than this get `552 5.3.4` after the final dot; the
    /// value is also advertised as SIZE.
    pub max_message_bytes: usize,
    /// A connection idle for this long is closed without a reply.
    pub idle_timeout: Duration,
}

impl Default for Script {
    fn default() -> Script {
        Script {
            hostname: "mx.caduceus.test".to_string(),
            greeting: Plan::accept(),
            ehlo: Plan::accept(),
            mail: Plan::accept(),
            recipients: Vec::new(),
            rcpt: Plan::accept(),
            data: Plan::accept(),
            message: Plan::accept(),
            starttls: None,
            max_connections: 64,
            max_message_bytes: 32 * 1024 * 1024,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// One message whose final dot the receiver read.
#[derive(Clone, Debug)]
pub struct Received {
    /// Sequence number of the connection, from 1.
    pub connection: u64,
    pub peer: SocketAddr,
    /// The EHLO or HELO argument.
    pub ehlo: String,
    /// Whether STARTTLS completed before the message, and the TLS version.
    pub tls_version: Option<String>,
    /// The reverse-path, without angle brackets.
    pub mail_from: String,
    /// The MAIL parameters after the reverse-path, such as `BODY=8BITMIME`.
    pub mail_parameters: String,
    /// Recipients whose RCPT got a 2xx reply.
    pub rcpt_to: Vec<String>,
    /// The content after dot-unstuffing, CRLF line endings kept, without the
    /// final `.<CRLF>`. Content beyond `max_message_bytes` is cut off.
    pub raw: Vec<u8>,
    /// When the 354 reply to DATA was sent, in microseconds since the epoch.
    pub data_started_micros: u64,
    /// When the final dot was read, in microseconds since the epoch.
    pub received_micros: u64,
    /// Reply code sent after the final dot; `None` when the script dropped or
    /// closed the connection instead.
    pub reply_code: Option<u16>,
}

/// One command line and the reply the receiver gave.
#[derive(Clone, Debug)]
pub struct CommandRecord {
    pub connection: u64,
    /// When the command line was read, in microseconds since the epoch.
    pub micros: u64,
    pub line: String,
    /// `None` when the script dropped or closed the connection instead.
    pub reply_code: Option<u16>,
}

#[derive(Default)]
struct Counters {
    greeting: usize,
    ehlo: usize,
    mail: usize,
    rcpt: usize,
    recipients: HashMap<usize, usize>,
    data: usize,
    message: usize,
}

struct Shared {
    script: Script,
    counters: Mutex<Counters>,
    received: Mutex<Vec<Received>>,
    commands: Mutex<Vec<CommandRecord>>,
    open: Mutex<HashMap<u64, TcpStream>>,
    stopping: AtomicBool,
    next_connection: AtomicU64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic in one connection thread must not hide the records of the
    // others from the test.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A running scripted receiver. Dropping it closes every connection and joins
/// its threads.
pub struct ScriptedReceiver {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
    workers: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl ScriptedReceiver {
    /// Listens on `addr` (port 0 picks a free port) and serves `script`.
    pub fn start(addr: SocketAddr, script: Script) -> io::Result<ScriptedReceiver> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            script,
            counters: Mutex::new(Counters::default()),
            received: Mutex::new(Vec::new()),
            commands: Mutex::new(Vec::new()),
            open: Mutex::new(HashMap::new()),
            stopping: AtomicBool::new(false),
            next_connection: AtomicU64::new(1),
        });
        let workers = Arc::new(Mutex::new(Vec::new()));
        let acceptor = {
            let shared = Arc::clone(&shared);
            let workers = Arc::clone(&workers);
            thread::Builder::new()
                .name(format!("receiver-{addr}"))
                .spawn(move || accept_loop(listener, shared, workers))?
        };
        Ok(ScriptedReceiver {
            addr,
            shared,
            acceptor: Some(acceptor),
            workers,
        })
    }

    /// Returns the listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Returns every message whose final dot arrived, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        lock(&self.shared.received).clone()
    }

    /// Returns every command line read, in arrival order.
    pub fn commands(&self) -> Vec<CommandRecord> {
        lock(&self.shared.commands).clone()
    }

    /// Waits until at least `count` messages arrived and returns them all.
    pub fn wait_for(&self, count: usize, timeout: Duration) -> io::Result<Vec<Received>> {
        poll_until(timeout, || {
            let received = self.received();
            (received.len() >= count).then_some(received)
        })
        .ok_or_else(|| {
            other_error(format!(
                "scripted receiver {}: {} of {count} messages within {timeout:?}; commands: {:?}",
                self.addr,
                self.received().len(),
                self.commands()
                    .iter()
                    .map(|command| command.line.as_str())
                    .collect::<Vec<_>>(),
            ))
        })
    }
}

impl Drop for ScriptedReceiver {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Wake the blocking accept so that the thread checks the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        for stream in lock(&self.shared.open).values() {
            let _ = stream.shutdown(Shutdown::Both);
        }
        for worker in lock(&self.workers).drain(..) {
            let _ = worker.join();
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    workers: Arc<Mutex<Vec<JoinHandle<()>>>>,
) {
    for stream in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(mut stream) = stream else { continue };
        let Ok(peer) = stream.peer_addr() else {
            continue;
        };
        let id = shared.next_connection.fetch_add(1, Ordering::SeqCst);
        {
            let mut open = lock(&shared.open);
            if open.len() >= shared.script.max_connections {
                let _ = stream.write_all(b"421 4.3.2 Too many connections\r\n");
                continue;
            }
            match stream.try_clone() {
                Ok(clone) => open.insert(id, clone),
                Err(_) => continue,
            };
        }
        let connection_shared = Arc::clone(&shared);
        let spawned = thread::Builder::new()
            .name(format!("receiver-conn-{id}"))
            .spawn(move || {
                let mut session = Session::new(id, peer, stream, &connection_shared);
                session.run();
                lock(&connection_shared.open).remove(&id);
            });
        let mut workers = lock(&workers);
        // Join finished threads so the list stays bounded by the number of
        // open connections.
        let (finished, running): (Vec<_>, Vec<_>) =
            workers.drain(..).partition(JoinHandle::is_finished);
        for handle in finished {
            let _ = handle.join();
        }
        *workers = running;
        match spawned {
            Ok(handle) => workers.push(handle),
            Err(_) => {
                lock(&shared.open).remove(&id);
            }
        }
    }
}

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

struct Session<'a> {
    id: u64,
    peer: SocketAddr,
    transport: Option<Transport>,
    pending: Vec<u8>,
    shared: &'a Shared,
    ehlo: Option<String>,
    tls_version: Option<String>,
    transaction: Option<Transaction>,
}

/// Why reading from the peer stopped.
enum ReadEnd {
    Closed,
    TooLong,
}

impl<'a> Session<'a> {
    fn new(id: u64, peer: SocketAddr, stream: TcpStream, shared: &'a Shared) -> Session<'a> {
        let _ = stream.set_read_timeout(Some(shared.script.idle_timeout));
        let _ = stream.set_nodelay(true);
        Session {
            id,
            peer,
            transport: Some(Transport::Plain(stream)),
            pending: Vec::new(),
            shared,
            ehlo: None,
            tls_version: None,
            transaction: None,
        }
    }

    fn run(&mut self) {
        let response = {
            let mut counters = lock(&self.shared.counters);
            counters.greeting += 1;
            self.shared
                .script
                .greeting
                .response(counters.greeting - 1)
                .clone()
        };
        let greeting = format!("{} ESMTP caduceus-tests", self.shared.script.hostname);
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
            lock(&self.shared.commands).push(CommandRecord {
                connection: self.id,
                micros,
                line: text,
                reply_code,
            });
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
            "RSET" => {
                self.transaction = None;
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
        let script = &self.shared.script;
        let mut lines = vec![script.hostname.clone()];
        if verb == "EHLO" {
            lines.push("PIPELINING".into());
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
        let Some(config) = self.shared.script.starttls.clone() else {
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
        let Some(Transport::Plain(tcp)) = self.transport.take() else {
            return Flow::Closed;
        };
        let Ok(connection) = rustls::ServerConnection::new(config) else {
            return Flow::Closed;
        };

        let mut stream = rustls::StreamOwned::new(connection, tcp);
        while stream.conn.is_handshaking() {
            if stream.conn.complete_io(&mut stream.sock).is_err() {
                let _ = stream.sock.shutdown(Shutdown::Both);
                return Flow::Closed;
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
        let script = &self.shared.script;
        let rule = script
            .recipients
            .iter()
            .position(|(planned, _)| planned.eq_ignore_ascii_case(&address));
        let response = {
            let mut counters = lock(&self.shared.counters);
            match rule {
                Some(index) => {
                    let uses = counters.recipients.entry(index).or_insert(0);
                    *uses += 1;
                    script.recipients[index].1.response(*uses - 1).clone()
                }
                None => {
                    counters.rcpt += 1;
                    script.rcpt.response(counters.rcpt - 1).clone()
                }
            }
        };
        let flow = self.respond(&response, 250, "2.1.5 Ok");
        if let (Flow::Replied(200..=299), Some(transaction)) = (&flow, self.transaction.as_mut()) {
            transaction.rcpt_to.push(address);
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

        let Some((content, size_bytes)) = self.read_content() else {
            return Flow::Closed;
        };
        let received_micros = micros_since_epoch();
        let too_large = size_bytes > self.shared.script.max_message_bytes;
        let response = if too_large {
            Response::reply(552, "5.3.4 Message too big")
        } else {
            self.next_response(|counters| &mut counters.message, |script| &script.message)
        };
        let sequence = lock(&self.shared.received).len() + 1;
        let flow = self.respond(&response, 250, &format!("2.0.0 Ok: queued as {sequence}"));
        let transaction = self.transaction.take();
        if let Some(transaction) = transaction {
            lock(&self.shared.received).push(Received {
                connection: self.id,
                peer: self.peer,
                ehlo: self.ehlo.clone().unwrap_or_default(),
                tls_version: self.tls_version.clone(),
                mail_from: transaction.mail_from,
                mail_parameters: transaction.mail_parameters,
                rcpt_to: transaction.rcpt_to,
                raw: content,
                data_started_micros,
                received_micros,
                reply_code: match flow {
                    Flow::Replied(code) => Some(code),
                    Flow::Closed => None,
                },
            });
        }
        flow
    }

    /// Reads the message content up to the line that is a single dot and
    /// undoes dot-stuffing (RFC 5321 §4.5.2). Only CRLF ends a line, so a
    /// bare LF or CR followed by a dot stays content. Returns the content kept
    /// and the full size in bytes, because content beyond the size limit is
    /// counted but not kept.
    fn read_content(&mut self) -> Option<(Vec<u8>, usize)> {
        let limit = self.shared.script.max_message_bytes;
        let mut content = Vec::new();
        let mut total_bytes = 0usize;
        loop {
            let line = match self.read_raw_line(usize::MAX) {
                Ok(line) => line,
                Err(_) => return None,
            };
            if line == b"." {
                break;
            }
            let unstuffed: &[u8] = line.strip_prefix(b".").unwrap_or(&line);
            total_bytes += unstuffed.len() + 2;
            if total_bytes <= limit {
                content.extend_from_slice(unstuffed);
                content.extend_from_slice(b"\r\n");
            }
        }
        Some((content, total_bytes))
    }

    fn next_response(
        &self,
        counter: impl FnOnce(&mut Counters) -> &mut usize,
        plan: impl FnOnce(&Script) -> &Plan,
    ) -> Response {
        let mut counters = lock(&self.shared.counters);
        let uses = counter(&mut counters);
        *uses += 1;
        plan(&self.shared.script).response(*uses - 1).clone()
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
            .ok_or_else(|| other_error("connection closed"))?;
        transport.write_all(reply.as_bytes())?;
        transport.flush()
    }

    fn close(&mut self) {
        if let Some(transport) = self.transport.take() {
            let _ = transport.tcp().shutdown(Shutdown::Both);
        }
    }

    fn read_line(&mut self) -> Result<Vec<u8>, ReadEnd> {
        self.read_raw_line(MAX_COMMAND_LINE_BYTES)
    }

    /// Reads up to the next CRLF and returns the line without it. A line
    /// longer than `max_bytes` is consumed and reported as `TooLong`.
    fn read_raw_line(&mut self, max_bytes: usize) -> Result<Vec<u8>, ReadEnd> {
        let mut searched = 0;
        loop {
            if let Some(position) = self.pending[searched..]
                .windows(2)
                .position(|window| window == b"\r\n")
            {
                let end = searched + position;
                let line = self.pending[..end].to_vec();
                self.pending.drain(..end + 2);
                if line.len() > max_bytes {
                    return Err(ReadEnd::TooLong);
                }
                return Ok(line);
            }
            searched = self.pending.len().saturating_sub(1);
            let transport = self.transport.as_mut().ok_or(ReadEnd::Closed)?;
            let mut chunk = [0u8; 16 * 1024];
            match transport.read(&mut chunk) {
                Ok(0) | Err(_) => {
                    self.close();
                    return Err(ReadEnd::Closed);
                }
                Ok(len) => self.pending.extend_from_slice(&chunk[..len]),
            }
        }
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
