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

mod address;
mod compiled;
mod compiled_file;
mod digest;
mod domain;
mod error;
mod explain;
mod file_io;
mod huge_pages;
pub mod lists;
mod load;
mod site_key;
mod suffix_table;
mod validate;

pub use address::{AddressError, normalise_address};
pub use compiled::{DEFAULT_RULE_ID, EffectiveRule, Policy, Route, Rule};
pub use compiled_file::{
    COMPILED_HEADER_BYTES, CompiledPolicyError, compiled_image_digest, read_compiled_digest,
};
pub use digest::policy_digest;
pub use domain::{DomainError, normalise_domain};
pub use error::{ConfigError, Location};
pub use lists::{Lists, Verdict};
pub use load::{load_config, load_config_for_any_machine, parse_config};
pub use site_key::{SiteKey, SiteKeyError};
pub use vocabulary::{Category, Lane, TlsMode};
