//! The HTTP endpoint for `/metrics`, `/healthz` and `/readyz`.
//!
//! The design prefers hyper for HTTP. Here a small HTTP/1.1 server on a
//! plain std thread is used instead, for three reasons:
//! - the endpoint runs on a plain thread kept to the control plane's CPUs,
//!   away from the transactional executors, and hyper there would need an
//!   async runtime of its own (smol-hyper and async-io), which the
//!   workspace does not carry;
//! - it serves three fixed GET paths with no request body, no keep-alive
//!   and no TLS, so the parsing is the request line and a bounded header
//!   block;
//! - the listener should be bound to loopback, and each connection is
//!   bounded: [`MAX_REQUEST_BYTES`] of request head and a
//!   [`CLIENT_TIMEOUT`] on reads and writes, after which it is closed.
//!
//! Connections are served one at a time, which suits a scraper that polls
//! every few seconds. A slow client holds the endpoint for at most the
//! timeout.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Duration;

use super::Registry;
use super::exposition::{Totals, render};

/// The maximum size of a request head; a longer one gets 431.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Read and write timeout per connection.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the accept loop checks for shutdown when idle.
const ACCEPT_POLL: Duration = Duration::from_millis(20);

/// Binds `address` and serves it on a new thread until the registry's
/// shutdown flag is set. The thread is kept to `cpus`, the control plane's
/// CPUs, which never include a transactional one. Empty `cpus` leaves it
/// unpinned.
pub fn start(
    address: std::net::SocketAddr,
    registry: Arc<Registry>,
    cpus: Vec<usize>,
) -> Result<JoinHandle<()>, String> {
    if !address.ip().is_loopback() {
        tracing::warn!(%address, "metrics: listening on a non-loopback address; the endpoint has no authentication");
    }
    let listener = TcpListener::bind(address).map_err(|error| {
        format!("cannot bind the metrics endpoint {address}: {error}; change [metrics] listen or free the port")
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|error| format!("metrics listener: {error}"))?;
    tracing::info!(%address, "metrics: serving /metrics, /healthz and /readyz");
    std::thread::Builder::new()
        .name("caduceus-metrics".into())
        .spawn(move || {
            if !cpus.is_empty() {
                crate::runtime::pin_current_thread(&cpus);
            }
            serve(listener, registry)
        })
        .map_err(|error| format!("cannot start the metrics thread: {error}"))
}

fn serve(listener: TcpListener, registry: Arc<Registry>) {
    let mut totals = Totals::new(registry.cores.len());
    while !registry.shutdown.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((stream, peer)) => {
                if let Err(error) = handle(stream, &registry, &mut totals) {
                    tracing::debug!(%peer, %error, "metrics: connection failed");
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(ACCEPT_POLL);
            }
            Err(error) => {
                tracing::warn!(%error, "metrics: accept failed");
                std::thread::sleep(ACCEPT_POLL);
            }
        }
    }
}

fn handle(mut stream: TcpStream, registry: &Registry, totals: &mut Totals) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    // RFC 9112 §2.1: the request head ends at the first empty line.
    while !head.windows(4).any(|window| window == b"\r\n\r\n")
        && !head.windows(2).any(|window| window == b"\n\n")
    {
        if head.len() >= MAX_REQUEST_BYTES {
            respond(
                &mut stream,
                431,
                "text/plain",
                "request head too large\n",
                false,
            )?;
            discard_input(&mut stream);
            return Ok(());
        }
        let read = stream.read(&mut chunk)?;
        if read == 0 {
            return Ok(());
        }
        head.extend_from_slice(&chunk[..read]);
    }
    let line_end = head
        .iter()
        .position(|byte| *byte == b'\n')
        .unwrap_or(head.len());
    let request_line = String::from_utf8_lossy(&head[..line_end]);
    let mut parts = request_line.trim_end().split(' ');
    let (method, target, version) = (parts.next(), parts.next(), parts.next());
    let (Some(method), Some(target), Some(version)) = (method, target, version) else {
        return respond(
            &mut stream,
            400,
            "text/plain",
            "malformed request line\n",
            false,
        );
    };
    if !version.starts_with("HTTP/1.") {
        return respond(&mut stream, 505, "text/plain", "HTTP/1.x only\n", false);
    }
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        return respond(&mut stream, 405, "text/plain", "only GET and HEAD\n", false);
    }
    let path = target.split('?').next().unwrap_or(target);
    match path {
        "/metrics" => {
            totals.drain(registry);
            let body = render(registry, totals);
            respond(
                &mut stream,
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                &body,
                head_only,
            )
        }
        "/healthz" => respond(&mut stream, 200, "text/plain", "ok\n", head_only),
        "/readyz" => {
            if registry.is_ready() {
                respond(&mut stream, 200, "text/plain", "ready\n", head_only)
            } else {
                respond(&mut stream, 503, "text/plain", "not ready\n", head_only)
            }
        }
        _ => respond(
            &mut stream,
            404,
            "text/plain",
            "not found; try /metrics, /healthz or /readyz\n",
            head_only,
        ),
    }
}

/// Reads and drops what the client still sends (up to 64 KiB, for at most
/// 100 ms), so that closing the socket with unread input does not reset
/// the connection before the client reads the error response.
fn discard_input(stream: &mut TcpStream) {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buffer = [0u8; 4096];
    let mut total_bytes = 0;
    while total_bytes < 64 * 1024 {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(read) => total_bytes += read,
        }
    }
}

fn respond(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &str,
    head_only: bool,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "HTTP Version Not Supported",
    };
    let mut response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if status == 405 {
        response.push_str("Allow: GET, HEAD\r\n");
    }
    response.push_str("\r\n");
    if !head_only {
        response.push_str(body);
    }
    stream.write_all(response.as_bytes())?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    fn get(address: std::net::SocketAddr, request: &str) -> String {
        let mut stream = TcpStream::connect(address).unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    }

    #[test]
    fn serves_three_paths_and_rejects_others() {
        let shutdown = Arc::new(AtomicBool::new(false));
        let registry = Registry::new(vec![0], shutdown.clone());
        registry.cores[0]
            .lane(caduceus_policy::Lane::Bulk)
            .delivered
            .store(7, Ordering::Relaxed);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        drop(listener);
        let thread = start(address, registry.clone(), Vec::new()).unwrap();

        let metrics = get(address, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(metrics.starts_with("HTTP/1.1 200 OK"), "{metrics}");
        assert!(metrics.contains("text/plain; version=0.0.4"), "{metrics}");
        assert!(
            metrics.contains("caduceus_recipients_delivered_total{core=\"0\",lane=\"bulk\"} 7"),
            "{metrics}"
        );
        assert!(get(address, "GET /healthz HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 200"));
        assert!(get(address, "GET /readyz HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 503"));
        registry.cores[0].ready.store(true, Ordering::Release);
        assert!(get(address, "GET /readyz HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 200"));
        assert!(get(address, "GET /nope HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        assert!(get(address, "POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
        assert!(get(address, "garbage\r\n\r\n").starts_with("HTTP/1.1 400"));
        let long = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(10_000));
        assert!(get(address, &long).starts_with("HTTP/1.1 431"));

        shutdown.store(true, Ordering::Release);
        thread.join().unwrap();
    }
}
