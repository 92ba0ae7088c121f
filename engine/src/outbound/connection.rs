//! Opening a session: connect, greeting, EHLO, STARTTLS per the TLS mode.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use caduceus_policy::TlsMode;
use caduceus_policy::config::DeliveryConfig;
use futures_rustls::TlsConnector;
use rustls::pki_types::ServerName;
use rustls::{HandshakeKind, ProtocolVersion};

use super::error::{SessionError, Stage};
use super::io::{SmtpStream, Transport, connect, with_timeout};
use super::reply::Capabilities;
use super::tls::TlsContext;
use crate::smtp::Reply;

/// How long QUIT waits for its reply before the connection is closed anyway.
const QUIT_TIMEOUT: Duration = Duration::from_secs(5);

/// The target, source address, EHLO name, TLS mode and timeouts of a new
/// connection.
#[derive(Clone, Copy, Debug)]
pub struct ConnectParams<'a> {
    /// The MX host name, used for SNI, certificate checks and logs.
    pub mx_host: &'a str,
    pub addr: SocketAddr,
    /// The local address to bind before connecting; `None` lets the kernel
    /// choose.
    pub source: Option<IpAddr>,
    /// The name sent in EHLO and HELO.
    pub helo: &'a str,
    pub tls_mode: TlsMode,
    pub timeouts: &'a DeliveryConfig,
}

/// The TLS session of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsInfo {
    /// `"TLSv1.3"` or `"TLSv1.2"`.
    pub version: &'static str,
    /// The negotiated cipher suite, as rustls names it.
    pub cipher: String,
    /// True when the session was resumed from this core's session cache.
    pub resumed: bool,
}

/// Timeouts of one session, copied out of the config.
#[derive(Clone, Copy, Debug)]
pub(super) struct Timeouts {
    pub connect: Duration,
    pub greeting: Duration,
    pub command: Duration,
    pub data_done: Duration,
}

impl Timeouts {
    fn from_config(config: &DeliveryConfig) -> Timeouts {
        Timeouts {
            connect: config.connect_timeout.get(),
            greeting: config.greeting_timeout.get(),
            command: config.command_timeout.get(),
            data_done: config.data_done_timeout.get(),
        }
    }
}

/// An open SMTP session with one MX host, ready for a transaction.
pub struct Connection {
    pub(super) stream: SmtpStream,
    pub(super) capabilities: Capabilities,
    pub(super) timeouts: Timeouts,
    pub(super) remote_host: String,
    pub(super) remote_addr: SocketAddr,
    pub(super) tls: Option<TlsInfo>,
    pub(super) messages_sent: u32,
    /// Set when the last transaction ended after an accepted MAIL but
    /// without a completed DATA, so the server still holds its state; the
    /// next `send` starts with RSET (RFC 5321 §4.1.1.5).
    pub(super) needs_rset: bool,
    /// Set by [`Connection::check_stale_on_send`]: the next `send` first
    /// checks with RSET that the session is still open on the server.
    pub(super) check_stale: bool,
    /// The RCPT replies read before a 421 closed the session in the middle
    /// of the RCPTs, after an accepted MAIL; see `closed_during_rcpt`.
    pub(super) replies_before_close: Vec<Reply>,
    /// Set once the session can no longer be used; later calls return it.
    pub(super) failed: Option<SessionError>,
    /// The bound source address, when `ConnectParams::source` set one.
    pub(super) source: Option<std::net::IpAddr>,
    /// A value the caller ties to the connection's life, such as a slot
    /// of a per-source connection limit, released when it is dropped.
    pub(super) guard: Option<Box<dyn std::any::Any>>,
}

/// Whether this attempt may use STARTTLS. The cleartext retry of
/// `opportunistic-fallback` skips it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum StartTls {
    Allowed,
    Skip,
}

