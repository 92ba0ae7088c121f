//! A read-only table from domain suffix patterns to slots that carry rules.
//!
//! A pattern is a name and a kind: exact (`name`) or wildcard (`*.name`),
//! and the two kinds of one name are separate keys. Keys are hashed label
//! by label from the last label to the first: each label is hashed 8 bytes
//! at a time and folded into the running hash of the suffix to its right.
//! A lookup therefore gets the running hash of every label-aligned suffix
//! of the query in one right-to-left pass. The key hash of a suffix is its
//! running hash, mixed by [`finish`]. The key hash of its wildcard extends
//! the running hash by a `*` label first, as if hashing `*.suffix`.
//!
//! Slots are 64 bytes, aligned to a cache line, and contain the hash, the
//! rule index, the rule's per-message settings ([`SlotSettings`]) and the
//! name. Names of up to [`INLINE_NAME_BYTES`] bytes are stored in the
//! slot, so a hit reads one cache line of the table and nothing else. A
//! longer name is stored in an arena, and confirming it reads the arena
//! too. Every hit is confirmed by comparing the whole name, so a hash
//! collision costs one comparison and never a wrong match.
//!
//! [`SuffixTable::lookup`] returns the index of the matching slot, and
//! [`SuffixTable::hit`] the rule index and settings stored there.
//!
//! The table is flat (slots and one byte arena, indexed by `u32`) so that it
//! can be archived with rkyv.
//!
//! A blocked Bloom filter of about 10 bits per key sits in front of the
//! slots. With 100,000 keys the slots take 16 MiB, so a probe usually misses
//! the CPU caches. The filter takes 128 KiB and stays in them. A suffix that
//! no pattern names, such as most of the suffixes of a query and every
//! suffix of a domain without a rule, is then rejected without reading a
//! slot. The filter is derived from the slots, so it is not archived:
//! [`SuffixTable::build`] and [`SuffixTable::rebuild_filter`] compute it.

use zerocopy::FromBytes;

use crate::TlsMode;
use crate::huge_pages::huge_page_buffer;

/// Maximum length in bytes of a name stored inside a slot. Longer names
/// go to the arena.
pub(crate) const INLINE_NAME_BYTES: usize = 24;

/// The settings a slot carries for its rule: those that the delivery path
/// reads for every message, and that are the same in every lane. Keeping
/// them in the slot means a hit reads one cache line and no second array.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct SlotSettings {
    /// One bit per lane, `1 << lane`, set for each lane that the rule's
    /// `lanes` leaves out.
    pub barred_lanes: u8,
    pub tls: TlsMode,
    pub rate_per_sec: Option<f64>,
    pub burst: u32,
    pub max_connections: u32,
    pub max_messages_per_connection: u32,
    pub hold: bool,
}

impl SlotSettings {
    /// The settings of an empty slot and of a table that carries none,
    /// such as the sender domain table.
    pub const NONE: SlotSettings = SlotSettings {
        barred_lanes: 0,
        tls: TlsMode::None,
        rate_per_sec: None,
        burst: 0,
        max_connections: 0,
        max_messages_per_connection: 0,
        hold: false,
    };
}

/// Bits of [`Slot::flags`].
const FLAG_HOLD: u8 = 1;
const FLAG_RATE: u8 = 2;
/// The lowest bit of [`SlotSettings::barred_lanes`], whose bits follow.
const BARRED_LANES_SHIFT: u32 = 2;
const BARRED_LANES_MASK: u8 = 0b11 << BARRED_LANES_SHIFT;
const KNOWN_FLAGS: u8 = FLAG_HOLD | FLAG_RATE | BARRED_LANES_MASK;

/// One key of the table and its rule's per-message settings, filling one
/// cache line. Every byte pattern is a valid `Slot`, so slots can live in
/// memory that starts as zeros, and the all-zero slot is [`EMPTY_SLOT`].
/// [`SuffixTable::check`] rejects the patterns that do not decode.
#[derive(
    Clone,
    Copy,
    Debug,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
    zerocopy::FromBytes,
    zerocopy::IntoBytes,
    zerocopy::KnownLayout,
    zerocopy::Immutable,
)]
#[repr(C, align(64))]
struct Slot {
    /// The key's hash, as [`key_hash`] computes it.
    hash: u64,
    rule_index: u32,
    /// Offset of the name in the arena when it is longer than
    /// [`INLINE_NAME_BYTES`], otherwise 0.
    long_name_offset: u32,
    /// Messages per second; meaningful only with [`FLAG_RATE`] set.
    rate_per_sec: f64,
    burst: u32,
    max_connections: u32,
    max_messages_per_connection: u32,
    /// Zero marks an empty slot; stored names are never empty.
    name_length: u8,
    /// 1 when the key is `*.name` rather than `name`, else 0. A `u8` rather
    /// than a `bool` so that every byte pattern is a valid slot.
    wildcard: u8,
    /// A [`TlsMode`] as its `repr(u8)` value.
    tls: u8,
    /// [`FLAG_HOLD`], [`FLAG_RATE`] and the barred lanes.
    flags: u8,
    /// The name when it fits, followed by zeros; all zeros otherwise.
    inline_name: [u8; INLINE_NAME_BYTES],
}

const _: () = assert!(std::mem::size_of::<Slot>() == 64);

const EMPTY_SLOT: Slot = Slot {
    hash: 0,
    rule_index: 0,
    long_name_offset: 0,
    rate_per_sec: 0.0,
    burst: 0,
    max_connections: 0,
    max_messages_per_connection: 0,
    name_length: 0,
    wildcard: 0,
    tls: 0,
    flags: 0,
    inline_name: [0; INLINE_NAME_BYTES],
};

