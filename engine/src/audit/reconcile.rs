//! Rebuilding, at start, the `accepted` records that a crash kept out of an
//! executor's audit files.
//!
//! An executor stages a message's `accepted` record when it appends the
//! message to its spool shard, and the flush task writes and syncs it later.
//! The `250` waits only for the spool's group commit, and the spool record
//! contains every field of the `accepted` record. So the spool serves as the
//! write-ahead record for the audit stream: whatever a crash lost from the
//! audit files is rebuilt from the spool when the executor starts again.
//!
//! Every audit record of a spool append (`accepted`, `dsn`, `adopted`, and
//! rebuilt `accepted` records) names the append's location in its `spool`
//! field, as `segment:offset`. Records are staged in append order, so the
//! newest record with a `spool` field shows how far the audit files cover
//! the spool, and each original message record after it lacks its audit
//! record. At every start, once the missing records are rebuilt, the stream
//! records `spool_reconciled` with the location of the shard's last append
//! and syncs it. The next run's appends follow that location, except after
//! the spool emptied, where segment numbers start again at 1; then
//! `spool_reconciled` has no `spool` field, and the next start lists every
//! original record.
//!
//! Two rules keep every record that may lack its audit record inside the
//! spool: the engine releases a finished message (which may delete its
//! segment) only once the audit stream is synced through the message's
//! records, and compaction syncs the stream before it copies messages.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::ops::ControlFlow;
use std::path::Path;

use caduceus_spool::{ListAppends, RecordRef};
use serde::Deserialize;

use super::chain::StreamFiles;

/// The bytes read per step when a file is scanned from its end.
const CHUNK_BYTES: u64 = 64 * 1024;

/// The fields that mark how far a stream covers its spool shard.
#[derive(Deserialize)]
struct Mark<'a> {
    #[serde(borrow)]
    event: &'a str,
    #[serde(borrow, default)]
    spool: Option<&'a str>,
}

/// Formats a spool location as the `spool` field writes it.
pub fn location(record: RecordRef) -> String {
    format!("{}:{}", record.segment, record.offset)
}

fn parse_location(text: &str) -> Option<RecordRef> {
    let (segment, offset) = text.split_once(':')?;
    Some(RecordRef {
        segment: segment.parse().ok()?,
        offset: offset.parse().ok()?,
    })
}

/// Finds which spool records of this stream's shard may lack their audit
/// records, from the newest record that names a spool location.
pub fn appends_to_check(files: &StreamFiles) -> io::Result<ListAppends> {
    for (_, path) in files.iter().rev() {
        let mut found = None;
        each_line_backwards(path, |line| {
            let Ok(mark) = serde_json::from_slice::<Mark>(line) else {
                return ControlFlow::Continue(());
            };
            let location = mark.spool.and_then(parse_location);
            if mark.event == "spool_reconciled" {
                found = Some(location.map_or(ListAppends::All, ListAppends::After));
            } else if let Some(location) = location {
                found = Some(ListAppends::After(location));
            }
            if found.is_some() {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })?;
        if let Some(found) = found {
            return Ok(found);
        }
    }
    // A new stream, or one written before audit records named spool
    // locations: every record in the spool is checked.
    Ok(ListAppends::All)
}

/// Calls `visit` with each whole line of `path` (without its `\n`), last
/// line first, until it breaks. A fragment after the last newline is
/// skipped.
fn each_line_backwards(
    path: &Path,
    mut visit: impl FnMut(&[u8]) -> ControlFlow<()>,
) -> io::Result<()> {
    let mut file = File::open(path)?;
    let mut end = file.metadata()?.len();
    // The bytes from the start of the current chunk to `end`.
    let mut pending: Vec<u8> = Vec::new();
    let mut seen_newline = false;
    while end > 0 {
        let start = end.saturating_sub(CHUNK_BYTES);
        let mut chunk = vec![0; (end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut chunk)?;
        chunk.extend_from_slice(&pending);
        pending = chunk;
        end = start;
        // Visit every line that is whole now: it has a newline before it
        // within `pending`, or it starts the file.
        while let Some(last_newline) = pending.iter().rposition(|byte| *byte == b'\n') {
            if !seen_newline {
                // Whatever follows the file's last newline is a torn fragment.
                seen_newline = true;
                pending.truncate(last_newline);
                continue;
            }
            let line_start = last_newline + 1;
            let line = &pending[line_start..];
            if !line.is_empty() && visit(line).is_break() {
                return Ok(());
            }
            pending.truncate(last_newline);
        }
    }
    if seen_newline && !pending.is_empty() {
        let _ = visit(&pending);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::date::Date;

    fn lines_backwards(content: &[u8], chunk_split: bool) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("core-0-20261205.jsonl");
        let mut content = content.to_vec();
        if chunk_split {
            // Long lines so that lines straddle the 64 KiB chunks.
            content = content
                .split(|byte| *byte == b'\n')
                .map(|line| {
                    let mut long = line.to_vec();
                    if !long.is_empty() {
                        long.extend(std::iter::repeat_n(b'x', 40_000));
                    }
                    long
                })
                .collect::<Vec<_>>()
                .join(&b'\n');
        }
        std::fs::write(&path, &content).unwrap();
        let mut lines = Vec::new();
        each_line_backwards(&path, |line| {
            lines.push(String::from_utf8_lossy(&line[..line.len().min(3)]).into_owned());
            ControlFlow::Continue(())
        })
        .unwrap();
        lines
    }

    #[test]
    fn backward_scan_skips_torn_fragment() {
        for chunk_split in [false, true] {
            assert_eq!(
                lines_backwards(b"aaa\nbbb\nccc\ntorn", chunk_split),
                ["ccc", "bbb", "aaa"],
                "chunk_split {chunk_split}"
            );
            assert_eq!(lines_backwards(b"aaa\nbbb\n", chunk_split), ["bbb", "aaa"]);
            assert!(lines_backwards(b"only a fragment", chunk_split).is_empty());
        }
    }

    fn stream_with(lines: &[&str]) -> (tempfile::TempDir, StreamFiles) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("core-0-20261205.jsonl");
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        let day = Date::parse("2026-12-05").unwrap();
        (dir, vec![(day, path)])
    }

    #[test]
    fn check_starts_after_newest_location() {
        let (_dir, files) = stream_with(&[
            r#"{"seq":1,"event":"accepted","spool":"1:64"}"#,
            r#"{"seq":2,"event":"accepted","spool":"2:4096"}"#,
            r#"{"seq":3,"event":"outcome"}"#,
        ]);
        assert_eq!(
            appends_to_check(&files).unwrap(),
            ListAppends::After(RecordRef {
                segment: 2,
                offset: 4096
            })
        );
    }

    #[test]
    fn check_after_empty_spool_lists_all() {
        let (_dir, files) = stream_with(&[
            r#"{"seq":1,"event":"accepted","spool":"7:64"}"#,
            r#"{"seq":2,"event":"spool_reconciled","recovered":0}"#,
        ]);
        assert_eq!(appends_to_check(&files).unwrap(), ListAppends::All);
    }

    #[test]
    fn check_without_locations_lists_all() {
        let (_dir, files) = stream_with(&[r#"{"seq":1,"event":"started","pid":7}"#]);
        assert_eq!(appends_to_check(&files).unwrap(), ListAppends::All);
        assert_eq!(appends_to_check(&Vec::new()).unwrap(), ListAppends::All);
    }
}
