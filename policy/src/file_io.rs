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
/// rename is durable too. A `path` that exists and is not a regular file is
/// an error, and nothing is written.
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
    // rename(2) replaces any directory entry, so without this check a
    // compiled policy written to `/dev/full` replaced the device node.
    // A symbolic link to a regular file is still replaced by the new file.
    if let Ok(existing) = fs::metadata(path)
        && !existing.is_file()
    {
        return Err(FileIoError {
            operation: "replace",
            path: path.to_path_buf(),
            source: io::Error::new(
                io::ErrorKind::InvalidInput,
                "it is not a regular file (a directory, device, socket or pipe), so it was left in place; give the path of a regular file",
            ),
        });
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn write_keeps_socket_in_place() {
        // `policy compile --out /dev/full` renamed the compiled file over
        // the device node. A socket is a special file that a test can make.
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("control.sock");
        let _listener = UnixListener::bind(&path).unwrap();

        let error = write_atomically(&path, b"compiled").unwrap_err();

        assert_eq!(error.operation, "replace");
        assert_eq!(error.path, path);
        assert!(
            error.source.to_string().contains("not a regular file"),
            "{}",
            error.source
        );
        let kind = fs::symlink_metadata(&path).unwrap().file_type();
        assert!(!kind.is_file(), "the socket was replaced by a file");
        let names: Vec<_> = fs::read_dir(directory.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "a temporary file was left: {names:?}");
    }

    #[test]
    fn write_rejects_directory() {
        let directory = tempfile::tempdir().unwrap();

        let error = write_atomically(directory.path(), b"compiled").unwrap_err();

        assert_eq!(error.operation, "replace");
        assert!(fs::metadata(directory.path()).unwrap().is_dir());
    }

    #[test]
    fn write_replaces_regular_file() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("policy.bin");
        fs::write(&path, b"old").unwrap();

        write_atomically(&path, b"new").unwrap();

        assert_eq!(fs::read(&path).unwrap(), b"new");
    }
}
