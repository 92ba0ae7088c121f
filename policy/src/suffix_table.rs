//! A read-only table from domain suffixes to rule indexes.
//!
//! Each stored name is keyed by a 64-bit hash built label by label from the
//! rightmost label leftwards: the hash of `b.example` continues from the
//! hash of `example`. A lookup therefore hashes every label-aligned suffix
//! of the query in one right-to-left pass, reading each label's bytes eight
//! at a time, and never hashes a byte twice.
//!
//! The slots form one flat open-addressing array of 16-byte entries, four to
//! a cache line: a 32-bit fingerprint of the hash, the name's position in a
//! byte arena, and the two rule indexes. A probe that finds an empty slot or
//! a different fingerprint reads nothing else. A matching fingerprint is
//! confirmed by comparing the stored name, so a fingerprint clash or hash
//! collision costs one comparison and never a wrong match. The rule index
//! sits in the slot itself, so the caller's read of the rule it selects does
//! not wait for the name comparison's read of the arena.
//!
//! Both arrays are indexed by `u32` so that the table archives with rkyv.
//!
//! # Arena layout
//!
//! Each name is stored once as one length byte followed by the name's
//! bytes. A slot's `name_offset` is the position of that length byte.

use crate::domain::MAX_DOMAIN_LENGTH;

/// Marks an empty `exact` or `wildcard` field of a slot.
pub(crate) const NO_RULE: u32 = u32::MAX;

/// Bytes before a name in the arena: its length.
const NAME_HEADER_BYTES: usize = 1;

const HASH_SEED: u64 = 0x243f_6a88_85a3_08d3;
/// An odd constant with well-mixed bits (2^64 divided by the golden ratio).
const HASH_MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;

/// One entry of the open-addressing array. A slot is empty when both rule
/// fields are [`NO_RULE`], because every stored name has at least one rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct Slot {
    /// The high 32 bits of the name's hash. The low bits choose the home
    /// slot, so the two parts are independent.
    fingerprint: u32,
    /// Position of the name's length byte in the arena.
    name_offset: u32,
    /// The rule for the name itself.
    exact: u32,
    /// The rule for every name below this one (`*.name`).
    wildcard: u32,
}

impl Slot {
    fn is_empty(&self) -> bool {
        self.exact & self.wildcard == NO_RULE
    }
}

const EMPTY_SLOT: Slot = Slot {
    fingerprint: 0,
    name_offset: 0,
    exact: NO_RULE,
    wildcard: NO_RULE,
};

/// Patterns compiled into a lookup table; see the module documentation.
#[derive(Clone, Debug, Default, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub(crate) struct SuffixTable {
    /// Open addressing with linear probing. The length is zero or a power of
    /// two at least twice the number of names, so probes stay short and
    /// always reach an empty slot.
    slots: Vec<Slot>,
    /// Names as the module documentation lays them out.
    names: Vec<u8>,
}

/// Multiplies to 128 bits and folds the halves together, which spreads
/// every input bit over the low and the high half of the result.
fn fold_multiply(value: u64) -> u64 {
    let product = u128::from(value) * u128::from(HASH_MULTIPLIER);
    (product as u64) ^ ((product >> 64) as u64)
}

/// Extends the hash of a suffix by the label to its left.
fn hash_label(hash: u64, label: &[u8]) -> u64 {
    // The length goes in first so that labels whose padded words are equal,
    // such as "a" and "a\0", still hash apart.
    let mut hash = fold_multiply(hash ^ label.len() as u64);
    let mut words = label.chunks_exact(8);
    for word in &mut words {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(word);
        hash = fold_multiply(hash ^ u64::from_le_bytes(bytes));
    }
    let tail = words.remainder();
    if !tail.is_empty() {
        let mut bytes = [0u8; 8];
        bytes[..tail.len()].copy_from_slice(tail);
        hash = fold_multiply(hash ^ u64::from_le_bytes(bytes));
    }
    hash
}

