//! Spool append and group commit, recovery and the cost of encryption,
//! against the disk's raw limits measured in the same run: the rate of
//! `write` + `fdatasync` of the same size, and sequential write bandwidth.
//!
//! `spool_append_commit` appends one message and waits until its commit is
//! durable, like one SMTP session that acknowledges after the commit. With
//! a single writer no group commit can batch, so the result is bound by
//! fdatasync latency and is directly comparable to the raw fdatasync line.
//! Messages of 1 KiB, 10 KiB and 100 KiB, encryption on and off.
//!
//! `spool_group_commit` appends a batch of 256 messages of 2 KiB and waits
//! for the one fdatasync that covers them all, then starts the next batch,
//! so appends and syncs never overlap. `record_build` builds the same
//! records in memory only, so the cost of sealing is visible without the
//! disk's noise.
//!
//! `spool_pipelined` keeps appending 2 KiB messages while commits run, with
//! up to [`PIPELINED_IN_FLIGHT`] messages appended but not yet waited for,
//! like that many SMTP sessions waiting for their `250`. It is what a busy
//! core does, and it is the figure for the append and commit throughput
//! target. It runs with `commit_max_batch` 256 and 1024.
//!
//! `spool_recovery` builds a spool of `$CADUCEUS_BENCH_RECOVERY_MESSAGES`
//! (default 500,000) encrypted 2 KiB messages once, about 1.1 GB of
//! records, and measures how long opening it takes. `cold` evicts the
//! segment files from the page cache first, so they are read from the
//! disk. `warm` leaves them cached, so only decryption, CRC and decoding
//! remain.
//!
//! The spool and the raw files go to `$CADUCEUS_BENCH_DIR` when set,
//! otherwise to a temporary directory; the numbers depend on that disk.
//! Run with `cargo bench -p caduceus-bench --bench spool`.

use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use caduceus_policy::{Category, Lane};
use caduceus_spool::format::{RecordBuilder, Sealing};
use caduceus_spool::{Envelope, Keyring, MessageId, Recipient, Shard, SpoolOptions};
use criterion::{
    BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};
use ring::aead::{AES_256_GCM, LessSafeKey, UnboundKey};

const SIZES_BYTES: [usize; 3] = [1024, 10 * 1024, 100 * 1024];
/// Chunk size of the sequential write bandwidth measurement.
const SEQUENTIAL_CHUNK_BYTES: usize = 1024 * 1024;
/// Message size of the group commit, record build and recovery benchmarks.
const BATCH_MESSAGE_BYTES: usize = 2048;
/// Messages per group commit: the spool's default `commit_max_batch`.
const BATCH_MESSAGES: usize = 256;
/// Messages appended and not yet waited for in `spool_pipelined`.
const PIPELINED_IN_FLIGHT: usize = 1024;
/// Appends between two yields to the executor in `spool_pipelined`, so the
/// committer and the sync tasks run while appends go on, as they would
/// between the reads of many SMTP sessions.
const PIPELINED_APPENDS_PER_YIELD: u64 = 16;
/// The `commit_max_batch` values that `spool_pipelined` compares.
const PIPELINED_BATCHES: [u32; 2] = [256, 1024];
/// Messages in the recovery benchmark's spool unless
/// `$CADUCEUS_BENCH_RECOVERY_MESSAGES` sets another count.
const RECOVERY_MESSAGES: u64 = 500_000;
const KEY_HEX: &str = "abababababababababababababababababababababababababababababababab";

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
                options.keyring = Some(Keyring::from_hex(1, KEY_HEX).expect("key"));
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

/// Opens a fresh spool in `dir`, then runs `batches` group commits of
/// [`BATCH_MESSAGES`] appends each and returns the time they took. Messages
/// are released after each timed commit, untimed, so segments are reclaimed
/// and the disk use stays bounded.
fn spool_batches(dir: &Path, encrypted: bool, batches: u64) -> Duration {
    let spool_dir = dir.join(format!("spool-{}", MessageId::random()));
    glommio::LocalExecutorBuilder::default()
        .make()
        .expect("glommio executor")
        .run(async move {
            let mut options = SpoolOptions::new(&spool_dir, 0);
            options.reserve_bytes = 0;
            options.commit_max_batch = BATCH_MESSAGES as u32;
            if encrypted {
                options.keyring = Some(Keyring::from_hex(1, KEY_HEX).expect("key"));
            }
            let (shard, _, _) = Shard::open(options).await.expect("open spool");
            let envelope = envelope();
            let body = vec![b'x'; BATCH_MESSAGE_BYTES];
            let mut records = Vec::with_capacity(BATCH_MESSAGES);
            let mut elapsed = Duration::ZERO;
            for _ in 0..batches {
                let started = Instant::now();
                let mut last = None;
                for _ in 0..BATCH_MESSAGES {
                    let (record, seq) = shard.append_message(&envelope, &body).expect("append");
                    records.push(record);
                    last = Some(seq);
                }
                if let Some(seq) = last {
                    shard.durable(seq).await.expect("durable");
                }
                elapsed += started.elapsed();
                for record in records.drain(..) {
                    shard.release(record);
                }
            }
            shard.close().await.expect("close spool");
            drop(shard);
            let _ = std::fs::remove_dir_all(&spool_dir);
            elapsed
        })
}

