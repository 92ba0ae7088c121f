//! `caduceus audit verify`: recomputes every stream's hash chain, checks the
//! signed checkpoints, and names the first record that was edited, inserted
//! or removed.
//!
//! What each check catches:
//! - an edited record changes its hash, so the next record's `prev` no
//!   longer matches it;
//! - a removed record leaves a gap in `seq`; an inserted one repeats a
//!   `seq` or breaks the next `prev`;
//! - a cut tail (or a chain rewritten with fresh hashes) disagrees with a
//!   signed checkpoint: the checkpoint names a seq past the end, or a
//!   different hash for that seq;
//! - an anchor, a checkpoint line kept off the host, still catches those
//!   when the checkpoint files themselves were cut or the key replaced.
//!
//! Checkpoints are read from every daily checkpoint file and from the
//! legacy `checkpoints.jsonl`, so a checkpoint written before a rotation
//! still checks the records of the rotated stream file.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::chain::{
    Checkpoint, GENESIS_HASH, display_name, line_hash, list_checkpoint_files, list_streams,
};
use super::key::verify_hex;

/// One problem found, with where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub stream: String,
    /// The file and 1-based line the problem is at, when it has one.
    pub file: Option<String>,
    pub line: Option<u64>,
    pub seq: Option<u64>,
    pub kind: ProblemKind,
    pub detail: String,
}

/// The kinds of tampering or damage verify tells apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProblemKind {
    Edited,
    Removed,
    Inserted,
    Truncated,
    Rewritten,
    TornLine,
    BadCheckpoint,
    KeyMismatch,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.stream)?;
        if let Some(file) = &self.file {
            write!(f, ": {file}")?;
        }
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(seq) = self.seq {
            write!(f, " seq {seq}")?;
        }
        write!(f, ": {:?}: {}", self.kind, self.detail)
    }
}

/// Counts per stream, for the summary.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamSummary {
    pub records: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub checkpoints_checked: u64,
}

/// The result of a verification.
#[derive(Debug, Default)]
pub struct Report {
    pub streams: BTreeMap<String, StreamSummary>,
    pub problems: Vec<Problem>,
}

/// A record's position, for messages.
#[derive(Clone)]
struct Location {
    file: String,
    line: u64,
    hash: String,
}

/// Verifies every stream in `audit_dir` against the public key (hex) and
/// the optional anchor lines.
pub fn verify(audit_dir: &Path, public_hex: &str, anchors: &[Checkpoint]) -> Report {
    let mut report = Report::default();
    let checkpoints = read_checkpoints(audit_dir, public_hex, &mut report);
    let mut required: HashMap<String, Vec<(Checkpoint, bool)>> = HashMap::new();
    for checkpoint in checkpoints {
        required
            .entry(checkpoint.stream.clone())
            .or_default()
            .push((checkpoint, false));
    }
    for anchor in anchors {
        if !verify_hex(&anchor.key, &anchor.signed_bytes(), &anchor.signature) {
            report.problems.push(Problem {
                stream: anchor.stream.clone(),
                file: None,
                line: None,
                seq: Some(anchor.seq),
                kind: ProblemKind::BadCheckpoint,
                detail: "the anchor's signature is invalid; the anchor file was altered".into(),
            });
            continue;
        }
        if anchor.key != public_hex {
            report.problems.push(Problem {
                stream: anchor.stream.clone(),
                file: None,
                line: None,
                seq: Some(anchor.seq),
                kind: ProblemKind::KeyMismatch,
                detail: format!(
                    "audit.pub ({public_hex}) is not the key that signed the anchor ({}); the signing key was replaced on this host",
                    anchor.key
                ),
            });
        }
        required
            .entry(anchor.stream.clone())
            .or_default()
            .push((anchor.clone(), true));
    }

    let streams = match list_streams(audit_dir) {
        Ok(streams) => streams,
        Err(error) => {
            report.problems.push(Problem {
                stream: "*".into(),
                file: Some(audit_dir.display().to_string()),
                line: None,
                seq: None,
                kind: ProblemKind::Truncated,
                detail: format!("cannot list the audit directory: {error}"),
            });
            return report;
        }
    };
    let present: HashSet<String> = streams.iter().map(|(name, _)| name.clone()).collect();
    for (stream, files) in streams {
        let paths: Vec<PathBuf> = files.into_iter().map(|(_, path)| path).collect();
        let checks = required.remove(&stream).unwrap_or_default();
        verify_stream(&stream, &paths, &checks, &mut report);
    }
    for (stream, checks) in required {
        if present.contains(&stream) {
            continue;
        }
        let newest = checks.iter().map(|(checkpoint, _)| checkpoint.seq).max();
        report.problems.push(Problem {
            stream,
            file: None,
            line: None,
            seq: newest,
            kind: ProblemKind::Truncated,
            detail: "signed checkpoints exist for this stream but none of its files do".into(),
        });
    }
    report
}

