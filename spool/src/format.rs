//! The on-disk format: segment headers and records.
//!
//! All integers are little-endian and fixed-width; nothing on disk depends on
//! the platform's `usize`. Every record starts at a multiple of
//! [`RECORD_ALIGN`] so the rkyv archive inside it is aligned for validated
//! access (rkyv 0.8 rejects misaligned archives).
//!
//! Segment file header, at offset 0 of every segment file:
//!
//! | offset | size | field                                   |
//! |-------:|-----:|-----------------------------------------|
//! |      0 |    4 | magic `CDSG`                            |
//! |      4 |    2 | format version                          |
//! |      6 |    2 | shard number                            |
//! |      8 |    4 | segment id                              |
//! |     12 |    4 | reserved, zero                          |
//! |     16 |    8 | segment size in bytes                   |
//! |     24 |    8 | creation time, unix microseconds        |
//! |     32 |   28 | reserved, zero                          |
//! |     60 |    4 | CRC32C of bytes 0..60                   |
//!
//! Record header, at a 16-byte aligned offset at or after byte 64:
//!
//! | offset | size | field                                                  |
//! |-------:|-----:|--------------------------------------------------------|
//! |      0 |    4 | magic `CDSR`                                           |
//! |      4 |    2 | format version                                         |
//! |      6 |    1 | kind: 1 message, 2 outcome, 3 relocated message        |
//! |      7 |    1 | reserved, zero                                         |
//! |      8 |    4 | total record length in bytes, a multiple of 16         |
//! |     12 |    4 | CRC32C of the whole record with this field as zero    |
//! |     16 |    4 | key id; 0 means the payload is not encrypted           |
//! |     20 |   12 | AES-GCM nonce; zero when not encrypted                 |
//! |     32 |    1 | lane (`caduceus_policy::Lane` discriminant)            |
//! |     33 |    1 | category (`caduceus_policy::Category` discriminant)    |
//! |     34 |    2 | reserved, zero                                         |
//! |     36 |    4 | recipient count                                        |
//! |     40 |    8 | received at, unix microseconds                         |
//! |     48 |    8 | expires at, unix microseconds                          |
//! |     56 |    4 | payload length in bytes (with the 16-byte tag if sealed)|
//! |     60 |    4 | reserved, zero                                         |
//! |     64 |    n | payload, then zero padding to the total length         |
//!
//! Bytes 0..64 with the CRC field zeroed are the AEAD's associated data, so
//! the clear metadata cannot be altered without failing authentication.
//! Outcome records carry zero in the lane through expiry fields.
//!
//! Message payload (plaintext, before sealing):
//!
//! | offset | size | field                                   |
//! |-------:|-----:|-----------------------------------------|
//! |      0 |    4 | envelope archive length in bytes (`a`)  |
//! |      4 |    4 | body length in bytes                    |
//! |      8 |    8 | reserved, zero                          |
//! |     16 |    a | rkyv archive of [`DiskEnvelope`]        |
//! | 16 + a |    b | message body                            |
//!
//! Relocated message payload (plaintext, before sealing), written by
//! compaction. It carries the whole envelope, the body and every recipient's
//! state at the time of the copy, so recovery needs no older record to
//! rebuild the message:
//!
//! | offset | size | field                                          |
//! |-------:|-----:|------------------------------------------------|
//! |      0 |    4 | envelope archive length in bytes (`a`)         |
//! |      4 |    4 | body length in bytes (`b`)                     |
//! |      8 |    4 | previous copy's segment id                     |
//! |     12 |    4 | reserved, zero                                 |
//! |     16 |    8 | previous copy's offset                         |
//! |     24 |    8 | reserved, zero                                 |
//! |     32 |    a | rkyv archive of [`DiskEnvelope`]               |
//! | 32 + a |    b | message body                                   |
//! | 32+a+b | 16 n | one state entry per recipient, in order        |
//!
//! State entry, `n` being the header's recipient count:
//!
//! | offset | size | field                                             |
//! |-------:|-----:|---------------------------------------------------|
//! |      0 |    8 | next attempt, unix microseconds (pending only)    |
//! |      8 |    4 | attempts made so far (pending only)               |
//! |     12 |    1 | state: 1 pending, 2 delivered, 3 bounced, 4 expired, 5 deleted |
//! |     13 |    3 | reserved, zero                                    |
//!
//! Outcome payload (plaintext, before sealing):
//!
//! | offset | size | field                                            |
//! |-------:|-----:|--------------------------------------------------|
//! |      0 |    4 | message record's segment id                      |
//! |      4 |    4 | recipient index                                  |
//! |      8 |    8 | message record's offset                          |
//! |     16 |    8 | next attempt, unix microseconds (deferred only)  |
//! |     24 |    4 | attempts made so far                             |
//! |     28 |    1 | outcome: 1 deferred, 2 delivered, 3 bounced, 4 expired, 5 deleted |
//! |     29 |    3 | reserved, zero                                   |
//!
//! Code 5 (deleted by an operator) is newer than the other codes. Binaries
//! from before it treat such a record as damaged and quarantine it.

use std::ops::Range;

use caduceus_policy::{Category, Lane};
use ring::aead::{Aad, LessSafeKey, NONCE_LEN, Nonce, Tag};
use rkyv::util::AlignedVec;

use crate::{Envelope, Keyring, MessageId, Outcome, Recipient, RecipientState, RecordRef, Ret};

/// The current format version of segment headers and records.
pub const FORMAT_VERSION: u16 = 1;

