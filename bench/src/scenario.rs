//! The orchestrator: for one scenario, starts the sink, starts the target
//! (the engine as a child process, or a Postfix relay), runs the generator,
//! waits until every message is accounted for, and checks the deliveries.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::thread;
use std::time::{Duration, Instant};

use caduceus_engine::sink::{DomainScript, Recording, Script, ScriptedReceiver, SinkSummary, tls};
use caduceus_tests::{Engine, Lane, Postfix, PostfixOptions, free_port};

use crate::generator::{Domains, SizeMix, Stream, StreamOutcome, Target, run_stream};
use crate::results::{Backlog, Evaluation, RunResult, accounted, evaluate};

/// The sender domain of every generated message; notifications (DSNs) go
/// back to it, and it is routed to the sink like the recipients.
pub const SENDER_DOMAIN: &str = "bench.example";

/// Policy `rate` of the throttled destinations in `fanout`, in messages per
/// second.
pub const FANOUT_RATE_PER_SEC: f64 = 50.0;
/// Policy `burst` of the throttled destinations in `fanout`.
pub const FANOUT_BURST: u32 = 100;
/// How many of the largest `fanout` destinations are throttled.
const FANOUT_THROTTLED_DOMAINS: usize = 10;

/// Loopback addresses the sink listens on, one port for all, so that
/// destinations differ by address as MX hosts do.
const SINK_ADDRESS_COUNT: u8 = 8;

/// Last octet of the Postfix relay's listening address.
const POSTFIX_LISTEN_OCTET: u8 = 20;

/// The scenarios of `caduceus-bench`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Bulk lane only, as fast as the engine accepts.
    Throughput,
    /// Bulk saturating, transactional at a fixed rate; reports the
    /// transactional lane's tail latency.
    Mixed,
    /// 1,000 destinations, the largest with rate limits in policy.
    Fanout,
    /// Every delivery over STARTTLS, with session resumption on and off.
    Tls,
    /// The sink fails, closes and drops as scripted; a short retry
    /// schedule.
    Faults,
    /// Bulk lane with every destination on hold while injection runs, so
    /// the whole run waits in the queue. Reports the engine's resident set
    /// then, and delivers everything after the release.
    Backlog,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Throughput => "throughput",
            Scenario::Mixed => "mixed",
            Scenario::Fanout => "fanout",
            Scenario::Tls => "tls",
            Scenario::Faults => "faults",
            Scenario::Backlog => "backlog",
        }
    }

    fn domain_count(self) -> usize {
        match self {
            Scenario::Fanout => 1000,
            _ => 8,
        }
    }
}

/// Settings of one scenario run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Bulk messages (all messages in `throughput`, `tls`, `fanout` and
    /// `faults`).
    pub messages: u64,
    /// Upper bound on the injection time.
    pub duration: Duration,
    /// Upper bound on the wait for deliveries after injection ends.
    pub wait: Duration,
    /// Transactional messages per second in `mixed`.
    pub transactional_rate: f64,
    /// Injecting connections of the bulk stream.
    pub connections: u32,
    /// Messages per pipelined group on one connection.
    pub pipeline_depth: usize,
    pub sizes: SizeMix,
    pub seed: u64,
    /// Bulk executors to run, `None` for the engine's default allocation.
    /// More bulk executors than spare CPUs share the transactional CPU
    /// (`lanes.allow_shared_cpus`), which only a benchmark should do.
    pub bulk_executors: Option<usize>,
    /// CPUs for the benchmark's own threads (injectors and sink) once the
    /// target MTA has started; `None` leaves them unpinned.
    pub harness_cpus: Option<Vec<usize>>,
    /// Writes the audit trail and serves metrics on loopback; `false`
    /// turns both off, to measure what they cost. The engine counts its
    /// metrics either way, because counting cannot be turned off.
    pub observability: bool,
    /// The sink offers CHUNKING (RFC 3030).
    pub chunking: bool,
    /// The `caduceus` binary.
    pub engine_binary: PathBuf,
}

