//! The record decoder and segment scanner must reject any input without
//! panicking.

mod common;

use caduceus_spool::format::{
    OutcomeRecord, RECORD_CRC_OFFSET, RECORD_HEADER_BYTES, RecordBuilder, Sealing, SegmentHeader,
    UncheckedRecord, decode_message, decode_outcome, decode_relocated, record_crc,
};
use caduceus_spool::scan::scan_segment;
use caduceus_spool::{Outcome, RecipientState, RecordRef};
use common::{body, envelope, test_keyring};
use proptest::prelude::*;

fn segment_with(records: &[u8]) -> Vec<u8> {
    let header = SegmentHeader {
        shard: 0,
        segment: 1,
        size_bytes: 0,
        created_at_us: 0,
    };
    let mut bytes = header.encode().to_vec();
    bytes.extend_from_slice(records);
    bytes
}

fn decode_all(bytes: &[u8]) {
    let keyring = test_keyring(1, 1);
    scan_segment(bytes, |_, record| {
        for keyring in [None, Some(&keyring)] {
            if let Ok(plain) = record.open(keyring) {
                let _ = decode_message(&record.header, &plain);
                let _ = decode_outcome(&plain);
                let _ = decode_relocated(&record.header, &plain);
            }
        }
    });
}

fn valid_record() -> Vec<u8> {
    let mut builder = RecordBuilder::default();
    builder
        .message(&envelope(1, 2), &body(1, 64), Sealing::Clear)
        .unwrap()
        .to_vec()
}

const PREVIOUS: RecordRef = RecordRef {
    segment: 7,
    offset: 4096,
};

fn relocated_states() -> [RecipientState; 2] {
    [
        RecipientState::Delivered,
        RecipientState::Pending {
            attempts: 3,
            next_attempt_us: 1_800_000_000_000_000,
        },
    ]
}

fn valid_relocated_record() -> Vec<u8> {
    let mut builder = RecordBuilder::default();
    builder
        .relocated(
            &envelope(2, 2),
            &body(2, 64),
            PREVIOUS,
            &relocated_states(),
            Sealing::Clear,
        )
        .unwrap()
        .to_vec()
}

/// Replaces `record[position]` and fixes the CRC, so the change reaches the
/// payload decoder.
fn with_byte(mut record: Vec<u8>, position: usize, value: u8) -> Vec<u8> {
    record[position] = value;
    let crc = record_crc(&record);
    record[RECORD_CRC_OFFSET..RECORD_CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
    record
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn scanner_survives_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        decode_all(&bytes);
        decode_all(&segment_with(&bytes));
        let _ = UncheckedRecord(&bytes).check();
    }

    /// Mutates a valid record and fixes its CRC, so the damage reaches the
    /// payload decoder and rkyv's validation instead of stopping at the CRC.
    #[test]
    fn decoder_survives_crc_valid_garbage(
        mutations in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..16),
    ) {
        let mut record = valid_record();
        for (index, value) in mutations {
            let position = index.index(record.len());
            if !(RECORD_CRC_OFFSET..RECORD_CRC_OFFSET + 4).contains(&position) {
                record[position] = value;
            }
        }
        let crc = record_crc(&record);
        record[RECORD_CRC_OFFSET..RECORD_CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
        decode_all(&segment_with(&record));
    }

    #[test]
    fn relocated_decoder_survives_crc_valid_garbage(
        mutations in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..16),
    ) {
        let mut record = valid_relocated_record();
        for (index, value) in mutations {
            let position = index.index(record.len());
            if !(RECORD_CRC_OFFSET..RECORD_CRC_OFFSET + 4).contains(&position) {
                record = with_byte(record, position, value);
            }
        }
        decode_all(&segment_with(&record));
    }
}

#[test]
fn relocated_record_decodes() {
    let record = valid_relocated_record();
    let mut copies = 0;
    scan_segment(&segment_with(&record), |_, checked| {
        let plain = checked.open(None).unwrap();
        let copy = decode_relocated(&checked.header, &plain).unwrap();
        assert_eq!(copy.envelope, envelope_without_id(&copy.envelope, 2));
        assert_eq!(copy.body, body(2, 64));
        assert_eq!(copy.previous, PREVIOUS);
        assert_eq!(copy.states, relocated_states());
        // The generic message decoder reads the same envelope and body.
        let (envelope, message_body) = decode_message(&checked.header, &plain).unwrap();
        assert_eq!(envelope, copy.envelope);
        assert_eq!(message_body, copy.body);
        copies += 1;
    });
    assert_eq!(copies, 1);
}

