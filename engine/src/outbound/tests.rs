//! Tests of the SMTP client against a scripted fake MX.

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use caduceus_policy::TlsMode;
use caduceus_policy::config::DeliveryConfig;
use caduceus_policy::duration::ConfigDuration;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ServerConfig, ServerConnection, StreamOwned};

use super::*;
use crate::smtp::EnhancedStatus;

// ---------------------------------------------------------------------------
// The mock MX
// ---------------------------------------------------------------------------

/// The maximum time a mock waits for the client, so a hung test fails
/// instead of blocking the suite.
const MOCK_READ_TIMEOUT: Duration = Duration::from_secs(20);

enum MockStream {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ServerConnection, TcpStream>>),
}

impl MockStream {
    fn tcp(&self) -> &TcpStream {
        match self {
            MockStream::Plain(tcp) => tcp,
            MockStream::Tls(tls) => tls.get_ref(),
        }
    }
}

impl Read for MockStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            MockStream::Plain(tcp) => tcp.read(buf),
            MockStream::Tls(tls) => tls.read(buf),
        }
    }
}

impl Write for MockStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            MockStream::Plain(tcp) => tcp.write(buf),
            MockStream::Tls(tls) => tls.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            MockStream::Plain(tcp) => tcp.flush(),
            MockStream::Tls(tls) => tls.flush(),
        }
    }
}

/// One connection to the mock MX, driven by a test script: it writes
/// replies, reads command lines and DATA, and records every byte received.
struct MockSession {
    stream: Option<MockStream>,
    buffer: Vec<u8>,
    peer: SocketAddr,
    /// Each command line received, without CRLF, as lossy UTF-8.
    commands: Vec<String>,
    /// The raw bytes of each DATA section, terminator included.
    data: Vec<Vec<u8>>,
    /// Every byte received, decrypted where TLS was used.
    raw: Vec<u8>,
    tls_used: bool,
}

impl MockSession {
    fn stream(&mut self) -> &mut MockStream {
        self.stream.as_mut().expect("mock stream already closed")
    }

    fn send(&mut self, text: &str) {
        self.send_bytes(text.as_bytes());
    }

    fn send_bytes(&mut self, bytes: &[u8]) {
        let stream = self.stream();
        let _ = stream.write_all(bytes);
        let _ = stream.flush();
    }

    fn reply(&mut self, line: &str) {
        self.send(&format!("{line}\r\n"));
    }

    /// Reads up to `bytes_wanted` more bytes; false on EOF or error.
    fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        match self.stream().read(&mut chunk) {
            Ok(0) | Err(_) => false,
            Ok(count) => {
                self.raw.extend_from_slice(&chunk[..count]);
                self.buffer.extend_from_slice(&chunk[..count]);
                true
            }
        }
    }

    /// Reads one command line; `None` on EOF.
    fn line(&mut self) -> Option<String> {
        loop {
            if let Some(at) = self.buffer.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buffer.drain(..at + 2).take(at).collect();
                let text = String::from_utf8_lossy(&line).into_owned();
                self.commands.push(text.clone());
                return Some(text);
            }
            if !self.fill() {
                return None;
            }
        }
    }

    fn expect(&mut self, prefix: &str) -> String {
        let line = self.line().unwrap_or_default();
        assert!(
            line.starts_with(prefix),
            "mock expected {prefix:?}, got {line:?}"
        );
        line
    }

    /// Reads DATA content up to and including CRLF.CRLF (or a lone `.`
    /// CRLF at the very start).
    fn read_data(&mut self) -> Vec<u8> {
        loop {
            let end = if self.buffer.starts_with(b".\r\n") {
                Some(3)
            } else {
                self.buffer
                    .windows(5)
                    .position(|w| w == b"\r\n.\r\n")
                    .map(|at| at + 5)
            };
            if let Some(end) = end {
                let data: Vec<u8> = self.buffer.drain(..end).collect();
                self.data.push(data.clone());
                return data;
            }
            if !self.fill() {
                let data = std::mem::take(&mut self.buffer);
                self.data.push(data.clone());
                return data;
            }
        }
    }

    /// Sends the greeting and replies to EHLO with the given keywords.
    fn greet(&mut self, keywords: &[&str]) {
        self.reply("220 mx.example.net ESMTP");
        self.expect("EHLO ");
        self.ehlo_reply(keywords);
    }

    fn ehlo_reply(&mut self, keywords: &[&str]) {
        let mut text = String::from("250");
        text.push(if keywords.is_empty() { ' ' } else { '-' });
        text.push_str("mx.example.net\r\n");
        for (index, keyword) in keywords.iter().enumerate() {
            let separator = if index + 1 == keywords.len() {
                ' '
            } else {
                '-'
            };
            text.push_str(&format!("250{separator}{keyword}\r\n"));
        }
        self.send(&text);
    }

    /// Accepts MAIL, every RCPT and DATA, and replies 250 to the final dot.
    fn accept_transaction(&mut self, recipients: usize) -> Vec<u8> {
        self.expect("MAIL FROM:");
        self.reply("250 2.1.0 Ok");
        for _ in 0..recipients {
            self.expect("RCPT TO:");
            self.reply("250 2.1.5 Ok");
        }
        self.expect("DATA");
        self.reply("354 go ahead");
        let data = self.read_data();
        self.reply("250 2.0.0 Ok: queued as Q1");
        data
    }

    fn upgrade_tls(&mut self, config: Arc<ServerConfig>) {
        let Some(MockStream::Plain(tcp)) = self.stream.take() else {
            panic!("mock TLS upgrade on a non-plain stream");
        };
        let connection = ServerConnection::new(config).expect("mock server connection");
        let mut tls = StreamOwned::new(connection, tcp);
        while tls.conn.is_handshaking() {
            if tls.conn.complete_io(&mut tls.sock).is_err() {
                break;
            }
        }
        self.tls_used = true;
        self.stream = Some(MockStream::Tls(Box::new(tls)));
    }

    /// Waits for the client's QUIT or EOF, and replies 221 to QUIT.
    fn finish(&mut self) {
        if let Some(line) = self.line()
            && line == "QUIT"
        {
            self.reply("221 2.0.0 Bye");
        }
    }

    /// Closes with FIN.
    fn close(&mut self) {
        if let Some(stream) = self.stream.take() {
            let _ = stream.tcp().shutdown(Shutdown::Both);
        }
    }

    /// Closes with RST: SO_LINGER with a zero timeout makes close() reset.
    fn reset_connection(&mut self) {
        if let Some(stream) = self.stream.take() {
            let _ = socket2::SockRef::from(stream.tcp()).set_linger(Some(Duration::ZERO));
            drop(stream);
        }
    }
}

/// A record of one finished mock session.
struct Transcript {
    peer: SocketAddr,
    commands: Vec<String>,
    data: Vec<Vec<u8>>,
    raw: Vec<u8>,
    tls_used: bool,
}

type Script = Box<dyn FnOnce(&mut MockSession) + Send>;

/// A mock MX: a std-thread TCP server on a loopback address with an
/// ephemeral port. Each accepted connection runs the next script in order.
struct MockMx {
    addr: SocketAddr,
    handle: JoinHandle<Vec<Transcript>>,
}

impl MockMx {
    fn start(scripts: Vec<Script>) -> MockMx {
        let listener = TcpListener::bind("127.0.0.1:0").expect("mock bind");
        let addr = listener.local_addr().expect("mock address");
        let handle = std::thread::spawn(move || {
            let mut transcripts = Vec::new();
            for script in scripts {
                let Ok((tcp, peer)) = listener.accept() else {
                    break;
                };
                tcp.set_read_timeout(Some(MOCK_READ_TIMEOUT))
                    .expect("mock timeout");
                let mut session = MockSession {
                    stream: Some(MockStream::Plain(tcp)),
                    buffer: Vec::new(),
                    peer,
                    commands: Vec::new(),
                    data: Vec::new(),
                    raw: Vec::new(),
                    tls_used: false,
                };
                script(&mut session);
                transcripts.push(Transcript {
                    peer: session.peer,
                    commands: session.commands,
                    data: session.data,
                    raw: session.raw,
                    tls_used: session.tls_used,
                });
            }
            transcripts
        });
        MockMx { addr, handle }
    }

