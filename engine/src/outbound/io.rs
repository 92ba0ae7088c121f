//! The I/O boundary of the SMTP client: connecting from a chosen source
//! address, the plaintext or TLS transport, and reading replies under a
//! deadline.
//!
//! glommio 0.9 `TcpStream::connect` always lets the kernel pick the source
//! address. Per-lane source addresses need `bind` before `connect`, so with a
//! source address the client builds the socket with socket2, binds it, and
//! starts a non-blocking connect. glommio 0.9 offers no way to wait for a
//! foreign descriptor to become writable, so the client checks the socket on
//! a glommio timer that backs off from 1 ms to 32 ms. The executor keeps
//! running meanwhile, and the check adds at most 32 ms to a connect. The
//! connected descriptor is then handed to glommio, which does all further
//! I/O through io_uring. Two rejected options: connecting on glommio's
//! blocking-thread pool, which has one thread per executor and so would
//! serialize every connect of a core behind the slowest, and a vendored
//! glommio patch, which would have to be carried across glommio updates.
//! Without a source address the client uses glommio's own connect.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_lite::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use futures_rustls::client::TlsStream;
use glommio::net::TcpStream;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::error::{SessionError, Stage};
use super::reply::parse_reply;
use crate::smtp::Reply;

/// Runs `future` with a deadline. Returns `None` when the deadline passes
/// first; the future is dropped then, so the caller must treat the
/// connection as unusable.
pub async fn with_timeout<T>(duration: Duration, future: impl Future<Output = T>) -> Option<T> {
    futures_lite::future::or(async { Some(future.await) }, async {
        glommio::timer::sleep(duration).await;
        None
    })
    .await
}

/// The maximum pause between two checks of a pending connect.
const MAX_CONNECT_CHECK_INTERVAL: Duration = Duration::from_millis(32);

/// Opens a TCP connection to `addr`, bound to `source` when set. A zero
/// `timeout` means no limit beyond the kernel's own SYN retries.
pub async fn connect(
    addr: SocketAddr,
    source: Option<IpAddr>,
    timeout: Duration,
) -> Result<TcpStream, SessionError> {
    let stream = match source {
        None => connect_unbound(addr, timeout).await?,
        Some(source) => connect_bound(addr, source, timeout).await?,
    };
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%addr, %error, "outbound: failed to set TCP_NODELAY");
    }
    Ok(stream)
}

fn connect_error(error: io::Error) -> SessionError {
    if error.kind() == io::ErrorKind::TimedOut {
        SessionError::Timeout {
            stage: Stage::Connect,
        }
    } else {
        SessionError::ConnectionLost {
            stage: Stage::Connect,
            detail: error.to_string(),
        }
    }
}

async fn connect_unbound(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, SessionError> {
    let result = if timeout.is_zero() {
        TcpStream::connect(addr).await
    } else {
        TcpStream::connect_timeout(addr, timeout).await
    };
    result.map_err(|error| connect_error(io::Error::from(error)))
}

async fn connect_bound(
    addr: SocketAddr,
    source: IpAddr,
    timeout: Duration,
) -> Result<TcpStream, SessionError> {
    let local_error = |what: &str, error: io::Error| SessionError::Local {
        stage: Stage::Connect,
        detail: format!("{what}: {error}"),
    };
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(|error| local_error("failed to create socket", error))?;
    socket
        .bind(&SockAddr::from(SocketAddr::new(source, 0)))
        .map_err(|error| local_error(&format!("failed to bind source address {source}"), error))?;
    socket
        .set_nonblocking(true)
        .map_err(|error| local_error("failed to set O_NONBLOCK", error))?;

    match socket.connect(&SockAddr::from(addr)) {
        Ok(()) => {}
        Err(error) if error.raw_os_error() == Some(libc::EINPROGRESS) => {
            wait_connected(&socket, timeout).await?;
        }
        Err(error) => return Err(connect_error(error)),
    }
    // glommio creates its own sockets in blocking mode and drives them
    // through io_uring, so the descriptor goes back to blocking mode too.
    socket
        .set_nonblocking(false)
        .map_err(|error| local_error("failed to clear O_NONBLOCK", error))?;

    let fd = socket.into_raw_fd();
    // SAFETY: `fd` comes from `into_raw_fd` on a connected TCP socket that we
    // own, so it is open, of the right type, and has no other owner. glommio's
    // `TcpStream` takes over closing it. The risk is a double close, which
    // cannot happen because `into_raw_fd` consumed the socket2 value.
    Ok(unsafe { TcpStream::from_raw_fd(fd) })
}

/// Waits until a non-blocking connect finishes, checking the socket on a
/// timer with exponential back-off.
async fn wait_connected(socket: &Socket, timeout: Duration) -> Result<(), SessionError> {
    let started = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        // SO_ERROR reports a failed connect, such as ECONNREFUSED.
        match socket.take_error() {
            Ok(None) => {}
            Ok(Some(error)) | Err(error) => return Err(connect_error(error)),
        }
        // getpeername succeeds once the handshake has completed.
        match socket.peer_addr() {
            Ok(_) => return Ok(()),
            Err(error) if error.raw_os_error() == Some(libc::ENOTCONN) => {}
            Err(error) => return Err(connect_error(error)),
        }
        if !timeout.is_zero() && started.elapsed() >= timeout {
            return Err(SessionError::Timeout {
                stage: Stage::Connect,
            });
        }
        glommio::timer::sleep(pause).await;
        pause = (pause * 2).min(MAX_CONNECT_CHECK_INTERVAL);
    }
}

