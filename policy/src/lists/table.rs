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
use crate::file_io::write_atomically_with;
use crate::huge_pages::huge_page_buffer;
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

/// The memory that contains a table's probe lines.
enum Storage {
    Owned(Vec<u8>),
    /// An anonymous mapping advised to use transparent huge pages.
    Anonymous(memmap2::MmapMut),
}

impl Storage {
    /// Returns `length_bytes` of zeros, in huge pages where the kernel
    /// grants them.
    fn zeroed(length_bytes: usize) -> Storage {
        match huge_page_buffer(length_bytes) {
            Some(mapping) => Storage::Anonymous(mapping),
            None => Storage::Owned(vec![0u8; length_bytes]),
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Owned(bytes) => bytes,
            Storage::Anonymous(mapping) => mapping,
        }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            Storage::Owned(bytes) => bytes,
            Storage::Anonymous(mapping) => mapping,
        }
    }
}

/// Records per probe line: four 16-byte records fill one 64-byte cache line.
const RECORDS_PER_LINE: usize = 4;
const LINE_SIZE_BYTES: usize = RECORDS_PER_LINE * RECORD_SIZE_BYTES;
/// Home lines per 100 records. At 42, about 0.6 of the positions are in
/// use. About 8 % of lookups then read a second line, always the next one.
/// That is an estimate from a simulation with 10^7 uniform keys, where
/// half of the lookups were for absent keys.
const HOME_LINES_PER_100_RECORDS: usize = 42;
/// A bit of a line's last record, in memory only, set when the next line
/// starts with a record whose home line is this one or an earlier one.
/// Without it, a lookup that passes the line's end stops there.
const CONTINUES_FLAG: u128 = 0x80;
const _: () = assert!(CONTINUES_FLAG as u8 & KNOWN_FLAGS == 0);

/// The compiled base of both lists, laid out so that a lookup usually
/// reads one cache line.
///
/// Keys are spread over `home_line_count` lines by their top 64 bits:
/// [`home_line`] scales them to a line number, which keeps key order.
/// Records are stored in key order, each at the first free position at or
/// after the start of its home line, so most records sit in their home
/// line, and empty positions separate the runs. A lookup reads the key's
/// home line and stops at the first empty position, at the first larger
/// key, or at a line end without [`CONTINUES_FLAG`]. The table allocates
/// nothing and takes no locks on lookup.
///
/// HMAC keys are uniform, so runs stay short. Keys chosen to share top
/// bits would make long runs, but choosing them needs the site key.
pub struct ListTable {
    lines: Storage,
    home_line_count: usize,
    record_count: usize,
    /// The site key check of the file header, kept for [`ListTable::write`].
    key_check: [u8; 8],
}