/// Returns the `caduceus` binary: `$CADUCEUS_BIN`, else `caduceus` next to
/// the running executable (both are built into `target/<profile>/`).
pub fn default_engine_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("CADUCEUS_BIN") {
        return PathBuf::from(path);
    }
    let own = std::env::current_exe().unwrap_or_default();
    // Test and bench executables live one level deeper, in `deps/`.
    let dir = own.parent().map(Path::to_path_buf).unwrap_or_default();
    let beside = dir.join("caduceus");
    if beside.is_file() {
        return beside;
    }
    dir.parent()
        .map_or(beside.clone(), |parent| parent.join("caduceus"))
}

fn loopback(last_octet: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last_octet))
}

/// Returns whether `domain` is one of the throttled destinations of
/// `fanout` (the ranks 1 to 10 of the Zipf skew).
pub fn is_throttled_domain(domain: &str) -> bool {
    domain
        .strip_prefix('d')
        .and_then(|rest| rest.strip_suffix(".rcpt.example"))
        .and_then(|rank| rank.parse::<usize>().ok())
        .is_some_and(|rank| (1..=FANOUT_THROTTLED_DOMAINS).contains(&rank))
}

fn domain_names(scenario: Scenario) -> Vec<String> {
    (1..=scenario.domain_count())
        .map(|rank| format!("d{rank}.rcpt.example"))
        .collect()
}

/// Starts the sink for `scenario` on 127.0.0.1 to 127.0.0.8, one port. It
/// offers STARTTLS only in `tls`, so the other scenarios measure queueing
/// and delivery without the handshake cost, which differs most between
/// implementations (Postfix does not reuse TLS connections by default).
fn start_sink(
    scenario: Scenario,
    domains: &[String],
    seed: u64,
    chunking: bool,
) -> Result<ScriptedReceiver, String> {
    let addrs: Vec<SocketAddr> = (1..=SINK_ADDRESS_COUNT)
        .map(|octet| SocketAddr::new(loopback(octet), 0))
        .collect();
    let starttls = if scenario == Scenario::Tls {
        let config = tls::self_signed_config("sink.bench.example", true)
            .map_err(|error| format!("sink TLS configuration failed: {error}"))?;
        Some(config)
    } else {
        None
    };
    let mut script = Script {
        hostname: "sink.bench.example".into(),
        recording: Recording::Summary,
        max_connections: 4096,
        max_message_bytes: 64 * 1024 * 1024,
        idle_timeout: Duration::from_secs(120),
        seed,
        starttls,
        chunking,
        ..Script::default()
    };
    if scenario == Scenario::Faults {
        script.domains = fault_scripts(domains);
    }
    ScriptedReceiver::start_many(&addrs, script)
        .map_err(|error| format!("cannot start the sink: {error}"))
}

/// Builds the misbehaviour of the `faults` scenario. Every domain fails some
/// RCPT commands. The busiest domain also closes connections with 421 and
/// drops some connections after the final dot, and the domain on 127.0.0.8
/// greets slowly.
fn fault_scripts(domains: &[String]) -> Vec<DomainScript> {
    domains
        .iter()
        .enumerate()
        .map(|(index, domain)| DomainScript {
            domain: domain.clone(),
            temporary_failure_fraction: 0.05,
            permanent_failure_fraction: 0.01,
            close_421_after_messages: (index == 0).then_some(20),
            drop_after_dot_fraction: if index == 0 { 0.02 } else { 0.0 },
            greeting_delay: if index == 7 {
                Duration::from_millis(500)
            } else {
                Duration::ZERO
            },
            greeting_addresses: if index == 7 {
                vec![loopback(SINK_ADDRESS_COUNT)]
            } else {
                Vec::new()
            },
        })
        .collect()
}

/// Returns the sink address that `domain_index` is routed to.
fn route_of(sink: &ScriptedReceiver, domain_index: usize) -> SocketAddr {
    sink.addrs()[domain_index % sink.addrs().len()]
}