    fn join(self) -> Vec<Transcript> {
        self.handle.join().expect("mock MX thread panicked")
    }
}

fn script(f: impl FnOnce(&mut MockSession) + Send + 'static) -> Script {
    Box::new(f)
}

/// A `tracing` writer that keeps every line in memory.
#[derive(Clone, Default)]
struct LogCapture(Arc<std::sync::Mutex<Vec<u8>>>);

impl LogCapture {
    fn text(&self) -> String {
        let bytes = self.0.lock().map(|bytes| bytes.clone()).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut bytes) = self.0.lock() {
            bytes.extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogCapture {
    type Writer = LogCapture;

    fn make_writer(&'a self) -> LogCapture {
        self.clone()
    }
}

// ---------------------------------------------------------------------------
// TLS fixtures
// ---------------------------------------------------------------------------

/// A test CA, its PEM file, and a server certificate for `mx.example.net`.
struct TestPki {
    ca_file: PathBuf,
    server: Arc<ServerConfig>,
    /// A certificate from the same CA for another name.
    wrong_name_server: Arc<ServerConfig>,
    _dir: tempfile::TempDir,
}

fn pki() -> &'static TestPki {
    static PKI: OnceLock<TestPki> = OnceLock::new();
    PKI.get_or_init(|| {
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::new()).expect("CA params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Caduceus test CA");
        let ca = ca_params.self_signed(&ca_key).expect("CA certificate");

        let dir = tempfile::tempdir().expect("temp dir");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).expect("write CA file");

        let server_config = |name: &str| {
            let key = rcgen::KeyPair::generate().expect("server key");
            let params = rcgen::CertificateParams::new(vec![name.to_string()]).expect("params");
            let cert = params
                .signed_by(&key, &ca, &ca_key)
                .expect("server certificate");
            let chain: Vec<CertificateDer<'static>> = vec![cert.der().clone()];
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
            #[allow(deprecated)]
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .expect("server config");
            Arc::new(config)
        };
        TestPki {
            ca_file,
            server: server_config("mx.example.net"),
            wrong_name_server: server_config("other.example.org"),
            _dir: dir,
        }
    })
}

// ---------------------------------------------------------------------------
// Client helpers
// ---------------------------------------------------------------------------

fn test_config() -> DeliveryConfig {
    DeliveryConfig {
        connect_timeout: ConfigDuration::from_secs(5),
        greeting_timeout: ConfigDuration::from_secs(10),
        command_timeout: ConfigDuration::from_secs(10),
        data_done_timeout: ConfigDuration::from_secs(10),
        ..DeliveryConfig::default()
    }
}

/// Runs `future` on a fresh glommio executor.
fn run<T: 'static>(future: impl std::future::Future<Output = T> + 'static) -> T {
    glommio::LocalExecutorBuilder::default()
        .make()
        .expect("glommio executor")
        .run(future)
}

fn params<'a>(addr: SocketAddr, mode: TlsMode, config: &'a DeliveryConfig) -> ConnectParams<'a> {
    ConnectParams {
        mx_host: "mx.example.net",
        addr,
        source: None,
        helo: "mta.example.com",
        tls_mode: mode,
        timeouts: config,
    }
}

fn recipient(address: &str) -> OutboundRecipient<'_> {
    OutboundRecipient {
        address,
        notify: 0,
        orcpt: None,
    }
}

fn message<'a>(recipients: &'a [OutboundRecipient<'a>], body: &'a [u8]) -> OutboundMessage<'a> {
    OutboundMessage {
        sender: "app@example.com",
        recipients,
        body,
        body_8bit: false,
        smtputf8: false,
        envid: None,
        ret: None,
    }
}

const BODY: &[u8] =
    b"From: app@example.com\r\nTo: user@example.net\r\nSubject: hi\r\n\r\nhello\r\n";

/// Opens a connection in `mode`, sends `body` to `addresses`, quits, and
/// returns the results.
fn deliver(
    addr: SocketAddr,
    mode: TlsMode,
    addresses: &'static [&'static str],
    body: &'static [u8],
) -> Result<Vec<RecipientResult>, SessionError> {
    run(async move {
        let tls = TlsContext::new(Some(&pki().ca_file), true).expect("TLS context");
        let config = test_config();
        let mut connection = Connection::open(&tls, &params(addr, mode, &config)).await?;
        let recipients: Vec<OutboundRecipient<'_>> =
            addresses.iter().map(|address| recipient(address)).collect();
        let results = connection.send(&message(&recipients, body)).await;
        connection.quit().await;
        results
    })
}

fn status(result: &RecipientResult) -> Option<EnhancedStatus> {
    result.reply().status
}

fn is_transient(result: &RecipientResult) -> bool {
    matches!(result, RecipientResult::Transient(_))
}

fn is_delivered(result: &RecipientResult) -> bool {
    matches!(result, RecipientResult::Delivered(_))
}

fn is_permanent(result: &RecipientResult) -> bool {
    matches!(result, RecipientResult::Permanent(_))
}

// ---------------------------------------------------------------------------
// Connecting and TLS
// ---------------------------------------------------------------------------

#[test]
fn connect_binds_source_address() {
    let mock = MockMx::start(vec![script(|s| {
        s.greet(&["PIPELINING"]);
        s.finish();
    })]);
    let addr = mock.addr;
    run(async move {
        let tls = TlsContext::new(None, true).expect("TLS context");
        let config = test_config();
        let mut connect = params(addr, TlsMode::None, &config);
        connect.source = Some(IpAddr::from([127, 0, 0, 2]));
        let connection = Connection::open(&tls, &connect).await.expect("open");
        assert_eq!(connection.remote_addr(), addr);
        assert_eq!(connection.remote_host(), "mx.example.net");
        connection.quit().await;
    });
    let transcripts = mock.join();
    assert_eq!(transcripts[0].peer.ip(), IpAddr::from([127, 0, 0, 2]));
}

#[test]
fn connect_refused_is_try_next_mx() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let error = deliver(addr, TlsMode::None, &["a@example.net"], BODY).unwrap_err();
    assert!(matches!(
        error,
        SessionError::ConnectionLost {
            stage: Stage::Connect,
            ..
        }
    ));
    assert!(error.try_next_mx());
    assert_eq!(error.reply().status, Some(EnhancedStatus::new(4, 4, 1)));
}

/// Opens a listener on 127.0.0.1 and fills its accept queue, so the kernel
/// drops further SYNs and a connect to it times out without leaving loopback.
fn full_listener() -> (socket2::Socket, Vec<TcpStream>, SocketAddr) {
    let listener =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    listener
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    listener.listen(0).unwrap();
    let addr = listener.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.set_nonblocking(true).unwrap();
        let _ = socket.connect(&addr.into());
        fillers.push(TcpStream::from(socket));
    }
    std::thread::sleep(Duration::from_millis(200));
    (listener, fillers, addr)
}

#[test]
fn connect_timeout_both_paths() {
    let (_listener, _fillers, addr) = full_listener();
    for source in [None, Some(IpAddr::from([127, 0, 0, 3]))] {
        let (error, elapsed) = run(async move {
            let tls = TlsContext::new(None, true).expect("TLS context");
            let mut config = test_config();
            config.connect_timeout = ConfigDuration::from_secs(1);
            let mut connect = params(addr, TlsMode::None, &config);
            connect.source = source;
            let started = std::time::Instant::now();
            let error = Connection::open(&tls, &connect).await.err();
            (error, started.elapsed())
        });
        let error = error.expect("connect to a full accept queue must fail");
        assert!(
            matches!(
                error,
                SessionError::Timeout {
                    stage: Stage::Connect
                }
            ),
            "source {source:?}: {error:?}"
        );
        assert!(error.try_next_mx());
        assert!(elapsed >= Duration::from_millis(900), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    }
}

#[test]
fn bound_connect_refused() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let error = run(async move {
        let tls = TlsContext::new(None, true).expect("TLS context");
        let config = test_config();
        let mut connect = params(addr, TlsMode::None, &config);
        connect.source = Some(IpAddr::from([127, 0, 0, 2]));
        Connection::open(&tls, &connect).await.err()
    });
    let error = error.expect("nothing listens on the port");
    assert!(
        matches!(
            error,
            SessionError::ConnectionLost {
                stage: Stage::Connect,
                ..
            }
        ),
        "{error:?}"
    );
}

