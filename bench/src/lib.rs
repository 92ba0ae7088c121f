//! Benchmark harness; see docs/benchmarks.md.
