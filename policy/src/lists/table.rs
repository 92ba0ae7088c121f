//! The base table of both lists and its file format.
//!
//! A record is 16 bytes: the first 15 bytes of the address's HMAC-SHA-256
//! followed by a byte of flags ([`super::Entry::flag`]). Read as a big-endian
//! `u128`, the HMAC prefix is the high 120 bits (the key) and the flags are
//! the low 8, so sorting records as integers sorts them by key.
//!
//! RFC 2104 §5 recommends keeping at least half of a truncated HMAC's hash
//! output (128 bits here) to match the birthday bound against forgery. The
//! 120 bits kept here fall short of that, which is safe because the value
//! only identifies an address and authenticates nothing, and choosing
//! addresses that collide needs the site key. What remains is accidental
//! matches. With 10^7 stored keys, an address on neither list
//! matches one of them with probability 10^7 / 2^120, about 8e-30 per
//! lookup. Any two of the 10^7 stored addresses share a key with probability
//! about 10^14 / 2^121, or 4e-23. Dropping the 16th byte makes room for the
//! flags in a 16-byte record, so one lookup reads one record.
//!
//! # File layout
//!
//! All integers are little-endian. No field depends on the platform.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic, `CDCSLIST` |
//! | 8 | 4 | format version, 1 |
//! | 12 | 4 | record size in bytes, 16 |
//! | 16 | 8 | record count |
//! | 24 | 8 | site key check: the first 8 bytes of an HMAC of a fixed label under the site key |
//! | 32 | 4 | CRC-32C of every record |
//! | 36 | 4 | CRC-32C of bytes 0 to 35 |
//! | 40 | 24 | reserved, zero |
//! | 64 | 16 × count | records, sorted by key, keys unique, flags non-zero |

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{Entry, KNOWN_FLAGS, Overlay, Verdict, key_of, verdict_of};
use crate::file_io::write_atomically;
use crate::{Category, SiteKey};

const MAGIC: [u8; 8] = *b"CDCSLIST";
const FORMAT_VERSION: u32 = 1;
const RECORD_SIZE_BYTES: usize = 16;

const MAGIC_OFFSET: usize = 0;
const VERSION_OFFSET: usize = MAGIC_OFFSET + 8;
const RECORD_SIZE_OFFSET: usize = VERSION_OFFSET + 4;
const COUNT_OFFSET: usize = RECORD_SIZE_OFFSET + 4;
const KEY_CHECK_OFFSET: usize = COUNT_OFFSET + 8;
const RECORDS_CRC_OFFSET: usize = KEY_CHECK_OFFSET + 8;
const HEADER_CRC_OFFSET: usize = RECORDS_CRC_OFFSET + 4;
const RESERVED_OFFSET: usize = HEADER_CRC_OFFSET + 4;
const HEADER_SIZE_BYTES: usize = 64;
const _: () = assert!(RESERVED_OFFSET <= HEADER_SIZE_BYTES);

/// The bucket index stores record positions as `u32`.
const MAX_RECORDS: u64 = u32::MAX as u64;
/// The largest index, 2^24 buckets or 64 MiB, is reached at 2^30 records.
const MAX_BUCKET_BITS: u32 = 24;
/// Low bits of a record that hold its flags.
const FLAGS_MASK: u128 = 0xff;

/// A list file that cannot be read, written or trusted.
#[derive(Debug, thiserror::Error)]
pub enum ListFileError {
    #[error("list file {}: {operation} failed: {source}", path.display())]
    Io {
        operation: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("list file {origin}: {problem}")]
    Invalid { origin: String, problem: String },
}

/// The storage of a table's records.
enum Image {
    Owned(Vec<u8>),
    /// An anonymous mapping advised to use transparent huge pages.
    Anonymous(memmap2::MmapMut),
    /// Bytes that the caller owns, such as a read-only memory mapping made by
    /// the engine's I/O layer. This crate forbids `unsafe`, so it never maps
    /// files itself.
    Shared(Arc<dyn AsRef<[u8]> + Send + Sync>),
}

