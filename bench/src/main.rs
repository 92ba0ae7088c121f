//! `caduceus-bench`: runs a benchmark scenario against the engine, and
//! optionally the same scenario through a Postfix relay, and reports both.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use caduceus_bench::generator::SizeMix;
use caduceus_bench::results::{RunResult, print_table, write_json};
use caduceus_bench::scenario::{
    FANOUT_BURST, FANOUT_RATE_PER_SEC, Options, Scenario, default_engine_binary,
    is_throttled_domain, run_caduceus, run_postfix,
};
use caduceus_bench::{observability, plot, smtp_source};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "caduceus-bench",
    about = "Benchmarks Caduceus, side by side with Postfix"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Bulk lane only, as fast as the engine accepts.
    Throughput(ScenarioArgs),
    /// Bulk saturating, transactional at a fixed rate.
    Mixed(ScenarioArgs),
    /// 1,000 destinations, the ten largest throttled by policy.
    Fanout(ScenarioArgs),
    /// Every delivery over STARTTLS, session resumption on and off.
    Tls(ScenarioArgs),
    /// A misbehaving sink and a short retry schedule.
    Faults(ScenarioArgs),
    /// Every destination on hold during injection; reports the engine's
    /// resident set per 100,000 queued messages, then delivers them.
    Backlog(ScenarioArgs),
    /// Postfix's smtp-source (-d, 16 sessions, 2 KB) into the bulk socket
    /// and into a Postfix relay.
    SmtpSource {
        /// Messages per target.
        #[arg(long, default_value_t = 20_000)]
        messages: u32,
        /// Seconds to wait for deliveries after injection.
        #[arg(long, default_value_t = 300)]
        wait_secs: u64,
        /// Directory for the JSON results.
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Compare {
    Postfix,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Sizes {
    /// Every message `--message-size-bytes` long.
    Fixed,
    /// 2 KB to 200 KB, mostly small.
    Realistic,
}

#[derive(clap::Args, Clone, Debug)]
struct ScenarioArgs {
    /// Bulk messages to inject.
    #[arg(long, default_value_t = 10_000)]
    messages: u64,
    /// Upper bound on the injection time, in seconds; also how long the
    /// transactional stream of `mixed` runs at most.
    #[arg(long, default_value_t = 300)]
    duration_secs: u64,
    /// Seconds to wait for deliveries after injection ends.
    #[arg(long, default_value_t = 300)]
    wait_secs: u64,
    /// Also run the scenario through a Postfix relay.
    #[arg(long, value_enum)]
    compare: Option<Compare>,
    /// Directory for the JSON results and the SVG plots.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Transactional messages per second in `mixed`.
    #[arg(long, default_value_t = 100.0)]
    transactional_rate: f64,
    /// Injecting connections of the bulk stream.
    #[arg(long, default_value_t = 16)]
    connections: u32,
    /// Messages per pipelined group on one connection.
    #[arg(long, default_value_t = 8)]
    pipeline_depth: usize,
    #[arg(long, value_enum, default_value_t = Sizes::Fixed)]
    sizes: Sizes,
    /// Message size in bytes with `--sizes fixed`.
    #[arg(long, default_value_t = 2048)]
    message_size_bytes: usize,
    /// Seed of recipient choice, sizes and the sink's fault decisions.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Skip the SVG plots.
    #[arg(long)]
    no_plots: bool,
    /// Bulk executors to run (the engine's default allocation when left
    /// out). Beyond the CPUs left after the transactional one, the extra
    /// executor shares the transactional CPU, as a scaling measurement
    /// on a small machine needs.
    #[arg(long)]
    bulk_executors: Option<usize>,
    /// CPUs for the benchmark's injectors and sink, comma-separated (for
    /// example `1`), applied after the MTA under test has started. Left
    /// out, they run on every CPU, including the transactional one.
    #[arg(long, value_delimiter = ',')]
    harness_cpus: Option<Vec<usize>>,
    /// Turn off the audit trail and the metrics endpoint, to measure what
    /// they cost against a run with both on.
    #[arg(long)]
    no_observability: bool,
    /// Run the scenario ROUNDS times with the audit trail and the metrics
    /// endpoint on and ROUNDS times with them off, alternately. Prints each
    /// run, the median throughput ratio, and the engine's CPU seconds per
    /// 1,000 delivered messages for each setting.
    #[arg(
        long,
        value_name = "ROUNDS",
        value_parser = clap::value_parser!(u32).range(1..),
        conflicts_with_all = ["no_observability", "compare"]
    )]
    observability_compare: Option<u32>,
    /// Keep the sink from offering CHUNKING, which it offers by default, so
    /// that deliveries use DATA instead of BDAT.
    #[arg(long)]
    no_chunking: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Throughput(args) => scenario(Scenario::Throughput, args),
        Command::Mixed(args) => scenario(Scenario::Mixed, args),
        Command::Fanout(args) => scenario(Scenario::Fanout, args),
        Command::Tls(args) => scenario(Scenario::Tls, args),
        Command::Faults(args) => scenario(Scenario::Faults, args),
        Command::Backlog(args) => scenario(Scenario::Backlog, args),
        Command::SmtpSource {
            messages,
            wait_secs,
            out,
        } => smtp_source_comparison(messages, wait_secs, &out),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("caduceus-bench: some deliveries could not be verified; see above");
            ExitCode::from(2)
        }
        Err(message) => {
            eprintln!("caduceus-bench: {message}");
            ExitCode::FAILURE
        }
    }
}

