//! Live metrics for SREs, served in the Prometheus text format.
//!
//! Each executor owns a [`CoreMetrics`]: it alone writes its atomics, and
//! the exposition thread only reads them. Latency histograms (HdrHistogram)
//! and the per-destination throttle state are not atomics, so each
//! executor sends them once a second over a bounded channel (capacity
//! [`SNAPSHOT_CHANNEL_CAPACITY`]): a snapshot carries the latency recorded
//! since the previous one, and the exposition thread merges it into its own
//! totals at each scrape. When the channel is full because nobody scrapes,
//! the executor keeps the delta and sends it with the next snapshot, so no
//! sample is lost and memory stays bounded.
//!
//! The spool's group-commit statistics (fdatasync latency, records and bytes
//! per commit) travel the same way: the executor takes them from its own
//! shard at each snapshot.

pub mod exposition;
pub mod http;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use caduceus_policy::Lane;
use caduceus_spool::CommitStats;
use hdrhistogram::Histogram;

use crate::deliverylog::{Entry, Event};
use crate::shard::Shard;

/// Snapshots waiting for the exposition thread, per executor.
pub const SNAPSHOT_CHANNEL_CAPACITY: usize = 4;

/// How often an executor sends a snapshot and samples its queue.
const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// The destinations per executor whose throttle state is exported: the
/// busiest, so that label cardinality stays bounded whatever the queue
/// holds.
pub const TOP_DESTINATIONS: usize = 10;

/// The watchdog's timer period; a wake-up this much later than asked
/// counts as a stall of the executor.
const WATCHDOG_PERIOD: Duration = Duration::from_millis(10);
const STALL_THRESHOLD: Duration = Duration::from_millis(10);

/// Latency histograms record microseconds up to one week with three
/// significant digits.
const LATENCY_MAX_US: u64 = 7 * 86_400 * 1_000_000;

/// Creates an empty latency histogram.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_US, 3)
        .expect("the bounds are constants that hdrhistogram accepts (low >= 1, high >= 2 * low)")
}

/// Counters of one lane on one executor.
#[derive(Default)]
pub struct LaneCounters {
    pub accepted: AtomicU64,
    pub dsns: AtomicU64,
    pub delivered: AtomicU64,
    pub deferred: AtomicU64,
    pub bounced: AtomicU64,
    pub expired: AtomicU64,
    pub deleted: AtomicU64,
    /// Recipients not yet final.
    pub queue_recipients: AtomicI64,
}

/// One destination's throttle state at a sample.
#[derive(Clone, Debug)]
pub struct DestinationSample {
    pub domain: String,
    pub ready_items: u64,
    pub active_connections: u32,
    pub held: bool,
    /// 1.0 when no backoff is in force; lower after push-back.
    pub backoff_factor: f64,
}

/// An executor's periodic sample for the exposition thread.
pub struct Snapshot {
    /// Inject-to-delivery latency recorded since the previous snapshot, in
    /// microseconds, per lane (indexed by `Lane as usize`).
    pub latency_us: [Histogram<u64>; 2],
    pub destinations: Vec<DestinationSample>,
    /// The spool shard's group commits since the previous snapshot.
    pub commit: CommitStats,
}

/// One executor's metrics.
pub struct CoreMetrics {
    pub core: u16,
    pub lanes: [LaneCounters; 2],
    pub tls_full_handshakes: AtomicU64,
    pub tls_resumed_handshakes: AtomicU64,
    pub stalls: AtomicU64,
    pub stall_max_us: AtomicU64,
    pub spool_segments: AtomicU64,
    pub spool_bytes: AtomicU64,
    pub spool_live_messages: AtomicU64,
    /// Set once the executor has recovered its spool and accepts.
    pub ready: AtomicBool,
    snapshot_sender: crossbeam_channel::Sender<Snapshot>,
    pub(crate) snapshot_receiver: crossbeam_channel::Receiver<Snapshot>,
}

impl CoreMetrics {
    pub fn new(core: u16) -> CoreMetrics {
        let (snapshot_sender, snapshot_receiver) =
            crossbeam_channel::bounded(SNAPSHOT_CHANNEL_CAPACITY);
        CoreMetrics {
            core,
            lanes: Default::default(),
            tls_full_handshakes: AtomicU64::new(0),
            tls_resumed_handshakes: AtomicU64::new(0),
            stalls: AtomicU64::new(0),
            stall_max_us: AtomicU64::new(0),
            spool_segments: AtomicU64::new(0),
            spool_bytes: AtomicU64::new(0),
            spool_live_messages: AtomicU64::new(0),
            ready: AtomicBool::new(false),
            snapshot_sender,
            snapshot_receiver,
        }
    }