/// Builds the engine configuration: drop root to `nobody` (the engine
/// refuses to stay root), DNS to a loopback port where nothing answers,
/// every domain routed to the sink.
fn engine_config(
    scenario: Scenario,
    sink: &ScriptedReceiver,
    domains: &[String],
    session_resumption: bool,
    bulk_executors: Option<usize>,
    observability: bool,
) -> Result<String, String> {
    let (lanes, transactional_cores, bulk_cores) = lane_cores(bulk_executors);
    let observability = if observability {
        let ip = loopback(1);
        let port = free_port(ip).map_err(|error| format!("no free port on {ip}: {error}"))?;
        format!("[metrics]\nlisten = \"{ip}:{port}\"\n\n")
    } else {
        "[audit]\nenabled = false\n\n".to_string()
    };
    let retry = if scenario == Scenario::Faults {
        "retry_schedule = [\"1s\", \"2s\", \"3s\", \"5s\"]\n"
    } else {
        ""
    };
    let mut config = format!(
        "hostname = \"mta.bench.example\"\n\
         user = \"nobody\"\n\
         \n\
         [spool]\n\
         segment_size_bytes = 67108864\n\
         reserve_bytes = 268435456\n\
         \n\
         [dns]\n\
         nameservers = [\"127.0.0.1:9\"]\n\
         timeout = \"1s\"\n\
         \n\
         [delivery]\n\
         max_connections_per_destination = 16\n\
         max_messages_per_connection = 1000\n\
         max_concurrent_deliveries = 1024\n\
         \n\
         [tls]\n\
         session_resumption = {session_resumption}\n\
         \n\
         {observability}\
         {lanes}\
         [lanes.transactional]\n\
         {transactional_cores}\
         {retry}\
         \n\
         [lanes.bulk]\n\
         {bulk_cores}\
         {retry}\
         \n\
         [[rule]]\n\
         domain = \"{SENDER_DOMAIN}\"\n\
         sender_category = \"care\"\n\
         route = \"{}\"\n",
        sink.addr()
    );
    for (index, domain) in domains.iter().enumerate() {
        config.push_str(&format!(
            "\n[[rule]]\ndomain = \"{domain}\"\nroute = \"{}\"\n",
            route_of(sink, index)
        ));
        // In `fanout`, the ten largest destinations get throttles, as a
        // large mailbox provider would need.
        if scenario == Scenario::Fanout && index < FANOUT_THROTTLED_DOMAINS {
            config.push_str(&format!(
                "rate = {FANOUT_RATE_PER_SEC:.1}\nburst = {FANOUT_BURST}\n"
            ));
        }
    }
    Ok(config)
}

