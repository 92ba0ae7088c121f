//! The compiled policy file that `caduceus policy compile` writes and the
//! engine loads at start, so that a start skips TOML parsing, validation
//! and IDN conversion.
//!
//! # File layout
//!
//! All integers are little-endian.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic, `CDCSPOLC` |
//! | 8 | 4 | format version, 3 |
//! | 12 | 4 | CRC-32C of the archive |
//! | 16 | 8 | archive length in bytes |
//! | 24 | 4 | CRC-32C of bytes 0 to 23 |
//! | 28 | 4 | reserved, zero |
//! | 32 | n | rkyv 0.8 archive of [`Policy`] |
//!
//! The archive starts at offset 32 so that it is 16-byte aligned when the
//! file is read into an aligned buffer, which rkyv's validated access needs.
//! The archive layout follows the Rust types of the policy, so any change to
//! those types that changes their archived bytes must bump
//! [`FORMAT_VERSION`].

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use rkyv::rancor;
use rkyv::util::AlignedVec;

use crate::compiled::Policy;
use crate::file_io::write_atomically;

const MAGIC: [u8; 8] = *b"CDCSPOLC";
/// Bump whenever the archived layout of [`Policy`] changes. Version 3
/// keeps each rule's per-message settings in its 64-byte slot and the rest
/// per rule. Version 2 kept all settings in arrays parallel to the slots,
/// and version 1 had 24-byte slots and settings per rule.
pub(crate) const FORMAT_VERSION: u32 = 3;

const MAGIC_OFFSET: usize = 0;
const VERSION_OFFSET: usize = MAGIC_OFFSET + 8;
const ARCHIVE_CRC_OFFSET: usize = VERSION_OFFSET + 4;
const ARCHIVE_LENGTH_OFFSET: usize = ARCHIVE_CRC_OFFSET + 4;
const HEADER_CRC_OFFSET: usize = ARCHIVE_LENGTH_OFFSET + 8;
const HEADER_SIZE_BYTES: usize = HEADER_CRC_OFFSET + 4 + 4;
const _: () = assert!(HEADER_SIZE_BYTES.is_multiple_of(16));

/// A compiled policy file that cannot be written, read or trusted.
#[derive(Debug, thiserror::Error)]
pub enum CompiledPolicyError {
    #[error("compiled policy {}: {operation} failed: {source}", path.display())]
    Io {
        operation: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "compiled policy {}: {problem}; compile it again from the config with `caduceus policy compile`",
        path.display()
    )]
    Invalid { path: PathBuf, problem: String },
}

impl Policy {
    /// Writes the compiled tables to `path`, replacing any earlier file
    /// atomically (temporary file, fsync, rename, directory fsync).
    pub fn write_compiled(&self, path: &Path) -> Result<(), CompiledPolicyError> {
        let archive = rkyv::to_bytes::<rancor::Error>(self).map_err(|error| {
            CompiledPolicyError::Invalid {
                path: path.to_path_buf(),
                problem: format!("serialising the policy failed: {error}"),
            }
        })?;
        let mut bytes = Vec::with_capacity(HEADER_SIZE_BYTES + archive.len());
        bytes.extend_from_slice(&MAGIC);
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&crc32c::crc32c(&archive).to_le_bytes());
        bytes.extend_from_slice(&(archive.len() as u64).to_le_bytes());
        let header_crc = crc32c::crc32c(&bytes[..HEADER_CRC_OFFSET]);
        bytes.extend_from_slice(&header_crc.to_le_bytes());
        bytes.extend_from_slice(&[0u8; 4]);
        bytes.extend_from_slice(&archive);
        write_atomically(path, &bytes).map_err(|error| CompiledPolicyError::Io {
            operation: error.operation,
            path: error.path,
            source: error.source,
        })
    }

    /// Reads a file written by [`Policy::write_compiled`]: checks its header
    /// and checksums, validates the archive with rkyv's checked access, and
    /// checks that every table index points inside its table, so that no
    /// lookup on the result can panic.
    pub fn open_compiled(path: &Path) -> Result<Policy, CompiledPolicyError> {
        let failed = |operation| {
            move |source| CompiledPolicyError::Io {
                operation,
                path: path.to_path_buf(),
                source,
            }
        };
        let mut bytes = Vec::new();
        File::open(path)
            .map_err(failed("open"))?
            .read_to_end(&mut bytes)
            .map_err(failed("read"))?;
        Policy::from_compiled_bytes(&bytes).map_err(|problem| CompiledPolicyError::Invalid {
            path: path.to_path_buf(),
            problem,
        })
    }

    fn from_compiled_bytes(bytes: &[u8]) -> Result<Policy, String> {
        if bytes.len() < HEADER_SIZE_BYTES {
            return Err(format!(
                "the file is {} bytes long, shorter than its {HEADER_SIZE_BYTES}-byte header",
                bytes.len()
            ));
        }
        if bytes[MAGIC_OFFSET..MAGIC_OFFSET + 8] != MAGIC {
            return Err("not a compiled Caduceus policy (wrong magic)".to_string());
        }
        if crc32c::crc32c(&bytes[..HEADER_CRC_OFFSET]) != read_u32(bytes, HEADER_CRC_OFFSET) {
            return Err("the header checksum does not match; the file is damaged".to_string());
        }

        let version = read_u32(bytes, VERSION_OFFSET);
        if version != FORMAT_VERSION {
            return Err(format!(
                "format version {version} is not supported; this build reads version {FORMAT_VERSION}"
            ));
        }

        let mut length = [0u8; 8];
        length.copy_from_slice(&bytes[ARCHIVE_LENGTH_OFFSET..ARCHIVE_LENGTH_OFFSET + 8]);
        let archive_length = u64::from_le_bytes(length);
        let archive = &bytes[HEADER_SIZE_BYTES..];
        if archive.len() as u64 != archive_length {
            return Err(format!(
                "the header promises a {archive_length}-byte archive, but {} bytes follow it; the file is truncated or damaged",
                archive.len()
            ));
        }
        if crc32c::crc32c(archive) != read_u32(bytes, ARCHIVE_CRC_OFFSET) {
            return Err("the archive checksum does not match; the file is damaged".to_string());
        }

        // rkyv checks alignment, so copy the archive into an aligned buffer.
        let mut aligned = AlignedVec::<16>::with_capacity(archive.len());
        aligned.extend_from_slice(archive);
        let mut policy = rkyv::from_bytes::<Policy, rancor::Error>(&aligned)
            .map_err(|error| format!("the archive is not valid: {error}"))?;
        policy.check_tables()?;
        policy.rebuild_filters();
        Ok(policy)
    }
}

