//! Benchmark harness of Caduceus; see docs/benchmarks.md.
//!
//! - [`generator`]: injects pipelined mail over lane sockets or TCP.
//! - [`scenario`]: starts the sink, the engine or a Postfix relay and the
//!   generator for one scenario, and waits for every delivery.
//! - [`results`]: checks deliveries by body checksum, computes rates and
//!   latencies, prints tables and writes JSON.
//! - [`plot`]: SVG plots of latency and throughput.
//! - [`smtp_source`]: the comparison driven by Postfix's smtp-source.
//! - [`observability`]: the audit trail and metrics endpoint on and off,
//!   alternately in one invocation.

pub mod generator;
pub mod observability;
pub mod plot;
pub mod results;
pub mod scenario;
pub mod smtp_source;
