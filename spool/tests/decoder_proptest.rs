//! The record decoder and segment scanner must reject any input without
//! panicking.

mod common;

use caduceus_spool::format::{
    RECORD_CRC_OFFSET, RECORD_HEADER_BYTES, RecordBuilder, Sealing, SegmentHeader, UncheckedRecord,
    decode_message, decode_outcome, record_crc,
};
use caduceus_spool::scan::scan_segment;
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
