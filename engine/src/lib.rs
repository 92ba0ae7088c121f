//! The Caduceus engine: SMTP ingress on Unix sockets, the per-core queue, and
//! outbound delivery.

pub mod dns;
pub mod dsn;
pub mod ingress;
pub mod outbound;
pub mod smtp;