/// Returns the `[lanes]` table and the `cores` lines of both lanes for
/// `bulk_executors` bulk executors: the transactional lane keeps the first
/// CPU, and bulk executors take the others, then share the first CPU once
/// every other CPU has one.
fn lane_cores(bulk_executors: Option<usize>) -> (String, String, String) {
    let Some(count) = bulk_executors.filter(|count| *count > 0) else {
        return (String::new(), String::new(), String::new());
    };
    let cpus = caduceus_engine::cores::available_cpus();
    let first = cpus.first().copied().unwrap_or(0);
    let others: Vec<usize> = cpus.iter().copied().skip(1).collect();
    let mut bulk: Vec<usize> = others.iter().copied().take(count).collect();
    let shared = bulk.len() < count;
    if shared {
        bulk.push(first);
    }
    let list = |cpus: &[usize]| {
        cpus.iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let lanes = if shared {
        "[lanes]\nallow_shared_cpus = true\n\n".to_string()
    } else {
        String::new()
    };
    (
        lanes,
        format!("cores = [{first}]\n"),
        format!("cores = [{}]\n", list(&bulk)),
    )
}

/// Keeps every thread of the benchmark process on the harness CPUs while
/// it lives, and restores the process's original CPUs when dropped.
///
/// It is created after the MTA under test has started, so the MTA's
/// processes keep every CPU. Threads started later inherit the mask of the
/// thread that starts them.
struct HarnessPin {
    restore: Option<nix::sched::CpuSet>,
}

impl HarnessPin {
    fn new(cpus: Option<&[usize]>) -> Result<HarnessPin, String> {
        let Some(cpus) = cpus else {
            return Ok(HarnessPin { restore: None });
        };
        let original = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
            .map_err(|error| format!("cannot read this process's CPU mask: {error}"))?;
        let mut set = nix::sched::CpuSet::new();
        for cpu in cpus {
            set.set(*cpu).map_err(|error| {
                format!("--harness-cpus: CPU {cpu} is out of range ({error}); list CPUs that `caduceus cores` shows")
            })?;
        }
        set_all_threads(&set)?;
        Ok(HarnessPin {
            restore: Some(original),
        })
    }
}

impl Drop for HarnessPin {
    fn drop(&mut self) {
        if let Some(original) = &self.restore
            && let Err(error) = set_all_threads(original)
        {
            eprintln!("caduceus-bench: {error}");
        }
    }
}

/// Applies `set` to every thread of this process, as listed in
/// `/proc/self/task`.
fn set_all_threads(set: &nix::sched::CpuSet) -> Result<(), String> {
    let tasks = std::fs::read_dir("/proc/self/task")
        .map_err(|error| format!("cannot list this process's threads: {error}"))?;
    for task in tasks.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|name| name.parse().ok()) else {
            continue;
        };
        // A thread may exit between the listing and this call.
        match nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid), set) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(error) => {
                return Err(format!("cannot set the CPUs of thread {tid}: {error}"));
            }
        }
    }
    Ok(())
}

/// Creates a temporary directory that the engine's unprivileged user can
/// traverse.
fn state_dir() -> Result<tempfile::TempDir, String> {
    let dir = tempfile::Builder::new()
        .prefix("caduceus-bench-")
        .tempdir()
        .map_err(|error| format!("cannot create a state directory: {error}"))?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .map_err(|error| format!("cannot set the state directory mode: {error}"))?;
    Ok(dir)
}

/// Returns the peak resident set size of process `pid` in KiB (`VmHWM`).
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM:")
}

/// Returns the resident set of process `pid` now (VmRSS), in KiB.
pub fn current_rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| {
        let value = line.strip_prefix(field)?;
        value.trim().trim_end_matches("kB").trim().parse().ok()
    })
}

/// Returns the CPU time, user plus system, that process `pid` and all its
/// threads have used so far, in seconds, from `/proc/<pid>/stat`.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name in field 2 may contain spaces and parentheses, so
    // fields are counted from the last `)`: field 3 (state) is the first
    // after it, and utime and stime are fields 14 and 15.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let user_ticks: u64 = fields.next()?.parse().ok()?;
    let system_ticks: u64 = fields.next()?.parse().ok()?;
    let ticks_per_sec = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|ticks| *ticks > 0)?;
    Some((user_ticks + system_ticks) as f64 / ticks_per_sec as f64)
}

/// The injection targets of one run.
struct Targets {
    transactional: Target,
    bulk: Target,
}

/// Builds the streams of `scenario`.
fn streams(scenario: Scenario, options: &Options, targets: &Targets, tag: &str) -> Vec<Stream> {
    let domains = Domains::zipf(domain_names(scenario), 1.0);
    let bulk = Stream {
        lane: "bulk".into(),
        target: targets.bulk.clone(),
        messages: options.messages,
        rate_per_sec: None,
        connections: options.connections,
        pipeline_depth: options.pipeline_depth,
        sizes: options.sizes,
        domains: domains.clone(),
        sender: format!("news@{SENDER_DOMAIN}"),
        category: Some("care".into()),
        seed: options.seed,
        run_tag: tag.to_string(),
    };
    if scenario != Scenario::Mixed {
        return vec![bulk];
    }
    let transactional_messages =
        (options.transactional_rate * options.duration.as_secs_f64()).ceil() as u64;
    let transactional = Stream {
        lane: "transactional".into(),
        target: targets.transactional.clone(),
        messages: transactional_messages,
        rate_per_sec: Some(options.transactional_rate),
        connections: 1,
        pipeline_depth: 1,
        sizes: SizeMix::Fixed(3 * 1024),
        domains,
        sender: format!("reminders@{SENDER_DOMAIN}"),
        category: None,
        seed: options.seed.wrapping_add(1),
        run_tag: tag.to_string(),
    };
    vec![bulk, transactional]
}

