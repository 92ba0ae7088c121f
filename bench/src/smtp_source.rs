//! The smtp-source comparison: Postfix's own load generator
//! (`smtp-source -d -s 16 -l 2048`) injects into the engine's bulk socket
//! and into a Postfix relay, one after the other in the same run, both
//! relaying to the sink. Reports messages per second for each and the
//! engine's peak resident set.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use caduceus_engine::sink::{Recording, Script, ScriptedReceiver};
use caduceus_tests::{
    Engine, Lane, Postfix, PostfixOptions, SmtpSourceOptions, free_port, smtp_source,
};
use serde::Serialize;

use crate::scenario::{SENDER_DOMAIN, peak_rss_kib};

/// Parallel sessions, as in the comparison the numbers are quoted against.
const SESSIONS: u32 = 16;
/// Message size passed to `-l`.
const MESSAGE_SIZE_BYTES: u32 = 2048;
const RECIPIENT: &str = "member@d1.rcpt.example";

#[derive(Clone, Debug, Serialize)]
pub struct SmtpSourceRun {
    pub target: String,
    pub messages: u32,
    /// Messages the sink accepted.
    pub delivered: u64,
    /// From the start of smtp-source to the last message at the sink.
    pub seconds: f64,
    pub messages_per_sec: f64,
    /// From the start of smtp-source to its exit (injection alone).
    pub injection_seconds: f64,
    pub peak_rss_kib: Option<u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SmtpSourceComparison {
    pub caduceus: SmtpSourceRun,
    pub postfix: SmtpSourceRun,
    /// Caduceus messages per second divided by Postfix's.
    pub ratio: f64,
}

fn start_sink() -> Result<ScriptedReceiver, String> {
    let script = Script {
        hostname: "sink.bench.example".into(),
        recording: Recording::Summary,
        max_connections: 4096,
        chunking: true,
        ..Script::default()
    };
    ScriptedReceiver::start(SocketAddr::from(([127, 0, 0, 1], 0)), script)
        .map_err(|error| format!("cannot start the sink: {error}"))
}

fn options(messages: u32) -> SmtpSourceOptions {
    SmtpSourceOptions {
        messages,
        sessions: SESSIONS,
        message_size_bytes: MESSAGE_SIZE_BYTES,
        from: format!("news@{SENDER_DOMAIN}"),
        to: RECIPIENT.to_string(),
        recipients_per_message: 1,
        disconnect_after_message: true,
    }
}

/// Runs smtp-source against `target` and waits for `messages` at the sink.
fn measure(
    target: &str,
    label: &str,
    messages: u32,
    sink: &ScriptedReceiver,
    wait: Duration,
) -> Result<SmtpSourceRun, String> {
    let started = Instant::now();
    let output = smtp_source(target, &options(messages))
        .map_err(|error| format!("smtp-source against {target} failed: {error}"))?;
    let injection_seconds = started.elapsed().as_secs_f64();
    if !output.status.success() {
        return Err(format!(
            "smtp-source against {target} exited with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let complete = sink.wait_for_accepted(u64::from(messages), wait);
    let seconds = started.elapsed().as_secs_f64();
    let delivered = sink.accepted_count();
    if !complete {
        eprintln!(
            "caduceus-bench: {label}: {delivered} of {messages} messages arrived within {wait:?}"
        );
    }
    Ok(SmtpSourceRun {
        target: label.to_string(),
        messages,
        delivered,
        seconds,
        messages_per_sec: delivered as f64 / seconds,
        injection_seconds,
        peak_rss_kib: None,
    })
}

/// Runs the comparison with `messages` messages per target.
pub fn run(
    engine_binary: &std::path::Path,
    messages: u32,
    wait: Duration,
) -> Result<SmtpSourceComparison, String> {
    let caduceus = {
        let sink = start_sink()?;
        let state = tempfile::Builder::new()
            .prefix("caduceus-bench-")
            .tempdir()
            .map_err(|error| format!("cannot create a state directory: {error}"))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(state.path(), std::fs::Permissions::from_mode(0o755))
                .map_err(|error| format!("cannot set the state directory mode: {error}"))?;
        }
        let config = format!(
            "hostname = \"mta.bench.example\"\n\
             user = \"nobody\"\n\
             [spool]\n\
             segment_size_bytes = 67108864\n\
             reserve_bytes = 268435456\n\
             [dns]\n\
             nameservers = [\"127.0.0.1:9\"]\n\
             timeout = \"1s\"\n\
             [delivery]\n\
             max_connections_per_destination = 16\n\
             max_messages_per_connection = 1000\n\
             [[rule]]\n\
             domain = \"{SENDER_DOMAIN}\"\n\
             sender_category = \"care\"\n\
             route = \"{sink}\"\n\
             [[rule]]\n\
             domain = \"d1.rcpt.example\"\n\
             route = \"{sink}\"\n",
            sink = sink.addr()
        );
        let mut engine = Engine::start_binary(engine_binary, &config, state.path())
            .map_err(|error| format!("cannot start the engine: {error}"))?;
        let target = format!("unix:{}", engine.socket(Lane::Bulk).display());
        let mut run = measure(&target, "caduceus", messages, &sink, wait)?;
        run.peak_rss_kib = engine.pid().and_then(peak_rss_kib);
        let _ = engine.sigterm();
        let _ = engine.wait_exit(Duration::from_secs(30));
        run
    };
    let postfix = {
        let sink = start_sink()?;
        let ip = std::net::IpAddr::from([127, 0, 0, 20]);
        let port = free_port(ip).map_err(|error| format!("no free port on {ip}: {error}"))?;
        let relay = Postfix::start(PostfixOptions::relay(
            SocketAddr::new(ip, port),
            sink.addr(),
        ))
        .map_err(|error| format!("cannot start the Postfix relay: {error}"))?;
        measure(&relay.addr().to_string(), "postfix", messages, &sink, wait)?
    };
    let ratio = if postfix.messages_per_sec > 0.0 {
        caduceus.messages_per_sec / postfix.messages_per_sec
    } else {
        0.0
    };
    Ok(SmtpSourceComparison {
        caduceus,
        postfix,
        ratio,
    })
}

/// Prints the comparison as a table.
pub fn print(comparison: &SmtpSourceComparison) {
    println!();
    println!(
        "{:<28}{:>16}{:>16}{:>10}",
        "smtp-source -d -s 16 -l 2048", "caduceus", "postfix", "ratio"
    );
    let (caduceus, postfix) = (&comparison.caduceus, &comparison.postfix);
    println!(
        "{:<28}{:>16}{:>16}",
        "messages delivered", caduceus.delivered, postfix.delivered
    );
    println!(
        "{:<28}{:>16.1}{:>16.1}",
        "seconds", caduceus.seconds, postfix.seconds
    );
    println!(
        "{:<28}{:>16.0}{:>16.0}{:>10.2}",
        "msgs/s", caduceus.messages_per_sec, postfix.messages_per_sec, comparison.ratio
    );
    println!(
        "{:<28}{:>16.1}{:>16}",
        "engine peak RSS MiB",
        caduceus.peak_rss_kib.unwrap_or(0) as f64 / 1024.0,
        "-"
    );
}
