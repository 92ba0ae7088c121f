//! Configuration and delivery policy for Caduceus.
//!
//! The engine reads one TOML file (`caduceus serve --config FILE`). This crate
//! parses it into [`config::Config`], checks every value, and compiles the
//! per-destination rules into read-only lookup tables that the delivery cores
//! consult without locks or allocation.
#![forbid(unsafe_code)]

pub mod config;
pub mod duration;
mod vocabulary;

pub use vocabulary::{Category, Lane, TlsMode};