fn tls_delivery_script(config: Arc<ServerConfig>) -> Script {
    script(move |s| {
        s.greet(&["PIPELINING", "STARTTLS"]);
        s.expect("STARTTLS");
        s.reply("220 2.0.0 Ready to start TLS");
        s.upgrade_tls(config);
        s.expect("EHLO mta.example.com");
        s.ehlo_reply(&["PIPELINING", "8BITMIME"]);
        s.accept_transaction(1);
        s.finish();
    })
}

#[test]
fn starttls_verified_and_resumed() {
    let server = pki().server.clone();
    let mock = MockMx::start(vec![
        tls_delivery_script(server.clone()),
        tls_delivery_script(server),
    ]);
    let addr = mock.addr;
    let (first, second, counts) = run(async move {
        let tls = TlsContext::new(Some(&pki().ca_file), true).expect("TLS context");
        let config = test_config();
        let recipients = [recipient("user@example.net")];
        let mut infos = Vec::new();
        for _ in 0..2 {
            let mut connection = Connection::open(&tls, &params(addr, TlsMode::Verified, &config))
                .await
                .expect("open");
            let results = connection
                .send(&message(&recipients, BODY))
                .await
                .expect("send");
            assert!(is_delivered(&results[0]));
            assert!(connection.capabilities().eight_bit_mime, "EHLO inside TLS");
            infos.push(connection.tls().cloned().expect("TLS in use"));
            connection.quit().await;
        }
        (infos[0].clone(), infos[1].clone(), tls.handshake_counts())
    });
    assert_eq!(first.version, "TLSv1.3");
    assert!(!first.resumed);
    assert!(
        second.resumed,
        "second connection resumes the cached session"
    );
    assert_eq!(counts, (1, 1));
    let transcripts = mock.join();
    assert!(transcripts.iter().all(|t| t.tls_used));
    assert_eq!(
        transcripts[0]
            .commands
            .iter()
            .filter(|c| c.starts_with("EHLO"))
            .count(),
        2
    );
}

#[test]
fn resumption_can_be_disabled() {
    let server = pki().server.clone();
    let mock = MockMx::start(vec![
        tls_delivery_script(server.clone()),
        tls_delivery_script(server),
    ]);
    let addr = mock.addr;
    let counts = run(async move {
        let tls = TlsContext::new(Some(&pki().ca_file), false).expect("TLS context");
        let config = test_config();
        let recipients = [recipient("user@example.net")];
        for _ in 0..2 {
            let mut connection = Connection::open(&tls, &params(addr, TlsMode::Verified, &config))
                .await
                .expect("open");
            connection
                .send(&message(&recipients, BODY))
                .await
                .expect("send");
            assert!(!connection.tls().expect("TLS in use").resumed);
            connection.quit().await;
        }
        tls.handshake_counts()
    });
    assert_eq!(counts, (2, 0));
    mock.join();
}

#[test]
fn cipher_suites_are_aead_only() {
    for suite in AEAD_CIPHER_SUITES {
        let name = format!("{:?}", suite.suite());
        assert!(
            name.contains("_GCM_") || name.contains("CHACHA20_POLY1305"),
            "{name}"
        );
        assert!(
            name.starts_with("TLS13_") || name.starts_with("TLS_ECDHE_"),
            "{name}"
        );
    }
}

#[test]
fn verified_rejects_wrong_name() {
    let mock = MockMx::start(vec![script(|s| {
        s.greet(&["STARTTLS"]);
        s.expect("STARTTLS");
        s.reply("220 2.0.0 Ready to start TLS");
        s.upgrade_tls(pki().wrong_name_server.clone());
        s.finish();
    })]);
    let error = deliver(mock.addr, TlsMode::Verified, &["a@example.net"], BODY).unwrap_err();
    assert!(
        matches!(error, SessionError::RemoteIncompatible { .. }),
        "{error:?}"
    );
    assert!(error.try_next_mx());
    assert!(!error.is_permanent());
    let transcripts = mock.join();
    assert!(
        !transcripts[0]
            .commands
            .iter()
            .any(|c| c.starts_with("MAIL"))
    );
}

#[test]
fn required_accepts_any_certificate() {
    let mock = MockMx::start(vec![tls_delivery_script(pki().wrong_name_server.clone())]);
    let results = deliver(mock.addr, TlsMode::Required, &["a@example.net"], BODY).unwrap();
    assert!(is_delivered(&results[0]));
    assert!(mock.join()[0].tls_used);
}

#[test]
fn required_without_starttls_is_incompatible() {
    let mock = MockMx::start(vec![script(|s| {
        s.greet(&["PIPELINING"]);
        s.finish();
    })]);
    let error = deliver(mock.addr, TlsMode::Required, &["a@example.net"], BODY).unwrap_err();
    assert!(
        matches!(error, SessionError::RemoteIncompatible { .. }),
        "{error:?}"
    );
    assert_eq!(error.reply().code, 451);
    assert_eq!(error.reply().status, Some(EnhancedStatus::new(4, 7, 4)));
    let transcripts = mock.join();
    assert!(
        !transcripts[0]
            .commands
            .iter()
            .any(|c| c.starts_with("MAIL"))
    );
}

#[test]
fn opportunistic_without_starttls_sends_cleartext() {
    let mock = MockMx::start(vec![script(|s| {
        s.greet(&["PIPELINING"]);
        s.accept_transaction(1);
        s.finish();
    })]);
    let results = deliver(mock.addr, TlsMode::Opportunistic, &["a@example.net"], BODY).unwrap();
    assert!(is_delivered(&results[0]));
    assert!(!mock.join()[0].tls_used);
}

#[test]
fn starttls_454_continues_in_cleartext() {
    let mock = MockMx::start(vec![script(|s| {
        s.greet(&["STARTTLS"]);
        s.expect("STARTTLS");
        s.reply("454 4.7.0 TLS not available due to local problem");
        s.accept_transaction(1);
        s.finish();
    })]);
    let results = deliver(mock.addr, TlsMode::Opportunistic, &["a@example.net"], BODY).unwrap();
    assert!(is_delivered(&results[0]));
    let transcripts = mock.join();
    assert_eq!(transcripts.len(), 1, "same connection");
    assert!(!transcripts[0].tls_used);
}

#[test]
fn starttls_454_fails_required() {
    let mock = MockMx::start(vec![script(|s| {
        s.greet(&["STARTTLS"]);
        s.expect("STARTTLS");
        s.reply("454 4.7.0 TLS not available due to local problem");
        s.finish();
    })]);
    let error = deliver(mock.addr, TlsMode::Required, &["a@example.net"], BODY).unwrap_err();
    assert!(
        matches!(error, SessionError::RemoteIncompatible { .. }),
        "{error:?}"
    );
    assert!(!error.is_permanent());
}

/// A fatal `handshake_failure` alert (RFC 8446 §6): content type 21,
/// legacy version 3.3, length 2, level 2, description 40.
const TLS_HANDSHAKE_FAILURE_ALERT: &[u8] = &[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28];

/// Replies 220 to STARTTLS, then sends `reply` in place of a ServerHello.
fn broken_tls_script_with(reply: &'static [u8]) -> Script {
    script(move |s| {
        s.greet(&["STARTTLS"]);
        s.expect("STARTTLS");
        s.reply("220 2.0.0 Ready to start TLS");
        s.fill();
        s.send_bytes(reply);
        s.close();
    })
}

fn broken_tls_script() -> Script {
    broken_tls_script_with(b"this is not a TLS record\r\n")
}

#[test]
fn opportunistic_handshake_failure_defers() {
    for reply in [
        &b"this is not a TLS record\r\n"[..],
        TLS_HANDSHAKE_FAILURE_ALERT,
    ] {
        let mock = MockMx::start(vec![broken_tls_script_with(reply)]);
        let error =
            deliver(mock.addr, TlsMode::Opportunistic, &["a@example.net"], BODY).unwrap_err();
        assert!(
            matches!(error, SessionError::TlsHandshake { .. }),
            "{error:?}"
        );
        assert!(!error.is_permanent());
        assert_eq!(error.reply().status, Some(EnhancedStatus::new(4, 7, 5)));
        let transcripts = mock.join();
        assert_eq!(transcripts.len(), 1, "no cleartext retry");
    }
}