/// Reads and checks every checkpoint file; returns the valid checkpoints.
fn read_checkpoints(audit_dir: &Path, public_hex: &str, report: &mut Report) -> Vec<Checkpoint> {
    // A directory that cannot be listed is reported when the streams are
    // listed.
    let Ok(files) = list_checkpoint_files(audit_dir) else {
        return Vec::new();
    };
    let mut valid = Vec::new();
    for (_, path) in files {
        match fs::read(&path) {
            Ok(bytes) => check_checkpoint_lines(&path, &bytes, public_hex, report, &mut valid),
            Err(error) => report.problems.push(Problem {
                stream: "checkpoints".into(),
                file: Some(display_name(&path)),
                line: None,
                seq: None,
                kind: ProblemKind::BadCheckpoint,
                detail: format!("cannot read the checkpoint file: {error}"),
            }),
        }
    }
    valid
}

/// Checks the lines of one checkpoint file and adds the valid ones to
/// `valid`.
fn check_checkpoint_lines(
    path: &Path,
    bytes: &[u8],
    public_hex: &str,
    report: &mut Report,
    valid: &mut Vec<Checkpoint>,
) {
    let file = display_name(path);
    for (index, line) in bytes.split(|byte| *byte == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let problem = |kind, detail: String| Problem {
            stream: "checkpoints".into(),
            file: Some(file.clone()),
            line: Some(index as u64 + 1),
            seq: None,
            kind,
            detail,
        };
        let checkpoint: Checkpoint = match serde_json::from_slice(line) {
            Ok(checkpoint) => checkpoint,
            Err(error) => {
                report.problems.push(problem(
                    ProblemKind::BadCheckpoint,
                    format!("not a checkpoint line ({error}); edited or damaged"),
                ));
                continue;
            }
        };
        if checkpoint.key != public_hex {
            report.problems.push(problem(
                ProblemKind::KeyMismatch,
                format!(
                    "signed by key {}, not by audit.pub ({public_hex})",
                    checkpoint.key
                ),
            ));
            continue;
        }
        if !verify_hex(
            &checkpoint.key,
            &checkpoint.signed_bytes(),
            &checkpoint.signature,
        ) {
            report.problems.push(problem(
                ProblemKind::BadCheckpoint,
                format!(
                    "signature invalid for stream {} seq {}; the line was edited",
                    checkpoint.stream, checkpoint.seq
                ),
            ));
            continue;
        }
        valid.push(checkpoint);
    }
}

