//! A fault-injecting in-memory [`Storage`] for crash tests.
//!
//! Each segment keeps two copies: the bytes written so far and the bytes a
//! completed sync made durable. [`SimDisk::crash`] keeps only the durable
//! copy, optionally with a torn prefix of the last unsynced write, which is
//! what a power cut leaves. Tests can also fail the next sync and flip bytes.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io;
use std::rc::Rc;

use crate::storage::{Segment, Storage};

#[derive(Debug, Clone, Default)]
struct SimFile {
    written: Vec<u8>,
    durable: Vec<u8>,
    // Writes since the last completed sync, in order: offset and length.
    unsynced: Vec<(u64, u64)>,
}

#[derive(Debug, Default)]
struct DiskState {
    files: BTreeMap<u32, SimFile>,
    failing_syncs: u32,
    free_bytes: u64,
    syncs: u64,
    syncs_started: u64,
    create_ahead_delay: Option<std::time::Duration>,
}

/// The simulated disk shared by a [`SimStorage`] and the test that drives it.
#[derive(Debug, Clone)]
pub struct SimDisk {
    state: Rc<RefCell<DiskState>>,
}

impl Default for SimDisk {
    fn default() -> Self {
        SimDisk::new()
    }
}

impl SimDisk {
    /// Creates a disk with `u64::MAX` free bytes and no segments.
    pub fn new() -> SimDisk {
        SimDisk {
            state: Rc::new(RefCell::new(DiskState {
                free_bytes: u64::MAX,
                ..DiskState::default()
            })),
        }
    }

    /// Returns a storage view on this disk.
    pub fn storage(&self) -> SimStorage {
        SimStorage { disk: self.clone() }
    }

    /// Returns the disk a power cut would leave: only durable bytes, plus the
    /// first `torn_bytes` of the last unsynced write of each segment (0 for a
    /// clean cut).
    pub fn crash(&self, torn_bytes: u64) -> SimDisk {
        let state = self.state.borrow();
        let mut files = BTreeMap::new();
        for (id, file) in &state.files {
            let mut durable = file.durable.clone();
            if let Some(&(offset, length)) = file.unsynced.last() {
                let keep = torn_bytes.min(length) as usize;
                let start = offset as usize;
                durable[start..start + keep].copy_from_slice(&file.written[start..start + keep]);
            }
            files.insert(
                *id,
                SimFile {
                    written: durable.clone(),
                    durable,
                    unsynced: Vec::new(),
                },
            );
        }
        SimDisk {
            state: Rc::new(RefCell::new(DiskState {
                files,
                failing_syncs: 0,
                free_bytes: state.free_bytes,
                syncs: 0,
                syncs_started: 0,
                create_ahead_delay: state.create_ahead_delay,
            })),
        }
    }

    /// Makes [`Storage::create_ahead`] wait `delay` on the glommio timer
    /// before it creates the segment, as a slow file system would.
    pub fn set_create_ahead_delay(&self, delay: std::time::Duration) {
        self.state.borrow_mut().create_ahead_delay = Some(delay);
    }

    /// Makes the next `count` syncs fail with EIO, writing nothing back.
    pub fn fail_next_syncs(&self, count: u32) {
        self.state.borrow_mut().failing_syncs = count;
    }

    /// Sets the free space that [`Storage::free_bytes`] reports.
    pub fn set_free_bytes(&self, free_bytes: u64) {
        self.state.borrow_mut().free_bytes = free_bytes;
    }

    /// XORs `mask` into the byte at `offset`, in both copies.
    pub fn flip_byte(&self, segment: u32, offset: u64, mask: u8) {
        let mut state = self.state.borrow_mut();
        let file = state
            .files
            .get_mut(&segment)
            .expect("test flips an existing segment");
        file.written[offset as usize] ^= mask;
        file.durable[offset as usize] ^= mask;
    }

    /// Returns the offset below which every written byte of `segment` is
    /// durable. Acknowledged records must end at or below it.
    pub fn durable_prefix_bytes(&self, segment: u32) -> u64 {
        let state = self.state.borrow();
        let Some(file) = state.files.get(&segment) else {
            return 0;
        };
        file.unsynced
            .iter()
            .map(|&(offset, _)| offset)
            .min()
            .unwrap_or(file.written.len() as u64)
    }

    /// Returns a copy of the durable bytes of a segment.
    pub fn durable_bytes(&self, segment: u32) -> Option<Vec<u8>> {
        self.state
            .borrow()
            .files
            .get(&segment)
            .map(|file| file.durable.clone())
    }