#[test]
fn fallback_mode_retries_in_cleartext() {
    let mock = MockMx::start(vec![
        broken_tls_script(),
        script(|s| {
            s.greet(&["STARTTLS", "PIPELINING"]);
            s.accept_transaction(1);
            s.finish();
        }),
    ]);

    let logs = LogCapture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_ansi(false)
        .finish();
    // glommio runs the future on this thread, so a thread-local subscriber
    // receives the client's events.
    let results = tracing::subscriber::with_default(subscriber, || {
        deliver(
            mock.addr,
            TlsMode::OpportunisticFallback,
            &["a@example.net"],
            BODY,
        )
    })
    .unwrap();
    assert!(logs.text().contains("TLS failed, retried in cleartext"));
    assert!(is_delivered(&results[0]));

    // The first connection carried no MAIL, and the second no STARTTLS.
    let transcripts = mock.join();
    assert_eq!(transcripts.len(), 2);
    assert!(
        !transcripts[0]
            .commands
            .iter()
            .any(|c| c.starts_with("MAIL"))
    );
    assert!(!transcripts[1].commands.iter().any(|c| c == "STARTTLS"));
    assert_eq!(transcripts[1].data.len(), 1);
}

#[test]
fn plaintext_after_starttls_220_is_refused() {
    let mock = MockMx::start(vec![script(|s| {
        s.greet(&["STARTTLS"]);
        s.expect("STARTTLS");
        // An injected reply in the same segment as the 220.
        s.send("220 2.0.0 Ready to start TLS\r\n250 2.1.0 injected\r\n");
        s.finish();
    })]);
    let error = deliver(mock.addr, TlsMode::Opportunistic, &["a@example.net"], BODY).unwrap_err();
    assert!(
        matches!(
            error,
            SessionError::RemoteMisbehaved {
                stage: Stage::StartTls,
                ..
            }
        ),
        "{error:?}"
    );
    let transcripts = mock.join();
    assert!(
        !transcripts[0]
            .commands
            .iter()
            .any(|c| c.starts_with("MAIL"))
    );
}

#[test]
fn greeting_421_tries_next_mx() {
    let mock = MockMx::start(vec![script(|s| {
        s.reply("421 4.7.0 mx1.example.net Too many connections");
        s.close();
    })]);
    let error = deliver(mock.addr, TlsMode::None, &["a@example.net"], BODY).unwrap_err();
    assert!(error.try_next_mx());
    assert!(!error.is_permanent());
    assert_eq!(error.reply().code, 421);
}

#[test]
fn greeting_with_wrong_code_is_misbehaviour() {
    let mock = MockMx::start(vec![script(|s| {
        s.reply("250 mx.example.net hello");
        s.finish();
    })]);
    let error = deliver(mock.addr, TlsMode::None, &["a@example.net"], BODY).unwrap_err();
    assert!(
        matches!(
            error,
            SessionError::RemoteMisbehaved {
                stage: Stage::Greeting,
                ..
            }
        ),
        "{error:?}"
    );
    assert!(error.try_next_mx());
    assert_eq!(error.reply().code, 451);
    mock.join();
}

#[test]
fn greeting_554_gets_quit() {
    let mock = MockMx::start(vec![script(|s| {
        s.reply("554 5.7.1 no service for you");
        s.expect("QUIT");
    })]);
    let error = deliver(mock.addr, TlsMode::None, &["a@example.net"], BODY).unwrap_err();
    assert!(error.try_next_mx());
    assert!(error.is_permanent());
    mock.join();
}

#[test]
fn helo_fallback_after_ehlo_500() {
    let mock = MockMx::start(vec![script(|s| {
        s.reply("220 old.example.net SMTP");
        s.expect("EHLO mta.example.com");
        s.reply("500 5.5.1 command unrecognized");
        s.expect("HELO mta.example.com");
        s.reply("250 old.example.net");
        s.accept_transaction(1);
        s.finish();
    })]);
    let results = deliver(mock.addr, TlsMode::Opportunistic, &["a@example.net"], BODY).unwrap();
    assert!(is_delivered(&results[0]));
    let transcripts = mock.join();
    assert_eq!(transcripts[0].commands[2], "MAIL FROM:<app@example.com>");
}

// ---------------------------------------------------------------------------
// Replies
// ---------------------------------------------------------------------------

