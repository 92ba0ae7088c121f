//! Bulk import of addresses from CSV.
//!
//! The input has one address per line and, for the suppression list, an
//! optional reason: `address[,reason]`. Fields follow RFC 4180, so an
//! address whose quoted local part contains a comma or a quote is written
//! in double quotes with inner quotes doubled. A first line whose first
//! field is `address` is a header and is skipped, and so are blank lines.
//!
//! Hashing dominates the cost, so the input is read in chunks of whole
//! lines and hashed on several threads. Each thread sorts its own records,
//! and the sorted runs are merged at the end.

use std::borrow::Cow;
use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use super::table::merge_sorted;
use super::{CONSENT_FLAG, Reason, key_of};
use crate::SiteKey;

/// Bytes of input handed to a hashing thread at a time.
const CHUNK_BYTES: usize = 1 << 20;
/// Low bits of a record that hold its flags.
const FLAGS_MASK: u128 = 0xff;

/// The list that an import adds to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImportList {
    /// Marketing opt-ins. A second column is rejected, unless it is empty.
    Consent,
    /// Suppressions. A line without a reason gets `default_reason`; with
    /// `None`, such a line is an error.
    Suppression { default_reason: Option<Reason> },
}

/// How to run an import.
#[derive(Clone, Copy, Debug)]
pub struct ImportOptions {
    pub list: ImportList,
    /// Hashing threads, at least 1. The control plane runs imports away
    /// from the transactional lane's cores, so it chooses this number.
    pub threads: usize,
}

/// Imported entries, sorted and with one record per address, ready for
/// [`super::ListBuilder::add_imported`].
#[derive(Clone, Debug, Default)]
pub struct ImportedRecords {
    pub(crate) records: Vec<u128>,
}

impl ImportedRecords {
    /// Returns the number of distinct addresses imported.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

/// An import that failed. Nothing is imported when any line fails.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// A line that cannot be imported. The message never repeats the
    /// address, so it can be logged.
    #[error("line {line}: {problem}")]
    Line { line: u64, problem: String },
    #[error("reading the CSV input failed: {0}")]
    Read(#[source] io::Error),
}

struct Chunk {
    first_line: u64,
    bytes: Vec<u8>,
}

/// The records and the first error, by line, that one thread found.
type WorkerOutput = (Vec<u128>, Option<(u64, String)>);

/// Reads CSV from `reader`, hashes every address under `key`, and returns
/// the entries sorted for the list builder.
///
/// On failure the error names the first bad line in file order (1-based,
/// header included).
pub fn import_csv<R: Read>(
    mut reader: R,
    key: &SiteKey,
    options: &ImportOptions,
) -> Result<ImportedRecords, ImportError> {
    let threads = options.threads.max(1);
    let stop = AtomicBool::new(false);
    let (sender, receiver) = mpsc::sync_channel::<Chunk>(threads * 2);
    let receiver = Arc::new(Mutex::new(receiver));

    let (outputs, read_result) = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let receiver = Arc::clone(&receiver);
                let stop = &stop;
                scope.spawn(move || hash_chunks(&receiver, key, options.list, stop))
            })
            .collect();
        // The workers hold the only receivers now, so a send fails once
        // they have all stopped.
        drop(receiver);
        let read_result = read_chunks(&mut reader, &sender, &stop);
        drop(sender);
        let outputs: Vec<WorkerOutput> = workers
            .into_iter()
            .map(|worker| match worker.join() {
                Ok(output) => output,
                // A panic in a hashing thread is a bug; pass it on.
                Err(panic) => std::panic::resume_unwind(panic),
            })
            .collect();
        (outputs, read_result)
    });

    // Chunks are handed out in file order and each thread finishes the
    // chunk it took, so the smallest failing line among all threads is the
    // first failing line of the file.
    let mut first_error = read_result.err();
    let mut runs = Vec::with_capacity(outputs.len());
    for (records, error) in outputs {
        if let Some((line, problem)) = error
            && first_error
                .as_ref()
                .is_none_or(|existing| matches!(existing, ImportError::Line { line: first, .. } if line < *first))
        {
            first_error = Some(ImportError::Line { line, problem });
        }
        runs.push(records);
    }
    if let Some(error) = first_error {
        return Err(error);
    }
    let records = runs.into_iter().fold(Vec::new(), merge_sorted);
    Ok(ImportedRecords { records })
}

