//! Limits per source address: a token bucket and a connection cap for
//! each of a lane's source addresses, over all destinations together.
//!
//! Receivers judge a sender by its IP address as much as by its domain, so
//! a lane that sends from a few dedicated addresses must pace each of them.
//! Every executor of a lane sends from the same addresses, and executors
//! share no mutable state. Each one therefore enforces an equal share of
//! the configured limits. The rate, the burst and the connection cap are
//! divided by the lane's executor count, rounded up and kept at least 1.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::IpAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use caduceus_policy::Lane;
use caduceus_policy::config::LaneConfig;

use super::throttle::TokenBucket;

/// How often a delivery waiting for a free connection slot looks again.
pub const SLOT_POLL: Duration = Duration::from_millis(5);

/// One executor's limits for one lane's source addresses.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SourceLimits {
    pub rate_per_sec: Option<f64>,
    pub burst: u32,
    pub max_connections: Option<u32>,
}

impl SourceLimits {
    /// Returns this executor's share of the lane's limits when `executors`
    /// executors serve the lane.
    pub fn share(lane_config: &LaneConfig, executors: usize) -> SourceLimits {
        let executors = executors.max(1) as u32;
        let rate_per_sec = lane_config
            .source_rate
            .map(|rate| rate / f64::from(executors));
        let burst = match (lane_config.source_rate, lane_config.source_burst) {
            (None, _) => 0,
            (Some(_), Some(burst)) => burst,
            (Some(rate), None) => rate.ceil().clamp(1.0, f64::from(u32::MAX)) as u32,
        };
        SourceLimits {
            rate_per_sec,
            burst: burst.div_ceil(executors).max(1),
            max_connections: lane_config
                .source_max_connections
                .map(|cap| cap.div_ceil(executors).max(1)),
        }
    }

    fn is_unlimited(&self) -> bool {
        self.rate_per_sec.is_none() && self.max_connections.is_none()
    }
}

#[derive(Default)]
struct SourceState {
    bucket: Option<TokenBucket>,
    open_connections: Rc<Cell<u32>>,
}

/// A connection slot of one source address, given back when dropped.
struct SourceSlot {
    open_connections: Rc<Cell<u32>>,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        self.open_connections
            .set(self.open_connections.get().saturating_sub(1));
    }
}

/// The per-source state of one executor, for both lanes.
#[derive(Default)]
pub struct Sources {
    states: RefCell<HashMap<IpAddr, SourceState>>,
    cursor: Cell<usize>,
    /// Per lane: this executor's share of the limits.
    limits: [Option<SourceLimits>; 2],
}

fn lane_slot(lane: Lane) -> usize {
    match lane {
        Lane::Transactional => 0,
        Lane::Bulk => 1,
    }
}

impl Sources {
    pub fn new(transactional: SourceLimits, bulk: SourceLimits) -> Sources {
        Sources {
            limits: [Some(transactional), Some(bulk)],
            ..Sources::default()
        }
    }

    fn limits(&self, lane: Lane) -> SourceLimits {
        self.limits[lane_slot(lane)].unwrap_or(SourceLimits {
            rate_per_sec: None,
            burst: 0,
            max_connections: None,
        })
    }

    /// Picks the next source address of `addresses` in turn that has a free
    /// connection slot. Returns the address and the slot, which the caller
    /// ties to the connection, or `None` when every address is at its cap.
    /// `addresses` must not be empty.
    pub fn try_acquire(
        &self,
        lane: Lane,
        addresses: &[IpAddr],
    ) -> Option<(IpAddr, Box<dyn std::any::Any>)> {
        let cap = self.limits(lane).max_connections;
        let mut states = self.states.borrow_mut();
        let start = self.cursor.get();
        for offset in 0..addresses.len() {
            let address = addresses[(start + offset) % addresses.len()];
            let state = states.entry(address).or_default();
            let open = state.open_connections.get();
            if cap.is_none_or(|cap| open < cap) {
                state.open_connections.set(open + 1);
                self.cursor.set(start.wrapping_add(offset + 1));
                let slot = SourceSlot {
                    open_connections: state.open_connections.clone(),
                };
                return Some((address, Box::new(slot)));
            }
        }
        None
    }

    /// Waits for a token of `address`'s bucket when the lane sets a rate.
    pub async fn pace(&self, lane: Lane, address: IpAddr) {
        let limits = self.limits(lane);
        let Some(rate) = limits.rate_per_sec else {
            return;
        };
        loop {
            let wait = {
                let mut states = self.states.borrow_mut();
                let now = Instant::now();
                let state = states.entry(address).or_default();
                let bucket = state
                    .bucket
                    .get_or_insert_with(|| TokenBucket::new(rate, limits.burst, now));
                bucket.take(now)
            };
            match wait {
                Ok(()) => return,
                Err(duration) => glommio::timer::sleep(duration).await,
            }
        }
    }

    /// Returns true when neither lane limits its source addresses, so
    /// deliveries may skip the bookkeeping.
    pub fn unlimited(&self, lane: Lane) -> bool {
        self.limits(lane).is_unlimited()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_divides_limits_between_executors() {
        let mut lane = LaneConfig::default_for(Lane::Bulk);
        lane.source_rate = Some(300.0);
        lane.source_max_connections = Some(10);
        let share = SourceLimits::share(&lane, 3);
        assert_eq!(share.rate_per_sec, Some(100.0));
        assert_eq!(share.burst, 100, "one second of 300/s over 3 executors");
        assert_eq!(share.max_connections, Some(4), "10 / 3 rounded up");
        lane.source_burst = Some(1);
        assert_eq!(SourceLimits::share(&lane, 3).burst, 1);
    }

    #[test]
    fn share_without_limits_is_unlimited() {
        let lane = LaneConfig::default_for(Lane::Bulk);
        assert!(SourceLimits::share(&lane, 2).is_unlimited());
    }
}
