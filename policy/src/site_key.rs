//! The site key that turns recipient addresses into HMACs for logs and lists.
//!
//! Suppression and consent lists and `recipient_logging = "hmac"` store
//! HMAC-SHA-256 of the normalised address under this key. A plain SHA-256
//! would be reversible by hashing a list of known addresses; without the key
//! an HMAC is not.

use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

use crate::address::{AddressError, normalise_address};

/// Bytes of key material: the output size of SHA-256, as RFC 2104 §3
/// recommends for the key length.
const KEY_LENGTH_BYTES: usize = 32;
/// The only permission bits the key file may have.
const KEY_FILE_MODE: u32 = 0o600;
/// 64 hex digits and a newline, with room for a CRLF from an editor.
const MAX_KEY_FILE_BYTES: u64 = 2 * KEY_LENGTH_BYTES as u64 + 2;

/// A failure to load or create the site key.
#[derive(Debug, thiserror::Error)]
pub enum SiteKeyError {
    #[error("site key {}: {operation} failed: {source}", path.display())]
    Io {
        operation: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "site key {path} has mode {mode:04o}, but it must be readable by its owner only; run `chmod 600 {path}`",
        path = path.display()
    )]
    Mode { path: PathBuf, mode: u32 },
    #[error("site key {} is not a regular file (a symbolic link or directory); replace it with the key file itself", path.display())]
    NotAFile { path: PathBuf },
    #[error(
        "site key {} does not contain exactly {} hex digits; restore it from backup, because hashes made with another key no longer match",
        path.display(),
        2 * KEY_LENGTH_BYTES
    )]
    Malformed { path: PathBuf },
    #[error("the system random number generator failed")]
    Random,
}

/// The HMAC-SHA-256 key of this site.
#[derive(Clone)]
pub struct SiteKey {
    key: hmac::Key,
}

impl fmt::Debug for SiteKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material.
        f.write_str("SiteKey { .. }")
    }
}

impl SiteKey {
    pub fn from_bytes(bytes: &[u8; KEY_LENGTH_BYTES]) -> SiteKey {
        SiteKey {
            key: hmac::Key::new(hmac::HMAC_SHA256, bytes),
        }
    }

    /// Loads the key from `path`, creating it with 32 random bytes when the
    /// file does not exist.
    ///
    /// The file contains 64 hex digits and must have mode 0600; any other mode
    /// is rejected with the `chmod` that fixes it. A new file is written
    /// under a temporary name, synced, and then linked into place, so a
    /// crash never leaves a partial key and two processes starting together
    /// end up with the same key.
    pub fn load_or_create(path: &Path) -> Result<SiteKey, SiteKeyError> {
        match fs::symlink_metadata(path) {
            Ok(_) => SiteKey::load(path),
            Err(error) if error.kind() == io::ErrorKind::NotFound => SiteKey::create(path),
            Err(source) => Err(io_error("stat", path, source)),
        }
    }

    /// Loads an existing key file; see [`SiteKey::load_or_create`].
    pub fn load(path: &Path) -> Result<SiteKey, SiteKeyError> {
        let metadata =
            fs::symlink_metadata(path).map_err(|source| io_error("stat", path, source))?;
        if !metadata.file_type().is_file() {
            return Err(SiteKeyError::NotAFile {
                path: path.to_path_buf(),
            });
        }
        let mode = metadata.permissions().mode() & 0o7777;
        if mode != KEY_FILE_MODE {
            return Err(SiteKeyError::Mode {
                path: path.to_path_buf(),
                mode,
            });
        }
        if metadata.len() > MAX_KEY_FILE_BYTES {
            return Err(SiteKeyError::Malformed {
                path: path.to_path_buf(),
            });
        }
        let text = fs::read_to_string(path).map_err(|source| io_error("read", path, source))?;
        let mut bytes = [0u8; KEY_LENGTH_BYTES];
        hex::decode_to_slice(text.trim_end_matches(['\r', '\n']), &mut bytes).map_err(|_| {
            SiteKeyError::Malformed {
                path: path.to_path_buf(),
            }
        })?;
        Ok(SiteKey::from_bytes(&bytes))
    }

