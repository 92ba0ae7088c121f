//! The in-memory queue of one core: every message its spool shard holds
//! with pending recipients, grouped by destination.
//!
//! The queue is rebuilt from the spool at start, so nothing here needs to be
//! durable. It is owned by one executor thread and never shared.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::rc::Rc;
use std::time::Instant;

use caduceus_policy::Lane;
use caduceus_spool::{Envelope, RecipientState, RecordRef};

use super::throttle::{Backoff, TokenBucket};
use crate::outbound::Connection;

/// A message with at least one recipient that is not final.
/// One row of `queue.list`.
pub struct DestinationSummary {
    pub domain: String,
    pub pending: usize,
    /// Held by the operator with `queue.hold`.
    pub held: bool,
    /// The lanes of the pending recipients.
    pub lanes: Vec<Lane>,
}

pub struct QueuedMessage {
    pub envelope: Rc<Envelope>,
    pub states: Vec<RecipientState>,
    /// True while the recipient sits in a ready queue or a delivery is in
    /// flight, so that a deferral timer never schedules it twice.
    pub scheduled: Vec<bool>,
}

impl QueuedMessage {
    pub fn new(envelope: Rc<Envelope>, states: Vec<RecipientState>) -> Self {
        let count = states.len();
        QueuedMessage {
            envelope,
            states,
            scheduled: vec![false; count],
        }
    }

    pub fn is_final(&self) -> bool {
        self.states
            .iter()
            .all(|state| !matches!(state, RecipientState::Pending { .. }))
    }

    pub fn attempts(&self, index: usize) -> u32 {
        match self.states[index] {
            RecipientState::Pending { attempts, .. } => attempts,
            _ => 0,
        }
    }
}

/// Recipients of one message bound for one destination.
#[derive(Clone, Debug)]
pub struct WorkItem {
    /// The core whose spool shard contains the message. It differs from this
    /// core when the owner handed the recipients over because this core is
    /// the destination's home (see `mesh`).
    pub owner: u16,
    pub record: RecordRef,
    pub recipients: Vec<u32>,
}

/// A pooled connection and when it went idle.
pub struct IdleConnection {
    pub connection: Connection,
    pub idle_since: Instant,
}

/// Mail for one destination domain.
#[derive(Default)]
pub struct Destination {
    pub ready: VecDeque<WorkItem>,
    /// Deliveries running for this destination, one per connection.
    pub active_workers: u32,
    pub idle: Vec<IdleConnection>,
    pub held: bool,
    /// Paces messages when the destination's rule sets a rate; created on
    /// first use.
    pub bucket: Option<TokenBucket>,
    pub backoff: Backoff,
}

/// A deferral timer entry: at `due_us`, the pending recipients of `record`
/// bound for `domain` become ready again.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
pub struct Deferral {
    pub due_us: u64,
    pub record: RecordRef,
    pub domain: Rc<str>,
}

#[derive(Default)]
pub struct Queue {
    /// This core's index: the owner of every entry in `messages`.
    pub own: u16,
    /// Messages of this core's spool shard.
    pub messages: HashMap<RecordRef, QueuedMessage>,
    /// Messages of other cores' shards whose recipients were handed to this
    /// core for delivery, keyed by (owner, record). Only the handed
    /// recipients are `scheduled`; an entry leaves once none is.
    pub handed: HashMap<(u16, RecordRef), QueuedMessage>,
    pub destinations: HashMap<Rc<str>, Destination>,
    pub deferrals: BinaryHeap<Reverse<Deferral>>,
    /// Token buckets of `mx` rules, keyed by rule id: every domain whose MX
    /// hosts match one `mx` rule takes its tokens from the same bucket.
    pub site_buckets: HashMap<u32, TokenBucket>,
}

