//! One audit stream: a hash-chained, append-only sequence of JSON lines
//! split into daily files, and its signed checkpoints.
//!
//! Line format (one JSON object, then `\n`):
//!
//! | field   | meaning |
//! |---------|---------|
//! | `seq`   | 1 for the stream's first record, then +1 per record, across files |
//! | `prev`  | SHA-256 (hex) of the previous record's line bytes without its `\n`; 64 zeros before the first |
//! | `at_us` | when the record was written, microseconds since the Unix epoch |
//! | `event` | the record kind; the other fields depend on it |
//!
//! Files are `<stream>-YYYYMMDD.jsonl` (UTC day of the records in them).
//! The chain continues across files: a new day's first record carries the
//! hash of the previous file's last line.
//!
//! A checkpoint is one line of a checkpoint file: a stream's head (name,
//! seq, hash of the line with that seq, time, file) signed with Ed25519.
//! Each stream signs only its own head, so streams on different executors
//! share no state. They share only the checkpoint files, opened with
//! `O_APPEND`, where the kernel places each single `write(2)` of a whole
//! line at the end of the file without interleaving.
//!
//! Checkpoint files are daily too: `checkpoints-YYYYMMDD.jsonl` contains the
//! checkpoints whose `file` is a stream file of that day, so retention
//! deletes a day's checkpoints together with the records they cover.
//! Versions before the daily checkpoint files wrote every checkpoint to
//! `checkpoints.jsonl`; verify still reads that file, and retention never
//! deletes it.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ring::digest::{SHA256, digest};
use serde::{Deserialize, Serialize};

use super::date::{DAY_US, Date};
use super::key::AuditKey;
use super::record::{Fields, write_chain_fields};

/// The `prev` of a stream's first record.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// A stream writes a checkpoint after this many records, and also at each
/// rotation and when it closes.
pub const CHECKPOINT_INTERVAL_RECORDS: u64 = 1000;

/// The name of the single checkpoint file that versions before the daily
/// checkpoint files wrote. It is read, never written.
pub const LEGACY_CHECKPOINT_FILE: &str = "checkpoints.jsonl";

/// The name prefix of the daily checkpoint files. It is reserved: no stream
/// may have this name, because the files would parse as its daily files.
pub const CHECKPOINT_STREAM: &str = "checkpoints";

/// How far back from the end of a file the last line is searched for when a
/// stream reopens. Records are a few hundred bytes, so this is generous.
const TAIL_SCAN_BYTES: u64 = 1 << 20;

/// Returns the SHA-256 of a line's bytes (without `\n`) as lowercase hex.
pub fn line_hash(line: &[u8]) -> String {
    hex::encode(line_digest(line))
}

/// Returns the SHA-256 of a line's bytes (without `\n`).
pub fn line_digest(line: &[u8]) -> [u8; 32] {
    let mut hash = [0u8; 32];
    hash.copy_from_slice(digest(&SHA256, line).as_ref());
    hash
}

/// The daily file name of a stream.
pub fn file_name(stream: &str, day: Date) -> String {
    format!("{stream}-{}.jsonl", day.compact())
}

/// Returns the name of the checkpoint file for the stream files of `day`.
pub fn checkpoint_file_name(day: Date) -> String {
    file_name(CHECKPOINT_STREAM, day)
}

/// Splits a file name into stream name and day, or `None` when it is not
/// an audit stream file (checkpoint files are not).
pub fn parse_file_name(name: &str) -> Option<(String, Date)> {
    let (stream, day) = parse_daily_name(name)?;
    (stream != CHECKPOINT_STREAM).then_some((stream, day))
}

fn parse_daily_name(name: &str) -> Option<(String, Date)> {
    let stem = name.strip_suffix(".jsonl")?;
    let (stream, day) = stem.rsplit_once('-')?;
    if day.len() != 8 || stream.is_empty() {
        return None;
    }
    Some((stream.to_string(), Date::parse(day)?))
}