impl Slot {
    fn set_settings(&mut self, settings: &SlotSettings) {
        self.tls = settings.tls as u8;
        self.rate_per_sec = settings.rate_per_sec.unwrap_or(0.0);
        self.burst = settings.burst;
        self.max_connections = settings.max_connections;
        self.max_messages_per_connection = settings.max_messages_per_connection;
        let mut flags = (settings.barred_lanes << BARRED_LANES_SHIFT) & BARRED_LANES_MASK;
        if settings.hold {
            flags |= FLAG_HOLD;
        }
        if settings.rate_per_sec.is_some() {
            flags |= FLAG_RATE;
        }
        self.flags = flags;
    }

    /// Decodes the settings. Returns `None` when the TLS byte or the flags
    /// contain a value that no compiler writes, which only a damaged file has.
    fn settings(&self) -> Option<SlotSettings> {
        if self.flags & !KNOWN_FLAGS != 0 {
            return None;
        }
        Some(SlotSettings {
            barred_lanes: (self.flags & BARRED_LANES_MASK) >> BARRED_LANES_SHIFT,
            tls: TlsMode::from_u8(self.tls)?,
            rate_per_sec: (self.flags & FLAG_RATE != 0).then_some(self.rate_per_sec),
            burst: self.burst,
            max_connections: self.max_connections,
            max_messages_per_connection: self.max_messages_per_connection,
            hold: self.flags & FLAG_HOLD != 0,
        })
    }
}

/// Patterns compiled into a lookup table; see the module documentation.
#[derive(Clone, Debug, Default, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub(crate) struct SuffixTable {
    /// Open addressing with linear probing. The length is zero or a power of
    /// two at least twice the number of keys, so probes stay short and
    /// always reach an empty slot.
    #[rkyv(with = SlotsAsVec)]
    slots: SlotArray,
    /// Names longer than [`INLINE_NAME_BYTES`], back to back.
    long_names: Vec<u8>,
    /// The filter as 512-bit blocks. The block count is a power of two. An
    /// empty filter, as before it is computed, lets every hash through.
    #[rkyv(with = rkyv::with::Skip)]
    filter: Vec<FilterBlock>,
}

/// Slots at or above this many bytes go in huge pages. Smaller tables
/// need few TLB entries, and a mapping of their own would waste most of a
/// 2 MiB page.
const HUGE_PAGE_MIN_BYTES: usize = 2 << 20;

/// The slots of a table: in an anonymous mapping advised to use
/// transparent huge pages when the table is large, else in a `Vec`.
enum SlotArray {
    Heap(Vec<Slot>),
    HugePages(memmap2::MmapMut),
}

impl SlotArray {
    /// Returns `count` empty slots.
    fn empty(count: usize) -> SlotArray {
        let length_bytes = count * std::mem::size_of::<Slot>();
        if length_bytes >= HUGE_PAGE_MIN_BYTES
            && let Some(mapping) = huge_page_buffer(length_bytes)
        {
            return SlotArray::HugePages(mapping);
        }
        SlotArray::Heap(vec![EMPTY_SLOT; count])
    }

    fn from_slice(slots: &[Slot]) -> SlotArray {
        let mut array = SlotArray::empty(slots.len());
        array.copy_from_slice(slots);
        array
    }
}

impl std::ops::Deref for SlotArray {
    type Target = [Slot];

    fn deref(&self) -> &[Slot] {
        match self {
            SlotArray::Heap(slots) => slots,
            // A mapping is page-aligned and `empty` sized it in whole
            // slots, so the view cannot fail.
            SlotArray::HugePages(mapping) => <[Slot]>::ref_from_bytes(mapping)
                .expect("a mapping of whole slots is a valid slot slice"),
        }
    }
}

impl std::ops::DerefMut for SlotArray {
    fn deref_mut(&mut self) -> &mut [Slot] {
        match self {
            SlotArray::Heap(slots) => slots,
            SlotArray::HugePages(mapping) => <[Slot]>::mut_from_bytes(mapping)
                .expect("a mapping of whole slots is a valid slot slice"),
        }
    }
}

impl Clone for SlotArray {
    fn clone(&self) -> SlotArray {
        SlotArray::from_slice(self)
    }
}

impl Default for SlotArray {
    fn default() -> SlotArray {
        SlotArray::Heap(Vec::new())
    }
}

impl std::fmt::Debug for SlotArray {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotArray")
            .field("slots", &self.len())
            .field("huge_pages", &matches!(self, SlotArray::HugePages(_)))
            .finish()
    }
}

/// Archives a [`SlotArray`] exactly as a `Vec<Slot>`, so the compiled file
/// format does not depend on where the slots live in memory.
struct SlotsAsVec;

impl rkyv::with::ArchiveWith<SlotArray> for SlotsAsVec {
    type Archived = rkyv::vec::ArchivedVec<ArchivedSlot>;
    type Resolver = rkyv::vec::VecResolver;

    fn resolve_with(field: &SlotArray, resolver: Self::Resolver, out: rkyv::Place<Self::Archived>) {
        rkyv::vec::ArchivedVec::resolve_from_len(field.len(), resolver, out);
    }
}

impl<S> rkyv::with::SerializeWith<SlotArray, S> for SlotsAsVec
where
    S: rkyv::rancor::Fallible + rkyv::ser::Allocator + rkyv::ser::Writer + ?Sized,
{
    fn serialize_with(field: &SlotArray, serializer: &mut S) -> Result<Self::Resolver, S::Error> {
        rkyv::vec::ArchivedVec::serialize_from_slice(field, serializer)
    }
}

impl<D> rkyv::with::DeserializeWith<rkyv::vec::ArchivedVec<ArchivedSlot>, SlotArray, D>
    for SlotsAsVec
where
    D: rkyv::rancor::Fallible + ?Sized,
{
    fn deserialize_with(
        field: &rkyv::vec::ArchivedVec<ArchivedSlot>,
        deserializer: &mut D,
    ) -> Result<SlotArray, D::Error> {
        let mut array = SlotArray::empty(field.len());
        for (slot, archived) in array.iter_mut().zip(field.iter()) {
            *slot = rkyv::Deserialize::deserialize(archived, deserializer)?;
        }
        Ok(array)
    }
}