pub const SEGMENT_MAGIC: [u8; 4] = *b"CDSG";
pub const SEGMENT_VERSION_OFFSET: usize = SEGMENT_MAGIC.len();
pub const SEGMENT_SHARD_OFFSET: usize = SEGMENT_VERSION_OFFSET + 2;
pub const SEGMENT_ID_OFFSET: usize = SEGMENT_SHARD_OFFSET + 2;
pub const SEGMENT_RESERVED_OFFSET: usize = SEGMENT_ID_OFFSET + 4;
pub const SEGMENT_SIZE_OFFSET: usize = SEGMENT_RESERVED_OFFSET + 4;
pub const SEGMENT_CREATED_OFFSET: usize = SEGMENT_SIZE_OFFSET + 8;
pub const SEGMENT_RESERVED2_OFFSET: usize = SEGMENT_CREATED_OFFSET + 8;
pub const SEGMENT_CRC_OFFSET: usize = SEGMENT_RESERVED2_OFFSET + 28;
pub const SEGMENT_HEADER_BYTES: usize = SEGMENT_CRC_OFFSET + 4;

pub const RECORD_MAGIC: [u8; 4] = *b"CDSR";
pub const RECORD_VERSION_OFFSET: usize = RECORD_MAGIC.len();
pub const RECORD_KIND_OFFSET: usize = RECORD_VERSION_OFFSET + 2;
pub const RECORD_FLAGS_OFFSET: usize = RECORD_KIND_OFFSET + 1;
pub const RECORD_LENGTH_OFFSET: usize = RECORD_FLAGS_OFFSET + 1;
pub const RECORD_CRC_OFFSET: usize = RECORD_LENGTH_OFFSET + 4;
pub const RECORD_KEY_ID_OFFSET: usize = RECORD_CRC_OFFSET + 4;
pub const RECORD_NONCE_OFFSET: usize = RECORD_KEY_ID_OFFSET + 4;
pub const RECORD_LANE_OFFSET: usize = RECORD_NONCE_OFFSET + NONCE_LEN;
pub const RECORD_CATEGORY_OFFSET: usize = RECORD_LANE_OFFSET + 1;
pub const RECORD_RESERVED_OFFSET: usize = RECORD_CATEGORY_OFFSET + 1;
pub const RECORD_RECIPIENTS_OFFSET: usize = RECORD_RESERVED_OFFSET + 2;
pub const RECORD_RECEIVED_OFFSET: usize = RECORD_RECIPIENTS_OFFSET + 4;
pub const RECORD_EXPIRES_OFFSET: usize = RECORD_RECEIVED_OFFSET + 8;
pub const RECORD_PAYLOAD_LENGTH_OFFSET: usize = RECORD_EXPIRES_OFFSET + 8;
pub const RECORD_RESERVED2_OFFSET: usize = RECORD_PAYLOAD_LENGTH_OFFSET + 4;
pub const RECORD_HEADER_BYTES: usize = RECORD_RESERVED2_OFFSET + 4;

/// Records start at multiples of this, which is rkyv's default alignment
/// for `AlignedVec` and covers every archived field type.
pub const RECORD_ALIGN: usize = 16;

pub const MESSAGE_ARCHIVE_LENGTH_OFFSET: usize = 0;
pub const MESSAGE_BODY_LENGTH_OFFSET: usize = MESSAGE_ARCHIVE_LENGTH_OFFSET + 4;
pub const MESSAGE_RESERVED_OFFSET: usize = MESSAGE_BODY_LENGTH_OFFSET + 4;
pub const MESSAGE_ARCHIVE_OFFSET: usize = MESSAGE_RESERVED_OFFSET + 8;

pub const RELOCATED_ARCHIVE_LENGTH_OFFSET: usize = 0;
pub const RELOCATED_BODY_LENGTH_OFFSET: usize = RELOCATED_ARCHIVE_LENGTH_OFFSET + 4;
pub const RELOCATED_PREVIOUS_SEGMENT_OFFSET: usize = RELOCATED_BODY_LENGTH_OFFSET + 4;
pub const RELOCATED_RESERVED_OFFSET: usize = RELOCATED_PREVIOUS_SEGMENT_OFFSET + 4;
pub const RELOCATED_PREVIOUS_OFFSET_OFFSET: usize = RELOCATED_RESERVED_OFFSET + 4;
pub const RELOCATED_RESERVED2_OFFSET: usize = RELOCATED_PREVIOUS_OFFSET_OFFSET + 8;
pub const RELOCATED_ARCHIVE_OFFSET: usize = RELOCATED_RESERVED2_OFFSET + 8;

pub const STATE_NEXT_ATTEMPT_OFFSET: usize = 0;
pub const STATE_ATTEMPTS_OFFSET: usize = STATE_NEXT_ATTEMPT_OFFSET + 8;
pub const STATE_KIND_OFFSET: usize = STATE_ATTEMPTS_OFFSET + 4;
pub const STATE_RESERVED_OFFSET: usize = STATE_KIND_OFFSET + 1;
pub const STATE_ENTRY_BYTES: usize = STATE_RESERVED_OFFSET + 3;

pub const OUTCOME_SEGMENT_OFFSET: usize = 0;
pub const OUTCOME_RECIPIENT_OFFSET: usize = OUTCOME_SEGMENT_OFFSET + 4;
pub const OUTCOME_MESSAGE_OFFSET: usize = OUTCOME_RECIPIENT_OFFSET + 4;
pub const OUTCOME_NEXT_ATTEMPT_OFFSET: usize = OUTCOME_MESSAGE_OFFSET + 8;
pub const OUTCOME_ATTEMPTS_OFFSET: usize = OUTCOME_NEXT_ATTEMPT_OFFSET + 8;
pub const OUTCOME_KIND_OFFSET: usize = OUTCOME_ATTEMPTS_OFFSET + 4;
pub const OUTCOME_RESERVED_OFFSET: usize = OUTCOME_KIND_OFFSET + 1;
pub const OUTCOME_PAYLOAD_BYTES: usize = OUTCOME_RESERVED_OFFSET + 3;

/// The AES-GCM tag appended to a sealed payload.
pub const TAG_BYTES: usize = 16;