    /// Returns the segment ids on this disk.
    pub fn segments(&self) -> Vec<u32> {
        self.state.borrow().files.keys().copied().collect()
    }

    /// Returns the number of completed syncs.
    pub fn syncs(&self) -> u64 {
        self.state.borrow().syncs
    }
}

/// A [`Storage`] over a [`SimDisk`].
#[derive(Debug, Clone)]
pub struct SimStorage {
    disk: SimDisk,
}

impl Storage for SimStorage {
    type Segment = SimSegment;

    fn list(&self) -> io::Result<Vec<u32>> {
        Ok(self.disk.segments())
    }

    fn create(&self, segment: u32, size_bytes: u64, header: &[u8]) -> io::Result<SimSegment> {
        let mut state = self.disk.state.borrow_mut();
        if state.files.contains_key(&segment) {
            return Err(io::Error::from(io::ErrorKind::AlreadyExists));
        }
        if state.free_bytes < size_bytes {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        state.free_bytes -= size_bytes;
        // Like the file storage, creation is durable at once: a zero-filled
        // file with its header and a durable directory entry.
        let mut bytes = vec![0; size_bytes as usize];
        bytes[..header.len()].copy_from_slice(header);
        state.files.insert(
            segment,
            SimFile {
                written: bytes.clone(),
                durable: bytes,
                unsynced: Vec::new(),
            },
        );
        Ok(SimSegment {
            disk: self.disk.clone(),
            segment,
            length_bytes: size_bytes,
        })
    }

    async fn create_ahead(
        &self,
        segment: u32,
        size_bytes: u64,
        header: Vec<u8>,
    ) -> io::Result<SimSegment> {
        let delay = self.disk.state.borrow().create_ahead_delay;
        if let Some(delay) = delay {
            glommio::timer::sleep(delay).await;
        }
        self.create(segment, size_bytes, &header)
    }

    fn open(&self, segment: u32) -> io::Result<SimSegment> {
        let state = self.disk.state.borrow();
        let file = state
            .files
            .get(&segment)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        Ok(SimSegment {
            disk: self.disk.clone(),
            segment,
            length_bytes: file.written.len() as u64,
        })
    }

    fn remove(&self, segment: u32) -> io::Result<()> {
        let mut state = self.disk.state.borrow_mut();
        let file = state
            .files
            .remove(&segment)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        state.free_bytes = state.free_bytes.saturating_add(file.written.len() as u64);
        Ok(())
    }

    fn free_bytes(&self) -> io::Result<u64> {
        Ok(self.disk.state.borrow().free_bytes)
    }

    fn describe(&self, segment: u32) -> String {
        format!("sim segment {segment}")
    }
}

/// One simulated segment.
#[derive(Debug)]
pub struct SimSegment {
    disk: SimDisk,
    segment: u32,
    length_bytes: u64,
}

impl Segment for SimSegment {
    fn len_bytes(&self) -> u64 {
        self.length_bytes
    }

    fn read<R>(&self, offset: u64, len: u64, f: impl FnOnce(&[u8]) -> R) -> R {
        let state = self.disk.state.borrow();
        let file = &state.files[&self.segment];
        f(&file.written[offset as usize..(offset + len) as usize])
    }

    fn write(&self, offset: u64, bytes: &[u8]) {
        let mut state = self.disk.state.borrow_mut();
        let Some(file) = state.files.get_mut(&self.segment) else {
            // Removed underneath: a write to an unlinked file is lost.
            return;
        };
        let start = offset as usize;
        file.written[start..start + bytes.len()].copy_from_slice(bytes);
        file.unsynced.push((offset, bytes.len() as u64));
    }

    async fn sync(&self) -> io::Result<()> {
        // Yield so that appends can race with an in-flight sync, as they do
        // with a real fdatasync through io_uring. Successive calls yield 1,
        // 2 or 3 times, so overlapping syncs can complete out of order.
        let yields = {
            let mut state = self.disk.state.borrow_mut();
            state.syncs_started += 1;
            1 + state.syncs_started % 3
        };
        for _ in 0..yields {
            futures_lite::future::yield_now().await;
        }
        let mut state = self.disk.state.borrow_mut();
        if state.failing_syncs > 0 {
            state.failing_syncs -= 1;
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        state.syncs += 1;
        if let Some(file) = state.files.get_mut(&self.segment) {
            file.durable.copy_from_slice(&file.written);
            file.unsynced.clear();
        }
        Ok(())
    }
}
