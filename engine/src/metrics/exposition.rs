//! The Prometheus text exposition format, version 0.0.4: `# HELP` and
//! `# TYPE` lines, then one `name{labels} value` line per series.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use caduceus_policy::Lane;
use caduceus_spool::CommitStats;
use hdrhistogram::Histogram;

use super::{CoreMetrics, DestinationSample, Registry, latency_histogram};

/// Upper bounds of the latency histogram's buckets, in seconds.
const LATENCY_BUCKETS_SECONDS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
    3600.0,
];

/// Upper bounds of the fdatasync latency buckets, in seconds.
const FSYNC_BUCKETS_SECONDS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Upper bounds of the records-per-commit buckets.
const BATCH_RECORDS_BUCKETS: [f64; 13] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
];

/// Upper bounds of the bytes-per-commit buckets, from 4 KiB to 256 MiB.
const BATCH_BYTES_BUCKETS: [f64; 9] = [
    4096.0,
    16384.0,
    65536.0,
    262144.0,
    1048576.0,
    4194304.0,
    16777216.0,
    67108864.0,
    268435456.0,
];

/// Latency totals and the latest destination samples, accumulated by the
/// exposition thread from the executors' snapshots.
pub struct Totals {
    latency_us: Vec<[Histogram<u64>; 2]>,
    destinations: Vec<Vec<DestinationSample>>,
    commit: Vec<CommitStats>,
}

impl Totals {
    pub fn new(executors: usize) -> Totals {
        Totals {
            latency_us: (0..executors)
                .map(|_| [latency_histogram(), latency_histogram()])
                .collect(),
            destinations: vec![Vec::new(); executors],
            commit: (0..executors).map(|_| CommitStats::new()).collect(),
        }
    }

    /// Takes every snapshot the executors have sent.
    pub fn drain(&mut self, registry: &Registry) {
        for (index, core) in registry.cores.iter().enumerate() {
            while let Ok(snapshot) = core.snapshot_receiver.try_recv() {
                for (total, delta) in self.latency_us[index]
                    .iter_mut()
                    .zip(snapshot.latency_us.iter())
                {
                    // Both sides come from `latency_histogram()`, so their bounds match
                    // and adding cannot fail.
                    let _ = total.add(delta);
                }
                self.destinations[index] = snapshot.destinations;
                self.commit[index].add(&snapshot.commit);
            }
        }
    }
}

/// Escapes a label value (backslash, double quote and newline).
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

type LaneCounter = fn(&super::LaneCounters) -> u64;