/// Hashes a whole name the way [`SuffixTable::lookup`] hashes its suffixes.
fn hash_name(name: &[u8]) -> u64 {
    name.rsplit(|byte| *byte == b'.')
        .fold(HASH_SEED, hash_label)
}

fn fingerprint_of(hash: u64) -> u32 {
    (hash >> 32) as u32
}

/// A name and whether the pattern is `*.name`, in the order rules appear.
pub(crate) struct TableEntry<'a> {
    pub name: &'a str,
    pub wildcard: bool,
    pub rule_index: u32,
}

/// Which rule of a slot a probe looks for.
#[derive(Clone, Copy)]
enum Want {
    Exact,
    Wildcard,
    /// Either, when building the table.
    Any,
}

impl SuffixTable {
    /// Builds the table. Returns the two rule indexes of the first duplicate
    /// pattern found, which validation has normally rejected already.
    pub fn build<'a>(
        entries: impl IntoIterator<Item = TableEntry<'a>>,
    ) -> Result<SuffixTable, (u32, u32)> {
        let entries: Vec<TableEntry<'a>> = entries.into_iter().collect();
        let capacity = if entries.is_empty() {
            0
        } else {
            (entries.len() * 2).next_power_of_two()
        };
        let mut table = SuffixTable {
            slots: vec![EMPTY_SLOT; capacity],
            names: Vec::new(),
        };
        for entry in entries {
            let index = table.insert_name(entry.name.as_bytes());
            let slot = &mut table.slots[index];
            let field = if entry.wildcard {
                &mut slot.wildcard
            } else {
                &mut slot.exact
            };
            if *field != NO_RULE {
                return Err((*field, entry.rule_index));
            }
            *field = entry.rule_index;
        }
        Ok(table)
    }

    /// Returns the slot index for `name`, adding the name if it is new. A
    /// new slot has no rule yet, so the caller must set one before the next
    /// insertion, or the slot would read as empty.
    fn insert_name(&mut self, name: &[u8]) -> usize {
        let hash = hash_name(name);
        if let Some(index) = self.find(hash, name, Want::Any) {
            return index;
        }
        let mask = self.slots.len() - 1;
        // The capacity is at least twice the entry count, so an empty slot
        // exists and this loop ends.
        let mut index = hash as usize & mask;
        while !self.slots[index].is_empty() {
            index = (index + 1) & mask;
        }
        let name_offset = u32::try_from(self.names.len())
            .expect("the names arena stays under 4 GiB because compile caps the rule count");
        // Validation limits domain names to 253 octets, so the length fits
        // the length byte.
        self.names.push(name.len() as u8);
        self.names.extend_from_slice(name);
        self.slots[index] = Slot {
            fingerprint: fingerprint_of(hash),
            name_offset,
            exact: NO_RULE,
            wildcard: NO_RULE,
        };
        index
    }

    /// Probes for `name`, whose hash is `hash`, and returns its slot index
    /// if it is stored and has the rule `want` asks for.
    fn find(&self, hash: u64, name: &[u8], want: Want) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        let home = hash as usize & (self.slots.len() - 1);
        self.find_from(hash, name, want, home, self.slots[home])
    }

    /// Probes like [`SuffixTable::find`], given the home slot's index and
    /// its value, already read.
    fn find_from(
        &self,
        hash: u64,
        name: &[u8],
        want: Want,
        home: usize,
        home_slot: Slot,
    ) -> Option<usize> {
        let mask = self.slots.len() - 1;
        let fingerprint = fingerprint_of(hash);
        let mut index = home;
        let mut slot = home_slot;
        loop {
            if slot.is_empty() {
                return None;
            }
            let wanted = match want {
                Want::Exact => slot.exact != NO_RULE,
                Want::Wildcard => slot.wildcard != NO_RULE,
                Want::Any => true,
            };
            if wanted && slot.fingerprint == fingerprint && self.slot_name(&slot) == Some(name) {
                return Some(index);
            }
            index = (index + 1) & mask;
            slot = self.slots[index];
        }
    }

    /// Returns a slot's name, or `None` when its offset or length points
    /// outside the arena, which only a damaged file can cause.
    fn slot_name(&self, slot: &Slot) -> Option<&[u8]> {
        let offset = slot.name_offset as usize;
        let length = usize::from(*self.names.get(offset)?);
        let start = offset + NAME_HEADER_BYTES;
        self.names.get(start..start + length)
    }

    /// Checks the invariants that lookups rely on, for a table read from a
    /// file: every name is inside the arena, no longer than a domain name,
    /// matches its slot's fingerprint and is found by a probe, every rule
    /// index is below `rule_count`, and an empty slot exists so that probing
    /// ends.
    pub fn check(&self, rule_count: usize) -> Result<(), String> {
        if self.slots.is_empty() {
            return Ok(());
        }
        if !self.slots.len().is_power_of_two() {
            return Err(format!("{} slots is not a power of two", self.slots.len()));
        }
        if !self.slots.iter().any(Slot::is_empty) {
            return Err("the table has no empty slot".to_string());
        }
        for (index, slot) in self.slots.iter().enumerate() {
            if slot.is_empty() {
                continue;
            }
            let name = self
                .slot_name(slot)
                .ok_or_else(|| format!("slot {index} names bytes outside the arena"))?;
            if name.is_empty() || name.len() > MAX_DOMAIN_LENGTH {
                return Err(format!("slot {index} names {} bytes", name.len()));
            }
            let hash = hash_name(name);
            if fingerprint_of(hash) != slot.fingerprint
                || self.find(hash, name, Want::Any) != Some(index)
            {
                return Err(format!("slot {index} is not where its hash puts it"));
            }
            for rule in [slot.exact, slot.wildcard] {
                if rule != NO_RULE && rule as usize >= rule_count {
                    return Err(format!(
                        "slot {index} points at rule {rule}, but there are {rule_count} rules"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Returns the rule of the longest pattern that matches `name`: an exact
    /// pattern for `name` itself, else the wildcard of its nearest ancestor.
    /// Allocates nothing and takes no locks.
    ///
    /// `name` is expected to be a valid lowercase A-label name without a
    /// trailing dot. A name with an empty label, or longer than 253 octets
    /// (RFC 1035 §2.3.4), matches nothing.
    pub fn lookup(&self, name: &[u8]) -> Option<u32> {
        if self.slots.is_empty() || name.len() > MAX_DOMAIN_LENGTH {
            return None;
        }
        let mask = self.slots.len() - 1;
        let mut labels = name.rsplit(|byte| *byte == b'.');
        let mut hash = HASH_SEED;
        // Where the next label from the right ends, plus one for its dot.
        let mut end = name.len() + 1;
        let mut best = None;
        // Suffixes are taken from the right in groups. A group's home slots
        // are all read before any of them is examined, so their cache misses
        // overlap. Examining each slot as soon as it is read made the CPU
        // wait for one miss after another: a profile put most of the lookup's
        // time on each slot read in turn.
        loop {
            let mut group = [SuffixProbe::default(); PROBE_GROUP];
            let mut count = 0;
            while count < PROBE_GROUP {
                let Some(label) = labels.next() else { break };
                if label.is_empty() {
                    return None;
                }
                hash = hash_label(hash, label);
                let start = end - 1 - label.len();
                group[count] = SuffixProbe {
                    hash,
                    start,
                    home: hash as usize & mask,
                    home_slot: EMPTY_SLOT,
                };
                count += 1;
                end = start;
            }
            // Issue the group's reads back to back, after all its hashing, so
            // that they are in flight together.
            for probe in &mut group[..count] {
                probe.home_slot = self.slots[probe.home];
            }
            // Each suffix is longer than the one before, so a later wildcard
            // hit overrides an earlier one.
            for probe in &group[..count] {
                let suffix = &name[probe.start..];
                if probe.start == 0 {
                    let exact = self
                        .find_from(probe.hash, suffix, Want::Exact, probe.home, probe.home_slot)
                        .map(|index| self.slots[index].exact);
                    return exact.or(best);
                }
                let wildcard = self
                    .find_from(
                        probe.hash,
                        suffix,
                        Want::Wildcard,
                        probe.home,
                        probe.home_slot,
                    )
                    .map(|index| self.slots[index].wildcard);
                if wildcard.is_some() {
                    best = wildcard;
                }
            }
            if count < PROBE_GROUP {
                // `rsplit` always ends with the label that starts at 0, which
                // returned above.
                return best;
            }
        }
    }
}

/// Suffixes whose home slots a lookup reads together. Four covers names
/// such as `mx1.eu.tenant.example` in one group.
const PROBE_GROUP: usize = 4;

/// One suffix of a lookup's name, with its home slot already read.
#[derive(Clone, Copy)]
struct SuffixProbe {
    hash: u64,
    /// Index of the suffix's first byte in the name.
    start: usize,
    home: usize,
    home_slot: Slot,
}

impl Default for SuffixProbe {
    fn default() -> SuffixProbe {
        SuffixProbe {
            hash: 0,
            start: 0,
            home: 0,
            home_slot: EMPTY_SLOT,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn table(patterns: &[&str]) -> SuffixTable {
        SuffixTable::build(patterns.iter().enumerate().map(|(index, pattern)| {
            let (wildcard, name) = match pattern.strip_prefix("*.") {
                Some(name) => (true, name),
                None => (false, *pattern),
            };
            TableEntry {
                name,
                wildcard,
                rule_index: index as u32,
            }
        }))
        .unwrap()
    }

    /// The longest-match rule written with string operations, to compare
    /// the table against.
    fn reference_lookup(patterns: &[&str], name: &str) -> Option<u32> {
        if name.split('.').any(str::is_empty) || name.len() > MAX_DOMAIN_LENGTH {
            return None;
        }
        if let Some(index) = patterns.iter().position(|pattern| *pattern == name) {
            return Some(index as u32);
        }
        let mut best: Option<(usize, u32)> = None;
        for (index, pattern) in patterns.iter().enumerate() {
            let Some(parent) = pattern.strip_prefix("*.") else {
                continue;
            };
            let below = name
                .strip_suffix(parent)
                .is_some_and(|rest| rest.ends_with('.'));
            if below && best.is_none_or(|(length, _)| parent.len() > length) {
                best = Some((parent.len(), index as u32));
            }
        }
        best.map(|(_, index)| index)
    }

    /// SplitMix64, so failures reproduce.
    fn next_random(state: &mut u64) -> u64 {
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    #[test]
    fn lookup_prefers_longest_pattern() {
        let table = table(&["*.example", "*.a.example", "b.a.example", "example"]);
        assert_eq!(table.lookup(b"example"), Some(3));
        assert_eq!(table.lookup(b"z.example"), Some(0));
        assert_eq!(table.lookup(b"a.example"), Some(0));
        assert_eq!(table.lookup(b"x.a.example"), Some(1));
        assert_eq!(table.lookup(b"y.x.a.example"), Some(1));
        assert_eq!(table.lookup(b"b.a.example"), Some(2));
        assert_eq!(table.lookup(b"c.b.a.example"), Some(1));
        assert_eq!(table.lookup(b"other"), None);
        assert_eq!(table.lookup(b"xexample"), None);
    }

    #[test]
    fn lookup_rejects_malformed_names() {
        let table = table(&["*.example", "example"]);
        for name in [
            &b""[..],
            b".",
            b".example",
            b"a..example",
            b"a.example.",
            b"example.",
        ] {
            assert_eq!(
                table.lookup(name),
                None,
                "{:?}",
                String::from_utf8_lossy(name)
            );
        }
        let longest = format!("{}example", "a.".repeat(123));
        assert_eq!(longest.len(), MAX_DOMAIN_LENGTH);
        assert_eq!(table.lookup(longest.as_bytes()), Some(0));
        let too_long = format!("a{longest}");
        assert_eq!(table.lookup(too_long.as_bytes()), None);
    }

    #[test]
    fn lookup_labels_across_word_boundaries() {
        // Labels of 7, 8, 9 and 16 bytes end inside, at and past the 8-byte
        // words that the hash reads.
        let patterns = [
            "abcdefg.example",
            "*.abcdefgh.example",
            "abcdefghi.example",
            "*.abcdefghabcdefgh.example",
        ];
        let table = table(&patterns);
        assert_eq!(table.lookup(b"abcdefg.example"), Some(0));
        assert_eq!(table.lookup(b"mx.abcdefgh.example"), Some(1));
        assert_eq!(table.lookup(b"abcdefgh.example"), None);
        assert_eq!(table.lookup(b"abcdefghi.example"), Some(2));
        assert_eq!(table.lookup(b"abcdefgh.abcdefgh.example"), Some(1));
        assert_eq!(table.lookup(b"mx.abcdefghabcdefgh.example"), Some(3));
        assert_eq!(table.lookup(b"abcdefghabcdefgh.example"), None);
    }

    #[test]
    fn lookup_across_probe_groups() {
        let table = table(&[
            "*.example",
            "*.e.f.g.example",
            "a.b.c.d.e.f.g.example",
            "d.c.b.a",
        ]);
        // Four labels fill exactly one group.
        assert_eq!(table.lookup(b"d.c.b.a"), Some(3));
        assert_eq!(table.lookup(b"x.d.c.b.a"), None);
        // The wildcard match for these comes from the first group and the
        // exact match or its absence from the second.
        assert_eq!(table.lookup(b"a.b.c.d.e.f.g.example"), Some(2));
        assert_eq!(table.lookup(b"z.b.c.d.e.f.g.example"), Some(1));
        assert_eq!(table.lookup(b"y.z.b.c.d.e.f.g.example"), Some(1));
        assert_eq!(table.lookup(b"a.b.c.d.e.f.x.example"), Some(0));
        assert_eq!(table.lookup(b"a.b.c.d.e.f.g.example.org"), None);
    }

    #[test]
    fn lookup_idn_a_labels() {
        // Rules hold A-labels (bücher.example and ü.example here), and
        // lookups take A-labels, as normalise_domain returns them.
        let table = table(&["xn--bcher-kva.example", "*.xn--tda.example"]);
        assert_eq!(table.lookup(b"xn--bcher-kva.example"), Some(0));
        assert_eq!(table.lookup(b"mail.xn--tda.example"), Some(1));
        assert_eq!(table.lookup(b"xn--tda.example"), None);
        assert_eq!(table.lookup("bücher.example".as_bytes()), None);
    }

    #[test]
    fn lookup_matches_reference() {
        // A small alphabet of labels makes names share suffixes often.
        let labels = ["a", "b", "mx", "example", "abcdefghij", "xn--tda"];
        let mut state = 5;
        let random_name = |state: &mut u64| {
            // Up to 9 labels, so that names span more than one group of
            // probes.
            let depth = 1 + next_random(state) % 9;
            (0..depth)
                .map(|_| labels[(next_random(state) % labels.len() as u64) as usize])
                .collect::<Vec<_>>()
                .join(".")
        };
        let mut patterns: Vec<String> = Vec::new();
        while patterns.len() < 200 {
            let name = random_name(&mut state);
            let pattern = if next_random(&mut state).is_multiple_of(2) {
                format!("*.{name}")
            } else {
                name
            };
            if !patterns.contains(&pattern) {
                patterns.push(pattern);
            }
        }
        let patterns: Vec<&str> = patterns.iter().map(String::as_str).collect();
        let table = table(&patterns);
        for _ in 0..20_000 {
            let name = random_name(&mut state);
            assert_eq!(
                table.lookup(name.as_bytes()),
                reference_lookup(&patterns, &name),
                "{name}"
            );
        }
    }

    #[test]
    fn hash_collision_is_not_a_match() {
        let table = table(&["example.com"]);
        let stored_hash = hash_name(b"example.com");
        assert!(table.find(stored_hash, b"example.com", Want::Any).is_some());
        assert!(table.find(stored_hash, b"exbmple.com", Want::Any).is_none());
    }

    #[test]
    fn fingerprint_clash_keeps_names_apart() {
        // Find two names whose fingerprints are equal and whose hashes pick
        // the same home slot in a four-slot table, so that a probe for the
        // second passes the first.
        let mut seen: HashMap<(u32, u64), String> = HashMap::new();
        let (first, second) = (0u32..)
            .find_map(|n| {
                let name = format!("n{n}.example");
                let hash = hash_name(name.as_bytes());
                let key = (fingerprint_of(hash), hash & 3);
                seen.insert(key, name.clone())
                    .map(|earlier| (earlier, name))
            })
            .unwrap();
        let table = table(&[&first, &second]);
        assert_eq!(table.slots.len(), 4);
        assert_eq!(table.lookup(first.as_bytes()), Some(0));
        assert_eq!(table.lookup(second.as_bytes()), Some(1));
        assert_eq!(table.lookup(b"n.example"), None);
        assert_eq!(table.check(2), Ok(()));
    }

    #[test]
    fn check_rejects_damaged_tables() {
        let good = table(&["example", "*.a.example"]);
        assert_eq!(good.check(2), Ok(()));
        assert!(good.check(1).unwrap_err().contains("points at rule 1"));

        let mut outside = good.clone();
        let filled = outside
            .slots
            .iter()
            .position(|slot| !slot.is_empty())
            .unwrap();
        outside.slots[filled].name_offset = 1000;
        assert!(outside.check(2).unwrap_err().contains("outside the arena"));

        let mut moved = good.clone();
        moved.slots[filled].fingerprint ^= 1;
        assert!(moved.check(2).unwrap_err().contains("not where its hash"));

        let mut empty_name = good.clone();
        empty_name.names.push(0);
        empty_name.slots[filled].name_offset = (empty_name.names.len() - 1) as u32;
        assert!(empty_name.check(2).unwrap_err().contains("names 0 bytes"));

        let mut full = good.clone();
        let template = full.slots[filled];
        full.slots.fill(template);
        assert!(full.check(2).unwrap_err().contains("no empty slot"));

        let mut odd = good;
        odd.slots.push(EMPTY_SLOT);
        assert!(odd.check(2).unwrap_err().contains("power of two"));
    }

    #[test]
    fn empty_table_matches_nothing() {
        let table = table(&[]);
        assert!(table.slots.is_empty());
        assert_eq!(table.check(0), Ok(()));
        assert_eq!(table.lookup(b"example.com"), None);
        assert_eq!(table.lookup(b""), None);
    }

    #[test]
    fn build_reports_duplicates() {
        let entries = ["example", "*.example", "example"];
        let result = SuffixTable::build(entries.iter().enumerate().map(|(index, name)| {
            let (wildcard, name) = match name.strip_prefix("*.") {
                Some(name) => (true, name),
                None => (false, *name),
            };
            TableEntry {
                name,
                wildcard,
                rule_index: index as u32,
            }
        }));
        assert_eq!(result.err(), Some((0, 2)));
    }

    #[test]
    fn many_names_all_found() {
        let names: Vec<String> = (0..1000).map(|n| format!("host{n}.example")).collect();
        let table = SuffixTable::build(names.iter().enumerate().map(|(index, name)| TableEntry {
            name,
            wildcard: index % 2 == 1,
            rule_index: index as u32,
        }))
        .unwrap();
        for (index, name) in names.iter().enumerate() {
            let (exact, below) = if index % 2 == 1 {
                (None, Some(index as u32))
            } else {
                (Some(index as u32), None)
            };
            assert_eq!(table.lookup(name.as_bytes()), exact, "{name}");
            let child = format!("mx.{name}");
            assert_eq!(table.lookup(child.as_bytes()), below, "{child}");
        }
        assert_eq!(table.lookup(b"host1000.example"), None);
        assert_eq!(table.check(1000), Ok(()));
    }
}
