//! The audit trail and the metrics endpoint, end to end: a submission by
//! another uid is recorded with that uid, `caduceus audit verify` and
//! `caduceus report` read the trail, and `/metrics` agrees with the
//! delivery log once the engine is quiescent, the spool's group-commit
//! histograms included.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use caduceus_tests::{Engine, Lane, Plan, Response, Script, ScriptedReceiver, Swaks};
use common::{CARE_SENDER, WAIT, binary, engine_config, listen_addr, state_dir, wait_until};

const MESSAGE: &[u8] = b"Subject: audit test\r\n\r\nHello.\r\n";

/// Runs `caduceus ARGS --config CONFIG` and returns (success, stdout).
fn run_caduceus(args: &[&str], config: &Path) -> (bool, String, String) {
    let output = Command::new(binary())
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("run caduceus");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The lines of every file of one audit stream, oldest first.
fn today() -> String {
    let output = Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .expect("date");
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

#[test]
fn other_uid_submission_is_audited_and_verifies() {
    let receiver =
        ScriptedReceiver::start(common::any_port(61), Script::default()).expect("receiver start");
    let state = state_dir();
    let config = format!(
        "{}\n[lanes.transactional]\nsocket_mode = \"0666\"\n\n[[rule]]\ndomain = \"example.test\"\nroute = \"{}\"\n",
        engine_config(None),
        receiver.addr()
    );
    let mut engine = Engine::start(&config, &state.path().join("engine")).expect("engine start");
    let config_path = engine.state_dir().join("caduceus.toml");

    // swaks runs as nobody (65534), so SO_PEERCRED gives the engine that
    // uid, not the test's.
    let output = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "swaks",
            "--socket",
        ])
        .arg(engine.socket(Lane::Transactional))
        .args([
            "--from",
            "reminders@clinic.test",
            "--to",
            "pat@example.test",
            "--body",
            "Hello.",
        ])
        .output()
        .expect("run setpriv swaks");
    assert!(
        output.status.success(),
        "swaks as nobody failed: {output:?}"
    );
    receiver.wait_for(1, WAIT).expect("delivered");
    common::wait_for_log(&engine, |entry| entry["event"] == "delivered", WAIT);
    engine.sigterm().expect("sigterm");
    let status = engine.wait_exit(WAIT).expect("engine exits");
    assert!(
        status.success(),
        "engine exit: {status:?}\n{}",
        engine.stderr()
    );

    let records = common::audit_records(engine.state_dir(), "core-0");
    let accepted: Vec<_> = records
        .iter()
        .filter(|record| record["event"] == "accepted")
        .collect();
    assert_eq!(accepted.len(), 1, "{records:?}");
    assert_eq!(accepted[0]["peer_uid"], 65534, "{}", accepted[0]);
    assert_eq!(accepted[0]["peer_gid"], 65534, "{}", accepted[0]);
    assert_eq!(accepted[0]["lane"], "transactional");
    assert_eq!(accepted[0]["recipients"], 1);
    let message_id = accepted[0]["message_id"].as_str().expect("message id");
    let delivered: Vec<_> = records
        .iter()
        .filter(|record| record["event"] == "outcome" && record["outcome"] == "delivered")
        .collect();
    assert_eq!(delivered.len(), 1, "{records:?}");
    assert_eq!(delivered[0]["message_id"], message_id);
    let recipient = delivered[0]["recipient"].as_str().expect("recipient");
    assert!(
        recipient.starts_with("hmac:"),
        "recipient_logging defaults to hmac: {recipient}"
    );
    let text = common::audit_stream_files(engine.state_dir(), "core-0")
        .iter()
        .map(|path| std::fs::read_to_string(path).unwrap())
        .collect::<String>();
    assert!(!text.contains("pat@example.test"), "address in the clear");
    assert!(!text.contains("audit test"), "subject in the trail");

    let (ok, stdout, stderr) = run_caduceus(&["audit", "verify"], &config_path);
    assert!(ok, "verify failed on an untouched trail: {stdout}{stderr}");
    assert!(stdout.contains("audit trail intact"), "{stdout}");

    let day = today();
    let (ok, stdout, stderr) = run_caduceus(
        &["report", "--from", &day, "--to", &day, "--format", "json"],
        &config_path,
    );
    assert!(ok, "report failed: {stderr}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&stdout).expect("report JSON");
    assert_eq!(rows.len(), 1, "{stdout}");
    assert_eq!(rows[0]["message_id"], message_id);
    assert_eq!(rows[0]["peer_uid"], 65534);
    assert_eq!(rows[0]["recipients"][0]["outcome"], "delivered");
    assert_eq!(rows[0]["recipients"][0]["attempts"], 1);
    assert_eq!(rows[0]["recipients"][0]["reply_code"], 250);

    let (ok, anchor, _) = run_caduceus(&["audit", "anchor"], &config_path);
    assert!(ok);
    assert!(anchor.contains("\"stream\":\"core-0\""), "{anchor}");

    // Edit the accepted record's uid: verify names that line.
    let file = &common::audit_stream_files(engine.state_dir(), "core-0")[0];
    let content = std::fs::read_to_string(file).unwrap();
    let edited = content.replacen("\"peer_uid\":65534", "\"peer_uid\":65533", 1);
    assert_ne!(content, edited);
    std::fs::write(file, edited).unwrap();
    let line = content
        .lines()
        .position(|line| line.contains("\"event\":\"accepted\""))
        .unwrap()
        + 1;
    let (ok, stdout, _) = run_caduceus(&["audit", "verify"], &config_path);
    assert!(!ok, "verify passed an edited trail: {stdout}");
    let name = file.file_name().unwrap().to_str().unwrap();
    assert!(
        stdout.contains(&format!("{name}:{line} ")) && stdout.contains("Edited"),
        "verify did not name {name}:{line}: {stdout}"
    );
}

/// Metric samples by name and label set.
type Samples = HashMap<String, Vec<(BTreeMap<String, String>, f64)>>;

/// Parses the Prometheus text format: comments, then `name{labels} value`.
fn parse_prometheus(text: &str) -> Samples {
    let mut samples: Samples = HashMap::new();
    let mut typed = std::collections::HashSet::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split(' ').next().unwrap().to_string();
            assert!(typed.insert(name.clone()), "family {name} typed twice");
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample has a value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line}"));
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("labels end with }");
                let mut labels = BTreeMap::new();
                for pair in body.split(",").filter(|pair| !pair.is_empty()) {
                    let (key, quoted) = pair.split_once('=').expect("label has =");
                    let inner = quoted
                        .strip_prefix('"')
                        .and_then(|rest| rest.strip_suffix('"'))
                        .expect("label value quoted");
                    labels.insert(key.to_string(), inner.to_string());
                }
                (name.to_string(), labels)
            }
            None => (series.to_string(), BTreeMap::new()),
        };
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .filter(|base| typed.contains(*base))
            .map_or(name.clone(), str::to_string);
        assert!(typed.contains(&family), "{name} has no TYPE line");
        samples.entry(name).or_default().push((labels, value));
    }
    samples
}