const _: () = assert!(SEGMENT_HEADER_BYTES == 64);
const _: () = assert!(RECORD_HEADER_BYTES == 64);
const _: () = assert!(RECORD_HEADER_BYTES.is_multiple_of(RECORD_ALIGN));
const _: () = assert!(SEGMENT_HEADER_BYTES.is_multiple_of(RECORD_ALIGN));
const _: () = assert!(MESSAGE_ARCHIVE_OFFSET.is_multiple_of(RECORD_ALIGN));
const _: () = assert!(OUTCOME_PAYLOAD_BYTES == 32);
const _: () = assert!(RELOCATED_ARCHIVE_OFFSET == 32);
const _: () = assert!(RELOCATED_ARCHIVE_OFFSET.is_multiple_of(RECORD_ALIGN));
const _: () = assert!(STATE_ENTRY_BYTES == 16);
// The decoder reads both lengths at the same offsets for either layout.
const _: () = assert!(RELOCATED_ARCHIVE_LENGTH_OFFSET == MESSAGE_ARCHIVE_LENGTH_OFFSET);
const _: () = assert!(RELOCATED_BODY_LENGTH_OFFSET == MESSAGE_BODY_LENGTH_OFFSET);

/// The size of an outcome record sealed with AES-GCM: header, payload and
/// tag. A clear outcome record is 16 bytes shorter.
pub const SEALED_OUTCOME_RECORD_BYTES: u64 =
    (RECORD_HEADER_BYTES + OUTCOME_PAYLOAD_BYTES + TAG_BYTES) as u64;

/// The record kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    Message = 1,
    Outcome = 2,
    /// A message copied forward by compaction, with its recipients' states.
    Relocated = 3,
}

impl RecordKind {
    fn from_u8(value: u8) -> Option<RecordKind> {
        match value {
            1 => Some(RecordKind::Message),
            2 => Some(RecordKind::Outcome),
            3 => Some(RecordKind::Relocated),
            _ => None,
        }
    }

    /// Returns true for the kinds that contain a message's envelope and body.
    pub fn holds_message(self) -> bool {
        matches!(self, RecordKind::Message | RecordKind::Relocated)
    }
}

/// The reason bytes are not a valid record or segment header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("only {available} bytes left, a record header needs {RECORD_HEADER_BYTES}")]
    Truncated { available: u64 },
    #[error("bad magic")]
    BadMagic,
    #[error("unsupported format version {0}")]
    BadVersion(u16),
    #[error("unknown record kind {0}")]
    BadKind(u8),
    #[error("invalid record length {length_bytes} with {available} bytes left")]
    BadLength { length_bytes: u32, available: u64 },
    #[error("CRC32C mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BadCrc { stored: u32, computed: u32 },
    #[error("invalid payload: {0}")]
    BadPayload(String),
}

fn read_u16(bytes: &[u8], offset: usize) -> u16 {
    u16::from_le_bytes([bytes[offset], bytes[offset + 1]])
}

fn read_u32(bytes: &[u8], offset: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[offset..offset + 4]);
    u32::from_le_bytes(word)
}

fn read_u64(bytes: &[u8], offset: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[offset..offset + 8]);
    u64::from_le_bytes(word)
}

fn write_bytes(bytes: &mut [u8], offset: usize, value: &[u8]) {
    bytes[offset..offset + value.len()].copy_from_slice(value);
}

/// Rounds `length` up to the record alignment.
pub fn align_up(length: u64) -> u64 {
    length.div_ceil(RECORD_ALIGN as u64) * RECORD_ALIGN as u64
}

/// The decoded fields of a segment file header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub shard: u16,
    pub segment: u32,
    pub size_bytes: u64,
    pub created_at_us: u64,
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_BYTES] {
        let mut bytes = [0u8; SEGMENT_HEADER_BYTES];
        write_bytes(&mut bytes, 0, &SEGMENT_MAGIC);
        write_bytes(
            &mut bytes,
            SEGMENT_VERSION_OFFSET,
            &FORMAT_VERSION.to_le_bytes(),
        );
        write_bytes(&mut bytes, SEGMENT_SHARD_OFFSET, &self.shard.to_le_bytes());
        write_bytes(&mut bytes, SEGMENT_ID_OFFSET, &self.segment.to_le_bytes());
        write_bytes(
            &mut bytes,
            SEGMENT_SIZE_OFFSET,
            &self.size_bytes.to_le_bytes(),
        );
        write_bytes(
            &mut bytes,
            SEGMENT_CREATED_OFFSET,
            &self.created_at_us.to_le_bytes(),
        );
        let crc = crc32c::crc32c(&bytes[..SEGMENT_CRC_OFFSET]);
        write_bytes(&mut bytes, SEGMENT_CRC_OFFSET, &crc.to_le_bytes());
        bytes
    }

    /// Decodes a segment header from the first bytes of a file.
    pub fn decode(bytes: &[u8]) -> Result<SegmentHeader, FormatError> {
        if bytes.len() < SEGMENT_HEADER_BYTES {
            return Err(FormatError::Truncated {
                available: bytes.len() as u64,
            });
        }
        if bytes[..4] != SEGMENT_MAGIC {
            return Err(FormatError::BadMagic);
        }
        let stored = read_u32(bytes, SEGMENT_CRC_OFFSET);
        let computed = crc32c::crc32c(&bytes[..SEGMENT_CRC_OFFSET]);
        if stored != computed {
            return Err(FormatError::BadCrc { stored, computed });
        }
        let version = read_u16(bytes, SEGMENT_VERSION_OFFSET);
        if version != FORMAT_VERSION {
            return Err(FormatError::BadVersion(version));
        }
        Ok(SegmentHeader {
            shard: read_u16(bytes, SEGMENT_SHARD_OFFSET),
            segment: read_u32(bytes, SEGMENT_ID_OFFSET),
            size_bytes: read_u64(bytes, SEGMENT_SIZE_OFFSET),
            created_at_us: read_u64(bytes, SEGMENT_CREATED_OFFSET),
        })
    }
}

