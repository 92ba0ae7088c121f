//! Read-only memory mappings of files that the engine replaces only by
//! rename.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use memmap2::Mmap;

/// Maps the whole of `file`, which lives in `directory`, read-only.
///
/// The file must be a regular file owned by root, by this process's
/// effective user, or by the owner of `directory`, and must not be
/// writable by group or others. Any other file is rejected with an error,
/// because a user outside that set could change or truncate it while it
/// is mapped.
pub fn map_read_only(file: &File, directory: &Path) -> io::Result<Mmap> {
    let metadata = file.metadata()?;
    if !metadata.is_file() {
        return Err(io::Error::other("the file is not a regular file"));
    }
    let directory_owner = std::fs::metadata(directory)?.uid();
    let trusted_owners = [0, nix::unistd::geteuid().as_raw(), directory_owner];
    if !trusted_owners.contains(&metadata.uid()) {
        return Err(io::Error::other(format!(
            "the file is owned by uid {}, not by root, the engine's user or the owner of {}; delete it or give it to the engine's user",
            metadata.uid(),
            directory.display()
        )));
    }
    if metadata.mode() & 0o022 != 0 {
        return Err(io::Error::other(format!(
            "the file's mode {:o} lets group or others write it; remove those bits with `chmod go-w`",
            metadata.mode() & 0o7777
        )));
    }

    // SAFETY: `Mmap::map` is unsafe because the bytes behind the returned
    // slice change if the file is written in place, and reading a page
    // past a truncated end raises SIGBUS. Neither happens through the
    // engine: it replaces such files only by writing a new file and
    // renaming it over the old name, which leaves the mapped inode and its
    // bytes unchanged until the mapping is dropped. The checks above leave
    // root, the engine's own user and the directory's owner as the only
    // users that can open the file for writing, and each of them can
    // already rewrite the spool and the keys. An in-place write by one of
    // them changes bytes that the caller may have validated already, and
    // a truncation kills the engine with SIGBUS at its next read of a lost
    // page. That is accepted, and docs/policy.md tells operators to replace
    // the file by rename, as `caduceus policy compile` does.
    unsafe { Mmap::map(file) }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn file_with_mode(directory: &Path, mode: u32) -> File {
        let path = directory.join("mapped");
        let mut file = File::create(&path).unwrap();
        file.write_all(b"compiled bytes").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        File::open(&path).unwrap()
    }

    #[test]
    fn mapping_reads_file_bytes() {
        let directory = tempfile::tempdir().unwrap();
        let file = file_with_mode(directory.path(), 0o600);
        let mapping = map_read_only(&file, directory.path()).unwrap();
        assert_eq!(&mapping[..], b"compiled bytes");
    }

    #[test]
    fn mapping_rejects_group_writable_file() {
        let directory = tempfile::tempdir().unwrap();
        let file = file_with_mode(directory.path(), 0o620);
        let error = map_read_only(&file, directory.path()).unwrap_err();
        assert!(error.to_string().contains("chmod go-w"), "{error}");
    }

    #[test]
    fn mapping_rejects_other_owner() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: giving a file to another user needs root");
            return;
        }
        // The directory and the process belong to root, so a file of
        // `nobody` (uid 65534) could be rewritten by a user outside the
        // trusted set.
        let directory = tempfile::tempdir().unwrap();
        let file = file_with_mode(directory.path(), 0o600);
        let nobody = nix::unistd::Uid::from_raw(65534);
        nix::unistd::chown(&directory.path().join("mapped"), Some(nobody), None).unwrap();
        let error = map_read_only(&file, directory.path()).unwrap_err();
        assert!(error.to_string().contains("owned by uid 65534"), "{error}");
    }

    #[test]
    fn mapping_rejects_directory() {
        let directory = tempfile::tempdir().unwrap();
        let file = File::open(directory.path()).unwrap();
        let error = map_read_only(&file, directory.path()).unwrap_err();
        assert!(error.to_string().contains("not a regular file"), "{error}");
    }
}