impl Queue {
    /// Adds a message and makes every pending recipient whose attempt is
    /// due ready; the others get a deferral timer. Returns the domains that
    /// received ready work.
    pub fn insert(
        &mut self,
        record: RecordRef,
        message: QueuedMessage,
        now_us: u64,
    ) -> Vec<Rc<str>> {
        let mut due: HashMap<Rc<str>, Vec<u32>> = HashMap::new();
        let mut later: HashMap<Rc<str>, u64> = HashMap::new();
        for (index, recipient) in message.envelope.recipients.iter().enumerate() {
            if let RecipientState::Pending {
                next_attempt_us, ..
            } = message.states[index]
            {
                let domain = self.intern(&recipient.domain);
                if next_attempt_us <= now_us {
                    due.entry(domain).or_default().push(index as u32);
                } else {
                    let entry = later.entry(domain).or_insert(next_attempt_us);
                    *entry = (*entry).min(next_attempt_us);
                }
            }
        }
        let mut message = message;
        for recipients in due.values() {
            for index in recipients {
                message.scheduled[*index as usize] = true;
            }
        }
        self.messages.insert(record, message);
        for (domain, due_us) in later {
            self.deferrals.push(Reverse(Deferral {
                due_us,
                record,
                domain,
            }));
        }
        let mut ready_domains = Vec::with_capacity(due.len());
        for (domain, recipients) in due {
            self.destinations
                .entry(domain.clone())
                .or_default()
                .ready
                .push_back(WorkItem {
                    owner: self.own,
                    record,
                    recipients,
                });
            ready_domains.push(domain);
        }
        ready_domains
    }

    /// Moves messages that spool compaction copied to new locations: each
    /// `(old, new)` pair re-keys the message and its deferral timers.
    ///
    /// Compaction only moves messages with no recipient `scheduled`, so no
    /// ready work item or delivery in flight refers to an old location.
    pub fn relocate(&mut self, moved: &[(RecordRef, RecordRef)]) {
        if moved.is_empty() {
            return;
        }
        for (old, new) in moved {
            if let Some(message) = self.messages.remove(old) {
                debug_assert!(
                    !message.scheduled.iter().any(|scheduled| *scheduled),
                    "compaction moved message {old} with a recipient scheduled"
                );
                self.messages.insert(*new, message);
            }
        }
        let locations: HashMap<RecordRef, RecordRef> = moved.iter().copied().collect();
        let deferrals = std::mem::take(&mut self.deferrals);
        self.deferrals = deferrals
            .into_iter()
            .map(|Reverse(mut deferral)| {
                if let Some(new) = locations.get(&deferral.record) {
                    deferral.record = *new;
                }
                Reverse(deferral)
            })
            .collect();
    }

    /// Returns the queue entry a work item refers to, local or handed over.
    pub fn entry(&self, item: &WorkItem) -> Option<&QueuedMessage> {
        if item.owner == self.own {
            self.messages.get(&item.record)
        } else {
            self.handed.get(&(item.owner, item.record))
        }
    }

    /// Returns the mutable queue entry a work item refers to, local or
    /// handed over.
    pub fn entry_mut(&mut self, item: &WorkItem) -> Option<&mut QueuedMessage> {
        if item.owner == self.own {
            self.messages.get_mut(&item.record)
        } else {
            self.handed.get_mut(&(item.owner, item.record))
        }
    }

    /// Drops a handed-over message once none of its recipients is ready or
    /// in flight here any more.
    pub fn forget_handed_if_done(&mut self, owner: u16, record: RecordRef) {
        let done = self
            .handed
            .get(&(owner, record))
            .is_some_and(|message| !message.scheduled.iter().any(|scheduled| *scheduled));
        if done {
            self.handed.remove(&(owner, record));
        }
    }

    /// Returns the shared name of a domain, creating its destination entry.
    pub fn intern(&mut self, domain: &str) -> Rc<str> {
        if let Some((key, _)) = self.destinations.get_key_value(domain) {
            return key.clone();
        }
        let key: Rc<str> = Rc::from(domain);
        self.destinations
            .insert(key.clone(), Destination::default());
        key
    }