fn spool_group_commit(criterion: &mut Criterion) {
    let (_temporary, dir) = bench_dir();
    let mut group = criterion.benchmark_group("spool_group_commit");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Elements(BATCH_MESSAGES as u64));
    for encrypted in [false, true] {
        let name = if encrypted { "encrypted" } else { "plain" };
        group.bench_function(BenchmarkId::new(name, "256x2KiB"), |bench| {
            bench.iter_custom(|batches| spool_batches(&dir, encrypted, batches));
        });
    }
    group.finish();
}

/// Opens a fresh spool in `dir` with `commit_max_batch` set to `batch` and
/// appends `messages` 2 KiB messages. Whenever [`PIPELINED_IN_FLIGHT`] wait
/// for their commit, it waits for the oldest one and releases it. Returns
/// the time until the last message is durable.
fn spool_pipeline(dir: &Path, encrypted: bool, batch: u32, messages: u64) -> Duration {
    let spool_dir = dir.join(format!("spool-{}", MessageId::random()));
    glommio::LocalExecutorBuilder::default()
        .make()
        .expect("glommio executor")
        .run(async move {
            let mut options = SpoolOptions::new(&spool_dir, 0);
            options.reserve_bytes = 0;
            options.commit_max_batch = batch;
            if encrypted {
                options.keyring = Some(Keyring::from_hex(1, KEY_HEX).expect("key"));
            }
            let (shard, _, _) = Shard::open(options).await.expect("open spool");
            let envelope = envelope();
            let body = vec![b'x'; BATCH_MESSAGE_BYTES];
            let mut waiting = VecDeque::with_capacity(PIPELINED_IN_FLIGHT);
            let started = Instant::now();
            for appended in 0..messages {
                waiting.push_back(shard.append_message(&envelope, &body).expect("append"));
                if waiting.len() >= PIPELINED_IN_FLIGHT {
                    // Checked by the condition.
                    let (record, seq) = waiting.pop_front().expect("a waiting message");
                    shard.durable(seq).await.expect("durable");
                    shard.release(record);
                }
                if appended % PIPELINED_APPENDS_PER_YIELD == 0 {
                    futures_lite::future::yield_now().await;
                }
            }
            for (record, seq) in waiting.drain(..) {
                shard.durable(seq).await.expect("durable");
                shard.release(record);
            }
            let elapsed = started.elapsed();
            shard.close().await.expect("close spool");
            drop(shard);
            let _ = std::fs::remove_dir_all(&spool_dir);
            elapsed
        })
}

fn spool_pipelined(criterion: &mut Criterion) {
    let (_temporary, dir) = bench_dir();
    let mut group = criterion.benchmark_group("spool_pipelined");
    // One sample commits tens of thousands of messages, so take each as
    // one run rather than growing the iteration count per sample.
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Elements(1));
    for batch in PIPELINED_BATCHES {
        for encrypted in [false, true] {
            let name = if encrypted { "encrypted" } else { "plain" };
            group.bench_function(BenchmarkId::new(name, format!("batch{batch}")), |bench| {
                bench.iter_custom(|messages| spool_pipeline(&dir, encrypted, batch, messages));
            });
        }
    }
    group.finish();
}

/// Builds 2 KiB message records in memory, sealed and clear: the CPU cost
/// of a record without the disk.
fn record_build(criterion: &mut Criterion) {
    let key = LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, &[0xab; 32]).expect("a 32-byte AES-256 key"),
    );
    let envelope = envelope();
    let body = vec![b'x'; BATCH_MESSAGE_BYTES];
    let mut builder = RecordBuilder::default();
    let mut counter = 0u64;
    let mut group = criterion.benchmark_group("record_build");
    group.throughput(Throughput::Elements(1));
    group.bench_function("plain/2KiB", |bench| {
        bench.iter(|| {
            let record = builder
                .message(&envelope, &body, Sealing::Clear)
                .expect("build");
            std::hint::black_box(record.len())
        });
    });
    group.bench_function("encrypted/2KiB", |bench| {
        bench.iter(|| {
            counter += 1;
            let mut nonce = [0u8; 12];
            nonce[4..].copy_from_slice(&counter.to_le_bytes());
            let sealing = Sealing::Sealed {
                key_id: 1,
                key: &key,
                nonce,
            };
            let record = builder.message(&envelope, &body, sealing).expect("build");
            std::hint::black_box(record.len())
        });
    });
    group.finish();
}

