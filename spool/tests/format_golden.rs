//! Pins the exact bytes of a record, so a change to the archive layout (for
//! example another crate enabling rkyv's `big_endian` or `unaligned`
//! feature, which rkyv does not reject) fails here instead of silently
//! changing the on-disk format.

use caduceus_policy::{Category, Lane};
use caduceus_spool::format::{RecordBuilder, Sealing};
use caduceus_spool::{Envelope, MessageId, Recipient, Ret, notify};

fn fixed_envelope() -> Envelope {
    Envelope {
        message_id: MessageId([0x11; 16]),
        received_at_us: 0x0102_0304_0506_0708,
        expires_at_us: 0x1112_1314_1516_1718,
        lane: Lane::Bulk,
        category: Category::Marketing,
        sender: "s@a.example".into(),
        envid: Some("E1".into()),
        ret: Some(Ret::Full),
        body_8bit: true,
        smtputf8: true,
        peer_uid: 7,
        peer_gid: 8,
        peer_pid: 9,
        recipients: vec![Recipient {
            address: "r@b.example".into(),
            domain: "b.example".into(),
            notify: notify::SUCCESS,
            orcpt: None,
        }],
    }
}

const GOLDEN: &str = include_str!("golden_record.hex");

#[test]
fn clear_record_bytes_are_stable() {
    let mut builder = RecordBuilder::default();
    let record = builder
        .message(&fixed_envelope(), b"hello", Sealing::Clear)
        .unwrap();
    assert_eq!(hex::encode(record), GOLDEN.trim());
}