fn scenario(scenario: Scenario, args: ScenarioArgs) -> Result<bool, String> {
    if scenario == Scenario::Backlog && args.compare.is_some() {
        return Err(
            "backlog measures the engine's queue memory and has no Postfix column; run it without --compare"
                .into(),
        );
    }
    let options = Options {
        messages: args.messages,
        duration: Duration::from_secs(args.duration_secs),
        wait: Duration::from_secs(args.wait_secs),
        transactional_rate: args.transactional_rate.max(0.1),
        connections: args.connections.max(1),
        pipeline_depth: args.pipeline_depth.max(1),
        sizes: match args.sizes {
            Sizes::Fixed => SizeMix::Fixed(args.message_size_bytes),
            Sizes::Realistic => SizeMix::Realistic,
        },
        seed: args.seed,
        bulk_executors: args.bulk_executors,
        harness_cpus: args.harness_cpus,
        observability: !args.no_observability,
        chunking: !args.no_chunking,
        engine_binary: default_engine_binary(),
    };
    if let Some(rounds) = args.observability_compare {
        return observability_comparison(scenario, &options, rounds, &args.out);
    }
    let mut runs: Vec<RunResult> = Vec::new();
    if scenario == Scenario::Tls {
        runs.push(run_caduceus(scenario, &options, true, "caduceus")?);
        runs.push(run_caduceus(
            scenario,
            &options,
            false,
            "caduceus no-resumption",
        )?);
    } else {
        runs.push(run_caduceus(scenario, &options, true, "caduceus")?);
    }
    if args.compare == Some(Compare::Postfix) {
        runs.push(run_postfix(scenario, &options)?);
    }
    print_table(&runs);
    if scenario == Scenario::Fanout {
        print_throttled_domains(&runs);
    }
    let name = format!(
        "{}-{}",
        scenario.name(),
        caduceus_engine::sink::micros_since_epoch() / 1_000_000
    );
    let path = write_json(&args.out, &name, &runs)
        .map_err(|error| format!("cannot write results to {}: {error}", args.out.display()))?;
    println!("results: {}", path.display());
    if !args.no_plots {
        for drawn in [
            plot::latency_cdf(&args.out, scenario.name(), &runs),
            plot::throughput(&args.out, scenario.name(), &runs),
        ] {
            match drawn {
                Ok(path) => println!("plot: {}", path.display()),
                Err(error) => eprintln!("caduceus-bench: {error}"),
            }
        }
    }
    Ok(runs.iter().all(|run| run.verified))
}

/// Runs `--observability-compare`: prints each run as it ends, then the
/// medians, and writes every run to a JSON file.
fn observability_comparison(
    scenario: Scenario,
    options: &Options,
    rounds: u32,
    out: &std::path::Path,
) -> Result<bool, String> {
    let comparison = observability::compare(scenario, options, rounds)?;
    observability::print_summary(&comparison);
    let name = format!(
        "{}-observability-{}",
        scenario.name(),
        caduceus_engine::sink::micros_since_epoch() / 1_000_000
    );
    let path = write_json(out, &name, &comparison)
        .map_err(|error| format!("cannot write results to {}: {error}", out.display()))?;
    println!("results: {}", path.display());
    Ok(comparison.runs.iter().all(|run| run.result.verified))
}

/// Prints what each run delivered to the throttled destinations of
/// `fanout`, next to the configured rate, whether or not it was enforced.
fn print_throttled_domains(runs: &[RunResult]) {
    println!();
    println!(
        "throttled destinations (policy rate {} msgs/s, burst {}):",
        FANOUT_RATE_PER_SEC, FANOUT_BURST
    );
    for run in runs {
        for rate in run
            .domain_rates
            .iter()
            .filter(|rate| is_throttled_domain(&rate.domain))
        {
            println!(
                "{:<24} {:<24} delivered {:>6}, peak {:>5} msgs/s, mean {:>8.1} msgs/s",
                run.target, rate.domain, rate.delivered, rate.peak_per_sec, rate.mean_per_sec
            );
        }
    }
}

fn smtp_source_comparison(
    messages: u32,
    wait_secs: u64,
    out: &std::path::Path,
) -> Result<bool, String> {
    let comparison = smtp_source::run(
        &default_engine_binary(),
        messages,
        Duration::from_secs(wait_secs),
    )?;
    smtp_source::print(&comparison);
    let name = format!(
        "smtp-source-{}",
        caduceus_engine::sink::micros_since_epoch() / 1_000_000
    );
    let path = write_json(out, &name, &comparison)
        .map_err(|error| format!("cannot write results to {}: {error}", out.display()))?;
    println!("results: {}", path.display());
    Ok(comparison.caduceus.delivered >= u64::from(messages)
        && comparison.postfix.delivered >= u64::from(messages))
}
