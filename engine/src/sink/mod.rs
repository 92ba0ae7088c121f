//! A scripted SMTP receiver: the mock MX of the end-to-end tests, the
//! receiver of `caduceus demo` and the measuring sink of the benchmarks.
//!
//! Real MTAs cannot be configured to reply 421 in the middle of a session, to
//! drop the connection right after the final dot, or to stall before a reply,
//! and Postfix's logs carry one-second timestamps. This receiver does all of
//! that and timestamps every message in microseconds, so timing and retry
//! tests assert against it.
//!
//! It records in one of two modes ([`Recording`]):
//!
//! - `Full` keeps every message's bytes and every command line, for tests.
//! - `Summary` keeps no message bytes and no commands, only one
//!   [`MessageSummary`] per message and HDR histograms of the latency from
//!   injection (the [`INJECTED_HEADER`] field) to receipt, per lane and per
//!   recipient domain. Benchmarks use it so that memory stays flat.
//!
//! Each [`Plan`] counts its uses across all connections of one receiver: a
//! recipient planned as "450 twice, then accept" gets 450 on its first two
//! RCPT commands, whichever connections carry them. A [`DomainScript`]
//! fails a fraction of the RCPT commands for one recipient domain, chosen
//! by a hash of the seed, the domain and a per-domain counter.
//!
//! One receiver may listen on several addresses, such as 127.0.0.1 to
//! 127.0.0.8 on one port, because an MX record carries no port, so
//! destinations differ by address. Each connection gets its own
//! thread; [`Script::max_connections`] bounds how many run at once.

mod session;
mod summary;
pub mod tls;

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::deliverylog::now_us;
use session::Session;
use summary::SummaryState;

pub use summary::{LatencyHistogram, MessageSummary, SinkSummary};

/// Header field the injectors stamp on each message: microseconds since the
/// Unix epoch at injection.
pub const INJECTED_HEADER: &str = "X-Caduceus-Injected-Us";
/// Header field naming the lane the injector used (`transactional` or
/// `bulk`).
pub const LANE_HEADER: &str = "X-Caduceus-Bench-Lane";

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

    /// Builds `then`, sent after a delay of `duration`.
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

/// Misbehaviour for the recipients of one domain. Fractions are between 0
/// and 1. Which RCPT command fails is decided by hashing
/// [`Script::seed`], the domain and the count of that domain's RCPT
/// commands so far, so a run with the same seed fails the same share. The
/// order in which parallel connections take counts is not fixed, so the
/// exact recipients that fail may differ between runs.
#[derive(Clone, Debug, Default)]
pub struct DomainScript {
    /// Recipient domain, compared case-insensitively.
    pub domain: String,
    /// Share of RCPT commands that get `451 4.3.0`.
    pub temporary_failure_fraction: f64,
    /// Share of RCPT commands that get `550 5.1.1`.
    pub permanent_failure_fraction: f64,
    /// After this many messages on one connection, the next RCPT for the
    /// domain gets `421 4.3.2` and the connection is closed. `None` never
    /// closes.
    pub close_421_after_messages: Option<u32>,
    /// Share of messages whose connection is closed right after the final
    /// dot, without a reply (RFC 5321 §4.1.1.4 leaves the sender unsure
    /// whether the message was taken, so it must retry).
    pub drop_after_dot_fraction: f64,
    /// Delay before the greeting on connections accepted on one of
    /// `greeting_addresses`. The receiver learns the domain only at RCPT, so
    /// a slow greeting is tied to the addresses the domain is routed to.
    pub greeting_delay: Duration,
    /// Local addresses whose connections get `greeting_delay`.
    pub greeting_addresses: Vec<IpAddr>,
}

/// The record the receiver keeps of each message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recording {
    /// Every message's bytes and every command line ([`Received`],
    /// [`CommandRecord`]).
    Full,
    /// One [`MessageSummary`] per message and latency histograms, no bytes.
    Summary,
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
    /// Per message, after its final dot or its last BDAT chunk.
    pub message: Plan,
    /// Misbehaviour per recipient domain, applied to recipients not listed
    /// in `recipients`.
    pub domains: Vec<DomainScript>,
    /// Seed of the [`DomainScript`] decisions.
    pub seed: u64,
    /// Offer STARTTLS with this configuration. `None` means not offered.
    pub starttls: Option<Arc<rustls::ServerConfig>>,
    /// Connections beyond this many at once get `421` and are closed.
    pub max_connections: usize,
    /// Messages larger than this get `552 5.3.4` after the final dot; the
    /// value is also advertised as SIZE.
    pub max_message_bytes: usize,
    /// A connection idle for this long is closed without a reply.
    pub idle_timeout: Duration,
    /// The record kept of each message; `Full` by default.
    pub recording: Recording,
    /// Offer CHUNKING (RFC 3030), so that clients may send messages with
    /// BDAT instead of DATA. Off by default.
    pub chunking: bool,
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
            domains: Vec::new(),
            seed: 0,
            starttls: None,
            max_connections: 64,
            max_message_bytes: 32 * 1024 * 1024,
            idle_timeout: Duration::from_secs(60),
            recording: Recording::Full,
            chunking: false,
        }
    }
}

