//! One DNS exchange with one nameserver: a query over UDP, and over TCP
//! again when the UDP answer is truncated.

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpStream, UdpSocket};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::{DNSClass, Name, RecordType};
// glommio 0.9 builds its sockets from socket2 0.4, so this is that version.
use socket2_glommio::{Domain, Protocol, SockAddr, Socket, Type};

/// The EDNS UDP payload size Caduceus advertises (RFC 6891 §6.2.5). 1232
/// bytes fits the IPv6 minimum MTU without fragmentation, the value the DNS
/// Flag Day 2020 recommended. Larger answers come back truncated and are
/// fetched again over TCP.
const EDNS_UDP_PAYLOAD_BYTES: u16 = 1232;

/// Receive buffer for UDP answers. It is larger than the advertised
/// payload, so a server that ignores EDNS still fits. A datagram that does
/// not fit arrives cut short, fails to decode, and is ignored.
const UDP_RECEIVE_BUFFER_BYTES: usize = 4096;

/// The reason one exchange with one nameserver gave no usable response.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("no answer within {timeout_ms} ms")]
    TimedOut { timeout_ms: u128 },
    #[error("{operation} failed: {error}")]
    Io {
        operation: &'static str,
        error: String,
    },
    #[error("invalid response over TCP: {0}")]
    InvalidTcpResponse(String),
    #[error("the response over TCP is truncated too")]
    TruncatedOverTcp,
    #[error("the query cannot be encoded: {0}")]
    Encode(String),
}

fn io_error<E: std::fmt::Display>(operation: &'static str) -> impl Fn(E) -> ExchangeError {
    move |error| ExchangeError::Io {
        operation,
        error: error.to_string(),
    }
}

/// Sends the question `(qname, qtype)` to `server` and returns the first
/// response that matches it, within `timeout` in all.
///
/// Each query gets a random 16-bit id and a new UDP socket bound to port 0,
/// so the kernel picks a random source port. Together they are the defence
/// against forged answers that RFC 5452 §9 asks for. A datagram from another
/// address, with another id, or for another question is ignored, and the
/// wait goes on until the deadline. A response with the TC bit set is
/// fetched again over TCP in the time left (RFC 1035 §4.2.2, RFC 7766 §5).
/// The response code is left to the caller.
pub async fn exchange(
    server: SocketAddr,
    qname: &Name,
    qtype: RecordType,
    timeout: Duration,
) -> Result<Message, ExchangeError> {
    let deadline = Instant::now() + timeout;
    let udp_id: u16 = rand::random();
    let udp_query = encode_query(udp_id, qname, qtype)?;
    let response = within_deadline(
        deadline,
        timeout,
        exchange_udp(server, &udp_query, udp_id, qname, qtype),
    )
    .await?;
    if !response.metadata.truncation {
        return Ok(response);
    }

    tracing::debug!(name = %qname, qtype = %qtype, server = %server, "dns: truncated over UDP, retrying over TCP");
    let tcp_id: u16 = rand::random();
    let tcp_query = encode_query(tcp_id, qname, qtype)?;
    let response = within_deadline(
        deadline,
        timeout,
        exchange_tcp(server, &tcp_query, tcp_id, qname, qtype),
    )
    .await?;
    if response.metadata.truncation {
        return Err(ExchangeError::TruncatedOverTcp);
    }
    Ok(response)
}

/// Runs `future` until `deadline`. `timeout` is only for the error text.
async fn within_deadline<T>(
    deadline: Instant,
    timeout: Duration,
    future: impl Future<Output = Result<T, ExchangeError>>,
) -> Result<T, ExchangeError> {
    let timed_out = ExchangeError::TimedOut {
        timeout_ms: timeout.as_millis(),
    };
    let remaining = deadline.saturating_duration_since(Instant::now());
    if remaining.is_zero() {
        return Err(timed_out);
    }
    futures_lite::future::or(future, async move {
        glommio::timer::sleep(remaining).await;
        Err(timed_out)
    })
    .await
}

fn encode_query(id: u16, qname: &Name, qtype: RecordType) -> Result<Vec<u8>, ExchangeError> {
    let mut message = Message::new(id, MessageType::Query, OpCode::Query);
    // A stub resolver sets RD so that its nameserver recurses (RFC 1034
    // §5.3.1).
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(qname.clone(), qtype));
    let mut edns = Edns::new();
    edns.set_max_payload(EDNS_UDP_PAYLOAD_BYTES);
    message.set_edns(edns);
    message
        .to_vec()
        .map_err(|error| ExchangeError::Encode(error.to_string()))
}