fn read_u32(bytes: &[u8], offset: usize) -> u32 {
    let mut field = [0u8; 4];
    field.copy_from_slice(&bytes[offset..offset + 4]);
    u32::from_le_bytes(field)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse_config;

    const CONFIG: &str = "[[rule]]\ndomain = \"a.example\"\ntls = \"none\"\n\n[[rule]]\nmx = \"*.b.example\"\nhold = true\n";

    #[test]
    fn open_rejects_missing_rule() {
        let config = parse_config(CONFIG, "test.toml").unwrap();
        let mut policy = Policy::compile(&config).unwrap();
        // A file whose tables point past its rules must not load, because a
        // lookup would index out of bounds.
        policy.sources.pop();
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("policy.compiled");
        policy.write_compiled(&path).unwrap();
        let error = Policy::open_compiled(&path).unwrap_err().to_string();
        assert!(
            error.contains("points at rule 1, but there are 1 rules"),
            "{error}"
        );
    }

    /// Writes a compiled file whose header claims `version`, with a header
    /// checksum that matches, so that only the version is wrong.
    fn write_with_version(path: &Path, version: u32) {
        let config = parse_config(CONFIG, "test.toml").unwrap();
        let policy = Policy::compile(&config).unwrap();
        policy.write_compiled(path).unwrap();
        let mut bytes = std::fs::read(path).unwrap();
        bytes[VERSION_OFFSET..VERSION_OFFSET + 4].copy_from_slice(&version.to_le_bytes());
        let header_crc = crc32c::crc32c(&bytes[..HEADER_CRC_OFFSET]);
        bytes[HEADER_CRC_OFFSET..HEADER_CRC_OFFSET + 4].copy_from_slice(&header_crc.to_le_bytes());
        std::fs::write(path, &bytes).unwrap();
    }

    #[test]
    fn open_rejects_other_version() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("policy.compiled");
        let other_version = FORMAT_VERSION + 1;
        write_with_version(&path, other_version);

        let error = Policy::open_compiled(&path).unwrap_err().to_string();
        let expected = format!("format version {other_version} is not supported");
        assert!(error.contains(&expected), "{error}");
        assert!(error.contains("caduceus policy compile"), "{error}");
    }

    #[test]
    fn open_rejects_version_1_file() {
        // Version 1 files have the older slot layout, so the fix is to
        // compile the config again.
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("policy.compiled");
        write_with_version(&path, 1);

        let error = Policy::open_compiled(&path).unwrap_err().to_string();
        assert!(
            error.contains("format version 1 is not supported; this build reads version 3"),
            "{error}"
        );
        assert!(error.contains("caduceus policy compile"), "{error}");
    }

    #[test]
    fn open_rejects_version_2_file() {
        // tests/data/compiled-v2.bin was written by `caduceus policy compile`
        // from tests/data/compiled-v2.toml, with settings in arrays beside
        // the slots. Its archive would pass rkyv's checks as version 3, so
        // the version field is what must stop it.
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("policy.compiled");
        std::fs::write(&path, include_bytes!("../tests/data/compiled-v2.bin")).unwrap();
        let error = Policy::open_compiled(&path).unwrap_err().to_string();
        assert!(
            error.contains("format version 2 is not supported; this build reads version 3"),
            "{error}"
        );
        assert!(error.contains("caduceus policy compile"), "{error}");
    }

    #[test]
    fn open_rejects_slot_settings_unlike_rule() {
        // A slot whose settings disagree with its rule's must not load:
        // lookups would then apply settings that no rule states.
        let config = parse_config(CONFIG, "test.toml").unwrap();
        let mut policy = Policy::compile(&config).unwrap();
        policy.rules[0][0].max_connections += 1;
        policy.rules[0][1].max_connections += 1;
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("policy.compiled");
        policy.write_compiled(&path).unwrap();
        let error = Policy::open_compiled(&path).unwrap_err().to_string();
        assert!(
            error.contains("slot") && error.contains("differ from rule 0"),
            "{error}"
        );
    }

    #[test]
    fn round_trip_keeps_rules() {
        let config = parse_config(CONFIG, "test.toml").unwrap();
        let policy = Policy::compile(&config).unwrap();
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("policy.compiled");
        policy.write_compiled(&path).unwrap();
        let loaded = Policy::open_compiled(&path).unwrap();
        assert_eq!(loaded.rule_count(), 2);
        for lane in crate::Lane::ALL {
            assert_eq!(
                loaded.for_domain("a.example", lane),
                policy.for_domain("a.example", lane)
            );
            assert_eq!(
                loaded.for_mx_host("mx.b.example", lane),
                policy.for_mx_host("mx.b.example", lane)
            );
            assert_eq!(loaded.defaults(lane), policy.defaults(lane));
        }
    }
}
