//! Consent, suppression and policy reload against a running engine.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use caduceus_tests::{
    Engine, Lane, Postfix, PostfixOptions, Script, ScriptedReceiver, SmtpClient, Swaks,
};
use common::{WAIT, caduceus, engine_config, inject, listen_addr, state_dir, wait_for_log};

fn config_path(engine: &Engine) -> std::path::PathBuf {
    engine.state_dir().join("caduceus.toml")
}

/// Connects to a lane socket and reads the greeting.
fn connect(socket: &std::path::Path) -> SmtpClient {
    let mut client = SmtpClient::connect_unix(socket).expect("connect");
    assert_eq!(client.read_reply().expect("greeting").code, 220);
    client
}

/// Connects to a lane socket, sends EHLO and a MAIL FROM that must get
/// 250, and returns the client ready for RCPT.
fn start_transaction(socket: &std::path::Path, helo: &str, sender: &str) -> SmtpClient {
    let mut client = connect(socket);
    client.command(&format!("EHLO {helo}")).expect("EHLO");
    let reply = client
        .command(&format!("MAIL FROM:<{sender}>"))
        .expect("MAIL");
    assert_eq!(reply.code, 250, "{}", reply.text());
    client
}

fn rcpt_code(client: &mut SmtpClient, address: &str) -> u16 {
    client
        .command(&format!("RCPT TO:<{address}>"))
        .expect("RCPT reply")
        .code
}

#[test]
fn marketing_needs_consent_and_suppression_applies_to_both_lanes() {
    let receiver =
        ScriptedReceiver::start(common::any_port(80), Script::default()).expect("receiver start");
    let state = state_dir();
    let config = format!(
        "{}\n[[rule]]\ndomain = \"patients.test\"\nroute = \"{}\"\n",
        engine_config(None),
        receiver.addr()
    );
    let engine = Engine::start(&config, &state.path().join("engine")).expect("engine start");
    let config_file = config_path(&engine);
    caduceus(
        &["consent", "add", "opted-in@patients.test", "--config"],
        &config_file,
    );
    caduceus(
        &[
            "suppress",
            "add",
            "complained@patients.test",
            "--reason",
            "complaint",
            "--config",
        ],
        &config_file,
    );

    // The bulk socket's default category is marketing.
    let mut client = start_transaction(
        engine.socket(Lane::Bulk),
        "campaigns.test",
        "news@clinic.test",
    );
    assert_eq!(rcpt_code(&mut client, "no-consent@patients.test"), 550);
    assert_eq!(rcpt_code(&mut client, "opted-in@patients.test"), 250);
    assert_eq!(rcpt_code(&mut client, "complained@patients.test"), 550);
    assert_eq!(client.command("DATA").expect("DATA").code, 354);
    client
        .send_raw(b"Subject: screening\r\n\r\nBook your screening.\r\n.\r\n")
        .expect("body");
    assert_eq!(client.read_reply().expect("final reply").code, 250);

    // Transactional mail needs no consent but honours the complaint.
    let mut client = start_transaction(
        engine.socket(Lane::Transactional),
        "ehr.test",
        "reminders@clinic.test",
    );
    assert_eq!(rcpt_code(&mut client, "no-consent@patients.test"), 250);
    assert_eq!(rcpt_code(&mut client, "complained@patients.test"), 550);

    let received = receiver
        .wait_for(1, WAIT)
        .expect("the consented recipient's copy");
    assert_eq!(received[0].rcpt_to.len(), 1, "{:?}", received[0].rcpt_to);
    assert!(received[0].rcpt_to[0].contains("opted-in@patients.test"));

    let check = caduceus(
        &["suppress", "check", "complained@patients.test", "--config"],
        &config_file,
    );
    assert!(check.contains("complaint"), "{check}");
    let audit = common::control_audit(engine.state_dir());
    assert!(audit.contains("suppress.add"), "{audit}");
    assert!(
        !audit.contains("complained@patients.test"),
        "the audit log holds the address's HMAC, not the address: {audit}"
    );
}