impl Image {
    fn bytes(&self) -> &[u8] {
        match self {
            Image::Owned(bytes) => bytes,
            Image::Anonymous(mapping) => mapping,
            Image::Shared(bytes) => (**bytes).as_ref(),
        }
    }
}

/// The compiled base of both lists: sorted records and an index over them.
///
/// The index splits the key space into `2^bucket_bits` equal buckets and
/// stores where each starts. HMAC keys are uniform, so a bucket contains 64
/// to 128 records, and a lookup reads one index entry and usually one or two
/// cache lines of records. It allocates nothing and takes no locks.
pub struct ListTable {
    image: Image,
    record_count: usize,
    bucket_bits: u32,
    /// `2^bucket_bits + 1` record positions; bucket `b` covers records
    /// `bucket_starts[b]..bucket_starts[b + 1]`.
    bucket_starts: Box<[u32]>,
}

impl std::fmt::Debug for ListTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListTable")
            .field("record_count", &self.record_count)
            .field("bucket_bits", &self.bucket_bits)
            .finish_non_exhaustive()
    }
}

impl ListTable {
    /// Returns a table with no records for the site key `key`.
    pub fn empty(key: &SiteKey) -> ListTable {
        ListBuilder::new().build(key)
    }

    /// Reads and validates a list file written by [`ListTable::write`].
    ///
    /// The whole file is read into memory and checked: header, checksums,
    /// site key, sort order and flags. Restarting this way costs one read
    /// of 16 bytes per address and no hashing.
    pub fn open(path: &Path, key: &SiteKey) -> Result<ListTable, ListFileError> {
        let io_error = |operation| {
            move |source| ListFileError::Io {
                operation,
                path: path.to_path_buf(),
                source,
            }
        };
        let mut file = File::open(path).map_err(io_error("open"))?;
        let length_bytes = file.metadata().map_err(io_error("stat"))?.len();
        let image = match usize::try_from(length_bytes)
            .ok()
            .and_then(huge_page_buffer)
        {
            Some(mut mapping) => {
                file.read_exact(&mut mapping).map_err(io_error("read"))?;
                // A file that grew after the stat would be cut short; the
                // length and checksum checks reject the result.
                Image::Anonymous(mapping)
            }
            None => {
                let mut bytes = Vec::new();
                file.read_to_end(&mut bytes).map_err(io_error("read"))?;
                Image::Owned(bytes)
            }
        };
        ListTable::validate(image, key, &path.display().to_string())
    }

    /// Validates a list file image that the caller holds, such as a
    /// read-only memory mapping of a file written by [`ListTable::write`].
    ///
    /// The caller must keep the bytes unchanged for the life of the table.
    /// A mapped file must therefore only ever be replaced by rename, as
    /// [`ListTable::write`] does, and never truncated or rewritten in place.
    pub fn from_image(
        image: Arc<dyn AsRef<[u8]> + Send + Sync>,
        key: &SiteKey,
        origin: &str,
    ) -> Result<ListTable, ListFileError> {
        ListTable::validate(Image::Shared(image), key, origin)
    }

