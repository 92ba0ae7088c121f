//! Helpers shared by the spool's integration tests.
#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use caduceus_policy::{Category, Lane};
use caduceus_spool::{Envelope, Keyring, MessageId, Recipient, Ret, SpoolOptions, notify};

/// Runs `future` on a fresh single-threaded glommio executor.
pub fn run<T>(future: impl Future<Output = T>) -> T {
    glommio::LocalExecutorBuilder::default()
        .make()
        .expect("glommio executor starts (io_uring and locked memory available)")
        .run(future)
}

/// Builds an envelope whose addresses and ids are easy to search for in raw
/// bytes.
pub fn envelope(tag: u32, recipients: usize) -> Envelope {
    Envelope {
        message_id: MessageId::random(),
        received_at_us: 1_700_000_000_000_000 + u64::from(tag),
        expires_at_us: 1_700_086_400_000_000,
        lane: Lane::Transactional,
        category: Category::Care,
        sender: format!("clinic-sender-{tag}@provider.example"),
        envid: Some(format!("envid-{tag}")),
        ret: Some(Ret::Headers),
        body_8bit: true,
        smtputf8: false,
        peer_uid: 1000,
        peer_gid: 1001,
        peer_pid: 4242,
        recipients: (0..recipients)
            .map(|index| Recipient {
                address: format!("\"odd patient {tag}-{index}\"@example.net"),
                domain: "example.net".into(),
                notify: notify::FAILURE | notify::DELAY,
                orcpt: Some(format!("rfc822;patient{tag}-{index}@example.net")),
            })
            .collect(),
    }
}

pub fn body(tag: u32, size_bytes: usize) -> Vec<u8> {
    let mut body =
        format!("Subject: lab-result-{tag}\r\n\r\nDiagnosis: confidential-{tag}\r\n").into_bytes();
    body.resize(size_bytes.max(body.len()), b'x');
    body
}

pub fn options(dir: &std::path::Path, keyring: Option<Keyring>) -> SpoolOptions {
    SpoolOptions {
        dir: dir.to_owned(),
        shard: 3,
        segment_size_bytes: 256 * 1024,
        commit_max_wait: Duration::from_micros(200),
        commit_max_batch: 64,
        keyring,
        reserve_bytes: 0,
        list_appends: Default::default(),
    }
}

pub fn test_keyring(id: u32, fill: u8) -> Keyring {
    Keyring::from_hex(id, &hex::encode([fill; 32])).expect("valid test key")
}
