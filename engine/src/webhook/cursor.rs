//! The durable position of one endpoint in the delivery log: for each core,
//! the file and byte offset of the first line not yet acknowledged.
//!
//! On disk, `<state_dir>/webhooks/<endpoint>.cursor` is one JSON object:
//!
//! ```json
//! {"version":1,"positions":[{"file":"delivery.0.20261204.3.log","offset_bytes":81920}]}
//! ```
//!
//! The file name carries the core. A cursor is replaced whole: written to
//! `<endpoint>.cursor.tmp`, synced, renamed over the old one, and the
//! directory synced, so a crash leaves either the old or the new cursor.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::deliverylog::LogFileId;

const CURSOR_VERSION: u32 = 1;

/// The start of the next unread line of one core's log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    pub file: LogFileId,
    pub offset_bytes: u64,
}

/// One endpoint's positions, one per core that has written a log file.
/// A core with no position starts at its oldest file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    positions: BTreeMap<u16, Position>,
}

/// Why a cursor file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CursorError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid cursor: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CursorFile {
    version: u32,
    positions: Vec<PositionRecord>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PositionRecord {
    file: String,
    offset_bytes: u64,
}

impl Cursor {
    pub fn position(&self, core: u16) -> Option<Position> {
        self.positions.get(&core).copied()
    }

    pub fn set(&mut self, position: Position) {
        self.positions.insert(position.file.core, position);
    }

    pub fn positions(&self) -> impl Iterator<Item = Position> + '_ {
        self.positions.values().copied()
    }

    /// Reads a cursor file. A missing file is an empty cursor: the endpoint
    /// starts at each core's oldest file.
    pub fn load(path: &Path) -> Result<Cursor, CursorError> {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Cursor::default());
            }
            Err(source) => {
                return Err(CursorError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        let invalid = |reason: String| CursorError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let parsed: CursorFile =
            serde_json::from_slice(&bytes).map_err(|error| invalid(error.to_string()))?;
        if parsed.version != CURSOR_VERSION {
            return Err(invalid(format!(
                "version {} (expected {CURSOR_VERSION})",
                parsed.version
            )));
        }
        let mut cursor = Cursor::default();
        for record in parsed.positions {
            let file = LogFileId::parse(&record.file)
                .ok_or_else(|| invalid(format!("{:?} is not a delivery log file", record.file)))?;
            if cursor.positions.contains_key(&file.core) {
                return Err(invalid(format!("core {} appears twice", file.core)));
            }
            cursor.set(Position {
                file,
                offset_bytes: record.offset_bytes,
            });
        }
        Ok(cursor)
    }

    /// Replaces the cursor file at `path` durably. When this returns `Ok`,
    /// the new cursor survives a power loss; when it fails, the file holds
    /// the old cursor or the new one, and the old one only costs resent
    /// events.
    pub fn store(&self, path: &Path) -> std::io::Result<()> {
        let record = CursorFile {
            version: CURSOR_VERSION,
            positions: self
                .positions
                .values()
                .map(|position| PositionRecord {
                    file: position.file.file_name(),
                    offset_bytes: position.offset_bytes,
                })
                .collect(),
        };
        let mut text = serde_json::to_vec(&record).map_err(std::io::Error::other)?;
        text.push(b'\n');
        let mut temporary_name = path.as_os_str().to_owned();
        temporary_name.push(".tmp");
        let temporary = PathBuf::from(temporary_name);
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)?;
        file.write_all(&text)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&temporary, path)?;
        // The rename is durable only once the directory entry is synced.
        let dir = path.parent().unwrap_or(Path::new("."));
        File::open(dir)?.sync_all()
    }
}
