//! `caduceus demo`: the engine on its embedded default configuration,
//! delivering a realistic mix to a local receiver, with nothing to set up.
//!
//! The demo starts the engine in a temporary state directory, starts a
//! receiving SMTP server with STARTTLS on loopback for the example domains,
//! injects appointment reminders on the transactional lane (at a steady
//! rate) and a campaign on the bulk lane (as fast as the socket takes it),
//! waits until every message arrived, and prints throughput and latency
//! per lane. It exits 0 only when every message was delivered.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use caduceus_policy::config::{Config, RuleConfig};
use caduceus_policy::{Lane, parse_config};
use hdrhistogram::Histogram;

use crate::deliverylog::now_us;
use crate::inject::InjectClient;
use crate::runtime;
use crate::sink::{
    INJECTED_HEADER, LANE_HEADER, MessageSummary, Recording, Script, ScriptedReceiver, tls,
};

/// The configuration embedded in the binary.
pub const DEFAULT_CONFIG: &str = include_str!("default-config.toml");

/// Domains of the demo's patients; the sink receives for all of them.
const PATIENT_DOMAINS: [&str; 4] = [
    "mail.example.org",
    "patients.example.net",
    "inbox.example.com",
    "clinic-mail.example",
];

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Appointment reminders sent on the transactional lane.
    #[arg(long, default_value_t = 300)]
    pub transactional: u32,
    /// Reminders per second on the transactional lane.
    #[arg(long, default_value_t = 100)]
    pub transactional_rate: u32,
    /// Campaign messages sent on the bulk lane.
    #[arg(long, default_value_t = 3000)]
    pub bulk: u32,
    /// Concurrent injecting connections on the bulk lane.
    #[arg(long, default_value_t = 4)]
    pub bulk_connections: u32,
    /// Give up waiting for deliveries after this many seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout_secs: u64,
}

pub fn run(args: DemoArgs) -> Result<(), String> {
    let state = tempfile::Builder::new()
        .prefix("caduceus-demo-")
        .tempdir()
        .map_err(|error| format!("cannot create a temporary state directory: {error}"))?;
    let sink = start_receiver()
        .map_err(|error| format!("cannot start the demo receiver on 127.0.0.1: {error}"))?;
    let config = demo_config(state.path(), sink.addr())?;
    let transactional_socket = config.lane_socket(Lane::Transactional);
    let bulk_socket = config.lane_socket(Lane::Bulk);
    println!(
        "demo: state in {}, receiver on {} (STARTTLS)",
        state.path().display(),
        sink.addr()
    );
    let engine = runtime::start(config)?;

    let started = Instant::now();
    let failures = Arc::new(AtomicU64::new(0));
    let mut injectors = Vec::new();
    {
        let failures = failures.clone();
        let count = args.transactional;
        let rate = args.transactional_rate.max(1);
        injectors.push(std::thread::spawn(move || {
            inject_transactional(&transactional_socket, count, rate, &failures)
        }));
    }
    let connections = args.bulk_connections.max(1);
    for connection in 0..connections {
        let failures = failures.clone();
        let socket = bulk_socket.clone();
        let share = args.bulk / connections + u32::from(connection < args.bulk % connections);
        injectors.push(std::thread::spawn(move || {
            inject_bulk(&socket, connection, share, &failures)
        }));
    }
    let mut injected = 0u64;
    for injector in injectors {
        injected += injector.join().unwrap_or(0);
    }
    let injection_secs = started.elapsed().as_secs_f64();

    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    while sink.accepted_count() < injected && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let total_secs = started.elapsed().as_secs_f64();
    engine.request_shutdown();
    let stopped = engine.wait();

    let arrivals: Vec<MessageSummary> = sink
        .summary()
        .messages
        .into_iter()
        .filter(MessageSummary::accepted)
        .collect();
    print_report(&arrivals, injected, injection_secs, total_secs);
    stopped?;
    let failed = failures.load(Ordering::Acquire);
    if failed > 0 {
        return Err(format!("{failed} messages were rejected at injection"));
    }
    if (arrivals.len() as u64) < injected {
        return Err(format!(
            "only {} of {injected} messages arrived within {} s",
            arrivals.len(),
            args.timeout_secs
        ));
    }
    println!("demo: every message was delivered");
    Ok(())
}

