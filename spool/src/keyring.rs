//! The spool's AES-256-GCM keys.
//!
//! File format, one directive per line, `#` starts a comment:
//!
//! ```text
//! key <id> <64 hex digits>     a 256-bit key; ids are decimal u32, never 0
//! active <id>                  the key that seals new records
//! wrapped <id> <provider> ...  reserved for keys wrapped by a KMS
//! ```
//!
//! Old keys stay in the file after a rotation so records sealed under them
//! remain readable.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use ring::aead::{AES_256_GCM, LessSafeKey, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

use crate::error::KeyError;

/// The length of an AES-256 key in bytes.
pub const KEY_BYTES: usize = 32;

struct Key {
    aead: LessSafeKey,
    // Kept to write the keyring back to disk after a rotation.
    raw: [u8; KEY_BYTES],
}

/// Key id to AES-256-GCM key, with one active key for new records.
///
/// Each executor opens its spool shard with its own copy.
#[derive(Clone)]
pub struct Keyring {
    keys: BTreeMap<u32, Key>,
    active: u32,
}

impl fmt::Debug for Keyring {
    // Key material must never reach a log, so only the ids are shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("key_ids", &self.keys.keys().collect::<Vec<_>>())
            .field("active", &self.active)
            .finish()
    }
}

impl Drop for Keyring {
    fn drop(&mut self) {
        for key in self.keys.values_mut() {
            // Volatile writes so the compiler cannot drop the wipe as a dead
            // store. ring's `LessSafeKey` keeps its own expanded key schedule,
            // which this wipe cannot reach.
            for byte in key.raw.iter_mut() {
                // SAFETY: `byte` is a valid, aligned, exclusive reference.
                unsafe { std::ptr::write_volatile(byte, 0) };
            }
        }
    }
}

impl Clone for Key {
    // ring's keys are not `Clone`; a copy is rebuilt from the raw bytes.
    fn clone(&self) -> Key {
        make_key(self.raw)
    }
}

fn make_key(raw: [u8; KEY_BYTES]) -> Key {
    // `UnboundKey::new` only fails on a wrong key length, and `raw` has the
    // AES-256 length by type.
    let unbound = UnboundKey::new(&AES_256_GCM, &raw).expect("AES-256 key is 32 bytes");
    Key {
        aead: LessSafeKey::new(unbound),
        raw,
    }
}

fn decode_key_hex(hex_text: &str) -> Result<[u8; KEY_BYTES], String> {
    let mut raw = [0u8; KEY_BYTES];
    if hex_text.len() != KEY_BYTES * 2 {
        return Err(format!(
            "expected {} hex digits, found {}",
            KEY_BYTES * 2,
            hex_text.len()
        ));
    }
    hex::decode_to_slice(hex_text, &mut raw).map_err(|error| error.to_string())?;
    Ok(raw)
}

fn random_key() -> Result<[u8; KEY_BYTES], KeyError> {
    let mut raw = [0u8; KEY_BYTES];
    SystemRandom::new()
        .fill(&mut raw)
        .map_err(|_| KeyError::Random)?;
    Ok(raw)
}

impl Keyring {
    /// Loads the keyring at `path`, or creates it with one random key (id 1)
    /// and mode 0600 if it does not exist.
    ///
    /// A file readable or writable by group or others is rejected, because it
    /// contains the keys to every message at rest.
    pub fn load_or_create(path: &Path) -> Result<Keyring, KeyError> {
        let io_error = |source| KeyError::Io {
            path: path.to_owned(),
            source,
        };
        match fs::metadata(path) {
            Ok(metadata) => {
                let mode = metadata.permissions().mode() & 0o7777;
                if mode != 0o600 {
                    return Err(KeyError::InsecureMode {
                        path: path.to_owned(),
                        mode,
                    });
                }
                let text = fs::read_to_string(path).map_err(io_error)?;
                Keyring::parse(path, &text)
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let keyring = Keyring::from_raw(1, random_key()?);
                keyring.create_file(path)?;
                tracing::info!(path = %path.display(), key_id = 1, "spool: created keyring");
                Ok(keyring)
            }
            Err(error) => Err(io_error(error)),
        }
    }

    /// Builds a one-key keyring from 64 hex digits, as given in the
    /// `CADUCEUS_SPOOL_KEY` environment variable.
    pub fn from_hex(id: u32, hex_text: &str) -> Result<Keyring, KeyError> {
        if id == 0 {
            return Err(KeyError::InvalidKey(
                "key id 0 is reserved for unencrypted records".into(),
            ));
        }
        let raw = decode_key_hex(hex_text.trim()).map_err(KeyError::InvalidKey)?;
        Ok(Keyring::from_raw(id, raw))
    }

    fn from_raw(id: u32, raw: [u8; KEY_BYTES]) -> Keyring {
        let mut keys = BTreeMap::new();
        keys.insert(id, make_key(raw));
        Keyring { keys, active: id }
    }