#[test]
fn multiline_greeting_and_split_ehlo() {
    let mock = MockMx::start(vec![script(|s| {
        s.send("220-mx.example.net ESMTP\r\n");
        std::thread::sleep(Duration::from_secs(2));
        // The client must not have sent EHLO during the pause.
        s.stream().tcp().set_nonblocking(true).unwrap();
        let mut probe = [0u8; 64];
        let early = s.stream().read(&mut probe);
        assert!(
            matches!(early, Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "EHLO before the final 220 line: {early:?}"
        );
        s.stream().tcp().set_nonblocking(false).unwrap();
        s.send("220-No unsolicited bulk mail\r\n220 mx.example.net ready\r\n");
        s.expect("EHLO mta.example.com");
        s.send("250-mx.example.net\r\n250-SIZE 10240000\r\n250-8BITM");
        std::thread::sleep(Duration::from_millis(200));
        s.send("IME\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n");
        s.expect("MAIL FROM:<app@example.com>");
        s.reply("250 2.1.0 Ok");
        s.expect("RCPT TO:<nobody@example.net>");
        s.send("550-5.1.1 The account you tried to reach does not exist.\r\n550-5.1.1 Check the address\r\n550 5.1.1 and try again.\r\n");
        // DATA was pipelined after the RCPT (RFC 2920 §3.1).
        s.expect("DATA");
        s.reply("554 5.5.1 Error: no valid recipients");
        s.finish();
    })]);
    let body: &'static [u8] = b"Subject: caf\xc3\xa9\r\n\r\ncaf\xc3\xa9\r\n";
    let results = deliver(mock.addr, TlsMode::None, &["nobody@example.net"], body).unwrap();
    let RecipientResult::Permanent(reply) = &results[0] else {
        panic!("expected a permanent failure, got {:?}", results[0]);
    };
    assert_eq!(reply.code, 550);
    assert_eq!(reply.status, Some(EnhancedStatus::new(5, 1, 1)));
    assert_eq!(reply.lines.len(), 3);
    assert!(reply.to_diagnostic().contains("and try again."));
    let transcripts = mock.join();
    assert_eq!(
        transcripts[0].commands[1],
        format!(
            "MAIL FROM:<app@example.com> SIZE={} BODY=8BITMIME",
            body.len()
        )
    );
}

// ---------------------------------------------------------------------------
// Message content
// ---------------------------------------------------------------------------

#[test]
fn data_tails_on_the_wire() {
    let cases: [(&'static [u8], &'static [u8]); 4] = [
        (b"S: x\r\n\r\nlast line", b"S: x\r\n\r\nlast line\r\n.\r\n"),
        (b"S: x\r\n\r\nlast\r\n", b"S: x\r\n\r\nlast\r\n.\r\n"),
        (b"S: x\r\n\r\nlast\r\n.", b"S: x\r\n\r\nlast\r\n..\r\n.\r\n"),
        (b"S: x\r\n\r\nlast\r", b"S: x\r\n\r\nlast\r\n.\r\n"),
    ];
    for (body, wire) in cases {
        let mock = MockMx::start(vec![script(|s| {
            s.greet(&["PIPELINING", "8BITMIME"]);
            s.accept_transaction(1);
            s.finish();
        })]);
        let results = deliver(mock.addr, TlsMode::None, &["a@example.net"], body).unwrap();
        assert!(is_delivered(&results[0]));
        let transcripts = mock.join();
        assert_eq!(
            transcripts[0].data[0],
            wire,
            "body {:?}",
            String::from_utf8_lossy(body)
        );
    }
}

#[test]
fn dot_stuffing_on_the_wire() {
    let mock = MockMx::start(vec![script(|s| {
        s.greet(&["PIPELINING"]);
        s.accept_transaction(1);
        s.finish();
    })]);
    let body: &'static [u8] = b"Subject: u\r\n\r\n.\r\n..\r\n.a\r\nend\r\n\r\n";
    deliver(mock.addr, TlsMode::None, &["a@example.net"], body).unwrap();
    let transcripts = mock.join();
    assert_eq!(
        transcripts[0].data[0],
        b"Subject: u\r\n\r\n..\r\n...\r\n..a\r\nend\r\n\r\n.\r\n"
    );
}

#[test]
fn eight_bit_converted_without_8bitmime() {
    let mock = MockMx::start(vec![script(|s| {
        s.greet(&["PIPELINING"]);
        s.accept_transaction(1);
        s.finish();
    })]);
    let body: &'static [u8] = b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\nSubject: cafe\r\n\r\ncaf\xc3\xa9\r\n";
    let results = deliver(mock.addr, TlsMode::None, &["a@example.net"], body).unwrap();
    assert!(is_delivered(&results[0]));
    let transcripts = mock.join();
    let data = &transcripts[0].data[0];
    assert!(data.iter().all(|&byte| byte < 0x80));
    let text = String::from_utf8_lossy(data);
    assert!(text.contains("Content-Transfer-Encoding: quoted-printable\r\n"));
    assert!(text.contains("caf=C3=A9"));
    assert_eq!(transcripts[0].commands[1], "MAIL FROM:<app@example.com>");
}

#[test]
fn eight_bit_sent_unchanged_with_8bitmime() {
    let mock = MockMx::start(vec![script(|s| {
        s.greet(&["PIPELINING", "8BITMIME"]);
        s.accept_transaction(1);
        s.finish();
    })]);
    let body: &'static [u8] = b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\nSubject: cafe\r\n\r\ncaf\xc3\xa9\r\n";
    let results = deliver(mock.addr, TlsMode::None, &["a@example.net"], body).unwrap();
    assert!(is_delivered(&results[0]));
    let transcripts = mock.join();
    assert_eq!(
        transcripts[0].commands[1],
        "MAIL FROM:<app@example.com> BODY=8BITMIME"
    );
    let mut expected = body.to_vec();
    expected.extend_from_slice(b".\r\n");
    assert_eq!(transcripts[0].data[0], expected);
}

#[test]
fn eight_bit_header_fails_with_5_6_3() {
    let mock = MockMx::start(vec![script(|s| {
        s.greet(&["PIPELINING"]);
        s.finish();
    })]);
    let body: &'static [u8] = b"Subject: caf\xc3\xa9\r\n\r\nbody\r\n";
    let results = deliver(mock.addr, TlsMode::None, &["a@example.net"], body).unwrap();
    assert!(is_permanent(&results[0]));
    assert_eq!(status(&results[0]), Some(EnhancedStatus::new(5, 6, 3)));
    assert!(
        !mock.join()[0]
            .commands
            .iter()
            .any(|c| c.starts_with("MAIL"))
    );
}

#[test]
fn long_lines_never_reach_a_strict_mx() {
    let mock = MockMx::start(vec![script(|s| {
        s.greet(&["PIPELINING", "8BITMIME"]);
        s.expect("MAIL FROM:");
        s.reply("250 2.1.0 Ok");
        s.expect("RCPT TO:");
        s.reply("250 2.1.5 Ok");
        s.expect("DATA");
        s.reply("354 go ahead");
        let data = s.read_data();
        let too_long = data.split(|&b| b == b'\n').any(|line| line.len() > 1000);
        if too_long {
            s.reply("500 5.5.0 Line too long");
        } else {
            s.reply("250 2.0.0 Ok");
        }
        s.finish();
    })]);
    let mut body = b"MIME-Version: 1.0\r\nContent-Type: text/html; charset=us-ascii\r\nContent-Transfer-Encoding: 7bit\r\nSubject: long\r\n\r\n<p>".to_vec();
    body.extend(std::iter::repeat_n(b'A', 1500));
    body.extend_from_slice(b"</p>\r\n");
    let body: &'static [u8] = Box::leak(body.into_boxed_slice());
    let results = deliver(mock.addr, TlsMode::None, &["a@example.net"], body).unwrap();
    assert!(is_delivered(&results[0]), "{:?}", results[0]);
    let transcripts = mock.join();
    let text = String::from_utf8_lossy(&transcripts[0].data[0]).into_owned();
    assert!(text.contains("Content-Transfer-Encoding: quoted-printable\r\n"));
    assert!(text.contains("=\r\n"));
    assert_eq!(text.matches('A').count(), 1500);
}

#[test]
fn nul_body_fails_with_5_6_0() {
    let mock = MockMx::start(vec![script(|s| {
        s.greet(&["PIPELINING", "8BITMIME"]);
        s.finish();
    })]);
    let body: &'static [u8] = b"Subject: nul\r\n\r\nab\x00cd\r\nafter-nul\r\n";
    let results = deliver(mock.addr, TlsMode::None, &["a@example.net"], body).unwrap();
    assert!(is_permanent(&results[0]));
    assert_eq!(status(&results[0]), Some(EnhancedStatus::new(5, 6, 0)));
    let transcripts = mock.join();
    assert!(!transcripts[0].raw.contains(&0));
    assert!(
        !transcripts[0]
            .commands
            .iter()
            .any(|c| c.starts_with("MAIL"))
    );
}

// ---------------------------------------------------------------------------
// Addresses and parameters
// ---------------------------------------------------------------------------

#[test]
fn utf8_recipient_without_smtputf8_fails_5_6_7() {
    let mock = MockMx::start(vec![script(|s| {
        s.greet(&["PIPELINING", "8BITMIME"]);
        s.accept_transaction(1);
        s.finish();
    })]);
    let results = deliver(
        mock.addr,
        TlsMode::None,
        &["gr\u{e5}@example.net", "plain@example.net"],
        BODY,
    )
    .unwrap();
    assert!(is_permanent(&results[0]));
    assert_eq!(status(&results[0]), Some(EnhancedStatus::new(5, 6, 7)));
    assert!(is_delivered(&results[1]));
    let transcripts = mock.join();
    let raw = String::from_utf8_lossy(&transcripts[0].raw);
    assert!(!raw.contains("xn--"));
    assert!(!raw.contains("gr\u{e5}"));
    assert_eq!(transcripts[0].commands[1], "MAIL FROM:<app@example.com>");
}

#[test]
fn utf8_recipient_with_smtputf8() {
    let mock = MockMx::start(vec![script(|s| {
        s.greet(&["PIPELINING", "SMTPUTF8", "8BITMIME"]);
        s.accept_transaction(1);
        s.finish();
    })]);
    let results = deliver(mock.addr, TlsMode::None, &["gr\u{e5}@example.net"], BODY).unwrap();
    assert!(is_delivered(&results[0]));
    let transcripts = mock.join();
    assert_eq!(
        transcripts[0].commands[1],
        "MAIL FROM:<app@example.com> SMTPUTF8"
    );
    let expected: &[u8] = b"RCPT TO:<gr\xc3\xa5@example.net>\r\n";
    assert!(
        transcripts[0]
            .raw
            .windows(expected.len())
            .any(|w| w == expected)
    );
}

#[test]
fn quoted_local_parts_sent_exactly() {
    let mock = MockMx::start(vec![script(|s| {
        s.greet(&["PIPELINING"]);
        s.accept_transaction(3);
        s.finish();
    })]);
    let results = deliver(
        mock.addr,
        TlsMode::None,
        &[
            "\"odd user\"@example.net",
            "\"info@\"@example.net",
            "\"a\\\"b\"@example.net",
        ],
        BODY,
    )
    .unwrap();
    assert!(results.iter().all(is_delivered));
    let transcripts = mock.join();
    assert_eq!(
        transcripts[0].commands[1..5],
        [
            "MAIL FROM:<app@example.com>",
            "RCPT TO:<\"odd user\"@example.net>",
            "RCPT TO:<\"info@\"@example.net>",
            "RCPT TO:<\"a\\\"b\"@example.net>",
        ]
    );
}

#[test]
fn dsn_parameters_are_xtext() {
    let mock = MockMx::start(vec![script(|s| {
        s.greet(&["PIPELINING", "DSN"]);
        s.accept_transaction(2);
        s.finish();
    })]);
    let addr = mock.addr;
    let results = run(async move {
        let tls = TlsContext::new(None, true).expect("TLS context");
        let config = test_config();
        let mut connection = Connection::open(&tls, &params(addr, TlsMode::None, &config))
            .await
            .expect("open");
        let recipients = [
            OutboundRecipient {
                address: "user@example.net",
                notify: notify::FAILURE | notify::DELAY,
                orcpt: Some("rfc822;user\n\nevil@example.net"),
            },
            OutboundRecipient {
                address: "quiet@example.net",
                notify: notify::NEVER,
                orcpt: None,
            },
        ];
        let mut outbound = message(&recipients, BODY);
        outbound.envid = Some("abc\r\nX-Injected: yes");
        outbound.ret = Some(Ret::Headers);
        let results = connection.send(&outbound).await.expect("send");
        connection.quit().await;
        results
    });
    assert!(results.iter().all(is_delivered));
    let transcripts = mock.join();
    let commands = &transcripts[0].commands;
    assert_eq!(
        commands[1],
        "MAIL FROM:<app@example.com> RET=HDRS ENVID=abc+0D+0AX-Injected:+20yes"
    );
    assert_eq!(
        commands[2],
        "RCPT TO:<user@example.net> NOTIFY=FAILURE,DELAY ORCPT=rfc822;user+0A+0Aevil@example.net"
    );
    assert_eq!(commands[3], "RCPT TO:<quiet@example.net> NOTIFY=NEVER");
    assert!(!commands.iter().any(|c| c.contains("X-Injected: yes")));
}

#[test]
fn control_characters_in_address_refused() {
    let mock = MockMx::start(vec![script(|s| {
        s.greet(&["PIPELINING"]);
        s.accept_transaction(1);
        s.finish();
    })]);
    let results = deliver(
        mock.addr,
        TlsMode::None,
        &["a@example.net>\r\nRCPT TO:<b@example.net", "ok@example.net"],
        BODY,
    )
    .unwrap();
    assert!(is_permanent(&results[0]));
    assert!(is_delivered(&results[1]));
    let transcripts = mock.join();
    assert!(
        !transcripts[0]
            .commands
            .iter()
            .any(|c| c.contains("b@example.net"))
    );
}

#[test]
fn null_sender_rejected_is_permanent() {
    let mock = MockMx::start(vec![script(|s| {
        s.greet(&["PIPELINING"]);
        s.expect("MAIL FROM:<>");
        s.reply("501 5.1.7 Invalid MAIL FROM address");
        s.expect("RCPT TO:<app@example.com>");
        s.reply("503 5.5.1 need MAIL first");
        s.expect("DATA");
        s.reply("503 5.5.1 need MAIL first");
        s.finish();
    })]);
    let addr = mock.addr;
    let results = run(async move {
        let tls = TlsContext::new(None, true).expect("TLS context");
        let config = test_config();
        let mut connection = Connection::open(&tls, &params(addr, TlsMode::None, &config))
            .await
            .expect("open");
        let recipients = [recipient("app@example.com")];
        let mut bounce = message(&recipients, BODY);
        bounce.sender = "";
        let results = connection.send(&bounce).await.expect("send");
        connection.quit().await;
        results
    });
    assert!(is_permanent(&results[0]));
    assert_eq!(results[0].reply().code, 501);
    let transcripts = mock.join();
    let mails: Vec<&String> = transcripts[0]
        .commands
        .iter()
        .filter(|c| c.starts_with("MAIL"))
        .collect();
    assert_eq!(mails, ["MAIL FROM:<>"]);
}

// ---------------------------------------------------------------------------
// Recipient limits
// ---------------------------------------------------------------------------

fn many_recipients() -> &'static [&'static str] {
    static LIST: OnceLock<Vec<&'static str>> = OnceLock::new();
    LIST.get_or_init(|| {
        (1..=150)
            .map(|n| &*Box::leak(format!("r{n:03}@example.net").into_boxed_str()))
            .collect()
    })
}

