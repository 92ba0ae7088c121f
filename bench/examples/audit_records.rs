//! Stages the two audit records of each of N delivered messages through the
//! engine's own per-message calls (`audit::accepted` and
//! `audit::record_outcome`) and prints the time per message.
//!
//! `cargo run --release -p caduceus-bench --example audit_records -- 100000`
//!
//! Under `valgrind --tool=callgrind --toggle-collect=*stage_messages*` the
//! instruction count of the staging loop alone is independent of the
//! machine's load. Records reach the file through the stream's own
//! write-outs; the final sync and checkpoint at close are not timed.

use std::hint::black_box;
use std::time::Instant;

use caduceus_engine::audit;
use caduceus_engine::deliverylog::{Entry, Event};
use caduceus_policy::{Category, Lane};
use caduceus_spool::{Envelope, MessageId, Recipient, RecordRef};

const BASE_US: u64 = 1_796_346_000_000_000;

fn envelope(index: u64) -> Envelope {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&index.to_be_bytes());
    Envelope {
        message_id: MessageId(id),
        received_at_us: BASE_US + index,
        expires_at_us: BASE_US + index + 86_400_000_000,
        lane: Lane::Bulk,
        category: Category::Care,
        sender: "reminders@clinic.example".into(),
        envid: None,
        ret: None,
        body_8bit: false,
        smtputf8: false,
        peer_uid: 1000,
        peer_gid: 1000,
        peer_pid: 4242,
        recipients: vec![Recipient {
            address: "patient@d1.rcpt.example".into(),
            domain: "d1.rcpt.example".into(),
            notify: 0,
            orcpt: None,
        }],
    }
}

/// Stages the `accepted` and `outcome` records of each message in
/// `envelopes`, as admission and a successful delivery do.
#[inline(never)]
fn stage_messages(envelopes: &[Envelope], recipient_hmac: &str) {
    for (index, envelope) in envelopes.iter().enumerate() {
        let record = RecordRef {
            segment: 1,
            offset: index as u64 * 2300,
        };
        audit::accepted(envelope, record, 2048).expect("accepted record staged");
        let id = envelope.message_id.to_string();
        let mut entry = Entry::new(
            Event::Delivered,
            &id,
            envelope.lane,
            envelope.category,
            envelope.received_at_us,
        );
        entry.recipient = Some(recipient_hmac.to_string());
        entry.remote_host = Some("d1.rcpt.example");
        entry.remote_ip = Some("127.0.0.1".to_string());
        entry.reply_code = Some(250);
        entry.tls_version = Some("none");
        entry.attempt = Some(1);
        audit::record_outcome(black_box(&entry));
    }
}

fn main() {
    let count: u64 = std::env::args()
        .nth(1)
        .map(|text| text.parse().expect("the argument is a message count"))
        .unwrap_or(100_000);
    let directory = tempfile::tempdir().expect("temporary state directory");
    let config = caduceus_policy::config::Config {
        state_dir: directory.path().to_path_buf(),
        ..Default::default()
    };
    std::fs::create_dir_all(directory.path().join("keys")).expect("keys directory");
    let envelopes: Vec<Envelope> = (0..count).map(envelope).collect();
    let recipient_hmac = format!("hmac:{}", "5a".repeat(32));
    let elapsed = glommio::LocalExecutorBuilder::default()
        .spawn(move || async move {
            let setup = audit::AuditSetup::open(&config)
                .expect("audit setup")
                .expect("auditing is on by default");
            audit::install_core(&setup, 0).expect("audit stream");
            let started = Instant::now();
            stage_messages(&envelopes, &recipient_hmac);
            let elapsed = started.elapsed();
            audit::close_core().await;
            elapsed
        })
        .expect("executor")
        .join()
        .expect("executor result");
    println!(
        "{count} messages, {:.0} ns per message (two records each)",
        elapsed.as_nanos() as f64 / count as f64
    );
}
