//! Measures durable appends per second on one core: concurrent tasks each
//! append a 2 KiB message and wait for its group commit, like SMTP sessions
//! would. Run with
//! `cargo run --release -p caduceus-spool --example append_throughput [DIR]`;
//! the spool is written to DIR (default: a temporary directory), so the
//! result depends on that disk's fdatasync latency.
//!
//! `SPOOL_TASKS` sets the number of tasks (default 1024), `SPOOL_BATCH` the
//! `commit_max_batch` (default 256), and `SPOOL_PLAIN` turns encryption off.

use std::rc::Rc;
use std::time::{Duration, Instant};

use caduceus_policy::{Category, Lane};
use caduceus_spool::{Envelope, Keyring, MessageId, Recipient, Shard, SpoolOptions};

/// The total number of appends, shared out between the tasks.
const APPENDS: usize = 102_400;
const BODY_BYTES: usize = 2048;

fn envelope() -> Envelope {
    Envelope {
        message_id: MessageId::random(),
        received_at_us: 1,
        expires_at_us: 2,
        lane: Lane::Transactional,
        category: Category::Transactional,
        sender: "billing@clinic.example".into(),
        envid: None,
        ret: None,
        body_8bit: false,
        smtputf8: false,
        peer_uid: 0,
        peer_gid: 0,
        peer_pid: 0,
        recipients: vec![Recipient {
            address: "patient@example.net".into(),
            domain: "example.net".into(),
            notify: 0,
            orcpt: None,
        }],
    }
}

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name).map_or(default, |text| {
        text.parse()
            .unwrap_or_else(|_| panic!("{name}={text:?} is not a whole number"))
    })
}

fn main() {
    let task_count = env_number("SPOOL_TASKS", 1024).max(1);
    let batch = env_number("SPOOL_BATCH", 256);
    let appends_per_task = APPENDS / task_count;
    let temporary = tempfile::tempdir().expect("temporary directory");
    let dir = std::env::args()
        .nth(1)
        .map_or_else(|| temporary.path().to_owned(), Into::into);
    glommio::LocalExecutorBuilder::default()
        .make()
        .expect("glommio executor")
        .run(async move {
            let mut options = SpoolOptions::new(&dir, 0);
            options.reserve_bytes = 0;
            options.commit_max_wait = Duration::from_millis(2);
            options.commit_max_batch = batch as u32;
            if std::env::var_os("SPOOL_PLAIN").is_none() {
                options.keyring = Some(Keyring::from_hex(1, &"ab".repeat(32)).expect("key"));
            }
            let (shard, _, _) = Shard::open(options).await.expect("open spool");
            let body = vec![b'x'; BODY_BYTES];
            let started = Instant::now();
            let mut tasks = Vec::new();
            for _ in 0..task_count {
                let shard: Rc<Shard> = shard.clone();
                let body = body.clone();
                tasks.push(glommio::spawn_local(async move {
                    let envelope = envelope();
                    for _ in 0..appends_per_task {
                        let (record, seq) = shard.append_message(&envelope, &body).expect("append");
                        shard.durable(seq).await.expect("durable");
                        shard.release(record);
                    }
                }));
            }
            for task in tasks {
                task.await;
            }
            let elapsed = started.elapsed();
            let appends = (task_count * appends_per_task) as f64;
            println!(
                "{appends} durable {BODY_BYTES}-byte appends in {:.3} s: {:.0} appends/s",
                elapsed.as_secs_f64(),
                appends / elapsed.as_secs_f64()
            );
            let stats = shard.take_commit_stats();
            println!(
                "{} commits of {:.0} appends on average; fdatasync p50 {} us, p99 {} us",
                stats.commits(),
                stats.batch_records_total as f64 / stats.commits().max(1) as f64,
                stats.fsync_us.value_at_quantile(0.5),
                stats.fsync_us.value_at_quantile(0.99)
            );
            shard.close().await.expect("close");
        });
}
