//! Spool append and group commit, against the disk's raw limits measured
//! in the same run: the rate of `write` + `fdatasync` of the same size, and
//! sequential write bandwidth.
//!
//! Each spool iteration appends one message and waits until its commit is
//! durable, like one SMTP session that acknowledges after the commit. With
//! a single writer no group commit can batch, so the result is bound by
//! fdatasync latency and is directly comparable to the raw fdatasync line.
//! Messages of 1 KiB, 10 KiB and 100 KiB, encryption on and off.
//!
//! The spool and the raw files go to `$CADUCEUS_BENCH_DIR` when set,
//! otherwise to a temporary directory; the numbers depend on that disk.
//! Run with `cargo bench -p caduceus-bench --bench spool`.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use caduceus_policy::{Category, Lane};
use caduceus_spool::{Envelope, Keyring, MessageId, Recipient, Shard, SpoolOptions};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

const SIZES_BYTES: [usize; 3] = [1024, 10 * 1024, 100 * 1024];
/// Chunk size of the sequential write bandwidth measurement.
const SEQUENTIAL_CHUNK_BYTES: usize = 1024 * 1024;

fn bench_dir() -> (Option<tempfile::TempDir>, PathBuf) {
    match std::env::var_os("CADUCEUS_BENCH_DIR") {
        Some(dir) => (None, PathBuf::from(dir)),
        None => {
            let temporary = tempfile::tempdir().expect("temporary directory for the benchmark");
            let path = temporary.path().to_path_buf();
            (Some(temporary), path)
        }
    }
}

fn envelope() -> Envelope {
    Envelope {
        message_id: MessageId::random(),
        received_at_us: 1,
        expires_at_us: u64::MAX,
        lane: Lane::Bulk,
        category: Category::Care,
        sender: "news@clinic.example".into(),
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

/// Opens a fresh spool in `dir` on a new glommio executor, appends and
/// commits `iterations` messages of `size_bytes` one after the other, and
/// returns the time the appends took (opening excluded).
fn spool_appends(dir: &Path, size_bytes: usize, encrypted: bool, iterations: u64) -> Duration {
    let spool_dir = dir.join(format!("spool-{}", MessageId::random()));
    glommio::LocalExecutorBuilder::default()
        .make()
        .expect("glommio executor")
        .run(async move {
            let mut options = SpoolOptions::new(&spool_dir, 0);
            options.reserve_bytes = 0;
            options.segment_size_bytes = 64 * 1024 * 1024;
            options.commit_max_wait = Duration::from_micros(0);
            if encrypted {
                options.keyring = Some(Keyring::from_hex(1, &"ab".repeat(32)).expect("key"));
            }
            let (shard, _, _) = Shard::open(options).await.expect("open spool");
            let envelope = envelope();
            let body = vec![b'x'; size_bytes];
            let started = Instant::now();
            for _ in 0..iterations {
                let (record, seq) = shard.append_message(&envelope, &body).expect("append");
                shard.durable(seq).await.expect("durable");
                shard.release(record);
            }
            let elapsed = started.elapsed();
            drop(shard);
            let _ = std::fs::remove_dir_all(&spool_dir);
            elapsed
        })
}

fn spool_append_commit(criterion: &mut Criterion) {
    let (_temporary, dir) = bench_dir();
    let mut group = criterion.benchmark_group("spool_append_commit");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    for size_bytes in SIZES_BYTES {
        group.throughput(Throughput::Bytes(size_bytes as u64));
        for encrypted in [false, true] {
            let name = if encrypted { "encrypted" } else { "plain" };
            group.bench_with_input(
                BenchmarkId::new(name, size_bytes),
                &size_bytes,
                |bench, &size_bytes| {
                    bench.iter_custom(|iterations| {
                        spool_appends(&dir, size_bytes, encrypted, iterations)
                    });
                },
            );
        }
    }
    group.finish();
}

/// `write` of `size_bytes` then `fdatasync`, the floor under any durable
/// append of that size.
fn raw_fdatasync(criterion: &mut Criterion) {
    let (_temporary, dir) = bench_dir();
    let mut group = criterion.benchmark_group("raw_write_fdatasync");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    for size_bytes in SIZES_BYTES {
        group.throughput(Throughput::Bytes(size_bytes as u64));
        let path = dir.join(format!("fdatasync-{size_bytes}"));
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)
            .expect("open the raw fdatasync file");
        let chunk = vec![b'x'; size_bytes];
        group.bench_with_input(
            BenchmarkId::from_parameter(size_bytes),
            &chunk,
            |bench, chunk| {
                bench.iter(|| {
                    file.write_all(chunk).expect("write");
                    file.sync_data().expect("fdatasync");
                });
            },
        );
        let _ = std::fs::remove_file(&path);
    }
    group.finish();
}

/// Sequential 1 MiB writes with one fdatasync per 64 MiB, for the disk's
/// bandwidth.
fn sequential_write(criterion: &mut Criterion) {
    let (_temporary, dir) = bench_dir();
    let mut group = criterion.benchmark_group("sequential_write");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Bytes((64 * SEQUENTIAL_CHUNK_BYTES) as u64));
    let path = dir.join("sequential");
    let chunk = vec![b'x'; SEQUENTIAL_CHUNK_BYTES];
    group.bench_function("64MiB_then_fdatasync", |bench| {
        bench.iter(|| {
            let mut file = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .open(&path)
                .expect("open the sequential file");
            for _ in 0..64 {
                file.write_all(&chunk).expect("write");
            }
            file.sync_data().expect("fdatasync");
        });
    });
    let _ = std::fs::remove_file(&path);
    group.finish();
}

criterion_group!(
    benches,
    spool_append_commit,
    raw_fdatasync,
    sequential_write
);
criterion_main!(benches);
