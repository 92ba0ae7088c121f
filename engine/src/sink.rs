//! A receiving SMTP server for `caduceus demo` and the benchmarks: accepts
//! every message on a loopback address, offers STARTTLS with a generated
//! certificate, and records when each message arrived.
//!
//! It is a measuring instrument, not an MTA: it stores nothing but the
//! arrival records. One thread per connection, because the engine under
//! test opens a bounded number of connections.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::ServerConnection;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::deliverylog::now_us;

/// Header the injector stamps on each message: microseconds since the Unix
/// epoch at injection.
pub const INJECTED_HEADER: &str = "X-Caduceus-Injected-Us";
/// Header naming the lane the injector used.
pub const LANE_HEADER: &str = "X-Caduceus-Bench-Lane";

/// One received message.
#[derive(Clone, Debug)]
pub struct Arrival {
    pub received_at_us: u64,
    pub injected_at_us: Option<u64>,
    pub lane: Option<String>,
    pub recipients: u32,
    pub tls: bool,
    pub size_bytes: usize,
    /// FNV-1a of the message bytes, to check that every message arrived
    /// intact.
    pub checksum: u64,
}

pub struct Sink {
    pub addr: SocketAddr,
    arrivals: Arc<Mutex<Vec<Arrival>>>,
    received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Sink {
    /// Listens on `addr` (port 0 picks a free port) and serves until dropped.
    pub fn start(addr: SocketAddr) -> io::Result<Sink> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let tls = Arc::new(server_config()?);
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let received = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        listener.set_nonblocking(true)?;
        let (thread_arrivals, thread_received, thread_stop) =
            (arrivals.clone(), received.clone(), stop.clone());
        std::thread::Builder::new()
            .name("sink-accept".into())
            .spawn(move || {
                while !thread_stop.load(Ordering::Acquire) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let (arrivals, received, tls) = (
                                thread_arrivals.clone(),
                                thread_received.clone(),
                                tls.clone(),
                            );
                            let _ = std::thread::Builder::new()
                                .name("sink-session".into())
                                .spawn(move || {
                                    let _ = serve_session(stream, tls, arrivals, received);
                                });
                        }
                        Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })?;
        Ok(Sink {
            addr,
            arrivals,
            received,
            stop,
        })
    }

    pub fn count(&self) -> u64 {
        self.received.load(Ordering::Acquire)
    }

    pub fn arrivals(&self) -> Vec<Arrival> {
        self.arrivals
            .lock()
            .map(|arrivals| arrivals.clone())
            .unwrap_or_default()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

fn server_config() -> io::Result<rustls::ServerConfig> {
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
        .map_err(io::Error::other)?;
    let cert = CertificateDer::from(generated.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(generated.key_pair.serialize_der()));
    // rustls 0.23.48 deprecates the ring provider for lacking post-quantum
    // key exchange; the workspace builds rustls with ring only.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .map_err(io::Error::other)?;
    config.send_tls13_tickets = 2;
    Ok(config)
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<ServerConnection, TcpStream>>),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(stream) => stream.read(buf),
            Stream::Tls(stream) => stream.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(stream) => stream.write(buf),
            Stream::Tls(stream) => stream.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(stream) => stream.flush(),
            Stream::Tls(stream) => stream.flush(),
        }
    }
}

/// Reads CRLF-terminated lines from a stream with its own buffer, so that
/// the buffer can be checked empty before STARTTLS.
struct LineReader {
    buffer: Vec<u8>,
    start: usize,
}

impl LineReader {
    fn line(&mut self, stream: &mut Stream) -> io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(position) = self.buffer[self.start..]
                .windows(2)
                .position(|pair| pair == b"\r\n")
            {
                let end = self.start + position + 2;
                let line = self.buffer[self.start..end].to_vec();
                self.start = end;
                if self.start == self.buffer.len() {
                    self.buffer.clear();
                    self.start = 0;
                }
                return Ok(Some(line));
            }
            let mut chunk = [0u8; 16 * 1024];
            let read = stream.read(&mut chunk)?;
            if read == 0 {
                return Ok(None);
            }
            self.buffer.extend_from_slice(&chunk[..read]);
        }
    }

    fn is_empty(&self) -> bool {
        self.start == self.buffer.len()
    }
}