/// Reads whole lines in chunks of about [`CHUNK_BYTES`] and sends them to
/// the hashing threads, numbering lines as it goes.
fn read_chunks<R: Read>(
    reader: &mut R,
    sender: &mpsc::SyncSender<Chunk>,
    stop: &AtomicBool,
) -> Result<(), ImportError> {
    let mut carry: Vec<u8> = Vec::new();
    let mut next_line: u64 = 1;
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut bytes = std::mem::take(&mut carry);
        bytes.reserve(CHUNK_BYTES);
        let limit = (CHUNK_BYTES - bytes.len().min(CHUNK_BYTES)) as u64;
        read_up_to(reader, &mut bytes, limit)?;
        let at_end = bytes.len() < CHUNK_BYTES;
        let split = if at_end {
            bytes.len()
        } else {
            match bytes.iter().rposition(|byte| *byte == b'\n') {
                Some(newline) => newline + 1,
                None => {
                    return Err(ImportError::Line {
                        line: next_line,
                        problem: format!(
                            "the line is longer than {CHUNK_BYTES} bytes; an address is at most 254"
                        ),
                    });
                }
            }
        };
        carry = bytes.split_off(split);
        let line_count = bytes.iter().filter(|byte| **byte == b'\n').count() as u64;
        if !bytes.is_empty() {
            let chunk = Chunk {
                first_line: next_line,
                bytes,
            };
            if sender.send(chunk).is_err() {
                // Every hashing thread stopped after an error.
                return Ok(());
            }
        }
        next_line += line_count;
        if at_end {
            return Ok(());
        }
    }
}

/// Appends bytes from `reader` to `bytes` until `limit` bytes were added or
/// the input ends.
fn read_up_to<R: Read>(reader: &mut R, bytes: &mut Vec<u8>, limit: u64) -> Result<(), ImportError> {
    let mut remaining = limit;
    while remaining > 0 {
        match reader.by_ref().take(remaining).read_to_end(bytes) {
            Ok(0) => return Ok(()),
            Ok(read) => remaining -= read as u64,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(ImportError::Read(error)),
        }
    }
    Ok(())
}

/// Takes chunks until none are left or another thread failed, and returns
/// this thread's sorted records and its first error.
fn hash_chunks(
    receiver: &Mutex<mpsc::Receiver<Chunk>>,
    key: &SiteKey,
    list: ImportList,
    stop: &AtomicBool,
) -> WorkerOutput {
    let mut records = Vec::new();
    let mut error = None;
    while !stop.load(Ordering::Relaxed) {
        // A poisoned lock means another hashing thread panicked, and that
        // panic is passed on when the threads are joined.
        let next = match receiver.lock() {
            Ok(receiver) => receiver.recv(),
            Err(_) => break,
        };
        let Ok(chunk) = next else { break };
        if let Err(failure) = hash_chunk(&chunk, key, list, &mut records) {
            error = Some(failure);
            stop.store(true, Ordering::Relaxed);
            break;
        }
    }
    records.sort_unstable();
    records.dedup_by(|next, kept| {
        if *next & !FLAGS_MASK == *kept & !FLAGS_MASK {
            *kept |= *next;
            true
        } else {
            false
        }
    });
    (records, error)
}

fn hash_chunk(
    chunk: &Chunk,
    key: &SiteKey,
    list: ImportList,
    records: &mut Vec<u128>,
) -> Result<(), (u64, String)> {
    for (index, line) in chunk.bytes.split(|byte| *byte == b'\n').enumerate() {
        let line_number = chunk.first_line + index as u64;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        match parse_line(line, line_number, list) {
            Ok(None) => {}
            Ok(Some((address, flag))) => {
                let hmac = key
                    .try_hmac_address(&address)
                    .map_err(|error| (line_number, error.to_string()))?;
                records.push(key_of(&hmac) | u128::from(flag));
            }
            Err(problem) => return Err((line_number, problem)),
        }
    }
    Ok(())
}