/// One message whose final dot the receiver read (full recording).
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

/// One command line and the reply the receiver gave (full recording).
#[derive(Clone, Debug)]
pub struct CommandRecord {
    pub connection: u64,
    /// When the command line was read, in microseconds since the epoch.
    pub micros: u64,
    pub line: String,
    /// `None` when the script dropped or closed the connection instead.
    pub reply_code: Option<u16>,
}

/// Counts of TLS handshakes, to measure session resumption.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TlsCounts {
    pub handshakes: u64,
    /// Handshakes that resumed an earlier session (RFC 8446 §2.2).
    pub resumed: u64,
    pub failed: u64,
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
    /// RCPT commands per [`DomainScript`] index.
    domain_rcpt: HashMap<usize, u64>,
    /// Messages per [`DomainScript`] index.
    domain_message: HashMap<usize, u64>,
}

struct Shared {
    script: Script,
    counters: Mutex<Counters>,
    received: Mutex<Vec<Received>>,
    commands: Mutex<Vec<CommandRecord>>,
    summary: Mutex<SummaryState>,
    /// Messages that got a 2xx reply after the final dot.
    accepted: AtomicU64,
    /// Messages whose final dot was read, numbering the `queued as` reply.
    next_message: AtomicU64,
    tls: Mutex<TlsCounts>,
    open: Mutex<HashMap<u64, TcpStream>>,
    stopping: AtomicBool,
    next_connection: AtomicU64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic in one connection thread must not hide the records of the
    // others from the caller.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A running scripted receiver. Dropping it closes every connection and joins
/// its threads.
pub struct ScriptedReceiver {
    addrs: Vec<SocketAddr>,
    shared: Arc<Shared>,
    acceptors: Vec<JoinHandle<()>>,
    workers: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl ScriptedReceiver {
    /// Listens on `addr` (port 0 picks a free port) and serves `script`.
    pub fn start(addr: SocketAddr, script: Script) -> io::Result<ScriptedReceiver> {
        ScriptedReceiver::start_many(&[addr], script)
    }

    /// Listens on every address of `addrs` and serves `script` on all of
    /// them. An address with port 0 gets the port the first listener bound,
    /// so `127.0.0.1:0` to `127.0.0.8:0` end up on one port.
    pub fn start_many(addrs: &[SocketAddr], script: Script) -> io::Result<ScriptedReceiver> {
        if addrs.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the receiver needs at least one listening address",
            ));
        }
        let mut listeners = Vec::with_capacity(addrs.len());
        let mut bound = Vec::with_capacity(addrs.len());
        let mut shared_port = 0;
        for addr in addrs {
            let mut addr = *addr;
            if addr.port() == 0 {
                addr.set_port(shared_port);
            }
            let listener = TcpListener::bind(addr).map_err(|error| {
                io::Error::new(
                    error.kind(),
                    format!("receiver: bind {addr} failed: {error}"),
                )
            })?;
            let local = listener.local_addr()?;
            if shared_port == 0 {
                shared_port = local.port();
            }
            bound.push(local);
            listeners.push(listener);
        }
        let shared = Arc::new(Shared {
            summary: Mutex::new(SummaryState::new()),
            script,
            counters: Mutex::new(Counters::default()),
            received: Mutex::new(Vec::new()),
            commands: Mutex::new(Vec::new()),
            accepted: AtomicU64::new(0),
            next_message: AtomicU64::new(0),
            tls: Mutex::new(TlsCounts::default()),
            open: Mutex::new(HashMap::new()),
            stopping: AtomicBool::new(false),
            next_connection: AtomicU64::new(1),
        });
        let workers = Arc::new(Mutex::new(Vec::new()));
        let mut receiver = ScriptedReceiver {
            addrs: bound.clone(),
            shared: Arc::clone(&shared),
            acceptors: Vec::new(),
            workers: Arc::clone(&workers),
        };
        for (listener, addr) in listeners.into_iter().zip(bound) {
            let shared = Arc::clone(&shared);
            let workers = Arc::clone(&workers);
            // On failure, dropping `receiver` stops the acceptors started so
            // far.
            let acceptor = thread::Builder::new()
                .name(format!("receiver-{addr}"))
                .spawn(move || accept_loop(listener, shared, workers))?;
            receiver.acceptors.push(acceptor);
        }
        Ok(receiver)
    }

    /// Returns the first listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// Returns every listening address, in the order given to `start_many`.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Returns every message whose final dot arrived, in arrival order (full
    /// recording; empty in summary recording).
    pub fn received(&self) -> Vec<Received> {
        lock(&self.shared.received).clone()
    }

    /// Returns every command line read, in arrival order (full recording;
    /// empty in summary recording).
    pub fn commands(&self) -> Vec<CommandRecord> {
        lock(&self.shared.commands).clone()
    }

    /// Returns how many messages got a 2xx reply after their final dot.
    pub fn accepted_count(&self) -> u64 {
        self.shared.accepted.load(Ordering::Acquire)
    }

    /// Returns a copy of the summary records and histograms (summary
    /// recording; empty in full recording).
    pub fn summary(&self) -> SinkSummary {
        lock(&self.shared.summary).snapshot()
    }

    /// Returns the TLS handshake counts so far.
    pub fn tls_counts(&self) -> TlsCounts {
        *lock(&self.shared.tls)
    }

    /// Waits until at least `count` messages arrived and returns them all
    /// (full recording).
    pub fn wait_for(&self, count: usize, timeout: Duration) -> io::Result<Vec<Received>> {
        let deadline = Instant::now() + timeout;
        loop {
            let received = self.received();
            if received.len() >= count {
                return Ok(received);
            }
            if Instant::now() >= deadline {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        Err(io::Error::other(format!(
            "scripted receiver {}: {} of {count} messages within {timeout:?}; commands: {:?}",
            self.addr(),
            self.received().len(),
            self.commands()
                .iter()
                .map(|command| command.line.as_str())
                .collect::<Vec<_>>(),
        )))
    }

    /// Waits until at least `count` messages were accepted (either
    /// recording). Returns whether they were.
    pub fn wait_for_accepted(&self, count: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.accepted_count() < count {
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(20));
        }
        true
    }
}