    fn validate(image: Image, key: &SiteKey, origin: &str) -> Result<ListTable, ListFileError> {
        let invalid = |problem: String| ListFileError::Invalid {
            origin: origin.to_string(),
            problem,
        };
        let bytes = image.bytes();

        if bytes.len() < HEADER_SIZE_BYTES {
            return Err(invalid(format!(
                "the file is {} bytes long, shorter than its {HEADER_SIZE_BYTES}-byte header",
                bytes.len()
            )));
        }
        if bytes[MAGIC_OFFSET..MAGIC_OFFSET + 8] != MAGIC {
            return Err(invalid(
                "not a Caduceus list file (wrong magic)".to_string(),
            ));
        }
        let header_crc = read_u32(bytes, HEADER_CRC_OFFSET);
        if crc32c::crc32c(&bytes[..HEADER_CRC_OFFSET]) != header_crc {
            return Err(invalid(
                "the header checksum does not match; the file is damaged".to_string(),
            ));
        }

        let version = read_u32(bytes, VERSION_OFFSET);
        if version != FORMAT_VERSION {
            return Err(invalid(format!(
                "format version {version} is not supported; this build reads version {FORMAT_VERSION}"
            )));
        }
        let record_size = read_u32(bytes, RECORD_SIZE_OFFSET);
        if record_size as usize != RECORD_SIZE_BYTES {
            return Err(invalid(format!(
                "the record size is {record_size} bytes; expected {RECORD_SIZE_BYTES}"
            )));
        }

        let record_count = read_u64(bytes, COUNT_OFFSET);
        if record_count > MAX_RECORDS {
            return Err(invalid(format!(
                "{record_count} records is more than the maximum of {MAX_RECORDS}"
            )));
        }
        let expected_length = (record_count as usize)
            .checked_mul(RECORD_SIZE_BYTES)
            .and_then(|records| records.checked_add(HEADER_SIZE_BYTES));
        if expected_length != Some(bytes.len()) {
            return Err(invalid(format!(
                "the header promises {record_count} records, but the file is {} bytes long; the file is truncated or damaged",
                bytes.len()
            )));
        }

        let mut key_check = [0u8; 8];
        key_check.copy_from_slice(&bytes[KEY_CHECK_OFFSET..KEY_CHECK_OFFSET + 8]);
        if key_check != key.key_check() {
            return Err(invalid(
                "the file was built under a different site key, so none of its entries would match; rebuild it under the current key"
                    .to_string(),
            ));
        }

        let records = &bytes[HEADER_SIZE_BYTES..];
        if crc32c::crc32c(records) != read_u32(bytes, RECORDS_CRC_OFFSET) {
            return Err(invalid(
                "the record checksum does not match; the file is damaged".to_string(),
            ));
        }

        let mut previous_key = None;
        for (index, chunk) in records.chunks_exact(RECORD_SIZE_BYTES).enumerate() {
            let record = record_from_bytes(chunk);
            let flags = (record & FLAGS_MASK) as u8;
            if flags == 0 || flags & !KNOWN_FLAGS != 0 {
                return Err(invalid(format!(
                    "record {index} has invalid flags {flags:#04x}"
                )));
            }
            let key = record & !FLAGS_MASK;
            if previous_key.is_some_and(|previous| previous >= key) {
                return Err(invalid(format!(
                    "record {index} is out of order or repeats a key"
                )));
            }
            previous_key = Some(key);
        }
        Ok(ListTable::index(image, record_count as usize))
    }

    /// Builds the bucket index over a validated image.
    fn index(image: Image, record_count: usize) -> ListTable {
        // About 64 to 128 records per bucket keeps the index small enough to
        // stay in the CPU caches (512 KiB for 10^7 records), so a lookup
        // misses the cache only on the records themselves.
        let bucket_bits = match record_count {
            0..=127 => 0,
            _ => (record_count.ilog2() - 6).min(MAX_BUCKET_BITS),
        };
        let bucket_count = 1usize << bucket_bits;
        let mut bucket_starts = vec![0u32; bucket_count + 1];
        {
            let records = &image.bytes()[HEADER_SIZE_BYTES..];
            let mut next_bucket = 0;
            for (index, chunk) in records.chunks_exact(RECORD_SIZE_BYTES).enumerate() {
                let bucket = bucket_of(record_from_bytes(chunk), bucket_bits);
                while next_bucket <= bucket {
                    // `record_count` is at most MAX_RECORDS, checked by
                    // `validate` and `ListBuilder::build`.
                    bucket_starts[next_bucket] = index as u32;
                    next_bucket += 1;
                }
            }
            for start in &mut bucket_starts[next_bucket..] {
                *start = record_count as u32;
            }
        }
        ListTable {
            image,
            record_count,
            bucket_bits,
            bucket_starts: bucket_starts.into_boxed_slice(),
        }
    }

