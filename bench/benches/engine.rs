//! Microbenchmarks of the engine's hot paths: SMTP command parsing, DATA
//! scanning with dot-unstuffing, the per-destination token bucket, and DSN
//! building.
//!
//! Run with `cargo bench -p caduceus-bench --bench engine`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use caduceus_engine::dsn::{DsnAction, DsnInput, DsnRecipient, build_dsn};
use caduceus_engine::ingress::command::parse_command;
use caduceus_engine::ingress::data::DataScanner;
use caduceus_engine::inject::stuff_body;
use caduceus_engine::shard::throttle::TokenBucket;
use caduceus_engine::smtp::EnhancedStatus;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

const COMMAND_LINES: [&[u8]; 5] = [
    b"EHLO ehr.clinic.example",
    b"MAIL FROM:<reminders@clinic.example> BODY=8BITMIME SIZE=4096",
    b"RCPT TO:<patient.name+tag@mail.example.org> NOTIFY=FAILURE,DELAY ORCPT=rfc822;patient.name+tag@mail.example.org",
    b"RCPT TO:<\"quoted local\"@[192.0.2.10]>",
    b"DATA",
];

fn command_parsing(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("parse_command");
    for line in COMMAND_LINES {
        let name = String::from_utf8_lossy(&line[..line.len().min(12)]).into_owned();
        group.throughput(Throughput::Bytes(line.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(name), line, |bench, line| {
            bench.iter(|| parse_command(black_box(line), false));
        });
    }
    group.finish();
}

/// Builds a message of about `size_bytes` with 78-octet lines, every fifth
/// line starting with a dot, dot-stuffed and terminated as on the wire.
fn stuffed_message(size_bytes: usize) -> Vec<u8> {
    let mut message = b"From: a@clinic.example\r\nSubject: scan\r\n\r\n".to_vec();
    let mut line = 0;
    while message.len() < size_bytes {
        if line % 5 == 0 {
            message.push(b'.');
        }
        message.extend_from_slice(&[b'x'; 76]);
        message.extend_from_slice(b"\r\n");
        line += 1;
    }
    let mut wire = Vec::with_capacity(message.len() + message.len() / 50);
    stuff_body(&message, &mut wire);
    wire
}

fn data_scanning(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("data_scanner");
    for size_bytes in [1024, 10 * 1024, 100 * 1024, 1024 * 1024] {
        let wire = stuffed_message(size_bytes);
        group.throughput(Throughput::Bytes(wire.len() as u64));
        group.bench_with_input(
            BenchmarkId::from_parameter(size_bytes),
            &wire,
            |bench, wire| {
                bench.iter(|| {
                    let mut scanner = DataScanner::new(64 * 1024 * 1024, 998);
                    // The listener reads 64 KiB at a time.
                    for chunk in wire.chunks(64 * 1024) {
                        scanner.scan(black_box(chunk));
                    }
                    assert!(scanner.is_finished(), "the terminator was not found");
                    scanner
                });
            },
        );
    }
    group.finish();
}

fn dsn_building(criterion: &mut Criterion) {
    let original = stuffed_message(10 * 1024);
    let recipients = [DsnRecipient {
        final_recipient: "patient@mail.example.org",
        original_recipient: None,
        action: DsnAction::Failed,
        status: EnhancedStatus::new(5, 1, 1),
        remote_mta: Some("mx.example.org"),
        diagnostic: Some("550 5.1.1 Mailbox unavailable"),
        last_attempt_unix_us: Some(1_700_000_000_000_000),
        will_retry_until_unix_us: None,
    }];
    let input = DsnInput {
        reporting_mta: "mta.clinic.example",
        sender: "reminders@clinic.example",
        envid: Some("appointment-1234"),
        arrival_unix_us: 1_700_000_000_000_000,
        recipients: &recipients,
        original: &original,
        ret: None,
        smtputf8: false,
    };
    criterion.bench_function("build_dsn/10KiB original", |bench| {
        bench.iter(|| build_dsn(black_box(&input)));
    });
}

/// One `take` per delivery attempt: with tokens to spare, and on an empty
/// bucket that returns the wait.
fn token_bucket(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("token_bucket");
    let start = Instant::now();
    group.bench_function("take_available", |bench| {
        let mut bucket = TokenBucket::new(1e12, u32::MAX, start);
        let mut now = start;
        bench.iter(|| {
            now += Duration::from_nanos(1);
            black_box(bucket.take(black_box(now)))
        });
    });
    group.bench_function("take_empty", |bench| {
        let mut bucket = TokenBucket::new(50.0, 1, start);
        let _ = bucket.take(start);
        bench.iter(|| black_box(bucket.take(black_box(start))));
    });
    group.finish();
}

criterion_group!(
    benches,
    command_parsing,
    data_scanning,
    token_bucket,
    dsn_building
);
criterion_main!(benches);