fn verify_stream(
    stream: &str,
    paths: &[PathBuf],
    checks: &[(Checkpoint, bool)],
    report: &mut Report,
) {
    let needed: HashSet<u64> = checks
        .iter()
        .map(|(checkpoint, _)| checkpoint.seq)
        .collect();
    let mut found: HashMap<u64, Location> = HashMap::new();
    let mut summary = StreamSummary::default();
    let mut previous: Option<(u64, Location)> = None;
    let mut retention_through: Vec<u64> = Vec::new();
    let push = |report: &mut Report, problem: Problem| report.problems.push(problem);

    for path in paths {
        let file = path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        let bytes = match fs::read(path) {
            Ok(bytes) => bytes,
            Err(error) => {
                push(
                    report,
                    Problem {
                        stream: stream.into(),
                        file: Some(file.clone()),
                        line: None,
                        seq: None,
                        kind: ProblemKind::Truncated,
                        detail: format!("cannot read the file: {error}"),
                    },
                );
                continue;
            }
        };
        let ends_whole = bytes.last().is_none_or(|byte| *byte == b'\n');
        let mut lines: Vec<&[u8]> = bytes.split(|byte| *byte == b'\n').collect();
        // split leaves an empty piece after the final newline.
        if ends_whole {
            lines.pop();
        }
        let line_count = lines.len();
        for (index, line) in lines.into_iter().enumerate() {
            let number = index as u64 + 1;
            let here = |kind, seq, detail: String| Problem {
                stream: stream.into(),
                file: Some(file.clone()),
                line: Some(number),
                seq,
                kind,
                detail,
            };
            if !ends_whole && index + 1 == line_count {
                push(
                    report,
                    here(
                        ProblemKind::TornLine,
                        None,
                        format!(
                            "the last line is incomplete ({} bytes without a newline)",
                            line.len()
                        ),
                    ),
                );
                break;
            }
            let hash = line_hash(line);
            let parsed: Option<Value> = serde_json::from_slice(line).ok();
            let fields = parsed.as_ref().and_then(|value| {
                Some((
                    value.get("seq")?.as_u64()?,
                    value.get("prev")?.as_str()?.to_string(),
                ))
            });
            let Some((seq, prev)) = fields else {
                push(
                    report,
                    here(
                        ProblemKind::Edited,
                        None,
                        "not a valid record (JSON with seq and prev); edited or damaged".into(),
                    ),
                );
                // Chain the next record to this line, so that one edit
                // yields one report.
                let next_seq = previous.as_ref().map_or(1, |(seq, _)| seq + 1);
                previous = Some((
                    next_seq,
                    Location {
                        file: file.clone(),
                        line: number,
                        hash,
                    },
                ));
                continue;
            };
            if let Some(Value::String(event)) = parsed.as_ref().and_then(|value| value.get("event"))
                && event == "retention_deleted"
                && let Some(through) = parsed
                    .as_ref()
                    .and_then(|value| value.get("through_seq"))
                    .and_then(Value::as_u64)
            {
                retention_through.push(through);
            }
            summary.records += 1;
            match &previous {
                None => {
                    summary.first_seq = seq;
                    if seq == 1 && prev != GENESIS_HASH {
                        push(
                            report,
                            here(
                                ProblemKind::Edited,
                                Some(seq),
                                "the first record's prev is not the genesis value".into(),
                            ),
                        );
                    }
                }
                Some((previous_seq, location)) => {
                    if seq > previous_seq + 1 {
                        push(
                            report,
                            here(
                                ProblemKind::Removed,
                                Some(seq),
                                format!(
                                    "records {}..={} are missing between {}:{} and this line",
                                    previous_seq + 1,
                                    seq - 1,
                                    location.file,
                                    location.line
                                ),
                            ),
                        );
                    } else if seq <= *previous_seq {
                        push(
                            report,
                            Problem {
                                stream: stream.into(),
                                file: Some(location.file.clone()),
                                line: Some(location.line),
                                seq: Some(*previous_seq),
                                kind: ProblemKind::Inserted,
                                detail: format!(
                                    "the next record ({file}:{number}) has seq {seq} again; this record was inserted"
                                ),
                            },
                        );
                    } else if prev != location.hash {
                        push(
                            report,
                            Problem {
                                stream: stream.into(),
                                file: Some(location.file.clone()),
                                line: Some(location.line),
                                seq: Some(*previous_seq),
                                kind: ProblemKind::Edited,
                                detail: format!(
                                    "its hash does not match the prev of the next record ({file}:{number}); this record was edited"
                                ),
                            },
                        );
                    }
                }
            }
            let location = Location {
                file: file.clone(),
                line: number,
                hash,
            };
            if needed.contains(&seq) {
                found.insert(seq, location.clone());
            }
            summary.last_seq = seq;
            previous = Some((seq, location));
        }
    }

    if summary.records > 0 && summary.first_seq > 1 {
        let covered = retention_through.contains(&(summary.first_seq - 1));
        if !covered {
            report.problems.push(Problem {
                stream: stream.into(),
                file: paths
                    .first()
                    .and_then(|path| path.file_name())
                    .map(|name| name.to_string_lossy().into_owned()),
                line: Some(1),
                seq: Some(summary.first_seq),
                kind: ProblemKind::Removed,
                detail: format!(
                    "records 1..={} are missing and no retention record accounts for them; an older file was deleted",
                    summary.first_seq - 1
                ),
            });
        }
    }

    for (checkpoint, anchored) in checks {
        let source = if *anchored { "anchor" } else { "checkpoint" };
        summary.checkpoints_checked += 1;
        if checkpoint.seq > summary.last_seq {
            report.problems.push(Problem {
                stream: stream.into(),
                file: Some(checkpoint.file.clone()),
                line: None,
                seq: Some(checkpoint.seq),
                kind: ProblemKind::Truncated,
                detail: format!(
                    "the {source} signed at {} covers seq {} but the stream ends at seq {}; its tail was cut",
                    super::date::rfc3339_us(checkpoint.at_us),
                    checkpoint.seq,
                    summary.last_seq
                ),
            });
            continue;
        }
        if checkpoint.seq < summary.first_seq {
            // Deleted by retention; the missing-records check above covers
            // a deletion that no retention record explains.
            continue;
        }
        match found.get(&checkpoint.seq) {
            Some(location) if location.hash == checkpoint.hash => {}
            Some(location) => report.problems.push(Problem {
                stream: stream.into(),
                file: Some(location.file.clone()),
                line: Some(location.line),
                seq: Some(checkpoint.seq),
                kind: ProblemKind::Rewritten,
                detail: format!(
                    "the record differs from the one the {source} signed at {}; the chain up to it was rewritten",
                    super::date::rfc3339_us(checkpoint.at_us)
                ),
            }),
            None => report.problems.push(Problem {
                stream: stream.into(),
                file: Some(checkpoint.file.clone()),
                line: None,
                seq: Some(checkpoint.seq),
                kind: ProblemKind::Removed,
                detail: format!("the record the {source} signed is missing"),
            }),
        }
    }
    report.streams.insert(stream.into(), summary);
}

