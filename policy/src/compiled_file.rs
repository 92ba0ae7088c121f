//! The compiled policy file that `caduceus policy compile` writes and the
//! engine memory-maps at start and on reload, so that those skip compiling
//! the rules (table building, and the IDN conversion and checks of every
//! rule) when the config has not changed.
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
//! | 24 | 32 | source digest: [`crate::policy_digest`] of the config it was compiled from |
//! | 56 | 4 | CRC-32C of bytes 0 to 55 |
//! | 60 | 4 | reserved, zero |
//! | 64 | n | rkyv 0.8 archive of [`Policy`] |
//!
//! The archive starts at offset 64, so it is 16-byte aligned, as rkyv's
//! validated access needs, in any image that starts on a 16-byte boundary:
//! a memory mapping (page aligned) or the aligned buffer that
//! [`Policy::open_compiled`] reads into.
//! The archive layout follows the Rust types of the policy, so any change to
//! those types that changes their archived bytes must bump
//! [`FORMAT_VERSION`].

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rkyv::rancor;
use rkyv::util::AlignedVec;

use crate::compiled::Policy;
use crate::file_io::write_atomically;

const MAGIC: [u8; 8] = *b"CDCSPOLC";
/// Bump whenever the archived layout of [`Policy`] or the header changes.
/// Version 3 grew the header to 64 bytes to carry the source digest, and
/// keeps each rule's per-message settings in its 64-byte slot and the rest
/// per rule. Version 2 kept all settings in arrays parallel to the slots,
/// and version 1 had 24-byte slots and settings per rule.
pub(crate) const FORMAT_VERSION: u32 = 3;

const MAGIC_OFFSET: usize = 0;
const VERSION_OFFSET: usize = MAGIC_OFFSET + 8;
const ARCHIVE_CRC_OFFSET: usize = VERSION_OFFSET + 4;
const ARCHIVE_LENGTH_OFFSET: usize = ARCHIVE_CRC_OFFSET + 4;
const SOURCE_DIGEST_OFFSET: usize = ARCHIVE_LENGTH_OFFSET + 8;
const HEADER_CRC_OFFSET: usize = SOURCE_DIGEST_OFFSET + 32;
const RESERVED_OFFSET: usize = HEADER_CRC_OFFSET + 4;
/// The size of the header, and so the offset of the archive.
pub const COMPILED_HEADER_BYTES: usize = RESERVED_OFFSET + 4;
/// The alignment the archive needs in memory, which rkyv's validated access
/// checks.
const ARCHIVE_ALIGNMENT: usize = 16;
const _: () = assert!(COMPILED_HEADER_BYTES == 64);
const _: () = assert!(COMPILED_HEADER_BYTES.is_multiple_of(ARCHIVE_ALIGNMENT));

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
    #[error(
        "compiled policy {}: the archive sits {misalignment} bytes past a {ARCHIVE_ALIGNMENT}-byte boundary in memory; map the file, or read it into a buffer that starts on a {ARCHIVE_ALIGNMENT}-byte boundary",
        path.display()
    )]
    Misaligned { path: PathBuf, misalignment: usize },
}

impl CompiledPolicyError {
    fn invalid(path: &Path, problem: String) -> CompiledPolicyError {
        CompiledPolicyError::Invalid {
            path: path.to_path_buf(),
            problem,
        }
    }

    fn io(operation: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CompiledPolicyError {
        let path = path.to_path_buf();
        move |source| CompiledPolicyError::Io {
            operation,
            path,
            source,
        }
    }
}

/// The fields of a header whose magic, version and checksum are valid.
struct Header {
    archive_crc: u32,
    archive_length: u64,
    source_digest: [u8; 32],
}

impl Policy {
    /// Writes the compiled tables to `path` with `source_digest`, the
    /// [`crate::policy_digest`] of the config they were compiled from,
    /// replacing any earlier file atomically (temporary file, fsync,
    /// rename, directory fsync).
    pub fn write_compiled(
        &self,
        path: &Path,
        source_digest: [u8; 32],
    ) -> Result<(), CompiledPolicyError> {
        let archive = rkyv::to_bytes::<rancor::Error>(self).map_err(|error| {
            CompiledPolicyError::invalid(path, format!("serialising the policy failed: {error}"))
        })?;
        let mut bytes = Vec::with_capacity(COMPILED_HEADER_BYTES + archive.len());
        bytes.extend_from_slice(&encode_header(&archive, source_digest));
        bytes.extend_from_slice(&archive);
        write_atomically(path, &bytes).map_err(|error| CompiledPolicyError::Io {
            operation: error.operation,
            path: error.path,
            source: error.source,
        })
    }

