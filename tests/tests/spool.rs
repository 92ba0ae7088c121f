//! The spool end to end. Compaction gives back the space of segments that a
//! few long-deferred messages kept alive. The disk reserve rejects new mail
//! while acknowledged mail is still delivered. A SIGKILL during compaction
//! loses no acknowledged message and corrupts no record.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use caduceus_tests::{Engine, Lane, Plan, Recording, Response, Script, ScriptedReceiver};
use common::{CARE_SENDER, engine_config, read_code, sequence_of, state_dir};

/// Starts a receiver that replies `451 4.3.0` to every RCPT, so its mail
/// stays queued.
fn deferring_receiver(last_octet: u8) -> ScriptedReceiver {
    let script = Script {
        rcpt: Plan::always(Response::reply(451, "4.3.0 Mailbox busy, try again later")),
        ..Script::default()
    };
    ScriptedReceiver::start(common::any_port(last_octet), script).expect("deferring receiver start")
}

/// `engine_config` with another segment size and any extra TOML appended.
fn config_with(segment_size_bytes: u64, extra: &str) -> String {
    let base = engine_config(None);
    assert!(base.contains("segment_size_bytes = 8388608\n"));
    format!(
        "{}\n{extra}",
        base.replace(
            "segment_size_bytes = 8388608\n",
            &format!("segment_size_bytes = {segment_size_bytes}\n"),
        )
    )
}

fn route(domain: &str, receiver: &ScriptedReceiver) -> String {
    format!(
        "[[rule]]\ndomain = \"{domain}\"\nroute = \"{}\"\n",
        receiver.addr()
    )
}

/// Builds the test message for `sequence`, padded with header-like lines to
/// about `size_bytes`.
fn padded_message(sequence: u32, domain: &str, size_bytes: usize) -> Vec<u8> {
    let mut data = common::message(sequence, domain);
    let line = format!("{}\r\n", "z".repeat(74));
    while data.len() + line.len() <= size_bytes {
        data.extend_from_slice(line.as_bytes());
    }
    data
}

/// Injects `sequences` over one connection. `domain_of` and `size_of` pick
/// each message's recipient domain and size. Every sequence number
/// acknowledged with 250 goes into `acked`.
fn inject_mixed(
    socket: &Path,
    sequences: Vec<u32>,
    domain_of: &(dyn Fn(u32) -> &'static str + Sync),
    size_of: &(dyn Fn(u32) -> usize + Sync),
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
        let domain = domain_of(sequence);
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
        let mut data = padded_message(sequence, domain, size_of(sequence));
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

/// The sum of the sizes of the files in the spool directory, which counts
/// each segment at its preallocated size, and the peak seen so far.
struct DiskUse {
    dir: PathBuf,
    peak_bytes: u64,
}

impl DiskUse {
    fn new(dir: PathBuf) -> DiskUse {
        DiskUse { dir, peak_bytes: 0 }
    }

    fn sample(&mut self) -> u64 {
        let bytes: u64 = std::fs::read_dir(&self.dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|entry| entry.metadata().ok())
                    .map(|metadata| metadata.len())
                    .sum()
            })
            .unwrap_or(0);
        self.peak_bytes = self.peak_bytes.max(bytes);
        bytes
    }
}

/// Counts the copies of each sequence number that a receiver accepted.
fn accepted_copies(receiver: &ScriptedReceiver) -> HashMap<u32, usize> {
    let mut copies = HashMap::new();
    for message in receiver.received() {
        if message.reply_code == Some(250)
            && let Some(sequence) = sequence_of(&message.raw)
        {
            *copies.entry(sequence).or_insert(0) += 1;
        }
    }
    copies
}

