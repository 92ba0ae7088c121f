//! The Caduceus engine: SMTP ingress on Unix sockets, the per-core queue, and
//! outbound delivery.

pub mod audit;
pub mod control;
pub mod cores;
pub mod deliverylog;
pub mod demo;
pub mod dns;
pub mod dsn;
pub mod ingress;
pub mod inject;
pub mod io;
pub mod metrics;
pub mod outbound;
pub mod policy_file;
pub mod policy_swap;
mod privileges;
pub mod runtime;
pub mod shard;
pub mod sink;
pub mod smtp;
pub mod spool_show;
pub mod webhook;
