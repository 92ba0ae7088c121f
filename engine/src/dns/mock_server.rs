//! A mock DNS server for the resolver tests.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use hickory_proto::op::{Message, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, MX, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};

/// A scripted response: the code and the records of each section.
#[derive(Clone, Debug)]
pub struct MockReply {
    pub code: ResponseCode,
    pub answers: Vec<Record>,
    pub authorities: Vec<Record>,
}

impl MockReply {
    pub fn records(answers: Vec<Record>) -> Self {
        MockReply {
            code: ResponseCode::NoError,
            answers,
            authorities: Vec::new(),
        }
    }

    /// NOERROR without records, with an SOA for negative caching.
    pub fn nodata(zone: &str) -> Self {
        MockReply {
            code: ResponseCode::NoError,
            answers: Vec::new(),
            authorities: vec![soa(zone, 300, 300)],
        }
    }

    pub fn nxdomain(zone: &str) -> Self {
        MockReply {
            code: ResponseCode::NXDomain,
            answers: Vec::new(),
            authorities: vec![soa(zone, 300, 300)],
        }
    }

    pub fn code(code: ResponseCode) -> Self {
        MockReply {
            code,
            answers: Vec::new(),
            authorities: Vec::new(),
        }
    }
}

/// The mock server's handling of a query for one (name, type).
#[derive(Clone, Debug)]
pub enum Behavior {
    /// The same reply over UDP and TCP.
    Reply(MockReply),
    /// No reply at all, over UDP or TCP.
    Silent,
    /// An empty reply with the TC bit over UDP, and the full reply over TCP.
    TruncatedUdp(MockReply),
    /// The TC bit over UDP, and over TCP a connection closed unanswered.
    TruncatedUdpTcpClosed,
    /// The TC bit over UDP, and over TCP a connection kept open unanswered.
    TruncatedUdpTcpSilent,
    /// Only a reply with another id over UDP, and nothing over TCP.
    WrongIdOnly(Vec<Record>),
    /// Over UDP first a forged reply with another id and the given answer,
    /// then the real reply.
    WrongIdFirst {
        forged: Vec<Record>,
        real: MockReply,
    },
    /// Over UDP first a reply with the right id for another question, then
    /// the real reply.
    WrongQuestionFirst {
        forged: Vec<Record>,
        real: MockReply,
    },
    /// Over UDP first a reply with the right id and question sent from
    /// another port of the server's host, then the real reply.
    OtherSourceFirst {
        forged: Vec<Record>,
        real: MockReply,
    },
    /// The reply after a delay.
    Delayed(Duration, MockReply),
}

/// One query the mock server received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedQuery {
    /// Lowercase, without the trailing dot.
    pub name: String,
    pub qtype: RecordType,
    pub over_tcp: bool,
}

#[derive(Default)]
struct Shared {
    table: HashMap<(String, RecordType), Behavior>,
    log: Vec<LoggedQuery>,
}

