//! Errors from loading and checking a configuration.

use std::fmt;
use std::io;
use std::ops::Range;
use std::path::PathBuf;

/// A 1-based line and column in the config text. The column counts
/// characters, not bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

impl Location {
    /// Finds the line and column of byte `offset` in `text`.
    pub fn of_offset(text: &str, offset: usize) -> Location {
        let mut offset = offset.min(text.len());
        while !text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &text[..offset];
        let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
        Location {
            line: before.matches('\n').count() + 1,
            column: before[line_start..].chars().count() + 1,
        }
    }

    pub(crate) fn of_span(text: &str, span: Range<usize>) -> Location {
        Location::of_offset(text, span.start)
    }
}

/// A configuration that cannot be read or is not valid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}", DisplayInvalid { origin, location, key, message })]
    Invalid {
        /// The file name, or another label for text that came from elsewhere.
        origin: String,
        /// The position of the offending value, or `None` when the value is a
        /// default that the file does not set.
        location: Option<Location>,
        /// The dotted key of the value, such as `lanes.bulk.cores[1]`; empty
        /// for a TOML syntax error.
        key: String,
        /// The problem and its fix, in one message.
        message: String,
    },
}

impl ConfigError {
    pub(crate) fn invalid(
        origin: &str,
        location: Option<Location>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            origin: origin.to_string(),
            location,
            key: key.into(),
            message: message.into(),
        }
    }

    /// Returns the location of the offending value, when the file sets it.
    pub fn location(&self) -> Option<Location> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Invalid { location, .. } => *location,
        }
    }
}

struct DisplayInvalid<'a> {
    origin: &'a str,
    location: &'a Option<Location>,
    key: &'a str,
    message: &'a str,
}

impl fmt::Display for DisplayInvalid<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.origin)?;
        if let Some(location) = self.location {
            write!(f, ":{}:{}", location.line, location.column)?;
        }
        if self.key.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": {}: {}", self.key, self.message)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn location_counts_lines_and_characters() {
        let text = "a = 1\nbé = \"x\"\n";
        assert_eq!(
            Location::of_offset(text, 0),
            Location { line: 1, column: 1 }
        );
        let offset = text.find('"').unwrap();
        assert_eq!(
            Location::of_offset(text, offset),
            Location { line: 2, column: 6 }
        );
        assert_eq!(
            Location::of_offset(text, text.len() + 10),
            Location { line: 3, column: 1 }
        );
    }

    #[test]
    fn display_has_file_line_column() {
        let error = ConfigError::invalid(
            "caduceus.toml",
            Some(Location { line: 4, column: 9 }),
            "dns.attempts",
            "must be at least 1",
        );
        assert_eq!(
            error.to_string(),
            "caduceus.toml:4:9: dns.attempts: must be at least 1"
        );
    }
}