impl std::fmt::Debug for ListTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListTable")
            .field("record_count", &self.record_count)
            .field("home_line_count", &self.home_line_count)
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
    /// site key, sort order and flags. The records are then copied into
    /// the probe lines and the file's bytes are freed, so opening needs
    /// both in memory for a moment. Restarting this way costs one read of
    /// 16 bytes per address and no hashing.
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
        let mut bytes = Vec::with_capacity(usize::try_from(length_bytes).unwrap_or(0));
        file.read_to_end(&mut bytes).map_err(io_error("read"))?;
        ListTable::from_bytes(&bytes, key, &path.display().to_string())
    }

    /// Validates a list file image that the caller holds, such as a
    /// read-only memory mapping of a file written by [`ListTable::write`],
    /// and copies its records into a new table. The table keeps no
    /// reference to `image`.
    pub fn from_image(
        image: Arc<dyn AsRef<[u8]> + Send + Sync>,
        key: &SiteKey,
        origin: &str,
    ) -> Result<ListTable, ListFileError> {
        ListTable::from_bytes((*image).as_ref(), key, origin)
    }

    fn from_bytes(bytes: &[u8], key: &SiteKey, origin: &str) -> Result<ListTable, ListFileError> {
        let invalid = |problem: String| ListFileError::Invalid {
            origin: origin.to_string(),
            problem,
        };

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
        let expected_length = usize::try_from(record_count)
            .ok()
            .and_then(|count| count.checked_mul(RECORD_SIZE_BYTES))
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
        Ok(ListTable::lay_out(
            records
                .chunks_exact(RECORD_SIZE_BYTES)
                .map(record_from_bytes),
            key_check,
        ))
    }

    /// Places validated records (sorted, keys unique, flags non-zero) into
    /// probe lines, as the type's documentation describes.
    fn lay_out(
        records: impl ExactSizeIterator<Item = u128> + Clone,
        key_check: [u8; 8],
    ) -> ListTable {
        let record_count = records.len();
        let home_line_count = record_count
            .saturating_mul(HOME_LINES_PER_100_RECORDS)
            .div_ceil(100)
            .max(1);

        // The first pass finds where the last record lands, which may be
        // past the last home line.
        let mut next_position = 0;
        for record in records.clone() {
            let home = home_line(record, home_line_count) * RECORDS_PER_LINE;
            next_position = next_position.max(home) + 1;
        }
        let line_count = home_line_count.max(next_position.div_ceil(RECORDS_PER_LINE));

        let mut lines = Storage::zeroed(line_count * LINE_SIZE_BYTES);
        let bytes = lines.bytes_mut();
        let mut next_position = 0;
        for record in records {
            let home = home_line(record, home_line_count) * RECORDS_PER_LINE;
            let position = next_position.max(home);
            if position > home && position.is_multiple_of(RECORDS_PER_LINE) {
                // The record was pushed out of its home line into this one,
                // so the full line before must tell lookups to go on.
                let last = position - 1;
                let flagged = read_record(bytes, last) | CONTINUES_FLAG;
                write_record(bytes, last, flagged);
            }
            write_record(bytes, position, record);
            next_position = position + 1;
        }
        ListTable {
            lines,
            home_line_count,
            record_count,
            key_check,
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
        self.search(key).0
    }

    /// Returns the flags of `key` (0 when absent) and the last position
    /// the search read.
    #[inline]
    fn search(&self, key: u128) -> (u8, usize) {
        let bytes = self.lines.bytes();
        let mut position = home_line(key, self.home_line_count) * RECORDS_PER_LINE;
        loop {
            let record = read_record(bytes, position);
            let record_key = record & !FLAGS_MASK;
            if record_key == key && record != 0 {
                return (record as u8 & KNOWN_FLAGS, position);
            }
            // An empty position has key 0 and ends the search too.
            if record_key > key || record == 0 {
                return (0, position);
            }
            if (position + 1).is_multiple_of(RECORDS_PER_LINE) && record & CONTINUES_FLAG == 0 {
                return (0, position);
            }
            position += 1;
        }
    }

    /// Returns every record in key order, with only the flags of the file.
    fn records(&self) -> impl Iterator<Item = u128> + '_ {
        self.lines
            .bytes()
            .chunks_exact(RECORD_SIZE_BYTES)
            .map(record_from_memory)
            .filter(|record| *record != 0)
            .map(|record| record & !CONTINUES_FLAG)
    }

    /// Writes the table to `path` atomically: to a temporary file in the same
    /// directory, synced, renamed over `path`, and the directory synced.
    ///
    /// A reader that mapped the old file keeps its bytes, because the rename
    /// replaces the directory entry and never changes the old file.
    ///
    /// The records are encoded twice, first for the checksum that the
    /// header carries, so that no copy of the whole file is held in memory.
    pub fn write(&self, path: &Path) -> Result<(), ListFileError> {
        let mut records_crc = 0;
        encode_records(self.records(), |chunk| {
            records_crc = crc32c::crc32c_append(records_crc, chunk);
            Ok(())
        })
        .expect("computing a checksum cannot fail");
        let header = encode_header(self.record_count as u64, self.key_check, records_crc);
        let write = |file: &mut dyn std::io::Write| {
            file.write_all(&header)?;
            encode_records(self.records(), |chunk| file.write_all(chunk))
        };
        write_atomically_with(path, write).map_err(|error| ListFileError::Io {
            operation: error.operation,
            path: error.path,
            source: error.source,
        })
    }
}

/// Returns the home line of `key` among `home_line_count` lines: its top 64
/// bits scaled to the line count, so that larger keys never get earlier
/// lines.
fn home_line(key: u128, home_line_count: usize) -> usize {
    (((key >> 64) * home_line_count as u128) >> 64) as usize
}

/// Reads a record of the file format, which stores it big-endian.
fn record_from_bytes(chunk: &[u8]) -> u128 {
    let mut bytes = [0u8; RECORD_SIZE_BYTES];
    bytes.copy_from_slice(chunk);
    u128::from_be_bytes(bytes)
}

/// Reads a record of the probe lines, which store it in little-endian
/// order so that a lookup loads it without swapping bytes.
fn record_from_memory(chunk: &[u8]) -> u128 {
    let mut bytes = [0u8; RECORD_SIZE_BYTES];
    bytes.copy_from_slice(chunk);
    u128::from_le_bytes(bytes)
}

fn read_record(lines: &[u8], position: usize) -> u128 {
    let offset = position * RECORD_SIZE_BYTES;
    record_from_memory(&lines[offset..offset + RECORD_SIZE_BYTES])
}

fn write_record(lines: &mut [u8], position: usize, record: u128) {
    let offset = position * RECORD_SIZE_BYTES;
    lines[offset..offset + RECORD_SIZE_BYTES].copy_from_slice(&record.to_le_bytes());
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
    pub fn build(self, key: &SiteKey) -> ListTable {
        ListTable::lay_out(self.records.iter().copied(), key.key_check())
    }
}

/// Encodes `records` in the file format, in chunks of up to 64 KiB, and
/// passes each chunk to `consume`.
fn encode_records(
    records: impl Iterator<Item = u128>,
    mut consume: impl FnMut(&[u8]) -> io::Result<()>,
) -> io::Result<()> {
    const CHUNK_RECORDS: usize = 4096;
    let mut chunk = Vec::with_capacity(CHUNK_RECORDS * RECORD_SIZE_BYTES);
    for record in records {
        chunk.extend_from_slice(&record.to_be_bytes());
        if chunk.len() == CHUNK_RECORDS * RECORD_SIZE_BYTES {
            consume(&chunk)?;
            chunk.clear();
        }
    }
    if !chunk.is_empty() {
        consume(&chunk)?;
    }
    Ok(())
}

