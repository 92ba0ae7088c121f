//! The append-only journal of runtime list changes.
//!
//! The control plane appends each batch of changes and calls fdatasync
//! before it publishes them, so an acknowledged change survives a crash. At
//! start the journal is replayed over the compiled table, and a compile
//! folds it into the next list file and then empties it.
//!
//! Replay is idempotent: each change sets or clears one flag of one key, so
//! the final flags of a key are those of its last change, whatever the base.
//! A crash between writing the new list file and emptying the journal
//! therefore replays changes that the file already holds, which is harmless.
//!
//! # File layout
//!
//! All integers are little-endian.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic, `CDCSJRNL` |
//! | 8 | 4 | format version, 1 |
//! | 12 | 4 | record size in bytes, 48 |
//! | 16 | 8 | site key check, as in the list file |
//! | 24 | 8 | reserved, zero |
//! | 32 | 48 × n | records |
//!
//! Each record:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 1 | operation: 1 add, 2 remove |
//! | 1 | 1 | entry: the flag bit (1 consent, 2 opt-out, 4 hard bounce, 8 complaint) |
//! | 2 | 2 | reserved, zero |
//! | 4 | 8 | time of the change, milliseconds since the Unix epoch |
//! | 12 | 32 | HMAC-SHA-256 of the normalised address |
//! | 44 | 4 | CRC-32C of bytes 0 to 43 |

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::{Change, ChangeOp, Entry};
use crate::SiteKey;

const MAGIC: [u8; 8] = *b"CDCSJRNL";
const FORMAT_VERSION: u32 = 1;

const MAGIC_OFFSET: usize = 0;
const VERSION_OFFSET: usize = MAGIC_OFFSET + 8;
const RECORD_SIZE_OFFSET: usize = VERSION_OFFSET + 4;
const KEY_CHECK_OFFSET: usize = RECORD_SIZE_OFFSET + 4;
const HEADER_SIZE_BYTES: usize = KEY_CHECK_OFFSET + 8 + 8;

const OP_OFFSET: usize = 0;
const ENTRY_OFFSET: usize = OP_OFFSET + 1;
const TIME_OFFSET: usize = ENTRY_OFFSET + 1 + 2;
const HMAC_OFFSET: usize = TIME_OFFSET + 8;
const CRC_OFFSET: usize = HMAC_OFFSET + 32;
const RECORD_SIZE_BYTES: usize = CRC_OFFSET + 4;
const _: () = assert!(RECORD_SIZE_BYTES == 48);

const OP_ADD: u8 = 1;
const OP_REMOVE: u8 = 2;

/// A journal that cannot be opened, replayed or appended to.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {}: {operation} failed: {source}", path.display())]
    Io {
        operation: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("journal {}: {problem}", path.display())]
    Invalid { path: PathBuf, problem: String },
    /// An earlier write or sync failed, so the file may end in a partial
    /// record and its durable contents are unknown.
    #[error(
        "journal {}: an earlier append failed, so no more changes are accepted; reopen the journal to replay it and continue",
        path.display()
    )]
    Poisoned { path: PathBuf },
}

/// The append-only file of runtime changes; see the module documentation.
#[derive(Debug)]
pub struct Journal {
    file: File,
    path: PathBuf,
    poisoned: bool,
}