impl Drop for ScriptedReceiver {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Wake each blocking accept so that its thread checks the flag.
        for addr in &self.addrs {
            let _ = TcpStream::connect_timeout(addr, Duration::from_secs(1));
        }
        for acceptor in self.acceptors.drain(..) {
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
        let (Ok(peer), Ok(local)) = (stream.peer_addr(), stream.local_addr()) else {
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
                let mut session = Session::new(id, peer, local, stream, &connection_shared);
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

/// Returns the value of the first header field called `name` in the header
/// section of `message`, trimmed.
pub fn header_value(message: &[u8], name: &str) -> Option<String> {
    let end = message
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .unwrap_or(message.len());
    let headers = std::str::from_utf8(&message[..end]).ok()?;
    headers.split("\r\n").find_map(|line| {
        let (field, value) = line.split_once(':')?;
        field
            .eq_ignore_ascii_case(name)
            .then(|| value.trim().to_string())
    })
}

/// Returns the body of `message`: everything after the first empty line, or
/// nothing when there is no empty line.
pub fn body_of(message: &[u8]) -> &[u8] {
    message
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .map_or(&[], |position| &message[position + 4..])
}

/// FNV-1a offset basis, the hash of no bytes.
pub const FNV1A_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;

/// Continues a 64-bit FNV-1a hash over `bytes`, so a message can be hashed
/// line by line.
pub fn fnv1a_update(mut hash: u64, bytes: &[u8]) -> u64 {
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// Returns the 64-bit FNV-1a hash of `bytes`: a fast checksum for comparing
/// sent and received bytes, not a cryptographic one.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    fnv1a_update(FNV1A_OFFSET_BASIS, bytes)
}

/// Returns the receiver's clock in microseconds since the Unix epoch, the
/// clock of every timestamp it records.
pub fn micros_since_epoch() -> u64 {
    now_us()
}

#[cfg(test)]
mod tests;
