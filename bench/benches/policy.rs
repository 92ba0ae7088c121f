//! Policy and list benchmarks: rule lookup with 100,000 domain rules,
//! suppression and consent checks against 10 million list entries, the time
//! to compile both, and the resident memory they take.
//!
//! Criterion reports medians. It gives no tail latency, so each lookup
//! benchmark also times 1,000,000 single lookups into an HDR histogram and
//! prints p50, p99 and p99.9 to stdout. Those single timings include the
//! cost of reading the clock twice, which is measured and printed beside
//! them as `clock_overhead_ns`.
//!
//! Run with `cargo bench -p caduceus-bench --bench policy`.

use std::hint::black_box;
use std::io::{self, Read};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use caduceus_policy::config::{Config, RuleConfig};
use caduceus_policy::lists::{
    ImportList, ImportOptions, ListBuilder, ListTable, Reason, import_csv,
};
use caduceus_policy::{Category, Lane, Lists, Policy, SiteKey, TlsMode};
use criterion::{Criterion, criterion_group, criterion_main};
use hdrhistogram::Histogram;

const RULE_COUNT: u32 = 100_000;
const LIST_ENTRY_COUNT: u32 = 10_000_000;
const SAMPLED_LOOKUPS: usize = 1_000_000;

/// SplitMix64, so the query mix is the same on every run without a
/// dependency on a random number crate.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, bound: u32) -> u32 {
        (self.next() % u64::from(bound)) as u32
    }
}

/// Reads VmRSS from /proc/self/status, in KiB.
fn resident_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Measures the median cost of the two clock reads around each sample.
fn clock_overhead_ns() -> u64 {
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 1_000_000_000, 3).unwrap();
    for _ in 0..100_000 {
        let start = Instant::now();
        let elapsed = start.elapsed();
        histogram.saturating_record(elapsed.as_nanos() as u64);
    }
    histogram.value_at_quantile(0.5)
}

/// Times `lookup` once per query and prints the percentiles.
fn print_percentiles<Q>(label: &str, queries: &[Q], mut lookup: impl FnMut(&Q)) {
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 1_000_000_000, 3).unwrap();
    for query in queries.iter().cycle().take(SAMPLED_LOOKUPS) {
        let start = Instant::now();
        lookup(query);
        histogram.saturating_record(start.elapsed().as_nanos() as u64);
    }
    println!(
        "{label}: lookups={} p50_ns={} p99_ns={} p999_ns={} max_ns={} clock_overhead_ns={}",
        histogram.len(),
        histogram.value_at_quantile(0.5),
        histogram.value_at_quantile(0.99),
        histogram.value_at_quantile(0.999),
        histogram.max(),
        clock_overhead_ns(),
    );
}

// ---- Policy lookup ------------------------------------------------------

/// Builds a config with `RULE_COUNT` domain rules: three in four exact names, one
/// in four wildcards, as a large sending site with many partner domains
/// might have.
fn rule_config() -> Config {
    let rules = (0..RULE_COUNT)
        .map(|n| RuleConfig {
            domain: Some(if n % 4 == 3 {
                format!("*.tenant{n}.example")
            } else {
                format!("partner{n}.example")
            }),
            tls: Some(TlsMode::Verified),
            max_connections: Some(1 + n % 8),
            ..RuleConfig::default()
        })
        .collect();
    Config {
        rules,
        ..Config::default()
    }
}

/// Writes the same rules as [`rule_config`] as TOML text.
fn rule_toml() -> String {
    let mut text = String::new();
    for n in 0..RULE_COUNT {
        let domain = if n % 4 == 3 {
            format!("*.tenant{n}.example")
        } else {
            format!("partner{n}.example")
        };
        text.push_str(&format!(
            "[[rule]]\ndomain = \"{domain}\"\ntls = \"verified\"\nmax_connections = {}\n\n",
            1 + n % 8
        ));
    }
    text
}

