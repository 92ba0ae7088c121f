//! Terms shared by the config, the spool and the engine.

use serde::{Deserialize, Serialize};

/// The lane a message travels in. The socket a message arrives on decides it.
///
/// The discriminants are stored on disk by the spool; never renumber them.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum Lane {
    Transactional = 0,
    Bulk = 1,
}

impl Lane {
    pub const ALL: [Lane; 2] = [Lane::Transactional, Lane::Bulk];

    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Transactional => "transactional",
            Lane::Bulk => "bulk",
        }
    }

    pub fn from_u8(value: u8) -> Option<Lane> {
        match value {
            0 => Some(Lane::Transactional),
            1 => Some(Lane::Bulk),
            _ => None,
        }
    }
}

/// The mail category, which decides consent and opt-out handling.
///
/// Only marketing requires recorded opt-in consent. The discriminants are
/// stored on disk by the spool; never renumber them.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum Category {
    Transactional = 0,
    Care = 1,
    Marketing = 2,
}

impl Category {
    pub fn as_str(self) -> &'static str {
        match self {
            Category::Transactional => "transactional",
            Category::Care => "care",
            Category::Marketing => "marketing",
        }
    }

    pub fn from_u8(value: u8) -> Option<Category> {
        match value {
            0 => Some(Category::Transactional),
            1 => Some(Category::Care),
            2 => Some(Category::Marketing),
            _ => None,
        }
    }

    /// Parses the value of an `X-Caduceus-Category` header, ignoring case and
    /// surrounding white space.
    pub fn parse_header_value(value: &str) -> Option<Category> {
        let value = value.trim();
        [Category::Transactional, Category::Care, Category::Marketing]
            .into_iter()
            .find(|category| value.eq_ignore_ascii_case(category.as_str()))
    }
}

/// How delivery to a destination uses TLS.
///
/// Whatever the mode, a TLS session is TLS 1.2 or later with AEAD suites only.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
#[repr(u8)]
pub enum TlsMode {
    /// Never start TLS.
    None = 0,
    /// Use STARTTLS when offered. A failed handshake defers the delivery.
    Opportunistic = 1,
    /// Like `Opportunistic`, but after a failed handshake the delivery is
    /// retried in cleartext on a new connection.
    OpportunisticFallback = 2,
    /// STARTTLS must succeed, but the certificate is not checked.
    Required = 3,
    /// STARTTLS must succeed with a certificate valid for the MX host name.
    Verified = 4,
}

impl TlsMode {
    /// Returns the mode whose `repr(u8)` value is `value`.
    pub fn from_u8(value: u8) -> Option<TlsMode> {
        match value {
            0 => Some(TlsMode::None),
            1 => Some(TlsMode::Opportunistic),
            2 => Some(TlsMode::OpportunisticFallback),
            3 => Some(TlsMode::Required),
            4 => Some(TlsMode::Verified),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::None => "none",
            TlsMode::Opportunistic => "opportunistic",
            TlsMode::OpportunisticFallback => "opportunistic-fallback",
            TlsMode::Required => "required",
            TlsMode::Verified => "verified",
        }
    }
}