/// Parses anchor lines (checkpoint lines, one per line; blank lines and
/// lines starting with `#` are skipped).
pub fn parse_anchors(text: &str) -> Result<Vec<Checkpoint>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty() && !line.trim_start().starts_with('#'))
        .map(|(index, line)| {
            serde_json::from_str(line.trim()).map_err(|error| {
                format!("anchor line {}: not a checkpoint line: {error}", index + 1)
            })
        })
        .collect()
}

/// The newest checkpoint of each stream, for `caduceus audit anchor`.
/// Returns an error when the audit directory contains no checkpoint file.
pub fn latest_checkpoints(audit_dir: &Path) -> Result<Vec<String>, String> {
    let files = list_checkpoint_files(audit_dir)
        .map_err(|error| format!("cannot list {}: {error}", audit_dir.display()))?;
    if files.is_empty() {
        return Err(format!(
            "no checkpoint file in {}; start the engine once so that it writes one",
            audit_dir.display()
        ));
    }
    let mut latest: BTreeMap<String, (u64, String)> = BTreeMap::new();
    for (_, path) in files {
        let text = fs::read_to_string(&path)
            .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
        for line in text.lines() {
            let Ok(checkpoint) = serde_json::from_str::<Checkpoint>(line) else {
                continue;
            };
            let entry = latest
                .entry(checkpoint.stream.clone())
                .or_insert((0, String::new()));
            if checkpoint.seq >= entry.0 {
                *entry = (checkpoint.seq, line.to_string());
            }
        }
    }
    Ok(latest.into_values().map(|(_, line)| line).collect())
}