/// Lists every checkpoint file in `dir`: the legacy `checkpoints.jsonl` first if
/// it exists (day `None`), then the daily files, oldest first.
pub fn list_checkpoint_files(dir: &Path) -> io::Result<Vec<(Option<Date>, PathBuf)>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        if name == LEGACY_CHECKPOINT_FILE {
            files.push((None, entry.path()));
        } else if let Some((stream, day)) = parse_daily_name(name)
            && stream == CHECKPOINT_STREAM
        {
            files.push((Some(day), entry.path()));
        }
    }
    files.sort();
    Ok(files)
}

/// One stream's daily files, oldest first.
pub type StreamFiles = Vec<(Date, PathBuf)>;

/// The files of every stream in `dir`, by stream name.
pub fn list_streams(dir: &Path) -> io::Result<Vec<(String, StreamFiles)>> {
    let mut streams: std::collections::BTreeMap<String, StreamFiles> =
        std::collections::BTreeMap::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if let Some((stream, day)) = name.to_str().and_then(parse_file_name) {
            streams.entry(stream).or_default().push((day, entry.path()));
        }
    }
    for files in streams.values_mut() {
        files.sort();
    }
    Ok(streams.into_iter().collect())
}

/// The last record of a stream: what the next record chains to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    /// 0 before the first record.
    pub seq: u64,
    /// SHA-256 of the record's line; all zeros before the first record.
    pub hash: [u8; 32],
}

impl Head {
    /// The head of a stream without records.
    pub const GENESIS: Head = Head {
        seq: 0,
        hash: [0; 32],
    };

    /// Returns the hash in lowercase hex, the form of `prev` fields and
    /// checkpoints.
    pub fn hash_hex(&self) -> String {
        hex::encode(self.hash)
    }
}

/// One line of a checkpoint file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Checkpoint {
    pub stream: String,
    pub seq: u64,
    pub hash: String,
    pub at_us: u64,
    pub file: String,
    /// The signer's Ed25519 public key, hex.
    pub key: String,
    /// Ed25519 over [`Checkpoint::signed_bytes`], hex.
    pub signature: String,
}

impl Checkpoint {
    /// The bytes the signature covers: every field but the key and the
    /// signature, one per line after a fixed label, so that no field can
    /// be shifted into another.
    pub fn signed_bytes(&self) -> Vec<u8> {
        format!(
            "caduceus-audit-checkpoint-v1\n{}\n{}\n{}\n{}\n{}\n",
            self.stream, self.seq, self.hash, self.at_us, self.file
        )
        .into_bytes()
    }

    fn sign(stream: &str, head: &Head, at_us: u64, file: &str, key: &AuditKey) -> Checkpoint {
        let mut checkpoint = Checkpoint {
            stream: stream.to_string(),
            seq: head.seq,
            hash: head.hash_hex(),
            at_us,
            file: file.to_string(),
            key: key.public_hex().to_string(),
            signature: String::new(),
        };
        checkpoint.signature = key.sign_hex(&checkpoint.signed_bytes());
        checkpoint
    }
}

/// An audit record's own fields, which follow the chain fields on its line.
pub trait Record {
    /// Writes `"event"` (the record kind) and then the kind's fields.
    fn write_fields(&self, fields: &mut Fields<'_>);
}

/// The repair `open` made at the end of the newest file.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Bytes after the last newline, removed because a crash interrupted
    /// their write; they were never covered by a sync that acknowledged
    /// anything.
    pub torn_bytes: u64,
    pub torn_file: Option<String>,
}

/// The writer of one stream. Not shared between threads: each executor and
/// the control thread own one.
pub struct StreamWriter {
    dir: PathBuf,
    stream: String,
    key: Arc<AuditKey>,
    retention_days: u64,
    day: Date,
    file: File,
    /// Bytes of whole lines in `file`, so that a failed write can be cut
    /// back to the last whole line.
    file_len_bytes: u64,
    /// The checkpoint file of `day`.
    checkpoints: File,
    buffer: Vec<u8>,
    head: Head,
    /// The head as of the last completed `fdatasync`.
    synced: Head,
    records_since_checkpoint: u64,
    /// Set by a rotation, so that an owner syncing through another file
    /// handle reopens it.
    generation: u64,
}

