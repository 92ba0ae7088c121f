//! Durable replacement of whole files.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// A failed file operation, with the operation and path for the message.
#[derive(Debug)]
pub(crate) struct FileIoError {
    pub operation: &'static str,
    pub path: PathBuf,
    pub source: io::Error,
}

/// Writes `bytes` to a temporary file beside `path` with mode 0600, syncs
/// it and renames it over `path`, then syncs the directory so that the
/// rename is durable too.
///
/// A reader that mapped or opened the old file keeps its bytes, because the
/// rename replaces the directory entry and never changes the old file.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), FileIoError> {
    write_atomically_with(path, |file| file.write_all(bytes))
}

/// Writes a file as [`write_atomically`] does, with `write` producing its
/// contents, so a caller can stream a large file without holding it whole.
pub(crate) fn write_atomically_with(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> Result<(), FileIoError> {
    let failed = |operation, at: &Path| {
        let path = at.to_path_buf();
        move |source| FileIoError {
            operation,
            path,
            source,
        }
    };
    let file_name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| "caduceus".to_string());
    let temporary = path.with_file_name(format!(".{file_name}.tmp-{}", std::process::id()));
    let written = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(failed("create", &temporary))
        .and_then(|file| {
            let mut buffered = io::BufWriter::with_capacity(1 << 20, file);
            write(&mut buffered)
                .and_then(|()| buffered.flush())
                .map_err(failed("write", &temporary))?;
            buffered
                .get_ref()
                .sync_all()
                .map_err(failed("fsync", &temporary))
        })
        .and_then(|()| fs::rename(&temporary, path).map_err(failed("rename", path)));
    if written.is_err() {
        let _ = fs::remove_file(&temporary);
        return written;
    }
    let directory = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(directory)
        .and_then(|handle| handle.sync_all())
        .map_err(failed("sync directory", directory))
}