/// Query names: exact hits, wildcard hits two labels deep, and misses, in
/// equal parts.
fn domain_queries() -> Vec<String> {
    let mut random = SplitMix(7);
    (0..SAMPLED_LOOKUPS)
        .map(|index| {
            let n = random.below(RULE_COUNT);
            match index % 3 {
                0 => format!("partner{}.example", n - n % 4),
                1 => format!("mx{}.eu.tenant{}.example", n % 10, n - n % 4 + 3),
                _ => format!("unknown{n}.example.org"),
            }
        })
        .collect()
}

fn policy_benches(c: &mut Criterion) {
    let config = rule_config();
    let rss_before_kib = resident_kib();
    let started = Instant::now();
    let policy = Policy::compile(&config).expect("the generated config is valid");
    let compile_ms = started.elapsed().as_millis();
    let rss_after_kib = resident_kib();
    println!(
        "policy: rules={RULE_COUNT} compile_ms={compile_ms} rss_growth_kib={}",
        rss_after_kib.saturating_sub(rss_before_kib)
    );

    let directory = tempfile::tempdir().expect("a temporary directory");
    let path = directory.path().join("policy.compiled");
    let started = Instant::now();
    policy
        .write_compiled(&path)
        .expect("writing the compiled policy");
    let write_ms = started.elapsed().as_millis();
    let started = Instant::now();
    let loaded = Policy::open_compiled(&path).expect("reading the compiled policy");
    let open_ms = started.elapsed().as_millis();
    let file_bytes = std::fs::metadata(&path).map(|meta| meta.len()).unwrap_or(0);
    println!(
        "policy: compiled_file_bytes={file_bytes} write_compiled_ms={write_ms} open_compiled_ms={open_ms}"
    );

    // What a start without the compiled file costs: parsing, validating
    // and compiling the TOML.
    let text = rule_toml();
    let started = Instant::now();
    let parsed = caduceus_policy::parse_config(&text, "generated.toml")
        .and_then(|config| Policy::compile(&config))
        .expect("the generated TOML is valid");
    println!(
        "policy: toml_bytes={} parse_and_compile_toml_ms={}",
        text.len(),
        started.elapsed().as_millis()
    );
    drop(parsed);

    let queries = domain_queries();
    let mut group = c.benchmark_group("policy");
    group.measurement_time(Duration::from_secs(10));
    group.sample_size(50);
    let mut next = 0;
    group.bench_function("for_domain_100k_rules", |b| {
        b.iter(|| {
            next = (next + 1) % queries.len();
            black_box(
                loaded
                    .for_domain(black_box(&queries[next]), Lane::Bulk)
                    .rule_id,
            )
        })
    });
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    group.bench_function("compile_100k_rules", |b| {
        b.iter(|| Policy::compile(black_box(&config)).map(|policy| policy.rule_count()))
    });
    group.finish();

    print_percentiles("policy for_domain 100k rules", &queries, |query| {
        black_box(loaded.for_domain(black_box(query), Lane::Bulk).rule_id);
    });
}

// ---- Lists --------------------------------------------------------------

/// Generates `address,reason` CSV lines on the fly, so that a 10-million
/// line import needs no 300 MB input file.
struct GeneratedCsv {
    next: u32,
    end: u32,
    pending: Vec<u8>,
    offset: usize,
}

impl GeneratedCsv {
    fn new(count: u32) -> GeneratedCsv {
        GeneratedCsv {
            next: 0,
            end: count,
            pending: b"address,reason\n".to_vec(),
            offset: 0,
        }
    }
}

const REASONS: [&str; 4] = ["opt-out", "hard-bounce", "complaint", ""];

fn list_address(n: u32) -> String {
    format!("patient.{n}@clinic{}.example", n % 1000)
}

impl Read for GeneratedCsv {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        while self.offset == self.pending.len() {
            if self.next == self.end {
                return Ok(0);
            }
            self.pending.clear();
            self.offset = 0;
            while self.pending.len() < 64 * 1024 && self.next < self.end {
                let n = self.next;
                let line = format!("{},{}\n", list_address(n), REASONS[n as usize % 4]);
                self.pending.extend_from_slice(line.as_bytes());
                self.next += 1;
            }
        }
        let available = &self.pending[self.offset..];
        let count = available.len().min(buffer.len());
        buffer[..count].copy_from_slice(&available[..count]);
        self.offset += count;
        Ok(count)
    }
}

