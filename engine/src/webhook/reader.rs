//! Reads delivery log events after a cursor, across rotated files.
//!
//! A file is known to be complete when a later file of the same core
//! existed before it was read: a core creates its next file only after its
//! last write to the previous one. Bytes after the last newline of a
//! complete file are a line torn by a crash, and are skipped. In the file a
//! core still writes, they are a line still being written, and are left for
//! the next read.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use caduceus_policy::config::WebhookEvent;
use serde_json::{Map, Value};

use super::cursor::{Cursor, Position};
use super::idempotency_key;
use crate::deliverylog::{LogFileId, list_files};

/// The maximum line length the reader accepts. The engine writes lines of well
/// under 4 KiB, so a longer one is corruption and is skipped.
pub const MAX_LINE_BYTES: u64 = 1024 * 1024;

const READ_BUFFER_BYTES: usize = 64 * 1024;

/// Events read after a cursor, and the cursor just past them.
#[derive(Debug)]
pub struct Batch {
    /// Each selected event: the log line's fields plus `idempotency_key`.
    pub events: Vec<Map<String, Value>>,
    /// The cursor to store once the endpoint acknowledged `events`. It also
    /// passes lines that the filter left out or that were invalid.
    pub end: Cursor,
}

/// One endpoint's reader of `<state_dir>/log/`.
pub struct LogReader {
    dir: PathBuf,
    endpoint: String,
    events: HashSet<&'static str>,
    /// The core read first in the next batch; it turns each batch so that
    /// a busy core cannot hold back the others.
    next_core: usize,
}

/// How far one read of one file got.
struct FileRead {
    offset_bytes: u64,
    /// Every whole line of the file was read (or skipped), so the reader
    /// may go on to the core's next file when the file is complete.
    reached_end: bool,
}

impl LogReader {
    pub fn new(dir: &Path, endpoint: &str, events: &[WebhookEvent]) -> LogReader {
        LogReader {
            dir: dir.to_path_buf(),
            endpoint: endpoint.to_string(),
            events: events.iter().map(|event| event.as_str()).collect(),
            next_core: 0,
        }
    }

    /// Reads up to `max_events` selected events after `cursor`.
    pub fn read_batch(&mut self, cursor: &Cursor, max_events: usize) -> std::io::Result<Batch> {
        let mut files_by_core: BTreeMap<u16, Vec<LogFileId>> = BTreeMap::new();
        for id in list_files(&self.dir)? {
            files_by_core.entry(id.core).or_default().push(id);
        }
        let cores: Vec<u16> = files_by_core.keys().copied().collect();
        let mut batch = Batch {
            events: Vec::new(),
            end: cursor.clone(),
        };
        if cores.is_empty() {
            return Ok(batch);
        }
        let first = self.next_core % cores.len();
        self.next_core = self.next_core.wrapping_add(1);
        for step in 0..cores.len() {
            if batch.events.len() >= max_events {
                break;
            }
            let core = cores[(first + step) % cores.len()];
            self.read_core(&files_by_core[&core], &mut batch, max_events)?;
        }
        Ok(batch)
    }

    /// Reads one core's files, oldest first, from its position in
    /// `batch.end`, and moves that position on.
    fn read_core(
        &self,
        files: &[LogFileId],
        batch: &mut Batch,
        max_events: usize,
    ) -> std::io::Result<()> {
        let Some(&oldest) = files.first() else {
            return Ok(());
        };
        let mut position = batch.end.position(oldest.core).unwrap_or(Position {
            file: oldest,
            offset_bytes: 0,
        });
        loop {
            let index = match files.binary_search(&position.file) {
                Ok(index) => index,
                Err(next) => {
                    // The cursor's file was deleted. Lines in it that were
                    // never sent are lost to this endpoint.
                    let Some(&successor) = files.get(next) else {
                        break;
                    };
                    tracing::error!(
                        endpoint = %self.endpoint,
                        missing = %position.file,
                        next = %successor,
                        "webhook: the cursor's delivery log file is gone; events in it that were not acknowledged are lost, going on with the next file"
                    );
                    position = Position {
                        file: successor,
                        offset_bytes: 0,
                    };
                    continue;
                }
            };
            let complete = index + 1 < files.len();
            let read = self.read_file(position, complete, batch, max_events)?;
            position.offset_bytes = read.offset_bytes;
            if !(read.reached_end && complete) {
                break;
            }
            position = Position {
                file: files[index + 1],
                offset_bytes: 0,
            };
        }
        batch.end.set(position);
        Ok(())
    }