fn serve_session(
    tcp: TcpStream,
    tls: Arc<rustls::ServerConfig>,
    arrivals: Arc<Mutex<Vec<Arrival>>>,
    received: Arc<AtomicU64>,
) -> io::Result<()> {
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(Duration::from_secs(300)))?;
    let mut stream = Stream::Plain(tcp);
    let mut reader = LineReader {
        buffer: Vec::new(),
        start: 0,
    };
    let mut recipients = 0u32;
    stream.write_all(b"220 sink.caduceus.test ESMTP\r\n")?;
    while let Some(line) = reader.line(&mut stream)? {
        let verb = String::from_utf8_lossy(&line[..line.len().min(10)]).to_ascii_uppercase();
        let secure = matches!(stream, Stream::Tls(_));
        if verb.starts_with("EHLO") {
            let mut reply = String::from(
                "250-sink.caduceus.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-SIZE 209715200\r\n",
            );
            if !secure {
                reply.push_str("250-STARTTLS\r\n");
            }
            reply.push_str("250 ENHANCEDSTATUSCODES\r\n");
            stream.write_all(reply.as_bytes())?;
        } else if verb.starts_with("HELO") {
            stream.write_all(b"250 sink.caduceus.test\r\n")?;
        } else if verb.starts_with("STARTTLS") && !secure {
            if !reader.is_empty() {
                // RFC 3207 §4.2: nothing may follow STARTTLS in the same
                // pipeline (STARTTLS injection, CVE-2011-0411).
                stream.write_all(b"554 5.5.1 data after STARTTLS\r\n")?;
                return Ok(());
            }
            stream.write_all(b"220 2.0.0 ready to start TLS\r\n")?;
            let Stream::Plain(tcp) = stream else {
                return Ok(());
            };
            let connection = ServerConnection::new(tls.clone()).map_err(io::Error::other)?;
            stream = Stream::Tls(Box::new(rustls::StreamOwned::new(connection, tcp)));
            recipients = 0;
        } else if verb.starts_with("MAIL") {
            recipients = 0;
            stream.write_all(b"250 2.1.0 ok\r\n")?;
        } else if verb.starts_with("RCPT") {
            recipients += 1;
            stream.write_all(b"250 2.1.5 ok\r\n")?;
        } else if verb.starts_with("DATA") {
            stream.write_all(b"354 go ahead\r\n")?;
            let mut message = Vec::new();
            loop {
                let Some(line) = reader.line(&mut stream)? else {
                    return Ok(());
                };
                if line == b".\r\n" {
                    break;
                }
                let content = line.strip_prefix(b".").unwrap_or(&line);
                message.extend_from_slice(content);
            }
            let arrival = Arrival {
                received_at_us: now_us(),
                injected_at_us: header_value(&message, INJECTED_HEADER)
                    .and_then(|value| value.parse().ok()),
                lane: header_value(&message, LANE_HEADER),
                recipients,
                tls: secure,
                size_bytes: message.len(),
                checksum: fnv1a(&message),
            };
            if let Ok(mut list) = arrivals.lock() {
                list.push(arrival);
            }
            received.fetch_add(1, Ordering::AcqRel);
            stream.write_all(b"250 2.0.0 accepted\r\n")?;
        } else if verb.starts_with("RSET") || verb.starts_with("NOOP") {
            stream.write_all(b"250 2.0.0 ok\r\n")?;
        } else if verb.starts_with("QUIT") {
            stream.write_all(b"221 2.0.0 bye\r\n")?;
            return Ok(());
        } else {
            stream.write_all(b"500 5.5.2 unrecognised command\r\n")?;
        }
    }
    Ok(())
}

/// The value of the first header with this name, from the header section.
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

/// FNV-1a, 64-bit: a fast checksum for comparing sent and received bytes.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}
