//! The Ed25519 key that signs audit checkpoints.
//!
//! `<state_dir>/keys/audit.key` holds the private key as PKCS#8 (mode 0600,
//! created on first start); `audit.pub` holds the public key as 64 hex
//! digits so that it can be copied off the host with the anchors.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ring::rand::SystemRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

/// The checkpoint signing key pair.
pub struct AuditKey {
    pair: Ed25519KeyPair,
    public_hex: String,
}

impl AuditKey {
    /// Loads `audit.key` from `keys_dir`, or creates it (and `audit.pub`)
    /// when it does not exist. A key file readable by group or others is
    /// rejected, because anyone who can read it can forge checkpoints.
    pub fn load_or_create(keys_dir: &Path) -> Result<AuditKey, String> {
        let path = keys_dir.join("audit.key");
        let key = match fs::symlink_metadata(&path) {
            Ok(metadata) => {
                let mode = metadata.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(format!(
                        "{} has mode {mode:o}; it must be 0600 (run `chmod 600 {}`)",
                        path.display(),
                        path.display()
                    ));
                }
                let pkcs8 = fs::read(&path)
                    .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
                AuditKey::from_pkcs8(&pkcs8)
                    .map_err(|error| format!("{}: {error}", path.display()))?
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => AuditKey::create(&path)?,
            Err(error) => return Err(format!("cannot stat {}: {error}", path.display())),
        };
        let public_path = keys_dir.join("audit.pub");
        let current = fs::read_to_string(&public_path).unwrap_or_default();
        if current.trim() != key.public_hex {
            fs::write(&public_path, format!("{}\n", key.public_hex))
                .map_err(|error| format!("cannot write {}: {error}", public_path.display()))?;
        }
        Ok(key)
    }

    /// Parses a PKCS#8 document as produced by ring.
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<AuditKey, String> {
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8)
            .map_err(|error| format!("invalid Ed25519 PKCS#8 key: {error}"))?;
        let public_hex = hex::encode(pair.public_key().as_ref());
        Ok(AuditKey { pair, public_hex })
    }

    /// Generates a key for tests and tools that need no file.
    pub fn generate() -> Result<AuditKey, String> {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| "Ed25519 key generation failed".to_string())?;
        AuditKey::from_pkcs8(pkcs8.as_ref())
    }

    /// Writes a new key through a temporary file and a hard link, so a
    /// crash never leaves a partial key and a concurrent start keeps the
    /// first key written.
    fn create(path: &Path) -> Result<AuditKey, String> {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| "Ed25519 key generation failed".to_string())?;
        let temporary: PathBuf = path.with_extension(format!("tmp{}", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&temporary)?;
            file.write_all(pkcs8.as_ref())?;
            file.sync_all()?;
            match fs::hard_link(&temporary, path) {
                Ok(()) => Ok(()),
                Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
                Err(error) => Err(error),
            }
        };
        let result = write();
        let _ = fs::remove_file(&temporary);
        result.map_err(|error| format!("cannot create {}: {error}", path.display()))?;
        // Another process may have won the race; use whichever key is on disk.
        let stored =
            fs::read(path).map_err(|error| format!("cannot read {}: {error}", path.display()))?;
        tracing::info!(path = %path.display(), "audit: created the checkpoint signing key");
        AuditKey::from_pkcs8(&stored)
    }

    /// The public key as 64 lowercase hex digits.
    pub fn public_hex(&self) -> &str {
        &self.public_hex
    }

    /// Signs `message` and returns the signature as hex.
    pub fn sign_hex(&self, message: &[u8]) -> String {
        hex::encode(self.pair.sign(message).as_ref())
    }
}

/// Checks an Ed25519 signature given as hex against a public key in hex.
pub fn verify_hex(public_hex: &str, message: &[u8], signature_hex: &str) -> bool {
    let (Ok(public), Ok(signature)) = (hex::decode(public_hex), hex::decode(signature_hex)) else {
        return false;
    };
    UnparsedPublicKey::new(&ED25519, public)
        .verify(message, &signature)
        .is_ok()
}

/// Reads `audit.pub` (64 hex digits).
pub fn read_public_hex(keys_dir: &Path) -> Result<String, String> {
    let path = keys_dir.join("audit.pub");
    let text = fs::read_to_string(&path).map_err(|error| {
        format!(
            "cannot read {}: {error}; it is written when the engine first starts with auditing on",
            path.display()
        )
    })?;
    let trimmed = text.trim();
    if trimmed.len() != 64 || !trimmed.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "{} does not hold an Ed25519 public key (64 hex digits)",
            path.display()
        ));
    }
    Ok(trimmed.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_key_reloads_with_mode_0600() {
        let directory = tempfile::tempdir().unwrap();
        let created = AuditKey::load_or_create(directory.path()).unwrap();
        let mode = fs::metadata(directory.path().join("audit.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let loaded = AuditKey::load_or_create(directory.path()).unwrap();
        assert_eq!(created.public_hex(), loaded.public_hex());
        assert_eq!(
            read_public_hex(directory.path()).unwrap(),
            created.public_hex()
        );
    }

    #[test]
    fn group_readable_key_is_rejected() {
        let directory = tempfile::tempdir().unwrap();
        AuditKey::load_or_create(directory.path()).unwrap();
        let path = directory.path().join("audit.key");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let error = AuditKey::load_or_create(directory.path())
            .err()
            .expect("a 0640 key must be rejected");
        assert!(error.contains("0600"), "{error}");
    }

    #[test]
    fn signature_verifies_and_detects_changes() {
        let key = AuditKey::generate().unwrap();
        let signature = key.sign_hex(b"head");
        assert!(verify_hex(key.public_hex(), b"head", &signature));
        assert!(!verify_hex(key.public_hex(), b"heae", &signature));
        assert!(!verify_hex(key.public_hex(), b"head", "00"));
    }
}
