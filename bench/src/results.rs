//! Results of one run and their checks: which sent messages arrived, how
//! fast, with what latency; printed as a table and written as JSON.

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};

use caduceus_engine::sink::{SinkSummary, TlsCounts};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::generator::StreamOutcome;

/// Quantiles at which a latency CDF is sampled for the plots.
const CDF_POINTS: usize = 200;

/// Latency of one lane, in milliseconds.
#[derive(Clone, Debug, Serialize)]
pub struct LaneLatency {
    pub lane: String,
    pub delivered: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// `(latency_ms, quantile)` pairs for a CDF plot.
    pub cdf: Vec<(f64, f64)>,
}

/// Deliveries per domain over the run, for throttle checks.
#[derive(Clone, Debug, Serialize)]
pub struct DomainRate {
    pub domain: String,
    pub delivered: u64,
    /// Most deliveries within any one second.
    pub peak_per_sec: u64,
    /// Deliveries per second from the domain's first to its last arrival.
    pub mean_per_sec: f64,
}

/// The queue at the end of injection in `backlog`, while every destination
/// was on hold.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Backlog {
    /// Messages accepted and waiting in the queue.
    pub queued: u64,
    /// The engine's resident set before injection (VmRSS), in KiB.
    pub rss_before_kib: Option<u64>,
    /// The engine's resident set at the end of injection (VmRSS), in KiB.
    pub rss_kib: Option<u64>,
    /// The anonymous part of `rss_kib` (RssAnon), in KiB. The rest is
    /// mapped spool pages, which the kernel can drop and read again.
    pub anon_kib: Option<u64>,
}

impl Backlog {
    /// Returns the growth of the resident set during injection, in MiB per
    /// 100,000 queued messages.
    pub fn growth_mib_per_100k(&self) -> Option<f64> {
        let growth_kib = self.rss_kib?.saturating_sub(self.rss_before_kib?);
        (self.queued > 0).then(|| growth_kib as f64 / 1024.0 * 100_000.0 / self.queued as f64)
    }
}

/// Reads one printed figure from a run's backlog.
type BacklogValue = fn(&Backlog) -> Option<f64>;

/// Everything measured in one run against one target.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RunResult {
    pub scenario: String,
    /// `caduceus` or `postfix`, with a variant such as `resumption off`.
    pub target: String,
    /// Messages the target accepted at injection, per lane.
    pub injected: HashMap<String, u64>,
    /// Messages the target rejected at injection.
    pub rejected_at_injection: u64,
    pub injection_errors: Vec<String>,
    /// Sent messages that arrived at the sink with a 2xx reply, once each.
    pub delivered: u64,
    /// Sent messages whose recipient the sink rejected with 5xx, and that
    /// therefore bounced instead of arriving.
    pub bounced: u64,
    /// Sent messages that neither arrived nor bounced within the wait.
    pub missing: u64,
    /// Extra accepted copies of a message.
    pub duplicates: u64,
    /// Arrivals whose body matches no sent message.
    pub corrupt: u64,
    /// Arrivals of messages whose injection session failed before the
    /// final reply, so the generator could not know they were taken.
    pub delivered_uncertain: u64,
    /// Arrivals for the sender's domain: delivery status notifications.
    pub notifications: u64,
    /// Messages the sink's script dropped after the final dot.
    pub dropped_after_dot: u64,
    pub verified: bool,
    pub injection_secs: f64,
    /// From the first injection to the last arrival.
    pub delivery_secs: f64,
    pub injected_per_sec: f64,
    pub delivered_per_sec: f64,
    pub lanes: Vec<LaneLatency>,
    /// Accepted arrivals per second since the first injection.
    pub delivered_per_second_series: Vec<u64>,
    pub domain_rates: Vec<DomainRate>,
    pub tls: TlsSummary,
    /// The engine's peak resident set (VmHWM), in KiB; `None` for Postfix.
    pub peak_rss_kib: Option<u64>,
    /// The queue at the end of injection; only in `backlog`.
    pub backlog: Option<Backlog>,
    /// CPU seconds (user + system, all threads) that the engine process
    /// used from its start until every message was accounted for. `None`
    /// for Postfix, or when `/proc` could not be read.
    pub engine_cpu_secs: Option<f64>,
}