/// The test envelope for `tag` with the random message id of `decoded`.
fn envelope_without_id(decoded: &caduceus_spool::Envelope, tag: u32) -> caduceus_spool::Envelope {
    let mut expected = envelope(tag, 2);
    expected.message_id = decoded.message_id;
    expected
}

#[test]
fn relocated_record_keeps_every_state() {
    let states = [
        RecipientState::Pending {
            attempts: 2,
            next_attempt_us: 5,
        },
        RecipientState::Delivered,
        RecipientState::Bounced,
        RecipientState::Expired,
        RecipientState::Deleted,
    ];
    let mut builder = RecordBuilder::default();
    let record = builder
        .relocated(
            &envelope(3, states.len()),
            &body(3, 64),
            PREVIOUS,
            &states,
            Sealing::Clear,
        )
        .unwrap()
        .to_vec();
    let mut copies = 0;
    scan_segment(&segment_with(&record), |_, checked| {
        let plain = checked.open(None).unwrap();
        let copy = decode_relocated(&checked.header, &plain).unwrap();
        assert_eq!(copy.states, states);
        copies += 1;
    });
    assert_eq!(copies, 1);
}

#[test]
fn outcome_record_keeps_every_outcome() {
    let outcomes = [
        Outcome::Deferred {
            next_attempt_us: 1_800_000_000_000_000,
        },
        Outcome::Delivered,
        Outcome::Bounced,
        Outcome::Expired,
        Outcome::Deleted,
    ];
    for outcome in outcomes {
        let written = OutcomeRecord {
            message: PREVIOUS,
            recipient_index: 1,
            outcome,
            attempts: 4,
        };
        let mut builder = RecordBuilder::default();
        let record = builder.outcome(&written, Sealing::Clear).to_vec();
        let mut decoded = Vec::new();
        scan_segment(&segment_with(&record), |_, checked| {
            let plain = checked.open(None).unwrap();
            decoded.push(decode_outcome(&plain).unwrap());
        });
        assert_eq!(decoded, vec![written], "{outcome:?}");
    }
}

#[test]
fn relocated_record_rejects_unknown_state() {
    let record = valid_relocated_record();
    // The state byte of the last recipient: its entry is the last 16 bytes of
    // the payload, and the state sits at entry offset 12.
    let payload_end =
        RECORD_HEADER_BYTES + u32::from_le_bytes(record[56..60].try_into().unwrap()) as usize;
    let damaged = with_byte(record, payload_end - 16 + 12, 9);
    let mut rejected = 0;
    scan_segment(&segment_with(&damaged), |_, checked| {
        let plain = checked.open(None).unwrap();
        let error = decode_relocated(&checked.header, &plain).unwrap_err();
        assert!(error.contains("unknown recipient state 9"), "{error}");
        rejected += 1;
    });
    assert_eq!(rejected, 1);
}

#[test]
fn relocated_record_rejects_short_state_table() {
    let mut builder = RecordBuilder::default();
    let error = builder
        .relocated(
            &envelope(3, 2),
            &body(3, 10),
            PREVIOUS,
            &relocated_states()[..1],
            Sealing::Clear,
        )
        .unwrap_err();
    assert!(format!("{error:?}").contains("1 recipient states for 2 recipients"));
}

#[test]
fn valid_record_decodes() {
    let record = valid_record();
    assert!(record.len() > RECORD_HEADER_BYTES);
    let mut messages = 0;
    scan_segment(&segment_with(&record), |_, checked| {
        let plain = checked.open(None).unwrap();
        let (decoded, decoded_body) = decode_message(&checked.header, &plain).unwrap();
        assert_eq!(decoded.recipients.len(), 2);
        assert_eq!(decoded_body, body(1, 64));
        messages += 1;
    });
    assert_eq!(messages, 1);
}
