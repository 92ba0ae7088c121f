//! The load generator: injects messages over a lane's Unix socket or over
//! TCP (for Postfix), pipelined, at a fixed rate or as fast as the server
//! accepts them, from several connections at once.
//!
//! Every message carries the sink's injection-time and lane header fields,
//! and its body carries a token unique to the run, so the harness can match
//! each delivered body to the message it sent by checksum.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use caduceus_engine::inject::{InjectClient, InjectError, Outgoing};
use caduceus_engine::sink::{INJECTED_HEADER, LANE_HEADER, fnv1a, micros_since_epoch};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Injection target of a stream.
#[derive(Clone, Debug)]
pub enum Target {
    /// A Caduceus lane socket.
    Lane(PathBuf),
    /// An SMTP server on TCP, such as the Postfix relay.
    Tcp(SocketAddr),
}

/// Message sizes, in bytes of the whole message.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SizeMix {
    Fixed(usize),
    /// Sizes between 2 KB and 200 KB: 60 % from 2 to 8 KB, 25 % from 8 to
    /// 32 KB, 10 % from 32 to 100 KB, 5 % from 100 to 200 KB, uniform within
    /// each band. This is an assumed shape for clinic mail (plain reminders,
    /// HTML newsletters, a few with small PDF attachments), not a measured
    /// one.
    Realistic,
}

impl SizeMix {
    fn sample(self, rng: &mut StdRng) -> usize {
        match self {
            SizeMix::Fixed(bytes) => bytes,
            SizeMix::Realistic => {
                let band = rng.gen_range(0..100);
                let (low, high) = match band {
                    0..60 => (2_000, 8_000),
                    60..85 => (8_000, 32_000),
                    85..95 => (32_000, 100_000),
                    _ => (100_000, 200_000),
                };
                rng.gen_range(low..high)
            }
        }
    }
}

/// Recipient domains with a Zipf-like skew: domain `k` (from 1) is chosen
/// with weight `1 / k^exponent`, so a few large providers take most mail.
#[derive(Clone, Debug)]
pub struct Domains {
    pub names: Vec<String>,
    cumulative: Vec<f64>,
}

impl Domains {
    pub fn zipf(names: Vec<String>, exponent: f64) -> Domains {
        let mut total = 0.0;
        let cumulative = (1..=names.len())
            .map(|rank| {
                total += 1.0 / (rank as f64).powf(exponent);
                total
            })
            .collect::<Vec<_>>();
        let cumulative = cumulative.iter().map(|value| value / total).collect();
        Domains { names, cumulative }
    }

    fn sample(&self, rng: &mut StdRng) -> &str {
        let draw: f64 = rng.r#gen();
        let index = self
            .cumulative
            .partition_point(|&edge| edge < draw)
            .min(self.names.len() - 1);
        &self.names[index]
    }
}

/// One stream of messages: one lane, one target, one pace.
#[derive(Clone, Debug)]
pub struct Stream {
    /// Lane name stamped in the lane header: `bulk` or `transactional`.
    pub lane: String,
    pub target: Target,
    /// Messages to send at most.
    pub messages: u64,
    /// Messages per second over all connections; `None` sends as fast as
    /// the server takes them.
    pub rate_per_sec: Option<f64>,
    pub connections: u32,
    /// Messages per pipelined group on one connection (RFC 2920).
    pub pipeline_depth: usize,
    pub sizes: SizeMix,
    pub domains: Domains,
    pub sender: String,
    /// Category header for the engine (`care` keeps bulk mail clear of the
    /// consent check that marketing needs).
    pub category: Option<String>,
    pub seed: u64,
    /// A tag unique to the run, written into every body.
    pub run_tag: String,
}

/// One message the server accepted at injection.
#[derive(Clone, Debug)]
pub struct SentMessage {
    pub recipient: String,
    pub body_checksum: u64,
    pub domain: String,
    pub injected_at_us: u64,
    pub size_bytes: usize,
}