/// Starts the receiver for every demo domain: STARTTLS with session
/// tickets, summary recording, room for the engine's connections.
fn start_receiver() -> std::io::Result<ScriptedReceiver> {
    let script = Script {
        hostname: "sink.caduceus.test".into(),
        starttls: Some(tls::self_signed_config("localhost", true)?),
        recording: Recording::Summary,
        max_connections: 1024,
        chunking: true,
        ..Script::default()
    };
    ScriptedReceiver::start(SocketAddr::from(([127, 0, 0, 1], 0)), script)
}

/// The embedded default configuration, pointed at a temporary state
/// directory, with the example domains routed to the demo receiver.
fn demo_config(state_dir: &Path, sink: SocketAddr) -> Result<Config, String> {
    let mut config = parse_config(DEFAULT_CONFIG, "embedded default configuration")
        .map_err(|error| error.to_string())?;
    config.state_dir = state_dir.to_path_buf();
    config.hostname = "demo.caduceus.test".into();
    // The temporary directory may sit on a small filesystem; the demo
    // queues a few megabytes at most.
    config.spool.reserve_bytes = 16 * 1024 * 1024;
    config.spool.segment_size_bytes = 16 * 1024 * 1024;
    // The demo's messages are a few KB, so it accepts what these smaller
    // segments hold instead of warning at start about a setting that the
    // user never wrote.
    config.ingress.max_message_size_bytes = config.effective_max_message_size_bytes();
    // `serve` refuses to stay root; the demo, started as root, runs the
    // engine as `nobody` instead, like a production install with its own
    // user.
    // The demo's own injector threads switch user with it, so the
    // sockets go to that user too.
    if nix::unistd::geteuid().is_root() && config.user.is_none() {
        config.user = Some("nobody".into());
        config.lanes.transactional.socket_owner = Some("nobody".into());
        config.lanes.bulk.socket_owner = Some("nobody".into());
    }
    // Every domain the demo mails, including the senders' own for any
    // notification, goes to the local receiver, and DNS goes to a loopback
    // port: the demo never sends a packet off the machine.
    config.dns.nameservers = vec!["127.0.0.1:9".into()];
    for domain in PATIENT_DOMAINS
        .iter()
        .chain(["clinic.example", "campaigns.clinic.example"].iter())
    {
        // The campaign is care-gap outreach: care mail needs no recorded
        // marketing consent, only the absence of opt-outs.
        let sender_category =
            (*domain == "campaigns.clinic.example").then_some(caduceus_policy::Category::Care);
        config.rules.push(RuleConfig {
            domain: Some(domain.to_string()),
            route: Some(sink.to_string()),
            sender_category,
            ..RuleConfig::default()
        });
    }
    Ok(config)
}

fn reminder(index: u32) -> (String, Vec<u8>) {
    let domain = PATIENT_DOMAINS[index as usize % PATIENT_DOMAINS.len()];
    let recipient = format!("patient{index}@{domain}");
    let body = format!(
        "From: Riverside Clinic <reminders@clinic.example>\r\n\
         To: <{recipient}>\r\n\
         Subject: Your appointment tomorrow at 09:30\r\n\
         {INJECTED_HEADER}: {}\r\n\
         {LANE_HEADER}: transactional\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         \r\n\
         Hello,\r\n\
         \r\n\
         This is a reminder of your appointment tomorrow at 09:30 with\r\n\
         Dr. Rivera, Riverside Clinic, building B, second floor.\r\n\
         Reply to this message or call us to reschedule.\r\n",
        now_us()
    );
    (recipient, body.into_bytes())
}

fn inject_transactional(socket: &Path, count: u32, rate: u32, failures: &AtomicU64) -> u64 {
    let mut client = match InjectClient::connect(socket, "ehr.clinic.example") {
        Ok(client) => client,
        Err(error) => {
            eprintln!("demo: transactional injector cannot connect: {error}");
            failures.fetch_add(u64::from(count), Ordering::AcqRel);
            return 0;
        }
    };
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
    let start = Instant::now();
    let mut sent = 0;
    for index in 0..count {
        let due = start + interval * index;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let (recipient, body) = reminder(index);
        match client.send("reminders@clinic.example", &[recipient], &body) {
            Ok(_) => sent += 1,
            Err(error) => {
                eprintln!("demo: reminder {index} rejected: {error}");
                failures.fetch_add(1, Ordering::AcqRel);
            }
        }
    }
    client.quit();
    sent
}