    /// Reads a file written by [`Policy::write_compiled`] into an aligned
    /// buffer and loads it with [`Policy::from_compiled_image`].
    pub fn open_compiled(path: &Path) -> Result<Policy, CompiledPolicyError> {
        let mut file = File::open(path).map_err(CompiledPolicyError::io("open", path))?;
        let length = file
            .metadata()
            .map_err(CompiledPolicyError::io("stat", path))?
            .len();
        let mut image =
            AlignedVec::<ARCHIVE_ALIGNMENT>::with_capacity(usize::try_from(length).unwrap_or(0));
        io::copy(&mut file, &mut image).map_err(CompiledPolicyError::io("read", path))?;
        Policy::from_compiled_image(Arc::new(image), path)
    }

    /// Loads a compiled policy from `image`, the whole file's bytes, such as
    /// a read-only memory mapping of it. `path` names the file in errors.
    ///
    /// Checks the header and both checksums, validates the archive with
    /// rkyv's checked access, and checks that every table index points
    /// inside its table, so that no input makes this or a later lookup
    /// panic. The archive must be 16-byte aligned in memory, which holds
    /// when `image` starts on a 16-byte boundary.
    ///
    /// It does not compare the source digest with a config. Callers that
    /// need a policy for a given config check [`compiled_image_digest`]
    /// first.
    pub fn from_compiled_image(
        image: Arc<dyn AsRef<[u8]> + Send + Sync>,
        path: &Path,
    ) -> Result<Policy, CompiledPolicyError> {
        let bytes: &[u8] = (*image).as_ref();
        let header =
            parse_header(bytes).map_err(|problem| CompiledPolicyError::invalid(path, problem))?;
        check_length(bytes.len() as u64, &header)
            .map_err(|problem| CompiledPolicyError::invalid(path, problem))?;
        let archive = &bytes[COMPILED_HEADER_BYTES..];
        let misalignment = archive.as_ptr() as usize % ARCHIVE_ALIGNMENT;
        if misalignment != 0 {
            return Err(CompiledPolicyError::Misaligned {
                path: path.to_path_buf(),
                misalignment,
            });
        }
        if crc32c::crc32c(archive) != header.archive_crc {
            return Err(CompiledPolicyError::invalid(
                path,
                "the archive checksum does not match; the file is damaged".to_string(),
            ));
        }

        // This copies the tables out of the image on purpose, so the image
        // is dropped on return. Large slot arrays go to huge pages, and
        // lookups in them are faster than in the file's 4 KiB pages.
        let mut policy = rkyv::from_bytes::<Policy, rancor::Error>(archive).map_err(|error| {
            CompiledPolicyError::invalid(path, format!("the archive is not valid: {error}"))
        })?;
        policy
            .check_tables()
            .map_err(|problem| CompiledPolicyError::invalid(path, problem))?;
        policy.rebuild_filters();
        Ok(policy)
    }
}

/// Returns the source digest in the header of `image`, a whole compiled
/// file, after checking the header and that the file length matches the
/// header. It does not check the archive; see
/// [`Policy::from_compiled_image`].
pub fn compiled_image_digest(image: &[u8], path: &Path) -> Result<[u8; 32], CompiledPolicyError> {
    let header =
        parse_header(image).map_err(|problem| CompiledPolicyError::invalid(path, problem))?;
    check_length(image.len() as u64, &header)
        .map_err(|problem| CompiledPolicyError::invalid(path, problem))?;
    Ok(header.source_digest)
}

/// Reads the source digest from the header of the compiled file at `path`,
/// reading only the header. Like [`compiled_image_digest`], it checks the
/// header and the file's length but not the archive.
pub fn read_compiled_digest(path: &Path) -> Result<[u8; 32], CompiledPolicyError> {
    let mut file = File::open(path).map_err(CompiledPolicyError::io("open", path))?;
    let length = file
        .metadata()
        .map_err(CompiledPolicyError::io("stat", path))?
        .len();
    let mut header_bytes = Vec::with_capacity(COMPILED_HEADER_BYTES);
    file.by_ref()
        .take(COMPILED_HEADER_BYTES as u64)
        .read_to_end(&mut header_bytes)
        .map_err(CompiledPolicyError::io("read", path))?;
    let header = parse_header(&header_bytes)
        .map_err(|problem| CompiledPolicyError::invalid(path, problem))?;
    check_length(length, &header).map_err(|problem| CompiledPolicyError::invalid(path, problem))?;
    Ok(header.source_digest)
}

fn encode_header(archive: &[u8], source_digest: [u8; 32]) -> [u8; COMPILED_HEADER_BYTES] {
    let mut header = [0u8; COMPILED_HEADER_BYTES];
    header[MAGIC_OFFSET..MAGIC_OFFSET + 8].copy_from_slice(&MAGIC);
    header[VERSION_OFFSET..VERSION_OFFSET + 4].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[ARCHIVE_CRC_OFFSET..ARCHIVE_CRC_OFFSET + 4]
        .copy_from_slice(&crc32c::crc32c(archive).to_le_bytes());
    header[ARCHIVE_LENGTH_OFFSET..ARCHIVE_LENGTH_OFFSET + 8]
        .copy_from_slice(&(archive.len() as u64).to_le_bytes());
    header[SOURCE_DIGEST_OFFSET..SOURCE_DIGEST_OFFSET + 32].copy_from_slice(&source_digest);
    let header_crc = crc32c::crc32c(&header[..HEADER_CRC_OFFSET]);
    header[HEADER_CRC_OFFSET..HEADER_CRC_OFFSET + 4].copy_from_slice(&header_crc.to_le_bytes());
    header
}

/// Checks the magic, the version and the header checksum at the start of
/// `bytes`, which may contain only the header.
fn parse_header(bytes: &[u8]) -> Result<Header, String> {
    if bytes.len() < VERSION_OFFSET + 4 {
        return Err(format!(
            "the file is {} bytes long, too short for a compiled policy",
            bytes.len()
        ));
    }
    if bytes[MAGIC_OFFSET..MAGIC_OFFSET + 8] != MAGIC {
        return Err("not a compiled Caduceus policy (wrong magic)".to_string());
    }

    // The version comes before the header checksum, because the checksum
    // sits at a different offset in other versions' headers.
    let version = read_u32(bytes, VERSION_OFFSET);
    if version != FORMAT_VERSION {
        return Err(format!(
            "format version {version} is not supported; this build reads version {FORMAT_VERSION}"
        ));
    }

    if bytes.len() < COMPILED_HEADER_BYTES {
        return Err(format!(
            "the file is {} bytes long, shorter than its {COMPILED_HEADER_BYTES}-byte header",
            bytes.len()
        ));
    }
    if crc32c::crc32c(&bytes[..HEADER_CRC_OFFSET]) != read_u32(bytes, HEADER_CRC_OFFSET) {
        return Err("the header checksum does not match; the file is damaged".to_string());
    }
    if read_u32(bytes, RESERVED_OFFSET) != 0 {
        return Err("the reserved header field is not zero".to_string());
    }

    let mut source_digest = [0u8; 32];
    source_digest.copy_from_slice(&bytes[SOURCE_DIGEST_OFFSET..SOURCE_DIGEST_OFFSET + 32]);
    Ok(Header {
        archive_crc: read_u32(bytes, ARCHIVE_CRC_OFFSET),
        archive_length: read_u64(bytes, ARCHIVE_LENGTH_OFFSET),
        source_digest,
    })
}

/// Checks that a file of `file_length` bytes consists of the header and
/// exactly the archive it describes.
fn check_length(file_length: u64, header: &Header) -> Result<(), String> {
    let archive_length = file_length.saturating_sub(COMPILED_HEADER_BYTES as u64);
    if archive_length != header.archive_length {
        return Err(format!(
            "the header promises a {}-byte archive, but {archive_length} bytes follow it; the file is truncated or damaged",
            header.archive_length
        ));
    }
    Ok(())
}

fn read_u32(bytes: &[u8], offset: usize) -> u32 {
    let mut field = [0u8; 4];
    field.copy_from_slice(&bytes[offset..offset + 4]);
    u32::from_le_bytes(field)
}

fn read_u64(bytes: &[u8], offset: usize) -> u64 {
    let mut field = [0u8; 8];
    field.copy_from_slice(&bytes[offset..offset + 8]);
    u64::from_le_bytes(field)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{parse_config, policy_digest};

    const CONFIG: &str = "[[rule]]\ndomain = \"a.example\"\ntls = \"none\"\n\n[[rule]]\nmx = \"*.b.example\"\nhold = true\n";

    fn compile(text: &str) -> (Policy, [u8; 32]) {
        let config = parse_config(text, "test.toml").unwrap();
        (Policy::compile(&config).unwrap(), policy_digest(&config))
    }

    /// Writes the compiled [`CONFIG`] to `path` and returns its digest.
    fn write_config(path: &Path) -> [u8; 32] {
        let (policy, digest) = compile(CONFIG);
        policy.write_compiled(path, digest).unwrap();
        digest
    }

    /// Rewrites both checksums of a compiled file after a test changed its
    /// bytes, so that only the change itself can make loading fail.
    fn reseal(bytes: &mut [u8]) {
        let archive_crc = crc32c::crc32c(&bytes[COMPILED_HEADER_BYTES..]);
        bytes[ARCHIVE_CRC_OFFSET..ARCHIVE_CRC_OFFSET + 4]
            .copy_from_slice(&archive_crc.to_le_bytes());
        let header_crc = crc32c::crc32c(&bytes[..HEADER_CRC_OFFSET]);
        bytes[HEADER_CRC_OFFSET..HEADER_CRC_OFFSET + 4].copy_from_slice(&header_crc.to_le_bytes());
    }

    fn load_bytes(bytes: &[u8]) -> Result<Policy, CompiledPolicyError> {
        let mut image = AlignedVec::<ARCHIVE_ALIGNMENT>::with_capacity(bytes.len());
        image.extend_from_slice(bytes);
        Policy::from_compiled_image(Arc::new(image), Path::new("test.compiled"))
    }

    #[test]
    fn open_rejects_missing_rule() {
        let (mut policy, digest) = compile(CONFIG);
        // A file whose tables point past its rules must not load, because a
        // lookup would index out of bounds.
        policy.sources.pop();
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("policy.compiled");
        policy.write_compiled(&path, digest).unwrap();
        let error = Policy::open_compiled(&path).unwrap_err().to_string();
        assert!(
            error.contains("points at rule 1, but there are 1 rules"),
            "{error}"
        );
    }

    /// Writes a compiled file whose header claims `version`, with a header
    /// checksum that matches, so that only the version is wrong.
    fn write_with_version(path: &Path, version: u32) {
        write_config(path);
        let mut bytes = std::fs::read(path).unwrap();
        bytes[VERSION_OFFSET..VERSION_OFFSET + 4].copy_from_slice(&version.to_le_bytes());
        reseal(&mut bytes);
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
        // from tests/data/compiled-v2.toml by a build that wrote version 2,
        // whose 32-byte header has no source digest.
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("policy.compiled");
        std::fs::write(&path, include_bytes!("../tests/data/compiled-v2.bin")).unwrap();
        let expected = "format version 2 is not supported; this build reads version 3";

        let error = Policy::open_compiled(&path).unwrap_err().to_string();
        assert!(error.contains(expected), "{error}");
        assert!(error.contains("caduceus policy compile"), "{error}");

        let error = read_compiled_digest(&path).unwrap_err().to_string();
        assert!(error.contains(expected), "{error}");
        assert!(error.contains("caduceus policy compile"), "{error}");
    }

    #[test]
    fn digest_round_trip() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("policy.compiled");
        let digest = write_config(&path);

        assert_eq!(read_compiled_digest(&path).unwrap(), digest);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(compiled_image_digest(&bytes, &path).unwrap(), digest);
        assert_eq!(
            bytes[SOURCE_DIGEST_OFFSET..SOURCE_DIGEST_OFFSET + 32],
            digest
        );
    }

