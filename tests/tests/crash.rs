//! Crash safety and draining: no message that got `250` is lost across a
//! SIGKILL or a SIGTERM, and duplicates stay within the deliveries that
//! were in flight when the engine stopped.
//!
//! A SIGKILL leaves the page cache intact, so these tests cannot prove
//! durability against power loss; the spool's fault-injecting storage tests
//! do that.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use caduceus_tests::{Engine, Lane, Received, Script, ScriptedReceiver};
use common::{engine_config, listen_addr, state_dir};

/// Connections per destination, which bounds the deliveries in flight at
/// any moment and so the duplicates a crash may cause.
const MAX_CONNECTIONS: usize = 4;
const INJECTORS: u32 = 4;

fn crash_config(receiver: &ScriptedReceiver) -> String {
    format!(
        "{}\n[delivery]\nmax_connections_per_destination = {MAX_CONNECTIONS}\n\n[lanes.bulk]\nretry_schedule = [\"1s\"]\n\n[[rule]]\ndomain = \"crash.test\"\nroute = \"{}\"\n",
        engine_config(None),
        receiver.addr()
    )
}

fn message(sequence: u32) -> Vec<u8> {
    format!(
        "From: news@clinic.test\r\nTo: member{sequence}@crash.test\r\nSubject: screening reminder\r\nX-Test-Seq: {sequence}\r\n\r\nBody of message {sequence}.\r\n"
    )
    .into_bytes()
}

/// Reads one reply (multi-line included) and returns its code.
fn read_code(reader: &mut BufReader<UnixStream>) -> Option<u16> {
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
fn inject(socket: &Path, sequences: Vec<u32>, acked: &Mutex<Vec<u32>>, stop: &AtomicBool) {
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
        let commands = format!(
            "MAIL FROM:<news@clinic.test>\r\nRCPT TO:<member{sequence}@crash.test>\r\nDATA\r\n"
        );
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
        let mut data = message(sequence);
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

/// Runs `INJECTORS` connections over `sequences`, calling `interrupt` once
/// `interrupt_at` messages were acknowledged.
fn inject_and_interrupt(
    socket: PathBuf,
    total: u32,
    interrupt_at: usize,
    interrupt: impl FnOnce(),
) -> Vec<u32> {
    let acked = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut injectors = Vec::new();
    for injector in 0..INJECTORS {
        let sequences: Vec<u32> = (0..total)
            .filter(|seq| seq % INJECTORS == injector)
            .collect();
        let (acked, stop, socket) = (acked.clone(), stop.clone(), socket.clone());
        injectors.push(std::thread::spawn(move || {
            inject(&socket, sequences, &acked, &stop)
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while acked.lock().expect("acked lock").len() < interrupt_at {
        assert!(
            Instant::now() < deadline,
            "injection stalled before the interrupt"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    interrupt();
    stop.store(true, Ordering::Release);
    for injector in injectors {
        injector.join().expect("injector thread");
    }
    acked.lock().expect("acked lock").clone()
}

/// Counts accepted copies per sequence number.
fn copies(received: &[Received]) -> HashMap<u32, usize> {
    let mut counts = HashMap::new();
    for message in received
        .iter()
        .filter(|message| message.reply_code == Some(250))
    {
        let text = String::from_utf8_lossy(&message.raw);
        let sequence = text
            .lines()
            .find_map(|line| line.strip_prefix("X-Test-Seq: "))
            .and_then(|value| value.trim().parse::<u32>().ok());
        if let Some(sequence) = sequence {
            *counts.entry(sequence).or_insert(0) += 1;
        }
    }
    counts
}

fn wait_for_all(
    receiver: &ScriptedReceiver,
    acked: &[u32],
    engine: &Engine,
) -> HashMap<u32, usize> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let counts = copies(&receiver.received());
        let missing: Vec<u32> = acked
            .iter()
            .copied()
            .filter(|sequence| !counts.contains_key(sequence))
            .collect();
        if missing.is_empty() {
            return counts;
        }
        assert!(
            Instant::now() < deadline,
            "{} acknowledged messages never arrived, e.g. {:?}\nengine stderr:\n{}",
            missing.len(),
            &missing[..missing.len().min(10)],
            engine.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn sigkill_halfway_loses_no_acknowledged_message() {
    let receiver =
        ScriptedReceiver::start(listen_addr(60), Script::default()).expect("receiver start");
    let state = state_dir();
    let mut engine = Engine::start(&crash_config(&receiver), &state.path().join("engine"))
        .expect("engine start");
    let socket = engine.socket(Lane::Bulk).to_path_buf();
    let acked = inject_and_interrupt(socket, 10_000, 5_000, || {
        engine.sigkill().expect("SIGKILL");
    });
    engine
        .wait_exit(Duration::from_secs(30))
        .expect("engine exit");
    engine.restart().expect("engine restart");
    let counts = wait_for_all(&receiver, &acked, &engine);

    let unique: HashSet<u32> = counts.keys().copied().collect();
    let duplicates: usize = counts.values().map(|copies| copies - 1).sum();
    eprintln!(
        "sigkill: {} acknowledged, {} delivered, {duplicates} duplicates (bound {MAX_CONNECTIONS})",
        acked.len(),
        unique.len()
    );
    assert!(
        acked.len() >= 5_000,
        "the kill came after 5,000 acknowledgements"
    );
    assert!(
        duplicates <= MAX_CONNECTIONS,
        "{duplicates} duplicates exceed the {MAX_CONNECTIONS} deliveries that can be in flight"
    );
}

#[test]
fn sigterm_under_load_drains_without_loss() {
    let receiver =
        ScriptedReceiver::start(listen_addr(62), Script::default()).expect("receiver start");
    let state = state_dir();
    let mut engine = Engine::start(&crash_config(&receiver), &state.path().join("engine"))
        .expect("engine start");
    let socket = engine.socket(Lane::Bulk).to_path_buf();
    let acked = inject_and_interrupt(socket, 3_000, 1_500, || {
        engine.sigterm().expect("SIGTERM");
    });
    let status = engine
        .wait_exit(Duration::from_secs(60))
        .expect("engine exit");
    assert!(
        status.success(),
        "a drained engine exits 0: {status:?}\n{}",
        engine.stderr()
    );
    engine.restart().expect("engine restart");
    let counts = wait_for_all(&receiver, &acked, &engine);
    let duplicates: usize = counts.values().map(|copies| copies - 1).sum();
    assert_eq!(
        duplicates, 0,
        "a drain finishes deliveries in flight, so none repeats"
    );
}
