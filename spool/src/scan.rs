//! Walking a segment's bytes record by record, for recovery and inspection.
//!
//! A record that fails its checks is either a torn tail or damage in the
//! middle. To distinguish them, the scanner searches the following aligned
//! offsets for another valid record. If one exists, the bad bytes are
//! quarantined (or skipped, when all zero) and the scan resumes there. If none
//! does, the bad bytes are the tail of an interrupted write and may be zeroed.

use crate::format::{
    CheckedRecord, FormatError, RECORD_ALIGN, SEGMENT_HEADER_BYTES, SegmentHeader, UncheckedRecord,
};

/// The result of a segment scan, besides the valid records it reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentScan {
    pub header: Result<SegmentHeader, HeaderProblem>,
    /// The end of the last valid record: the offset where the next record
    /// would go.
    pub valid_end: u64,
    /// Damaged ranges followed by valid records: start offset and reason.
    pub quarantined: Vec<(u64, String)>,
    /// All-zero ranges followed by valid records: start and end offset. A
    /// power cut leaves these when the page cache wrote back a later page of
    /// unsynced appends but not an earlier one. The records after such a gap
    /// were never covered by a sync, because a sync covers the gap too.
    pub unwritten_gaps: Vec<(u64, u64)>,
    /// A damaged range with no valid record after it: start and end offset.
    pub torn_tail: Option<(u64, u64)>,
}

/// The reason a segment's header could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderProblem {
    /// The header bytes are all zero: the segment was created but nothing in
    /// it was ever synced.
    Blank,
    Invalid(FormatError),
}

/// Scans `bytes`, a whole segment file, calling `on_record` with each valid
/// record's offset in order.
pub fn scan_segment(
    bytes: &[u8],
    mut on_record: impl FnMut(u64, CheckedRecord<'_>),
) -> SegmentScan {
    let header = match SegmentHeader::decode(bytes) {
        Ok(header) => Ok(header),
        Err(_)
            if bytes.len() >= SEGMENT_HEADER_BYTES
                && bytes[..SEGMENT_HEADER_BYTES].iter().all(|&b| b == 0) =>
        {
            Err(HeaderProblem::Blank)
        }
        Err(error) => Err(HeaderProblem::Invalid(error)),
    };
    let mut scan = SegmentScan {
        header,
        valid_end: SEGMENT_HEADER_BYTES as u64,
        quarantined: Vec::new(),
        unwritten_gaps: Vec::new(),
        torn_tail: None,
    };
    if scan.header.is_err() {
        return scan;
    }

    // Bytes past the last non-zero byte were never written, because segments
    // are zero-filled at creation and only appended to.
    let data_end = bytes
        .iter()
        .rposition(|&b| b != 0)
        .map_or(0, |last| last + 1);
    let mut offset = SEGMENT_HEADER_BYTES;
    while offset < data_end {
        match UncheckedRecord(&bytes[offset..]).check() {
            Ok(record) => {
                let length = record.header.length_bytes as usize;
                on_record(offset as u64, record);
                offset += length;
                scan.valid_end = offset as u64;
            }
            Err(error) => match find_next_record(bytes, offset + RECORD_ALIGN, data_end) {
                Some(next) => {
                    if bytes[offset..next].iter().all(|&b| b == 0) {
                        scan.unwritten_gaps.push((offset as u64, next as u64));
                    } else {
                        scan.quarantined.push((offset as u64, error.to_string()));
                    }
                    offset = next;
                }
                None => {
                    scan.torn_tail = Some((offset as u64, data_end as u64));
                    break;
                }
            },
        }
    }
    scan
}

/// Returns the first aligned offset in `from..end` where a valid record starts.
fn find_next_record(bytes: &[u8], from: usize, end: usize) -> Option<usize> {
    let mut offset = from.next_multiple_of(RECORD_ALIGN);
    while offset < end {
        let candidate = UncheckedRecord(&bytes[offset..]);
        if candidate.has_magic() && candidate.check().is_ok() {
            return Some(offset);
        }
        offset += RECORD_ALIGN;
    }
    None
}