/// The byte stream of a session: plaintext TCP, or TLS after STARTTLS.
pub enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            Transport::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            Transport::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(stream) => Pin::new(stream).poll_flush(cx),
            Transport::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(stream) => Pin::new(stream).poll_close(cx),
            Transport::Tls(stream) => Pin::new(stream.as_mut()).poll_close(cx),
        }
    }
}

/// Size of each read from the socket.
const READ_CHUNK_BYTES: usize = 4096;

/// A transport with a buffer of received bytes not yet parsed as replies.
pub struct SmtpStream {
    pub transport: Transport,
    received: Vec<u8>,
}

impl SmtpStream {
    pub fn new(stream: TcpStream) -> SmtpStream {
        SmtpStream {
            transport: Transport::Plain(stream),
            received: Vec::with_capacity(READ_CHUNK_BYTES),
        }
    }

    /// True when bytes arrived that no reply has consumed yet.
    pub fn has_buffered_input(&self) -> bool {
        !self.received.is_empty()
    }

    /// Reads one complete reply, waiting at most `timeout` for all of it.
    pub async fn read_reply(
        &mut self,
        stage: Stage,
        timeout: Duration,
    ) -> Result<Reply, SessionError> {
        match with_timeout(timeout, self.read_reply_inner(stage)).await {
            Some(result) => result,
            None => Err(SessionError::Timeout { stage }),
        }
    }

    async fn read_reply_inner(&mut self, stage: Stage) -> Result<Reply, SessionError> {
        let mut chunk = [0u8; READ_CHUNK_BYTES];
        loop {
            match parse_reply(&self.received) {
                Ok(Some((reply, used))) => {
                    self.received.drain(..used);
                    return Ok(reply);
                }
                Ok(None) => {}
                Err(error) => {
                    return Err(SessionError::RemoteMisbehaved {
                        stage,
                        detail: error.to_string(),
                    });
                }
            }
            let count = self.transport.read(&mut chunk).await.map_err(|error| {
                SessionError::ConnectionLost {
                    stage,
                    detail: error.to_string(),
                }
            })?;
            if count == 0 {
                return Err(SessionError::ConnectionLost {
                    stage,
                    detail: "connection closed by remote server".to_string(),
                });
            }
            self.received.extend_from_slice(&chunk[..count]);
        }
    }

    /// Writes `bytes` and flushes them, waiting at most `timeout`.
    pub async fn write_all(
        &mut self,
        bytes: &[u8],
        stage: Stage,
        timeout: Duration,
    ) -> Result<(), SessionError> {
        let write = async {
            self.transport.write_all(bytes).await?;
            self.transport.flush().await
        };
        match with_timeout(timeout, write).await {
            Some(Ok(())) => Ok(()),
            Some(Err(error)) => Err(SessionError::ConnectionLost {
                stage,
                detail: error.to_string(),
            }),
            None => Err(SessionError::Timeout { stage }),
        }
    }

    /// Closes the write side, ignoring errors: the session is over either way.
    pub async fn close(&mut self, timeout: Duration) {
        let _ = with_timeout(timeout, self.transport.close()).await;
    }
}
