//! Segment storage: memory-mapped files in production, or the
//! fault-injecting [`crate::sim`] storage in tests. The record, commit and
//! recovery code is generic over [`Storage`], so tests run the real code.
//!
//! Durability on Linux: appends write with `pwrite`, readers read through a
//! shared mapping of the same file, and the committer calls fdatasync through
//! a glommio handle. The mapping and the file share the page cache, so a
//! reader sees every written byte. If `pwrite` fails, the append copies into
//! the mapping instead; Linux writes back pages dirtied through a mapping on
//! fdatasync too, though POSIX only promises that for `msync`, so this spool
//! is Linux-only.
//!
//! Segments that the committer prepares ahead of time are written with zeros
//! once, off the executor thread. ext4 and XFS allocate blocks with
//! fallocate as unwritten extents, and the first write to each one turns it
//! into a written extent at writeback. That change is metadata, so an
//! fdatasync after it must also commit the file system journal. Appends into
//! blocks that were written once skip that journal commit.

use std::cell::RefCell;
use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use glommio::io::BufferedFile;
use memmap2::{MmapOptions, MmapRaw};

/// A factory for one shard's segments.
pub trait Storage {
    type Segment: Segment;

    /// Lists the ids of this shard's existing segments, in any order.
    fn list(&self) -> io::Result<Vec<u32>>;
    /// Creates a segment of exactly `size_bytes`, zero-filled except for
    /// `header` at offset 0, with its space allocated and its header, size
    /// and directory entry durable.
    fn create(&self, segment: u32, size_bytes: u64, header: &[u8]) -> io::Result<Self::Segment>;
    /// Creates a segment like [`Storage::create`], for use ahead of need. An
    /// implementation may do the slow work off the executor thread and may
    /// write every block once, which makes the later syncs of appends faster.
    fn create_ahead(
        &self,
        segment: u32,
        size_bytes: u64,
        header: Vec<u8>,
    ) -> impl Future<Output = io::Result<Self::Segment>> {
        std::future::ready(self.create(segment, size_bytes, &header))
    }
    /// Opens an existing segment for reading and appending.
    fn open(&self, segment: u32) -> io::Result<Self::Segment>;
    /// Deletes a segment that no live record needs.
    fn remove(&self, segment: u32) -> io::Result<()>;
    /// Returns the free bytes on the file system that contains the segments.
    fn free_bytes(&self) -> io::Result<u64>;
    /// Returns a human-readable location for logs.
    fn describe(&self, segment: u32) -> String;
}

/// One segment's bytes.
///
/// Callers uphold one rule that makes the memory-mapped implementation
/// sound: a range is written only while no slice handed to a `read` closure
/// covers it. The spool only appends above its write offset and only reads
/// below it.
pub trait Segment {
    fn len_bytes(&self) -> u64;
    /// Calls `f` with the bytes `offset..offset + len`.
    ///
    /// # Panics
    /// If the range is outside the segment; callers bound-check first.
    fn read<R>(&self, offset: u64, len: u64, f: impl FnOnce(&[u8]) -> R) -> R;
    /// Writes `bytes` at `offset`, into the page cache only.
    ///
    /// # Panics
    /// If the range is outside the segment; callers bound-check first.
    fn write(&self, offset: u64, bytes: &[u8]);
    /// Makes every earlier `write` durable (fdatasync).
    fn sync(&self) -> impl Future<Output = io::Result<()>>;
}

/// Segment files named `shard-<shard>-segment-<id>.spool` in one directory.
#[derive(Debug, Clone)]
pub struct FileStorage {
    dir: PathBuf,
    shard: u16,
}

/// Returns the file name of a segment.
pub fn segment_file_name(shard: u16, segment: u32) -> String {
    format!("shard-{shard:05}-segment-{segment:010}.spool")
}

/// Parses a segment file name into its shard and segment id.
pub fn parse_segment_file_name(name: &str) -> Option<(u16, u32)> {
    let rest = name.strip_prefix("shard-")?.strip_suffix(".spool")?;
    let (shard, segment) = rest.split_once("-segment-")?;
    if shard.len() != 5 || segment.len() != 10 {
        return None;
    }
    Some((shard.parse().ok()?, segment.parse().ok()?))
}