/// Renders every metric.
pub fn render(registry: &Registry, totals: &Totals) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let lane_counters: [(&str, &str, LaneCounter); 7] = [
        (
            "caduceus_messages_accepted_total",
            "Messages accepted from clients on the lane sockets.",
            |c| c.accepted.load(Ordering::Relaxed),
        ),
        (
            "caduceus_dsns_generated_total",
            "Delivery status notifications queued.",
            |c| c.dsns.load(Ordering::Relaxed),
        ),
        (
            "caduceus_recipients_delivered_total",
            "Recipients delivered.",
            |c| c.delivered.load(Ordering::Relaxed),
        ),
        (
            "caduceus_recipients_deferred_total",
            "Delivery attempts that failed temporarily and will be retried.",
            |c| c.deferred.load(Ordering::Relaxed),
        ),
        (
            "caduceus_recipients_bounced_total",
            "Recipients that failed permanently.",
            |c| c.bounced.load(Ordering::Relaxed),
        ),
        (
            "caduceus_recipients_expired_total",
            "Recipients whose queue lifetime ran out.",
            |c| c.expired.load(Ordering::Relaxed),
        ),
        (
            "caduceus_recipients_deleted_total",
            "Recipients deleted by an operator.",
            |c| c.deleted.load(Ordering::Relaxed),
        ),
    ];
    for (name, help, read) in lane_counters {
        header(&mut out, name, "counter", help);
        for core in &registry.cores {
            for lane in Lane::ALL {
                let value = read(core.lane(lane));
                let _ = writeln!(
                    out,
                    "{name}{{core=\"{}\",lane=\"{}\"}} {value}",
                    core.core,
                    lane.as_str()
                );
            }
        }
    }
    header(
        &mut out,
        "caduceus_queue_recipients",
        "gauge",
        "Recipients not yet final (pending or deferred).",
    );
    for core in &registry.cores {
        for lane in Lane::ALL {
            let value = core.lane(lane).queue_recipients.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "caduceus_queue_recipients{{core=\"{}\",lane=\"{}\"}} {value}",
                core.core,
                lane.as_str()
            );
        }
    }
    render_latency(&mut out, registry, totals);
    render_commit(&mut out, registry, totals);
    type CoreValue = fn(&CoreMetrics) -> String;
    let core_values: [(&str, &str, &str, CoreValue); 7] = [
        (
            "caduceus_tls_handshakes_full_total",
            "counter",
            "Outbound TLS handshakes that did not resume a session.",
            |c| c.tls_full_handshakes.load(Ordering::Relaxed).to_string(),
        ),
        (
            "caduceus_tls_handshakes_resumed_total",
            "counter",
            "Outbound TLS handshakes that resumed a cached session.",
            |c| c.tls_resumed_handshakes.load(Ordering::Relaxed).to_string(),
        ),
        (
            "caduceus_executor_stalls_total",
            "counter",
            "Watchdog timer wake-ups at least 10 ms late (the executor was blocked).",
            |c| c.stalls.load(Ordering::Relaxed).to_string(),
        ),
        (
            "caduceus_executor_stall_max_seconds",
            "gauge",
            "The longest watchdog lateness seen since start.",
            |c| format!("{}", c.stall_max_us.load(Ordering::Relaxed) as f64 / 1e6),
        ),
        (
            "caduceus_spool_segments",
            "gauge",
            "Spool segment files.",
            |c| c.spool_segments.load(Ordering::Relaxed).to_string(),
        ),
        (
            "caduceus_spool_bytes",
            "gauge",
            "Preallocated bytes of the spool segment files.",
            |c| c.spool_bytes.load(Ordering::Relaxed).to_string(),
        ),
        (
            "caduceus_spool_live_messages",
            "gauge",
            "Messages in the spool not yet released.",
            |c| c.spool_live_messages.load(Ordering::Relaxed).to_string(),
        ),
    ];
    for (name, kind, help, read) in core_values {
        header(&mut out, name, kind, help);
        for core in &registry.cores {
            let _ = writeln!(out, "{name}{{core=\"{}\"}} {}", core.core, read(core));
        }
    }
    header(
        &mut out,
        "caduceus_executor_ready",
        "gauge",
        "1 when the executor has recovered its spool and accepts mail.",
    );
    for core in &registry.cores {
        let ready = u8::from(core.ready.load(Ordering::Acquire));
        let _ = writeln!(
            out,
            "caduceus_executor_ready{{core=\"{}\"}} {ready}",
            core.core
        );
    }
    render_destinations(&mut out, registry, totals);
    out
}

fn render_latency(out: &mut String, registry: &Registry, totals: &Totals) {
    let name = "caduceus_delivery_latency_seconds";
    header(
        out,
        name,
        "histogram",
        "Time from acceptance to delivery, per delivered recipient (HdrHistogram, 3 significant digits).",
    );
    for (core, histograms) in registry.cores.iter().zip(&totals.latency_us) {
        for lane in Lane::ALL {
            let histogram = &histograms[lane as usize];
            let labels = format!("core=\"{}\",lane=\"{}\"", core.core, lane.as_str());
            for bound in LATENCY_BUCKETS_SECONDS {
                let bound_us = (bound * 1e6) as u64;
                let count: u64 = histogram
                    .iter_recorded()
                    .filter(|value| value.value_iterated_to() <= bound_us)
                    .map(|value| value.count_at_value())
                    .sum();
                let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {count}");
            }
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels},le=\"+Inf\"}} {}",
                histogram.len()
            );
            let sum_seconds = histogram.mean() * histogram.len() as f64 / 1e6;
            let _ = writeln!(out, "{name}_sum{{{labels}}} {sum_seconds}");
            let _ = writeln!(out, "{name}_count{{{labels}}} {}", histogram.len());
        }
    }
}