/// Decodes `bytes` and checks that it is the response to query `id` for
/// `(qname, qtype)`. Returns why it is not, for the debug log.
fn match_response(
    bytes: &[u8],
    id: u16,
    qname: &Name,
    qtype: RecordType,
) -> Result<Message, String> {
    let message = Message::from_vec(bytes).map_err(|error| format!("undecodable: {error}"))?;
    if message.metadata.message_type != MessageType::Response {
        return Err("not a response".to_string());
    }
    if message.metadata.id != id {
        return Err(format!("id {} instead of {id}", message.metadata.id));
    }
    // RFC 5452 §9.1: the question must match, not only the id.
    let question_matches = match message.queries.as_slice() {
        [query] => {
            query.name() == qname
                && query.query_type() == qtype
                && query.query_class() == DNSClass::IN
        }
        _ => false,
    };
    if !question_matches {
        return Err("the question does not match the query".to_string());
    }
    Ok(message)
}

async fn exchange_udp(
    server: SocketAddr,
    query: &[u8],
    id: u16,
    qname: &Name,
    qtype: RecordType,
) -> Result<Message, ExchangeError> {
    // The socket is built with socket2 because glommio's UdpSocket::bind
    // sets SO_REUSEPORT. With it, port 0 may be shared with another of our
    // sockets, and answers could reach the wrong query.
    let socket = Socket::new(
        Domain::for_address(server),
        Type::DGRAM,
        Some(Protocol::UDP),
    )
    .map_err(io_error("creating a UDP socket"))?;
    socket
        .set_nonblocking(true)
        .map_err(io_error("setting the UDP socket non-blocking"))?;
    let local: SocketAddr = if server.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    socket
        .bind(&SockAddr::from(local))
        .map_err(io_error("binding a UDP socket"))?;
    // A connected UDP socket receives only from the server and reports its
    // ICMP port-unreachable as an error, so a dead server fails fast.
    socket
        .connect(&SockAddr::from(server))
        .map_err(io_error("connecting the UDP socket"))?;
    let socket = UdpSocket::from(socket);
    socket
        .send(query)
        .await
        .map_err(io_error("sending the UDP query"))?;

    let mut buffer = vec![0u8; UDP_RECEIVE_BUFFER_BYTES];
    loop {
        let (size, source) = socket
            .recv_from(&mut buffer)
            .await
            .map_err(io_error("receiving the UDP response"))?;
        if source.ip() != server.ip() || source.port() != server.port() {
            tracing::debug!(name = %qname, server = %server, source = %source, "dns: ignored a datagram from another address");
            continue;
        }
        match match_response(&buffer[..size], id, qname, qtype) {
            Ok(message) => return Ok(message),
            Err(reason) => {
                tracing::debug!(name = %qname, server = %server, reason = %reason, "dns: ignored a mismatched UDP response");
            }
        }
    }
}

async fn exchange_tcp(
    server: SocketAddr,
    query: &[u8],
    id: u16,
    qname: &Name,
    qtype: RecordType,
) -> Result<Message, ExchangeError> {
    let mut stream = TcpStream::connect(server)
        .await
        .map_err(io_error("connecting over TCP"))?;

    // RFC 1035 §4.2.2: over TCP each message is prefixed with its length
    // as two bytes in network order.
    let length = u16::try_from(query.len()).map_err(|_| {
        ExchangeError::Encode(format!("{} bytes do not fit TCP framing", query.len()))
    })?;
    let mut framed = Vec::with_capacity(2 + query.len());
    framed.extend_from_slice(&length.to_be_bytes());
    framed.extend_from_slice(query);
    stream
        .write_all(&framed)
        .await
        .map_err(io_error("sending the TCP query"))?;
    stream
        .flush()
        .await
        .map_err(io_error("sending the TCP query"))?;

    let mut length_bytes = [0u8; 2];
    stream
        .read_exact(&mut length_bytes)
        .await
        .map_err(io_error("reading the TCP response length"))?;
    let length = usize::from(u16::from_be_bytes(length_bytes));
    let mut response = vec![0u8; length];
    stream
        .read_exact(&mut response)
        .await
        .map_err(io_error("reading the TCP response"))?;
    // Over TCP a forged answer needs the connection itself, so a mismatch
    // means a broken server: give up on it rather than wait.
    match_response(&response, id, qname, qtype).map_err(ExchangeError::InvalidTcpResponse)
}
