//! Destination sharding within a lane.
//!
//! When a lane runs on several executors, each destination domain has one
//! home executor, chosen by a stable hash of the domain over the lane's
//! executors. Only the home executor opens connections to the destination,
//! so its token bucket, connection cap, backoff state and TLS sessions are
//! exact for the whole lane rather than per core.
//!
//! The executor that received a message (its owner) keeps it for its whole
//! life: its spool shard contains the record and every outcome record. When a
//! recipient's destination lives elsewhere, the owner hands the recipients
//! to the home executor as a reference (record location, envelope,
//! recipient states). The home executor reads the body from the owner's
//! segment through its own read-only mapping, delivers, logs, and sends
//! each recipient's outcome back. The owner appends the outcome under its
//! own group commit and keeps the retry timers.
//!
//! Messages between two executors travel over one bounded glommio shared
//! channel per direction. Each executor queues what it sends in a local
//! outbox that one task per peer drains into the channel, so the sender
//! never blocks. Ingress keeps the outboxes bounded: a recipient whose home
//! executor's outbox already holds a full channel's worth of hand-offs gets
//! `451 4.3.1` at RCPT, before anything is made durable.

use std::cell::Cell;
use std::collections::HashMap;
use std::rc::Rc;

use caduceus_policy::Lane;
use caduceus_spool::{CommitSeq, Envelope, Outcome, RecipientState, RecordRef};
use glommio::channels::local_channel::{self, LocalSender};
use glommio::channels::shared_channel::{self, SharedReceiver, SharedSender};

use crate::cores::ExecutorSpec;

/// Messages each direction between two executors can hold. A hand-off is
/// about 100 bytes plus its envelope, so a full channel costs well under
/// a megabyte, while it buffers more than a second of hand-offs at the
/// delivery rates one core reaches.
pub const CHANNEL_CAPACITY: usize = 4096;

/// The receiving end of a channel from a peer, once connected.
pub type PeerReceiver = shared_channel::ConnectedReceiver<MeshMessage>;

/// A message from one executor to another.
pub enum MeshMessage {
    /// Owner to home executor: deliver these recipients of this record.
    Handoff {
        record: RecordRef,
        envelope: Box<Envelope>,
        /// The owner's state of every recipient of the message, in envelope
        /// order; the attempt counts of `recipients` come from here.
        states: Vec<RecipientState>,
        recipients: Vec<u32>,
    },
    /// Home executor to owner: the result of one attempt for one recipient.
    Outcome {
        record: RecordRef,
        index: u32,
        state: RecipientState,
        outcome: Outcome,
        attempts: u32,
    },
}

/// The channel ends of one executor, built on the main thread before the
/// executors start.
#[derive(Default)]
pub struct MeshEnds {
    pub senders: Vec<(u16, SharedSender<MeshMessage>)>,
    pub receivers: Vec<(u16, SharedReceiver<MeshMessage>)>,
}

/// The executors of each lane, in allocation order.
#[derive(Clone, Debug, Default)]
pub struct LaneCores {
    pub transactional: Vec<u16>,
    pub bulk: Vec<u16>,
}

impl LaneCores {
    pub fn from_allocation(allocation: &[ExecutorSpec]) -> LaneCores {
        let serving = |lane| {
            allocation
                .iter()
                .filter(|spec| spec.lanes.contains(&lane))
                .map(|spec| spec.index)
                .collect()
        };
        LaneCores {
            transactional: serving(Lane::Transactional),
            bulk: serving(Lane::Bulk),
        }
    }

    fn of(&self, lane: Lane) -> &[u16] {
        match lane {
            Lane::Transactional => &self.transactional,
            Lane::Bulk => &self.bulk,
        }
    }