impl FileStorage {
    pub fn new(dir: &Path, shard: u16) -> FileStorage {
        FileStorage {
            dir: dir.to_owned(),
            shard,
        }
    }

    fn path(&self, segment: u32) -> PathBuf {
        self.dir.join(segment_file_name(self.shard, segment))
    }

    /// Opens a segment for reading only, for offline inspection. Writing to
    /// the returned segment panics.
    pub fn open_read_only(&self, segment: u32) -> io::Result<FileSegment> {
        let path = self.path(segment);
        let file = File::open(&path)?;
        let length_bytes = file.metadata()?.len();
        let map = MmapOptions::new().map_raw_read_only(&file)?;
        Ok(FileSegment {
            path,
            file,
            map,
            length_bytes,
            writable: false,
            sync_handle: RefCell::new(None),
        })
    }
}

impl Storage for FileStorage {
    type Segment = FileSegment;

    fn list(&self) -> io::Result<Vec<u32>> {
        let mut segments = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            if let Some((shard, segment)) =
                entry.file_name().to_str().and_then(parse_segment_file_name)
                && shard == self.shard
            {
                segments.push(segment);
            }
        }
        Ok(segments)
    }

    fn create(&self, segment: u32, size_bytes: u64, header: &[u8]) -> io::Result<FileSegment> {
        let path = self.path(segment);
        // NOTE: these syncs are blocking syscalls on the executor thread. They
        // run here only when no segment was prepared ahead of time, usually
        // once at start.
        let file = create_segment_file(&path, size_bytes, header, FillWithZeros::No)?;
        FileSegment::map(path, file)
    }

    async fn create_ahead(
        &self,
        segment: u32,
        size_bytes: u64,
        header: Vec<u8>,
    ) -> io::Result<FileSegment> {
        let path = self.path(segment);
        let file_path = path.clone();
        let file = glommio::executor()
            .spawn_blocking(move || {
                create_segment_file(&file_path, size_bytes, &header, FillWithZeros::Yes)
            })
            .await?;
        FileSegment::map(path, file)
    }

    fn open(&self, segment: u32) -> io::Result<FileSegment> {
        let path = self.path(segment);
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        FileSegment::map(path, file)
    }

    fn remove(&self, segment: u32) -> io::Result<()> {
        fs::remove_file(self.path(segment))
    }

    fn free_bytes(&self) -> io::Result<u64> {
        let path = std::ffi::CString::new(self.dir.as_os_str().as_encoded_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "spool path contains NUL"))?;
        let mut stats = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
        // SAFETY: `path` is NUL-terminated and `stats` is a writable statvfs.
        let result = unsafe { libc::statvfs(path.as_ptr(), stats.as_mut_ptr()) };
        if result != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: statvfs returned 0, so it filled the structure.
        let stats = unsafe { stats.assume_init() };
        // `fsblkcnt_t` and `c_ulong` are 32 bits on some targets.
        #[allow(clippy::useless_conversion)]
        Ok(u64::from(stats.f_bavail).saturating_mul(u64::from(stats.f_frsize)))
    }

    fn describe(&self, segment: u32) -> String {
        self.path(segment).display().to_string()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FillWithZeros {
    Yes,
    No,
}

/// Creates a segment file of `size_bytes` with `header` at offset 0, and
/// makes its contents, size and directory entry durable. With
/// [`FillWithZeros::Yes`] it writes every block once, so that appends later
/// overwrite written blocks.
fn create_segment_file(
    path: &Path,
    size_bytes: u64,
    header: &[u8],
    fill: FillWithZeros,
) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)?;
    let result = write_segment_file(&file, size_bytes, header, fill).and_then(|()| {
        let dir = path.parent().unwrap_or(Path::new("."));
        File::open(dir)?.sync_all()
    });
    if let Err(error) = result {
        let _ = fs::remove_file(path);
        return Err(error);
    }
    Ok(file)
}