impl Connection {
    /// Connects (binding `source` when set), reads the greeting, sends EHLO
    /// (HELO when EHLO gets a 5xx), upgrades with STARTTLS per the TLS mode,
    /// and sends EHLO again inside TLS.
    ///
    /// A 421 or 5xx greeting is an error whose `try_next_mx()` is true.
    /// Under `opportunistic-fallback`, a failed handshake is followed by a
    /// new connection without STARTTLS (RFC 7435 opportunistic security),
    /// because the first connection's state is undefined after the failure.
    pub async fn open(
        tls: &TlsContext,
        params: &ConnectParams<'_>,
    ) -> Result<Connection, SessionError> {
        if params.helo.bytes().any(|byte| byte.is_ascii_control()) {
            return Err(SessionError::Local {
                stage: Stage::Ehlo,
                detail: "the EHLO name contains control characters".to_string(),
            });
        }
        match Self::open_once(tls, params, StartTls::Allowed).await {
            Err(SessionError::TlsHandshake { detail })
                if params.tls_mode == TlsMode::OpportunisticFallback =>
            {
                tracing::warn!(
                    mx_host = params.mx_host,
                    addr = %params.addr,
                    %detail,
                    "TLS failed, retried in cleartext"
                );
                Self::open_once(tls, params, StartTls::Skip).await
            }
            other => other,
        }
    }

    async fn open_once(
        tls: &TlsContext,
        params: &ConnectParams<'_>,
        starttls: StartTls,
    ) -> Result<Connection, SessionError> {
        let timeouts = Timeouts::from_config(params.timeouts);
        let tcp = connect(params.addr, params.source, timeouts.connect).await?;
        let mut stream = SmtpStream::new(tcp);

        // RFC 5321 §4.2.1: the client acts only on the last line of a
        // multi-line greeting; read_reply returns only complete replies.
        let greeting = stream
            .read_reply(Stage::Greeting, timeouts.greeting)
            .await?;
        if greeting.code != 220 {
            if !greeting.is_transient() && !greeting.is_permanent() {
                stream.close(QUIT_TIMEOUT).await;
                return Err(SessionError::RemoteMisbehaved {
                    stage: Stage::Greeting,
                    detail: format!("unexpected greeting: {greeting}"),
                });
            }
            if greeting.is_permanent() {
                // RFC 5321 §3.1: after a 554 greeting the client sends QUIT.
                let _ = stream
                    .write_all(b"QUIT\r\n", Stage::Quit, QUIT_TIMEOUT)
                    .await;
            }
            stream.close(QUIT_TIMEOUT).await;
            return Err(SessionError::RemoteRejected {
                stage: Stage::Greeting,
                reply: greeting,
            });
        }

        let mut connection = Connection {
            stream,
            capabilities: Capabilities::default(),
            timeouts,
            remote_host: params.mx_host.to_string(),
            remote_addr: params.addr,
            tls: None,
            messages_sent: 0,
            needs_rset: false,
            check_stale: false,
            replies_before_close: Vec::new(),
            failed: None,
            source: params.source,
            guard: None,
        };
        connection.hello(params.helo).await?;

        let wants_tls = params.tls_mode != TlsMode::None && starttls == StartTls::Allowed;
        if wants_tls {
            connection = connection.start_tls(tls, params).await?;
        }
        if connection.tls.is_none() && params.tls_mode != TlsMode::None {
            tracing::info!(
                mx_host = params.mx_host,
                addr = %params.addr,
                tls_mode = params.tls_mode.as_str(),
                "outbound: delivering in cleartext"
            );
        }
        Ok(connection)
    }

    /// Sends EHLO, or HELO after a 5xx to EHLO (RFC 5321 §3.2), and stores
    /// the server's extensions.
    async fn hello(&mut self, helo: &str) -> Result<(), SessionError> {
        let command = format!("EHLO {helo}\r\n");
        let reply = self.command(command.as_bytes(), Stage::Ehlo).await?;
        if reply.code == 250 {
            self.capabilities = Capabilities::from_ehlo(&reply);
            return Ok(());
        }
        if reply.is_transient() {
            return Err(SessionError::RemoteRejected {
                stage: Stage::Ehlo,
                reply,
            });
        }
        if !reply.is_permanent() {
            return Err(SessionError::RemoteMisbehaved {
                stage: Stage::Ehlo,
                detail: format!("unexpected reply to EHLO: {reply}"),
            });
        }
        let command = format!("HELO {helo}\r\n");
        let reply = self.command(command.as_bytes(), Stage::Ehlo).await?;
        if !reply.is_transient() && !reply.is_permanent() && reply.code != 250 {
            return Err(SessionError::RemoteMisbehaved {
                stage: Stage::Ehlo,
                detail: format!("unexpected reply to HELO: {reply}"),
            });
        }
        if reply.code != 250 {
            return Err(SessionError::RemoteRejected {
                stage: Stage::Ehlo,
                reply,
            });
        }
        self.capabilities = Capabilities {
            helo_only: true,
            ..Capabilities::default()
        };
        Ok(())
    }