fn inject_bulk(socket: &Path, connection: u32, count: u32, failures: &AtomicU64) -> u64 {
    let mut client = match InjectClient::connect(socket, "campaigns.clinic.example") {
        Ok(client) => client,
        Err(error) => {
            eprintln!("demo: bulk injector {connection} cannot connect: {error}");
            failures.fetch_add(u64::from(count), Ordering::AcqRel);
            return 0;
        }
    };
    let mut sent = 0;
    let filler = "Regular screenings find problems early, when they are easier to treat. \
                  Book online or call the number below.\r\n"
        .repeat(16);
    for index in 0..count {
        let domain =
            PATIENT_DOMAINS[(index as usize + connection as usize) % PATIENT_DOMAINS.len()];
        let recipient = format!("member{connection}-{index}@{domain}");
        let body = format!(
            "From: Riverside Health <news@campaigns.clinic.example>\r\n\
             To: <{recipient}>\r\n\
             Subject: Time for your annual screening\r\n\
             {INJECTED_HEADER}: {}\r\n\
             {LANE_HEADER}: bulk\r\n\
             X-Caduceus-Category: care\r\n\
             MIME-Version: 1.0\r\n\
             Content-Type: text/plain; charset=utf-8\r\n\
             \r\n\
             {filler}",
            now_us()
        );
        match client.send(
            "news@campaigns.clinic.example",
            &[recipient],
            body.as_bytes(),
        ) {
            Ok(_) => sent += 1,
            Err(error) => {
                eprintln!("demo: campaign message {index} rejected: {error}");
                failures.fetch_add(1, Ordering::AcqRel);
            }
        }
    }
    client.quit();
    sent
}

fn print_report(arrivals: &[MessageSummary], injected: u64, injection_secs: f64, total_secs: f64) {
    println!();
    println!(
        "{:<14} {:>9} {:>10} {:>12} {:>10} {:>10} {:>10}",
        "lane", "injected", "delivered", "msgs/s", "p50 ms", "p99 ms", "max ms"
    );
    for lane in ["transactional", "bulk"] {
        let mut histogram = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)
            .expect("static bounds are valid");
        let mut delivered = 0u64;
        let mut first = u64::MAX;
        let mut last = 0u64;
        for arrival in arrivals
            .iter()
            .filter(|arrival| arrival.lane.as_deref() == Some(lane))
        {
            delivered += 1;
            if let Some(injected_at) = arrival.injected_at_us {
                let latency = arrival.received_at_us.saturating_sub(injected_at).max(1);
                let _ = histogram.record(latency);
                first = first.min(injected_at);
            }
            last = last.max(arrival.received_at_us);
        }
        let span_secs = if last > first {
            (last - first) as f64 / 1e6
        } else {
            0.0
        };
        let rate = if span_secs > 0.0 {
            delivered as f64 / span_secs
        } else {
            0.0
        };
        let millis = |quantile: f64| histogram.value_at_quantile(quantile) as f64 / 1000.0;
        println!(
            "{:<14} {:>9} {:>10} {:>12.0} {:>10.2} {:>10.2} {:>10.2}",
            lane,
            "-",
            delivered,
            rate,
            millis(0.5),
            millis(0.99),
            histogram.max() as f64 / 1000.0
        );
    }
    let tls = arrivals.iter().filter(|arrival| arrival.tls).count();
    println!(
        "total: {injected} injected in {injection_secs:.1} s, {} delivered after {total_secs:.1} s, {tls} over TLS",
        arrivals.len()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The demo's own segment size must not make the engine warn that
    /// `max_message_size_bytes` does not fit in a segment.
    #[test]
    fn demo_config_has_no_size_warning() {
        let state = tempfile::tempdir().expect("tempdir");
        let sink = SocketAddr::from(([127, 0, 0, 1], 2525));
        let config = demo_config(state.path(), sink).expect("demo config");
        assert_eq!(config.message_size_warning(), None);
        assert_eq!(
            config.ingress.max_message_size_bytes,
            config.effective_max_message_size_bytes()
        );
    }
}