    #[test]
    fn digest_of_changed_config_differs() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("policy.compiled");
        write_config(&path);
        let (_, changed) = compile(&CONFIG.replace("tls = \"none\"", "tls = \"verified\""));
        assert_ne!(read_compiled_digest(&path).unwrap(), changed);
    }

    #[test]
    fn damaged_digest_fails_header_check() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("policy.compiled");
        write_config(&path);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[SOURCE_DIGEST_OFFSET] ^= 1;
        std::fs::write(&path, &bytes).unwrap();

        let error = read_compiled_digest(&path).unwrap_err().to_string();
        assert!(error.contains("header checksum does not match"), "{error}");
        let error = Policy::open_compiled(&path).unwrap_err().to_string();
        assert!(error.contains("header checksum does not match"), "{error}");
    }

    #[test]
    fn truncated_file_rejected_by_header_read() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("policy.compiled");
        write_config(&path);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();

        let error = read_compiled_digest(&path).unwrap_err().to_string();
        assert!(error.contains("truncated or damaged"), "{error}");
        let error = Policy::open_compiled(&path).unwrap_err().to_string();
        assert!(error.contains("truncated or damaged"), "{error}");
    }

    #[test]
    fn reserved_field_must_be_zero() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("policy.compiled");
        write_config(&path);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[RESERVED_OFFSET] = 1;
        let error = load_bytes(&bytes).unwrap_err().to_string();
        assert!(error.contains("reserved header field"), "{error}");
    }

    /// An image that starts one byte into an aligned buffer.
    struct OffsetImage(AlignedVec<ARCHIVE_ALIGNMENT>);

    impl AsRef<[u8]> for OffsetImage {
        fn as_ref(&self) -> &[u8] {
            &self.0[1..]
        }
    }

    #[test]
    fn misaligned_image_rejected() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("policy.compiled");
        write_config(&path);
        let bytes = std::fs::read(&path).unwrap();
        let mut buffer = AlignedVec::<ARCHIVE_ALIGNMENT>::new();
        buffer.push(0);
        buffer.extend_from_slice(&bytes);

        let error = Policy::from_compiled_image(Arc::new(OffsetImage(buffer)), &path).unwrap_err();
        assert!(
            matches!(
                error,
                CompiledPolicyError::Misaligned {
                    misalignment: 1,
                    ..
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn every_prefix_rejected_without_panic() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("policy.compiled");
        write_config(&path);
        let bytes = std::fs::read(&path).unwrap();
        for length in 0..bytes.len() {
            assert!(
                load_bytes(&bytes[..length]).is_err(),
                "prefix of {length} bytes"
            );
        }
        assert!(load_bytes(&bytes).is_ok());
    }

    #[test]
    fn changed_archive_byte_never_panics() {
        // Each byte of the archive in turn gets another value, with both
        // checksums recomputed, so rkyv's validation and the table checks
        // alone must stop a bad file. A file that still loads must serve
        // lookups without panicking.
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("policy.compiled");
        write_config(&path);
        let original = std::fs::read(&path).unwrap();
        for position in COMPILED_HEADER_BYTES..original.len() {
            for replacement in [original[position] ^ 0x01, original[position] ^ 0x80, 0xff] {
                let mut bytes = original.clone();
                bytes[position] = replacement;
                reseal(&mut bytes);
                let Ok(policy) = load_bytes(&bytes) else {
                    continue;
                };
                for lane in crate::Lane::ALL {
                    for name in ["a.example", "x.a.example", "mx.b.example", "other.example"] {
                        let _ = policy.for_domain(name, lane);
                        let _ = policy.for_mx_host(name, lane);
                    }
                    let _ = policy.defaults(lane);
                }
                let _ = policy.sender_category("a.example");
                let _ = policy.explain("pat@a.example", crate::Lane::Bulk);
            }
        }
    }

    #[test]
    fn open_rejects_slot_settings_unlike_rule() {
        // A slot whose settings disagree with its rule's must not load,
        // because lookups would then apply settings that no rule states.
        let (mut policy, digest) = compile(CONFIG);
        policy.rules[0][0].max_connections += 1;
        policy.rules[0][1].max_connections += 1;
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("policy.compiled");
        policy.write_compiled(&path, digest).unwrap();
        let error = Policy::open_compiled(&path).unwrap_err().to_string();
        assert!(error.contains("slot"), "{error}");
        assert!(error.contains("differ from rule 0"), "{error}");
    }

    #[test]
    fn round_trip_keeps_rules() {
        let (policy, digest) = compile(CONFIG);
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("policy.compiled");
        policy.write_compiled(&path, digest).unwrap();
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