/// Waits until `receiver` accepted every sequence in `expected` at least
/// once, and returns the copies per sequence.
fn wait_for_sequences(
    receiver: &ScriptedReceiver,
    expected: &[u32],
    engine: &Engine,
    timeout: Duration,
) -> HashMap<u32, usize> {
    let deadline = Instant::now() + timeout;
    loop {
        let copies = accepted_copies(receiver);
        let missing: Vec<u32> = expected
            .iter()
            .copied()
            .filter(|sequence| !copies.contains_key(sequence))
            .collect();
        if missing.is_empty() {
            return copies;
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

fn stop_engine(engine: &mut Engine) {
    engine.sigterm().expect("SIGTERM");
    let status = engine
        .wait_exit(Duration::from_secs(60))
        .expect("engine exit");
    assert!(status.success(), "{status:?}\n{}", engine.stderr());
}

const FAST_MESSAGES: u32 = 100_000;
const SLOW_MESSAGES: u32 = 1_000;

/// Sends one message in 101 to the deferring destination, so every segment
/// contains some of them.
fn is_slow(sequence: u32) -> bool {
    sequence % 101 == 100
}

/// Starts an engine on `config` in `state`, and returns it with the paths
/// of its config file and its spool key file.
fn start_with_key_file(config: &str, state: &tempfile::TempDir) -> (Engine, PathBuf, PathBuf) {
    let engine = Engine::start(config, &state.path().join("engine")).expect("engine start");
    let config_path = engine.state_dir().join("caduceus.toml");
    let key_file = engine.state_dir().join("keys/spool.key");
    (engine, config_path, key_file)
}

/// `caduceus keys rotate` seals later messages with a new key while the
/// earlier ones stay readable, across a restart, and the rotation is in
/// the control audit stream.
#[test]
fn key_rotation_keeps_old_records_readable() {
    let receiver =
        ScriptedReceiver::start(common::any_port(78), Script::default()).expect("receiver start");
    let state = state_dir();
    let (mut engine, config_path, key_file) = start_with_key_file(
        &config_with(8 * 1024 * 1024, &route("keys.test", &receiver)),
        &state,
    );
    common::caduceus(&["queue", "hold", "keys.test", "--config"], &config_path);

    let acked = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    let socket = engine.socket(Lane::Bulk).to_path_buf();
    common::inject(&socket, "keys.test", vec![1, 2], &acked, &stop);
    let output = common::caduceus(&["keys", "rotate", "--config"], &config_path);
    assert!(output.contains("sealed with key 2 (was key 1)"), "{output}");
    common::inject(&socket, "keys.test", vec![3, 4], &acked, &stop);
    assert_eq!(*acked.lock().expect("acked lock"), vec![1, 2, 3, 4]);

    let keys = std::fs::read_to_string(&key_file).expect("key file");
    assert!(keys.contains("\nkey 1 "), "{keys}");
    assert!(keys.contains("\nkey 2 "), "{keys}");
    assert!(keys.contains("\nactive 2\n"), "{keys}");
    let audit = common::control_audit(engine.state_dir());
    assert!(audit.contains("\"keys.rotate\""), "the command is audited");
    assert!(
        audit.contains("\"event\":\"key_rotated\""),
        "the rotation's result is audited: {audit}"
    );
    assert!(audit.contains("\"key_id\":2"), "{audit}");

    // Offline, the spool lists two messages under each key.
    engine.sigterm().expect("SIGTERM");
    engine
        .wait_exit(Duration::from_secs(30))
        .expect("engine exit");
    let listing = common::caduceus(&["spool", "ls", "--config"], &config_path);
    let message_keys: Vec<&str> = listing
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .filter(|fields| fields.get(2) == Some(&"message"))
        .map(|fields| fields[3])
        .collect();
    assert_eq!(message_keys, vec!["1", "1", "2", "2"], "{listing}");

    // After a restart the engine reads both keys from the file, and every
    // message, sealed under either key, is delivered.
    engine.restart().expect("engine restart");
    common::caduceus(&["queue", "release", "keys.test", "--config"], &config_path);
    common::wait_until(Duration::from_secs(30), || {
        accepted_copies(&receiver).len() >= 4
    });
    let copies = accepted_copies(&receiver);
    let mut delivered: Vec<u32> = copies.keys().copied().collect();
    delivered.sort_unstable();
    assert_eq!(delivered, vec![1, 2, 3, 4]);
    assert!(copies.values().all(|count| *count == 1), "{copies:?}");
}

/// `caduceus keys rotate` rejects a key file that the engine's user cannot
/// write (docs/operations.md, "Rotation") and leaves the file unchanged.
/// Once the file is writable again, the rotation succeeds.
#[test]
fn key_rotation_rejects_read_only_key_file() {
    use std::os::unix::fs::PermissionsExt;

    let state = state_dir();
    let (_engine, config_path, key_file) =
        start_with_key_file(&config_with(8 * 1024 * 1024, ""), &state);
    let before = std::fs::read_to_string(&key_file).expect("key file");
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o400))
        .expect("chmod 0400");

    let output = std::process::Command::new(common::binary())
        .args(["keys", "rotate", "--config"])
        .arg(&config_path)
        .output()
        .expect("run caduceus keys rotate");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "rotation succeeded: {stderr}");
    assert!(stderr.contains("cannot open"), "{stderr}");
    assert!(stderr.contains("for writing"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(&key_file).expect("key file"),
        before,
        "the read-only key file was replaced"
    );
    let mode = std::fs::metadata(&key_file)
        .expect("metadata")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o400, "the key file's mode changed");

    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600))
        .expect("chmod 0600");
    let output = common::caduceus(&["keys", "rotate", "--config"], &config_path);
    assert!(output.contains("sealed with key 2 (was key 1)"), "{output}");
}