/// The clear metadata of a record, which is also the AEAD's associated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: RecordKind,
    pub length_bytes: u32,
    pub crc: u32,
    pub key_id: u32,
    pub nonce: [u8; NONCE_LEN],
    pub lane: u8,
    pub category: u8,
    pub recipient_count: u32,
    pub received_at_us: u64,
    pub expires_at_us: u64,
    pub payload_length_bytes: u32,
}

impl RecordHeader {
    fn encode_into(&self, bytes: &mut [u8]) {
        write_bytes(bytes, 0, &RECORD_MAGIC);
        write_bytes(bytes, RECORD_VERSION_OFFSET, &FORMAT_VERSION.to_le_bytes());
        bytes[RECORD_KIND_OFFSET] = self.kind as u8;
        bytes[RECORD_FLAGS_OFFSET] = 0;
        write_bytes(
            bytes,
            RECORD_LENGTH_OFFSET,
            &self.length_bytes.to_le_bytes(),
        );
        write_bytes(bytes, RECORD_CRC_OFFSET, &self.crc.to_le_bytes());
        write_bytes(bytes, RECORD_KEY_ID_OFFSET, &self.key_id.to_le_bytes());
        write_bytes(bytes, RECORD_NONCE_OFFSET, &self.nonce);
        bytes[RECORD_LANE_OFFSET] = self.lane;
        bytes[RECORD_CATEGORY_OFFSET] = self.category;
        write_bytes(bytes, RECORD_RESERVED_OFFSET, &[0, 0]);
        write_bytes(
            bytes,
            RECORD_RECIPIENTS_OFFSET,
            &self.recipient_count.to_le_bytes(),
        );
        write_bytes(
            bytes,
            RECORD_RECEIVED_OFFSET,
            &self.received_at_us.to_le_bytes(),
        );
        write_bytes(
            bytes,
            RECORD_EXPIRES_OFFSET,
            &self.expires_at_us.to_le_bytes(),
        );
        write_bytes(
            bytes,
            RECORD_PAYLOAD_LENGTH_OFFSET,
            &self.payload_length_bytes.to_le_bytes(),
        );
        write_bytes(bytes, RECORD_RESERVED2_OFFSET, &[0; 4]);
    }
}

/// Bytes read from disk that have not been validated as a record yet.
#[derive(Clone, Copy)]
pub struct UncheckedRecord<'a>(pub &'a [u8]);

/// A record whose header, length and CRC were checked; the payload may still
/// be sealed.
#[derive(Clone, Copy)]
pub struct CheckedRecord<'a> {
    pub header: RecordHeader,
    pub bytes: &'a [u8],
}

impl<'a> UncheckedRecord<'a> {
    /// Returns true when the bytes start with the record magic.
    pub fn has_magic(&self) -> bool {
        self.0.len() >= 4 && self.0[..4] == RECORD_MAGIC
    }

    /// Decodes the header only; the length is checked against the bytes
    /// available but the CRC is not.
    pub fn header(&self) -> Result<RecordHeader, FormatError> {
        let bytes = self.0;
        let available = bytes.len() as u64;
        if bytes.len() < RECORD_HEADER_BYTES {
            return Err(FormatError::Truncated { available });
        }
        if !self.has_magic() {
            return Err(FormatError::BadMagic);
        }
        let version = read_u16(bytes, RECORD_VERSION_OFFSET);
        if version != FORMAT_VERSION {
            return Err(FormatError::BadVersion(version));
        }
        let kind = RecordKind::from_u8(bytes[RECORD_KIND_OFFSET])
            .ok_or(FormatError::BadKind(bytes[RECORD_KIND_OFFSET]))?;
        let length_bytes = read_u32(bytes, RECORD_LENGTH_OFFSET);
        let payload_length_bytes = read_u32(bytes, RECORD_PAYLOAD_LENGTH_OFFSET);
        let length_ok = (length_bytes as usize) >= RECORD_HEADER_BYTES
            && (length_bytes as usize).is_multiple_of(RECORD_ALIGN)
            && u64::from(length_bytes) <= available
            && u64::from(payload_length_bytes) + RECORD_HEADER_BYTES as u64
                <= u64::from(length_bytes);
        if !length_ok {
            return Err(FormatError::BadLength {
                length_bytes,
                available,
            });
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&bytes[RECORD_NONCE_OFFSET..RECORD_NONCE_OFFSET + NONCE_LEN]);
        Ok(RecordHeader {
            kind,
            length_bytes,
            crc: read_u32(bytes, RECORD_CRC_OFFSET),
            key_id: read_u32(bytes, RECORD_KEY_ID_OFFSET),
            nonce,
            lane: bytes[RECORD_LANE_OFFSET],
            category: bytes[RECORD_CATEGORY_OFFSET],
            recipient_count: read_u32(bytes, RECORD_RECIPIENTS_OFFSET),
            received_at_us: read_u64(bytes, RECORD_RECEIVED_OFFSET),
            expires_at_us: read_u64(bytes, RECORD_EXPIRES_OFFSET),
            payload_length_bytes,
        })
    }

    /// Checks the header and the CRC of the whole record.
    pub fn check(&self) -> Result<CheckedRecord<'a>, FormatError> {
        let header = self.header()?;
        let bytes = &self.0[..header.length_bytes as usize];
        let computed = record_crc(bytes);
        if computed != header.crc {
            return Err(FormatError::BadCrc {
                stored: header.crc,
                computed,
            });
        }
        Ok(CheckedRecord { header, bytes })
    }
}

/// Computes the CRC32C of a whole record with the CRC field taken as zero.
pub fn record_crc(record: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&record[..RECORD_CRC_OFFSET]);
    let crc = crc32c::crc32c_append(crc, &[0u8; 4]);
    crc32c::crc32c_append(crc, &record[RECORD_CRC_OFFSET + 4..])
}