/// Writes one histogram series: cumulative `_bucket` lines for `bounds`
/// (in the unit exported) and `+Inf`, then `_sum` and `_count`. `scale`
/// converts a recorded value to the exported unit.
///
/// HdrHistogram keeps values in ranges of about 1 % of their size (exact
/// below 256). A bucket counts every recorded value whose range starts at
/// or below its bound, so a value up to 1 % above a bound can count in the
/// bound's bucket. `_sum` is `exact_sum`, not derived from the ranges.
fn write_histogram(
    out: &mut String,
    name: &str,
    labels: &str,
    histogram: &Histogram<u64>,
    bounds: &[f64],
    scale: f64,
    exact_sum: f64,
) {
    for bound in bounds {
        // Compare in recorded units: `100.0 * 1e-6` is not `0.0001` in f64.
        let bound_recorded = (bound / scale).round() as u64;
        let count: u64 = histogram
            .iter_recorded()
            .filter(|value| {
                histogram.lowest_equivalent(value.value_iterated_to()) <= bound_recorded
            })
            .map(|value| value.count_at_value())
            .sum();
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {count}");
    }
    let _ = writeln!(
        out,
        "{name}_bucket{{{labels},le=\"+Inf\"}} {}",
        histogram.len()
    );
    let _ = writeln!(out, "{name}_sum{{{labels}}} {exact_sum}");
    let _ = writeln!(out, "{name}_count{{{labels}}} {}", histogram.len());
}

fn render_commit(out: &mut String, registry: &Registry, totals: &Totals) {
    type Family = (
        &'static str,
        &'static str,
        fn(&CommitStats) -> (&Histogram<u64>, f64),
        &'static [f64],
        f64,
    );
    let families: [Family; 3] = [
        (
            "caduceus_spool_fsync_seconds",
            "Latency of each spool fdatasync call, failed ones included (HdrHistogram, 2 significant digits).",
            |c| (&c.fsync_us, c.fsync_total_us as f64 / 1e6),
            &FSYNC_BUCKETS_SECONDS,
            1e-6,
        ),
        (
            "caduceus_spool_commit_batch_records",
            "Spool records made durable per successful group commit.",
            |c| (&c.batch_records, c.batch_records_total as f64),
            &BATCH_RECORDS_BUCKETS,
            1.0,
        ),
        (
            "caduceus_spool_commit_batch_bytes",
            "Bytes of spool records made durable per successful group commit.",
            |c| (&c.batch_bytes, c.batch_bytes_total as f64),
            &BATCH_BYTES_BUCKETS,
            1.0,
        ),
    ];
    for (name, help, read, bounds, scale) in families {
        header(out, name, "histogram", help);
        for (core, stats) in registry.cores.iter().zip(&totals.commit) {
            let (histogram, sum) = read(stats);
            let labels = format!("core=\"{}\"", core.core);
            write_histogram(out, name, &labels, histogram, bounds, scale, sum);
        }
    }
    type Counter = fn(&CommitStats) -> u64;
    let counters: [(&str, &str, Counter); 2] = [
        (
            "caduceus_spool_commits_total",
            "Successful spool group commits.",
            CommitStats::commits,
        ),
        (
            "caduceus_spool_fsync_failures_total",
            "Spool fdatasync calls that failed; each retires the segment it synced.",
            |c| c.fsync_failures,
        ),
    ];
    for (name, help, read) in counters {
        header(out, name, "counter", help);
        for (core, stats) in registry.cores.iter().zip(&totals.commit) {
            let _ = writeln!(out, "{name}{{core=\"{}\"}} {}", core.core, read(stats));
        }
    }
}

