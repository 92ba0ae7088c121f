//! Shared pieces of the end-to-end tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use caduceus_tests::{Engine, free_port};

/// How long a test waits for something that normally takes milliseconds.
pub const WAIT: Duration = Duration::from_secs(60);

pub fn loopback(last_octet: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last_octet))
}

/// An address on 127.0.0.`last_octet` with port 0, for peers that bind it
/// themselves: the kernel picks the port atomically at bind, so no other
/// test can take it in between (read it back from the peer).
pub fn any_port(last_octet: u8) -> SocketAddr {
    SocketAddr::new(loopback(last_octet), 0)
}

pub fn listen_addr(last_octet: u8) -> SocketAddr {
    let ip = loopback(last_octet);
    SocketAddr::new(ip, free_port(ip).expect("no free port on loopback"))
}

/// A temporary directory the engine's unprivileged user can traverse.
pub fn state_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("caduceus-e2e-")
        .tempdir()
        .expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod tempdir");
    dir
}

/// Sender whose mail policy classes as care, so that bulk-lane tests need
/// no recorded consent (the bulk lane's default category is marketing).
pub const CARE_SENDER: &str = "news@care.clinic.test";

/// The settings every test shares: the engine drops root to `nobody`, as
/// production does, the spool is sized for a test, DNS goes to `dns` (a
/// test's dnsmasq) or to a loopback port where nothing answers, so that no
/// test ever queries the machine's own resolver, and mail from
/// `CARE_SENDER`'s domain is care mail.
pub fn engine_config(dns: Option<SocketAddr>) -> String {
    let nameserver = dns.map_or_else(|| "127.0.0.1:9".to_string(), |addr| addr.to_string());
    format!(
        "hostname = \"mta.caduceus.test\"\n\
         user = \"nobody\"\n\
         \n\
         [spool]\n\
         segment_size_bytes = 8388608\n\
         reserve_bytes = 1048576\n\
         \n\
         [dns]\n\
         nameservers = [\"{nameserver}\"]\n\
         timeout = \"1s\"\n\
         \n\
         [[rule]]\n\
         domain = \"care.clinic.test\"\n\
         sender_category = \"care\"\n"
    )
}

pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "condition not met within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the delivery log has an entry matching `condition`, and
/// returns the whole log.
pub fn wait_for_log(
    engine: &Engine,
    condition: impl Fn(&serde_json::Value) -> bool,
    timeout: Duration,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let log = engine.delivery_log().unwrap_or_default();
        if log.iter().any(&condition) {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "no matching delivery log entry within {timeout:?}; log: {log:?}\nengine stderr:\n{}",
            engine.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The `caduceus` binary of this build.
pub fn binary() -> PathBuf {
    caduceus_tests::engine_binary().expect("engine binary")
}

/// Runs `caduceus ARGS... CONFIG` and returns its stdout; fails the test
/// when the command fails.
pub fn caduceus(args: &[&str], config: &Path) -> String {
    let output = Command::new(binary())
        .args(args)
        .arg(config)
        .output()
        .expect("run caduceus");
    assert!(
        output.status.success(),
        "caduceus {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A small message carrying its sequence number in `X-Test-Seq`.
pub fn message(sequence: u32, domain: &str) -> Vec<u8> {
    format!(
        "From: {CARE_SENDER}\r\nTo: member{sequence}@{domain}\r\nSubject: screening reminder\r\nX-Test-Seq: {sequence}\r\n\r\nBody of message {sequence}.\r\n"
    )
    .into_bytes()
}

/// The sequence number of a received message, from `X-Test-Seq`.
pub fn sequence_of(raw: &[u8]) -> Option<u32> {
    String::from_utf8_lossy(raw)
        .lines()
        .find_map(|line| line.strip_prefix("X-Test-Seq: "))
        .and_then(|value| value.trim().parse().ok())
}

/// Reads one reply (multi-line included) and returns its code.
pub fn read_code(reader: &mut BufReader<UnixStream>) -> Option<u16> {
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if line.len() < 4 || line.as_bytes()[3] != b'-' {
            return line.get(..3)?.parse().ok();
        }
    }
}

/// Injects the given sequence numbers over one connection until the engine
/// goes away, recording each sequence number acknowledged with 250.
pub fn inject(
    socket: &Path,
    domain: &str,
    sequences: Vec<u32>,
    acked: &Mutex<Vec<u32>>,
    stop: &AtomicBool,
) {
    let Ok(stream) = UnixStream::connect(socket) else {
        return;
    };
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    if read_code(&mut reader) != Some(220) {
        return;
    }
    if writer.write_all(b"EHLO injector.test\r\n").is_err() || read_code(&mut reader) != Some(250) {
        return;
    }
    for sequence in sequences {
        if stop.load(Ordering::Acquire) {
            return;
        }
        let commands =
            format!("MAIL FROM:<{CARE_SENDER}>\r\nRCPT TO:<member{sequence}@{domain}>\r\nDATA\r\n");
        if writer.write_all(commands.as_bytes()).is_err() {
            return;
        }
        let replies = [
            read_code(&mut reader),
            read_code(&mut reader),
            read_code(&mut reader),
        ];
        if replies != [Some(250), Some(250), Some(354)] {
            return;
        }
        let mut data = message(sequence, domain);
        data.extend_from_slice(b".\r\n");
        if writer.write_all(&data).is_err() {
            return;
        }
        match read_code(&mut reader) {
            Some(250) => acked.lock().expect("acked lock").push(sequence),
            _ => return,
        }
    }
}

/// Lists the daily files of one audit stream (`log/audit/<stream>-YYYYMMDD.jsonl`),
/// oldest first.
pub fn audit_stream_files(state_dir: &Path, stream: &str) -> Vec<PathBuf> {
    let dir = state_dir.join("log").join("audit");
    let prefix = format!("{stream}-");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|error| panic!("cannot read {}: {error}", dir.display()))
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with(&prefix) && name.ends_with(".jsonl"))
        })
        .collect();
    files.sort();
    files
}

/// Reads every record of one audit stream, parsed, in order.
pub fn audit_records(state_dir: &Path, stream: &str) -> Vec<serde_json::Value> {
    audit_stream_files(state_dir, stream)
        .iter()
        .flat_map(|path| {
            std::fs::read_to_string(path)
                .expect("audit file")
                .lines()
                .map(|line| serde_json::from_str(line).expect("audit line is JSON"))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The control thread's audit stream, every day's file in order: one JSON
/// line per administrative command.
pub fn control_audit(state_dir: &Path) -> String {
    audit_stream_files(state_dir, "control")
        .iter()
        .map(|path| std::fs::read_to_string(path).expect("control audit file"))
        .collect()
}

/// Returns the busiest one-second window and the sustained rate of a
/// sorted list of microsecond timestamps.
pub fn window_and_rate(times: &[u64]) -> (usize, f64) {
    let mut end = 0;
    let mut busiest = 0;
    for start in 0..times.len() {
        while end < times.len() && times[end] < times[start] + 1_000_000 {
            end += 1;
        }
        busiest = busiest.max(end - start);
    }
    let span_secs = (times[times.len() - 1] - times[0]) as f64 / 1e6;
    (busiest, (times.len() - 1) as f64 / span_secs)
}

/// Injects the messages numbered `sequences` to `domain` over
/// `connections` connections, and returns the acknowledged sequence numbers.
pub fn inject_parallel(
    socket: &Path,
    domain: &str,
    sequences: std::ops::Range<u32>,
    connections: u32,
) -> Vec<u32> {
    let acked = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        for connection in 0..connections {
            let part: Vec<u32> = sequences
                .clone()
                .filter(|sequence| sequence % connections == connection)
                .collect();
            let (acked, stop) = (&acked, &stop);
            scope.spawn(move || inject(socket, domain, part, acked, stop));
        }
    });
    acked.lock().expect("acked lock").clone()
}