    /// Returns the number of addresses in the table.
    pub fn len(&self) -> usize {
        self.record_count
    }

    pub fn is_empty(&self) -> bool {
        self.record_count == 0
    }

    /// Checks one recipient against the table alone, without runtime
    /// changes; the engine uses [`super::Lists::check`].
    pub fn check(&self, hmac: &[u8; 32], category: Category) -> Verdict {
        verdict_of(self.flags_of_key(key_of(hmac)), category)
    }

    /// Returns whether an address is on the list that `entry` names.
    pub fn contains(&self, hmac: &[u8; 32], entry: Entry) -> bool {
        self.flags_of_key(key_of(hmac)) & entry.flag() != 0
    }

    /// Returns the flags of `key`, or 0 when the table does not hold it.
    pub(crate) fn flags_of_key(&self, key: u128) -> u8 {
        let bucket = bucket_of(key, self.bucket_bits);
        let start = self.bucket_starts[bucket] as usize;
        let end = self.bucket_starts[bucket + 1] as usize;
        if start == end {
            return 0;
        }
        let records = &self.image.bytes()[HEADER_SIZE_BYTES..];
        let key_at = |index: usize| {
            let offset = index * RECORD_SIZE_BYTES;
            record_from_bytes(&records[offset..offset + RECORD_SIZE_BYTES])
        };

        // Keys are uniform within a bucket, so the key's position in the
        // bucket's key range predicts its index to within a few records.
        // Starting there, a lookup usually reads one or two cache lines
        // instead of scanning or bisecting the bucket.
        let position_in_bucket = (key << self.bucket_bits >> 64) as u64;
        let offset = (u128::from(position_in_bucket) * (end - start) as u128) >> 64;
        let mut index = start + offset as usize;
        let record = key_at(index);
        if record & !FLAGS_MASK <= key {
            loop {
                let record = key_at(index);
                let record_key = record & !FLAGS_MASK;
                if record_key == key {
                    return (record & FLAGS_MASK) as u8;
                }
                index += 1;
                if record_key > key || index == end {
                    return 0;
                }
            }
        }
        while index > start {
            index -= 1;
            let record = key_at(index);
            let record_key = record & !FLAGS_MASK;
            if record_key == key {
                return (record & FLAGS_MASK) as u8;
            }
            if record_key < key {
                return 0;
            }
        }
        0
    }

    fn records(&self) -> impl Iterator<Item = u128> + '_ {
        self.image.bytes()[HEADER_SIZE_BYTES..]
            .chunks_exact(RECORD_SIZE_BYTES)
            .map(record_from_bytes)
    }

    /// Writes the table to `path` atomically: to a temporary file in the same
    /// directory, synced, renamed over `path`, and the directory synced.
    ///
    /// A reader that mapped the old file keeps its bytes, because the rename
    /// replaces the directory entry and never changes the old file.
    pub fn write(&self, path: &Path) -> Result<(), ListFileError> {
        write_atomically(path, self.image.bytes()).map_err(|error| ListFileError::Io {
            operation: error.operation,
            path: error.path,
            source: error.source,
        })
    }
}

/// Returns a zeroed buffer of `length_bytes` in an anonymous mapping advised
/// to use transparent huge pages, or `None` when the mapping fails.
///
/// Lookups touch random records across the whole table, so with 4 KiB pages
/// nearly every lookup also misses the TLB, which costs most under a
/// hypervisor's nested page tables. 2 MiB pages cut the page count by 512.
/// Where the kernel has huge pages disabled, the advice fails or is ignored
/// and the buffer works as before.
fn huge_page_buffer(length_bytes: usize) -> Option<memmap2::MmapMut> {
    if length_bytes == 0 {
        return None;
    }
    let mapping = memmap2::MmapMut::map_anon(length_bytes).ok()?;
    #[cfg(target_os = "linux")]
    let _ = mapping.advise(memmap2::Advice::HugePage);
    Some(mapping)
}

