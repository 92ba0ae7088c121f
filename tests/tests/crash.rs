//! Crash safety and draining: no message that got `250` is lost across a
//! SIGKILL or a SIGTERM, and duplicates stay within the deliveries that
//! were in flight when the engine stopped.
//!
//! A SIGKILL leaves the page cache intact, so these tests cannot prove
//! durability against power loss; the spool's fault-injecting storage tests
//! do that.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use caduceus_tests::{Engine, Lane, Received, Script, ScriptedReceiver};
use common::{engine_config, inject, state_dir};

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
            inject(&socket, "crash.test", sequences, &acked, &stop)
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
        ScriptedReceiver::start(common::any_port(60), Script::default()).expect("receiver start");
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
        ScriptedReceiver::start(common::any_port(62), Script::default()).expect("receiver start");
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

#[test]
fn fewer_cores_after_restart_adopt_pending_mail() {
    let receiver =
        ScriptedReceiver::start(common::any_port(64), Script::default()).expect("receiver start");
    let state = state_dir();
    let config = format!(
        "{}\n[[rule]]\ndomain = \"crash.test\"\nroute = \"{}\"\nhold = true\n",
        engine_config(None),
        receiver.addr()
    );
    // First run: the default allocation, one executor per lane; the bulk
    // lane's mail goes to shard 1 and stays there, held by policy.
    let mut engine = Engine::start(&config, &state.path().join("engine")).expect("engine start");
    let socket = engine.socket(Lane::Bulk).to_path_buf();
    let acked = Arc::new(Mutex::new(Vec::new()));
    inject(
        &socket,
        "crash.test",
        (0..20).collect(),
        &acked,
        &AtomicBool::new(false),
    );
    let acked = acked.lock().expect("acked lock").clone();
    assert_eq!(acked.len(), 20);
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        receiver.received().is_empty(),
        "a destination held by policy got mail"
    );
    engine.sigterm().expect("SIGTERM");
    assert!(
        engine
            .wait_exit(Duration::from_secs(60))
            .expect("exit")
            .success()
    );
    let spool = engine.state_dir().join("spool");
    let shard_one = std::fs::read_dir(&spool)
        .expect("spool dir")
        .flatten()
        .any(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .starts_with("shard-00001-")
        });
    assert!(shard_one, "the bulk lane wrote shard 1");
    drop(engine);

    // Second run: one CPU, so one executor, which must adopt shard 1. The
    // hold is lifted in the same config change.
    let wrapper = state.path().join("one-cpu.sh");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec taskset -c 0 {} \"$@\"\n",
            common::binary().display()
        ),
    )
    .expect("write wrapper");
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod wrapper");
    let released = config.replace("hold = true\n", "");
    let engine = Engine::start_binary(&wrapper, &released, &state.path().join("engine"))
        .expect("engine restart on one CPU");
    let counts = wait_for_all(&receiver, &acked, &engine);
    assert_eq!(counts.len(), 20);
    let shard_one_left = std::fs::read_dir(&spool)
        .expect("spool dir")
        .flatten()
        .any(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .starts_with("shard-00001-")
        });
    assert!(!shard_one_left, "the adopted shard's files are removed");
}

/// Kills the engine at random points under load, 20 times, restarting it
/// after each kill. Every acknowledged message must arrive, and `caduceus
/// spool verify` must find no corrupt record at the end.
#[test]
fn twenty_random_kills_under_load() {
    let receiver =
        ScriptedReceiver::start(common::any_port(66), Script::default()).expect("receiver start");
    let state = state_dir();
    let mut engine = Engine::start(&crash_config(&receiver), &state.path().join("engine"))
        .expect("engine start");
    let mut acked_all = Vec::new();
    // A xorshift generator seeded from the clock picks the kill points; the
    // seed is printed so a failing run can be repeated by hand.
    let mut state_bits = caduceus_tests::micros_since_epoch() | 1;
    eprintln!("kill points seeded with {state_bits}");
    let mut random_below = |bound: u64| {
        state_bits ^= state_bits << 13;
        state_bits ^= state_bits >> 7;
        state_bits ^= state_bits << 17;
        state_bits % bound
    };
    let mut next_sequence = 0u32;
    for _ in 0..20 {
        let socket = engine.socket(Lane::Bulk).to_path_buf();
        let first = next_sequence;
        next_sequence += 2_000;
        let acked = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let injectors: Vec<_> = (0..2u32)
            .map(|part| {
                let (socket, acked, stop) = (socket.clone(), acked.clone(), stop.clone());
                std::thread::spawn(move || {
                    let sequences = (first..first + 2_000)
                        .filter(|sequence| sequence % 2 == part)
                        .collect();
                    inject(&socket, "crash.test", sequences, &acked, &stop);
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(20 + random_below(380)));
        engine.sigkill().expect("SIGKILL");
        stop.store(true, Ordering::Release);
        for injector in injectors {
            injector.join().expect("injector");
        }
        acked_all.extend(acked.lock().expect("acked lock").iter().copied());
        engine
            .wait_exit(Duration::from_secs(30))
            .expect("engine exit");
        engine.restart().expect("engine restart");
    }
    let counts = wait_for_all(&receiver, &acked_all, &engine);
    let duplicates: usize = counts.values().map(|copies| copies - 1).sum();
    eprintln!(
        "20 kills: {} acknowledged, {} delivered, {duplicates} duplicates (bound {})",
        acked_all.len(),
        counts.len(),
        20 * MAX_CONNECTIONS
    );
    assert!(
        duplicates <= 20 * MAX_CONNECTIONS,
        "duplicates exceed the deliveries in flight at the kills"
    );

    let config = engine.state_dir().join("caduceus.toml");
    engine.sigterm().expect("SIGTERM");
    engine
        .wait_exit(Duration::from_secs(60))
        .expect("engine exit");
    let output = std::process::Command::new(common::binary())
        .args(["spool", "verify", "--config"])
        .arg(&config)
        .output()
        .expect("spool verify");
    assert!(
        output.status.success(),
        "spool verify found damage: {}",
        String::from_utf8_lossy(&output.stdout)
    );

    // Each kill can drop audit records that were staged and not yet
    // written. Every start rebuilds the lost `accepted` records from the
    // spool, so each acknowledged message still has one.
    let verify = std::process::Command::new(common::binary())
        .args(["audit", "verify", "--config"])
        .arg(&config)
        .output()
        .expect("audit verify");
    assert!(
        verify.status.success(),
        "audit verify found a problem: {}",
        String::from_utf8_lossy(&verify.stdout)
    );
    let mut accepted = HashSet::new();
    let mut with_outcome = HashSet::new();
    let mut rebuilt = 0;
    for stream in ["core-0", "core-1"] {
        for record in common::audit_records(engine.state_dir(), stream) {
            let id = record["message_id"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if record["event"] == "accepted" {
                rebuilt += usize::from(record["recovered"] == true);
                accepted.insert(id);
            } else if record["event"] == "outcome" {
                with_outcome.insert(id);
            }
        }
    }
    let unaccepted = with_outcome.difference(&accepted).count();
    assert_eq!(
        unaccepted, 0,
        "messages with an outcome but no accepted record"
    );
    eprintln!(
        "audit: {} accepted records, {rebuilt} of them rebuilt from the spool",
        accepted.len()
    );
    assert!(
        accepted.len() >= acked_all.len(),
        "{} messages were acknowledged but only {} have an accepted record",
        acked_all.len(),
        accepted.len()
    );
}
