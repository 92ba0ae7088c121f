//! Small helpers shared by the peers: free ports, timestamps, polling.

use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// First port of the range `free_port` picks from: below Linux's default
/// ephemeral range (32768-60999, `net.ipv4.ip_local_port_range`), so that
/// no outgoing connection of a concurrently running test is given the
/// port between this call and the caller's bind.
const PORT_RANGE_START: u16 = 20_000;
const PORT_RANGE_SIZE: u16 = 12_000;

/// Picks a TCP port on `ip` that is free at the time of the call.
///
/// The port is probed by binding it and closing the socket again, so the
/// caller binds it a moment later. Ports come from below the kernel's
/// ephemeral range, starting at an offset drawn from the clock and the
/// process id, so that only another explicit bind can take the port in
/// between; tests also give each peer its own 127.0.0.x address.
pub fn free_port(ip: IpAddr) -> io::Result<u16> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let seed = micros_since_epoch() as u32 ^ std::process::id().wrapping_mul(2_654_435_761);
    for _ in 0..PORT_RANGE_SIZE {
        let step = NEXT.fetch_add(7_919, Ordering::Relaxed);
        let port = PORT_RANGE_START + (seed.wrapping_add(step) % u32::from(PORT_RANGE_SIZE)) as u16;
        if TcpListener::bind(SocketAddr::new(ip, port)).is_ok() {
            return Ok(port);
        }
    }
    let listener = TcpListener::bind(SocketAddr::new(ip, 0))?;
    Ok(listener.local_addr()?.port())
}

/// Returns the current wall-clock time in microseconds since the Unix epoch.
pub fn micros_since_epoch() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX))
        // A clock set before 1970 is a broken test machine; 0 keeps the
        // records ordered among themselves rather than failing the test.
        .unwrap_or(0)
}

/// Polls `probe` every 20 ms until it returns `Some` or `timeout` passes.
pub(crate) fn poll_until<T>(timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until a TCP connect to `addr` succeeds.
pub(crate) fn wait_for_listener(addr: SocketAddr, timeout: Duration) -> bool {
    poll_until(timeout, || {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
            .ok()
            .map(|_| ())
    })
    .is_some()
}

/// Returns the last `max_lines` lines of a text file, or a note that it could
/// not be read.
pub(crate) fn tail_of_file(path: &Path, max_lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(max_lines);
            lines[start..].join("\n")
        }
        Err(error) => format!("({} could not be read: {error})", path.display()),
    }
}

/// Builds an `io::Error` of kind `Other` from a message.
pub(crate) fn other_error(message: impl Into<String>) -> io::Error {
    io::Error::other(message.into())
}