    /// Returns the executor that delivers to `domain` in `lane`. `domain`
    /// is the lowercase A-label the ingress stores, so equal domains always
    /// hash alike. The hash is FNV-1a, fixed here so that the mapping stays
    /// the same across releases and restarts.
    pub fn home(&self, lane: Lane, domain: &str) -> Option<u16> {
        let cores = self.of(lane);
        match cores.len() {
            0 => None,
            1 => Some(cores[0]),
            count => Some(cores[(fnv1a(domain.as_bytes()) % count as u64) as usize]),
        }
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// Builds one bounded channel per direction between every two executors
/// that share a lane. Returns the ends of each executor, indexed by its
/// position in `allocation`.
pub fn build(allocation: &[ExecutorSpec], capacity: usize) -> Vec<MeshEnds> {
    let mut ends: Vec<MeshEnds> = allocation.iter().map(|_| MeshEnds::default()).collect();
    for (from, from_spec) in allocation.iter().enumerate() {
        for (to, to_spec) in allocation.iter().enumerate() {
            let shares_lane = from_spec
                .lanes
                .iter()
                .any(|lane| to_spec.lanes.contains(lane));
            if from == to || !shares_lane {
                continue;
            }
            let (sender, receiver) = shared_channel::new_bounded(capacity);
            ends[from].senders.push((to_spec.index, sender));
            ends[to].receivers.push((from_spec.index, receiver));
        }
    }
    ends
}

/// One peer's outbox: a local queue drained into the shared channel.
struct Outbox {
    queue: LocalSender<MeshMessage>,
    /// Hand-offs queued and not yet accepted by the channel.
    pending_handoffs: Rc<Cell<usize>>,
}

/// An executor's side of the mesh, once connected.
pub struct Mesh {
    pub lanes: LaneCores,
    own: u16,
    /// The lanes this executor serves.
    own_lanes: Vec<Lane>,
    capacity: usize,
    outboxes: HashMap<u16, Outbox>,
}

impl Mesh {
    /// Connects every channel end of this executor, inside the executor.
    /// All executors connect at the same time, since each connection waits
    /// for its peer. Returns the mesh and the receivers to serve.
    pub async fn connect(
        own: u16,
        own_lanes: &[Lane],
        lanes: LaneCores,
        ends: MeshEnds,
        capacity: usize,
    ) -> (Mesh, Vec<(u16, PeerReceiver)>) {
        // Every connection runs as its own task: connecting in sequence
        // could wait on a peer that is itself waiting on this executor.
        let receivers: Vec<_> = ends
            .receivers
            .into_iter()
            .map(|(peer, receiver)| {
                glommio::spawn_local(async move { (peer, receiver.connect().await) })
            })
            .collect();
        let senders: Vec<_> = ends
            .senders
            .into_iter()
            .map(|(peer, sender)| {
                glommio::spawn_local(async move { (peer, sender.connect().await) })
            })
            .collect();
        let mut connected_receivers = Vec::with_capacity(receivers.len());
        for task in receivers {
            connected_receivers.push(task.await);
        }
        let mut outboxes = HashMap::new();
        for task in senders {
            let (peer, connected) = task.await;
            let (queue, drain) = local_channel::new_unbounded::<MeshMessage>();
            let pending_handoffs = Rc::new(Cell::new(0usize));
            let pending = pending_handoffs.clone();
            glommio::spawn_local(async move {
                while let Some(message) = drain.recv().await {
                    let handoff = matches!(message, MeshMessage::Handoff { .. });
                    if connected.send(message).await.is_err() {
                        // The peer stopped (shutdown). What it was sent is
                        // still pending in the owner's spool and is
                        // delivered after the restart.
                        tracing::debug!(core = own, peer, "mesh: peer channel closed");
                    }
                    if handoff {
                        pending.set(pending.get().saturating_sub(1));
                    }
                }
            })
            .detach();
            outboxes.insert(
                peer,
                Outbox {
                    queue,
                    pending_handoffs,
                },
            );
        }
        (
            Mesh {
                lanes,
                own,
                own_lanes: own_lanes.to_vec(),
                capacity,
                outboxes,
            },
            connected_receivers,
        )
    }

    /// Returns true when this executor has peers to hand work to.
    pub fn has_peers(&self) -> bool {
        !self.outboxes.is_empty()
    }

    /// Returns true when this executor is the home of `domain` in every
    /// lane it serves, so that nothing for it is ever handed off.
    pub fn home_everywhere(&self, domain: &str) -> bool {
        self.outboxes.is_empty()
            || self
                .own_lanes
                .iter()
                .all(|lane| self.home(*lane, domain) == self.own)
    }

    /// Returns the executor that delivers to `domain` in `lane`, or this
    /// executor when the lane has no other.
    pub fn home(&self, lane: Lane, domain: &str) -> u16 {
        if self.outboxes.is_empty() {
            return self.own;
        }
        self.lanes.home(lane, domain).unwrap_or(self.own)
    }

    /// Returns true when a new recipient for `domain` must wait, because
    /// its home executor is another one and this executor's outbox to it
    /// already contains a full channel's worth of hand-offs.
    pub fn saturated(&self, lane: Lane, domain: &str) -> bool {
        let home = self.home(lane, domain);
        home != self.own
            && self
                .outboxes
                .get(&home)
                .is_some_and(|outbox| outbox.pending_handoffs.get() >= self.capacity)
    }

    /// Queues a message for a peer. Returns false when there is no channel
    /// to it (it does not share a lane with this executor), which callers
    /// treat as "deliver locally".
    pub fn send(&self, peer: u16, message: MeshMessage) -> bool {
        let Some(outbox) = self.outboxes.get(&peer) else {
            return false;
        };
        let handoff = matches!(message, MeshMessage::Handoff { .. });
        if handoff {
            outbox
                .pending_handoffs
                .set(outbox.pending_handoffs.get() + 1);
        }
        if outbox.queue.try_send(message).is_err() {
            // An unbounded local channel refuses only once its receiver is
            // gone, which happens only while the executor stops.
            if handoff {
                outbox
                    .pending_handoffs
                    .set(outbox.pending_handoffs.get().saturating_sub(1));
            }
            return false;
        }
        true
    }

    /// Sends an outcome to its owner once `after` (the commit of a DSN the
    /// outcome depends on) is durable, so that a durable bounce always has
    /// its DSN.
    pub fn send_outcome_after(
        self: &Rc<Self>,
        spool: &Rc<caduceus_spool::Shard>,
        owner: u16,
        message: MeshMessage,
        after: Option<CommitSeq>,
    ) {
        let Some(seq) = after else {
            self.send(owner, message);
            return;
        };
        let mesh = self.clone();
        let spool = spool.clone();
        glommio::spawn_local(async move {
            match spool.durable(seq).await {
                Ok(()) => {
                    mesh.send(owner, message);
                }
                Err(error) => {
                    // Without a durable DSN the owner must not record the
                    // bounce; the recipient stays pending there and is
                    // retried after a restart.
                    tracing::error!(core = mesh.own, owner, %error, "mesh: DSN commit failed; outcome withheld from the owner");
                }
            }
        })
        .detach();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(index: u16, lanes: &[Lane]) -> ExecutorSpec {
        ExecutorSpec {
            index,
            cpu: index as usize,
            lanes: lanes.to_vec(),
        }
    }

    #[test]
    fn home_is_stable_and_spreads_domains() {
        let allocation = [
            spec(0, &[Lane::Transactional]),
            spec(1, &[Lane::Bulk]),
            spec(2, &[Lane::Bulk]),
            spec(3, &[Lane::Bulk]),
        ];
        let lanes = LaneCores::from_allocation(&allocation);
        assert_eq!(lanes.home(Lane::Transactional, "example.com"), Some(0));
        // Fixed values: the mapping must not change between releases.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        let mut counts = [0usize; 4];
        for number in 0..3_000 {
            let domain = format!("domain{number}.example");
            let home = lanes.home(Lane::Bulk, &domain).expect("bulk has cores");
            assert_eq!(lanes.home(Lane::Bulk, &domain), Some(home));
            counts[home as usize] += 1;
        }
        assert_eq!(counts[0], 0, "the transactional core gets no bulk mail");
        for count in &counts[1..] {
            assert!(*count > 800, "uneven spread: {counts:?}");
        }
    }

    #[test]
    fn channels_join_only_executors_that_share_a_lane() {
        let allocation = [
            spec(0, &[Lane::Transactional]),
            spec(1, &[Lane::Bulk]),
            spec(2, &[Lane::Bulk]),
        ];
        let ends = build(&allocation, 4);
        assert!(ends[0].senders.is_empty());
        assert!(ends[0].receivers.is_empty());
        assert_eq!(ends[1].senders.len(), 1);
        assert_eq!(ends[1].senders[0].0, 2);
        assert_eq!(ends[2].receivers.len(), 1);
        assert_eq!(ends[2].receivers[0].0, 1);
    }
}