fn bucket_of(key: u128, bucket_bits: u32) -> usize {
    // A shift by 128 bits (no buckets) would overflow; every key is then in
    // bucket 0.
    key.checked_shr(128 - bucket_bits).unwrap_or(0) as usize
}

fn record_from_bytes(chunk: &[u8]) -> u128 {
    let mut bytes = [0u8; RECORD_SIZE_BYTES];
    bytes.copy_from_slice(chunk);
    u128::from_be_bytes(bytes)
}

fn read_u32(bytes: &[u8], offset: usize) -> u32 {
    let mut field = [0u8; 4];
    field.copy_from_slice(&bytes[offset..offset + 4]);
    u32::from_le_bytes(field)
}

fn read_u64(bytes: &[u8], offset: usize) -> u64 {
    let mut field = [0u8; 8];
    field.copy_from_slice(&bytes[offset..offset + 8]);
    u64::from_le_bytes(field)
}

/// Collects records from list files, imports and runtime changes, and
/// builds the next [`ListTable`].
///
/// The records stay sorted by key with one record per key, so merging a
/// sorted import costs one pass.
#[derive(Clone, Debug, Default)]
pub struct ListBuilder {
    records: Vec<u128>,
}

impl ListBuilder {
    pub fn new() -> ListBuilder {
        ListBuilder::default()
    }

    /// Starts from every record of `table`.
    pub fn from_table(table: &ListTable) -> ListBuilder {
        ListBuilder {
            records: table.records().collect(),
        }
    }

    /// Returns the number of addresses collected so far.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Adds imported entries. An address that is already present keeps its
    /// entries and gains the imported ones.
    pub fn add_imported(&mut self, imported: super::ImportedRecords) {
        let current = std::mem::take(&mut self.records);
        self.records = merge_sorted(current, imported.records);
    }

    /// Applies runtime changes in order, as the journal records them.
    pub fn apply(&mut self, changes: &[super::Change]) {
        let mut overlay = Overlay::default();
        for change in changes {
            let key = key_of(&change.hmac);
            let current = match overlay.get(&key) {
                Some(flags) => *flags,
                None => self.flags_of_key(key),
            };
            let flag = change.entry.flag();
            let next = match change.op {
                super::ChangeOp::Add => current | flag,
                super::ChangeOp::Remove => current & !flag,
            };
            overlay.insert(key, next);
        }
        self.set_flags(overlay.into_iter());
    }

    fn flags_of_key(&self, key: u128) -> u8 {
        match self
            .records
            .binary_search_by(|record| (record & !FLAGS_MASK).cmp(&key))
        {
            Ok(index) => (self.records[index] & FLAGS_MASK) as u8,
            Err(_) => 0,
        }
    }

    /// Replaces the flags of each key; flags of 0 remove the key.
    pub(crate) fn set_flags(&mut self, flags: impl Iterator<Item = (u128, u8)>) {
        let mut added = Vec::new();
        for (key, flags) in flags {
            let record = key | u128::from(flags);
            match self
                .records
                .binary_search_by(|existing| (existing & !FLAGS_MASK).cmp(&key))
            {
                Ok(index) => self.records[index] = record,
                Err(_) if flags != 0 => added.push(record),
                Err(_) => {}
            }
        }
        if !added.is_empty() {
            added.sort_unstable();
            let current = std::mem::take(&mut self.records);
            self.records = merge_sorted(current, added);
        }
        self.records.retain(|record| record & FLAGS_MASK != 0);
    }

