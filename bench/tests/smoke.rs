//! Smoke runs of every scenario with a few hundred messages: each must
//! complete and every delivery must verify by body checksum. Speed is not
//! checked here.

use std::time::Duration;

use caduceus_bench::generator::SizeMix;
use caduceus_bench::results::RunResult;
use caduceus_bench::scenario::{Options, Scenario, run_caduceus, run_postfix};
use caduceus_bench::{observability, smtp_source};

fn options(messages: u64) -> Options {
    Options {
        messages,
        duration: Duration::from_secs(3),
        wait: Duration::from_secs(60),
        transactional_rate: 100.0,
        connections: 4,
        pipeline_depth: 8,
        sizes: SizeMix::Realistic,
        seed: 7,
        bulk_executors: None,
        harness_cpus: None,
        observability: true,
        chunking: true,
        engine_binary: caduceus_tests::engine_binary().expect("engine binary"),
    }
}

fn assert_verified(run: &RunResult) {
    let injected: u64 = run.injected.values().sum();
    assert!(injected > 0, "{}: nothing injected: {run:?}", run.target);
    assert_eq!(run.missing, 0, "{}: missing messages: {run:?}", run.target);
    assert_eq!(run.duplicates, 0, "{}: duplicates: {run:?}", run.target);
    assert_eq!(run.corrupt, 0, "{}: corrupt bodies: {run:?}", run.target);
    assert_eq!(
        run.delivered + run.bounced,
        injected,
        "{}: not every message accounted for: {run:?}",
        run.target
    );
    assert!(run.verified, "{}: not verified: {run:?}", run.target);
}

#[test]
fn throughput_with_postfix_comparison() {
    let options = options(300);
    let caduceus = run_caduceus(Scenario::Throughput, &options, true, "caduceus").expect("run");
    assert_verified(&caduceus);
    assert_eq!(caduceus.delivered, 300);
    assert!(caduceus.peak_rss_kib.is_some_and(|kib| kib > 0));
    let postfix = run_postfix(Scenario::Throughput, &options).expect("postfix run");
    assert_verified(&postfix);
    assert_eq!(postfix.delivered, 300);
}

#[test]
fn fanout_with_two_bulk_executors() {
    // Fanout spreads recipients over many domains, so both bulk executors
    // are home to some of them and mail is handed over both ways.
    let options = Options {
        bulk_executors: Some(2),
        ..options(300)
    };
    let run = run_caduceus(Scenario::Fanout, &options, true, "caduceus").expect("run");
    assert_verified(&run);
    assert_eq!(run.delivered, 300);
}

#[test]
fn mixed_reports_transactional_latency() {
    let run = run_caduceus(Scenario::Mixed, &options(300), true, "caduceus").expect("run");
    assert_verified(&run);
    let transactional = run
        .lanes
        .iter()
        .find(|lane| lane.lane == "transactional")
        .expect("transactional latency");
    assert!(transactional.delivered > 0);
    assert!(transactional.p50_ms <= transactional.p99_ms);
    assert!(transactional.p99_ms <= transactional.p999_ms);
}

#[test]
fn fanout_spreads_over_domains() {
    let run = run_caduceus(Scenario::Fanout, &options(300), true, "caduceus").expect("run");
    assert_verified(&run);
    assert!(
        run.domain_rates.len() > 20,
        "domains: {}",
        run.domain_rates.len()
    );
}

#[test]
fn tls_resumes_only_when_enabled() {
    let options = options(200);
    let with = run_caduceus(Scenario::Tls, &options, true, "caduceus").expect("run");
    assert_verified(&with);
    assert_eq!(with.tls.messages_over_tls, with.delivered);
    assert!(
        with.tls.resumed > 0,
        "no resumption with resumption on: {with:?}"
    );
    let without = run_caduceus(Scenario::Tls, &options, false, "no resumption").expect("run");
    assert_verified(&without);
    assert_eq!(
        without.tls.resumed, 0,
        "resumed with resumption off: {without:?}"
    );
}

#[test]
fn faults_retry_until_accounted() {
    let run = run_caduceus(Scenario::Faults, &options(300), true, "caduceus").expect("run");
    assert_verified(&run);
    // 1 % of RCPT commands get 550, so some of 300 messages bounce and
    // their notifications come back to the sender's domain.
    assert_eq!(run.notifications, run.bounced, "{run:?}");
}

#[test]
fn backlog_reports_queue_memory() {
    let run = run_caduceus(Scenario::Backlog, &options(300), true, "caduceus").expect("run");
    assert_verified(&run);
    let backlog = run.backlog.expect("backlog figures");
    assert_eq!(backlog.queued, 300);
    assert!(backlog.rss_kib.is_some_and(|kib| kib > 0), "{backlog:?}");
    assert!(backlog.anon_kib.is_some_and(|kib| kib > 0), "{backlog:?}");
    assert!(backlog.growth_mib_per_100k().is_some(), "{backlog:?}");
}

#[test]
fn smtp_source_reaches_both() {
    let binary = caduceus_tests::engine_binary().expect("engine binary");
    let comparison =
        smtp_source::run(&binary, 200, Duration::from_secs(60)).expect("smtp-source comparison");
    assert_eq!(comparison.caduceus.delivered, 200);
    assert_eq!(comparison.postfix.delivered, 200);
    assert!(comparison.caduceus.peak_rss_kib.is_some());
}

#[test]
fn observability_compare_runs_both_settings() {
    let comparison =
        observability::compare(Scenario::Throughput, &options(200), 1).expect("comparison");
    let settings: Vec<bool> = comparison
        .runs
        .iter()
        .map(|run| run.observability)
        .collect();
    assert_eq!(settings, [true, false]);
    for run in &comparison.runs {
        assert_verified(&run.result);
        assert_eq!(run.result.delivered, 200);
        assert!(
            run.result.engine_cpu_secs.is_some(),
            "no engine CPU time: {run:?}"
        );
    }
    assert!(comparison.summary.on_delivered_per_sec > 0.0);
    assert!(comparison.summary.off_delivered_per_sec > 0.0);
}