/// Filter bits per stored key. With three bits set per key this gives
/// an estimated 2 % false positives.
const FILTER_BITS_PER_KEY: usize = 10;
const FILTER_BLOCK_WORDS: usize = 8;
const FILTER_BLOCK_BITS: u64 = 512;

/// One cache line of the filter.
type FilterBlock = [u64; FILTER_BLOCK_WORDS];

/// Returns the filter block of `hash` and the three bits it sets there.
/// The block comes from the high half of the hash and the bits from the
/// low 27 bits, so the two are independent. `block_mask` is the block
/// count less one.
#[inline]
fn filter_position(hash: u64, block_mask: usize) -> (usize, [u64; 3]) {
    let block = (hash >> 32) as usize & block_mask;
    let bits = [
        hash % FILTER_BLOCK_BITS,
        (hash >> 9) % FILTER_BLOCK_BITS,
        (hash >> 18) % FILTER_BLOCK_BITS,
    ];
    (block, bits)
}

/// Seeds and multipliers of the label-wise hash. The multipliers are odd
/// 64-bit constants with mixed bits. The finaliser's two are those of
/// MurmurHash3's `fmix64`.
const SUFFIX_SEED: u64 = 0x243f_6a88_85a3_08d3;
const LABEL_MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;
const SUFFIX_MULTIPLIER: u64 = 0xd6e8_feb8_6659_fd93;
const FINAL_MULTIPLIERS: [u64; 2] = [0xff51_afd7_ed55_8ccd, 0xc4ce_b9fe_1a85_ec53];

/// Returns `bytes[start..end]`, at most 8 bytes, as a little-endian integer
/// with the missing high bytes zero. When 8 bytes end at `end`, one load
/// reads them and a shift drops those before `start`.
fn load_partial(bytes: &[u8], start: usize, end: usize) -> u64 {
    let length = end - start;
    if length == 0 {
        return 0;
    }
    if end >= 8 {
        let mut window = [0u8; 8];
        window.copy_from_slice(&bytes[end - 8..end]);
        return u64::from_le_bytes(window) >> (8 * (8 - length));
    }
    bytes[start..end]
        .iter()
        .rev()
        .fold(0, |value, byte| value << 8 | u64::from(*byte))
}

/// Hashes the label `bytes[start..end]`, 8 bytes per step.
#[inline]
fn label_hash(bytes: &[u8], start: usize, end: usize) -> u64 {
    let mut hash = ((end - start) as u64).wrapping_mul(LABEL_MULTIPLIER);
    let mut chunk_start = start;
    while end - chunk_start > 8 {
        let mut chunk = [0u8; 8];
        chunk.copy_from_slice(&bytes[chunk_start..chunk_start + 8]);
        hash = (hash ^ u64::from_le_bytes(chunk))
            .wrapping_mul(LABEL_MULTIPLIER)
            .rotate_left(29);
        chunk_start += 8;
    }
    (hash ^ load_partial(bytes, chunk_start, end))
        .wrapping_mul(LABEL_MULTIPLIER)
        .rotate_left(29)
}

/// Extends the running hash of a suffix by the label to its left. The
/// label's own hash does not depend on `suffix`, so the CPU can compute
/// the hashes of several labels at once, and the chain from one suffix to
/// the next is one multiplication.
#[inline]
fn extend(suffix: u64, bytes: &[u8], start: usize, end: usize) -> u64 {
    (suffix.rotate_left(23) ^ label_hash(bytes, start, end)).wrapping_mul(SUFFIX_MULTIPLIER)
}

/// Mixes a running suffix hash into a key hash with every bit depending on
/// every input bit, because the slot index and the filter position use
/// different bits of it.
fn finish(hash: u64) -> u64 {
    let mut hash = hash ^ hash >> 33;
    hash = hash.wrapping_mul(FINAL_MULTIPLIERS[0]);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(FINAL_MULTIPLIERS[1]);
    hash ^ hash >> 33
}

/// Returns the key hash of the wildcard pattern `*.suffix`, given the
/// running hash of `suffix`: the running hash extended by a `*` label.
fn wildcard_key(suffix: u64) -> u64 {
    finish(extend(suffix, b"*", 0, 1))
}

/// Returns the key hash of `name` of the given kind. The lookup walk
/// computes the same value label by label.
fn key_hash(name: &[u8], wildcard: bool) -> u64 {
    let mut suffix = SUFFIX_SEED;
    let mut end = name.len();
    loop {
        let start = label_start(name, end);
        suffix = extend(suffix, name, start, end);
        if start == 0 {
            break;
        }
        end = start - 1;
    }
    if wildcard {
        wildcard_key(suffix)
    } else {
        finish(suffix)
    }
}

/// Returns `bytes`, at most 8 of them, as a little-endian integer with the
/// missing high bytes zero. Overlapping loads cover every length, so there
/// is no loop over the bytes.
#[inline]
fn load_short(bytes: &[u8]) -> u64 {
    let length = bytes.len();
    if let Some(word) = bytes.first_chunk::<8>() {
        return u64::from_le_bytes(*word);
    }
    if length >= 4 {
        let head = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let tail_start = length - 4;
        let tail = &bytes[tail_start..];
        let tail = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]);
        // The two loads overlap when `length` is below 8, and overlapping
        // bytes are equal, so OR combines them.
        return u64::from(head) | u64::from(tail) << (8 * tail_start);
    }
    if length == 0 {
        return 0;
    }
    // Bytes 0, length / 2 and length - 1 cover every byte when `length`
    // is 1 to 3.
    let middle = length / 2;
    u64::from(bytes[0])
        | u64::from(bytes[middle]) << (8 * middle)
        | u64::from(bytes[length - 1]) << (8 * (length - 1))
}