#[derive(Debug, Default)]
pub struct StreamOutcome {
    pub lane: String,
    pub sent: Vec<SentMessage>,
    /// Messages in flight when a session failed: the server may or may not
    /// have taken them (RFC 5321 §4.1.1.4), so they may arrive or not.
    pub uncertain: Vec<SentMessage>,
    /// Messages the server rejected at injection.
    pub rejected: u64,
    /// The first few errors, for the report.
    pub errors: Vec<String>,
    pub started_us: u64,
    pub finished_us: u64,
}

/// Errors kept per stream for the report.
const MAX_ERRORS_KEPT: usize = 10;

/// Runs `stream` until its messages are sent, `deadline` passes or `stop`
/// is set. Blocks the calling thread.
pub fn run_stream(stream: &Stream, deadline: Instant, stop: &AtomicBool) -> StreamOutcome {
    let next_index = Arc::new(AtomicU64::new(0));
    let outcome = Arc::new(Mutex::new(StreamOutcome {
        lane: stream.lane.clone(),
        started_us: micros_since_epoch(),
        ..StreamOutcome::default()
    }));
    let started = Instant::now();
    thread::scope(|scope| {
        for connection in 0..stream.connections.max(1) {
            let next_index = Arc::clone(&next_index);
            let outcome = Arc::clone(&outcome);
            scope.spawn(move || {
                run_connection(
                    stream,
                    connection,
                    &next_index,
                    &outcome,
                    started,
                    deadline,
                    stop,
                );
            });
        }
    });
    let mut outcome = std::mem::take(
        &mut *outcome
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()),
    );
    outcome.finished_us = micros_since_epoch();
    outcome
}

fn connect(target: &Target, helo: &str) -> Result<InjectClient, InjectError> {
    match target {
        Target::Lane(path) => InjectClient::connect(path, helo),
        Target::Tcp(addr) => InjectClient::connect_tcp(*addr, helo),
    }
}

fn run_connection(
    stream: &Stream,
    connection: u32,
    next_index: &AtomicU64,
    outcome: &Mutex<StreamOutcome>,
    started: Instant,
    deadline: Instant,
    stop: &AtomicBool,
) {
    let record_error = |message: String| {
        let mut outcome = outcome
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if outcome.errors.len() < MAX_ERRORS_KEPT {
            outcome.errors.push(message);
        }
    };
    let mut client = match connect(&stream.target, "generator.bench.example") {
        Ok(client) => client,
        Err(error) => {
            record_error(format!(
                "{} connection {connection}: connect failed: {error}",
                stream.lane
            ));
            return;
        }
    };
    let mut rng = StdRng::seed_from_u64(stream.seed ^ u64::from(connection) << 32);
    let depth = if stream.rate_per_sec.is_some() {
        1
    } else {
        stream.pipeline_depth.max(1)
    };
    loop {
        if stop.load(Ordering::Acquire) || Instant::now() >= deadline {
            break;
        }
        let first = next_index.fetch_add(depth as u64, Ordering::AcqRel);
        if first >= stream.messages {
            break;
        }
        let count = (stream.messages - first).min(depth as u64);
        if let Some(rate) = stream.rate_per_sec {
            let due = started + Duration::from_secs_f64(first as f64 / rate);
            if due >= deadline {
                break;
            }
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                thread::sleep(wait);
            }
        }
        let batch: Vec<Built> = (first..first + count)
            .map(|index| build_message(stream, index, &mut rng))
            .collect();
        let outgoing: Vec<Outgoing<'_>> = batch
            .iter()
            .map(|built| Outgoing {
                sender: &stream.sender,
                recipients: std::slice::from_ref(&built.recipient),
                body: &built.message,
            })
            .collect();
        match client.send_pipelined(&outgoing) {
            Ok(results) => {
                let mut outcome = outcome
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                for (built, result) in batch.into_iter().zip(results) {
                    match result {
                        Ok(_) => outcome.sent.push(built.sent),
                        Err(error) => {
                            outcome.rejected += 1;
                            if outcome.errors.len() < MAX_ERRORS_KEPT {
                                outcome.errors.push(format!("{}: {error}", stream.lane));
                            }
                        }
                    }
                }
            }
            Err(error) => {
                record_error(format!(
                    "{} connection {connection}: session failed: {error}",
                    stream.lane
                ));
                let mut outcome = outcome
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                outcome
                    .uncertain
                    .extend(batch.into_iter().map(|built| built.sent));
                return;
            }
        }
    }
    client.quit();
}