/// A start with the spool key file missing while the spool contains sealed
/// records fails and names the file, instead of creating a new key and
/// quarantining every acknowledged message as damaged. The offline
/// `spool ls` fails the same way, and neither creates a key file.
#[test]
fn missing_key_file_with_sealed_spool_rejected() {
    let state = state_dir();
    let (mut engine, config_path, key_file) =
        start_with_key_file(&config_with(8 * 1024 * 1024, ""), &state);
    common::caduceus(&["queue", "hold", "keys.test", "--config"], &config_path);
    let acked = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    common::inject(
        engine.socket(Lane::Bulk),
        "keys.test",
        vec![1, 2, 3],
        &acked,
        &stop,
    );
    assert_eq!(*acked.lock().expect("acked lock"), vec![1, 2, 3]);
    engine.sigterm().expect("SIGTERM");
    engine
        .wait_exit(Duration::from_secs(30))
        .expect("engine exit");

    let saved = std::fs::read(&key_file).expect("key file");
    std::fs::remove_file(&key_file).expect("remove key file");

    let output = std::process::Command::new(common::binary())
        .args(["spool", "ls", "--config"])
        .arg(&config_path)
        .output()
        .expect("run caduceus spool ls");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "spool ls succeeded: {stderr}");
    assert!(stderr.contains("is missing"), "{stderr}");
    assert!(!key_file.exists(), "spool ls created a key file");

    assert!(
        engine.restart().is_err(),
        "the engine started without its key"
    );
    let stderr = engine.stderr();
    assert!(stderr.contains("spool key file"), "{stderr}");
    assert!(stderr.contains("is missing"), "{stderr}");
    assert!(!key_file.exists(), "the engine created a key file");

    // With the key file restored, every message is back in the queue.
    std::fs::write(&key_file, saved).expect("restore key file");
    std::os::unix::fs::chown(&key_file, Some(65534), Some(65534)).expect("chown nobody");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600))
            .expect("chmod 0600");
    }
    engine.restart().expect("engine restart");
    let listing = common::caduceus(&["queue", "list", "--config"], &config_path);
    assert!(listing.contains("keys.test"), "{listing}");
}

