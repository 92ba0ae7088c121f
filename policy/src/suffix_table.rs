//! A read-only table from domain suffixes to rule indexes.
//!
//! Each stored name is keyed by a 64-bit FNV-1a hash of its bytes taken from
//! the last byte to the first. Hashing in that order lets a lookup hash every
//! label-aligned suffix of the query in one right-to-left pass. When the pass
//! reaches the first byte of a label, the running hash is already the hash of
//! the suffix that starts there. A hit is confirmed by comparing the
//! stored bytes, so a hash collision costs one comparison and never a wrong
//! match.
//!
//! The table is flat (a slot array and one byte arena of names, both indexed
//! by `u32`) so that it can later be archived with rkyv and memory-mapped.
//!
//! A blocked Bloom filter of about 10 bits per name sits in front of the
//! slots. With 100,000 names the slots and names take about 8 MB, so a probe
//! usually misses the CPU caches. The filter takes 128 KiB and stays in
//! them. A suffix that no rule names, such as most of the suffixes of a
//! query and every suffix of a domain without a rule, is then rejected
//! without reading a slot. The filter is derived from the names, so it is
//! not archived: [`SuffixTable::build`] and [`SuffixTable::rebuild_filter`]
//! compute it.

/// Marks an empty `exact` or `wildcard` field of a slot.
pub(crate) const NO_RULE: u32 = u32::MAX;

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

#[derive(Clone, Copy, Debug, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct Slot {
    hash: u64,
    name_offset: u32,
    /// Zero marks an empty slot; stored names are never empty.
    name_length: u32,
    /// The rule for the name itself.
    exact: u32,
    /// The rule for every name below this one (`*.name`).
    wildcard: u32,
}

const EMPTY_SLOT: Slot = Slot {
    hash: 0,
    name_offset: 0,
    name_length: 0,
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
    names: Vec<u8>,
    /// The filter as 512-bit blocks of 8 words. The block count is a power
    /// of two. An empty filter, as before it is computed, lets every hash
    /// through.
    #[rkyv(with = rkyv::with::Skip)]
    filter: Vec<u64>,
}

/// Filter bits per stored name. With three bits set per name this gives
/// an estimated 2 % false positives.
const FILTER_BITS_PER_NAME: usize = 10;
const FILTER_BLOCK_WORDS: usize = 8;
const FILTER_BLOCK_BITS: u64 = 512;

/// Returns the filter block of `hash` and the three bits it sets there.
/// The block comes from the high half of the hash and the bits from the
/// low 27 bits, so the two are independent.
fn filter_position(hash: u64, block_count: usize) -> (usize, [u64; 3]) {
    let block = (hash >> 32) as usize & (block_count - 1);
    let bits = [
        hash % FILTER_BLOCK_BITS,
        (hash >> 9) % FILTER_BLOCK_BITS,
        (hash >> 18) % FILTER_BLOCK_BITS,
    ];
    (block, bits)
}

fn hash_step(hash: u64, byte: u8) -> u64 {
    (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME)
}

fn hash_reversed(name: &[u8]) -> u64 {
    name.iter()
        .rev()
        .fold(FNV_OFFSET_BASIS, |hash, byte| hash_step(hash, *byte))
}

/// A name and whether the pattern is `*.name`, in the order rules appear.
pub(crate) struct TableEntry<'a> {
    pub name: &'a str,
    pub wildcard: bool,
    pub rule_index: u32,
}