impl Journal {
    /// Opens the journal at `path`, creating it with mode 0600 when missing,
    /// and returns it with the changes it holds, oldest first.
    ///
    /// A partial or damaged last record is the trace of an append that
    /// crashed before its fdatasync returned, so the caller never
    /// acknowledged it: it is cut off with a warning. Damage anywhere else
    /// is an error, because dropping a change that was acknowledged could
    /// send mail to an address that opted out.
    pub fn open(path: &Path, key: &SiteKey) -> Result<(Journal, Vec<Change>), JournalError> {
        let io_error = |operation| {
            move |source| JournalError::Io {
                operation,
                path: path.to_path_buf(),
                source,
            }
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(io_error("open"))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io_error("read"))?;

        let new_header = header(key);
        if bytes.len() < HEADER_SIZE_BYTES && new_header.starts_with(&bytes) {
            // A new file, or one whose creation crashed before the header
            // was synced.
            file.set_len(0).map_err(io_error("truncate"))?;
            file.seek(SeekFrom::Start(0)).map_err(io_error("seek"))?;
            file.write_all(&new_header)
                .map_err(io_error("write header"))?;
            file.sync_all().map_err(io_error("fsync"))?;
            sync_parent(path).map_err(io_error("sync directory"))?;
            let journal = Journal {
                file,
                path: path.to_path_buf(),
                poisoned: false,
            };
            return Ok((journal, Vec::new()));
        }

        let changes = parse(&bytes, key).map_err(|problem| JournalError::Invalid {
            path: path.to_path_buf(),
            problem,
        })?;
        let valid_length = HEADER_SIZE_BYTES + changes.len() * RECORD_SIZE_BYTES;
        if valid_length < bytes.len() {
            tracing::warn!(
                journal = %path.display(),
                cut_bytes = bytes.len() - valid_length,
                "lists: journal ends in a partial record from an interrupted append; cutting it off"
            );
            file.set_len(valid_length as u64)
                .map_err(io_error("truncate"))?;
            file.sync_data().map_err(io_error("fdatasync"))?;
        }
        file.seek(SeekFrom::End(0)).map_err(io_error("seek"))?;
        let journal = Journal {
            file,
            path: path.to_path_buf(),
            poisoned: false,
        };
        Ok((journal, changes))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `changes` in one write and waits for fdatasync. Once this
    /// returns `Ok`, the changes survive a crash and may be published.
    ///
    /// After an error the changes may or may not be durable, so the journal
    /// accepts no more appends until it is reopened, which replays whatever
    /// reached the disk.
    pub fn append(&mut self, changes: &[Change]) -> Result<(), JournalError> {
        if self.poisoned {
            return Err(JournalError::Poisoned {
                path: self.path.clone(),
            });
        }
        let mut bytes = Vec::with_capacity(changes.len() * RECORD_SIZE_BYTES);
        for change in changes {
            bytes.extend_from_slice(&encode(change));
        }
        let written = self
            .file
            .write_all(&bytes)
            .map_err(|source| (source, "write"))
            .and_then(|()| {
                self.file
                    .sync_data()
                    .map_err(|source| (source, "fdatasync"))
            });
        written.map_err(|(source, operation)| {
            self.poisoned = true;
            tracing::error!(
                journal = %self.path.display(),
                changes = changes.len(),
                operation,
                error = %source,
                "lists: journal append failed; refusing further changes until it is reopened"
            );
            JournalError::Io {
                operation,
                path: self.path.clone(),
                source,
            }
        })
    }

    /// Empties the journal after its changes were folded into a list file
    /// that is already durable.
    ///
    /// After an error the journal may or may not be empty on disk. Either
    /// state replays correctly, but the journal accepts no more appends
    /// until it is reopened.
    pub fn reset(&mut self) -> Result<(), JournalError> {
        if self.poisoned {
            return Err(JournalError::Poisoned {
                path: self.path.clone(),
            });
        }
        let result = self
            .file
            .set_len(HEADER_SIZE_BYTES as u64)
            .map_err(|source| (source, "truncate"))
            .and_then(|()| {
                self.file
                    .sync_data()
                    .map_err(|source| (source, "fdatasync"))
            })
            .and_then(|()| {
                self.file
                    .seek(SeekFrom::End(0))
                    .map(|_| ())
                    .map_err(|source| (source, "seek"))
            });
        result.map_err(|(source, operation)| {
            self.poisoned = true;
            tracing::error!(
                journal = %self.path.display(),
                operation,
                error = %source,
                "lists: journal reset failed; refusing further changes until it is reopened"
            );
            JournalError::Io {
                operation,
                path: self.path.clone(),
                source,
            }
        })
    }
}

fn header(key: &SiteKey) -> [u8; HEADER_SIZE_BYTES] {
    let mut header = [0u8; HEADER_SIZE_BYTES];
    header[MAGIC_OFFSET..MAGIC_OFFSET + 8].copy_from_slice(&MAGIC);
    header[VERSION_OFFSET..VERSION_OFFSET + 4].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[RECORD_SIZE_OFFSET..RECORD_SIZE_OFFSET + 4]
        .copy_from_slice(&(RECORD_SIZE_BYTES as u32).to_le_bytes());
    header[KEY_CHECK_OFFSET..KEY_CHECK_OFFSET + 8].copy_from_slice(&key.key_check());
    header
}

fn encode(change: &Change) -> [u8; RECORD_SIZE_BYTES] {
    let mut record = [0u8; RECORD_SIZE_BYTES];
    record[OP_OFFSET] = match change.op {
        ChangeOp::Add => OP_ADD,
        ChangeOp::Remove => OP_REMOVE,
    };
    record[ENTRY_OFFSET] = change.entry.flag();
    record[TIME_OFFSET..TIME_OFFSET + 8].copy_from_slice(&change.time_unix_ms.to_le_bytes());
    record[HMAC_OFFSET..HMAC_OFFSET + 32].copy_from_slice(&change.hmac);
    let crc = crc32c::crc32c(&record[..CRC_OFFSET]);
    record[CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
    record
}

/// Decodes one record, or returns why it is invalid.
fn decode(record: &[u8]) -> Result<Change, String> {
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&record[CRC_OFFSET..CRC_OFFSET + 4]);
    if crc32c::crc32c(&record[..CRC_OFFSET]) != u32::from_le_bytes(crc) {
        return Err("its checksum does not match".to_string());
    }
    let op = match record[OP_OFFSET] {
        OP_ADD => ChangeOp::Add,
        OP_REMOVE => ChangeOp::Remove,
        other => return Err(format!("operation {other} is unknown")),
    };
    let entry = Entry::from_flag(record[ENTRY_OFFSET])
        .ok_or_else(|| format!("entry {:#04x} is unknown", record[ENTRY_OFFSET]))?;
    let mut time = [0u8; 8];
    time.copy_from_slice(&record[TIME_OFFSET..TIME_OFFSET + 8]);
    let mut hmac = [0u8; 32];
    hmac.copy_from_slice(&record[HMAC_OFFSET..HMAC_OFFSET + 32]);
    Ok(Change {
        op,
        entry,
        hmac,
        time_unix_ms: u64::from_le_bytes(time),
    })
}

/// Parses a whole journal. Returns the changes of every valid record; a
/// partial or damaged last record is left out. Damage before the last
/// record is an error.
fn parse(bytes: &[u8], key: &SiteKey) -> Result<Vec<Change>, String> {
    if bytes.len() < HEADER_SIZE_BYTES {
        return Err(format!(
            "the file is {} bytes long, shorter than its {HEADER_SIZE_BYTES}-byte header; move it aside if it is not a journal",
            bytes.len()
        ));
    }
    if bytes[MAGIC_OFFSET..MAGIC_OFFSET + 8] != MAGIC {
        return Err("not a Caduceus list journal (wrong magic)".to_string());
    }
    let mut field = [0u8; 4];

    field.copy_from_slice(&bytes[VERSION_OFFSET..VERSION_OFFSET + 4]);
    let version = u32::from_le_bytes(field);
    if version != FORMAT_VERSION {
        return Err(format!(
            "format version {version} is not supported; this build reads version {FORMAT_VERSION}"
        ));
    }
    field.copy_from_slice(&bytes[RECORD_SIZE_OFFSET..RECORD_SIZE_OFFSET + 4]);
    if u32::from_le_bytes(field) as usize != RECORD_SIZE_BYTES {
        return Err(format!("the record size is not {RECORD_SIZE_BYTES} bytes"));
    }
    if bytes[KEY_CHECK_OFFSET..KEY_CHECK_OFFSET + 8] != key.key_check() {
        return Err(
            "the journal was written under a different site key; its changes cannot be applied"
                .to_string(),
        );
    }

    let records = &bytes[HEADER_SIZE_BYTES..];
    let complete = records.len() / RECORD_SIZE_BYTES;
    let mut changes = Vec::with_capacity(complete);
    for (index, record) in records.chunks_exact(RECORD_SIZE_BYTES).enumerate() {
        match decode(record) {
            Ok(change) => changes.push(change),
            // A torn last write leaves a damaged final record and nothing
            // after it.
            Err(_) if index + 1 == complete => break,
            Err(problem) => {
                return Err(format!(
                    "record {index} at byte {}: {problem}; the journal is damaged before its last record",
                    HEADER_SIZE_BYTES + index * RECORD_SIZE_BYTES
                ));
            }
        }
    }
    Ok(changes)
}

fn sync_parent(path: &Path) -> io::Result<()> {
    let directory = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(directory)?.sync_all()
}