fn limit_script(limit_reply: &'static str) -> Script {
    script(move |s| {
        s.greet(&["PIPELINING"]);
        s.expect("MAIL FROM:");
        s.reply("250 2.1.0 Ok");
        for n in 0..150 {
            s.expect("RCPT TO:");
            if n < 100 {
                s.reply("250 2.1.5 Ok");
            } else {
                s.reply(limit_reply);
            }
        }
        s.expect("DATA");
        s.reply("354 go ahead");
        s.read_data();
        s.reply("250 2.0.0 queued as Q1");
        s.expect("RSET");
        s.reply("250 2.0.0 Ok");
        s.accept_transaction(50);
        s.finish();
    })
}

#[test]
fn recipient_limit_splits_transactions() {
    for limit_reply in [
        "452 4.5.3 Too many recipients",
        "552 5.5.3 Maximum limit of 100 recipients reached",
    ] {
        let mock = MockMx::start(vec![limit_script(limit_reply)]);
        let addr = mock.addr;
        let results = deliver(addr, TlsMode::None, many_recipients(), BODY).unwrap();
        assert_eq!(results.len(), 150);
        assert!(results.iter().all(is_delivered), "variant {limit_reply}");
        let transcripts = mock.join();
        let commands = &transcripts[0].commands;
        assert_eq!(transcripts[0].data.len(), 2, "two transactions");
        let rcpts: Vec<&String> = commands.iter().filter(|c| c.starts_with("RCPT")).collect();
        assert_eq!(rcpts.len(), 200);
        let second: Vec<&String> = rcpts[150..].to_vec();
        assert_eq!(second[0], "RCPT TO:<r101@example.net>");
        assert_eq!(second[49], "RCPT TO:<r150@example.net>");
    }
}

#[test]
fn mailbox_full_defers_one_recipient() {
    let mock = MockMx::start(vec![script(|s| {
        s.greet(&["PIPELINING"]);
        s.expect("MAIL FROM:");
        s.reply("250 2.1.0 Ok");
        s.expect("RCPT TO:<a@");
        s.reply("250 2.1.5 Ok");
        s.expect("RCPT TO:<b@");
        s.reply("452 4.2.2 mailbox full");
        s.expect("RCPT TO:<c@");
        s.reply("250 2.1.5 Ok");
        s.expect("DATA");
        s.reply("354 go ahead");
        s.read_data();
        s.reply("250 2.0.0 Ok");
        s.finish();
    })]);
    let results = deliver(
        mock.addr,
        TlsMode::None,
        &["a@example.net", "b@example.net", "c@example.net"],
        BODY,
    )
    .unwrap();
    assert!(is_delivered(&results[0]));
    assert!(is_transient(&results[1]));
    assert_eq!(status(&results[1]), Some(EnhancedStatus::new(4, 2, 2)));
    assert!(is_delivered(&results[2]));
    let transcripts = mock.join();
    assert_eq!(transcripts[0].data.len(), 1);
    assert!(!transcripts[0].commands.iter().any(|c| c == "RSET"));
}

// ---------------------------------------------------------------------------
// 421 and dropped connections
// ---------------------------------------------------------------------------

#[test]
fn reply_421_during_data_defers_all() {
    let mock = MockMx::start(vec![script(|s| {
        s.greet(&["PIPELINING"]);
        s.expect("MAIL FROM:");
        s.reply("250 2.1.0 Ok");
        s.expect("RCPT TO:");
        s.reply("250 2.1.5 Ok");
        s.expect("RCPT TO:");
        s.reply("250 2.1.5 Ok");
        s.expect("DATA");
        s.reply("354 go ahead");
        let mut received = 0usize;
        while received < 64 * 1024 && s.fill() {
            received = s.buffer.len();
        }
        s.reply("421 4.4.2 mx.example.net data timeout - closing connection");
        s.reset_connection();
    })]);
    let mut body = b"Subject: big\r\n\r\n".to_vec();
    for _ in 0..(1 << 20) / 64 {
        body.extend_from_slice(&[b'x'; 62]);
        body.extend_from_slice(b"\r\n");
    }
    let body: &'static [u8] = Box::leak(body.into_boxed_slice());
    let results = deliver(
        mock.addr,
        TlsMode::None,
        &["a@example.net", "b@example.net"],
        body,
    )
    .unwrap();
    assert_eq!(results.len(), 2);
    for result in &results {
        assert!(is_transient(result), "{result:?}");
        assert!(result.reply().is_transient());
    }
    mock.join();
}

