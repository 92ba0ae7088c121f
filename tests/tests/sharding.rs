//! Destination sharding: with two bulk executors, each destination is
//! delivered by one home executor, whichever executor accepted the
//! message, so per-destination limits hold for the lane as a whole.
//!
//! A two-CPU machine has no second spare CPU for bulk mail, so these tests
//! use `lanes.allow_shared_cpus` to run the second bulk executor on the
//! transactional lane's CPU, the allocation the scaling benchmark uses.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use caduceus_tests::{Engine, Lane, Script, ScriptedReceiver};
use common::{engine_config, state_dir, wait_until};

/// Builds a config with two bulk executors, followed by `rules`. It logs
/// recipients in the clear so that tests can read their domains.
fn two_bulk_executors(rules: &str) -> String {
    format!(
        "recipient_logging = \"clear\"\n{}\n[lanes]\nallow_shared_cpus = true\n\n[lanes.transactional]\ncores = [0]\n\n[lanes.bulk]\ncores = [0, 1]\n\n{rules}",
        engine_config(None)
    )
}

/// Reads each executor's own delivery log files
/// (`delivery.<core>.<day>.<generation>.log`) and returns, per
/// (core, event, recipient domain), the number of lines. The config logs
/// recipients in the clear, so the domain is readable.
fn events_per_core(state_dir: &Path) -> HashMap<(u16, String, String), usize> {
    let mut counts = HashMap::new();
    let dir = state_dir.join("log");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return counts;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(core) = name
            .strip_prefix("delivery.")
            .and_then(|rest| rest.split('.').next())
            .and_then(|core| core.parse::<u16>().ok())
        else {
            continue;
        };
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        for line in text.lines() {
            let Ok(value) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let (Some(event), Some(recipient)) =
                (value["event"].as_str(), value["recipient"].as_str())
            else {
                continue;
            };
            let domain = recipient.rsplit('@').next().unwrap_or("").to_string();
            *counts.entry((core, event.to_string(), domain)).or_default() += 1;
        }
    }
    counts
}

/// Returns the cores that logged `event` for `domain`.
fn cores_with(
    counts: &HashMap<(u16, String, String), usize>,
    event: &str,
    domain: &str,
) -> Vec<u16> {
    let mut cores: Vec<u16> = counts
        .keys()
        .filter(|(_, logged, logged_domain)| logged == event && logged_domain == domain)
        .map(|(core, _, _)| *core)
        .collect();
    cores.sort_unstable();
    cores
}

#[test]
fn home_executor_paces_whole_lane() {
    // FNV-1a sends paced.test to the first bulk executor (core 1) and
    // alpha.test to the second (core 2), so whichever executor accepts a
    // message, the mail of at least one domain is handed over.
    const DOMAINS: [&str; 2] = ["paced.test", "alpha.test"];
    let receiver =
        ScriptedReceiver::start(common::any_port(86), Script::default()).expect("receiver start");
    let state = state_dir();
    let mut rules = String::new();
    for domain in DOMAINS {
        rules.push_str(&format!(
            "[[rule]]\ndomain = \"{domain}\"\nroute = \"{}\"\nrate = 100.0\nburst = 10\n\n",
            receiver.addr()
        ));
    }
    let config = two_bulk_executors(&rules);
    let engine = Engine::start(&config, &state.path().join("engine")).expect("engine start");
    std::thread::scope(|scope| {
        for domain in DOMAINS {
            let socket = engine.socket(Lane::Bulk);
            scope.spawn(move || {
                assert_eq!(
                    common::inject_parallel(socket, domain, 0..1_000, 4).len(),
                    1_000,
                    "every message to {domain} got 250"
                );
            });
        }
    });
    let received = receiver
        .wait_for(2_000, Duration::from_secs(90))
        .expect("every message delivered");

    let mut counts = HashMap::new();
    wait_until(Duration::from_secs(10), || {
        counts = events_per_core(engine.state_dir());
        counts
            .iter()
            .filter(|((_, event, _), _)| event == "delivered")
            .map(|(_, count)| count)
            .sum::<usize>()
            == 2_000
    });
    eprintln!("sharding: log lines per (core, event, domain): {counts:?}");
    for (domain, home) in DOMAINS.iter().zip([1u16, 2]) {
        assert_eq!(
            cores_with(&counts, "delivered", domain),
            vec![home],
            "{domain} is delivered by its home executor only"
        );
        let mut times: Vec<u64> = received
            .iter()
            .filter(|message| {
                message
                    .rcpt_to
                    .first()
                    .is_some_and(|rcpt| rcpt.ends_with(&format!("@{domain}")))
            })
            .map(|message| message.received_micros)
            .collect();
        times.sort_unstable();
        assert_eq!(times.len(), 1_000, "{domain}");
        // One token bucket for the lane: 100/s, not 100/s per executor.
        let (busiest, sustained) = common::window_and_rate(&times);
        eprintln!(
            "sharding: {domain}: busiest one-second window {busiest}, sustained {sustained:.1}/s"
        );
        let window_limit = ((100 + 10) as f64 * 1.05) as usize;
        assert!(
            busiest <= window_limit,
            "{domain}: {busiest} messages in one second exceed {window_limit}"
        );
        assert!(
            (sustained - 100.0).abs() <= 10.0,
            "{domain}: sustained rate {sustained:.1}/s is not within 10% of 100/s"
        );
    }
}

#[test]
fn handed_over_mail_survives_a_restart() {
    // Deliveries to held.test wait; the engine restarts; after release every
    // message is delivered exactly once, whichever executor accepted it.
    let receiver =
        ScriptedReceiver::start(common::any_port(87), Script::default()).expect("receiver start");
    let state = state_dir();
    let config = two_bulk_executors(&format!(
        "[[rule]]\ndomain = \"held.test\"\nroute = \"{}\"\n",
        receiver.addr()
    ));
    let mut engine = Engine::start(&config, &state.path().join("engine")).expect("engine start");
    let config_path = engine.state_dir().join("caduceus.toml");
    common::caduceus(&["queue", "hold", "held.test", "--config"], &config_path);
    let acked = common::inject_parallel(engine.socket(Lane::Bulk), "held.test", 0..400, 8).len();
    assert_eq!(acked, 400);
    std::thread::sleep(Duration::from_millis(500));
    assert!(receiver.received().is_empty(), "the hold keeps mail queued");

    engine.sigterm().expect("SIGTERM");
    engine.wait_exit(Duration::from_secs(60)).expect("exit");
    engine.restart().expect("restart");
    common::caduceus(&["queue", "release", "held.test", "--config"], &config_path);
    let received = receiver
        .wait_for(400, Duration::from_secs(60))
        .expect("every message delivered after the restart");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(receiver.received().len(), 400, "no duplicates");
    let mut sequences: Vec<u32> = received
        .iter()
        .filter_map(|message| common::sequence_of(&message.raw))
        .collect();
    sequences.sort_unstable();
    sequences.dedup();
    assert_eq!(sequences.len(), 400);
}