impl StreamWriter {
    /// Opens the stream `stream` in `dir`, continuing its chain from the
    /// newest file, and returns what was repaired at the tail.
    pub fn open(
        dir: &Path,
        stream: &str,
        key: Arc<AuditKey>,
        retention: std::time::Duration,
        now_us: u64,
    ) -> io::Result<(StreamWriter, Recovery)> {
        if stream == CHECKPOINT_STREAM {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "invalid audit stream name {stream:?}: it is reserved for checkpoint files"
                ),
            ));
        }
        fs::create_dir_all(dir)?;
        let files = list_streams(dir)?
            .into_iter()
            .find(|(name, _)| name == stream)
            .map(|(_, files)| files)
            .unwrap_or_default();
        let mut recovery = Recovery::default();
        let mut head = Head::GENESIS;
        // The newest file holding a whole line gives the head; a torn
        // fragment after its last newline is cut off first.
        for (index, (_, path)) in files.iter().enumerate().rev() {
            let (last, torn) = read_last_line(path)?;
            if torn > 0 && index == files.len() - 1 {
                let whole = fs::metadata(path)?.len() - torn;
                OpenOptions::new().write(true).open(path)?.set_len(whole)?;
                recovery.torn_bytes = torn;
                recovery.torn_file = path.file_name().map(|name| name.to_string_lossy().into());
            }
            if let Some(line) = last {
                let seq = serde_json::from_slice::<serde_json::Value>(&line)
                    .ok()
                    .and_then(|value| value.get("seq").and_then(serde_json::Value::as_u64))
                    .ok_or_else(|| {
                        io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!(
                                "the last line of {} has no seq; run `caduceus audit verify` and move the damaged file aside",
                                path.display()
                            ),
                        )
                    })?;
                head = Head {
                    seq,
                    hash: line_digest(&line),
                };
                break;
            }
        }
        let day = Date::from_unix_us(now_us);
        let (file, file_len_bytes) = open_append(&dir.join(file_name(stream, day)))?;
        let (checkpoints, _) = open_append(&dir.join(checkpoint_file_name(day)))?;
        let writer = StreamWriter {
            dir: dir.to_path_buf(),
            stream: stream.to_string(),
            key,
            retention_days: retention.as_secs().div_ceil(86_400),
            day,
            file,
            file_len_bytes,
            checkpoints,
            buffer: Vec::with_capacity(64 * 1024),
            synced: head,
            head,
            records_since_checkpoint: 0,
            generation: 0,
        };
        Ok((writer, recovery))
    }

    pub fn stream(&self) -> &str {
        &self.stream
    }

    pub fn head(&self) -> &Head {
        &self.head
    }

    /// Increases at every rotation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The file that records go to now.
    pub fn current_path(&self) -> PathBuf {
        self.dir.join(file_name(&self.stream, self.day))
    }

    /// True when records are buffered but not yet written to the file.
    pub fn has_buffered(&self) -> bool {
        !self.buffer.is_empty()
    }

    /// Returns the bytes buffered and not yet written to the file.
    pub fn buffered_bytes(&self) -> usize {
        self.buffer.len()
    }

    /// True when records were written since the last completed sync.
    pub fn needs_sync(&self) -> bool {
        self.synced.seq != self.head.seq
    }

    /// Adds one record to the buffer and returns its seq. A record of a new
    /// UTC day first rotates to that day's file. Nothing reaches the file
    /// until [`StreamWriter::write_out`].
    pub fn stage<R: Record + ?Sized>(&mut self, record: &R, at_us: u64) -> io::Result<u64> {
        let day = Date::from_unix_us(at_us);
        if day > self.day {
            self.rotate(day, at_us)?;
        }
        Ok(self.stage_line(record, at_us))
    }

    /// Encodes the record straight into the buffer and hashes the bytes
    /// in place, so a record costs no allocation once the buffer has grown.
    fn stage_line<R: Record + ?Sized>(&mut self, record: &R, at_us: u64) -> u64 {
        let seq = self.head.seq + 1;
        let start = self.buffer.len();
        write_chain_fields(&mut self.buffer, seq, &self.head.hash, at_us);
        record.write_fields(&mut Fields::new(&mut self.buffer));
        self.buffer.push(b'}');
        self.head = Head {
            seq,
            hash: line_digest(&self.buffer[start..]),
        };
        self.buffer.push(b'\n');
        self.records_since_checkpoint += 1;
        seq
    }

    /// Writes the buffered records with one `write(2)`. On failure the file
    /// is cut back to its last whole line and the records stay buffered,
    /// so the chain on disk never has a torn line in its middle.
    pub fn write_out(&mut self) -> io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        match self.file.write_all(&self.buffer) {
            Ok(()) => {
                self.file_len_bytes += self.buffer.len() as u64;
                self.buffer.clear();
                Ok(())
            }
            Err(error) => {
                if let Err(truncate_error) = self.file.set_len(self.file_len_bytes) {
                    tracing::error!(stream = %self.stream, error = %truncate_error, "audit: a failed write could not be cut back; verify will report the torn line");
                }
                Err(error)
            }
        }
    }

    /// Writes out and syncs the current file with a blocking `fdatasync`.
    /// For the control thread and for rotations; executors sync through
    /// io_uring instead.
    pub fn write_and_sync(&mut self) -> io::Result<()> {
        self.write_out()?;
        self.file.sync_data()?;
        self.mark_synced(self.head)
    }

    /// Records that every line up to `head` is durable, and writes a
    /// checkpoint when one is due. A checkpoint only ever covers synced
    /// lines, so a crash cannot leave a checkpoint past the file's end.
    pub fn mark_synced(&mut self, head: Head) -> io::Result<()> {
        self.synced = head;
        if self.records_since_checkpoint >= CHECKPOINT_INTERVAL_RECORDS {
            self.write_checkpoint(crate::deliverylog::now_us())?;
        }
        Ok(())
    }

    /// Signs the synced head and appends it to the checkpoint file of the
    /// current day.
    pub fn write_checkpoint(&mut self, at_us: u64) -> io::Result<()> {
        if self.synced.seq == 0 {
            return Ok(());
        }
        let file = file_name(&self.stream, self.day);
        let checkpoint = Checkpoint::sign(&self.stream, &self.synced, at_us, &file, &self.key);
        let mut line = serde_json::to_vec(&checkpoint)?;
        line.push(b'\n');
        self.checkpoints.write_all(&line)?;
        if self.synced.seq == self.head.seq {
            self.records_since_checkpoint = 0;
        }
        Ok(())
    }

    /// Syncs everything and writes a final checkpoint, at shutdown.
    pub fn close(&mut self) -> io::Result<()> {
        self.write_and_sync()?;
        self.write_checkpoint(crate::deliverylog::now_us())?;
        self.checkpoints.sync_data()
    }

    /// Finishes the current day's file and its checkpoints (blocking syncs,
    /// once a day) and starts `day`'s, then applies retention.
    fn rotate(&mut self, day: Date, at_us: u64) -> io::Result<()> {
        self.write_and_sync()?;
        self.write_checkpoint(at_us)?;
        // This stream writes no more checkpoints to the old day's file.
        self.checkpoints.sync_data()?;
        let (file, length) = open_append(&self.dir.join(file_name(&self.stream, day)))?;
        let (checkpoints, _) = open_append(&self.dir.join(checkpoint_file_name(day)))?;
        self.file = file;
        self.file_len_bytes = length;
        self.checkpoints = checkpoints;
        self.day = day;
        self.generation += 1;
        self.apply_retention(at_us)
    }

    /// Deletes this stream's files whose day is older than the retention,
    /// then the checkpoint files of such days, and records each deletion in
    /// the stream. The newest file is never deleted, so the chain always has
    /// a head to continue from.
    pub fn apply_retention(&mut self, now_us: u64) -> io::Result<()> {
        let today = (now_us / DAY_US) as i64;
        let cutoff = today - self.retention_days as i64;
        let streams = list_streams(&self.dir)?;
        self.delete_expired_stream_files(&streams, cutoff, now_us)?;
        self.delete_expired_checkpoint_files(&streams, cutoff, now_us)
    }

    fn delete_expired_stream_files(
        &mut self,
        streams: &[(String, StreamFiles)],
        cutoff: i64,
        now_us: u64,
    ) -> io::Result<()> {
        let Some((_, files)) = streams.iter().find(|(name, _)| *name == self.stream) else {
            return Ok(());
        };
        let current = self.current_path();
        let expired: Vec<&(Date, PathBuf)> = files
            .iter()
            .filter(|(day, path)| day.to_days() < cutoff && *path != current)
            .collect();
        let Some((_, newest_expired)) = expired.last() else {
            return Ok(());
        };
        let through_seq = match read_last_line(newest_expired)?.0 {
            Some(line) => serde_json::from_slice::<serde_json::Value>(&line)
                .ok()
                .and_then(|value| value.get("seq").and_then(serde_json::Value::as_u64))
                .unwrap_or(0),
            None => 0,
        };
        let mut names = Vec::new();
        for (_, path) in &expired {
            fs::remove_file(path)?;
            names.push(display_name(path));
        }
        tracing::info!(stream = %self.stream, files = names.len(), through_seq, retention_days = self.retention_days, "audit: deleted files past retention");
        self.stage_line(
            &super::AuditEvent::RetentionDeleted {
                files: &names,
                through_seq,
                retention_days: self.retention_days,
            },
            now_us,
        );
        self.write_and_sync()
    }

    /// Deletes the checkpoint files of days before `cutoff`. A day that is
    /// some stream's newest file is kept, because that stream's later
    /// checkpoints still name that file: an idle stream, or one whose
    /// executor no longer runs, never rotates away from it.
    fn delete_expired_checkpoint_files(
        &mut self,
        streams: &[(String, StreamFiles)],
        cutoff: i64,
        now_us: u64,
    ) -> io::Result<()> {
        let newest_days: BTreeSet<Date> = streams
            .iter()
            .filter_map(|(_, files)| files.last().map(|(day, _)| *day))
            .collect();
        let mut names = Vec::new();
        for (day, path) in list_checkpoint_files(&self.dir)? {
            // The legacy file has no day and is kept.
            let Some(day) = day else {
                continue;
            };
            if day.to_days() >= cutoff || day == self.day || newest_days.contains(&day) {
                continue;
            }
            match fs::remove_file(&path) {
                Ok(()) => names.push(display_name(&path)),
                // Another stream's retention deleted it first.
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => return Err(error),
            }
        }
        if names.is_empty() {
            return Ok(());
        }
        tracing::info!(stream = %self.stream, files = names.len(), retention_days = self.retention_days, "audit: deleted checkpoint files past retention");
        self.stage_line(
            &super::AuditEvent::CheckpointsDeleted {
                files: &names,
                retention_days: self.retention_days,
            },
            now_us,
        );
        self.write_and_sync()
    }
}