impl RunResult {
    /// Engine CPU seconds per 1,000 delivered messages, when both are known.
    pub fn cpu_secs_per_1000_delivered(&self) -> Option<f64> {
        let cpu_secs = self.engine_cpu_secs?;
        (self.delivered > 0).then(|| cpu_secs * 1000.0 / self.delivered as f64)
    }
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct TlsSummary {
    pub handshakes: u64,
    pub resumed: u64,
    pub failed: u64,
    /// Accepted messages that arrived over TLS.
    pub messages_over_tls: u64,
}

impl From<TlsCounts> for TlsSummary {
    fn from(counts: TlsCounts) -> TlsSummary {
        TlsSummary {
            handshakes: counts.handshakes,
            resumed: counts.resumed,
            failed: counts.failed,
            messages_over_tls: 0,
        }
    }
}

/// Inputs of [`evaluate`].
pub struct Evaluation<'a> {
    pub scenario: &'a str,
    pub target: &'a str,
    pub streams: &'a [StreamOutcome],
    pub summary: &'a SinkSummary,
    pub tls: TlsCounts,
    /// Domain that notifications go to (the sender's).
    pub sender_domain: &'a str,
    pub peak_rss_kib: Option<u64>,
    pub backlog: Option<Backlog>,
    pub engine_cpu_secs: Option<f64>,
}

/// Returns how many sent messages are accounted for (arrived or bounced),
/// so the harness can stop waiting once all are.
pub fn accounted(streams: &[StreamOutcome], summary: &SinkSummary) -> usize {
    let arrived: HashSet<u64> = summary
        .messages
        .iter()
        .filter(|message| message.accepted())
        .map(|message| message.body_checksum)
        .collect();
    let bounced: HashSet<&str> = bounced_recipients(summary);
    streams
        .iter()
        .flat_map(|stream| &stream.sent)
        .filter(|sent| {
            arrived.contains(&sent.body_checksum) || bounced.contains(sent.recipient.as_str())
        })
        .count()
}

fn bounced_recipients(summary: &SinkSummary) -> HashSet<&str> {
    summary
        .rejected_recipients
        .iter()
        .map(|(address, _)| address.as_str())
        .collect()
}

/// Checks the arrivals against what was sent and computes the rates and
/// latencies.
pub fn evaluate(input: &Evaluation<'_>) -> RunResult {
    let summary = input.summary;
    let mut arrivals: HashMap<u64, u64> = HashMap::new();
    let mut notifications = 0;
    let mut dropped_after_dot = 0;
    let mut messages_over_tls = 0;
    for message in &summary.messages {
        if message.reply_code.is_none() {
            dropped_after_dot += 1;
        }
        if !message.accepted() {
            continue;
        }
        if message.tls {
            messages_over_tls += 1;
        }
        if message.lane.is_none() && message.domain.eq_ignore_ascii_case(input.sender_domain) {
            notifications += 1;
            continue;
        }
        *arrivals.entry(message.body_checksum).or_insert(0) += 1;
    }
    let bounced_set = bounced_recipients(summary);
    let mut delivered = 0;
    let mut bounced = 0;
    let mut missing = 0;
    let mut duplicates = 0;
    let mut sent_checksums = HashSet::new();
    let uncertain_checksums: HashSet<u64> = input
        .streams
        .iter()
        .flat_map(|stream| &stream.uncertain)
        .map(|sent| sent.body_checksum)
        .collect();
    let mut injected = HashMap::new();
    let mut first_injected_us = u64::MAX;
    let mut last_injected_us = 0;
    for stream in input.streams {
        *injected.entry(stream.lane.clone()).or_insert(0) += stream.sent.len() as u64;
        first_injected_us = first_injected_us.min(stream.started_us);
        last_injected_us = last_injected_us.max(stream.finished_us);
        for sent in &stream.sent {
            sent_checksums.insert(sent.body_checksum);
            match arrivals.get(&sent.body_checksum) {
                Some(&count) => {
                    delivered += 1;
                    duplicates += count - 1;
                }
                None if bounced_set.contains(sent.recipient.as_str()) => bounced += 1,
                None => missing += 1,
            }
        }
    }
    let delivered_uncertain = arrivals
        .keys()
        .filter(|checksum| uncertain_checksums.contains(checksum))
        .count() as u64;
    let corrupt = arrivals
        .keys()
        .filter(|checksum| {
            !sent_checksums.contains(checksum) && !uncertain_checksums.contains(checksum)
        })
        .count() as u64;
    let last_received_us = summary
        .messages
        .iter()
        .filter(|message| message.accepted())
        .map(|message| message.received_at_us)
        .max()
        .unwrap_or(first_injected_us);
    let injection_secs = seconds_between(first_injected_us, last_injected_us);
    let delivery_secs = seconds_between(first_injected_us, last_received_us);
    let injected_total: u64 = injected.values().sum();
    RunResult {
        scenario: input.scenario.to_string(),
        target: input.target.to_string(),
        injected,
        rejected_at_injection: input.streams.iter().map(|stream| stream.rejected).sum(),
        injection_errors: input
            .streams
            .iter()
            .flat_map(|stream| stream.errors.iter().cloned())
            .collect(),
        delivered,
        bounced,
        missing,
        duplicates,
        corrupt,
        delivered_uncertain,
        notifications,
        dropped_after_dot,
        verified: missing == 0 && duplicates == 0 && corrupt == 0 && injected_total > 0,
        injection_secs,
        delivery_secs,
        injected_per_sec: rate(injected_total, injection_secs),
        delivered_per_sec: rate(delivered, delivery_secs),
        lanes: summary
            .lanes
            .iter()
            .filter(|lane| lane.key != "none")
            .map(|lane| lane_latency(&lane.key, &lane.latency_us))
            .collect(),
        delivered_per_second_series: per_second_series(summary, first_injected_us),
        domain_rates: domain_rates(summary),
        tls: TlsSummary {
            messages_over_tls,
            ..TlsSummary::from(input.tls)
        },
        peak_rss_kib: input.peak_rss_kib,
        backlog: input.backlog,
        engine_cpu_secs: input.engine_cpu_secs,
    }
}

