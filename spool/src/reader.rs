//! Reading committed message records of any shard from any core.
//!
//! A delivery core gets a [`RecordRef`] from the owning core over a queue and
//! reads the body through its own read-only mapping of the owner's segment
//! file, without copying the message into the queue. This is sound because
//! committed records are immutable: the owner only writes above the records it
//! has handed out, and the queue orders the owner's write before this read. A
//! segment file is only unlinked, never truncated, so a mapping stays valid
//! even after the owner deletes the file.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use crate::error::ReadError;
use crate::format::{
    OpenError, RECORD_HEADER_BYTES, RECORD_LENGTH_OFFSET, SEGMENT_HEADER_BYTES, UncheckedRecord,
    decode_message,
};
use crate::storage::{FileSegment, FileStorage, Segment};
use crate::{Keyring, RecordRef, StoredMessage};

/// The number of segment mappings a reader keeps before it drops them all.
/// Each mapping costs address space and a file descriptor, not memory.
pub const MAX_CACHED_SEGMENTS: usize = 256;

/// A per-core reader of committed message records in one spool directory.
pub struct SpoolReader {
    dir: PathBuf,
    keyring: RefCell<Option<Arc<Keyring>>>,
    segments: RefCell<HashMap<(u16, u32), Rc<FileSegment>>>,
}

impl SpoolReader {
    pub fn new(dir: &Path, keyring: Option<Arc<Keyring>>) -> SpoolReader {
        SpoolReader {
            dir: dir.to_owned(),
            keyring: RefCell::new(keyring),
            segments: RefCell::new(HashMap::new()),
        }
    }

    /// Replaces the keyring after a key rotation, before any shard seals
    /// records with the new key.
    pub fn set_keyring(&self, keyring: Option<Arc<Keyring>>) {
        *self.keyring.borrow_mut() = keyring;
    }

    /// Reads and decrypts the message record at `record` of `shard`. The
    /// record must have been returned by that shard's `append_message`, and
    /// the message must not have been released.
    pub fn read_message(&self, shard: u16, record: RecordRef) -> Result<StoredMessage, ReadError> {
        let segment = self.segment(shard, record.segment)?;
        let invalid = |reason: String| ReadError::Invalid { record, reason };

        // Copy the length field first and slice exactly the record, so no
        // slice ever covers bytes the owner may be appending concurrently.
        let header_end = record.offset.checked_add(RECORD_HEADER_BYTES as u64);
        if record.offset < SEGMENT_HEADER_BYTES as u64
            || header_end.is_none_or(|end| end > segment.len_bytes())
        {
            return Err(invalid("offset is outside the segment".into()));
        }
        let length_bytes = segment.read(record.offset, RECORD_HEADER_BYTES as u64, |header| {
            let mut field = [0u8; 4];
            field.copy_from_slice(&header[RECORD_LENGTH_OFFSET..RECORD_LENGTH_OFFSET + 4]);
            u64::from(u32::from_le_bytes(field))
        });
        if length_bytes < RECORD_HEADER_BYTES as u64
            || record.offset + length_bytes > segment.len_bytes()
        {
            return Err(invalid(format!("invalid record length {length_bytes}")));
        }

        segment.read(record.offset, length_bytes, |bytes| {
            let checked = UncheckedRecord(bytes)
                .check()
                .map_err(|error| invalid(error.to_string()))?;
            if !checked.header.kind.holds_message() {
                return Err(ReadError::NotMessage { record });
            }
            let plain =
                checked
                    .open(self.keyring.borrow().as_deref())
                    .map_err(|error| match error {
                        OpenError::NoKeyring => ReadError::NoKeyring { record },
                        OpenError::MissingKey(key_id) => ReadError::MissingKey { record, key_id },
                        OpenError::Unauthentic => ReadError::Unauthentic { record },
                        OpenError::Invalid(reason) => invalid(reason),
                    })?;
            let (envelope, body) = decode_message(&checked.header, &plain).map_err(invalid)?;
            Ok(StoredMessage { envelope, body })
        })
    }

    /// Drops the cached mapping of a segment, for example after its owner
    /// deleted it.
    pub fn forget_segment(&self, shard: u16, segment: u32) {
        self.segments.borrow_mut().remove(&(shard, segment));
    }

    fn segment(&self, shard: u16, segment: u32) -> Result<Rc<FileSegment>, ReadError> {
        if let Some(mapped) = self.segments.borrow().get(&(shard, segment)) {
            return Ok(mapped.clone());
        }
        let mapped = FileStorage::new(&self.dir, shard)
            .open_read_only(segment)
            .map_err(|error| {
                tracing::warn!(shard, segment, %error, "spool reader: mapping a segment failed");
                ReadError::NoSegment { segment }
            })?;
        let mapped = Rc::new(mapped);
        let mut segments = self.segments.borrow_mut();
        if segments.len() >= MAX_CACHED_SEGMENTS {
            segments.clear();
        }
        segments.insert((shard, segment), mapped.clone());
        Ok(mapped)
    }
}