/// Returns the file name of `path`, for records and messages.
pub fn display_name(path: &Path) -> String {
    path.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Opens a file for appending and returns its length.
fn open_append(path: &Path) -> io::Result<(File, u64)> {
    let file = OpenOptions::new().create(true).append(true).open(path)?;
    let length = file.metadata()?.len();
    Ok((file, length))
}

/// Returns the last whole line of a file (without `\n`) and the number of
/// bytes after it that do not end in `\n`.
pub fn read_last_line(path: &Path) -> io::Result<(Option<Vec<u8>>, u64)> {
    let mut file = File::open(path)?;
    let length = file.metadata()?.len();
    let start = length.saturating_sub(TAIL_SCAN_BYTES);
    file.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::with_capacity((length - start) as usize);
    file.read_to_end(&mut tail)?;
    let Some(last_newline) = tail.iter().rposition(|byte| *byte == b'\n') else {
        // No newline at all: the whole file is one torn fragment (when it
        // is shorter than the scan window).
        let torn = if start == 0 { length } else { 0 };
        return Ok((None, torn));
    };
    let torn = (tail.len() - last_newline - 1) as u64;
    let before = &tail[..last_newline];
    let line_start = before
        .iter()
        .rposition(|byte| *byte == b'\n')
        .map_or(0, |position| position + 1);
    if line_start == 0 && start > 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the last line of {} is longer than {TAIL_SCAN_BYTES} bytes; the file is damaged",
                path.display()
            ),
        ));
    }
    Ok((Some(before[line_start..].to_vec()), torn))
}