    /// Builds the table under the site key that hashed its addresses.
    ///
    /// # Panics
    ///
    /// Panics with more than 2^32 - 1 addresses, because the bucket index
    /// stores positions as `u32`. Such a list would need 64 GiB of records.
    pub fn build(self, key: &SiteKey) -> ListTable {
        let record_count = self.records.len();
        assert!(
            record_count as u64 <= MAX_RECORDS,
            "list of {record_count} records exceeds the maximum of {MAX_RECORDS}"
        );
        let length_bytes = HEADER_SIZE_BYTES + record_count * RECORD_SIZE_BYTES;
        let image = match huge_page_buffer(length_bytes) {
            Some(mut mapping) => {
                encode_image(&mut mapping, &self.records, key);
                Image::Anonymous(mapping)
            }
            None => {
                let mut bytes = vec![0u8; length_bytes];
                encode_image(&mut bytes, &self.records, key);
                Image::Owned(bytes)
            }
        };
        ListTable::index(image, record_count)
    }
}

/// Writes the header and `records` into `image`, which is exactly
/// `HEADER_SIZE_BYTES + records.len() * RECORD_SIZE_BYTES` long.
fn encode_image(image: &mut [u8], records: &[u128], key: &SiteKey) {
    for (chunk, record) in image[HEADER_SIZE_BYTES..]
        .chunks_exact_mut(RECORD_SIZE_BYTES)
        .zip(records)
    {
        chunk.copy_from_slice(&record.to_be_bytes());
    }
    let records_crc = crc32c::crc32c(&image[HEADER_SIZE_BYTES..]);

    image[MAGIC_OFFSET..MAGIC_OFFSET + 8].copy_from_slice(&MAGIC);
    image[VERSION_OFFSET..VERSION_OFFSET + 4].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    image[RECORD_SIZE_OFFSET..RECORD_SIZE_OFFSET + 4]
        .copy_from_slice(&(RECORD_SIZE_BYTES as u32).to_le_bytes());
    image[COUNT_OFFSET..COUNT_OFFSET + 8].copy_from_slice(&(records.len() as u64).to_le_bytes());
    image[KEY_CHECK_OFFSET..KEY_CHECK_OFFSET + 8].copy_from_slice(&key.key_check());
    image[RECORDS_CRC_OFFSET..RECORDS_CRC_OFFSET + 4].copy_from_slice(&records_crc.to_le_bytes());
    let header_crc = crc32c::crc32c(&image[..HEADER_CRC_OFFSET]);
    image[HEADER_CRC_OFFSET..HEADER_CRC_OFFSET + 4].copy_from_slice(&header_crc.to_le_bytes());
}