struct Built {
    recipient: String,
    message: Vec<u8>,
    sent: SentMessage,
}

/// Filler text for message bodies: ordinary short lines, some starting with
/// a dot so that every run exercises dot-stuffing (RFC 5321 §4.5.2).
const FILLER_LINES: [&str; 4] = [
    "Regular screenings find problems early, when they are easier to treat.",
    "Book online or call the number below to choose a time that suits you.",
    ".A line that starts with a dot travels dot-stuffed and arrives intact.",
    "Riverside Health, 12 Harbour Road, Riverside. This is a benchmark message.",
];

fn build_message(stream: &Stream, index: u64, rng: &mut StdRng) -> Built {
    let domain = stream.domains.sample(rng).to_string();
    let recipient = format!("{}{index}@{domain}", stream.lane);
    let target_size = stream.sizes.sample(rng);
    let injected_at_us = micros_since_epoch();
    let category = stream
        .category
        .as_deref()
        .map(|category| format!("X-Caduceus-Category: {category}\r\n"))
        .unwrap_or_default();
    let header = format!(
        "From: Riverside Health <{sender}>\r\n\
         To: <{recipient}>\r\n\
         Subject: Benchmark message {index}\r\n\
         Message-ID: <{tag}.{lane}.{index}@bench.example>\r\n\
         {INJECTED_HEADER}: {injected_at_us}\r\n\
         {LANE_HEADER}: {lane}\r\n\
         {category}\
         MIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         \r\n",
        sender = stream.sender,
        tag = stream.run_tag,
        lane = stream.lane,
    );
    let mut message = header.into_bytes();
    let body_start = message.len();
    message.extend_from_slice(
        format!("Token {} {} {index}\r\n", stream.run_tag, stream.lane).as_bytes(),
    );
    let mut line = 0;
    while message.len() < target_size {
        message.extend_from_slice(FILLER_LINES[line % FILLER_LINES.len()].as_bytes());
        message.extend_from_slice(b"\r\n");
        line += 1;
    }
    let sent = SentMessage {
        recipient: recipient.clone(),
        body_checksum: fnv1a(&message[body_start..]),
        domain,
        injected_at_us,
        size_bytes: message.len(),
    };
    Built {
        recipient,
        message,
        sent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_prefers_first_domain() {
        let domains = Domains::zipf((1..=10).map(|k| format!("d{k}.example")).collect(), 1.0);
        let mut rng = StdRng::seed_from_u64(1);
        let mut counts = [0u32; 10];
        for _ in 0..10_000 {
            let name = domains.sample(&mut rng);
            let index = domains.names.iter().position(|n| n == name).unwrap_or(0);
            counts[index] += 1;
        }
        assert!(counts[0] > counts[1], "counts: {counts:?}");
        assert!(counts[1] > counts[9], "counts: {counts:?}");
        assert!(counts[9] > 0, "counts: {counts:?}");
    }

    #[test]
    fn realistic_sizes_stay_in_range() {
        let mut rng = StdRng::seed_from_u64(2);
        for _ in 0..10_000 {
            let size = SizeMix::Realistic.sample(&mut rng);
            assert!((2_000..200_000).contains(&size), "size {size}");
        }
    }

    #[test]
    fn message_checksum_covers_body() {
        let stream = Stream {
            lane: "bulk".into(),
            target: Target::Tcp(SocketAddr::from(([127, 0, 0, 1], 25))),
            messages: 1,
            rate_per_sec: None,
            connections: 1,
            pipeline_depth: 1,
            sizes: SizeMix::Fixed(2048),
            domains: Domains::zipf(vec!["d1.example".into()], 1.0),
            sender: "news@bench.example".into(),
            category: Some("care".into()),
            seed: 3,
            run_tag: "t".into(),
        };
        let mut rng = StdRng::seed_from_u64(3);
        let built = build_message(&stream, 7, &mut rng);
        assert!(built.message.len() >= 2048);
        assert_eq!(
            built.sent.body_checksum,
            fnv1a(caduceus_engine::sink::body_of(&built.message))
        );
    }
}