/// Returns true when `left` and `right`, of equal length, have the same
/// bytes. Up to 24 bytes are compared as three overlapping 8-byte words,
/// without a call to `memcmp`. Longer slices use slice equality.
#[inline]
fn words_equal(left: &[u8], right: &[u8]) -> bool {
    let length = left.len();
    if length != right.len() {
        return false;
    }
    if length > 24 {
        return left == right;
    }
    let Some(tail_start) = length.checked_sub(8) else {
        return load_short(left) == load_short(right);
    };
    // Words at 0, at `middle_start` and at `tail_start` cover every byte.
    // The middle word starts at 8, or at `tail_start` when that is lower.
    let middle_start = tail_start.min(8);
    let word = |bytes: &[u8], start: usize| {
        bytes[start..]
            .first_chunk::<8>()
            .map_or(0, |word| u64::from_le_bytes(*word))
    };
    let difference = (word(left, 0) ^ word(right, 0))
        | (word(left, middle_start) ^ word(right, middle_start))
        | (word(left, tail_start) ^ word(right, tail_start));
    difference == 0
}

/// Returns where the label that ends at `end` starts: after the nearest
/// dot before `end`, or at 0.
fn label_start(name: &[u8], end: usize) -> usize {
    name[..end]
        .iter()
        .rposition(|byte| *byte == b'.')
        .map_or(0, |dot| dot + 1)
}

/// A name and whether the pattern is `*.name`, in the order rules appear.
pub(crate) struct TableEntry<'a> {
    pub name: &'a str,
    pub wildcard: bool,
    pub rule_index: u32,
    pub settings: SlotSettings,
}