    /// Runs STARTTLS (RFC 3207) and the handshake, then EHLO again, since
    /// the server's extensions may differ inside TLS (§4.2).
    async fn start_tls(
        mut self,
        tls: &TlsContext,
        params: &ConnectParams<'_>,
    ) -> Result<Connection, SessionError> {
        let strict = matches!(params.tls_mode, TlsMode::Required | TlsMode::Verified);
        if !self.capabilities.starttls {
            if strict {
                self.quit_quietly().await;
                return Err(SessionError::RemoteIncompatible {
                    starttls_offered: false,
                    detail: "STARTTLS not offered".to_string(),
                });
            }
            return Ok(self);
        }

        let reply = self.command(b"STARTTLS\r\n", Stage::StartTls).await?;
        if reply.code != 220 {
            if reply.code == 421 {
                return Err(SessionError::RemoteRejected {
                    stage: Stage::StartTls,
                    reply,
                });
            }
            if strict {
                self.quit_quietly().await;
                return Err(SessionError::RemoteIncompatible {
                    starttls_offered: true,
                    detail: format!("STARTTLS refused: {reply}"),
                });
            }
            // RFC 3207 §4: a refused STARTTLS leaves the session as it was,
            // so the opportunistic modes continue in cleartext here.
            tracing::info!(
                mx_host = params.mx_host,
                addr = %params.addr,
                reply = %reply,
                "STARTTLS refused, continuing in cleartext"
            );
            return Ok(self);
        }

        // Bytes after the 220 and before the handshake were not protected
        // by TLS; a man in the middle could have injected them. RFC 3207 §4.2
        // requires discarding such state, and the safe discard is to drop
        // the connection.
        if self.stream.has_buffered_input() {
            self.stream.close(QUIT_TIMEOUT).await;
            return Err(SessionError::RemoteMisbehaved {
                stage: Stage::StartTls,
                detail: "plaintext received after the 220 reply to STARTTLS".to_string(),
            });
        }
        let Transport::Plain(tcp) = self.stream.transport else {
            return Err(SessionError::RemoteMisbehaved {
                stage: Stage::StartTls,
                detail: "STARTTLS offered inside TLS".to_string(),
            });
        };

        let verify = params.tls_mode == TlsMode::Verified;
        let server_name = match ServerName::try_from(params.mx_host.to_string()) {
            Ok(name) => name,
            Err(_) if !verify => ServerName::IpAddress(params.addr.ip().into()),
            Err(error) => {
                return Err(SessionError::RemoteIncompatible {
                    starttls_offered: true,
                    detail: format!(
                        "MX host name {:?} is not a valid DNS name: {error}",
                        params.mx_host
                    ),
                });
            }
        };
        let connector = TlsConnector::from(tls.config(verify));
        let handshake =
            with_timeout(self.timeouts.command, connector.connect(server_name, tcp)).await;
        let tls_stream = match handshake {
            Some(Ok(stream)) => stream,
            Some(Err(error)) => {
                let detail = error.to_string();
                return Err(if strict {
                    SessionError::RemoteIncompatible {
                        starttls_offered: true,
                        detail: format!("TLS handshake failed: {detail}"),
                    }
                } else {
                    SessionError::TlsHandshake { detail }
                });
            }
            None => {
                let detail = "timed out".to_string();
                return Err(if strict {
                    SessionError::RemoteIncompatible {
                        starttls_offered: true,
                        detail: "TLS handshake timed out".to_string(),
                    }
                } else {
                    SessionError::TlsHandshake { detail }
                });
            }
        };

        let (_, session) = tls_stream.get_ref();
        let resumed = session.handshake_kind() == Some(HandshakeKind::Resumed);
        let version = match session.protocol_version() {
            Some(ProtocolVersion::TLSv1_3) => "TLSv1.3",
            _ => "TLSv1.2",
        };
        let cipher = session
            .negotiated_cipher_suite()
            .map(|suite| format!("{:?}", suite.suite()))
            .unwrap_or_default();
        tls.count_handshake(resumed);
        tracing::debug!(
            mx_host = params.mx_host,
            addr = %params.addr,
            version,
            cipher = %cipher,
            resumed,
            "TLS established"
        );
        self.tls = Some(TlsInfo {
            version,
            cipher,
            resumed,
        });
        self.stream.transport = Transport::Tls(Box::new(tls_stream));
        self.hello(params.helo).await?;
        Ok(self)
    }

