//! The per-core answer cache, positive and negative, bounded in entries.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use hickory_proto::rr::{Name, RecordType};

use super::answer::Answer;

/// A cache key. The name is lowercased because DNS names compare without
/// regard to ASCII case (RFC 4343).
pub type CacheKey = (Name, RecordType);

/// Answers keyed by (name, type), each until its TTL runs out.
///
/// When full, an insert evicts the entry that expires first. Expired
/// entries go first that way, and after them the entry that would be
/// refreshed soonest anyway.
pub struct Cache {
    capacity_entries: usize,
    entries: HashMap<CacheKey, Entry>,
    /// The same entries ordered by expiry. The sequence number keeps keys
    /// that expire at the same instant apart.
    by_expiry: BTreeMap<(Instant, u64), CacheKey>,
    next_sequence: u64,
}

struct Entry {
    answer: Answer,
    expires_at: Instant,
    sequence: u64,
}

impl Cache {
    pub fn new(capacity_entries: usize) -> Self {
        Cache {
            capacity_entries,
            entries: HashMap::new(),
            by_expiry: BTreeMap::new(),
            next_sequence: 0,
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Returns the cached answer unless it has expired at `now`.
    pub fn get(&mut self, key: &CacheKey, now: Instant) -> Option<Answer> {
        let entry = self.entries.get(key)?;
        if entry.expires_at > now {
            return Some(entry.answer.clone());
        }
        self.remove(key);
        None
    }

    /// Stores `answer` for `ttl` from `now`, replacing any older entry.
    pub fn insert(&mut self, key: CacheKey, answer: Answer, ttl: Duration, now: Instant) {
        if self.capacity_entries == 0 || ttl.is_zero() {
            return;
        }
        let Some(expires_at) = now.checked_add(ttl) else {
            return;
        };
        self.remove(&key);
        while self.entries.len() >= self.capacity_entries {
            let Some((_, evicted)) = self.by_expiry.pop_first() else {
                break;
            };
            self.entries.remove(&evicted);
        }

        let sequence = self.next_sequence;
        self.next_sequence += 1;
        self.by_expiry.insert((expires_at, sequence), key.clone());
        self.entries.insert(
            key,
            Entry {
                answer,
                expires_at,
                sequence,
            },
        );
    }

    fn remove(&mut self, key: &CacheKey) {
        if let Some(entry) = self.entries.remove(key) {
            self.by_expiry.remove(&(entry.expires_at, entry.sequence));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> CacheKey {
        (Name::from_ascii(name).unwrap(), RecordType::A)
    }

    #[test]
    fn cache_entry_expires_after_ttl() {
        let mut cache = Cache::new(8);
        let start = Instant::now();
        cache.insert(
            key("a.example.net."),
            Answer::NoData,
            Duration::from_secs(10),
            start,
        );
        let before = start + Duration::from_secs(9);
        assert_eq!(
            cache.get(&key("a.example.net."), before),
            Some(Answer::NoData)
        );
        let after = start + Duration::from_secs(10);
        assert_eq!(cache.get(&key("a.example.net."), after), None);
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn cache_evicts_soonest_expiry_when_full() {
        let mut cache = Cache::new(2);
        let now = Instant::now();
        cache.insert(
            key("long.example.net."),
            Answer::NxDomain,
            Duration::from_secs(100),
            now,
        );
        cache.insert(
            key("short.example.net."),
            Answer::NxDomain,
            Duration::from_secs(5),
            now,
        );
        cache.insert(
            key("new.example.net."),
            Answer::NxDomain,
            Duration::from_secs(50),
            now,
        );
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.get(&key("short.example.net."), now), None);
        assert!(cache.get(&key("long.example.net."), now).is_some());
        assert!(cache.get(&key("new.example.net."), now).is_some());
    }

    #[test]
    fn cache_replaces_existing_entry() {
        let mut cache = Cache::new(2);
        let now = Instant::now();
        cache.insert(
            key("a.example.net."),
            Answer::NoData,
            Duration::from_secs(5),
            now,
        );
        cache.insert(
            key("a.example.net."),
            Answer::NxDomain,
            Duration::from_secs(50),
            now,
        );
        assert_eq!(cache.len(), 1);
        let later = now + Duration::from_secs(10);
        assert_eq!(
            cache.get(&key("a.example.net."), later),
            Some(Answer::NxDomain)
        );
    }

    #[test]
    fn cache_ignores_zero_ttl_and_zero_capacity() {
        let now = Instant::now();
        let mut cache = Cache::new(4);
        cache.insert(key("a.example.net."), Answer::NoData, Duration::ZERO, now);
        assert_eq!(cache.len(), 0);
        let mut disabled = Cache::new(0);
        disabled.insert(
            key("a.example.net."),
            Answer::NoData,
            Duration::from_secs(5),
            now,
        );
        assert_eq!(disabled.len(), 0);
    }
}