/// Returns the AEAD's associated data: the header with the CRC field zeroed.
fn associated_data(record: &[u8]) -> [u8; RECORD_HEADER_BYTES] {
    let mut aad = [0u8; RECORD_HEADER_BYTES];
    aad.copy_from_slice(&record[..RECORD_HEADER_BYTES]);
    aad[RECORD_CRC_OFFSET..RECORD_CRC_OFFSET + 4].fill(0);
    aad
}

/// The archived form of an envelope, without the fields that the clear
/// header carries (lane, category, times). Field order is part of the
/// format: append new fields only with a version bump.
#[derive(rkyv::Archive, rkyv::Serialize, Debug)]
pub struct DiskEnvelope {
    pub message_id: [u8; 16],
    pub sender: String,
    pub envid: Option<String>,
    /// 0 none, 1 `RET=FULL`, 2 `RET=HDRS`.
    pub ret: u8,
    /// Bit 0 `BODY=8BITMIME`, bit 1 `SMTPUTF8`.
    pub flags: u8,
    pub peer_uid: u32,
    pub peer_gid: u32,
    pub peer_pid: u32,
    pub recipients: Vec<DiskRecipient>,
}

#[derive(rkyv::Archive, rkyv::Serialize, Debug)]
pub struct DiskRecipient {
    pub address: String,
    pub domain: String,
    pub notify: u8,
    pub orcpt: Option<String>,
}

const FLAG_BODY_8BIT: u8 = 1;
const FLAG_SMTPUTF8: u8 = 2;

impl DiskEnvelope {
    fn from_envelope(envelope: &Envelope) -> DiskEnvelope {
        let mut flags = 0;
        if envelope.body_8bit {
            flags |= FLAG_BODY_8BIT;
        }
        if envelope.smtputf8 {
            flags |= FLAG_SMTPUTF8;
        }
        DiskEnvelope {
            message_id: envelope.message_id.0,
            sender: envelope.sender.clone(),
            envid: envelope.envid.clone(),
            ret: match envelope.ret {
                None => 0,
                Some(Ret::Full) => 1,
                Some(Ret::Headers) => 2,
            },
            flags,
            peer_uid: envelope.peer_uid,
            peer_gid: envelope.peer_gid,
            peer_pid: envelope.peer_pid,
            recipients: envelope
                .recipients
                .iter()
                .map(|recipient| DiskRecipient {
                    address: recipient.address.clone(),
                    domain: recipient.domain.clone(),
                    notify: recipient.notify,
                    orcpt: recipient.orcpt.clone(),
                })
                .collect(),
        }
    }
}

/// The sealing of a record's payload: clear, or AES-256-GCM under a key.
pub enum Sealing<'k> {
    Clear,
    Sealed {
        key_id: u32,
        key: &'k LessSafeKey,
        nonce: [u8; NONCE_LEN],
    },
}

/// Reusable buffers for building records without allocating per append.
#[derive(Default)]
pub struct RecordBuilder {
    archive: AlignedVec,
    record: Vec<u8>,
}

/// The metadata written in clear in a record header.
struct ClearMetadata {
    lane: u8,
    category: u8,
    recipient_count: u32,
    received_at_us: u64,
    expires_at_us: u64,
}

/// The reason a record could not be built.
#[derive(Debug)]
pub enum BuildError {
    TooLarge { record_bytes: u64 },
    InvalidEnvelope(String),
}

impl RecordBuilder {
    /// Builds a sealed message record; the result stays valid until the next
    /// call.
    pub fn message(
        &mut self,
        envelope: &Envelope,
        body: &[u8],
        sealing: Sealing<'_>,
    ) -> Result<&[u8], BuildError> {
        self.message_record(envelope, body, None, sealing)
    }

    /// Builds a sealed relocated message record: the message as it was at
    /// `previous`, with `states` holding each recipient's current state in
    /// envelope order. The result stays valid until the next call.
    pub fn relocated(
        &mut self,
        envelope: &Envelope,
        body: &[u8],
        previous: RecordRef,
        states: &[RecipientState],
        sealing: Sealing<'_>,
    ) -> Result<&[u8], BuildError> {
        if states.len() != envelope.recipients.len() {
            return Err(BuildError::InvalidEnvelope(format!(
                "{} recipient states for {} recipients",
                states.len(),
                envelope.recipients.len()
            )));
        }
        self.message_record(envelope, body, Some((previous, states)), sealing)
    }

