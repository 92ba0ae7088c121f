//! Support code for the end-to-end tests: real peers and the scripted receiver.
//!
//! Every peer runs on loopback and is started by the test that uses it:
//!
//! - [`Postfix`]: a private Postfix instance that receives (or relays) mail.
//! - [`Dnsmasq`]: a DNS server that serves the test zones.
//! - [`ScriptedReceiver`]: an SMTP server whose replies a test scripts, for
//!   behaviour no real MTA produces on demand (421 mid-session, a dropped
//!   connection after the final dot, stalls). It is the engine's
//!   `caduceus_engine::sink`, re-exported.
//! - [`Engine`]: the `caduceus` binary run as a child process.
//! - [`Swaks`], [`smtp_source`] and [`SmtpClient`]: senders.
//!
//! The helpers return `std::io::Result` with errors that name the peer, the
//! path or address, and the tail of the peer's log where one exists, so that a
//! test can `expect` them and still fail with a useful message.

mod ca;
mod clients;
mod dnsmasq;
mod engine;
mod net;
mod postfix;
mod receiver;

pub use ca::TestCa;
pub use clients::{Reply, SmtpClient, SmtpSourceOptions, Swaks, smtp_source};
pub use dnsmasq::{DnsRecord, Dnsmasq};
pub use engine::{Engine, Lane, engine_binary};
pub use net::{free_port, micros_since_epoch};
pub use postfix::{DeliveredMessage, Postfix, PostfixOptions};
pub use receiver::{
    CommandRecord, DomainScript, MessageSummary, Plan, Received, Recording, Response, Script,
    ScriptedReceiver, SinkSummary, TlsCounts,
};