fn render_destinations(out: &mut String, registry: &Registry, totals: &Totals) {
    type Read = fn(&DestinationSample) -> String;
    let families: [(&str, &str, Read); 4] = [
        (
            "caduceus_destination_ready_items",
            "Work items ready for the busiest destinations (at most 10 per core).",
            |d| d.ready_items.to_string(),
        ),
        (
            "caduceus_destination_connections",
            "Deliveries in flight for the busiest destinations.",
            |d| d.active_connections.to_string(),
        ),
        (
            "caduceus_destination_backoff_factor",
            "The scaling of the destination's rate and connections after push-back (1 when none).",
            |d| d.backoff_factor.to_string(),
        ),
        (
            "caduceus_destination_held",
            "1 when an operator holds the destination.",
            |d| u8::from(d.held).to_string(),
        ),
    ];
    // Prometheus requires each family's lines to be contiguous.
    for (name, help, read) in families {
        header(out, name, "gauge", help);
        for (core, destinations) in registry.cores.iter().zip(&totals.destinations) {
            for destination in destinations {
                let _ = writeln!(
                    out,
                    "{name}{{core=\"{}\",destination=\"{}\"}} {}",
                    core.core,
                    label(&destination.domain),
                    read(destination)
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    use super::*;

    /// Returns the `(le, count)` pairs of the series named `name`.
    fn buckets(text: &str, name: &str) -> Vec<(String, u64)> {
        let prefix = format!("{name}_bucket{{");
        text.lines()
            .filter_map(|line| line.strip_prefix(&prefix))
            .map(|rest| {
                let (labels, value) = rest.rsplit_once(' ').unwrap();
                let le = labels
                    .split("le=\"")
                    .nth(1)
                    .unwrap()
                    .trim_end_matches("\"}");
                (le.to_string(), value.parse().unwrap())
            })
            .collect()
    }

    fn value(text: &str, series: &str) -> String {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("{series} missing in\n{text}"))
            .to_string()
    }

    #[test]
    fn histogram_bucket_bounds_are_inclusive() {
        let mut histogram = Histogram::new_with_bounds(1, 1_000_000, 2).unwrap();
        // 100 µs lies exactly on the first bound, 101 µs just above it.
        histogram.record(100).unwrap();
        histogram.record(101).unwrap();
        histogram.record(600_000).unwrap();
        let mut out = String::new();
        write_histogram(
            &mut out,
            "t",
            "core=\"0\"",
            &histogram,
            &[0.0001, 0.001, 1.0],
            1e-6,
            0.600201,
        );
        let counts: Vec<u64> = buckets(&out, "t").into_iter().map(|(_, c)| c).collect();
        assert_eq!(counts, [1, 2, 3, 3]);
        assert_eq!(value(&out, "t_sum{core=\"0\"}"), "0.600201");
        assert_eq!(value(&out, "t_count{core=\"0\"}"), "3");
    }

    #[test]
    fn commit_families_render_per_core() {
        let registry = Registry::new(vec![0, 3], Arc::new(AtomicBool::new(false)));
        let mut totals = Totals::new(2);
        let mut delta = CommitStats::new();
        for records in [1u64, 3, 3, 700] {
            delta.batch_records.record(records).unwrap();
            delta.batch_records_total += records;
            delta.batch_bytes.record(records * 2048).unwrap();
            delta.batch_bytes_total += records * 2048;
            delta.fsync_us.record(250).unwrap();
            delta.fsync_total_us += 250;
        }
        delta.fsync_failures = 1;
        totals.commit[1].add(&delta);
        let text = render(&registry, &totals);

        let records = buckets(&text, "caduceus_spool_commit_batch_records");
        let core_3: Vec<&(String, u64)> = records
            .iter()
            .skip(BATCH_RECORDS_BUCKETS.len() + 1)
            .collect();
        assert!(
            records[..=BATCH_RECORDS_BUCKETS.len()]
                .iter()
                .all(|(_, count)| *count == 0)
        );
        assert_eq!(core_3[0], &("1".to_string(), 1));
        assert_eq!(core_3[2], &("4".to_string(), 3));
        assert_eq!(core_3.last().unwrap(), &&("+Inf".to_string(), 4));
        assert!(core_3.windows(2).all(|pair| pair[0].1 <= pair[1].1));
        assert_eq!(
            value(&text, "caduceus_spool_commit_batch_records_sum{core=\"3\"}"),
            "707"
        );
        assert_eq!(
            value(&text, "caduceus_spool_commit_batch_bytes_sum{core=\"3\"}"),
            (707 * 2048).to_string()
        );
        assert_eq!(
            value(&text, "caduceus_spool_fsync_seconds_sum{core=\"3\"}"),
            "0.001"
        );
        let fsync = buckets(&text, "caduceus_spool_fsync_seconds");
        assert!(fsync.contains(&("0.00025".to_string(), 4)));
        assert_eq!(
            value(&text, "caduceus_spool_commits_total{core=\"3\"}"),
            "4"
        );
        assert_eq!(
            value(&text, "caduceus_spool_commits_total{core=\"0\"}"),
            "0"
        );
        assert_eq!(
            value(&text, "caduceus_spool_fsync_failures_total{core=\"3\"}"),
            "1"
        );
    }
}