    fn create(path: &Path) -> Result<SiteKey, SiteKeyError> {
        let directory = path
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty());
        if let Some(directory) = directory {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(directory)
                .map_err(|source| io_error("create directory", directory, source))?;
        }

        let mut bytes = [0u8; KEY_LENGTH_BYTES];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| SiteKeyError::Random)?;

        let file_name = path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|| "site.key".to_string());
        let temporary = path.with_file_name(format!(".{file_name}.tmp-{}", std::process::id()));
        // A leftover from a crash of an earlier process with the same pid.
        match fs::remove_file(&temporary) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(io_error("remove stale temporary file", &temporary, source)),
        }
        let written = write_key_file(&temporary, &bytes);
        let linked = written.and_then(|()| {
            // Unlike rename, link fails when the target exists, so a key
            // created meanwhile by another process is never replaced.
            fs::hard_link(&temporary, path).map_err(|source| io_error("link", path, source))
        });
        let _ = fs::remove_file(&temporary);
        match linked {
            Ok(()) => {}
            Err(SiteKeyError::Io { source, .. })
                if source.kind() == io::ErrorKind::AlreadyExists =>
            {
                return SiteKey::load(path);
            }
            Err(error) => return Err(error),
        }
        if let Some(directory) = directory {
            File::open(directory)
                .and_then(|handle| handle.sync_all())
                .map_err(|source| io_error("sync directory", directory, source))?;
        }
        Ok(SiteKey::from_bytes(&bytes))
    }

    /// Computes HMAC-SHA-256 of the normalised form of `address` (see
    /// [`normalise_address`]), so that `User@Bücher.example` and
    /// `User@xn--bcher-kva.example` give the same value. Returns the error
    /// for an address that cannot be normalised; suppression and consent
    /// lists use this form.
    pub fn try_hmac_address(&self, address: &str) -> Result<[u8; 32], AddressError> {
        let normalised = normalise_address(address)?;
        Ok(self.sign(&normalised))
    }

    /// Computes HMAC-SHA-256 of `address` for a log line. Like
    /// [`SiteKey::try_hmac_address`], except that an address
    /// [`normalise_address`] rejects is hashed with only its domain
    /// ASCII-lowercased, so a log still gets a stable value that never shows
    /// the address.
    pub fn hmac_address(&self, address: &str) -> [u8; 32] {
        match normalise_address(address) {
            Ok(normalised) => self.sign(&normalised),
            Err(_) => match address.rsplit_once('@') {
                Some((local_part, domain)) => {
                    self.sign(&format!("{local_part}@{}", domain.to_ascii_lowercase()))
                }
                None => self.sign(address),
            },
        }
    }

    /// Returns [`SiteKey::hmac_address`] as 64 lowercase hex digits, the form
    /// used in logs and list files.
    pub fn hmac_hex(&self, address: &str) -> String {
        hex::encode(self.hmac_address(address))
    }

    /// Returns a value that identifies the key without revealing it: the
    /// first 8 bytes of an HMAC of a fixed label. List files and journals
    /// store it, so a file built under another key is rejected rather than
    /// silently matching nothing. The label has no `@`, so it never equals a
    /// normalised address.
    pub(crate) fn key_check(&self) -> [u8; 8] {
        let tag = self.sign("caduceus list key check v1");
        let mut check = [0u8; 8];
        check.copy_from_slice(&tag[..8]);
        check
    }

    fn sign(&self, normalised: &str) -> [u8; 32] {
        let tag = hmac::sign(&self.key, normalised.as_bytes());
        let mut output = [0u8; 32];
        output.copy_from_slice(tag.as_ref());
        output
    }
}