    fn message_record(
        &mut self,
        envelope: &Envelope,
        body: &[u8],
        relocation: Option<(RecordRef, &[RecipientState])>,
        sealing: Sealing<'_>,
    ) -> Result<&[u8], BuildError> {
        let recipient_count = u32::try_from(envelope.recipients.len())
            .map_err(|_| BuildError::InvalidEnvelope("more than 2^32 recipients".into()))?;
        let disk = DiskEnvelope::from_envelope(envelope);
        let mut archive = std::mem::take(&mut self.archive);
        archive.clear();
        let archive = rkyv::api::high::to_bytes_in::<_, rkyv::rancor::Error>(&disk, archive)
            .map_err(|error| BuildError::InvalidEnvelope(format!("archiving failed: {error}")))?;
        let (prefix_bytes, states_bytes) = match relocation {
            None => (MESSAGE_ARCHIVE_OFFSET as u64, 0),
            Some((_, states)) => (
                RELOCATED_ARCHIVE_OFFSET as u64,
                (states.len() * STATE_ENTRY_BYTES) as u64,
            ),
        };
        let too_large = |_| BuildError::TooLarge {
            record_bytes: (RECORD_HEADER_BYTES + TAG_BYTES) as u64
                + prefix_bytes
                + archive.len() as u64
                + body.len() as u64
                + states_bytes,
        };
        let archive_length = u32::try_from(archive.len()).map_err(too_large)?;
        let body_length = u32::try_from(body.len()).map_err(too_large)?;

        let start = self.begin(
            prefix_bytes + u64::from(archive_length) + u64::from(body_length) + states_bytes,
        )?;
        let record = &mut self.record;
        record.extend_from_slice(&archive_length.to_le_bytes());
        record.extend_from_slice(&body_length.to_le_bytes());
        let kind = match relocation {
            None => {
                record.extend_from_slice(&[0u8; 8]);
                RecordKind::Message
            }
            Some((previous, _)) => {
                record.extend_from_slice(&previous.segment.to_le_bytes());
                record.extend_from_slice(&[0u8; 4]);
                record.extend_from_slice(&previous.offset.to_le_bytes());
                record.extend_from_slice(&[0u8; 8]);
                RecordKind::Relocated
            }
        };
        debug_assert_eq!(record.len() - start, prefix_bytes as usize);
        record.extend_from_slice(&archive);
        record.extend_from_slice(body);
        if let Some((_, states)) = relocation {
            for state in states {
                record.extend_from_slice(&encode_state(*state));
            }
        }
        debug_assert_eq!(start, RECORD_HEADER_BYTES);
        self.archive = archive;

        let metadata = ClearMetadata {
            lane: envelope.lane as u8,
            category: envelope.category as u8,
            recipient_count,
            received_at_us: envelope.received_at_us,
            expires_at_us: envelope.expires_at_us,
        };
        Ok(self.finish(kind, metadata, sealing))
    }

    /// Builds a sealed outcome record; the result stays valid until the next
    /// call.
    pub fn outcome(&mut self, outcome: &OutcomeRecord, sealing: Sealing<'_>) -> &[u8] {
        // An outcome payload has a fixed small size, so it always fits.
        self.begin(OUTCOME_PAYLOAD_BYTES as u64)
            .expect("a 32-byte payload fits in a record");
        let mut payload = [0u8; OUTCOME_PAYLOAD_BYTES];
        write_bytes(
            &mut payload,
            OUTCOME_SEGMENT_OFFSET,
            &outcome.message.segment.to_le_bytes(),
        );
        write_bytes(
            &mut payload,
            OUTCOME_RECIPIENT_OFFSET,
            &outcome.recipient_index.to_le_bytes(),
        );
        write_bytes(
            &mut payload,
            OUTCOME_MESSAGE_OFFSET,
            &outcome.message.offset.to_le_bytes(),
        );
        let (kind, next_attempt_us) = match outcome.outcome {
            Outcome::Deferred { next_attempt_us } => (1u8, next_attempt_us),
            Outcome::Delivered => (2, 0),
            Outcome::Bounced => (3, 0),
            Outcome::Expired => (4, 0),
            Outcome::Deleted => (5, 0),
        };
        write_bytes(
            &mut payload,
            OUTCOME_NEXT_ATTEMPT_OFFSET,
            &next_attempt_us.to_le_bytes(),
        );
        write_bytes(
            &mut payload,
            OUTCOME_ATTEMPTS_OFFSET,
            &outcome.attempts.to_le_bytes(),
        );
        payload[OUTCOME_KIND_OFFSET] = kind;
        self.record.extend_from_slice(&payload);
        let metadata = ClearMetadata {
            lane: 0,
            category: 0,
            recipient_count: 0,
            received_at_us: 0,
            expires_at_us: 0,
        };
        self.finish(RecordKind::Outcome, metadata, sealing)
    }

    /// Starts a record with a zeroed header and checks that a payload of
    /// `plaintext_bytes` fits in the u32 length field.
    fn begin(&mut self, plaintext_bytes: u64) -> Result<usize, BuildError> {
        let total = align_up(RECORD_HEADER_BYTES as u64 + plaintext_bytes + TAG_BYTES as u64);
        if total > u64::from(u32::MAX) - RECORD_ALIGN as u64 {
            return Err(BuildError::TooLarge {
                record_bytes: total,
            });
        }
        self.record.clear();
        self.record.resize(RECORD_HEADER_BYTES, 0);
        Ok(RECORD_HEADER_BYTES)
    }

    fn finish(&mut self, kind: RecordKind, metadata: ClearMetadata, sealing: Sealing<'_>) -> &[u8] {
        let plaintext_bytes = self.record.len() - RECORD_HEADER_BYTES;
        let (key_id, nonce, tag_bytes) = match &sealing {
            Sealing::Clear => (0, [0u8; NONCE_LEN], 0),
            Sealing::Sealed { key_id, nonce, .. } => (*key_id, *nonce, TAG_BYTES),
        };
        let payload_length_bytes = plaintext_bytes + tag_bytes;
        let total = align_up((RECORD_HEADER_BYTES + payload_length_bytes) as u64) as usize;
        // `begin` checked that the aligned total, tag included, fits in u32.
        let header = RecordHeader {
            kind,
            length_bytes: u32::try_from(total).expect("begin bounded the record length"),
            crc: 0,
            key_id,
            nonce,
            lane: metadata.lane,
            category: metadata.category,
            recipient_count: metadata.recipient_count,
            received_at_us: metadata.received_at_us,
            expires_at_us: metadata.expires_at_us,
            payload_length_bytes: u32::try_from(payload_length_bytes)
                .expect("begin bounded the payload length"),
        };
        header.encode_into(&mut self.record[..RECORD_HEADER_BYTES]);

        if let Sealing::Sealed { key, nonce, .. } = sealing {
            let aad = associated_data(&self.record);
            // `seal_in_place_separate_tag` fails only when the plaintext
            // exceeds AES-GCM's 64 GiB limit, far above the u32 record limit.
            let tag: Tag = key
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(aad),
                    &mut self.record[RECORD_HEADER_BYTES..],
                )
                .expect("record plaintext is below the AES-GCM length limit");
            self.record.extend_from_slice(tag.as_ref());
        }
        self.record.resize(total, 0);
        let crc = record_crc(&self.record);
        write_bytes(&mut self.record, RECORD_CRC_OFFSET, &crc.to_le_bytes());
        &self.record
    }
}