    /// Reads whole lines of one file from `position` until `max_events`
    /// events are in the batch or the file ends.
    fn read_file(
        &self,
        position: Position,
        complete: bool,
        batch: &mut Batch,
        max_events: usize,
    ) -> std::io::Result<FileRead> {
        let path = self.dir.join(position.file.file_name());
        let mut file = match File::open(&path) {
            Ok(file) => file,
            // Deleted since it was listed: handled like a missing file on
            // the next read.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Ok(FileRead {
                    offset_bytes: position.offset_bytes,
                    reached_end: false,
                });
            }
            Err(error) => return Err(error),
        };
        let size_bytes = file.metadata()?.len();
        if position.offset_bytes > size_bytes {
            tracing::error!(
                endpoint = %self.endpoint,
                file = %position.file,
                offset_bytes = position.offset_bytes,
                size_bytes,
                "webhook: the delivery log file is shorter than the cursor; it was truncated or replaced"
            );
            return Ok(FileRead {
                offset_bytes: position.offset_bytes,
                reached_end: true,
            });
        }
        file.seek(SeekFrom::Start(position.offset_bytes))?;
        let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, file);
        let mut offset_bytes = position.offset_bytes;
        let mut line = Vec::new();
        loop {
            if batch.events.len() >= max_events {
                return Ok(FileRead {
                    offset_bytes,
                    reached_end: false,
                });
            }
            line.clear();
            let read_bytes = (&mut reader)
                .take(MAX_LINE_BYTES)
                .read_until(b'\n', &mut line)?;
            if read_bytes == 0 {
                return Ok(FileRead {
                    offset_bytes,
                    reached_end: true,
                });
            }
            if line.last() == Some(&b'\n') {
                self.select(&line[..line.len() - 1], position.file, offset_bytes, batch);
                offset_bytes += read_bytes as u64;
                continue;
            }
            if read_bytes as u64 == MAX_LINE_BYTES {
                match skip_line(&mut reader)? {
                    Some(rest_bytes) => {
                        tracing::warn!(
                            endpoint = %self.endpoint,
                            file = %position.file,
                            offset_bytes,
                            "webhook: skipped a delivery log line longer than {MAX_LINE_BYTES} bytes"
                        );
                        offset_bytes += read_bytes as u64 + rest_bytes;
                        continue;
                    }
                    None if !complete => {
                        return Ok(FileRead {
                            offset_bytes,
                            reached_end: false,
                        });
                    }
                    None => {}
                }
            } else if !complete {
                // A line the core is still writing.
                return Ok(FileRead {
                    offset_bytes,
                    reached_end: true,
                });
            }
            tracing::warn!(
                endpoint = %self.endpoint,
                file = %position.file,
                offset_bytes,
                "webhook: skipped a torn last line of a delivery log file"
            );
            return Ok(FileRead {
                offset_bytes: size_bytes.max(offset_bytes),
                reached_end: true,
            });
        }
    }

    /// Adds a log line to the batch when its event is selected. Lines that
    /// are not JSON objects with a string `event` are logged and skipped.
    fn select(&self, line: &[u8], file: LogFileId, offset_bytes: u64, batch: &mut Batch) {
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        let fields = match serde_json::from_slice::<Value>(line) {
            Ok(Value::Object(fields)) => fields,
            _ => {
                tracing::warn!(
                    endpoint = %self.endpoint,
                    %file,
                    offset_bytes,
                    "webhook: skipped a delivery log line that is not a JSON object"
                );
                return;
            }
        };
        let Some(event) = fields.get("event").and_then(Value::as_str) else {
            tracing::warn!(
                endpoint = %self.endpoint,
                %file,
                offset_bytes,
                "webhook: skipped a delivery log line without an event"
            );
            return;
        };
        if !self.events.contains(event) {
            return;
        }
        let key = idempotency_key(&fields);
        let mut fields = fields;
        fields.insert("idempotency_key".into(), Value::String(key));
        batch.events.push(fields);
    }
}

/// Reads past the rest of an over-long line. Returns the bytes skipped up
/// to and including its newline, or `None` when the file ends first.
fn skip_line(reader: &mut BufReader<File>) -> std::io::Result<Option<u64>> {
    let mut skipped_bytes = 0u64;
    loop {
        let buffer = reader.fill_buf()?;
        if buffer.is_empty() {
            return Ok(None);
        }
        if let Some(newline) = buffer.iter().position(|&byte| byte == b'\n') {
            reader.consume(newline + 1);
            return Ok(Some(skipped_bytes + newline as u64 + 1));
        }
        let length = buffer.len();
        reader.consume(length);
        skipped_bytes += length as u64;
    }
}