fn write_segment_file(
    file: &File,
    size_bytes: u64,
    header: &[u8],
    fill: FillWithZeros,
) -> io::Result<()> {
    let length = libc::off_t::try_from(size_bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "segment size exceeds off_t"))?;
    // fallocate, not a sparse `set_len`: a full disk must fail here, not
    // as SIGBUS when a later append touches an unbacked page.
    // SAFETY: `file` owns a valid open descriptor for the whole call.
    let result = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, length) };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    // The header is synced here, before any record, so recovery never
    // finds a segment whose records are durable but whose header is not.
    file.write_all_at(header, 0)?;
    if fill == FillWithZeros::Yes {
        const CHUNK_BYTES: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK_BYTES as usize];
        let mut offset = header.len() as u64;
        while offset < size_bytes {
            let chunk = (size_bytes - offset).min(CHUNK_BYTES);
            file.write_all_at(&zeros[..chunk as usize], offset)?;
            offset += chunk;
        }
    }
    // The new file's size and directory entry must be durable before any
    // record in it is acknowledged. fdatasync of the file alone does not
    // persist the directory entry, so the caller syncs the directory too.
    file.sync_all()
}

/// A segment file mapped read-write and shared.
pub struct FileSegment {
    path: PathBuf,
    file: File,
    map: MmapRaw,
    length_bytes: u64,
    writable: bool,
    // Opened on first sync, because glommio handles can only be made inside
    // an executor while inspection runs outside one.
    sync_handle: RefCell<Option<Rc<BufferedFile>>>,
}

impl FileSegment {
    fn map(path: PathBuf, file: File) -> io::Result<FileSegment> {
        let length_bytes = file.metadata()?.len();
        // SIGBUS risk: a mapping faults if its file shrinks under it. Segment
        // files are preallocated with fallocate and never truncated while
        // mapped; they are only unlinked, which keeps the pages alive.
        let map = MmapOptions::new().map_raw(&file)?;
        Ok(FileSegment {
            path,
            file,
            map,
            length_bytes,
            writable: true,
            sync_handle: RefCell::new(None),
        })
    }

    /// Returns the segment file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn check_range(&self, offset: u64, len: u64) {
        assert!(
            offset
                .checked_add(len)
                .is_some_and(|end| end <= self.length_bytes),
            "segment range {offset}+{len} outside {} bytes of {}",
            self.length_bytes,
            self.path.display()
        );
    }

    fn handle(&self) -> io::Result<Rc<BufferedFile>> {
        if let Some(handle) = self.sync_handle.borrow().as_ref() {
            return Ok(handle.clone());
        }
        let duplicate: OwnedFd = self.file.try_clone()?.into();
        // SAFETY: `duplicate` is a fresh descriptor that nothing else owns.
        // `into_raw_fd` gives up the `OwnedFd`'s ownership, so only the
        // glommio file closes it.
        let handle = Rc::new(unsafe { BufferedFile::from_raw_fd(duplicate.into_raw_fd()) });
        *self.sync_handle.borrow_mut() = Some(handle.clone());
        Ok(handle)
    }
}

impl Segment for FileSegment {
    fn len_bytes(&self) -> u64 {
        self.length_bytes
    }

    fn read<R>(&self, offset: u64, len: u64, f: impl FnOnce(&[u8]) -> R) -> R {
        self.check_range(offset, len);
        // SAFETY: the range lies inside the mapping (checked above), the
        // mapping lives as long as `self`, and by the `Segment` contract no
        // write touches this range while the slice exists. SIGBUS cannot occur
        // because the file is fully allocated and never truncated.
        let bytes = unsafe {
            std::slice::from_raw_parts(self.map.as_ptr().add(offset as usize), len as usize)
        };
        f(bytes)
    }

    fn write(&self, offset: u64, bytes: &[u8]) {
        assert!(
            self.writable,
            "write to read-only segment {}",
            self.path.display()
        );
        self.check_range(offset, bytes.len() as u64);
        // pwrite instead of a copy into the mapping: the copy would take a
        // page fault on the first write to each page after writeback.
        let Err(error) = self.file.write_all_at(bytes, offset) else {
            return;
        };
        tracing::warn!(
            path = %self.path.display(),
            offset,
            %error,
            "spool: pwrite to a segment failed; copying into the mapping instead"
        );
        // SAFETY: the destination lies inside the writable mapping (checked
        // above), `bytes` cannot overlap it because it is a Rust slice we do
        // not hand out mutably, and by the `Segment` contract no reader has
        // a slice over this range.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.map.as_mut_ptr().add(offset as usize),
                bytes.len(),
            );
        }
    }

    async fn sync(&self) -> io::Result<()> {
        let handle = self.handle()?;
        handle.fdatasync().await.map_err(io::Error::from)
    }
}