fn write_key_file(path: &Path, bytes: &[u8; KEY_LENGTH_BYTES]) -> Result<(), SiteKeyError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(KEY_FILE_MODE)
        .open(path)
        .map_err(|source| io_error("create", path, source))?;
    // The process umask can only clear bits, but a umask such as 0277 would
    // leave 0400, which `load` rejects; set the mode explicitly.
    file.set_permissions(fs::Permissions::from_mode(KEY_FILE_MODE))
        .map_err(|source| io_error("chmod", path, source))?;
    let text = format!("{}\n", hex::encode(bytes));
    file.write_all(text.as_bytes())
        .map_err(|source| io_error("write", path, source))?;
    file.sync_all()
        .map_err(|source| io_error("fsync", path, source))
}

fn io_error(operation: &'static str, path: &Path, source: io::Error) -> SiteKeyError {
    SiteKeyError::Io {
        operation,
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_then_load_same_key() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("keys").join("site.key");
        let created = SiteKey::load_or_create(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o600);
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.trim_end().len(), 64);
        let loaded = SiteKey::load_or_create(&path).unwrap();
        assert_eq!(
            created.hmac_hex("a@example.com"),
            loaded.hmac_hex("a@example.com")
        );
        let leftovers: Vec<_> = fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "temporary file left behind");
    }

    #[test]
    fn load_rejects_group_readable() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("site.key");
        fs::write(&path, format!("{}\n", "ab".repeat(32))).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let error = SiteKey::load_or_create(&path).unwrap_err();
        let message = error.to_string();
        assert!(
            matches!(error, SiteKeyError::Mode { mode: 0o640, .. }),
            "{message}"
        );
        assert!(
            message.contains(&format!("chmod 600 {}", path.display())),
            "{message}"
        );
    }

    #[test]
    fn load_rejects_malformed_and_symlink() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("site.key");
        for content in ["not hex", "abcd", &"zz".repeat(32), &"ab".repeat(40)] {
            fs::write(&path, content).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
            let error = SiteKey::load(&path).unwrap_err();
            assert!(
                matches!(error, SiteKeyError::Malformed { .. }),
                "{content:?}: {error}"
            );
        }
        let link = directory.path().join("link.key");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(matches!(
            SiteKey::load_or_create(&link),
            Err(SiteKeyError::NotAFile { .. })
        ));
    }

    #[test]
    fn hmac_normalises_before_signing() {
        let key = SiteKey::from_bytes(&[7u8; 32]);
        let unicode = key.hmac_hex("User@Bücher.Example");
        let ascii = key.hmac_hex("User@xn--bcher-kva.example");
        assert_eq!(unicode, ascii);
        assert_eq!(unicode.len(), 64);

        let other_case = key.hmac_hex("user@xn--bcher-kva.example");
        assert_ne!(unicode, other_case, "local parts are case-sensitive");

        let expected = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, &[7u8; 32]),
            b"User@xn--bcher-kva.example",
        );
        assert_eq!(unicode, hex::encode(expected.as_ref()));
        assert_eq!(
            key.try_hmac_address("User@Bücher.Example").unwrap(),
            key.hmac_address("User@xn--bcher-kva.example")
        );
        assert_eq!(format!("{key:?}"), "SiteKey { .. }");
    }

    #[test]
    fn hmac_of_invalid_address() {
        let key = SiteKey::from_bytes(&[7u8; 32]);
        assert!(key.try_hmac_address("no-at-sign").is_err());
        assert!(key.try_hmac_address("a@under_score.Example").is_err());

        // Logging still gets a stable value with the domain case folded.
        assert_eq!(
            key.hmac_hex("a@under_score.Example"),
            key.hmac_hex("a@UNDER_SCORE.example")
        );
        assert_ne!(
            key.hmac_hex("a@under_score.example"),
            key.hmac_hex("A@under_score.example")
        );
        assert_eq!(key.hmac_hex("no-at-sign").len(), 64);
    }
}
