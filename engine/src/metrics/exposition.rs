//! The Prometheus text exposition format, version 0.0.4: `# HELP` and
//! `# TYPE` lines, then one `name{labels} value` line per series.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use caduceus_policy::Lane;
use hdrhistogram::Histogram;

use super::{CoreMetrics, DestinationSample, Registry, latency_histogram};

/// Upper bounds of the latency histogram's buckets, in seconds.
const LATENCY_BUCKETS_SECONDS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
    3600.0,
];

/// Latency totals and the latest destination samples, accumulated by the
/// exposition thread from the executors' snapshots.
pub struct Totals {
    latency_us: Vec<[Histogram<u64>; 2]>,
    destinations: Vec<Vec<DestinationSample>>,
}

impl Totals {
    pub fn new(executors: usize) -> Totals {
        Totals {
            latency_us: (0..executors)
                .map(|_| [latency_histogram(), latency_histogram()])
                .collect(),
            destinations: vec![Vec::new(); executors],
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