/// Appends `messages` encrypted 2 KiB messages to a new spool in
/// `spool_dir` in group commits of [`BATCH_MESSAGES`], then closes it.
fn build_recovery_spool(spool_dir: &Path, messages: u64) {
    let spool_dir = spool_dir.to_path_buf();
    glommio::LocalExecutorBuilder::default()
        .make()
        .expect("glommio executor")
        .run(async move {
            let mut options = SpoolOptions::new(&spool_dir, 0);
            options.reserve_bytes = 0;
            options.keyring = Some(Keyring::from_hex(1, KEY_HEX).expect("key"));
            let (shard, _, _) = Shard::open(options).await.expect("open spool");
            let body = vec![b'x'; BATCH_MESSAGE_BYTES];
            let mut written = 0;
            while written < messages {
                let mut last = None;
                for _ in 0..BATCH_MESSAGES.min((messages - written) as usize) {
                    let mut envelope = envelope();
                    envelope.message_id = MessageId::random();
                    let (_, seq) = shard.append_message(&envelope, &body).expect("append");
                    last = Some(seq);
                    written += 1;
                }
                if let Some(seq) = last {
                    shard.durable(seq).await.expect("durable");
                }
            }
            shard.close().await.expect("close spool");
        })
}

/// Returns the length of one sealed 2 KiB message record, header, tag and
/// padding included.
fn sealed_record_bytes() -> u64 {
    let key = LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, &[0xab; 32]).expect("a 32-byte AES-256 key"),
    );
    let sealing = Sealing::Sealed {
        key_id: 1,
        key: &key,
        nonce: [0; 12],
    };
    let mut builder = RecordBuilder::default();
    let body = vec![b'x'; BATCH_MESSAGE_BYTES];
    let record = builder
        .message(&envelope(), &body, sealing)
        .expect("build a record");
    record.len() as u64
}

/// Evicts the spool's segment files from the page cache, so the next open
/// reads them from the disk. Only these files are affected.
fn evict_from_page_cache(spool_dir: &Path) {
    for entry in std::fs::read_dir(spool_dir)
        .expect("list the spool")
        .flatten()
    {
        let file = std::fs::File::open(entry.path()).expect("open a segment");
        // Dirty pages cannot be dropped, and the spool syncs every commit,
        // but sync again so the advice is never silently partial.
        file.sync_all().expect("sync a segment");
        posix_fadvise(
            file.as_raw_fd(),
            0,
            0,
            PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .unwrap_or_else(|error| {
            panic!(
                "posix_fadvise failed on {}: {error}",
                entry.path().display()
            )
        });
    }
}

/// Opens the spool in `spool_dir` `iterations` times and returns the time
/// the opens took, evicting it from the page cache before each when `cold`.
fn recover_spool(
    spool_dir: &Path,
    cold: bool,
    iterations: u64,
    expected_messages: u64,
) -> Duration {
    let spool_dir = spool_dir.to_path_buf();
    glommio::LocalExecutorBuilder::default()
        .make()
        .expect("glommio executor")
        .run(async move {
            let mut elapsed = Duration::ZERO;
            for _ in 0..iterations {
                if cold {
                    evict_from_page_cache(&spool_dir);
                }
                let mut options = SpoolOptions::new(&spool_dir, 0);
                options.reserve_bytes = 0;
                options.keyring = Some(Keyring::from_hex(1, KEY_HEX).expect("key"));
                let started = Instant::now();
                let (shard, messages, report) = Shard::open(options).await.expect("open spool");
                elapsed += started.elapsed();
                assert_eq!(messages.len() as u64, expected_messages);
                assert!(report.quarantined.is_empty(), "{:?}", report.quarantined);
                shard.close().await.expect("close spool");
            }
            elapsed
        })
}

fn spool_recovery(criterion: &mut Criterion) {
    let messages = std::env::var("CADUCEUS_BENCH_RECOVERY_MESSAGES")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(RECOVERY_MESSAGES);
    let (_temporary, dir) = bench_dir();
    let spool_dir = dir.join(format!("recovery-{}", MessageId::random()));
    let record_bytes = messages * sealed_record_bytes();
    // Built on first use, so a filter that skips this group skips the build.
    let built = std::cell::OnceCell::new();
    let build = || {
        built.get_or_init(|| {
            let started = Instant::now();
            build_recovery_spool(&spool_dir, messages);
            eprintln!(
                "spool_recovery: built {messages} messages, {record_bytes} bytes of records, in {:.1} s",
                started.elapsed().as_secs_f64()
            );
        });
    };

    let mut group = criterion.benchmark_group("spool_recovery");
    // One open reads the whole spool, so every sample is one open.
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    group.throughput(Throughput::Bytes(record_bytes));
    for cold in [true, false] {
        let name = if cold { "cold" } else { "warm" };
        group.bench_function(BenchmarkId::new(name, messages), |bench| {
            build();
            bench.iter_custom(|iterations| recover_spool(&spool_dir, cold, iterations, messages));
        });
    }
    group.finish();
    let _ = std::fs::remove_dir_all(&spool_dir);
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
    spool_group_commit,
    spool_pipelined,
    record_build,
    spool_recovery,
    spool_append_commit,
    raw_fdatasync,
    sequential_write
);
criterion_main!(benches);