fn import_options() -> ImportOptions {
    ImportOptions {
        list: ImportList::Suppression {
            default_reason: Some(Reason::OptOut),
        },
        threads: std::thread::available_parallelism().map_or(1, |count| count.get()),
    }
}

/// Builds the 10-million entry table once, printing its cost.
fn big_table(key: &SiteKey) -> &'static Arc<ListTable> {
    static TABLE: OnceLock<Arc<ListTable>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let rss_before_kib = resident_kib();
        let started = Instant::now();
        let imported = import_csv(GeneratedCsv::new(LIST_ENTRY_COUNT), key, &import_options())
            .expect("the generated CSV is valid");
        let import_ms = started.elapsed().as_millis();
        let started = Instant::now();
        let mut builder = ListBuilder::new();
        builder.add_imported(imported);
        let table = builder.build(key);
        let build_ms = started.elapsed().as_millis();
        let rss_after_kib = resident_kib();
        println!(
            "lists: entries={} threads={} import_csv_ms={import_ms} build_ms={build_ms} rss_growth_kib={}",
            table.len(),
            import_options().threads,
            rss_after_kib.saturating_sub(rss_before_kib)
        );

        let directory = tempfile::tempdir().expect("a temporary directory");
        let path = directory.path().join("lists.bin");
        let started = Instant::now();
        table.write(&path).expect("writing the list file");
        let write_ms = started.elapsed().as_millis();
        drop(table);
        let rss_before_open_kib = resident_kib();
        let started = Instant::now();
        let loaded = ListTable::open(&path, key).expect("reading the list file");
        let open_ms = started.elapsed().as_millis();
        println!(
            "lists: list_file_bytes={} write_ms={write_ms} open_ms={open_ms} rss_growth_on_open_kib={}",
            std::fs::metadata(&path).map(|meta| meta.len()).unwrap_or(0),
            resident_kib().saturating_sub(rss_before_open_kib)
        );
        Arc::new(loaded)
    })
}

fn list_benches(c: &mut Criterion) {
    let key = SiteKey::from_bytes(&[0x42; 32]);
    let table = big_table(&key);
    // A few runtime changes, so that lookups also pass the overlay.
    let changes: Vec<_> = (0..1000)
        .map(|n| caduceus_policy::lists::Change {
            op: caduceus_policy::lists::ChangeOp::Add,
            entry: caduceus_policy::lists::Entry::Consent,
            hmac: key
                .try_hmac_address(&format!("runtime{n}@example.org"))
                .expect("a valid address"),
            time_unix_ms: 0,
        })
        .collect();
    let lists = Lists::from_table(Arc::clone(table)).with_changes(&changes);

    // Half present, half absent, in random order.
    let mut random = SplitMix(11);
    let queries: Vec<[u8; 32]> = (0..SAMPLED_LOOKUPS)
        .map(|index| {
            let address = if index % 2 == 0 {
                list_address(random.below(LIST_ENTRY_COUNT))
            } else {
                format!("absent{}@elsewhere.example", random.next())
            };
            key.try_hmac_address(&address).expect("a valid address")
        })
        .collect();

    let mut group = c.benchmark_group("lists");
    group.measurement_time(Duration::from_secs(10));
    group.sample_size(50);
    let mut next = 0;
    group.bench_function("check_10m_entries", |b| {
        b.iter(|| {
            next = (next + 1) % queries.len();
            black_box(lists.check(black_box(&queries[next]), Category::Marketing))
        })
    });
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(30));
    group.bench_function("import_and_build_1m_entries", |b| {
        b.iter(|| {
            let imported = import_csv(GeneratedCsv::new(1_000_000), &key, &import_options())
                .expect("the generated CSV is valid");
            let mut builder = ListBuilder::new();
            builder.add_imported(imported);
            builder.build(&key).len()
        })
    });
    group.finish();

    print_percentiles("lists check 10m entries", &queries, |query| {
        black_box(lists.check(black_box(query), Category::Marketing));
    });
}

criterion_group!(benches, policy_benches, list_benches);
criterion_main!(benches);