#[test]
fn quoted_local_part_cannot_skip_suppression() {
    // "pat" and pat name one mailbox. A hard bounce recorded for
    // pat@patients.test let RCPT TO:<"pat"@patients.test> through.
    let state = state_dir();
    let engine =
        Engine::start(&engine_config(None), &state.path().join("engine")).expect("engine start");
    let config_file = config_path(&engine);
    caduceus(
        &[
            "suppress",
            "add",
            "pat@patients.test",
            "--reason",
            "hard-bounce",
            "--config",
        ],
        &config_file,
    );
    caduceus(
        &[
            "suppress",
            "add",
            "\"lee\"@patients.test",
            "--reason",
            "complaint",
            "--config",
        ],
        &config_file,
    );

    let mut client = start_transaction(
        engine.socket(Lane::Transactional),
        "ehr.test",
        "reminders@clinic.test",
    );
    assert_eq!(rcpt_code(&mut client, "pat@patients.test"), 550);
    assert_eq!(rcpt_code(&mut client, "\"pat\"@patients.test"), 550);
    assert_eq!(rcpt_code(&mut client, "\"p\\at\"@patients.test"), 550);
    assert_eq!(rcpt_code(&mut client, "lee@patients.test"), 550);
    assert_eq!(rcpt_code(&mut client, "\"pat \"@patients.test"), 250);
}

#[test]
fn suppress_remove_shows_remaining_reasons() {
    // `suppress remove` takes --reason, default opt-out. Removing an
    // address that had only a hard bounce returned {"ok":true}, so the
    // operator believed it was released while RCPT still got 550.
    let state = state_dir();
    let engine =
        Engine::start(&engine_config(None), &state.path().join("engine")).expect("engine start");
    let config_file = config_path(&engine);
    caduceus(
        &[
            "suppress",
            "add",
            "pat@patients.test",
            "--reason",
            "hard-bounce",
            "--config",
        ],
        &config_file,
    );

    let removed = caduceus(
        &["suppress", "remove", "pat@patients.test", "--config"],
        &config_file,
    );

    let reply: serde_json::Value = serde_json::from_str(&removed).expect("JSON reply");
    assert_eq!(reply["ok"], true, "{removed}");
    assert_eq!(
        reply["suppressed"],
        serde_json::json!(["hard-bounce"]),
        "{removed}"
    );
    assert_eq!(reply["consent"], false, "{removed}");

    let removed = caduceus(
        &[
            "suppress",
            "remove",
            "pat@patients.test",
            "--reason",
            "hard-bounce",
            "--config",
        ],
        &config_file,
    );
    let reply: serde_json::Value = serde_json::from_str(&removed).expect("JSON reply");
    assert_eq!(reply["suppressed"], serde_json::json!([]), "{removed}");
}