fn seconds_between(start_us: u64, end_us: u64) -> f64 {
    end_us.saturating_sub(start_us) as f64 / 1e6
}

fn rate(count: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        count as f64 / seconds
    } else {
        0.0
    }
}

fn lane_latency(lane: &str, histogram: &Histogram<u64>) -> LaneLatency {
    let millis = |value_us: u64| value_us as f64 / 1000.0;
    let cdf = (0..=CDF_POINTS)
        .map(|point| {
            // Denser sampling towards the tail: quantile 1 - 10^-(3 x / n).
            let exponent = 3.0 * point as f64 / CDF_POINTS as f64;
            let quantile = (1.0 - 10f64.powf(-exponent)).max(0.0);
            (millis(histogram.value_at_quantile(quantile)), quantile)
        })
        .collect();
    LaneLatency {
        lane: lane.to_string(),
        delivered: histogram.len(),
        p50_ms: millis(histogram.value_at_quantile(0.5)),
        p99_ms: millis(histogram.value_at_quantile(0.99)),
        p999_ms: millis(histogram.value_at_quantile(0.999)),
        max_ms: millis(histogram.max()),
        cdf,
    }
}

fn per_second_series(summary: &SinkSummary, start_us: u64) -> Vec<u64> {
    let mut series = Vec::new();
    for message in summary.messages.iter().filter(|message| message.accepted()) {
        let second = (message.received_at_us.saturating_sub(start_us) / 1_000_000) as usize;
        if series.len() <= second {
            series.resize(second + 1, 0);
        }
        series[second] += 1;
    }
    series
}

fn domain_rates(summary: &SinkSummary) -> Vec<DomainRate> {
    let mut per_domain: HashMap<&str, Vec<u64>> = HashMap::new();
    for message in summary.messages.iter().filter(|message| message.accepted()) {
        per_domain
            .entry(message.domain.as_str())
            .or_default()
            .push(message.received_at_us);
    }
    let mut rates: Vec<DomainRate> = per_domain
        .into_iter()
        .map(|(domain, mut times)| {
            times.sort_unstable();
            let mut peak = 0;
            let mut window_start = 0;
            for (index, &time) in times.iter().enumerate() {
                while time - times[window_start] >= 1_000_000 {
                    window_start += 1;
                }
                peak = peak.max(index - window_start + 1);
            }
            let span_secs = seconds_between(times[0], times[times.len() - 1]);
            DomainRate {
                domain: domain.to_string(),
                delivered: times.len() as u64,
                peak_per_sec: peak as u64,
                mean_per_sec: rate(times.len() as u64, span_secs),
            }
        })
        .collect();
    rates.sort_by(|left, right| left.domain.cmp(&right.domain));
    rates
}