fn sum(samples: &Samples, name: &str, lane: &str) -> f64 {
    samples
        .get(name)
        .unwrap_or_else(|| panic!("metric {name} missing"))
        .iter()
        .filter(|(labels, _)| labels.get("lane").map(String::as_str) == Some(lane))
        .filter(|(labels, _)| labels.get("le").is_none_or(|le| le == "+Inf"))
        .map(|(_, value)| value)
        .sum()
}

fn http_get(address: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(address).expect("connect to the metrics endpoint");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("status code");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn metrics_match_the_delivery_log() {
    // One deferral: the first RCPT gets 450, the retry after 1 s succeeds.
    let receiver = ScriptedReceiver::start(
        common::any_port(62),
        Script {
            rcpt: Plan::first(1, Response::reply(450, "4.2.0 try again later")),
            ..Script::default()
        },
    )
    .expect("receiver start");
    let metrics_address = listen_addr(1);
    let state = state_dir();
    let config = format!(
        "{}\n[lanes.transactional]\nretry_schedule = [\"1s\"]\n\n[lanes.bulk]\nretry_schedule = [\"1s\"]\n\n[metrics]\nlisten = \"{metrics_address}\"\n\n[[rule]]\ndomain = \"example.test\"\nroute = \"{}\"\n",
        engine_config(None),
        receiver.addr()
    );
    let engine = Engine::start(&config, &state.path().join("engine")).expect("engine start");
    wait_until(WAIT, || {
        TcpStream::connect(metrics_address).is_ok() && http_get(metrics_address, "/readyz").0 == 200
    });
    assert_eq!(http_get(metrics_address, "/healthz").0, 200);

    const PER_LANE: usize = 5;
    let mut mid_run = None;
    for index in 0..PER_LANE {
        for (lane, sender) in [
            (Lane::Transactional, "reminders@clinic.test"),
            (Lane::Bulk, CARE_SENDER),
        ] {
            let output = Swaks::socket(engine.socket(lane))
                .from(sender)
                .to(&format!("r{index}@example.test"))
                .data(MESSAGE)
                .run()
                .expect("swaks");
            assert!(output.status.success(), "swaks failed: {output:?}");
        }
        if index == 1 {
            let (status, body) = http_get(metrics_address, "/metrics");
            assert_eq!(status, 200);
            mid_run = Some(parse_prometheus(&body));
        }
    }
    let mid_run = mid_run.expect("scraped during the run");
    assert!(
        sum(
            &mid_run,
            "caduceus_messages_accepted_total",
            "transactional"
        ) >= 2.0
    );

    receiver
        .wait_for(2 * PER_LANE, WAIT)
        .expect("every message delivered");
    wait_until(WAIT, || {
        engine
            .delivery_log()
            .map(|log| {
                log.iter()
                    .filter(|entry| entry["event"] == "delivered")
                    .count()
                    == 2 * PER_LANE
            })
            .unwrap_or(false)
    });
    // Latency histograms arrive with the once-a-second snapshot.
    let mut samples = Samples::new();
    wait_until(WAIT, || {
        samples = parse_prometheus(&http_get(metrics_address, "/metrics").1);
        let histogram: f64 = ["transactional", "bulk"]
            .iter()
            .map(|lane| sum(&samples, "caduceus_delivery_latency_seconds_count", lane))
            .sum();
        histogram == (2 * PER_LANE) as f64
    });

    let log = engine.delivery_log().expect("delivery log");
    for lane in ["transactional", "bulk"] {
        let count = |event: &str, dsn: bool| {
            log.iter()
                .filter(|entry| entry["lane"] == lane && entry["event"] == event)
                .filter(|entry| {
                    entry["note"]
                        .as_str()
                        .is_some_and(|note| note.starts_with("dsn"))
                        == dsn
                })
                .count() as f64
        };
        assert_eq!(
            sum(&samples, "caduceus_messages_accepted_total", lane),
            count("received", false),
            "{lane} accepted"
        );
        assert_eq!(
            sum(&samples, "caduceus_dsns_generated_total", lane),
            count("received", true),
            "{lane} DSNs"
        );
        for (metric, event) in [
            ("caduceus_recipients_delivered_total", "delivered"),
            ("caduceus_recipients_deferred_total", "deferred"),
            ("caduceus_recipients_bounced_total", "bounced"),
            ("caduceus_recipients_expired_total", "expired"),
            ("caduceus_recipients_deleted_total", "deleted"),
        ] {
            assert_eq!(
                sum(&samples, metric, lane),
                count(event, false),
                "{lane} {event}"
            );
        }
        assert_eq!(
            sum(&samples, "caduceus_queue_recipients", lane),
            0.0,
            "{lane} queue is empty once quiescent"
        );
        assert_eq!(
            sum(&samples, "caduceus_delivery_latency_seconds_count", lane),
            PER_LANE as f64,
            "{lane} latency samples"
        );
    }
    let deferred: f64 = ["transactional", "bulk"]
        .iter()
        .map(|lane| sum(&samples, "caduceus_recipients_deferred_total", lane))
        .sum();
    assert_eq!(deferred, 1.0, "the scripted 450 deferred one recipient");
    assert_eq!(
        sum(&mid_run, "caduceus_recipients_bounced_total", "bulk"),
        0.0
    );
}

/// Checks one histogram series: `le` bounds rise, cumulative counts never
/// fall, and the `+Inf` bucket equals `_count`. Returns `(count, sum)`.
fn check_histogram(samples: &Samples, name: &str, core: &str) -> (f64, f64) {
    let of_core = |series: &str| -> Vec<(BTreeMap<String, String>, f64)> {
        samples
            .get(series)
            .unwrap_or_else(|| panic!("metric {series} missing"))
            .iter()
            .filter(|(labels, _)| labels.get("core").map(String::as_str) == Some(core))
            .cloned()
            .collect()
    };
    let buckets = of_core(&format!("{name}_bucket"));
    assert!(!buckets.is_empty(), "{name} core {core} has no buckets");

    let bound = |labels: &BTreeMap<String, String>| -> f64 {
        match labels["le"].as_str() {
            "+Inf" => f64::INFINITY,
            text => text
                .parse()
                .unwrap_or_else(|_| panic!("{name}: invalid le {text}")),
        }
    };
    for pair in buckets.windows(2) {
        assert!(
            bound(&pair[0].0) < bound(&pair[1].0),
            "{name} core {core}: le bounds not rising: {pair:?}"
        );
        assert!(
            pair[0].1 <= pair[1].1,
            "{name} core {core}: cumulative counts fall: {pair:?}"
        );
    }

    let (last_labels, infinite) = buckets.last().expect("checked non-empty");
    assert_eq!(last_labels["le"], "+Inf", "{name} core {core}: last bucket");
    let count = of_core(&format!("{name}_count"));
    let sum = of_core(&format!("{name}_sum"));
    assert_eq!(count.len(), 1, "{name} core {core}: one _count");
    assert_eq!(sum.len(), 1, "{name} core {core}: one _sum");
    assert_eq!(*infinite, count[0].1, "{name} core {core}: +Inf == _count");
    assert!(sum[0].1 >= 0.0, "{name} core {core}: negative _sum");
    (count[0].1, sum[0].1)
}

/// Sums a per-core counter or gauge over every core.
fn sum_over_cores(samples: &Samples, name: &str) -> f64 {
    samples
        .get(name)
        .unwrap_or_else(|| panic!("metric {name} missing"))
        .iter()
        .map(|(_, value)| value)
        .sum()
}

#[test]
fn spool_commit_metrics_count_every_record() {
    let receiver =
        ScriptedReceiver::start(common::any_port(64), Script::default()).expect("receiver start");
    let metrics_address = listen_addr(64);
    let state = state_dir();
    let config = format!(
        "{}\n[metrics]\nlisten = \"{metrics_address}\"\n\n[[rule]]\ndomain = \"example.test\"\nroute = \"{}\"\n",
        engine_config(None),
        receiver.addr()
    );
    let engine = Engine::start(&config, &state.path().join("engine")).expect("engine start");
    wait_until(WAIT, || {
        TcpStream::connect(metrics_address).is_ok() && http_get(metrics_address, "/readyz").0 == 200
    });

    // Four connections inject at once, so that some commits can cover
    // more than one record.
    const CONNECTIONS: u32 = 4;
    const PER_CONNECTION: u32 = 25;
    let acked = std::sync::Mutex::new(Vec::new());
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        for connection in 0..CONNECTIONS {
            let sequences: Vec<u32> = (0..PER_CONNECTION)
                .map(|index| connection * PER_CONNECTION + index)
                .collect();
            let (socket, acked, stop) = (engine.socket(Lane::Bulk), &acked, &stop);
            scope.spawn(move || common::inject(socket, "example.test", sequences, acked, stop));
        }
    });
    let accepted = acked.lock().unwrap().len();
    assert_eq!(accepted, (CONNECTIONS * PER_CONNECTION) as usize);
    receiver
        .wait_for(accepted, WAIT)
        .expect("every message delivered");
    wait_until(WAIT, || {
        engine.delivery_log().is_ok_and(|log| {
            log.iter()
                .filter(|entry| entry["event"] == "delivered")
                .count()
                == accepted
        })
    });

    // Each delivery log line stands for one spool record: `received` for a
    // message record, every other event for an outcome record. Compaction
    // copies are the only records without a line, and this run fills no
    // segment, so it makes none.
    let log = engine.delivery_log().expect("delivery log");
    let expected_records = log.len() as f64;
    assert!(expected_records >= 2.0 * accepted as f64, "{log:?}");

    // The statistics arrive with the once-a-second snapshot.
    let mut samples = Samples::new();
    wait_until(WAIT, || {
        samples = parse_prometheus(&http_get(metrics_address, "/metrics").1);
        sum_over_cores(&samples, "caduceus_spool_commit_batch_records_sum") >= expected_records
    });
    std::thread::sleep(Duration::from_millis(1500));
    samples = parse_prometheus(&http_get(metrics_address, "/metrics").1);

    let cores: Vec<String> = samples["caduceus_spool_commits_total"]
        .iter()
        .map(|(labels, _)| labels["core"].clone())
        .collect();
    assert!(!cores.is_empty());
    let mut fsyncs = 0.0;
    let mut records = 0.0;
    let mut bytes = 0.0;
    for core in &cores {
        let (fsync_count, fsync_seconds) =
            check_histogram(&samples, "caduceus_spool_fsync_seconds", core);
        let (commits, record_sum) =
            check_histogram(&samples, "caduceus_spool_commit_batch_records", core);
        let (byte_commits, byte_sum) =
            check_histogram(&samples, "caduceus_spool_commit_batch_bytes", core);
        let counted_commits = samples["caduceus_spool_commits_total"]
            .iter()
            .find(|(labels, _)| labels["core"] == *core)
            .map(|(_, value)| *value)
            .expect("commits of the core");
        assert_eq!(commits, counted_commits, "core {core}: commits");
        assert_eq!(byte_commits, commits, "core {core}: byte samples");
        assert!(
            fsync_count >= commits,
            "core {core}: a commit syncs at least once"
        );
        assert!(record_sum >= commits, "core {core}: a commit has a record");
        assert!(fsync_seconds >= 0.0);
        fsyncs += fsync_count;
        records += record_sum;
        bytes += byte_sum;
    }
    assert!(fsyncs > 0.0, "no fdatasync counted");
    assert!(
        records >= accepted as f64,
        "records {records} < accepted {accepted}"
    );
    assert_eq!(
        records, expected_records,
        "records committed vs delivery log lines"
    );
    // A message record contains at least the message as injected.
    assert!(
        bytes >= (accepted * common::message(0, "example.test").len()) as f64,
        "bytes {bytes}"
    );
    assert_eq!(
        sum_over_cores(&samples, "caduceus_spool_fsync_failures_total"),
        0.0
    );
}