/// An outcome record's decoded payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutcomeRecord {
    pub message: RecordRef,
    pub recipient_index: u32,
    pub outcome: Outcome,
    pub attempts: u32,
}

/// The reason a checked record's payload could not be opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenError {
    NoKeyring,
    MissingKey(u32),
    Unauthentic,
    Invalid(String),
}

impl<'a> CheckedRecord<'a> {
    /// Decrypts (or copies) the payload into an aligned buffer, so the rkyv
    /// archive inside it can be validated in place.
    pub fn open(&self, keyring: Option<&Keyring>) -> Result<AlignedVec, OpenError> {
        let mut plain = AlignedVec::<RECORD_ALIGN>::new();
        self.open_into(keyring, &mut plain)?;
        Ok(plain)
    }

    /// Like [`CheckedRecord::open`], but replaces the contents of `plain`,
    /// so a scan of many records reuses one allocation.
    pub fn open_into(
        &self,
        keyring: Option<&Keyring>,
        plain: &mut AlignedVec,
    ) -> Result<(), OpenError> {
        let header = &self.header;
        let payload_end = RECORD_HEADER_BYTES + header.payload_length_bytes as usize;
        let payload = &self.bytes[RECORD_HEADER_BYTES..payload_end];
        plain.clear();
        plain.extend_from_slice(payload);
        if header.key_id == 0 {
            return Ok(());
        }
        let keyring = keyring.ok_or(OpenError::NoKeyring)?;
        let key = keyring
            .key(header.key_id)
            .ok_or(OpenError::MissingKey(header.key_id))?;
        let aad = associated_data(self.bytes);
        let plain_length = key
            .open_in_place(
                Nonce::assume_unique_for_key(header.nonce),
                Aad::from(aad),
                plain.as_mut_slice(),
            )
            .map_err(|_| OpenError::Unauthentic)?
            .len();
        plain.resize(plain_length, 0);
        Ok(())
    }
}

/// A relocated message record's decoded payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelocatedMessage {
    pub envelope: Envelope,
    pub body: Vec<u8>,
    /// Where the copy this one replaces was.
    pub previous: RecordRef,
    /// Each recipient's state at the time of the copy, in envelope order.
    pub states: Vec<RecipientState>,
}

/// Decodes the envelope and body of a message or relocated message payload
/// produced by [`CheckedRecord::open`].
pub fn decode_message(
    header: &RecordHeader,
    plain: &AlignedVec,
) -> Result<(Envelope, Vec<u8>), String> {
    match header.kind {
        RecordKind::Message => {
            let (envelope, body, _) =
                decode_message_parts(header, plain, MESSAGE_ARCHIVE_OFFSET, 0)?;
            Ok((envelope, plain[body].to_vec()))
        }
        RecordKind::Relocated => {
            let relocated = decode_relocated(header, plain)?;
            Ok((relocated.envelope, relocated.body))
        }
        RecordKind::Outcome => Err("an outcome record holds no message".into()),
    }
}

/// Decodes the envelope of a message or relocated message payload without
/// copying the body, for recovery, which never needs it. For a relocated
/// record it also returns the recipients' states, and `None` for an original.
pub fn decode_envelope(
    header: &RecordHeader,
    plain: &AlignedVec,
) -> Result<(Envelope, Option<Vec<RecipientState>>), String> {
    match header.kind {
        RecordKind::Message => {
            let (envelope, _, _) = decode_message_parts(header, plain, MESSAGE_ARCHIVE_OFFSET, 0)?;
            Ok((envelope, None))
        }
        RecordKind::Relocated => {
            let (envelope, states, _) = decode_relocated_parts(header, plain)?;
            Ok((envelope, Some(states)))
        }
        RecordKind::Outcome => Err("an outcome record holds no message".into()),
    }
}

/// Returns the body length of an original message payload; call it after
/// [`decode_envelope`] accepted the payload.
pub fn message_body_len(plain: &AlignedVec) -> u32 {
    read_u32(plain, MESSAGE_BODY_LENGTH_OFFSET)
}

/// Decodes a relocated message payload produced by [`CheckedRecord::open`].
pub fn decode_relocated(
    header: &RecordHeader,
    plain: &AlignedVec,
) -> Result<RelocatedMessage, String> {
    let (envelope, states, body) = decode_relocated_parts(header, plain)?;
    Ok(RelocatedMessage {
        envelope,
        body: plain[body].to_vec(),
        previous: RecordRef {
            segment: read_u32(plain, RELOCATED_PREVIOUS_SEGMENT_OFFSET),
            offset: read_u64(plain, RELOCATED_PREVIOUS_OFFSET_OFFSET),
        },
        states,
    })
}

/// Decodes a relocated payload's envelope and states, and returns where
/// its body lies in `plain`.
fn decode_relocated_parts(
    header: &RecordHeader,
    plain: &AlignedVec,
) -> Result<(Envelope, Vec<RecipientState>, Range<usize>), String> {
    if header.kind != RecordKind::Relocated {
        return Err("not a relocated message record".into());
    }
    let states_bytes = header.recipient_count as usize * STATE_ENTRY_BYTES;
    let (envelope, body, states_start) =
        decode_message_parts(header, plain, RELOCATED_ARCHIVE_OFFSET, states_bytes)?;
    let states = plain[states_start..]
        .chunks_exact(STATE_ENTRY_BYTES)
        .map(decode_state)
        .collect::<Result<Vec<_>, String>>()?;
    Ok((envelope, states, body))
}