    /// Sends one command line and reads its reply under the command timeout.
    pub(super) async fn command(
        &mut self,
        line: &[u8],
        stage: Stage,
    ) -> Result<Reply, SessionError> {
        debug_assert!(line.ends_with(b"\r\n"));
        self.stream
            .write_all(line, stage, self.timeouts.command)
            .await?;
        self.stream.read_reply(stage, self.timeouts.command).await
    }

    /// Makes the next [`Connection::send`] start with RSET, for a
    /// connection taken from the pool. With PIPELINING the RSET goes out in
    /// the same write as MAIL, RCPT and DATA, which saves a round trip per
    /// message. When the RSET gets 421, no reply or a failed write, `send`
    /// returns [`SessionError::Stale`] and the caller reconnects without
    /// counting a delivery attempt, because the server closed the session
    /// before it read any of the message's commands.
    pub fn check_stale_on_send(&mut self) {
        self.check_stale = true;
    }

    /// Sends RSET before the connection is reused for another message.
    ///
    /// A 421 or EOF here means the server closed the session while the
    /// connection was idle in the pool, since RFC 5321 §3.8 lets the 421
    /// arrive before any command. That returns [`SessionError::Stale`], and
    /// the caller reconnects without counting a delivery attempt.
    pub async fn reset(&mut self) -> Result<(), SessionError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        let result = match self.command(b"RSET\r\n", Stage::Rset).await {
            Ok(reply) if reply.code == 250 => return Ok(()),
            Ok(reply) if reply.code == 421 => SessionError::Stale,
            Ok(reply) => SessionError::RemoteMisbehaved {
                stage: Stage::Rset,
                detail: format!("unexpected reply to RSET: {reply}"),
            },
            Err(SessionError::ConnectionLost { .. }) => SessionError::Stale,
            Err(error) => error,
        };
        tracing::debug!(
            mx_host = %self.remote_host,
            addr = %self.remote_addr,
            error = %result,
            "pooled connection is no longer usable"
        );
        self.failed = Some(result.clone());
        Err(result)
    }

    /// Ends the session with QUIT (RFC 5321 §4.1.1.10) and closes it.
    pub async fn quit(mut self) {
        self.quit_quietly().await;
    }

    async fn quit_quietly(&mut self) {
        if self.failed.is_none()
            && self
                .stream
                .write_all(b"QUIT\r\n", Stage::Quit, QUIT_TIMEOUT)
                .await
                .is_ok()
        {
            let _ = self.stream.read_reply(Stage::Quit, QUIT_TIMEOUT).await;
        }
        self.stream.close(QUIT_TIMEOUT).await;
    }

    pub fn tls(&self) -> Option<&TlsInfo> {
        self.tls.as_ref()
    }

    pub fn remote_host(&self) -> &str {
        &self.remote_host
    }

    pub fn remote_addr(&self) -> SocketAddr {
        self.remote_addr
    }

    /// Returns the source address the connection was bound to, if any.
    pub fn source(&self) -> Option<std::net::IpAddr> {
        self.source
    }

    /// Ties `guard` to this connection: it is dropped with the connection.
    pub fn attach_guard(&mut self, guard: Box<dyn std::any::Any>) {
        self.guard = Some(guard);
    }

    /// Returns the number of `send` calls that completed at least one
    /// transaction on this connection.
    pub fn messages_sent(&self) -> u32 {
        self.messages_sent
    }

    /// Returns the extensions the server offered in its last EHLO reply.
    pub fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    /// False once the session failed; the caller then opens a new one.
    pub fn is_usable(&self) -> bool {
        self.failed.is_none()
    }
}