#[test]
fn reply_421_at_rcpt_defers_all_without_data() {
    let mock = MockMx::start(vec![script(|s| {
        s.greet(&[]);
        s.expect("MAIL FROM:<app@example.com>");
        s.reply("250 ok");
        s.expect("RCPT TO:<a@example.net>");
        s.reply("250 ok");
        s.expect("RCPT TO:<b@example.net>");
        s.reply("421 4.3.2 System shutting down");
        s.close();
    })]);
    let results = deliver(
        mock.addr,
        TlsMode::None,
        &["a@example.net", "b@example.net"],
        BODY,
    )
    .unwrap();
    for result in &results {
        assert!(is_transient(result));
        assert_eq!(result.reply().code, 421);
    }
    let transcripts = mock.join();
    assert!(!transcripts[0].commands.iter().any(|c| c == "DATA"));
}

#[test]
fn reset_on_live_connection() {
    let mock = MockMx::start(vec![script(|s| {
        s.greet(&["PIPELINING"]);
        s.accept_transaction(1);
        s.expect("RSET");
        s.reply("250 2.0.0 Ok");
        s.accept_transaction(1);
        s.finish();
    })]);
    let addr = mock.addr;
    run(async move {
        let tls = TlsContext::new(None, true).expect("TLS context");
        let config = test_config();
        let mut connection = Connection::open(&tls, &params(addr, TlsMode::None, &config))
            .await
            .expect("open");
        let recipients = [recipient("a@example.net")];
        for round in 0..2 {
            if round > 0 {
                connection.reset().await.expect("RSET on a live connection");
            }
            let results = connection
                .send(&message(&recipients, BODY))
                .await
                .expect("send");
            assert!(is_delivered(&results[0]));
        }
        assert_eq!(connection.messages_sent(), 2);
        connection.quit().await;
    });
    mock.join();
}

/// A pooled connection's stale check goes out with the next transaction:
/// the server reads RSET, MAIL, RCPT and DATA before the client waits for
/// any reply.
#[test]
fn pooled_send_pipelines_rset_mail_rcpt_data() {
    let mock = MockMx::start(vec![script(|s| {
        s.greet(&["PIPELINING"]);
        s.accept_transaction(1);
        s.expect("RSET");
        s.expect("MAIL FROM:<app@example.com>");
        s.expect("RCPT TO:<a@example.net>");
        s.expect("DATA");
        s.send("250 2.0.0 Ok\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go ahead\r\n");
        s.read_data();
        s.reply("250 2.0.0 queued");
        s.finish();
    })]);
    let addr = mock.addr;
    run(async move {
        let tls = TlsContext::new(None, true).expect("TLS context");
        let config = test_config();
        let mut connection = Connection::open(&tls, &params(addr, TlsMode::None, &config))
            .await
            .expect("open");
        let recipients = [recipient("a@example.net")];
        for round in 0..2 {
            if round > 0 {
                connection.check_stale_on_send();
            }
            let results = connection
                .send(&message(&recipients, BODY))
                .await
                .expect("send");
            assert!(is_delivered(&results[0]), "round {round}: {results:?}");
        }
        assert_eq!(connection.messages_sent(), 2);
        connection.quit().await;
    });
    mock.join();
}

/// Sends one message, lets the server close the idle session with 421, then
/// sends again over the pooled connection: the stale check must report
/// it and decide no recipient. `capabilities` picks the check: an RSET
/// leading the pipelined group, or an RSET of its own without PIPELINING.
fn pooled_send_to_closed_session(capabilities: &'static [&'static str]) {
    let mock = MockMx::start(vec![script(move |s| {
        s.greet(capabilities);
        s.accept_transaction(1);
        s.reply("421 4.4.2 mx.example.net command timeout");
        s.close();
    })]);
    let addr = mock.addr;
    run(async move {
        let tls = TlsContext::new(None, true).expect("TLS context");
        let config = test_config();
        let mut connection = Connection::open(&tls, &params(addr, TlsMode::None, &config))
            .await
            .expect("open");
        let recipients = [recipient("a@example.net")];
        let results = connection
            .send(&message(&recipients, BODY))
            .await
            .expect("send");
        assert!(is_delivered(&results[0]));
        assert_eq!(connection.messages_sent(), 1);
        glommio::timer::sleep(Duration::from_millis(200)).await;
        connection.check_stale_on_send();
        let error = connection
            .send(&message(&recipients, BODY))
            .await
            .unwrap_err();
        assert!(matches!(error, SessionError::Stale), "{error:?}");
        assert!(!connection.is_usable());
        assert!(matches!(
            connection.send(&message(&recipients, BODY)).await,
            Err(SessionError::Stale)
        ));
    });
    mock.join();
}

#[test]
fn pooled_send_to_closed_session_is_stale() {
    pooled_send_to_closed_session(&["PIPELINING"]);
}

#[test]
fn pooled_send_unpipelined_stale() {
    pooled_send_to_closed_session(&[]);
}

/// A server may reply to the pipelined DATA with 354 although it rejected
/// every RCPT; the client then ends the empty data phase with a lone dot.
#[test]
fn pipelined_data_rejected_sends_lone_dot() {
    let mock = MockMx::start(vec![script(|s| {
        s.greet(&["PIPELINING"]);
        s.expect("MAIL FROM:");
        s.expect("RCPT TO:<nobody@example.net>");
        s.expect("DATA");
        s.send("250 2.1.0 Ok\r\n550 5.1.1 no such user\r\n354 go ahead\r\n");
        s.expect(".");
        s.reply("554 5.5.1 no valid recipients");
        s.finish();
    })]);
    let results = deliver(mock.addr, TlsMode::None, &["nobody@example.net"], BODY).unwrap();
    assert!(is_permanent(&results[0]), "{results:?}");
    assert_eq!(results[0].reply().code, 550);
    mock.join();
}

fn drop_after_dot(reset: bool) -> Script {
    script(move |s| {
        s.greet(&["PIPELINING"]);
        s.expect("MAIL FROM:");
        s.reply("250 2.1.0 Ok");
        s.expect("RCPT TO:");
        s.reply("250 2.1.5 Ok");
        s.expect("DATA");
        s.reply("354 go ahead");
        s.read_data();
        if reset {
            s.reset_connection();
        } else {
            s.close();
        }
    })
}

#[test]
fn drop_after_dot_defers_with_4_4_2() {
    for reset in [false, true] {
        let mock = MockMx::start(vec![drop_after_dot(reset)]);
        let results = deliver(mock.addr, TlsMode::None, &["a@example.net"], BODY).unwrap();
        assert!(is_transient(&results[0]), "reset={reset}: {:?}", results[0]);
        assert_eq!(status(&results[0]), Some(EnhancedStatus::new(4, 4, 2)));
        mock.join();
    }
}

#[test]
fn reply_250_then_close_is_delivered() {
    let mock = MockMx::start(vec![script(|s| {
        s.greet(&["PIPELINING"]);
        s.accept_transaction(1);
        s.close();
    })]);
    let results = deliver(mock.addr, TlsMode::None, &["a@example.net"], BODY).unwrap();
    assert!(is_delivered(&results[0]));
    assert_eq!(results[0].reply().code, 250);
    mock.join();
}