/// Turning encryption on for a spool written with it off creates the key
/// file and keeps every queued message, because records of key id 0 need
/// no key.
#[test]
fn encryption_on_keeps_plain_spool() {
    let plain = config_with(8 * 1024 * 1024, "").replace(
        "reserve_bytes = 1048576\n",
        "reserve_bytes = 1048576\nencryption = false\n",
    );
    assert!(plain.contains("encryption = false"), "{plain}");
    let state = state_dir();
    let (mut engine, config_path, key_file) = start_with_key_file(&plain, &state);
    common::caduceus(&["queue", "hold", "keys.test", "--config"], &config_path);
    let acked = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    common::inject(
        engine.socket(Lane::Bulk),
        "keys.test",
        vec![1, 2],
        &acked,
        &stop,
    );
    assert_eq!(*acked.lock().expect("acked lock"), vec![1, 2]);
    engine.sigterm().expect("SIGTERM");
    engine
        .wait_exit(Duration::from_secs(30))
        .expect("engine exit");
    assert!(!key_file.exists(), "a key file exists with encryption off");

    let written = std::fs::read_to_string(&config_path).expect("read config");
    let encrypted = written.replace("encryption = false\n", "");
    assert_ne!(
        encrypted, written,
        "encryption = false not found in {written}"
    );
    std::fs::write(&config_path, encrypted).expect("write config");
    engine.restart().expect("engine restart with encryption on");
    assert!(key_file.exists(), "no key file was created");
    let listing = common::caduceus(&["queue", "list", "--config"], &config_path);
    assert!(listing.contains("keys.test"), "{listing}");
}

/// A segment too small for `max_message_size_bytes` lowers the SIZE that
/// EHLO advertises, and a larger MAIL SIZE= is rejected before the content.
#[test]
fn small_segment_lowers_advertised_size() {
    let state = state_dir();
    let engine = Engine::start(&config_with(1024 * 1024, ""), &state.path().join("engine"))
        .expect("engine start");
    let stream = UnixStream::connect(engine.socket(Lane::Bulk)).expect("connect");
    let mut writer = stream.try_clone().expect("clone");
    let mut reader = BufReader::new(stream);
    assert_eq!(read_code(&mut reader), Some(220));

    writer.write_all(b"EHLO client.example\r\n").expect("EHLO");
    let mut ehlo = String::new();
    loop {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).expect("read EHLO") > 0);
        ehlo.push_str(&line);
        if line.as_bytes().get(3) != Some(&b'-') {
            break;
        }
    }
    assert!(ehlo.contains("SIZE 983040\r\n"), "{ehlo}");

    writer
        .write_all(b"MAIL FROM:<a@example.com> SIZE=983041\r\n")
        .expect("MAIL");
    let mut reply = String::new();
    reader.read_line(&mut reply).expect("MAIL reply");
    assert!(reply.starts_with("552 5.3.4"), "{reply}");
}

