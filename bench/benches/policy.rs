//! Policy and list benchmarks: rule lookup with 100,000 domain rules,
//! suppression and consent checks against 10 million list entries, the time
//! to compile both, and the resident memory they take.
//!
//! Criterion reports means and medians but no tail latency, so each lookup
//! benchmark also prints percentiles measured two ways, both over the same
//! random query order:
//!
//! - `single`: each lookup is timed alone with two `Instant::now()` calls.
//!   Those calls cost about 20 ns on the machine that docs/benchmarks.md
//!   describes, a third to half of a lookup that hits the caches. So an
//!   empty timed region is measured in the same loop, alternating with the
//!   lookups. The line
//!   prints the raw percentiles, the empty region's percentiles, and
//!   `corrected`: each raw percentile minus the empty region's median. The
//!   correction is an estimate, because clock cost and lookup overlap in
//!   the CPU's pipeline.
//! - `chained`: batches of `BATCH_LOOKUPS` lookups are timed together, and
//!   each lookup's query index depends on the previous lookup's result, so
//!   the CPU cannot overlap their cache misses. The printed figures are
//!   percentiles of the per-lookup mean of each batch, which dilutes the
//!   clock cost 16 times but also smooths the tail within a batch.
//!
//! Preemption on a shared machine shows up in the p99.9 and max of both.
//!
//! Run with `cargo bench -p caduceus-bench --bench policy`. A criterion
//! filter such as `-- --exact none` skips the criterion runs and keeps the
//! percentile lines and the compile and memory figures.

use std::hint::black_box;
use std::io::{self, Read};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use caduceus_policy::config::{Config, RuleConfig};
use caduceus_policy::lists::{
    ImportList, ImportOptions, ListBuilder, ListTable, Reason, import_csv,
};
use caduceus_policy::{Category, Lane, Lists, Policy, SiteKey, TlsMode, Verdict};
use criterion::{Criterion, criterion_group, criterion_main};
use hdrhistogram::Histogram;

const RULE_COUNT: u32 = 100_000;
const LIST_ENTRY_COUNT: u32 = 10_000_000;
const SAMPLED_LOOKUPS: usize = 1_000_000;
/// Lookups per timed batch in the `chained` measurement.
const BATCH_LOOKUPS: usize = 16;

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

/// Reads a `kB` field such as `VmRSS` from /proc/self/status, in KiB.
fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
                .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn resident_kib() -> u64 {
    status_kib("VmRSS")
}