    pub fn lane(&self, lane: Lane) -> &LaneCounters {
        &self.lanes[lane as usize]
    }
}

/// Every executor's metrics, shared with the exposition thread.
pub struct Registry {
    pub cores: Vec<Arc<CoreMetrics>>,
    /// Set while the engine drains; `/readyz` then fails.
    pub shutdown: Arc<AtomicBool>,
}

impl Registry {
    /// Creates the metrics of the executors numbered `cores`.
    pub fn new(cores: Vec<u16>, shutdown: Arc<AtomicBool>) -> Arc<Registry> {
        Arc::new(Registry {
            cores: cores
                .into_iter()
                .map(|core| Arc::new(CoreMetrics::new(core)))
                .collect(),
            shutdown,
        })
    }

    /// The metrics of executor `core`.
    pub fn core(&self, core: u16) -> Option<Arc<CoreMetrics>> {
        self.cores
            .iter()
            .find(|metrics| metrics.core == core)
            .cloned()
    }

    /// Marks every executor ready; the engine calls it once each has
    /// reported that it recovered its spool and accepts.
    pub fn mark_all_ready(&self) {
        for core in &self.cores {
            core.ready.store(true, Ordering::Release);
        }
    }

    /// True when every executor finished recovery and accepts, and the
    /// engine is not draining.
    pub fn is_ready(&self) -> bool {
        !self.shutdown.load(Ordering::Acquire)
            && self
                .cores
                .iter()
                .all(|core| core.ready.load(Ordering::Acquire))
    }
}

/// The executor's side: its shared counters plus what only it touches.
struct LocalMetrics {
    shared: Arc<CoreMetrics>,
    latency_us: RefCell<[Histogram<u64>; 2]>,
    /// Commit statistics of a snapshot that found the channel full.
    unsent_commit: RefCell<Option<CommitStats>>,
    last_sample: Cell<Option<Instant>>,
    queue_seeded: Cell<bool>,
}

thread_local! {
    static LOCAL: RefCell<Option<Rc<LocalMetrics>>> = const { RefCell::new(None) };
}

fn local() -> Option<Rc<LocalMetrics>> {
    LOCAL.with(|local| local.borrow().clone())
}

/// Makes `metrics` this executor's metrics and starts its stall watchdog.
/// Call inside the executor.
pub fn install_core(metrics: Arc<CoreMetrics>) {
    let local = Rc::new(LocalMetrics {
        shared: metrics,
        latency_us: RefCell::new([latency_histogram(), latency_histogram()]),
        unsent_commit: RefCell::new(None),
        last_sample: Cell::new(None),
        queue_seeded: Cell::new(false),
    });
    LOCAL.with(|slot| *slot.borrow_mut() = Some(local.clone()));
    let watched = local.shared.clone();
    glommio::spawn_local(async move {
        // The timer fires late when a task ran without yielding for longer
        // than the preemption timer allows, or the thread was descheduled.
        loop {
            let asked = Instant::now();
            glommio::timer::sleep(WATCHDOG_PERIOD).await;
            let late = asked.elapsed().saturating_sub(WATCHDOG_PERIOD);
            if late >= STALL_THRESHOLD {
                let late_us = late.as_micros() as u64;
                watched.stalls.fetch_add(1, Ordering::Relaxed);
                watched.stall_max_us.fetch_max(late_us, Ordering::Relaxed);
                tracing::debug!(core = watched.core, late_us, "core: executor stalled");
            }
        }
    })
    .detach();
}

/// Adds `delta` to a counter of this executor's [`CoreMetrics`]. Only the
/// owning executor writes these counters, so a relaxed load and store are
/// enough. They cost less than a locked read-modify-write, and the
/// exposition thread still reads whole values, because an atomic store
/// never tears.
fn add_owned(counter: &AtomicU64, delta: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(delta),
        Ordering::Relaxed,
    );
}

/// Adds `delta` to a gauge of this executor's [`CoreMetrics`]; see
/// [`add_owned`].
fn add_owned_gauge(gauge: &AtomicI64, delta: i64) {
    gauge.store(
        gauge.load(Ordering::Relaxed).wrapping_add(delta),
        Ordering::Relaxed,
    );
}

