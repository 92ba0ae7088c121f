//! The summary recording: one small record per message and latency
//! histograms, so a benchmark of a million messages keeps no message bytes.

use std::collections::HashMap;

use hdrhistogram::Histogram;

/// Highest latency the histograms hold: one hour, in microseconds. Larger
/// values are clamped to it.
const MAX_LATENCY_US: u64 = 3_600_000_000;
/// Significant digits of the per-lane histograms (0.1 % resolution).
const LANE_SIGNIFICANT_DIGITS: u8 = 3;
/// Significant digits of the per-domain histograms (1 % resolution). A
/// fan-out run has a thousand domains, and at 3 digits each histogram takes
/// about 190 KB.
const DOMAIN_SIGNIFICANT_DIGITS: u8 = 2;

/// One message, as the summary recording keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageSummary {
    /// Sequence number of the connection, from 1.
    pub connection: u64,
    /// Domain of the first accepted recipient, lowercased.
    pub domain: String,
    pub recipients: u32,
    /// The [`super::LANE_HEADER`] field, if the message had one.
    pub lane: Option<String>,
    /// The [`super::INJECTED_HEADER`] field, if the message had a valid one.
    pub injected_at_us: Option<u64>,
    /// When the final dot was read, in microseconds since the epoch.
    pub received_at_us: u64,
    /// Content size after dot-unstuffing, header and body.
    pub size_bytes: u64,
    /// FNV-1a of the body (the bytes after the first empty line), because
    /// the relaying MTA adds header fields and removes some.
    pub body_checksum: u64,
    pub tls: bool,
    /// Reply code sent after the final dot; `None` when the script dropped
    /// the connection instead.
    pub reply_code: Option<u16>,
}

impl MessageSummary {
    /// Whether the receiver took responsibility for the message.
    pub fn accepted(&self) -> bool {
        matches!(self.reply_code, Some(200..=299))
    }

    /// Returns the injection-to-receipt latency in microseconds, if the
    /// message carried an injection time.
    pub fn latency_us(&self) -> Option<u64> {
        self.injected_at_us
            .map(|injected| self.received_at_us.saturating_sub(injected))
    }
}

/// A latency histogram in microseconds, with its key (a lane or a domain).
#[derive(Clone, Debug)]
pub struct LatencyHistogram {
    pub key: String,
    pub latency_us: Histogram<u64>,
}

/// A copy of everything the summary recording kept.
#[derive(Clone, Debug, Default)]
pub struct SinkSummary {
    pub messages: Vec<MessageSummary>,
    /// Addresses whose RCPT got a 5xx reply, with the reply code.
    pub rejected_recipients: Vec<(String, u16)>,
    /// Latency of accepted messages per lane, sorted by lane.
    pub lanes: Vec<LatencyHistogram>,
    /// Latency of accepted messages per recipient domain, sorted by domain.
    pub domains: Vec<LatencyHistogram>,
}

pub(super) struct SummaryState {
    messages: Vec<MessageSummary>,
    rejected_recipients: Vec<(String, u16)>,
    lanes: HashMap<String, Histogram<u64>>,
    domains: HashMap<String, Histogram<u64>>,
}

fn new_histogram(significant_digits: u8) -> Histogram<u64> {
    // The bounds are constants that satisfy the constructor's contract
    // (low >= 1, high >= 2 * low, digits <= 5).
    Histogram::new_with_bounds(1, MAX_LATENCY_US, significant_digits)
        .expect("constant histogram bounds are valid")
}

impl SummaryState {
    pub(super) fn new() -> SummaryState {
        SummaryState {
            messages: Vec::new(),
            rejected_recipients: Vec::new(),
            lanes: HashMap::new(),
            domains: HashMap::new(),
        }
    }

    pub(super) fn record(&mut self, message: MessageSummary) {
        if message.accepted()
            && let Some(latency_us) = message.latency_us()
        {
            let latency_us = latency_us.clamp(1, MAX_LATENCY_US);
            let lane = message.lane.clone().unwrap_or_else(|| "none".to_string());
            self.lanes
                .entry(lane)
                .or_insert_with(|| new_histogram(LANE_SIGNIFICANT_DIGITS))
                .saturating_record(latency_us);
            self.domains
                .entry(message.domain.clone())
                .or_insert_with(|| new_histogram(DOMAIN_SIGNIFICANT_DIGITS))
                .saturating_record(latency_us);
        }
        self.messages.push(message);
    }

    pub(super) fn record_rejection(&mut self, recipient: &str, code: u16) {
        self.rejected_recipients.push((recipient.to_string(), code));
    }

    pub(super) fn snapshot(&self) -> SinkSummary {
        let sorted = |map: &HashMap<String, Histogram<u64>>| {
            let mut histograms: Vec<LatencyHistogram> = map
                .iter()
                .map(|(key, histogram)| LatencyHistogram {
                    key: key.clone(),
                    latency_us: histogram.clone(),
                })
                .collect();
            histograms.sort_by(|left, right| left.key.cmp(&right.key));
            histograms
        };
        SinkSummary {
            messages: self.messages.clone(),
            rejected_recipients: self.rejected_recipients.clone(),
            lanes: sorted(&self.lanes),
            domains: sorted(&self.domains),
        }
    }
}
