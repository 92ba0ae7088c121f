//! Durations written in the config as `"500us"`, `"250ms"`, `"30s"`, `"5m"`,
//! `"2h"` or `"5d"`.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct ConfigDuration(pub Duration);

impl ConfigDuration {
    pub const fn from_secs(secs: u64) -> Self {
        ConfigDuration(Duration::from_secs(secs))
    }

    pub const fn from_micros(micros: u64) -> Self {
        ConfigDuration(Duration::from_micros(micros))
    }

    pub fn get(self) -> Duration {
        self.0
    }
}

impl fmt::Display for ConfigDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let micros = self.0.as_micros();
        let units: [(u128, &str); 6] = [
            (86_400_000_000, "d"),
            (3_600_000_000, "h"),
            (60_000_000, "m"),
            (1_000_000, "s"),
            (1_000, "ms"),
            (1, "us"),
        ];
        for (size, suffix) in units {
            if micros >= size && micros.is_multiple_of(size) {
                return write!(f, "{}{}", micros / size, suffix);
            }
        }
        write!(f, "0s")
    }
}

/// Parses a duration such as `"30s"`. The error names the value and the
/// accepted units.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let invalid = || {
        format!(
            "invalid duration {text:?}: expected a whole number followed by us, ms, s, m, h or d, such as \"30s\""
        )
    };
    let value: u64 = number.parse().map_err(|_| invalid())?;
    let micros_per_unit: u64 = match unit {
        "us" => 1,
        "ms" => 1_000,
        "s" => 1_000_000,
        "m" => 60_000_000,
        "h" => 3_600_000_000,
        "d" => 86_400_000_000,
        _ => return Err(invalid()),
    };
    let micros = value.checked_mul(micros_per_unit).ok_or_else(invalid)?;
    Ok(Duration::from_micros(micros))
}

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(DurationVisitor)
    }
}

struct DurationVisitor;

impl serde::de::Visitor<'_> for DurationVisitor {
    type Value = ConfigDuration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration string such as \"30s\"")
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<ConfigDuration, E> {
        parse_duration(text).map(ConfigDuration).map_err(E::custom)
    }

    // A bare number is the likeliest mistake, so name the fix for it.
    fn visit_i64<E: serde::de::Error>(self, number: i64) -> Result<ConfigDuration, E> {
        Err(E::custom(format!(
            "invalid duration {number}: a duration needs a unit, so write a string such as \"{number}s\" or \"{number}ms\""
        )))
    }

    fn visit_u64<E: serde::de::Error>(self, number: u64) -> Result<ConfigDuration, E> {
        Err(E::custom(format!(
            "invalid duration {number}: a duration needs a unit, so write a string such as \"{number}s\" or \"{number}ms\""
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_each_unit() {
        assert_eq!(parse_duration("500us"), Ok(Duration::from_micros(500)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("5d"), Ok(Duration::from_secs(432_000)));
    }

    #[test]
    fn parse_rejects_missing_unit() {
        let error = parse_duration("30").unwrap_err();
        assert!(error.contains("\"30\""), "{error}");
    }

    #[test]
    fn display_round_trips() {
        for text in ["500us", "250ms", "30s", "5m", "2h", "5d"] {
            let duration = ConfigDuration(parse_duration(text).unwrap());
            assert_eq!(duration.to_string(), text);
        }
    }
}
