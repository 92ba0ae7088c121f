//! `--observability-compare ROUNDS`: runs a scenario with the audit trail
//! and the metrics endpoint on and off, alternately in one invocation, and
//! reports what they cost in throughput and in engine CPU time.
//!
//! Each round runs both settings. Odd rounds run "on" first and even
//! rounds "off" first, so that a slow drift of the machine's load weighs on
//! both settings alike. Wall-clock throughput on a shared machine spreads
//! by several percent between runs, so the engine's CPU seconds per 1,000
//! delivered messages are reported beside it. That figure counts the work
//! the engine did, whatever else the machine was doing.

use serde::Serialize;

use crate::results::RunResult;
use crate::scenario::{Options, Scenario, run_caduceus};

/// One run of a comparison.
#[derive(Clone, Debug, Serialize)]
pub struct ComparedRun {
    /// 1-based.
    pub round: u32,
    pub observability: bool,
    pub result: RunResult,
}

/// The runs of a comparison and their medians.
#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    pub scenario: String,
    pub runs: Vec<ComparedRun>,
    pub summary: Summary,
}

/// Medians over the runs of each setting.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    pub on_delivered_per_sec: f64,
    pub off_delivered_per_sec: f64,
    /// `on_delivered_per_sec / off_delivered_per_sec`.
    pub throughput_ratio: f64,
    /// The median over rounds of each round's on/off throughput ratio.
    pub round_ratio_median: f64,
    /// `NaN` when the engine's CPU time could not be read.
    pub on_cpu_secs_per_1000: f64,
    pub off_cpu_secs_per_1000: f64,
    /// How much more CPU time per message the engine used with the audit
    /// trail and metrics endpoint on, in percent of the time with them off.
    pub cpu_cost_percent: f64,
}

/// Runs `rounds` rounds of `scenario`, printing each run as it ends.
pub fn compare(scenario: Scenario, options: &Options, rounds: u32) -> Result<Comparison, String> {
    let mut runs = Vec::new();
    println!(
        "{:<6} {:<14} {:>10} {:>16} {:>14} {:>22}",
        "round",
        "observability",
        "delivered",
        "delivered msgs/s",
        "engine CPU s",
        "CPU s / 1000 msgs"
    );
    for round in 1..=rounds {
        let order = if round % 2 == 1 {
            [true, false]
        } else {
            [false, true]
        };
        for observability in order {
            let run_options = Options {
                observability,
                ..options.clone()
            };
            let label = if observability {
                "caduceus observability on"
            } else {
                "caduceus observability off"
            };
            let result = run_caduceus(scenario, &run_options, true, label)?;
            print_run(round, observability, &result);
            runs.push(ComparedRun {
                round,
                observability,
                result,
            });
        }
    }
    let summary = summarize(&runs);
    Ok(Comparison {
        scenario: scenario.name().to_string(),
        runs,
        summary,
    })
}

fn print_run(round: u32, observability: bool, result: &RunResult) {
    let cpu = |value: Option<f64>| value.map_or("-".to_string(), |value| format!("{value:.3}"));
    println!(
        "{:<6} {:<14} {:>10} {:>16.0} {:>14} {:>22}{}",
        round,
        if observability { "on" } else { "off" },
        result.delivered,
        result.delivered_per_sec,
        cpu(result.engine_cpu_secs),
        cpu(result.cpu_secs_per_1000_delivered()),
        if result.verified {
            ""
        } else {
            "  NOT VERIFIED"
        }
    );
}

/// Computes the medians of each setting and the on/off ratios.
pub fn summarize(runs: &[ComparedRun]) -> Summary {
    let values = |observability: bool, value: &dyn Fn(&RunResult) -> Option<f64>| {
        runs.iter()
            .filter(|run| run.observability == observability)
            .filter_map(|run| value(&run.result))
            .collect::<Vec<f64>>()
    };
    let rate = |result: &RunResult| Some(result.delivered_per_sec);
    let cpu = |result: &RunResult| result.cpu_secs_per_1000_delivered();
    let on_rate = median(values(true, &rate));
    let off_rate = median(values(false, &rate));
    let on_cpu = median(values(true, &cpu));
    let off_cpu = median(values(false, &cpu));
    let mut round_ratios = Vec::new();
    let rounds = runs.iter().map(|run| run.round).max().unwrap_or(0);
    for round in 1..=rounds {
        let of = |observability: bool| {
            runs.iter()
                .find(|run| run.round == round && run.observability == observability)
                .map(|run| run.result.delivered_per_sec)
        };
        if let (Some(on), Some(off)) = (of(true), of(false))
            && off > 0.0
        {
            round_ratios.push(on / off);
        }
    }
    Summary {
        on_delivered_per_sec: on_rate,
        off_delivered_per_sec: off_rate,
        throughput_ratio: on_rate / off_rate,
        round_ratio_median: median(round_ratios),
        on_cpu_secs_per_1000: on_cpu,
        off_cpu_secs_per_1000: off_cpu,
        cpu_cost_percent: (on_cpu / off_cpu - 1.0) * 100.0,
    }
}

/// Returns the median, the mean of the middle two for an even count, or
/// `NaN` for no values.
fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len() % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    }
}

/// Prints the medians and ratios.
pub fn print_summary(comparison: &Comparison) {
    let summary = &comparison.summary;
    println!();
    println!(
        "median delivered msgs/s: on {:.0}, off {:.0}; ratio on/off {:.3} (throughput cost {:.1} %); median of the per-round ratios {:.3}",
        summary.on_delivered_per_sec,
        summary.off_delivered_per_sec,
        summary.throughput_ratio,
        (1.0 - summary.throughput_ratio) * 100.0,
        summary.round_ratio_median
    );
    println!(
        "median engine CPU s per 1000 delivered messages: on {:.4}, off {:.4}; CPU cost {:.1} %",
        summary.on_cpu_secs_per_1000, summary.off_cpu_secs_per_1000, summary.cpu_cost_percent
    );
    for run in comparison.runs.iter().filter(|run| !run.result.verified) {
        println!(
            "round {} observability {}: NOT VERIFIED: {} missing, {} duplicates, {} corrupt",
            run.round,
            if run.observability { "on" } else { "off" },
            run.result.missing,
            run.result.duplicates,
            run.result.corrupt
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(Vec::new()).is_nan());
    }

    fn run(round: u32, observability: bool, per_sec: f64, cpu_secs: f64) -> ComparedRun {
        ComparedRun {
            round,
            observability,
            result: RunResult {
                delivered: 1000,
                delivered_per_sec: per_sec,
                engine_cpu_secs: Some(cpu_secs),
                ..RunResult::default()
            },
        }
    }

    #[test]
    fn summary_of_three_rounds() {
        let runs = [
            run(1, true, 900.0, 1.10),
            run(1, false, 1000.0, 1.00),
            run(2, false, 1000.0, 1.00),
            run(2, true, 900.0, 1.10),
            run(3, true, 800.0, 1.20),
            run(3, false, 1000.0, 1.00),
        ];
        let summary = summarize(&runs);
        assert_eq!(summary.on_delivered_per_sec, 900.0);
        assert_eq!(summary.off_delivered_per_sec, 1000.0);
        assert!((summary.throughput_ratio - 0.9).abs() < 1e-9);
        assert!((summary.round_ratio_median - 0.9).abs() < 1e-9);
        assert!((summary.on_cpu_secs_per_1000 - 1.10).abs() < 1e-9);
        assert!((summary.off_cpu_secs_per_1000 - 1.00).abs() < 1e-9);
        assert!((summary.cpu_cost_percent - 10.0).abs() < 1e-6);
    }
}