/// Prints the runs side by side, with the ratio of the first to the second
/// when there are two.
pub fn print_table(runs: &[RunResult]) {
    let Some(first) = runs.first() else {
        return;
    };
    println!();
    print!("{:<28}", format!("scenario {}", first.scenario));
    for run in runs {
        print!("{:>24}", run.target);
    }
    if runs.len() == 2 {
        print!("{:>12}", "ratio");
    }
    println!();
    let mut rows: Vec<(String, Vec<f64>, bool)> = vec![
        (
            "injected".into(),
            column(runs, |run| run.injected.values().sum::<u64>() as f64),
            false,
        ),
        (
            "delivered".into(),
            column(runs, |run| run.delivered as f64),
            false,
        ),
        (
            "bounced".into(),
            column(runs, |run| run.bounced as f64),
            false,
        ),
        (
            "missing".into(),
            column(runs, |run| run.missing as f64),
            false,
        ),
        (
            "duplicates".into(),
            column(runs, |run| run.duplicates as f64),
            false,
        ),
        (
            "injected msgs/s".into(),
            column(runs, |run| run.injected_per_sec),
            true,
        ),
        (
            "delivered msgs/s".into(),
            column(runs, |run| run.delivered_per_sec),
            true,
        ),
    ];
    let lanes: Vec<String> = first.lanes.iter().map(|lane| lane.lane.clone()).collect();
    for lane in lanes {
        let pick = |quantile: fn(&LaneLatency) -> f64| {
            column(runs, |run| {
                run.lanes
                    .iter()
                    .find(|candidate| candidate.lane == lane)
                    .map_or(f64::NAN, quantile)
            })
        };
        rows.push((format!("{lane} p50 ms"), pick(|lane| lane.p50_ms), true));
        rows.push((format!("{lane} p99 ms"), pick(|lane| lane.p99_ms), true));
        rows.push((format!("{lane} p99.9 ms"), pick(|lane| lane.p999_ms), true));
    }
    rows.push((
        "TLS handshakes".into(),
        column(runs, |run| run.tls.handshakes as f64),
        false,
    ));
    rows.push((
        "TLS resumed".into(),
        column(runs, |run| run.tls.resumed as f64),
        false,
    ));
    rows.push((
        "peak RSS MiB".into(),
        column(runs, |run| {
            run.peak_rss_kib.map_or(f64::NAN, |kib| kib as f64 / 1024.0)
        }),
        true,
    ));
    if runs.iter().any(|run| run.backlog.is_some()) {
        let backlog_rows: [(&str, BacklogValue); 4] = [
            ("queued at release", |backlog| Some(backlog.queued as f64)),
            ("RSS MiB at release", |backlog| {
                backlog.rss_kib.map(|kib| kib as f64 / 1024.0)
            }),
            ("anonymous MiB at release", |backlog| {
                backlog.anon_kib.map(|kib| kib as f64 / 1024.0)
            }),
            ("RSS growth MiB per 100k", Backlog::growth_mib_per_100k),
        ];
        for (name, value) in backlog_rows {
            rows.push((
                name.into(),
                column(runs, |run| {
                    run.backlog.as_ref().and_then(value).unwrap_or(f64::NAN)
                }),
                false,
            ));
        }
    }
    for (name, values, ratio) in rows {
        print!("{name:<28}");
        for value in &values {
            if value.is_nan() {
                print!("{:>24}", "-");
            } else if value.fract() == 0.0 {
                print!("{:>24}", *value as u64);
            } else {
                print!("{value:>24.2}");
            }
        }
        if ratio && values.len() == 2 && values[1] > 0.0 && !values[0].is_nan() {
            print!("{:>12}", format_ratio(values[0] / values[1]));
        }
        println!();
    }
    for run in runs {
        let status = if run.verified {
            "verified"
        } else {
            "NOT VERIFIED"
        };
        println!(
            "{}: {status}: {} delivered, {} bounced, {} missing, {} duplicates, {} corrupt, {} notifications, {} dropped after the final dot",
            run.target,
            run.delivered,
            run.bounced,
            run.missing,
            run.duplicates,
            run.corrupt,
            run.notifications,
            run.dropped_after_dot
        );
        for error in &run.injection_errors {
            println!("{}: injection error: {error}", run.target);
        }
    }
}

/// Formats a ratio with three significant digits, so that a latency ratio
/// of 0.0003 does not print as 0.00.
fn format_ratio(ratio: f64) -> String {
    if ratio >= 100.0 || ratio == 0.0 {
        format!("{ratio:.0}")
    } else {
        let decimals = (2 - ratio.log10().floor() as i32).max(0) as usize;
        format!("{ratio:.decimals$}")
    }
}

fn column(runs: &[RunResult], value: impl Fn(&RunResult) -> f64) -> Vec<f64> {
    runs.iter().map(value).collect()
}

/// Writes `value` as pretty JSON to `<dir>/<name>.json` and returns the
/// path.
pub fn write_json(dir: &Path, name: &str, value: &impl Serialize) -> io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("{name}.json"));
    let text = serde_json::to_string_pretty(value).map_err(io::Error::other)?;
    std::fs::write(&path, text)?;
    Ok(path)
}