/// Merges two sorted, key-unique record vectors. A key in both gets the
/// union of its flags.
pub(crate) fn merge_sorted(left: Vec<u128>, right: Vec<u128>) -> Vec<u128> {
    if left.is_empty() {
        return right;
    }
    if right.is_empty() {
        return left;
    }
    let mut merged = Vec::with_capacity(left.len() + right.len());
    let mut left = left.into_iter().peekable();
    let mut right = right.into_iter().peekable();
    loop {
        let next = match (left.peek(), right.peek()) {
            (Some(a), Some(b)) => {
                let (key_a, key_b) = (a & !FLAGS_MASK, b & !FLAGS_MASK);
                if key_a == key_b {
                    let union = a | b;
                    left.next();
                    right.next();
                    union
                } else if key_a < key_b {
                    left.next().unwrap_or_default()
                } else {
                    right.next().unwrap_or_default()
                }
            }
            (Some(_), None) => {
                merged.extend(left);
                break;
            }
            (None, Some(_)) => {
                merged.extend(right);
                break;
            }
            (None, None) => break,
        };
        merged.push(next);
    }
    merged
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// SplitMix64, so failures reproduce.
    fn next_random(state: &mut u64) -> u64 {
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn random_key(state: &mut u64) -> u128 {
        let high = u128::from(next_random(state)) << 64;
        (high | u128::from(next_random(state))) & !FLAGS_MASK
    }

    /// Builds a table from `keys` and checks every key and as many absent
    /// keys against a `HashMap`.
    fn check_against_map(keys: &[u128], absent: &[u128]) {
        let key = SiteKey::from_bytes(&[3; 32]);
        let expected: HashMap<u128, u8> = keys
            .iter()
            .enumerate()
            .map(|(index, key)| (*key, 1u8 << (index % 4)))
            .collect();
        let mut builder = ListBuilder::new();
        builder.set_flags(expected.iter().map(|(key, flags)| (*key, *flags)));
        let table = builder.build(&key);
        assert_eq!(table.len(), expected.len());
        for (stored, flags) in &expected {
            assert_eq!(table.flags_of_key(*stored), *flags, "{stored:#034x}");
        }
        for missing in absent {
            let flags = expected.get(missing).copied().unwrap_or(0);
            assert_eq!(table.flags_of_key(*missing), flags, "{missing:#034x}");
        }
    }

    #[test]
    fn lookup_matches_map_at_every_size() {
        let mut state = 1;
        for count in [0, 1, 2, 127, 128, 129, 1000, 100_000] {
            let keys: Vec<u128> = (0..count).map(|_| random_key(&mut state)).collect();
            let absent: Vec<u128> = (0..10_000).map(|_| random_key(&mut state)).collect();
            check_against_map(&keys, &absent);
        }
    }

    #[test]
    fn lookup_with_clustered_keys() {
        // Keys far from uniform put many records in one bucket and make the
        // interpolated start position wrong by many records.
        let mut state = 2;
        let mut keys: Vec<u128> = (0..5_000u128).map(|n| n << 8).collect();
        keys.extend((0..5_000u128).map(|n| (u128::MAX - (n << 8)) & !FLAGS_MASK));
        keys.extend((0..5_000).map(|_| random_key(&mut state) >> 40 << 8));
        let mut absent: Vec<u128> = (5_000..6_000u128).map(|n| n << 8).collect();
        absent.extend((0..10_000).map(|_| random_key(&mut state)));
        absent.extend(keys.iter().map(|key| key ^ 0x100));
        check_against_map(&keys, &absent);
    }

    #[test]
    fn lookup_keys_sharing_high_word() {
        // Keys that differ only in their low 64 bits sort next to each
        // other in one bucket.
        let mut state = 3;
        let mut keys = Vec::new();
        for _ in 0..2_000 {
            let high = random_key(&mut state) >> 64 << 64;
            for low in [0x100u128, 0x200, 0x5500, 0xffff_ff00] {
                keys.push(high | low);
            }
        }
        let mut absent: Vec<u128> = keys.iter().map(|key| key + 0x100).collect();
        absent.extend(keys.iter().map(|key| key.wrapping_sub(0x100) & !FLAGS_MASK));
        absent.retain(|key| !keys.contains(key));
        check_against_map(&keys, &absent);
    }

    #[test]
    fn lookup_at_table_edges() {
        // The smallest and largest keys sit at the ends of the first and
        // last buckets, where a scan must stop at the table's edge.
        let mut state = 4;
        let mut keys: Vec<u128> = (0..50_000).map(|_| random_key(&mut state)).collect();
        keys.extend([
            0x100,
            (u128::MAX >> 8) << 8,
            0x200,
            ((u128::MAX >> 8) - 1) << 8,
        ]);
        let absent = [0, 0x300, ((u128::MAX >> 8) - 2) << 8, 0x1_0000_0000];
        check_against_map(&keys, &absent);
    }

    #[test]
    fn merge_unites_flags() {
        let left = vec![0x100 | 1, 0x300 | 2];
        let right = vec![0x100 | 4, 0x200 | 8];
        assert_eq!(
            merge_sorted(left, right),
            vec![0x100 | 5, 0x200 | 8, 0x300 | 2]
        );
    }
}