/// 100,000 messages to an accepting receiver, interleaved with 1,000 to one
/// that defers every RCPT, with 4 MiB segments. Without compaction, every
/// segment keeps a few deferred messages and none is ever deleted. With it,
/// the spool must shrink to under 5% of its peak while the 1,000 stay
/// queued, and none of them may be lost.
///
/// The accepting destination is held while the mail is injected, so the
/// peak is the whole backlog in every run instead of depending on how
/// delivery keeps pace with injection. Its messages carry a 3 KB body so
/// that the backlog spans dozens of segments; the deferred ones are small.
#[test]
fn compaction_reclaims_space_of_deferred_mail() {
    let fast = ScriptedReceiver::start(
        common::any_port(70),
        Script {
            recording: Recording::Summary,
            ..Script::default()
        },
    )
    .expect("receiver start");
    let slow = deferring_receiver(71);
    let state = state_dir();
    let extra = format!(
        "[lanes.bulk]\nretry_schedule = [\"20s\"]\n\n{}\n{}",
        route("fast.test", &fast),
        route("slow.test", &slow)
    );
    let mut engine = Engine::start(
        &config_with(4 * 1024 * 1024, &extra),
        &state.path().join("engine"),
    )
    .expect("engine start");
    let config_path = engine.state_dir().join("caduceus.toml");
    common::caduceus(&["queue", "hold", "fast.test", "--config"], &config_path);
    let mut disk = DiskUse::new(engine.state_dir().join("spool"));

    let started = Instant::now();
    let total = FAST_MESSAGES + SLOW_MESSAGES;
    let acked = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let injectors: u32 = 8;
    let mut threads = Vec::new();
    for injector in 0..injectors {
        let sequences: Vec<u32> = (0..total)
            .filter(|seq| seq % injectors == injector)
            .collect();
        let (acked, stop) = (acked.clone(), stop.clone());
        let socket = engine.socket(Lane::Bulk).to_path_buf();
        threads.push(std::thread::spawn(move || {
            inject_mixed(
                &socket,
                sequences,
                &|sequence| {
                    if is_slow(sequence) {
                        "slow.test"
                    } else {
                        "fast.test"
                    }
                },
                &|sequence| if is_slow(sequence) { 0 } else { 3000 },
                &acked,
                &stop,
            )
        }));
    }
    while threads.iter().any(|thread| !thread.is_finished()) {
        disk.sample();
        std::thread::sleep(Duration::from_millis(100));
    }
    for thread in threads {
        thread.join().expect("injector thread");
    }
    let acked = acked.lock().expect("acked lock").clone();
    assert_eq!(
        acked.len() as u32,
        total,
        "every message is acknowledged\n{}",
        engine.stderr()
    );
    let injected_after = started.elapsed();

    common::caduceus(&["queue", "release", "fast.test", "--config"], &config_path);
    let deadline = Instant::now() + Duration::from_secs(180);
    while fast.accepted_count() < u64::from(FAST_MESSAGES) {
        assert!(
            Instant::now() < deadline,
            "{} of {FAST_MESSAGES} delivered\n{}",
            fast.accepted_count(),
            engine.stderr()
        );
        disk.sample();
        std::thread::sleep(Duration::from_millis(100));
    }
    let delivered_after = started.elapsed();

    let limit_bytes = disk.peak_bytes / 20;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut current_bytes = disk.sample();
    while current_bytes >= limit_bytes && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        current_bytes = disk.sample();
    }
    eprintln!(
        "space: peak {} bytes, end {current_bytes} bytes; injected in {injected_after:?}, delivered in {delivered_after:?}",
        disk.peak_bytes
    );
    assert!(
        disk.peak_bytes >= 200 * 1024 * 1024,
        "the backlog should span dozens of segments, peak {} bytes",
        disk.peak_bytes
    );
    assert!(
        current_bytes < limit_bytes,
        "spool still uses {current_bytes} bytes, over 5% of its {} byte peak\n{}",
        disk.peak_bytes,
        engine.stderr()
    );
    assert_eq!(
        fast.accepted_count(),
        u64::from(FAST_MESSAGES),
        "each accepted message arrived once"
    );
    let rcpt_attempts = slow
        .commands()
        .iter()
        .filter(|command| command.line.starts_with("RCPT"))
        .count();
    assert!(
        rcpt_attempts >= SLOW_MESSAGES as usize,
        "every deferred message was tried, got {rcpt_attempts} RCPT commands"
    );

    // The deferred messages survived being moved: after a restart that
    // routes them to an accepting receiver, each arrives exactly once.
    stop_engine(&mut engine);
    let rescue =
        ScriptedReceiver::start(common::any_port(72), Script::default()).expect("receiver start");
    let extra = format!(
        "[lanes.bulk]\nretry_schedule = [\"20s\"]\n\n{}\n{}",
        route("fast.test", &fast),
        route("slow.test", &rescue)
    );
    let mut engine = Engine::start(
        &config_with(4 * 1024 * 1024, &extra),
        &state.path().join("engine"),
    )
    .expect("engine restart");
    common::caduceus(&["queue", "requeue", "slow.test", "--config"], &config_path);
    let slow_sequences: Vec<u32> = acked.iter().copied().filter(|seq| is_slow(*seq)).collect();
    assert_eq!(slow_sequences.len() as u32, SLOW_MESSAGES);
    let copies = wait_for_sequences(&rescue, &slow_sequences, &engine, Duration::from_secs(60));
    assert_eq!(
        copies.len() as u32,
        SLOW_MESSAGES,
        "only deferred messages remained"
    );
    let duplicates: usize = copies.values().map(|count| count - 1).sum();
    assert_eq!(duplicates, 0, "a relocated message is delivered once");
    stop_engine(&mut engine);
}