#[test]
fn data_done_timeout_is_honoured() {
    let mock = MockMx::start(vec![script(|s| {
        s.greet(&["PIPELINING"]);
        s.expect("MAIL FROM:");
        s.reply("250 2.1.0 Ok");
        s.expect("RCPT TO:");
        s.reply("250 2.1.5 Ok");
        s.expect("DATA");
        s.reply("354 go ahead");
        s.read_data();
        // Never reply to the final dot, and wait for the client to give up.
        s.finish();
    })]);
    let addr = mock.addr;
    let (results, elapsed) = run(async move {
        let tls = TlsContext::new(None, true).expect("TLS context");
        let mut config = test_config();
        config.data_done_timeout = ConfigDuration::from_micros(1_500_000);
        let mut connection = Connection::open(&tls, &params(addr, TlsMode::None, &config))
            .await
            .expect("open");
        let recipients = [recipient("a@example.net")];
        let started = std::time::Instant::now();
        let results = connection
            .send(&message(&recipients, BODY))
            .await
            .expect("send");
        let elapsed = started.elapsed();
        connection.quit().await;
        (results, elapsed)
    });
    assert!(is_transient(&results[0]));
    assert_eq!(status(&results[0]), Some(EnhancedStatus::new(4, 4, 2)));
    // The wait is the configured 1.5 s, not the 10 s command timeout.
    assert!(elapsed >= Duration::from_millis(1400), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    mock.join();
}

#[test]
fn size_limit_fails_before_mail() {
    let mock = MockMx::start(vec![script(|s| {
        s.greet(&["PIPELINING", "SIZE 20"]);
        s.finish();
    })]);
    let results = deliver(mock.addr, TlsMode::None, &["a@example.net"], BODY).unwrap();
    assert!(is_permanent(&results[0]));
    assert_eq!(status(&results[0]), Some(EnhancedStatus::new(5, 3, 4)));
    assert!(
        !mock.join()[0]
            .commands
            .iter()
            .any(|c| c.starts_with("MAIL"))
    );
}

#[test]
fn data_without_354_is_not_delivered() {
    let mock = MockMx::start(vec![script(|s| {
        s.greet(&["PIPELINING"]);
        s.expect("MAIL FROM:");
        s.reply("250 2.1.0 Ok");
        s.expect("RCPT TO:");
        s.reply("250 2.1.5 Ok");
        s.expect("DATA");
        // A 2xx where 354 belongs must not count as delivery.
        s.reply("250 2.0.0 Ok");
        s.finish();
    })]);
    let results = deliver(mock.addr, TlsMode::None, &["a@example.net"], BODY).unwrap();
    assert!(is_transient(&results[0]), "{:?}", results[0]);
    let transcripts = mock.join();
    assert!(transcripts[0].data.is_empty());
    assert_eq!(
        transcripts[0].commands.last().map(String::as_str),
        Some("QUIT")
    );
}

#[test]
fn no_pipelining_sends_one_command_at_a_time() {
    let mock = MockMx::start(vec![script(|s| {
        s.greet(&[]);
        s.expect("MAIL FROM:");
        // Nothing else may be buffered before the MAIL reply.
        assert!(s.buffer.is_empty(), "pipelined without PIPELINING");
        s.reply("250 2.1.0 Ok");
        s.expect("RCPT TO:<a@");
        s.reply("550 5.1.1 no");
        s.expect("RCPT TO:<b@");
        s.reply("250 2.1.5 Ok");
        s.expect("DATA");
        s.reply("354 go ahead");
        s.read_data();
        s.reply("250 2.0.0 Ok");
        s.finish();
    })]);
    let results = deliver(
        mock.addr,
        TlsMode::None,
        &["a@example.net", "b@example.net"],
        BODY,
    )
    .unwrap();
    assert!(is_permanent(&results[0]));
    assert!(is_delivered(&results[1]));
    mock.join();
}

// ---------------------------------------------------------------------------
// CHUNKING (RFC 3030), against the scripted receiver

fn chunking_receiver() -> crate::sink::ScriptedReceiver {
    let script = crate::sink::Script {
        chunking: true,
        ..crate::sink::Script::default()
    };
    crate::sink::ScriptedReceiver::start(SocketAddr::from(([127, 0, 0, 1], 0)), script)
        .expect("receiver start")
}

/// With CHUNKING the body goes out as one `BDAT <size> LAST` chunk, without
/// dot-stuffing, and arrives unchanged.
#[test]
fn chunking_sends_the_body_unstuffed_in_one_bdat() {
    let receiver = chunking_receiver();
    let body: &'static [u8] = b"Subject: dots\r\n\r\n.leading dot\r\n..two dots\r\nend\r\n";
    let results = deliver(receiver.addr(), TlsMode::None, &["a@example.net"], body).unwrap();
    assert!(is_delivered(&results[0]), "{results:?}");
    let received = receiver
        .wait_for(1, Duration::from_secs(10))
        .expect("message");
    assert_eq!(received[0].raw, body);
    let commands: Vec<String> = receiver
        .commands()
        .into_iter()
        .map(|command| command.line)
        .collect();
    assert!(
        commands.contains(&format!("BDAT {} LAST", body.len())),
        "{commands:?}"
    );
    assert!(!commands.iter().any(|line| line == "DATA"), "{commands:?}");
}

/// A body whose last line has no CRLF gets one, as after DATA.
#[test]
fn chunking_ends_the_last_line_with_crlf() {
    let receiver = chunking_receiver();
    let body: &'static [u8] = b"Subject: x\r\n\r\nno line end";
    let results = deliver(receiver.addr(), TlsMode::None, &["a@example.net"], body).unwrap();
    assert!(is_delivered(&results[0]), "{results:?}");
    let received = receiver
        .wait_for(1, Duration::from_secs(10))
        .expect("message");
    assert_eq!(received[0].raw, b"Subject: x\r\n\r\nno line end\r\n");
}

/// The server reads the chunk of a transaction whose recipients it
/// rejected, so the rejection is reported and the session stays usable.
#[test]
fn chunking_with_every_recipient_rejected_keeps_the_session() {
    let script = crate::sink::Script {
        chunking: true,
        rcpt: crate::sink::Plan::always(crate::sink::Response::reply(550, "5.1.1 no such user")),
        ..crate::sink::Script::default()
    };
    let receiver =
        crate::sink::ScriptedReceiver::start(SocketAddr::from(([127, 0, 0, 1], 0)), script)
            .expect("receiver start");
    let addr = receiver.addr();
    let (first, second, usable) = run(async move {
        let tls = TlsContext::new(None, true).expect("TLS context");
        let config = test_config();
        let mut connection = Connection::open(&tls, &params(addr, TlsMode::None, &config))
            .await
            .expect("open");
        let recipients = [recipient("nobody@example.net")];
        let first = connection.send(&message(&recipients, BODY)).await.unwrap();
        connection.check_stale_on_send();
        let second = connection.send(&message(&recipients, BODY)).await.unwrap();
        let usable = connection.is_usable();
        connection.quit().await;
        (first, second, usable)
    });
    for results in [&first, &second] {
        assert!(is_permanent(&results[0]), "{results:?}");
        assert_eq!(results[0].reply().code, 550);
    }
    assert!(usable);
}

/// A 421 in the middle of the RCPT replies ends the session, but the
/// recipients the server refused before it keep their refusal: they bounce
/// instead of waiting for a retry. Both the DATA and the BDAT path.
#[test]
fn rejections_before_a_421_at_rcpt_are_kept() {
    for chunking in [false, true] {
        let script = crate::sink::Script {
            chunking,
            recipients: vec![
                (
                    "gone@example.net".into(),
                    crate::sink::Plan::always(crate::sink::Response::reply(
                        550,
                        "5.1.1 no such user",
                    )),
                ),
                (
                    "later@example.net".into(),
                    crate::sink::Plan::always(crate::sink::Response::Close421),
                ),
            ],
            ..crate::sink::Script::default()
        };
        let receiver =
            crate::sink::ScriptedReceiver::start(SocketAddr::from(([127, 0, 0, 1], 0)), script)
                .expect("receiver start");
        let results = deliver(
            receiver.addr(),
            TlsMode::None,
            &["gone@example.net", "later@example.net"],
            BODY,
        )
        .unwrap();
        assert!(
            is_permanent(&results[0]),
            "chunking {chunking}: {results:?}"
        );
        assert_eq!(results[0].reply().code, 550);
        assert!(
            is_transient(&results[1]),
            "chunking {chunking}: {results:?}"
        );
        assert_eq!(results[1].reply().code, 421);
    }
}