/// A mock recursive nameserver for tests: a std UDP socket and a TCP
/// listener on the same ephemeral port of 127.0.0.1, each served by a
/// thread, that answer from a table of (name, type) → [`Behavior`]. A query
/// missing from the table gets REFUSED. Every query is logged.
pub struct MockDnsServer {
    address: SocketAddr,
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl MockDnsServer {
    pub fn start() -> Self {
        let (udp, tcp) = bind_same_port();
        let address = udp.local_addr().expect("a bound socket has an address");
        let shared = Arc::new(Mutex::new(Shared::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let udp_thread = {
            let shared = Arc::clone(&shared);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || serve_udp(udp, &shared, &stop))
        };
        let tcp_thread = {
            let shared = Arc::clone(&shared);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || serve_tcp(tcp, &shared, &stop))
        };
        MockDnsServer {
            address,
            shared,
            stop,
            threads: vec![udp_thread, tcp_thread],
        }
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Scripts the behaviour for `name` (without the trailing dot) and `qtype`.
    pub fn set(&self, name: &str, qtype: RecordType, behavior: Behavior) {
        let key = (name.to_ascii_lowercase(), qtype);
        self.lock().table.insert(key, behavior);
    }

    pub fn reply(&self, name: &str, qtype: RecordType, reply: MockReply) {
        self.set(name, qtype, Behavior::Reply(reply));
    }

    /// Queries received so far, in order.
    pub fn log(&self) -> Vec<LoggedQuery> {
        self.lock().log.clone()
    }

    /// Counts the queries for (name, type) that arrived over UDP and TCP.
    pub fn count(&self, name: &str, qtype: RecordType) -> usize {
        let name = name.to_ascii_lowercase();
        self.lock()
            .log
            .iter()
            .filter(|query| query.name == name && query.qtype == qtype)
            .count()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        // A panic in a server thread fails the test anyway, so a poisoned
        // lock still holds usable data.
        self.shared
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for MockDnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn bind_same_port() -> (UdpSocket, TcpListener) {
    for _ in 0..50 {
        let udp = UdpSocket::bind("127.0.0.1:0").expect("bind a UDP socket on loopback");
        let port = udp.local_addr().expect("bound socket").port();
        if let Ok(tcp) = TcpListener::bind(("127.0.0.1", port)) {
            return (udp, tcp);
        }
    }
    panic!("no loopback port free for both UDP and TCP after 50 tries");
}

/// Looks up the behaviour for the question of `query` and logs the query.
fn behavior_for(shared: &Mutex<Shared>, query: &Message, over_tcp: bool) -> Option<Behavior> {
    let question = query.queries.first()?;
    let name = question
        .name()
        .to_ascii()
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let qtype = question.query_type();
    let mut shared = shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    shared.log.push(LoggedQuery {
        name: name.clone(),
        qtype,
        over_tcp,
    });
    Some(
        shared
            .table
            .get(&(name, qtype))
            .cloned()
            .unwrap_or(Behavior::Reply(MockReply::code(ResponseCode::Refused))),
    )
}

fn build_reply(query: &Message, reply: &MockReply) -> Vec<u8> {
    let mut message = Message::response(query.metadata.id, OpCode::Query);
    message.metadata.response_code = reply.code;
    message.metadata.recursion_desired = query.metadata.recursion_desired;
    message.metadata.recursion_available = true;
    message.add_queries(query.queries.iter().cloned());
    message.add_answers(reply.answers.iter().cloned());
    message.add_authorities(reply.authorities.iter().cloned());
    message.to_vec().expect("the mock reply encodes")
}

fn build_truncated(query: &Message) -> Vec<u8> {
    let mut message = Message::response(query.metadata.id, OpCode::Query);
    message.metadata.truncation = true;
    message.metadata.recursion_available = true;
    message.add_queries(query.queries.iter().cloned());
    message.to_vec().expect("the mock reply encodes")
}

fn serve_udp(socket: UdpSocket, shared: &Mutex<Shared>, stop: &AtomicBool) {
    socket
        .set_read_timeout(Some(Duration::from_millis(20)))
        .expect("set a read timeout");
    let mut buffer = [0u8; 4096];
    while !stop.load(Ordering::SeqCst) {
        let Ok((size, client)) = socket.recv_from(&mut buffer) else {
            continue;
        };
        let Ok(query) = Message::from_vec(&buffer[..size]) else {
            continue;
        };
        let Some(behavior) = behavior_for(shared, &query, false) else {
            continue;
        };
        let send = |bytes: &[u8]| {
            let _ = socket.send_to(bytes, client);
        };
        match behavior {
            Behavior::Reply(reply) => send(&build_reply(&query, &reply)),
            Behavior::Silent => {}
            Behavior::TruncatedUdp(_)
            | Behavior::TruncatedUdpTcpClosed
            | Behavior::TruncatedUdpTcpSilent => send(&build_truncated(&query)),
            Behavior::WrongIdOnly(forged) => {
                let mut wrong = query.clone();
                wrong.metadata.id = query.metadata.id.wrapping_add(1);
                send(&build_reply(&wrong, &MockReply::records(forged)));
            }
            Behavior::WrongIdFirst { forged, real } => {
                let mut wrong = query.clone();
                wrong.metadata.id = query.metadata.id.wrapping_add(1);
                send(&build_reply(&wrong, &MockReply::records(forged)));
                send(&build_reply(&query, &real));
            }
            Behavior::WrongQuestionFirst { forged, real } => {
                let mut wrong = query.clone();
                wrong.queries[0]
                    .set_name(Name::from_ascii("forged.example.org.").expect("valid name"));
                send(&build_reply(&wrong, &MockReply::records(forged)));
                send(&build_reply(&query, &real));
            }
            Behavior::OtherSourceFirst { forged, real } => {
                let other = UdpSocket::bind("127.0.0.1:0").expect("bind a second UDP socket");
                let _ = other.send_to(&build_reply(&query, &MockReply::records(forged)), client);
                // Give the forged datagram a head start over the real one.
                std::thread::sleep(Duration::from_millis(20));
                send(&build_reply(&query, &real));
            }
            Behavior::Delayed(delay, reply) => {
                std::thread::sleep(delay);
                send(&build_reply(&query, &reply));
            }
        }
    }
}

fn serve_tcp(listener: TcpListener, shared: &Arc<Mutex<Shared>>, stop: &Arc<AtomicBool>) {
    listener
        .set_nonblocking(true)
        .expect("set the listener non-blocking");
    let mut connections = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let shared = Arc::clone(shared);
                let stop = Arc::clone(stop);
                connections.push(std::thread::spawn(move || {
                    serve_tcp_connection(stream, &shared, &stop)
                }));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    for connection in connections {
        let _ = connection.join();
    }
}

fn serve_tcp_connection(mut stream: TcpStream, shared: &Mutex<Shared>, stop: &AtomicBool) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));

    let mut length_bytes = [0u8; 2];
    if stream.read_exact(&mut length_bytes).is_err() {
        return;
    }

    let mut query = vec![0u8; usize::from(u16::from_be_bytes(length_bytes))];
    if stream.read_exact(&mut query).is_err() {
        return;
    }
    let Ok(query) = Message::from_vec(&query) else {
        return;
    };

    let reply = match behavior_for(shared, &query, true) {
        Some(Behavior::Reply(reply))
        | Some(Behavior::TruncatedUdp(reply))
        | Some(Behavior::WrongIdFirst { real: reply, .. })
        | Some(Behavior::WrongQuestionFirst { real: reply, .. })
        | Some(Behavior::OtherSourceFirst { real: reply, .. }) => reply,
        Some(Behavior::Delayed(delay, reply)) => {
            std::thread::sleep(delay);
            reply
        }
        Some(Behavior::Silent)
        | Some(Behavior::TruncatedUdpTcpSilent)
        | Some(Behavior::WrongIdOnly(_)) => {
            // Hold the connection open without answering until the test ends.
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(10));
            }
            return;
        }
        Some(Behavior::TruncatedUdpTcpClosed) | None => return,
    };

    let bytes = build_reply(&query, &reply);
    let length = u16::try_from(bytes.len()).expect("the mock reply fits TCP framing");
    let _ = stream.write_all(&length.to_be_bytes());
    let _ = stream.write_all(&bytes);
}