/// Reads one reply, multi-line included, and returns its last line.
fn read_reply(reader: &mut BufReader<UnixStream>) -> String {
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return line;
        }
        if line.len() < 4 || line.as_bytes()[3] != b'-' {
            return line.trim_end().to_string();
        }
    }
}

/// Sends MAIL on a new session and returns the reply line.
fn mail_reply(socket: &Path) -> String {
    let stream = UnixStream::connect(socket).expect("connect to the bulk socket");
    let mut writer = stream.try_clone().expect("clone stream");
    let mut reader = BufReader::new(stream);
    assert!(read_reply(&mut reader).starts_with("220"));
    writer.write_all(b"EHLO reserve.test\r\n").expect("EHLO");
    assert!(read_reply(&mut reader).starts_with("250"));
    writer
        .write_all(format!("MAIL FROM:<{CARE_SENDER}>\r\n").as_bytes())
        .expect("MAIL");
    let reply = read_reply(&mut reader);
    let _ = writer.write_all(b"QUIT\r\n");
    reply
}

/// With a reserve larger than the file system's free space, MAIL gets
/// `452 4.3.1`, and the messages acknowledged before the reserve was raised
/// are still delivered, once: their outcome records are written below the
/// reserve, so a further restart does not send them again.
#[test]
fn disk_reserve_refuses_mail_but_delivers_queued() {
    let receiver =
        ScriptedReceiver::start(common::any_port(74), Script::default()).expect("receiver start");
    let state = state_dir();
    let held = format!("{}hold = true\n", route("reserve.test", &receiver));
    let mut engine = Engine::start(
        &config_with(4 * 1024 * 1024, &held),
        &state.path().join("engine"),
    )
    .expect("engine start");
    let acked = Mutex::new(Vec::new());
    common::inject(
        engine.socket(Lane::Bulk),
        "reserve.test",
        (0..20).collect(),
        &acked,
        &AtomicBool::new(false),
    );
    let acked = acked.into_inner().expect("acked lock");
    assert_eq!(acked.len(), 20);
    stop_engine(&mut engine);
    drop(engine);
    assert!(receiver.received().is_empty(), "the destination was held");

    // 2^60 bytes is far more than any test machine's free space.
    let huge_reserve = config_with(4 * 1024 * 1024, &route("reserve.test", &receiver)).replace(
        "reserve_bytes = 1048576\n",
        "reserve_bytes = 1152921504606846976\n",
    );
    assert!(huge_reserve.contains("reserve_bytes = 1152921504606846976\n"));
    let mut engine =
        Engine::start(&huge_reserve, &state.path().join("engine")).expect("engine restart");
    // The engine checks free space once a second, starting at once.
    let deadline = Instant::now() + Duration::from_secs(10);
    let reply = loop {
        let reply = mail_reply(engine.socket(Lane::Bulk));
        if reply.starts_with("452") || Instant::now() >= deadline {
            break reply;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(reply.starts_with("452 4.3.1"), "MAIL reply: {reply}");

    let copies = wait_for_sequences(&receiver, &acked, &engine, common::WAIT);
    assert_eq!(copies.len(), 20);
    assert!(copies.values().all(|count| *count == 1), "{copies:?}");

    engine.restart().expect("second restart");
    std::thread::sleep(Duration::from_secs(3));
    let copies = accepted_copies(&receiver);
    assert!(
        copies.values().all(|count| *count == 1),
        "delivered again after a restart: {copies:?}"
    );
    assert!(mail_reply(engine.socket(Lane::Bulk)).starts_with("452 4.3.1"));
    stop_engine(&mut engine);
}

/// Deliveries in flight per destination, which bounds the duplicates a kill
/// may cause.
const MAX_CONNECTIONS: usize = 4;

/// A SIGKILL while segments are being compacted: after a restart every
/// acknowledged message arrives, duplicates stay within the deliveries in
/// flight at the kill, and `caduceus spool verify` finds no damaged record.
#[test]
fn sigkill_during_compaction_loses_nothing() {
    let receiver =
        ScriptedReceiver::start(common::any_port(76), Script::default()).expect("receiver start");
    let slow = deferring_receiver(77);
    let state = state_dir();
    let policy = |slow_receiver: &ScriptedReceiver| {
        format!(
            "[delivery]\nmax_connections_per_destination = {MAX_CONNECTIONS}\n\n[lanes.bulk]\nretry_schedule = [\"1s\"]\n\n{}\n{}",
            route("fast.test", &receiver),
            route("slow.test", slow_receiver)
        )
    };
    // 1 MiB segments fill and seal every second or so, so compaction runs
    // all through the injection.
    let mut engine = Engine::start(
        &config_with(1024 * 1024, &policy(&slow)),
        &state.path().join("engine"),
    )
    .expect("engine start");

    let total: u32 = 30_000;
    let slow_every: u32 = 25;
    let acked = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let injectors: u32 = 4;
    let mut threads = Vec::new();
    for injector in 0..injectors {
        let sequences: Vec<u32> = (0..total)
            .filter(|seq| seq % injectors == injector)
            .collect();
        let (acked, stop) = (acked.clone(), stop.clone());
        let socket = engine.socket(Lane::Bulk).to_path_buf();
        threads.push(std::thread::spawn(move || {
            inject_mixed(
                &socket,
                sequences,
                &move |sequence| {
                    if sequence % slow_every == 0 {
                        "slow.test"
                    } else {
                        "fast.test"
                    }
                },
                &|_| 1500,
                &acked,
                &stop,
            )
        }));
    }
    // Kill once compaction has moved messages many times, in the middle of
    // the injection.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let passes = engine.stderr().matches("compaction: moved").count();
        if passes >= 20 && acked.lock().expect("acked lock").len() >= 10_000 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "compaction never ran ({passes} passes)\n{}",
            engine.stderr()
        );
        assert!(
            threads.iter().any(|thread| !thread.is_finished()),
            "injection ended before compaction ran 20 times\n{}",
            engine.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    engine.sigkill().expect("SIGKILL");
    stop.store(true, Ordering::Release);
    for thread in threads {
        thread.join().expect("injector thread");
    }
    engine
        .wait_exit(Duration::from_secs(30))
        .expect("engine exit");
    let acked = acked.lock().expect("acked lock").clone();
    drop(engine);

    // Restart with the deferred destination routed to the accepting
    // receiver, so every acknowledged message must arrive.
    let mut engine = Engine::start(
        &config_with(1024 * 1024, &policy(&receiver)),
        &state.path().join("engine"),
    )
    .expect("engine restart");
    let config_path = engine.state_dir().join("caduceus.toml");
    common::caduceus(&["queue", "requeue", "slow.test", "--config"], &config_path);
    let copies = wait_for_sequences(&receiver, &acked, &engine, Duration::from_secs(120));
    let duplicates: usize = copies.values().map(|count| count - 1).sum();
    eprintln!(
        "sigkill during compaction: {} acknowledged, {} delivered, {duplicates} duplicates (bound {MAX_CONNECTIONS})",
        acked.len(),
        copies.len()
    );
    assert!(
        duplicates <= MAX_CONNECTIONS,
        "{duplicates} duplicates exceed the {MAX_CONNECTIONS} deliveries that can be in flight"
    );
    stop_engine(&mut engine);

    let verify = common::caduceus(&["spool", "verify", "--config"], &config_path);
    assert!(verify.contains(", 0 problems"), "{verify}");
}