/// Parses one line without its line ending. Returns `None` for a blank line
/// or the header, else the address and the flag to set.
fn parse_line(
    line: &[u8],
    line_number: u64,
    list: ImportList,
) -> Result<Option<(Cow<'_, str>, u8)>, String> {
    let mut text =
        std::str::from_utf8(line).map_err(|_| "the line is not valid UTF-8".to_string())?;
    if line_number == 1 {
        text = text.strip_prefix('\u{feff}').unwrap_or(text);
    }
    if text.trim().is_empty() {
        return Ok(None);
    }
    let (address, reason) = split_fields(text)?;
    if line_number == 1 && address.eq_ignore_ascii_case("address") {
        return Ok(None);
    }
    if address.is_empty() {
        return Err("the address field is empty".to_string());
    }
    let reason = reason.filter(|reason| !reason.is_empty());
    let flag = match list {
        ImportList::Consent => {
            if reason.is_some() {
                return Err(
                    "the consent list takes no reason; remove the second field".to_string(),
                );
            }
            CONSENT_FLAG
        }
        ImportList::Suppression { default_reason } => match reason {
            Some(text) => Reason::parse(&text).ok_or_else(|| {
                format!(
                    "unknown reason {text:?}; expected opt-out, hard-bounce or complaint"
                )
            })? as u8,
            None => default_reason.ok_or_else(|| {
                "the line gives no reason and the import has no default reason; add one of opt-out, hard-bounce or complaint".to_string()
            })? as u8,
        },
    };
    Ok(Some((address, flag)))
}

/// Splits a line into its one or two RFC 4180 fields. Unquoted fields lose
/// surrounding white space, which no address can end in unquoted.
fn split_fields(line: &str) -> Result<(Cow<'_, str>, Option<Cow<'_, str>>), String> {
    let (first, rest) = next_field(line)?;
    let Some(rest) = rest else {
        return Ok((first, None));
    };
    let (second, rest) = next_field(rest)?;
    if rest.is_some() {
        return Err("the line has more than two fields; expected address[,reason]".to_string());
    }
    Ok((first, Some(second)))
}

/// Returns the first field of `text` and the text after its comma, if any.
fn next_field(text: &str) -> Result<(Cow<'_, str>, Option<&str>), String> {
    let trimmed = text.trim_start();
    let Some(quoted) = trimmed.strip_prefix('"') else {
        return Ok(match text.split_once(',') {
            Some((field, rest)) => (Cow::Borrowed(field.trim()), Some(rest)),
            None => (Cow::Borrowed(text.trim()), None),
        });
    };
    // RFC 4180 §2: a quote inside a quoted field is written as two quotes.
    let mut field = String::new();
    let mut rest = quoted;
    while let Some(quote) = rest.find('"') {
        field.push_str(&rest[..quote]);
        let after = &rest[quote + 1..];
        match after.strip_prefix('"') {
            Some(unescaped) => {
                field.push('"');
                rest = unescaped;
            }
            None => return end_of_quoted(field, after),
        }
    }
    Err("a quoted field is not closed; fields cannot span lines".to_string())
}

/// Checks what follows a closing quote: white space, then a comma or the
/// end of the line.
fn end_of_quoted(field: String, after: &str) -> Result<(Cow<'_, str>, Option<&str>), String> {
    let after = after.trim_start();
    if after.is_empty() {
        return Ok((Cow::Owned(field), None));
    }
    match after.strip_prefix(',') {
        Some(rest) => Ok((Cow::Owned(field), Some(rest))),
        None => Err("unexpected text after the closing quote of a field".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_plain_and_quoted() {
        let (address, reason) = split_fields(" a@example.com , opt-out ").unwrap();
        assert_eq!(address, "a@example.com");
        assert_eq!(reason.as_deref(), Some("opt-out"));

        let (address, reason) = split_fields(r#""""a,b""@example.com",complaint"#).unwrap();
        assert_eq!(address, r#""a,b"@example.com"#);
        assert_eq!(reason.as_deref(), Some("complaint"));

        let (address, reason) = split_fields(r#""x""y""z@example.com""#).unwrap();
        assert_eq!(address, r#"x"y"z@example.com"#);
        assert_eq!(reason, None);
    }

    #[test]
    fn split_rejects_malformed() {
        assert!(split_fields(r#""open@example.com"#).is_err());
        assert!(split_fields(r#""a@example.com"x,opt-out"#).is_err());
        assert!(split_fields("a@example.com,opt-out,extra").is_err());
    }
}