fn name(text: &str) -> Name {
    Name::from_ascii(format!("{}.", text.trim_end_matches('.'))).expect("valid test name")
}

pub fn mx(owner: &str, preference: u16, exchange: &str) -> Record {
    let exchange = if exchange == "." {
        Name::root()
    } else {
        name(exchange)
    };
    Record::from_rdata(name(owner), 300, RData::MX(MX::new(preference, exchange)))
}

pub fn a(owner: &str, address: Ipv4Addr) -> Record {
    Record::from_rdata(name(owner), 300, RData::A(A(address)))
}

pub fn aaaa(owner: &str, address: Ipv6Addr) -> Record {
    Record::from_rdata(name(owner), 300, RData::AAAA(AAAA(address)))
}

pub fn cname(owner: &str, target: &str) -> Record {
    Record::from_rdata(name(owner), 300, RData::CNAME(CNAME(name(target))))
}

/// Builds an SOA record for negative answers, with its own TTL and the MINIMUM
/// field (RFC 2308 §4).
pub fn soa(zone: &str, ttl_secs: u32, minimum_secs: u32) -> Record {
    let rdata = SOA::new(
        name(&format!("ns.{zone}")),
        name(&format!("hostmaster.{zone}")),
        1,
        3600,
        600,
        86400,
        minimum_secs,
    );
    Record::from_rdata(name(zone), ttl_secs, RData::SOA(rdata))
}

pub fn with_ttl(mut record: Record, ttl_secs: u32) -> Record {
    record.ttl = ttl_secs;
    record
}