/// Runs the streams: the first (bulk) to completion, the others until the
/// first finishes, so the transactional stream measures latency under load.
fn run_streams(streams: &[Stream], duration: Duration) -> Vec<StreamOutcome> {
    let deadline = Instant::now() + duration;
    let stop = AtomicBool::new(false);
    thread::scope(|scope| {
        let handles: Vec<_> = streams
            .iter()
            .enumerate()
            .map(|(index, stream)| {
                let stop = &stop;
                scope.spawn(move || {
                    let outcome = run_stream(stream, deadline, stop);
                    if index == 0 {
                        stop.store(true, std::sync::atomic::Ordering::Release);
                    }
                    outcome
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().unwrap_or_default())
            .collect()
    })
}

/// Waits until every sent message arrived or bounced, or `wait` passes.
/// Returns the sink's final summary.
fn wait_for_deliveries(
    sink: &ScriptedReceiver,
    outcomes: &[StreamOutcome],
    wait: Duration,
) -> SinkSummary {
    let sent: usize = outcomes.iter().map(|outcome| outcome.sent.len()).sum();
    let deadline = Instant::now() + wait;
    let mut last_checked = u64::MAX;
    loop {
        let accepted = sink.accepted_count();
        // A snapshot copies every record, so take one only when something
        // new arrived and enough has arrived to possibly be complete.
        if accepted != last_checked && accepted as f64 >= sent as f64 * 0.9 {
            last_checked = accepted;
            let summary = sink.summary();
            if accounted(outcomes, &summary) >= sent {
                return summary;
            }
        }
        if Instant::now() >= deadline {
            return sink.summary();
        }
        thread::sleep(Duration::from_millis(200));
    }
}

fn run_tag() -> String {
    format!("run{}", caduceus_engine::sink::micros_since_epoch())
}

/// Runs `scenario` against the engine. `session_resumption` sets
/// `[tls] session_resumption`.
pub fn run_caduceus(
    scenario: Scenario,
    options: &Options,
    session_resumption: bool,
    label: &str,
) -> Result<RunResult, String> {
    let domains = domain_names(scenario);
    let sink = start_sink(scenario, &domains, options.seed, options.chunking)?;
    let state = state_dir()?;
    let config = engine_config(
        scenario,
        &sink,
        &domains,
        session_resumption,
        options.bulk_executors,
        options.observability,
    )?;
    let mut engine = Engine::start_binary(&options.engine_binary, &config, state.path())
        .map_err(|error| format!("cannot start the engine: {error}"))?;
    let _pinned = HarnessPin::new(options.harness_cpus.as_deref())?;
    let targets = Targets {
        transactional: Target::Lane(engine.socket(Lane::Transactional).to_path_buf()),
        bulk: Target::Lane(engine.socket(Lane::Bulk).to_path_buf()),
    };
    let control_socket = engine.state_dir().join("run/control.sock");
    let rss_before_kib = engine.pid().and_then(current_rss_kib);
    if scenario == Scenario::Backlog {
        set_hold(&control_socket, &domains, true)?;
    }
    let streams = streams(scenario, options, &targets, &run_tag());
    let outcomes = run_streams(&streams, options.duration);
    let backlog = if scenario == Scenario::Backlog {
        let backlog = Backlog {
            queued: outcomes
                .iter()
                .map(|outcome| outcome.sent.len() as u64)
                .sum(),
            rss_before_kib,
            rss_kib: engine.pid().and_then(current_rss_kib),
            anon_kib: engine.pid().and_then(|pid| status_kib(pid, "RssAnon:")),
        };
        set_hold(&control_socket, &domains, false)?;
        Some(backlog)
    } else {
        None
    };
    let summary = wait_for_deliveries(&sink, &outcomes, options.wait);
    let peak_rss = engine.pid().and_then(peak_rss_kib);
    // Read before the shutdown, whose final syncs and checkpoints are the
    // same for any number of messages.
    let engine_cpu_secs = engine.pid().and_then(cpu_secs);
    let tls = sink.tls_counts();
    let _ = engine.sigterm();
    if engine.wait_exit(Duration::from_secs(30)).is_err() {
        eprintln!("caduceus-bench: the engine did not stop within 30 s; killing it");
    }
    Ok(evaluate(&Evaluation {
        scenario: scenario.name(),
        target: label,
        streams: &outcomes,
        summary: &summary,
        tls,
        sender_domain: SENDER_DOMAIN,
        peak_rss_kib: peak_rss,
        backlog,
        engine_cpu_secs,
    }))
}

/// Puts every destination of the run on hold, or releases them, over the
/// engine's control socket.
fn set_hold(control_socket: &Path, domains: &[String], hold: bool) -> Result<(), String> {
    let command = if hold { "queue.hold" } else { "queue.release" };
    for domain in domains {
        let request = serde_json::json!({"command": command, "destination": domain});
        let response = caduceus_engine::control::request(control_socket, &request)?;
        if response.get("ok") != Some(&serde_json::Value::Bool(true)) {
            return Err(format!("{command} {domain} failed: {response}"));
        }
    }
    Ok(())
}

/// Returns the Postfix settings for `scenario`: STARTTLS to the sink with a
/// session cache in `tls`, and a short retry schedule in `faults`, like the
/// engine's.
fn postfix_settings(scenario: Scenario) -> Vec<(String, String)> {
    let mut settings = Vec::new();
    if scenario == Scenario::Tls {
        settings.push(("smtp_tls_security_level".into(), "may".into()));
        settings.push((
            "smtp_tls_session_cache_database".into(),
            "btree:${data_directory}/smtp_scache".into(),
        ));
    }
    if scenario == Scenario::Faults {
        for (name, value) in [
            ("minimal_backoff_time", "1s"),
            ("maximal_backoff_time", "5s"),
            ("queue_run_delay", "1s"),
        ] {
            settings.push((name.into(), value.into()));
        }
    }
    settings
}

/// Runs `scenario` through a Postfix relay on loopback with its default
/// durable queue, relaying to the same kind of sink.
pub fn run_postfix(scenario: Scenario, options: &Options) -> Result<RunResult, String> {
    let domains = domain_names(scenario);
    let sink = start_sink(scenario, &domains, options.seed, options.chunking)?;
    let ip = loopback(POSTFIX_LISTEN_OCTET);
    let port = free_port(ip).map_err(|error| format!("no free port on {ip}: {error}"))?;
    let mut postfix_options = PostfixOptions::relay(SocketAddr::new(ip, port), sink.addr());
    postfix_options.main_cf = postfix_settings(scenario);
    let postfix = Postfix::start(postfix_options)
        .map_err(|error| format!("cannot start the Postfix relay: {error}"))?;
    let _pinned = HarnessPin::new(options.harness_cpus.as_deref())?;
    let targets = Targets {
        transactional: Target::Tcp(postfix.addr()),
        bulk: Target::Tcp(postfix.addr()),
    };
    let streams = streams(scenario, options, &targets, &run_tag());
    let outcomes = run_streams(&streams, options.duration);
    let summary = wait_for_deliveries(&sink, &outcomes, options.wait);
    let tls = sink.tls_counts();
    drop(postfix);
    Ok(evaluate(&Evaluation {
        scenario: scenario.name(),
        target: "postfix",
        streams: &outcomes,
        summary: &summary,
        tls,
        sender_domain: SENDER_DOMAIN,
        peak_rss_kib: None,
        backlog: None,
        engine_cpu_secs: None,
    }))
}