/// Counts a delivery log event: accepted messages and DSNs at `received`,
/// recipient outcomes otherwise, and the inject-to-delivery latency. Call
/// only on the executor that owns the installed metrics.
pub fn record_event(entry: &Entry<'_>) {
    let Some(local) = local() else {
        return;
    };
    let lane = local.shared.lane(entry.lane);
    match entry.event {
        Event::Received => {
            if entry.note.is_some_and(|note| note.starts_with("dsn")) {
                add_owned(&lane.dsns, 1);
            } else {
                add_owned(&lane.accepted, 1);
            }
            let recipients = entry.recipients.unwrap_or(0) as i64;
            add_owned_gauge(&lane.queue_recipients, recipients);
        }
        Event::Deferred => {
            add_owned(&lane.deferred, 1);
        }
        Event::Delivered | Event::Bounced | Event::Expired | Event::Deleted => {
            let counter = match entry.event {
                Event::Delivered => &lane.delivered,
                Event::Bounced => &lane.bounced,
                Event::Expired => &lane.expired,
                _ => &lane.deleted,
            };
            add_owned(counter, 1);
            add_owned_gauge(&lane.queue_recipients, -1);
            if entry.event == Event::Delivered {
                let latency_us = entry.at_us.saturating_sub(entry.received_at_us).max(1);
                local.latency_us.borrow_mut()[entry.lane as usize].saturating_record(latency_us);
            }
        }
    }
}

/// Samples the executor's queue, TLS and spool state and sends a snapshot;
/// call from the executor's periodic tick. Does nothing until a second has
/// passed since the previous sample.
pub fn sample_shard(shard: &Shard) {
    let Some(local) = local() else {
        return;
    };
    let now = Instant::now();
    if local
        .last_sample
        .get()
        .is_some_and(|last| now.duration_since(last) < SAMPLE_INTERVAL)
    {
        return;
    }
    local.last_sample.set(Some(now));
    let shared = &local.shared;
    let queue = shard.queue.borrow();
    if !local.queue_seeded.replace(true) {
        // One full scan sets the gauge to what recovery put in the queue
        // plus what arrived since; the event hooks keep it current after.
        let mut pending = [0i64; 2];
        for message in queue.messages.values() {
            let count = message
                .states
                .iter()
                .filter(|state| !state.is_final())
                .count();
            pending[message.envelope.lane as usize] += count as i64;
        }
        for lane in Lane::ALL {
            shared
                .lane(lane)
                .queue_recipients
                .store(pending[lane as usize], Ordering::Relaxed);
        }
    }
    let mut destinations: Vec<DestinationSample> = queue
        .destinations
        .iter()
        .filter(|(_, destination)| {
            !destination.ready.is_empty()
                || destination.active_workers > 0
                || destination.held
                || destination.backoff.is_active()
        })
        .map(|(domain, destination)| DestinationSample {
            domain: domain.to_string(),
            ready_items: destination.ready.len() as u64,
            active_connections: destination.active_workers,
            held: destination.held,
            backoff_factor: destination.backoff.factor(),
        })
        .collect();
    drop(queue);
    destinations.sort_by(|a, b| {
        (b.ready_items + u64::from(b.active_connections))
            .cmp(&(a.ready_items + u64::from(a.active_connections)))
            .then_with(|| a.domain.cmp(&b.domain))
    });
    destinations.truncate(TOP_DESTINATIONS);

    let (full, resumed) = shard.tls.handshake_counts();
    shared.tls_full_handshakes.store(full, Ordering::Relaxed);
    shared
        .tls_resumed_handshakes
        .store(resumed, Ordering::Relaxed);
    let stats = shard.spool.stats();
    shared
        .spool_segments
        .store(u64::from(stats.segments), Ordering::Relaxed);
    shared
        .spool_bytes
        .store(stats.bytes_on_disk, Ordering::Relaxed);
    shared
        .spool_live_messages
        .store(stats.live_records, Ordering::Relaxed);

    let latency_us = std::mem::replace(
        &mut *local.latency_us.borrow_mut(),
        [latency_histogram(), latency_histogram()],
    );
    let mut commit = shard.spool.take_commit_stats();
    if let Some(mut unsent) = local.unsent_commit.borrow_mut().take() {
        unsent.add(&commit);
        commit = unsent;
    }
    let snapshot = Snapshot {
        latency_us,
        destinations,
        commit,
    };
    if let Err(
        crossbeam_channel::TrySendError::Full(unsent)
        | crossbeam_channel::TrySendError::Disconnected(unsent),
    ) = shared.snapshot_sender.try_send(snapshot)
    {
        // Keep the samples for the next snapshot.
        let mut pending = local.latency_us.borrow_mut();
        for (kept, delta) in pending.iter_mut().zip(unsent.latency_us.iter()) {
            // Both come from `latency_histogram()`, so their bounds match and
            // adding cannot fail.
            let _ = kept.add(delta);
        }
        *local.unsent_commit.borrow_mut() = Some(unsent.commit);
    }
}