impl SuffixTable {
    /// Returns true when the table contains no pattern.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

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
            filter: Vec::new(),
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
        table.rebuild_filter();
        Ok(table)
    }

    /// Computes the filter from the stored names, as a table read from a
    /// compiled file needs after [`SuffixTable::check`].
    pub fn rebuild_filter(&mut self) {
        let name_count = self
            .slots
            .iter()
            .filter(|slot| slot.name_length != 0)
            .count();
        if name_count == 0 {
            self.filter = Vec::new();
            return;
        }
        let block_count = (name_count * FILTER_BITS_PER_NAME)
            .div_ceil(FILTER_BLOCK_BITS as usize)
            .next_power_of_two();
        let mut filter = vec![0u64; block_count * FILTER_BLOCK_WORDS];
        for slot in &self.slots {
            if slot.name_length == 0 {
                continue;
            }
            let (block, bits) = filter_position(slot.hash, block_count);
            for bit in bits {
                filter[block * FILTER_BLOCK_WORDS + (bit / 64) as usize] |= 1 << (bit % 64);
            }
        }
        self.filter = filter;
    }

    /// Returns false when no stored name has the hash `hash`.
    fn may_contain(&self, hash: u64) -> bool {
        if self.filter.is_empty() {
            return true;
        }
        let block_count = self.filter.len() / FILTER_BLOCK_WORDS;
        let (block, bits) = filter_position(hash, block_count);
        let words = &self.filter[block * FILTER_BLOCK_WORDS..(block + 1) * FILTER_BLOCK_WORDS];
        bits.iter()
            .all(|bit| words[(bit / 64) as usize] & (1 << (bit % 64)) != 0)
    }

    /// Returns the slot index for `name`, adding the name if it is new.
    fn insert_name(&mut self, name: &[u8]) -> usize {
        let hash = hash_reversed(name);
        if let Some(index) = self.find(hash, name) {
            return index;
        }
        let mask = self.slots.len() - 1;
        // The capacity is at least twice the entry count, so an empty slot
        // exists and this loop ends.
        let mut index = hash as usize & mask;
        while self.slots[index].name_length != 0 {
            index = (index + 1) & mask;
        }
        let name_offset = u32::try_from(self.names.len())
            .expect("the names arena stays under 4 GiB because compile caps the rule count");
        self.names.extend_from_slice(name);
        self.slots[index] = Slot {
            hash,
            name_offset,
            // Domain names are at most 253 octets, checked at validation.
            name_length: name.len() as u32,
            exact: NO_RULE,
            wildcard: NO_RULE,
        };
        index
    }

    fn find(&self, hash: u64, name: &[u8]) -> Option<usize> {
        if self.slots.is_empty() || !self.may_contain(hash) {
            return None;
        }
        let mask = self.slots.len() - 1;
        let mut index = hash as usize & mask;
        loop {
            let slot = &self.slots[index];
            if slot.name_length == 0 {
                return None;
            }
            if slot.hash == hash && self.slot_name(slot) == name {
                return Some(index);
            }
            index = (index + 1) & mask;
        }
    }

    fn slot_name(&self, slot: &Slot) -> &[u8] {
        let start = slot.name_offset as usize;
        &self.names[start..start + slot.name_length as usize]
    }

    /// Checks the invariants that lookups rely on, for a table read from a
    /// file: every name is inside the arena, hashes to its slot's hash and
    /// is found by a probe, every rule index is below `rule_count`, and an
    /// empty slot exists so that probing ends.
    pub fn check(&self, rule_count: usize) -> Result<(), String> {
        if self.slots.is_empty() {
            return Ok(());
        }
        if !self.slots.len().is_power_of_two() {
            return Err(format!("{} slots is not a power of two", self.slots.len()));
        }
        if self.slots.iter().all(|slot| slot.name_length != 0) {
            return Err("the table has no empty slot".to_string());
        }
        for (index, slot) in self.slots.iter().enumerate() {
            if slot.name_length == 0 {
                continue;
            }
            let start = slot.name_offset as usize;
            let name = start
                .checked_add(slot.name_length as usize)
                .and_then(|end| self.names.get(start..end))
                .ok_or_else(|| format!("slot {index} names bytes outside the arena"))?;
            if hash_reversed(name) != slot.hash || self.find(slot.hash, name) != Some(index) {
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
    /// `name` is expected to be a valid lowercase A-label name. A name with
    /// an empty first label never matches; other malformed names may match
    /// by their well-formed suffix.
    pub fn lookup(&self, name: &[u8]) -> Option<u32> {
        // TODO: a hit waits on three reads in a row (slot, stored name, the
        // caller's rule), each a likely cache miss with 100,000 rules. A p99
        // under 100 ns needs the name and rule data inside the slot.
        if self.slots.is_empty() || name.is_empty() || name[0] == b'.' {
            return None;
        }
        let mut hash = FNV_OFFSET_BASIS;
        let mut best = None;
        // Walk from the last byte to the second. Whenever the byte before
        // position `i` is a dot, `name[i..]` is a proper label-aligned suffix
        // and `hash` is its hash. Later hits are longer suffixes, so each
        // overrides the one before.
        for i in (1..name.len()).rev() {
            hash = hash_step(hash, name[i]);
            if name[i - 1] == b'.'
                && let Some(index) = self.find(hash, &name[i..])
            {
                let wildcard = self.slots[index].wildcard;
                if wildcard != NO_RULE {
                    best = Some(wildcard);
                }
            }
        }
        hash = hash_step(hash, name[0]);
        if let Some(index) = self.find(hash, name) {
            let exact = self.slots[index].exact;
            if exact != NO_RULE {
                return Some(exact);
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Computes the longest match with string operations, to compare the
    /// table against. Expects names without empty labels.
    fn reference_lookup(patterns: &[&str], name: &str) -> Option<u32> {
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
        assert_eq!(table.lookup(b""), None);
        assert_eq!(table.lookup(b"."), None);
        assert_eq!(table.lookup(b".example"), None);
    }

    #[test]
    fn lookup_deep_names() {
        let table = table(&[
            "*.example",
            "*.e.f.g.example",
            "a.b.c.d.e.f.g.example",
            "d.c.b.a",
        ]);
        assert_eq!(table.lookup(b"d.c.b.a"), Some(3));
        assert_eq!(table.lookup(b"x.d.c.b.a"), None);
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
        let stored_hash = hash_reversed(b"example.com");
        assert!(table.find(stored_hash, b"example.com").is_some());
        assert!(table.find(stored_hash, b"exbmple.com").is_none());
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
            .position(|slot| slot.name_length != 0)
            .unwrap();
        outside.slots[filled].name_offset = 1000;
        assert!(outside.check(2).unwrap_err().contains("outside the arena"));

        let mut moved = good.clone();
        moved.slots[filled].hash ^= 1;
        assert!(moved.check(2).unwrap_err().contains("not where its hash"));

        let mut full = good.clone();
        let template = full.slots[filled];
        full.slots.fill(template);
        assert!(full.check(2).unwrap_err().contains("no empty slot"));

        let mut odd = good;
        odd.slots.push(EMPTY_SLOT);
        assert!(odd.check(2).unwrap_err().contains("power of two"));
    }

    #[test]
    fn filter_rejects_most_absent_names() {
        let names: Vec<String> = (0..1000).map(|n| format!("host{n}.example")).collect();
        let table = SuffixTable::build(names.iter().enumerate().map(|(index, name)| TableEntry {
            name,
            wildcard: false,
            rule_index: index as u32,
        }))
        .unwrap();
        for name in &names {
            assert!(table.may_contain(hash_reversed(name.as_bytes())), "{name}");
        }
        let passed = (0..10_000)
            .filter(|n| table.may_contain(hash_reversed(format!("other{n}.example").as_bytes())))
            .count();
        // About 2 % is expected, and 5 % leaves room for this sample's
        // spread.
        assert!(
            passed < 500,
            "{passed} of 10000 absent names passed the filter"
        );
    }

    #[test]
    fn lookup_without_filter_agrees() {
        // A table read from a compiled file has no filter until it is
        // rebuilt, and must return the same results meanwhile.
        let patterns = ["*.example", "*.a.example", "b.a.example", "example"];
        let with_filter = table(&patterns);
        let mut without = with_filter.clone();
        without.filter = Vec::new();
        for name in [
            "example",
            "z.example",
            "x.a.example",
            "b.a.example",
            "c.b.a.example",
            "other",
        ] {
            assert_eq!(
                without.lookup(name.as_bytes()),
                with_filter.lookup(name.as_bytes()),
                "{name}"
            );
        }
        without.rebuild_filter();
        assert_eq!(without.filter, with_filter.filter);
    }

    #[test]
    fn empty_table_matches_nothing() {
        let table = table(&[]);
        assert_eq!(table.lookup(b"example.com"), None);
    }

    #[test]
    fn build_reports_duplicates() {
        let entries = ["example", "*.example", "example"].map(|name| (name, false));
        let result = SuffixTable::build(entries.iter().enumerate().map(|(index, (name, _))| {
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
            wildcard: false,
            rule_index: index as u32,
        }))
        .unwrap();
        for (index, name) in names.iter().enumerate() {
            assert_eq!(table.lookup(name.as_bytes()), Some(index as u32));
        }
        assert_eq!(table.lookup(b"host1000.example"), None);
    }
}