    /// Moves every deferral that is due into its destination's ready queue.
    /// Returns the domains that received work.
    pub fn release_due(&mut self, now_us: u64) -> Vec<Rc<str>> {
        let mut domains = Vec::new();
        while let Some(Reverse(head)) = self.deferrals.peek() {
            if head.due_us > now_us {
                break;
            }
            let Some(Reverse(deferral)) = self.deferrals.pop() else {
                break;
            };
            if let Some(item) = self.collect_due(deferral.record, &deferral.domain, now_us) {
                self.destinations
                    .entry(deferral.domain.clone())
                    .or_default()
                    .ready
                    .push_back(item);
                if !domains.contains(&deferral.domain) {
                    domains.push(deferral.domain);
                }
            }
        }
        domains
    }

    /// Marks and returns the due, unscheduled, pending recipients of one
    /// message for one domain.
    fn collect_due(&mut self, record: RecordRef, domain: &str, now_us: u64) -> Option<WorkItem> {
        let message = self.messages.get_mut(&record)?;
        let mut recipients = Vec::new();
        for (index, recipient) in message.envelope.recipients.iter().enumerate() {
            if recipient.domain != domain || message.scheduled[index] {
                continue;
            }
            if let RecipientState::Pending {
                next_attempt_us, ..
            } = message.states[index]
                && next_attempt_us <= now_us
            {
                message.scheduled[index] = true;
                recipients.push(index as u32);
            }
        }
        (!recipients.is_empty()).then_some(WorkItem {
            owner: self.own,
            record,
            recipients,
        })
    }

    /// Makes every pending recipient of a domain due now (operator requeue).
    pub fn requeue_domain(&mut self, domain: &str, now_us: u64) -> usize {
        let Some(key) = self
            .destinations
            .get_key_value(domain)
            .map(|(key, _)| key.clone())
        else {
            return 0;
        };
        let mut count = 0;
        let mut records = Vec::new();
        for (record, message) in self.messages.iter_mut() {
            let mut touched = false;
            for (index, recipient) in message.envelope.recipients.iter().enumerate() {
                if recipient.domain != domain || message.scheduled[index] {
                    continue;
                }
                if let RecipientState::Pending {
                    next_attempt_us, ..
                } = &mut message.states[index]
                {
                    *next_attempt_us = now_us;
                    touched = true;
                    count += 1;
                }
            }
            if touched {
                records.push(*record);
            }
        }
        for record in records {
            self.deferrals.push(Reverse(Deferral {
                due_us: now_us,
                record,
                domain: key.clone(),
            }));
        }
        count
    }

    /// The earliest deferral, for the scheduler's sleep.
    pub fn next_due_us(&self) -> Option<u64> {
        self.deferrals
            .peek()
            .map(|Reverse(deferral)| deferral.due_us)
    }

    /// Pending recipients per destination, sorted by domain.
    pub fn summary(&self) -> Vec<DestinationSummary> {
        let mut counts: HashMap<&str, (usize, Vec<Lane>)> = HashMap::new();
        for message in self.messages.values() {
            for (index, recipient) in message.envelope.recipients.iter().enumerate() {
                if matches!(message.states[index], RecipientState::Pending { .. }) {
                    let (pending, lanes) = counts.entry(recipient.domain.as_str()).or_default();
                    *pending += 1;
                    if !lanes.contains(&message.envelope.lane) {
                        lanes.push(message.envelope.lane);
                    }
                }
            }
        }
        let mut rows: Vec<DestinationSummary> = counts
            .into_iter()
            .map(|(domain, (pending, lanes))| {
                let held = self
                    .destinations
                    .get(domain)
                    .is_some_and(|destination| destination.held);
                DestinationSummary {
                    domain: domain.to_string(),
                    pending,
                    held,
                    lanes,
                }
            })
            .collect();
        rows.sort_by(|left, right| left.domain.cmp(&right.domain));
        rows
    }
}