impl SuffixTable {
    /// Returns true when the table has no slots, as a table built from no
    /// patterns has. Takes constant time, unlike counting occupied slots.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Returns the index and rule index of every occupied slot.
    pub fn occupied_slots(&self) -> impl Iterator<Item = (usize, u32)> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, slot)| slot.name_length != 0)
            .map(|(index, slot)| (index, slot.rule_index))
    }

    /// Returns the rule index stored in an occupied slot, as returned by
    /// [`SuffixTable::lookup`].
    pub fn rule_index(&self, slot_index: usize) -> u32 {
        self.slots[slot_index].rule_index
    }

    /// Returns the rule index and the settings stored in an occupied slot,
    /// as returned by [`SuffixTable::lookup`]. Both come from the cache line
    /// that the lookup has just read.
    ///
    /// A slot whose settings do not decode never reaches here from a file,
    /// because [`SuffixTable::check`] rejects it. Should one appear anyway,
    /// it reads as verified TLS and held mail, the most cautious settings.
    #[inline]
    pub fn hit(&self, slot_index: usize) -> (u32, SlotSettings) {
        let slot = &self.slots[slot_index];
        let settings = slot.settings().unwrap_or(SlotSettings {
            tls: TlsMode::Verified,
            hold: true,
            ..SlotSettings::NONE
        });
        (slot.rule_index, settings)
    }

    /// Builds the table. Returns the two rule indexes of the first duplicate
    /// pattern found, which validation has normally rejected already.
    ///
    /// # Panics
    ///
    /// Panics on an empty name or one longer than 255 bytes. Validation
    /// limits domain names to 253 bytes.
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
            slots: SlotArray::empty(capacity),
            long_names: Vec::new(),
            filter: Vec::new(),
        };
        for entry in entries {
            table.insert(entry)?;
        }
        table.rebuild_filter();
        Ok(table)
    }

    fn insert(&mut self, entry: TableEntry<'_>) -> Result<(), (u32, u32)> {
        let name = entry.name.as_bytes();
        let name_length = u8::try_from(name.len())
            .ok()
            .filter(|length| *length != 0)
            .expect("validation limits names to 1 to 253 bytes");
        let hash = key_hash(name, entry.wildcard);
        if let Some(index) = self.find(hash, name, entry.wildcard) {
            return Err((self.slots[index].rule_index, entry.rule_index));
        }

        let mut slot = Slot {
            hash,
            rule_index: entry.rule_index,
            name_length,
            wildcard: u8::from(entry.wildcard),
            ..EMPTY_SLOT
        };
        slot.set_settings(&entry.settings);
        if name.len() <= INLINE_NAME_BYTES {
            slot.inline_name[..name.len()].copy_from_slice(name);
        } else {
            slot.long_name_offset = u32::try_from(self.long_names.len())
                .expect("the arena stays under 4 GiB because compile caps the rule count");
            self.long_names.extend_from_slice(name);
        }

        let mask = self.slots.len() - 1;
        // The capacity is at least twice the entry count, so an empty slot
        // exists and this loop ends.
        let mut index = hash as usize & mask;
        while self.slots[index].name_length != 0 {
            index = (index + 1) & mask;
        }
        self.slots[index] = slot;
        Ok(())
    }

    /// Computes the filter from the slots, as a table read from a compiled
    /// file needs after [`SuffixTable::check`].
    pub fn rebuild_filter(&mut self) {
        let key_count = self.occupied_slots().count();
        if key_count == 0 {
            self.filter = Vec::new();
            return;
        }
        let block_count = (key_count * FILTER_BITS_PER_KEY)
            .div_ceil(FILTER_BLOCK_BITS as usize)
            .next_power_of_two();
        let mut filter = vec![[0u64; FILTER_BLOCK_WORDS]; block_count];
        for slot in self.slots.iter() {
            if slot.name_length == 0 {
                continue;
            }
            let (block, bits) = filter_position(slot.hash, block_count - 1);
            for bit in bits {
                filter[block][(bit / 64) as usize] |= 1 << (bit % 64);
            }
        }
        self.filter = filter;
    }

    /// Returns false when no stored key has the hash `hash`.
    #[inline]
    fn may_contain(&self, hash: u64) -> bool {
        // An empty filter gives a mask of all ones, so `get` finds no block
        // and the hash passes.
        let block_mask = self.filter.len().wrapping_sub(1);
        let (block, bits) = filter_position(hash, block_mask);
        let Some(words) = self.filter.get(block) else {
            return true;
        };
        // The three bits are tested without a branch between them, because
        // whether each is set is not predictable.
        let set = bits
            .iter()
            .fold(1, |set, bit| set & words[(bit / 64) as usize] >> (bit % 64));
        set != 0
    }

    /// Returns the slot index of the key (`name`, `wildcard`), whose hash
    /// is `hash`.
    fn find(&self, hash: u64, name: &[u8], wildcard: bool) -> Option<usize> {
        if !self.may_contain(hash) {
            return None;
        }
        self.probe(&self.slots, hash, name, wildcard)
    }

    /// Returns the slot index of the key (`name`, `wildcard`), whose hash
    /// is `hash`, by linear probing in `slots`, which is `self.slots`. It
    /// skips the filter, which the caller tests first. A lookup passes the
    /// slots so that the slice is taken from the [`SlotArray`] once.
    #[inline]
    fn probe(&self, slots: &[Slot], hash: u64, name: &[u8], wildcard: bool) -> Option<usize> {
        // With no slots the mask is all ones, and `get` returns `None`.
        let mask = slots.len().wrapping_sub(1);
        let mut index = hash as usize & mask;
        loop {
            let slot = slots.get(index)?;
            if slot.name_length == 0 {
                return None;
            }
            if slot.hash == hash
                && slot.wildcard == u8::from(wildcard)
                && self.slot_name_equals(slot, name)
            {
                return Some(index);
            }
            index = (index + 1) & mask;
        }
    }

    /// Returns true when the occupied `slot` stores `name`. A damaged slot
    /// that points outside the arena stores no name.
    #[inline]
    fn slot_name_equals(&self, slot: &Slot, name: &[u8]) -> bool {
        let length = usize::from(slot.name_length);
        if length != name.len() {
            return false;
        }
        match slot.inline_name.get(..length) {
            Some(inline) => words_equal(inline, name),
            None => self.slot_name(slot) == Some(name),
        }
    }

    /// Returns the name of an occupied slot, or `None` when a damaged slot
    /// points outside the arena.
    fn slot_name<'s>(&'s self, slot: &'s Slot) -> Option<&'s [u8]> {
        let length = usize::from(slot.name_length);
        if length <= INLINE_NAME_BYTES {
            return Some(&slot.inline_name[..length]);
        }
        let start = slot.long_name_offset as usize;
        self.long_names.get(start..start.checked_add(length)?)
    }

    /// Checks the invariants that lookups rely on, for a table read from a
    /// file: every name is inside its slot or the arena, hashes to its
    /// slot's hash and is found by a probe, every rule index is below
    /// `rule_count`, and an empty slot exists so that probing ends.
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
            let name = self
                .slot_name(slot)
                .ok_or_else(|| format!("slot {index} names bytes outside the arena"))?;
            if slot.wildcard > 1 {
                return Err(format!(
                    "slot {index} has kind {}, which is neither exact (0) nor wildcard (1)",
                    slot.wildcard
                ));
            }
            if slot.settings().is_none() {
                return Err(format!(
                    "slot {index} has TLS mode {} or flags {:#04x}, which this build does not know",
                    slot.tls, slot.flags
                ));
            }
            let wildcard = slot.wildcard == 1;
            if key_hash(name, wildcard) != slot.hash
                || self.find(slot.hash, name, wildcard) != Some(index)
            {
                return Err(format!("slot {index} is not where its hash puts it"));
            }
            if slot.rule_index as usize >= rule_count {
                return Err(format!(
                    "slot {index} points at rule {}, but there are {rule_count} rules",
                    slot.rule_index
                ));
            }
        }
        Ok(())
    }

    /// Returns the slot of the longest pattern that matches `name`: an
    /// exact pattern for `name` itself, else the wildcard of its nearest
    /// ancestor. Allocates nothing and takes no locks.
    ///
    /// `name` is expected to be a valid lowercase A-label name. A name with
    /// an empty first label never matches; other malformed names may match
    /// by their well-formed suffix.
    pub fn lookup(&self, name: &[u8]) -> Option<usize> {
        let slots: &[Slot] = &self.slots;
        if slots.is_empty() || name.is_empty() || name[0] == b'.' {
            return None;
        }
        let mut suffix = SUFFIX_SEED;
        let mut best = None;
        // Walk the labels from the last to the first. After each step,
        // `suffix` is the running hash of `name[start..]`. While `start` is
        // not 0, that is a proper label-aligned suffix, whose wildcard may
        // match. Later hits are longer suffixes, so each overrides the one
        // before.
        let mut end = name.len();
        loop {
            let start = label_start(name, end);
            suffix = extend(suffix, name, start, end);
            if start == 0 {
                break;
            }
            let key = wildcard_key(suffix);
            if self.may_contain(key)
                && let Some(index) = self.probe(slots, key, &name[start..], true)
            {
                best = Some(index);
            }
            end = start - 1;
        }
        let key = finish(suffix);
        if self.may_contain(key)
            && let Some(index) = self.probe(slots, key, name, false)
        {
            return Some(index);
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Computes the longest match with string operations, to compare the
    /// table against. Expects a name that does not start with a dot, which
    /// the table never matches. Other empty labels are allowed.
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

    /// Returns `count` different patterns, each a name from `random_name`
    /// that is exact or, at random, a wildcard.
    fn random_patterns(
        state: &mut u64,
        count: usize,
        mut random_name: impl FnMut(&mut u64) -> String,
    ) -> Vec<String> {
        let mut patterns: Vec<String> = Vec::new();
        while patterns.len() < count {
            let name = random_name(state);
            let pattern = if next_random(state).is_multiple_of(2) {
                format!("*.{name}")
            } else {
                name
            };
            if !patterns.contains(&pattern) {
                patterns.push(pattern);
            }
        }
        patterns
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
                settings: SlotSettings::NONE,
            }
        }))
        .unwrap()
    }

    fn exact_key(name: &[u8]) -> u64 {
        key_hash(name, false)
    }

    /// Returns the rule index of the slot that `lookup` returns.
    fn lookup_rule(table: &SuffixTable, name: &[u8]) -> Option<u32> {
        table.lookup(name).map(|index| table.rule_index(index))
    }

    #[test]
    fn lookup_prefers_longest_pattern() {
        let table = table(&["*.example", "*.a.example", "b.a.example", "example"]);
        assert_eq!(lookup_rule(&table, b"example"), Some(3));
        assert_eq!(lookup_rule(&table, b"z.example"), Some(0));
        assert_eq!(lookup_rule(&table, b"a.example"), Some(0));
        assert_eq!(lookup_rule(&table, b"x.a.example"), Some(1));
        assert_eq!(lookup_rule(&table, b"y.x.a.example"), Some(1));
        assert_eq!(lookup_rule(&table, b"b.a.example"), Some(2));
        assert_eq!(lookup_rule(&table, b"c.b.a.example"), Some(1));
        assert_eq!(lookup_rule(&table, b"other"), None);
        assert_eq!(lookup_rule(&table, b"xexample"), None);
        assert_eq!(lookup_rule(&table, b""), None);
        assert_eq!(lookup_rule(&table, b"."), None);
        assert_eq!(lookup_rule(&table, b".example"), None);
    }

    #[test]
    fn lookup_deep_names() {
        let table = table(&[
            "*.example",
            "*.e.f.g.example",
            "a.b.c.d.e.f.g.example",
            "d.c.b.a",
        ]);
        assert_eq!(lookup_rule(&table, b"d.c.b.a"), Some(3));
        assert_eq!(lookup_rule(&table, b"x.d.c.b.a"), None);
        assert_eq!(lookup_rule(&table, b"a.b.c.d.e.f.g.example"), Some(2));
        assert_eq!(lookup_rule(&table, b"z.b.c.d.e.f.g.example"), Some(1));
        assert_eq!(lookup_rule(&table, b"y.z.b.c.d.e.f.g.example"), Some(1));
        assert_eq!(lookup_rule(&table, b"a.b.c.d.e.f.x.example"), Some(0));
        assert_eq!(lookup_rule(&table, b"a.b.c.d.e.f.g.example.org"), None);
    }

    #[test]
    fn lookup_idn_a_labels() {
        // Rules hold A-labels (bücher.example and ü.example here), and
        // lookups take A-labels, as normalise_domain returns them.
        let table = table(&["xn--bcher-kva.example", "*.xn--tda.example"]);
        assert_eq!(lookup_rule(&table, b"xn--bcher-kva.example"), Some(0));
        assert_eq!(lookup_rule(&table, b"mail.xn--tda.example"), Some(1));
        assert_eq!(lookup_rule(&table, b"xn--tda.example"), None);
        assert_eq!(lookup_rule(&table, "bücher.example".as_bytes()), None);
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
        let patterns = random_patterns(&mut state, 200, random_name);
        let patterns: Vec<&str> = patterns.iter().map(String::as_str).collect();
        let table = table(&patterns);
        for _ in 0..20_000 {
            let name = random_name(&mut state);
            assert_eq!(
                lookup_rule(&table, name.as_bytes()),
                reference_lookup(&patterns, &name),
                "{name}"
            );
        }
    }

    #[test]
    fn hash_collision_is_not_a_match() {
        let table = table(&["example.com"]);
        let stored_hash = exact_key(b"example.com");
        assert!(table.find(stored_hash, b"example.com", false).is_some());
        assert!(table.find(stored_hash, b"exbmple.com", false).is_none());
        assert!(table.find(stored_hash, b"example.com", true).is_none());
    }

    /// A name of 60 bytes, too long to fit in a slot.
    const LONG_NAME: &str = "a-long-host-name-for-the-arena.mail.subdomain.example.health";

    #[test]
    fn check_rejects_damaged_tables() {
        let wildcard_long = format!("*.{LONG_NAME}");
        let good = table(&["example", "*.a.example", &wildcard_long]);
        assert_eq!(good.check(3), Ok(()));
        assert!(good.check(2).unwrap_err().contains("points at rule 2"));

        let mut outside = good.clone();
        let long = outside
            .slots
            .iter()
            .position(|slot| usize::from(slot.name_length) > INLINE_NAME_BYTES)
            .unwrap();
        outside.slots[long].long_name_offset = 1000;
        assert!(outside.check(3).unwrap_err().contains("outside the arena"));

        let filled = good
            .slots
            .iter()
            .position(|slot| slot.name_length != 0)
            .unwrap();
        let mut moved = good.clone();
        moved.slots[filled].hash ^= 1;
        assert!(moved.check(3).unwrap_err().contains("not where its hash"));

        let mut renamed = good.clone();
        renamed.slots[filled].inline_name[0] ^= 1;
        assert!(renamed.check(3).unwrap_err().contains("not where its hash"));

        let mut kind_flipped = good.clone();
        kind_flipped.slots[filled].wildcard ^= 1;
        assert!(
            kind_flipped
                .check(3)
                .unwrap_err()
                .contains("not where its hash")
        );

        let mut unknown_kind = good.clone();
        unknown_kind.slots[filled].wildcard = 2;
        assert!(
            unknown_kind
                .check(3)
                .unwrap_err()
                .contains("neither exact (0) nor wildcard (1)")
        );

        let mut full = good.clone();
        let template = full.slots[filled];
        full.slots.fill(template);
        assert!(full.check(3).unwrap_err().contains("no empty slot"));

        let mut odd = good;
        let mut odd_slots = odd.slots.to_vec();
        odd_slots.push(EMPTY_SLOT);
        odd.slots = SlotArray::Heap(odd_slots);
        assert!(odd.check(3).unwrap_err().contains("power of two"));
    }

    #[test]
    fn slot_fills_one_cache_line() {
        assert_eq!(std::mem::size_of::<Slot>(), 64);
        assert_eq!(std::mem::align_of::<Slot>(), 64);
        let table = table(&["example"]);
        assert_eq!(table.slots.as_ptr() as usize % 64, 0);
    }

    #[test]
    fn large_table_uses_huge_pages() {
        // 20,000 names take 65,536 slots, 4 MiB, above the huge page
        // threshold. An archive round trip must keep them in a mapping.
        let names: Vec<String> = (0..20_000).map(|n| format!("host{n}.example")).collect();
        let large = SuffixTable::build(names.iter().enumerate().map(|(index, name)| TableEntry {
            name,
            wildcard: false,
            rule_index: index as u32,
            settings: SlotSettings::NONE,
        }))
        .unwrap();
        assert!(matches!(large.slots, SlotArray::HugePages(_)));
        assert_eq!(large.check(names.len()), Ok(()));

        let archive = rkyv::to_bytes::<rkyv::rancor::Error>(&large).unwrap();
        let mut loaded = rkyv::from_bytes::<SuffixTable, rkyv::rancor::Error>(&archive).unwrap();
        assert!(matches!(loaded.slots, SlotArray::HugePages(_)));
        assert_eq!(loaded.check(names.len()), Ok(()));
        loaded.rebuild_filter();
        for (index, name) in names.iter().enumerate() {
            assert_eq!(lookup_rule(&loaded, name.as_bytes()), Some(index as u32));
        }
        assert_eq!(lookup_rule(&loaded, b"host20000.example"), None);

        let small = table(&["example"]);
        assert!(matches!(small.slots, SlotArray::Heap(_)));
    }

    #[test]
    fn long_names_match_exactly() {
        let inline_longest = format!("{}.example", "a".repeat(INLINE_NAME_BYTES - 8));
        let arena_shortest = format!("{}.example", "a".repeat(INLINE_NAME_BYTES - 7));
        assert_eq!(inline_longest.len(), INLINE_NAME_BYTES);
        assert_eq!(arena_shortest.len(), INLINE_NAME_BYTES + 1);
        let longest = format!(
            "{}.{}.{}.example",
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(63)
        );
        let wildcard_long = format!("*.{LONG_NAME}");
        let patterns = [
            inline_longest.as_str(),
            arena_shortest.as_str(),
            longest.as_str(),
            wildcard_long.as_str(),
            LONG_NAME,
        ];
        let table = table(&patterns);
        assert_eq!(table.check(patterns.len()), Ok(()));
        assert_eq!(lookup_rule(&table, inline_longest.as_bytes()), Some(0));
        assert_eq!(lookup_rule(&table, arena_shortest.as_bytes()), Some(1));
        assert_eq!(lookup_rule(&table, longest.as_bytes()), Some(2));
        assert_eq!(lookup_rule(&table, LONG_NAME.as_bytes()), Some(4));
        let below = format!("mx1.{LONG_NAME}");
        assert_eq!(lookup_rule(&table, below.as_bytes()), Some(3));

        // Names that differ from a stored long name only in their first or
        // last byte, or lack its first byte, match nothing.
        let first_changed = format!("x{}", &LONG_NAME[1..]);
        let last_changed = format!("{}x", &LONG_NAME[..LONG_NAME.len() - 1]);
        let shorter = &longest[1..];
        for absent in [first_changed.as_str(), last_changed.as_str(), shorter] {
            assert_eq!(lookup_rule(&table, absent.as_bytes()), None, "{absent}");
        }
    }

    #[test]
    fn long_name_hash_collision_is_not_a_match() {
        let table = table(&[LONG_NAME]);
        let stored_hash = exact_key(LONG_NAME.as_bytes());
        let mut other = LONG_NAME.as_bytes().to_vec();
        other[0] = b'b';
        assert!(
            table
                .find(stored_hash, LONG_NAME.as_bytes(), false)
                .is_some()
        );
        assert!(table.find(stored_hash, &other, false).is_none());
    }

    #[test]
    fn exact_and_wildcard_are_separate_keys() {
        let table = table(&["*.example", "example"]);
        assert_eq!(table.occupied_slots().count(), 2);
        assert_eq!(lookup_rule(&table, b"example"), Some(1));
        assert_eq!(lookup_rule(&table, b"a.example"), Some(0));
        assert_ne!(table.lookup(b"example"), table.lookup(b"a.example"));
    }

    #[test]
    fn names_sharing_home_slot_all_found() {
        // Eight patterns make 16 slots. Choosing names whose hash selects
        // the last slot makes them collide there, so probes wrap around to
        // the first slots, which the other names also want.
        let mask = 15;
        let mut last_slot: Vec<String> = Vec::new();
        let mut first_slot: Vec<String> = Vec::new();
        let mut n = 0;
        while last_slot.len() < 4 || first_slot.len() < 2 {
            let name = if n % 2 == 0 {
                format!("host{n}.example")
            } else {
                format!("{n}.{LONG_NAME}")
            };
            match key_hash(name.as_bytes(), false) & mask {
                15 if last_slot.len() < 4 => last_slot.push(name),
                0 if first_slot.len() < 2 => first_slot.push(name),
                _ => {}
            }
            n += 1;
        }
        let wildcard_last = format!("*.{}", last_slot[0]);
        let wildcard_first = format!("*.{}", first_slot[0]);
        let mut patterns: Vec<&str> = last_slot.iter().map(String::as_str).collect();
        patterns.extend(first_slot.iter().map(String::as_str));
        patterns.push(&wildcard_last);
        patterns.push(&wildcard_first);
        let table = table(&patterns);
        assert_eq!(table.slots.len(), 16);
        assert_eq!(table.check(patterns.len()), Ok(()));
        assert_eq!(table.slots[15].name_length as usize, last_slot[0].len());
        for (index, name) in last_slot.iter().chain(&first_slot).enumerate() {
            assert_eq!(
                lookup_rule(&table, name.as_bytes()),
                Some(index as u32),
                "{name}"
            );
        }
        let below_last = format!("a.{}", last_slot[0]);
        let below_first = format!("a.{}", first_slot[0]);
        assert_eq!(lookup_rule(&table, below_last.as_bytes()), Some(6));
        assert_eq!(lookup_rule(&table, below_first.as_bytes()), Some(7));
        let below_other = format!("a.{}", last_slot[1]);
        assert_eq!(lookup_rule(&table, below_other.as_bytes()), None);
    }

    #[test]
    fn filter_rejects_most_absent_names() {
        let names: Vec<String> = (0..1000).map(|n| format!("host{n}.example")).collect();
        let table = SuffixTable::build(names.iter().enumerate().map(|(index, name)| TableEntry {
            name,
            wildcard: false,
            rule_index: index as u32,
            settings: SlotSettings::NONE,
        }))
        .unwrap();
        for name in &names {
            assert!(table.may_contain(exact_key(name.as_bytes())), "{name}");
        }
        let passed = (0..10_000)
            .filter(|n| table.may_contain(exact_key(format!("other{n}.example").as_bytes())))
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
                lookup_rule(&without, name.as_bytes()),
                lookup_rule(&with_filter, name.as_bytes()),
                "{name}"
            );
        }
        without.rebuild_filter();
        assert_eq!(without.filter, with_filter.filter);
    }

    #[test]
    fn empty_table_matches_nothing() {
        let table = table(&[]);
        assert_eq!(lookup_rule(&table, b"example.com"), None);
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
                settings: SlotSettings::NONE,
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
            settings: SlotSettings::NONE,
        }))
        .unwrap();
        for (index, name) in names.iter().enumerate() {
            assert_eq!(lookup_rule(&table, name.as_bytes()), Some(index as u32));
        }
        assert_eq!(lookup_rule(&table, b"host1000.example"), None);
    }

    #[test]
    fn load_short_reads_little_endian() {
        let bytes = *b"abcdefgh";
        for length in 0..=8 {
            let expected = bytes[..length]
                .iter()
                .rev()
                .fold(0, |value, byte| value << 8 | u64::from(*byte));
            assert_eq!(load_short(&bytes[..length]), expected, "length {length}");
        }
    }

    #[test]
    fn words_equal_matches_slice_equality() {
        // Lengths around each word boundary and past the 24 bytes that the
        // word comparison covers, with each byte changed in turn.
        for length in 0..=40 {
            let left: Vec<u8> = (0..length).map(|index| b'a' + (index % 26) as u8).collect();
            assert!(words_equal(&left, &left.clone()), "length {length}");
            for changed in 0..length {
                let mut right = left.clone();
                right[changed] = b'.';
                assert!(
                    !words_equal(&left, &right),
                    "length {length}, byte {changed} changed"
                );
            }
            if length > 0 {
                assert!(!words_equal(&left, &left[1..]), "length {length}");
            }
        }
    }

    /// Returns a name of exactly `length` bytes, at least 5: labels of 7
    /// letters or fewer, ending in `.org`.
    fn name_of_length(length: usize) -> String {
        let mut name = String::from("org");
        let mut letter = b'a';
        while name.len() < length {
            // A label and its dot take 2 bytes or more, so never leave 1.
            let label_length = match length - name.len() {
                remaining if remaining > 9 => 7,
                9 => 3,
                remaining => remaining - 1,
            };
            let label = (letter as char).to_string().repeat(label_length);
            name = format!("{label}.{name}");
            letter = if letter == b'z' { b'a' } else { letter + 1 };
        }
        name
    }

    #[test]
    fn lookup_names_at_word_lengths() {
        // Names of exactly one, two and three 8-byte words, the most that a
        // slot stores inline (24) and one more, a 64-byte name, and a name
        // of the maximum domain length, as exact and wildcard patterns.
        let lengths = [8, 9, 15, 16, 17, 23, 24, 25, 32, 63, 64, 65, 253];
        let names: Vec<String> = lengths
            .iter()
            .map(|length| name_of_length(*length))
            .collect();
        for (name, length) in names.iter().zip(lengths) {
            assert_eq!(name.len(), length, "{name}");
        }
        let mut patterns: Vec<String> = Vec::new();
        for (index, name) in names.iter().enumerate() {
            if index % 2 == 0 {
                patterns.push(name.clone());
            } else {
                patterns.push(format!("*.{name}"));
            }
        }
        let patterns: Vec<&str> = patterns.iter().map(String::as_str).collect();
        let table = table(&patterns);
        assert_eq!(table.check(patterns.len()), Ok(()));

        for name in &names {
            let first_changed = format!("x{}", &name[1..]);
            let last_changed = format!("{}x", &name[..name.len() - 1]);
            let below = format!("mx.{name}");
            let deeper = format!("a.b.{name}");
            for query in [
                name.as_str(),
                &first_changed,
                &last_changed,
                &name[1..],
                &below,
                &deeper,
            ] {
                if query.starts_with('.') {
                    assert_eq!(lookup_rule(&table, query.as_bytes()), None, "{query}");
                    continue;
                }
                assert_eq!(
                    lookup_rule(&table, query.as_bytes()),
                    reference_lookup(&patterns, query),
                    "{query}"
                );
            }
        }
    }

    #[test]
    fn lookup_odd_names_match_reference() {
        // Query names with empty labels, leading and trailing dots and long
        // labels, against patterns of well-formed names.
        let labels = [
            "a",
            "mx",
            "example",
            "abcdefghij",
            "",
            "0123456789abcdefghijklmnop",
        ];
        let mut state = 11;
        let random_name = |state: &mut u64, allow_empty: bool| loop {
            let depth = 1 + next_random(state) % 7;
            let name = (0..depth)
                .map(|_| labels[(next_random(state) % labels.len() as u64) as usize])
                .collect::<Vec<_>>()
                .join(".");
            if allow_empty || (!name.is_empty() && !name.split('.').any(str::is_empty)) {
                return name;
            }
        };
        let patterns = random_patterns(&mut state, 100, |state| random_name(state, false));
        let patterns: Vec<&str> = patterns.iter().map(String::as_str).collect();
        let table = table(&patterns);
        for _ in 0..20_000 {
            let name = random_name(&mut state, true);
            let expected = if name.is_empty() || name.starts_with('.') {
                None
            } else {
                reference_lookup(&patterns, &name)
            };
            assert_eq!(lookup_rule(&table, name.as_bytes()), expected, "{name:?}");
        }
    }
}