/// Returns the file header for `record_count` records whose encoded bytes
/// have the CRC-32C `records_crc`.
fn encode_header(
    record_count: u64,
    key_check: [u8; 8],
    records_crc: u32,
) -> [u8; HEADER_SIZE_BYTES] {
    let mut header = [0u8; HEADER_SIZE_BYTES];
    header[MAGIC_OFFSET..MAGIC_OFFSET + 8].copy_from_slice(&MAGIC);
    header[VERSION_OFFSET..VERSION_OFFSET + 4].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[RECORD_SIZE_OFFSET..RECORD_SIZE_OFFSET + 4]
        .copy_from_slice(&(RECORD_SIZE_BYTES as u32).to_le_bytes());
    header[COUNT_OFFSET..COUNT_OFFSET + 8].copy_from_slice(&record_count.to_le_bytes());
    header[KEY_CHECK_OFFSET..KEY_CHECK_OFFSET + 8].copy_from_slice(&key_check);
    header[RECORDS_CRC_OFFSET..RECORDS_CRC_OFFSET + 4].copy_from_slice(&records_crc.to_le_bytes());
    let header_crc = crc32c::crc32c(&header[..HEADER_CRC_OFFSET]);
    header[HEADER_CRC_OFFSET..HEADER_CRC_OFFSET + 4].copy_from_slice(&header_crc.to_le_bytes());
    header
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
        // Keys far from uniform share home lines, so their runs cross many
        // line ends.
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
        // Keys that differ only in their low 64 bits share a home line.
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
        // The smallest and largest keys sit in the first and last home
        // lines, and the largest are pushed past the last home line.
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
    fn most_lookups_read_one_line() {
        let key = SiteKey::from_bytes(&[3; 32]);
        let mut state = 5;
        let mut builder = ListBuilder::new();
        builder.set_flags((0..100_000).map(|_| (random_key(&mut state), 1)));
        let table = builder.build(&key);
        let stored: Vec<u128> = stored_keys(&table);
        let absent: Vec<u128> = (0..100_000).map(|_| random_key(&mut state)).collect();
        let beyond_home_line = stored
            .iter()
            .chain(&absent)
            .filter(|probe| {
                let home = home_line(**probe, table.home_line_count);
                table.search(**probe).1 / RECORDS_PER_LINE != home
            })
            .count();
        // A simulation gives about 8 %, and 10 % leaves room for this
        // sample's spread.
        assert!(
            beyond_home_line < 20_000,
            "{beyond_home_line} of 200000 lookups read past the home line"
        );
    }

    fn stored_keys(table: &ListTable) -> Vec<u128> {
        table.records().map(|record| record & !FLAGS_MASK).collect()
    }

    #[test]
    fn continues_flag_stays_in_memory() {
        // Clustered keys make runs that set the flag on many lines. The
        // written file must carry only the stored flags, or opening it
        // would reject the records.
        let key = SiteKey::from_bytes(&[3; 32]);
        let mut builder = ListBuilder::new();
        builder.set_flags((1..2_000u128).map(|n| (n << 8, (n % 15) as u8 + 1)));
        let expected = builder.records.clone();
        let table = builder.build(&key);
        assert!(
            table
                .lines
                .bytes()
                .chunks_exact(RECORD_SIZE_BYTES)
                .any(|chunk| record_from_memory(chunk) & CONTINUES_FLAG != 0)
        );
        assert_eq!(table.records().collect::<Vec<_>>(), expected);

        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("lists.bin");
        table.write(&path).unwrap();
        let loaded = ListTable::open(&path, &key).unwrap();
        assert_eq!(loaded.records().collect::<Vec<_>>(), expected);
        for record in expected {
            assert_eq!(
                loaded.flags_of_key(record & !FLAGS_MASK),
                record as u8 & KNOWN_FLAGS
            );
        }
    }

    #[test]
    fn write_streams_every_record() {
        // 10,000 records make two full chunks of 4,096 and a partial one.
        let key = SiteKey::from_bytes(&[3; 32]);
        let mut state = 6;
        let mut builder = ListBuilder::new();
        builder.set_flags((0..10_000).map(|_| (random_key(&mut state), 4)));
        let expected = builder.records.clone();
        let table = builder.build(&key);
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("lists.bin");
        table.write(&path).unwrap();

        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), HEADER_SIZE_BYTES + 10_000 * RECORD_SIZE_BYTES);
        assert_eq!(read_u64(&bytes, COUNT_OFFSET), 10_000);
        let written: Vec<u128> = bytes[HEADER_SIZE_BYTES..]
            .chunks_exact(RECORD_SIZE_BYTES)
            .map(record_from_bytes)
            .collect();
        assert_eq!(written, expected);
        assert_eq!(ListTable::open(&path, &key).unwrap().len(), 10_000);
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