fn encode_state(state: RecipientState) -> [u8; STATE_ENTRY_BYTES] {
    let (kind, attempts, next_attempt_us) = match state {
        RecipientState::Pending {
            attempts,
            next_attempt_us,
        } => (1u8, attempts, next_attempt_us),
        RecipientState::Delivered => (2, 0, 0),
        RecipientState::Bounced => (3, 0, 0),
        RecipientState::Expired => (4, 0, 0),
        RecipientState::Deleted => (5, 0, 0),
    };
    let mut entry = [0u8; STATE_ENTRY_BYTES];
    write_bytes(
        &mut entry,
        STATE_NEXT_ATTEMPT_OFFSET,
        &next_attempt_us.to_le_bytes(),
    );
    write_bytes(&mut entry, STATE_ATTEMPTS_OFFSET, &attempts.to_le_bytes());
    entry[STATE_KIND_OFFSET] = kind;
    entry
}

fn decode_state(entry: &[u8]) -> Result<RecipientState, String> {
    match entry[STATE_KIND_OFFSET] {
        1 => Ok(RecipientState::Pending {
            attempts: read_u32(entry, STATE_ATTEMPTS_OFFSET),
            next_attempt_us: read_u64(entry, STATE_NEXT_ATTEMPT_OFFSET),
        }),
        2 => Ok(RecipientState::Delivered),
        3 => Ok(RecipientState::Bounced),
        4 => Ok(RecipientState::Expired),
        5 => Ok(RecipientState::Deleted),
        other => Err(format!("unknown recipient state {other}")),
    }
}

/// Decodes the archive and body that follow a payload prefix of
/// `archive_offset` bytes, with `trailer_bytes` after the body. Returns the
/// envelope, the body's range in `plain` and the offset where the trailer
/// starts.
fn decode_message_parts(
    header: &RecordHeader,
    plain: &AlignedVec,
    archive_offset: usize,
    trailer_bytes: usize,
) -> Result<(Envelope, Range<usize>, usize), String> {
    if plain.len() < archive_offset {
        return Err(format!(
            "message payload of {} bytes is too short",
            plain.len()
        ));
    }
    let archive_length = read_u32(plain, MESSAGE_ARCHIVE_LENGTH_OFFSET) as usize;
    let body_length = read_u32(plain, MESSAGE_BODY_LENGTH_OFFSET) as usize;
    let expected =
        archive_offset as u64 + archive_length as u64 + body_length as u64 + trailer_bytes as u64;
    if expected != plain.len() as u64 {
        return Err(format!(
            "message payload is {} bytes but its lengths add up to {expected}",
            plain.len()
        ));
    }
    let archive_end = archive_offset + archive_length;
    let archive = &plain[archive_offset..archive_end];
    let disk = rkyv::access::<ArchivedDiskEnvelope, rkyv::rancor::Error>(archive)
        .map_err(|error| format!("envelope archive is invalid: {error}"))?;
    let lane = Lane::from_u8(header.lane).ok_or_else(|| format!("unknown lane {}", header.lane))?;
    let category = Category::from_u8(header.category)
        .ok_or_else(|| format!("unknown category {}", header.category))?;
    if disk.recipients.len() as u64 != u64::from(header.recipient_count) {
        return Err(format!(
            "header says {} recipients, envelope has {}",
            header.recipient_count,
            disk.recipients.len()
        ));
    }
    let ret = match disk.ret {
        0 => None,
        1 => Some(Ret::Full),
        2 => Some(Ret::Headers),
        other => return Err(format!("unknown RET value {other}")),
    };
    let envelope = Envelope {
        message_id: MessageId(disk.message_id),
        received_at_us: header.received_at_us,
        expires_at_us: header.expires_at_us,
        lane,
        category,
        sender: disk.sender.as_str().to_owned(),
        envid: disk.envid.as_ref().map(|envid| envid.as_str().to_owned()),
        ret,
        body_8bit: disk.flags & FLAG_BODY_8BIT != 0,
        smtputf8: disk.flags & FLAG_SMTPUTF8 != 0,
        peer_uid: disk.peer_uid.to_native(),
        peer_gid: disk.peer_gid.to_native(),
        peer_pid: disk.peer_pid.to_native(),
        recipients: disk
            .recipients
            .iter()
            .map(|recipient| Recipient {
                address: recipient.address.as_str().to_owned(),
                domain: recipient.domain.as_str().to_owned(),
                notify: recipient.notify,
                orcpt: recipient
                    .orcpt
                    .as_ref()
                    .map(|orcpt| orcpt.as_str().to_owned()),
            })
            .collect(),
    };
    let body_end = archive_end + body_length;
    Ok((envelope, archive_end..body_end, body_end))
}

/// Decodes an outcome payload produced by [`CheckedRecord::open`].
pub fn decode_outcome(plain: &[u8]) -> Result<OutcomeRecord, String> {
    if plain.len() != OUTCOME_PAYLOAD_BYTES {
        return Err(format!(
            "outcome payload is {} bytes, expected {OUTCOME_PAYLOAD_BYTES}",
            plain.len()
        ));
    }
    let next_attempt_us = read_u64(plain, OUTCOME_NEXT_ATTEMPT_OFFSET);
    let outcome = match plain[OUTCOME_KIND_OFFSET] {
        1 => Outcome::Deferred { next_attempt_us },
        2 => Outcome::Delivered,
        3 => Outcome::Bounced,
        4 => Outcome::Expired,
        5 => Outcome::Deleted,
        other => return Err(format!("unknown outcome {other}")),
    };
    Ok(OutcomeRecord {
        message: RecordRef {
            segment: read_u32(plain, OUTCOME_SEGMENT_OFFSET),
            offset: read_u64(plain, OUTCOME_MESSAGE_OFFSET),
        },
        recipient_index: read_u32(plain, OUTCOME_RECIPIENT_OFFSET),
        outcome,
        attempts: read_u32(plain, OUTCOME_ATTEMPTS_OFFSET),
    })
}