    /// Parses keyring text; `path` only labels errors.
    pub fn parse(path: &Path, text: &str) -> Result<Keyring, KeyError> {
        let syntax = |line: usize, reason: String| KeyError::Syntax {
            path: path.to_owned(),
            line,
            reason,
        };
        let mut keys = BTreeMap::new();
        let mut active = None;
        for (index, line) in text.lines().enumerate() {
            let number = index + 1;
            let line = line.split('#').next().unwrap_or("").trim();
            let mut words = line.split_ascii_whitespace();
            let Some(directive) = words.next() else {
                continue;
            };
            let words: Vec<&str> = words.collect();
            let parse_id = |text: &str| -> Result<u32, KeyError> {
                match text.parse::<u32>() {
                    Ok(0) | Err(_) => Err(syntax(
                        number,
                        format!(
                            "invalid key id {text:?}: expected a decimal number from 1 to 4294967295"
                        ),
                    )),
                    Ok(id) => Ok(id),
                }
            };
            match (directive, words.as_slice()) {
                ("key", [id, hex_text]) => {
                    let id = parse_id(id)?;
                    let raw = decode_key_hex(hex_text)
                        .map_err(|reason| syntax(number, format!("key {id}: {reason}")))?;
                    if keys.insert(id, make_key(raw)).is_some() {
                        return Err(syntax(number, format!("key id {id} appears twice")));
                    }
                }
                ("active", [id]) => {
                    if active.replace(parse_id(id)?).is_some() {
                        return Err(syntax(number, "more than one active line".into()));
                    }
                }
                // TODO: unwrap KMS-wrapped keys; until then a keyring that
                // needs one cannot be loaded.
                ("wrapped", _) => {
                    return Err(syntax(
                        number,
                        "KMS-wrapped keys are not supported by this version".into(),
                    ));
                }
                _ => {
                    return Err(syntax(
                        number,
                        format!(
                            "expected `key <id> <64 hex>` or `active <id>`, found {directive:?} with {} arguments",
                            words.len()
                        ),
                    ));
                }
            }
        }
        let active = active.ok_or_else(|| syntax(0, "missing `active <id>` line".into()))?;
        if !keys.contains_key(&active) {
            return Err(KeyError::UnknownKey(active));
        }
        Ok(Keyring { keys, active })
    }

    /// Adds a key under `id` without activating it.
    pub fn add_key(&mut self, id: u32, raw: [u8; KEY_BYTES]) -> Result<(), KeyError> {
        if id == 0 {
            return Err(KeyError::InvalidKey(
                "key id 0 is reserved for unencrypted records".into(),
            ));
        }
        if self.keys.contains_key(&id) {
            return Err(KeyError::InvalidKey(format!("key id {id} already exists")));
        }
        self.keys.insert(id, make_key(raw));
        Ok(())
    }

    /// Makes an existing key the one that seals new records.
    pub fn set_active(&mut self, id: u32) -> Result<(), KeyError> {
        if !self.keys.contains_key(&id) {
            return Err(KeyError::UnknownKey(id));
        }
        self.active = id;
        Ok(())
    }

    /// Adds a new random key with the next free id, activates it and returns
    /// its id. Call [`Keyring::save`] to persist it.
    pub fn rotate(&mut self) -> Result<u32, KeyError> {
        let last = self.keys.keys().next_back().copied().unwrap_or(0);
        let id = last
            .checked_add(1)
            .ok_or_else(|| KeyError::InvalidKey("no key id left after 4294967295".into()))?;
        self.add_key(id, random_key()?)?;
        self.active = id;
        Ok(id)
    }

    /// Writes the keyring to `path` with mode 0600, replacing it atomically.
    pub fn save(&self, path: &Path) -> Result<(), KeyError> {
        let temporary = path.with_extension("tmp");
        let _ = fs::remove_file(&temporary);
        self.create_file(&temporary)?;
        let io_error = |source| KeyError::Io {
            path: path.to_owned(),
            source,
        };
        fs::rename(&temporary, path).map_err(io_error)?;
        // The rename is durable only once the directory is synced.
        let parent = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        fs::File::open(parent)
            .and_then(|directory| directory.sync_all())
            .map_err(io_error)
    }

    fn create_file(&self, path: &Path) -> Result<(), KeyError> {
        let io_error = |source| KeyError::Io {
            path: path.to_owned(),
            source,
        };
        let mut text =
            String::from("# Caduceus spool keys. Keep every key that may still seal a record.\n");
        for (id, key) in &self.keys {
            text.push_str(&format!("key {id} {}\n", hex::encode(key.raw)));
        }
        text.push_str(&format!("active {}\n", self.active));
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io_error)?;
        // The umask can only clear bits, but set the mode explicitly anyway
        // so the file never depends on it.
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(io_error)?;
        file.write_all(text.as_bytes()).map_err(io_error)?;
        file.sync_all().map_err(io_error)
    }

    /// Returns the id of the key that seals new records.
    pub fn active_id(&self) -> u32 {
        self.active
    }

    /// Returns the ids of all keys, ascending.
    pub fn key_ids(&self) -> Vec<u32> {
        self.keys.keys().copied().collect()
    }

    pub(crate) fn active_key(&self) -> (u32, &LessSafeKey) {
        // `active` is checked against `keys` by every constructor and setter.
        let key = self
            .keys
            .get(&self.active)
            .expect("active key is in the keyring");
        (self.active, &key.aead)
    }

    pub(crate) fn key(&self, id: u32) -> Option<&LessSafeKey> {
        self.keys.get(&id).map(|key| &key.aead)
    }
}