/// Returns the anonymous memory backed by transparent huge pages, in KiB,
/// from /proc/self/smaps_rollup.
fn huge_page_kib() -> u64 {
    std::fs::read_to_string("/proc/self/smaps_rollup")
        .ok()
        .and_then(|rollup| {
            rollup
                .lines()
                .find_map(|line| line.strip_prefix("AnonHugePages:"))
                .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn new_histogram() -> Histogram<u64> {
    // Bounds of 1 ns to 1 s with 3 significant digits are valid constants.
    Histogram::<u64>::new_with_bounds(1, 1_000_000_000, 3).expect("valid histogram bounds")
}

/// Prints p50, p99, p99.9 and max of `histogram`, less `offset_ns` each.
fn quantiles(histogram: &Histogram<u64>, offset_ns: u64) -> String {
    let at = |quantile: f64| {
        histogram
            .value_at_quantile(quantile)
            .saturating_sub(offset_ns)
    };
    format!(
        "p50_ns={} p99_ns={} p999_ns={} max_ns={}",
        at(0.5),
        at(0.99),
        at(0.999),
        histogram.max().saturating_sub(offset_ns)
    )
}

/// Measures `lookup` over `queries` in the two ways the module
/// documentation describes and prints one line for each. `lookup` returns
/// a number derived from its result, which the `chained` measurement feeds
/// into the next query index.
fn print_latency<Q>(label: &str, queries: &[Q], mut lookup: impl FnMut(&Q) -> u64) {
    // Warm the code paths and the TLB entries of the query array.
    for query in queries.iter().take(10_000) {
        black_box(lookup(query));
    }

    let mut raw = new_histogram();
    let mut empty = new_histogram();
    for query in queries.iter().cycle().take(SAMPLED_LOOKUPS) {
        let start = Instant::now();
        black_box(lookup(black_box(query)));
        raw.saturating_record(start.elapsed().as_nanos() as u64);

        let start = Instant::now();
        black_box(query);
        empty.saturating_record(start.elapsed().as_nanos() as u64);
    }
    let clock_ns = empty.value_at_quantile(0.5);
    println!(
        "{label}: single lookups={} raw {} | empty_region {} | corrected {}",
        raw.len(),
        quantiles(&raw, 0),
        quantiles(&empty, 0),
        quantiles(&raw, clock_ns),
    );

    // `zero` is opaque to the compiler, so `result & zero` is computed at
    // run time and makes each query index depend on the previous result.
    let zero = black_box(0u64);
    let mut chained = new_histogram();
    let mut result = 0u64;
    let batches = SAMPLED_LOOKUPS / BATCH_LOOKUPS;
    let mut next = 0usize;
    for _ in 0..batches {
        let start = Instant::now();
        for _ in 0..BATCH_LOOKUPS {
            let index = (next ^ (result & zero) as usize) % queries.len();
            result = lookup(&queries[index]);
            next += 1;
        }
        let elapsed_ns = start.elapsed().as_nanos() as u64;
        chained.saturating_record(elapsed_ns / BATCH_LOOKUPS as u64);
    }
    black_box(result);
    println!(
        "{label}: chained batches={batches} lookups_per_batch={BATCH_LOOKUPS} per_lookup {}",
        quantiles(&chained, 0),
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

/// The kinds of query name that [`domain_queries`] makes.
#[derive(Clone, Copy)]
enum QueryMix {
    /// Exact hits, wildcard hits and misses in turn.
    All,
    ExactHits,
    /// Names two labels below a wildcard rule's name.
    WildcardHits,
    /// Names under `example.org`, which no rule covers.
    Misses,
}

/// Query names with random rule numbers, so consecutive lookups touch
/// unrelated parts of the tables.
fn domain_queries(mix: QueryMix) -> Vec<String> {
    let mut random = SplitMix(7);
    (0..SAMPLED_LOOKUPS)
        .map(|index| {
            let n = random.below(RULE_COUNT);
            let kind = match mix {
                QueryMix::All => index % 3,
                QueryMix::ExactHits => 0,
                QueryMix::WildcardHits => 1,
                QueryMix::Misses => 2,
            };
            match kind {
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
    let digest = caduceus_policy::policy_digest(&config);
    let digest_ms = started.elapsed().as_millis();
    let started = Instant::now();
    policy
        .write_compiled(&path, digest)
        .expect("writing the compiled policy");
    let write_ms = started.elapsed().as_millis();
    let started = Instant::now();
    let loaded = Policy::open_compiled(&path).expect("reading the compiled policy");
    let open_ms = started.elapsed().as_millis();
    let file_bytes = std::fs::metadata(&path).map(|meta| meta.len()).unwrap_or(0);
    println!(
        "policy: compiled_file_bytes={file_bytes} policy_digest_ms={digest_ms} write_compiled_ms={write_ms} open_compiled_ms={open_ms} anon_huge_pages_kib={}",
        huge_page_kib()
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
    // After a reload, the thread that releases the last reference to the
    // old policy frees it. When that is a delivery core, this is how long
    // the core stops.
    let started = Instant::now();
    drop(parsed);
    println!(
        "policy: drop_ms={:.1}",
        started.elapsed().as_secs_f64() * 1e3
    );

    let queries = domain_queries(QueryMix::All);
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

    let mixes = [
        ("mixed", QueryMix::All),
        ("exact hits", QueryMix::ExactHits),
        ("wildcard hits", QueryMix::WildcardHits),
        ("misses", QueryMix::Misses),
    ];
    for (name, mix) in mixes {
        let queries = domain_queries(mix);
        let label = format!("policy for_domain 100k rules, {name}");
        print_latency(&label, &queries, |query| {
            // The fields that the engine's dispatch reads for every message.
            let rule = loaded.for_domain(query, Lane::Bulk);
            u64::from(rule.rule_id) ^ u64::from(rule.max_connections) ^ u64::from(rule.hold)
        });
    }
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
            "lists: list_file_bytes={} write_ms={write_ms} open_ms={open_ms} rss_growth_on_open_kib={} anon_huge_pages_kib={}",
            std::fs::metadata(&path).map(|meta| meta.len()).unwrap_or(0),
            resident_kib().saturating_sub(rss_before_open_kib),
            huge_page_kib()
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

    print_latency("lists check 10m entries", &queries, |query| {
        match lists.check(query, Category::Marketing) {
            Verdict::Allowed => 0,
            Verdict::NoConsent => 1,
            Verdict::Suppressed(reason) => 2 + reason as u64,
        }
    });
}

criterion_group!(benches, policy_benches, list_benches);
criterion_main!(benches);