#[test]
fn queue_list_shows_policy_holds() {
    // Mail that a rule's `hold`, or a lane that a reload barred, keeps
    // queued was listed with HELD "no", although nothing was delivered.
    let state = state_dir();
    let config = format!(
        "{}\n[[rule]]\ndomain = \"held.test\"\nhold = true\n\n[[rule]]\ndomain = \"barred.test\"\nroute = \"127.0.0.1:9\"\n",
        engine_config(None)
    );
    let engine = Engine::start(&config, &state.path().join("engine")).expect("engine start");
    let config_file = config_path(&engine);
    for domain in ["held.test", "barred.test"] {
        let acked = common::inject_parallel(engine.socket(Lane::Bulk), domain, 0..1, 1);
        assert_eq!(acked.len(), 1, "{domain}");
    }
    let text = std::fs::read_to_string(&config_file).expect("config");
    std::fs::write(
        &config_file,
        text.replace(
            "domain = \"barred.test\"\n",
            "domain = \"barred.test\"\nlanes = [\"transactional\"]\n",
        ),
    )
    .expect("write config");
    caduceus(&["policy", "reload", "--config"], &config_file);

    let listing = caduceus(&["queue", "list", "--config"], &config_file);

    let held_column = |domain: &str| -> String {
        let line = listing
            .lines()
            .find(|line| line.starts_with(domain))
            .unwrap_or_else(|| panic!("{domain} missing from:\n{listing}"));
        line.split_whitespace()
            .nth(2)
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(held_column("held.test"), "policy", "{listing}");
    assert_eq!(held_column("barred.test"), "policy", "{listing}");
}

#[test]
fn reload_reports_the_file_the_engine_reads() {
    // `policy reload --config OTHER` checked OTHER but the engine reloaded
    // its own file and printed "policy reloaded", so an operator who edited
    // a copy believed its rules were in force.
    let state = state_dir();
    let engine =
        Engine::start(&engine_config(None), &state.path().join("engine")).expect("engine start");
    let engine_file = config_path(&engine);
    let copy = state.path().join("edited-copy.toml");
    let text = std::fs::read_to_string(&engine_file).expect("config");
    std::fs::write(
        &copy,
        format!("{text}\n[[rule]]\ndomain = \"edited.test\"\nhold = true\n"),
    )
    .expect("write copy");

    let output = std::process::Command::new(common::binary())
        .args(["policy", "reload", "--config"])
        .arg(&copy)
        .output()
        .expect("run reload");

    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let engine_file = engine_file.canonicalize().expect("canonical path");
    assert!(
        stdout.contains(&engine_file.display().to_string()),
        "{stdout}"
    );
    assert!(stderr.contains("warning"), "{stderr}");
    assert!(stderr.contains(&copy.display().to_string()), "{stderr}");

    let output = std::process::Command::new(common::binary())
        .args(["policy", "reload", "--config"])
        .arg(&engine_file)
        .output()
        .expect("run reload");
    assert!(output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("warning"), "{stderr}");
}

#[test]
fn no_such_user_bounce_suppresses_the_address() {
    let listen = listen_addr(82);
    let _postfix = Postfix::start(PostfixOptions {
        recipient_access: vec![("gone@example.test".into(), "550 5.1.1 no such user".into())],
        ..PostfixOptions::receiver(listen, &["example.test", "clinic.test"])
    })
    .expect("postfix start");
    let state = state_dir();
    let config = format!(
        "{}\n[[rule]]\ndomain = \"example.test\"\nroute = \"{listen}\"\n\n[[rule]]\ndomain = \"clinic.test\"\nroute = \"{listen}\"\n",
        engine_config(None)
    );
    let engine = Engine::start(&config, &state.path().join("engine")).expect("engine start");
    let output = Swaks::socket(engine.socket(Lane::Transactional))
        .from("reminders@clinic.test")
        .to("gone@example.test")
        .run()
        .expect("swaks");
    assert!(output.status.success(), "{output:?}");
    wait_for_log(&engine, |entry| entry["event"] == "bounced", WAIT);
    let config_file = config_path(&engine);
    common::wait_until(WAIT, || {
        caduceus(
            &["suppress", "check", "gone@example.test", "--config"],
            &config_file,
        )
        .contains("hard-bounce")
    });
    let mut client = start_transaction(
        engine.socket(Lane::Transactional),
        "ehr.test",
        "reminders@clinic.test",
    );
    assert_eq!(rcpt_code(&mut client, "gone@example.test"), 550);
}

#[test]
fn reload_under_load_loses_nothing_and_rejects_a_broken_policy() {
    let receiver =
        ScriptedReceiver::start(common::any_port(84), Script::default()).expect("receiver start");
    let state = state_dir();
    let config = format!(
        "{}\n[[rule]]\ndomain = \"reload.test\"\nroute = \"{}\"\n",
        engine_config(None),
        receiver.addr()
    );
    let engine = Engine::start(&config, &state.path().join("engine")).expect("engine start");
    let config_file = config_path(&engine);
    let socket = engine.socket(Lane::Bulk).to_path_buf();
    let acked = Arc::new(Mutex::new(Vec::new()));
    let injectors: Vec<_> = (0..4u32)
        .map(|part| {
            let (socket, acked) = (socket.clone(), acked.clone());
            std::thread::spawn(move || {
                let sequences = (0..20_000)
                    .filter(|sequence| sequence % 4 == part)
                    .collect();
                inject(
                    &socket,
                    "reload.test",
                    sequences,
                    &acked,
                    &AtomicBool::new(false),
                );
            })
        })
        .collect();
    for _ in 0..50 {
        caduceus(&["policy", "reload", "--config"], &config_file);
        std::thread::sleep(Duration::from_millis(20));
    }
    // A broken policy is rejected with its location, both by the CLI and
    // by the engine on SIGHUP, and the old policy stays in force.
    let good = std::fs::read_to_string(&config_file).expect("config");
    let broken_line = good.lines().count() + 4;
    std::fs::write(
        &config_file,
        format!("{good}\n[[rule]]\ndomain = \"x.test\"\nrate = -1.0\n"),
    )
    .expect("write broken config");
    let output = std::process::Command::new(common::binary())
        .args(["policy", "reload", "--config"])
        .arg(&config_file)
        .output()
        .expect("run reload");
    assert!(!output.status.success(), "a broken policy was accepted");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let location = format!("caduceus.toml:{broken_line}:");
    assert!(
        stderr.contains(&location),
        "expected {location} in {stderr}"
    );
    let pid = nix::unistd::Pid::from_raw(engine.pid().expect("pid") as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    common::wait_until(WAIT, || engine.stderr().contains("reload rejected"));
    let log = engine.stderr();
    assert!(log.contains("previous policy stays in force"), "{log}");
    assert!(log.contains(&location), "{log}");
    std::fs::write(&config_file, good).expect("restore config");

    for injector in injectors {
        injector.join().expect("injector");
    }
    let acked = acked.lock().expect("acked").clone();
    assert_eq!(acked.len(), 20_000);
    receiver
        .wait_for(20_000, Duration::from_secs(120))
        .expect("every message delivered across 50 reloads");
}

#[test]
fn mx_rule_paces_every_domain_of_its_site() {
    use caduceus_tests::{DnsRecord, Dnsmasq};
    // Two domains with no rule of their own, whose MX hosts both match one
    // `mx` rule at 20 msgs/s: together they must stay at 20/s.
    let receiver =
        ScriptedReceiver::start(common::any_port(88), Script::default()).expect("receiver start");
    let dns = Dnsmasq::start(&[
        DnsRecord::Mx {
            domain: "one.test".into(),
            host: "mx1.site.test".into(),
            preference: 10,
        },
        DnsRecord::Mx {
            domain: "two.test".into(),
            host: "mx2.site.test".into(),
            preference: 10,
        },
        DnsRecord::A {
            name: "mx1.site.test".into(),
            addr: common::loopback(88),
        },
        DnsRecord::A {
            name: "mx2.site.test".into(),
            addr: common::loopback(88),
        },
    ])
    .expect("dnsmasq start");

    let state = state_dir();
    let config = format!(
        "{}\n[delivery]\nsmtp_port = {}\n\n[[rule]]\nmx = \"*.site.test\"\nrate = 20.0\nburst = 2\n",
        engine_config(Some(dns.addr())),
        receiver.addr().port()
    );
    let engine = Engine::start(&config, &state.path().join("engine")).expect("engine start");
    for domain in ["one.test", "two.test"] {
        let acked = common::inject_parallel(engine.socket(Lane::Bulk), domain, 0..100, 2);
        assert_eq!(acked.len(), 100, "{domain}");
    }

    let received = receiver
        .wait_for(200, Duration::from_secs(60))
        .expect("every message delivered");
    let mut times: Vec<u64> = received
        .iter()
        .map(|message| message.received_micros)
        .collect();
    times.sort_unstable();

    let (busiest, sustained) = common::window_and_rate(&times);
    eprintln!("mx site: busiest one-second window {busiest}, sustained {sustained:.1}/s");
    let window_limit = ((20 + 2) as f64 * 1.05) as usize;
    assert!(
        busiest <= window_limit,
        "{busiest} messages in one second exceed {window_limit}"
    );
    assert!(
        (sustained - 20.0).abs() <= 2.0,
        "sustained rate {sustained:.1}/s is not within 10% of 20/s"
    );
}

/// Returns the sum of every `name{...} value` sample and the maximum of
/// them, from the engine's `/metrics` page at `addr`.
fn scrape(addr: std::net::SocketAddr, name: &str) -> (f64, f64) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to /metrics");
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: caduceus\r\n\r\n")
        .expect("send the /metrics request");
    let mut page = String::new();
    stream
        .read_to_string(&mut page)
        .expect("read the /metrics page");
    let prefix = format!("{name}{{");
    let values: Vec<f64> = page
        .lines()
        .filter(|line| line.starts_with(&prefix))
        .filter_map(|line| line.rsplit(' ').next()?.parse().ok())
        .collect();
    assert!(!values.is_empty(), "no {name} samples in:\n{page}");
    (
        values.iter().sum(),
        values.iter().copied().fold(0.0, f64::max),
    )
}

/// Returns `count` rules in the same mix as the policy benchmark: three in
/// four exact names, one in four wildcards.
fn benchmark_rules(count: u32) -> String {
    let mut rules = String::new();
    for n in 0..count {
        let domain = if n % 4 == 3 {
            format!("*.tenant{n}.example")
        } else {
            format!("partner{n}.example")
        };
        rules.push_str(&format!(
            "\n[[rule]]\ndomain = \"{domain}\"\ntls = \"verified\"\nmax_connections = {}\n",
            1 + n % 8
        ));
    }
    rules
}

/// Measures the executor stall caused by reloading a policy of 100,000
/// domain rules while 20,000 messages are delivered, from the engine's
/// stall watchdog (`caduceus_executor_stall_max_seconds`, a wake-up of its
/// 10 ms timer at least 10 ms late). Prints the longest stall and the
/// stall count before and after the reloads, and asserts that no message
/// is lost. Ignored by default because it took 144 s on the 2-vCPU
/// machine that docs/benchmarks.md describes, which also records the
/// figures.
#[test]
#[ignore = "measurement; run with --ignored --nocapture"]
fn reload_stall_with_100k_rules() {
    const RULES: u32 = 100_000;
    const RELOADS: u32 = 10;
    const MESSAGES: u32 = 20_000;

    let receiver =
        ScriptedReceiver::start(common::any_port(85), Script::default()).expect("receiver start");
    let metrics = listen_addr(85);
    let state = state_dir();
    let mut config = format!(
        "{}\n[metrics]\nlisten = \"{metrics}\"\n\n[[rule]]\ndomain = \"reload.test\"\nroute = \"{}\"\n",
        engine_config(None),
        receiver.addr()
    );
    config.push_str(&benchmark_rules(RULES));
    let engine = Engine::start(&config, &state.path().join("engine")).expect("engine start");
    let config_file = config_path(&engine);
    let socket = engine.socket(Lane::Bulk).to_path_buf();

    let acked = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let injectors: Vec<_> = (0..4u32)
        .map(|part| {
            let (socket, acked, stop) = (socket.clone(), acked.clone(), stop.clone());
            std::thread::spawn(move || {
                let sequences = (0..MESSAGES)
                    .filter(|sequence| sequence % 4 == part)
                    .collect();
                inject(&socket, "reload.test", sequences, &acked, &stop);
            })
        })
        .collect();

    // Load without reloads first, so that stalls caused by load alone are
    // counted before the reloads start.
    common::wait_until(WAIT, || acked.lock().expect("acked").len() >= 2_000);
    std::thread::sleep(Duration::from_secs(1));
    let stall_name = "caduceus_executor_stall_max_seconds";
    let count_name = "caduceus_executor_stalls_total";
    let (_, max_before) = scrape(metrics, stall_name);
    let (count_before, _) = scrape(metrics, count_name);
    let acked_before = acked.lock().expect("acked").len();

    let mut reload_ms = Vec::new();
    for _ in 0..RELOADS {
        let started = std::time::Instant::now();
        caduceus(&["policy", "reload", "--config"], &config_file);
        reload_ms.push(started.elapsed().as_millis());
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, max_after) = scrape(metrics, stall_name);
    let (count_after, _) = scrape(metrics, count_name);
    let acked_after = acked.lock().expect("acked").len();

    for injector in injectors {
        injector.join().expect("injector");
    }
    let acked = acked.lock().expect("acked").clone();
    assert_eq!(acked.len(), MESSAGES as usize);
    receiver
        .wait_for(MESSAGES as usize, Duration::from_secs(120))
        .expect("every message delivered across the reloads");
    println!(
        "reload stall: rules={RULES} reloads={RELOADS} reload_ms={reload_ms:?} \
         acked_during_reloads={} stall_max_before_ms={:.1} stall_max_after_ms={:.1} \
         stalls_before={count_before} stalls_during_reloads={}",
        acked_after - acked_before,
        max_before * 1e3,
        max_after * 1e3,
        count_after - count_before
    );
}

const COMPILED_AND_WROTE: &str = "policy: compiled and wrote the compiled file";
const MAPPED: &str = "policy: mapped compiled file";

fn compiled_file(engine: &Engine) -> std::path::PathBuf {
    engine.state_dir().join("policy.compiled")
}

/// Counts the occurrences of `line` in the engine's log, which collects
/// the output of every start in one state directory.
fn log_count(engine: &Engine, line: &str) -> usize {
    engine.stderr().matches(line).count()
}

fn restart(engine: &mut Engine) {
    engine.restart().expect("engine restart");
}

#[test]
fn compiled_policy_written_then_mapped() {
    let state = state_dir();
    let config = format!(
        "{}\n[[rule]]\ndomain = \"paced.test\"\nrate = 5.0\n",
        engine_config(None)
    );
    let mut engine = Engine::start(&config, &state.path().join("engine")).expect("engine start");
    let log = engine.stderr();
    assert_eq!(log.matches(COMPILED_AND_WROTE).count(), 1, "{log}");
    assert!(log.contains("there was no compiled file"), "{log}");
    assert_eq!(log.matches(MAPPED).count(), 0, "{log}");
    let written = std::fs::read(compiled_file(&engine)).expect("the start wrote the file");

    restart(&mut engine);
    let log = engine.stderr();
    assert_eq!(log.matches(MAPPED).count(), 1, "{log}");
    assert!(log.contains("rules=2"), "{log}");
    assert_eq!(log.matches(COMPILED_AND_WROTE).count(), 1, "{log}");
    assert_eq!(
        std::fs::read(compiled_file(&engine)).expect("compiled file"),
        written,
        "a start that maps the file must not rewrite it"
    );

    // Comments and layout are not part of the digest.
    let config_file = config_path(&engine);
    let text = std::fs::read_to_string(&config_file).expect("config");
    std::fs::write(&config_file, format!("# Reformatted.\n\n{text}\n\n")).expect("write config");
    restart(&mut engine);
    assert_eq!(log_count(&engine, MAPPED), 2, "{}", engine.stderr());
}

#[test]
fn compiled_policy_recompiled_after_config_change() {
    let state = state_dir();
    let mut engine =
        Engine::start(&engine_config(None), &state.path().join("engine")).expect("engine start");
    let config_file = config_path(&engine);
    let text = std::fs::read_to_string(&config_file).expect("config");
    std::fs::write(
        &config_file,
        format!("{text}\n[[rule]]\ndomain = \"added.test\"\nhold = true\n"),
    )
    .expect("write config");

    restart(&mut engine);
    let log = engine.stderr();
    assert_eq!(log.matches(COMPILED_AND_WROTE).count(), 2, "{log}");
    assert!(
        log.contains("compiled from another config or by another build"),
        "{log}"
    );
    assert_eq!(log.matches(MAPPED).count(), 0, "{log}");

    restart(&mut engine);
    let log = engine.stderr();
    assert_eq!(log.matches(MAPPED).count(), 1, "{log}");
    assert!(log.contains("rules=2"), "{log}");
}

#[test]
fn damaged_compiled_policy_replaced_with_warning() {
    let state = state_dir();
    let mut engine =
        Engine::start(&engine_config(None), &state.path().join("engine")).expect("engine start");
    let path = compiled_file(&engine);
    let good = std::fs::read(&path).expect("compiled file");
    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x01;
    let cases: [(&str, Vec<u8>, &str); 4] = [
        (
            "truncated",
            good[..good.len() / 2].to_vec(),
            "truncated or damaged",
        ),
        ("empty", Vec::new(), "too short for a compiled policy"),
        (
            "flipped archive bit",
            flipped,
            "archive checksum does not match",
        ),
        (
            "other file",
            b"[[rule]]\ndomain = \"x.example\"\n".to_vec(),
            "wrong magic",
        ),
    ];

    let mut warnings = 0;
    for (case, bytes, reason) in cases {
        std::fs::write(&path, &bytes).expect("damage the file");
        restart(&mut engine);
        warnings += 1;
        let log = engine.stderr();
        assert_eq!(
            log.matches("the compiled file cannot be used").count(),
            // One line for the warning and one for the reason of the
            // compile that follows it.
            2 * warnings,
            "{case}: {log}"
        );
        assert!(log.contains(reason), "{case}: expected {reason:?} in {log}");
        assert!(log.contains(" WARN "), "{case}: {log}");
        assert_eq!(
            std::fs::read(&path).expect("compiled file"),
            good,
            "{case}: the file was not replaced"
        );
    }

    // A file that group or others may write could change under the
    // mapping, so it is replaced too.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    restart(&mut engine);
    let log = engine.stderr();
    assert!(log.contains("chmod go-w"), "{log}");
    let mode = std::fs::metadata(&path)
        .expect("compiled file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    restart(&mut engine);
    assert_eq!(log_count(&engine, MAPPED), 1, "{}", engine.stderr());
}

#[test]
fn compiled_policy_prepared_by_cli_is_mapped() {
    let state = state_dir();
    let config = format!(
        "{}\n[[rule]]\ndomain = \"prepared.test\"\ntls = \"verified\"\n",
        engine_config(None)
    );
    let mut engine = Engine::start(&config, &state.path().join("engine")).expect("engine start");
    engine.sigterm().expect("SIGTERM");
    engine.wait_exit(WAIT).expect("engine exit");
    let path = compiled_file(&engine);
    std::fs::remove_file(&path).expect("remove the compiled file");

    let output = caduceus(
        &[
            "policy",
            "compile",
            "--out",
            path.to_str().expect("UTF-8 path"),
            "--config",
        ],
        &config_path(&engine),
    );
    assert!(output.contains("2 rules compiled"), "{output}");
    restart(&mut engine);
    let log = engine.stderr();
    assert_eq!(log.matches(MAPPED).count(), 1, "{log}");
    assert_eq!(log.matches(COMPILED_AND_WROTE).count(), 1, "{log}");
}

#[test]
fn reload_picks_up_new_rule() {
    let receiver =
        ScriptedReceiver::start(common::any_port(86), Script::default()).expect("receiver start");
    let state = state_dir();
    let engine =
        Engine::start(&engine_config(None), &state.path().join("engine")).expect("engine start");
    let config_file = config_path(&engine);
    let text = std::fs::read_to_string(&config_file).expect("config");
    std::fs::write(
        &config_file,
        format!(
            "{text}\n[[rule]]\ndomain = \"late.test\"\nroute = \"{}\"\n",
            receiver.addr()
        ),
    )
    .expect("write config");

    let output = caduceus(&["policy", "reload", "--config"], &config_file);
    assert!(output.contains("policy reloaded from "), "{output}");
    assert!(output.contains("(2 rules)"), "{output}");
    let log = engine.stderr();
    assert_eq!(log.matches(COMPILED_AND_WROTE).count(), 2, "{log}");
    assert!(
        log.contains("compiled from another config or by another build"),
        "{log}"
    );

    // Without the new rule, late.test would need DNS, which nothing
    // answers in these tests, so a delivery shows that the rule applies.
    let acked = Mutex::new(Vec::new());
    inject(
        engine.socket(Lane::Bulk),
        "late.test",
        vec![1],
        &acked,
        &AtomicBool::new(false),
    );
    assert_eq!(*acked.lock().expect("acked"), vec![1]);
    receiver
        .wait_for(1, WAIT)
        .expect("the message routed by the reloaded rule");

    // A reload of an unchanged config maps the file that the last one
    // wrote, on SIGHUP too.
    let pid = nix::unistd::Pid::from_raw(engine.pid().expect("pid") as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    common::wait_until(WAIT, || engine.stderr().contains("reloaded on SIGHUP"));
    let log = engine.stderr();
    assert_eq!(log.matches(MAPPED).count(), 1, "{log}");
    assert_eq!(log.matches(COMPILED_AND_WROTE).count(), 2, "{log}");
}

/// Measures the start of the engine with the 100,000 benchmark rules, with
/// and without a valid `policy.compiled`, and the time of one reload over
/// the control socket with the config unchanged (the file matches) and
/// changed (the policy is compiled). Each start is timed from spawning the
/// process to both lane sockets existing (`sockets_ms`) and to the log's
/// `engine: started` line (`started_ms`). Runs `$CADUCEUS_BIN` when set, so
/// that two builds can be compared in turn. Ignored by default because it
/// prints figures rather than checking them (10 to 13 s per run on the
/// 2-vCPU machine of docs/benchmarks.md).
#[test]
#[ignore = "measurement; run with --ignored --nocapture"]
fn start_and_reload_time_with_100k_rules() {
    const RULES: u32 = 100_000;
    const ROUNDS: u32 = 3;

    let state = state_dir();
    let config = format!("{}{}", engine_config(None), benchmark_rules(RULES));
    let mut engine = Engine::start(&config, &state.path().join("engine")).expect("engine start");
    let config_file = config_path(&engine);
    let control_socket = engine.state_dir().join("run").join("control.sock");
    let compiled = compiled_file(&engine);
    let mut starts = 1;

    let mut timed_start = |engine: &mut Engine, keep_file: bool| {
        engine.sigterm().expect("SIGTERM");
        engine.wait_exit(WAIT).expect("engine exit");
        // A build from before the compiled file existed never writes it.
        if !keep_file && compiled.exists() {
            std::fs::remove_file(&compiled).expect("remove the compiled file");
        }
        let started = std::time::Instant::now();
        restart(engine);
        let sockets_ms = started.elapsed().as_millis();
        starts += 1;
        common::wait_until(WAIT, || log_count(engine, "engine: started") == starts);
        (sockets_ms, started.elapsed().as_millis())
    };
    let timed_reload = || {
        let started = std::time::Instant::now();
        let response = caduceus_engine::control::request(
            &control_socket,
            &serde_json::json!({"command": "policy.reload"}),
        )
        .expect("reload");
        assert_eq!(response["ok"], true, "{response}");
        started.elapsed().as_millis()
    };

    let mut without_file = Vec::new();
    let mut with_file = Vec::new();
    let mut reload_unchanged = Vec::new();
    let mut reload_changed = Vec::new();
    for round in 0..ROUNDS {
        without_file.push(timed_start(&mut engine, false));
        with_file.push(timed_start(&mut engine, true));
        reload_unchanged.push(timed_reload());
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&config_file)
            .expect("config");
        std::io::Write::write_all(
            &mut file,
            format!("\n[[rule]]\ndomain = \"added{round}.example\"\nhold = true\n").as_bytes(),
        )
        .expect("append a rule");
        reload_changed.push(timed_reload());
    }
    let file_bytes = std::fs::metadata(&compiled).map_or(0, |metadata| metadata.len());
    println!(
        "start and reload: rules={RULES} binary={} compiled_file_bytes={file_bytes} \
         start_without_file_ms(sockets_ms, started_ms)={without_file:?} \
         start_with_file_ms(sockets_ms, started_ms)={with_file:?} \
         reload_unchanged_ms={reload_unchanged:?} reload_changed_ms={reload_changed:?}",
        caduceus_tests::engine_binary().expect("binary").display()
    );
    println!("policy lines of the engine log:");
    for line in engine
        .stderr()
        .lines()
        .filter(|line| line.contains("policy: "))
    {
        println!("  {line}");
    }
}

#[test]
fn rate_wait_ends_on_reload_and_on_drain() {
    // rate = 0.001 gives one token, then one more every 1,000 s. The
    // second message waits for it until a reload removes the rate.
    let receiver =
        ScriptedReceiver::start(common::any_port(97), Script::default()).expect("receiver start");
    let state = state_dir();
    let config = format!(
        "{}\n[[rule]]\ndomain = \"slow.test\"\nroute = \"{}\"\nrate = 0.001\n",
        engine_config(None),
        receiver.addr()
    );
    let mut engine = Engine::start(&config, &state.path().join("engine")).expect("engine start");
    let acked = Mutex::new(Vec::new());
    inject(
        engine.socket(Lane::Transactional),
        "slow.test",
        vec![1, 2],
        &acked,
        &AtomicBool::new(false),
    );
    assert_eq!(acked.lock().expect("acked").len(), 2);
    receiver.wait_for(1, WAIT).expect("the first message");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(receiver.received().len(), 1, "the second message waits");

    let config_file = config_path(&engine);
    let text = std::fs::read_to_string(&config_file).expect("config");
    std::fs::write(&config_file, text.replace("rate = 0.001\n", "")).expect("write config");
    caduceus(&["policy", "reload", "--config"], &config_file);
    receiver
        .wait_for(2, Duration::from_secs(10))
        .expect("the second message once the reload removed the rate");

    // With the rate back, the destination's bucket is still empty, so a
    // third message waits again, and SIGTERM ends that wait at once
    // instead of after the 30 s drain limit.
    std::fs::write(&config_file, &text).expect("write config");
    caduceus(&["policy", "reload", "--config"], &config_file);
    let acked = Mutex::new(Vec::new());
    inject(
        engine.socket(Lane::Transactional),
        "slow.test",
        vec![3],
        &acked,
        &AtomicBool::new(false),
    );
    assert_eq!(acked.lock().expect("acked").len(), 1);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(receiver.received().len(), 2, "the third message waits");
    let started = std::time::Instant::now();
    engine.sigterm().expect("SIGTERM");
    let status = engine
        .wait_exit(Duration::from_secs(25))
        .expect("the engine exits before the 30 s drain limit");
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "drain took {:?}",
        started.elapsed()
    );
    assert_eq!(
        receiver.received().len(),
        2,
        "the third message stays queued"
    );
}
