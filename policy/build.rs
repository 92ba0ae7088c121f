//! Computes `CADUCEUS_POLICY_SOURCE_ID`, a hash of this crate's source files
//! and the workspace's Cargo.lock, which the compiled policy's source digest
//! includes. A build whose compiler code or locked dependencies (such as the
//! IDN tables) differ then recompiles the policy instead of mapping a file
//! that an older build wrote.

use std::fs;
use std::path::{Path, PathBuf};

fn main() {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let source_dir = manifest_dir.join("src");
    let lock_file = manifest_dir.join("../Cargo.lock");
    println!("cargo:rerun-if-changed={}", source_dir.display());
    println!("cargo:rerun-if-changed={}", lock_file.display());

    let mut files = Vec::new();
    collect_files(&source_dir, &mut files);
    files.sort();
    // Outside this workspace, as a dependency of another package, there is
    // no ../Cargo.lock and the sources alone identify the build.
    if lock_file.is_file() {
        files.push(lock_file);
    }

    let mut hash = Fnv1a::new();
    for path in &files {
        let name = path.strip_prefix(&manifest_dir).unwrap_or(path);
        let contents = fs::read(path).unwrap_or_else(|error| {
            panic!("cannot read {}: {error}", path.display());
        });
        hash.write(name.to_string_lossy().as_bytes());
        hash.write(&(contents.len() as u64).to_le_bytes());
        hash.write(&contents);
    }
    println!(
        "cargo:rustc-env=CADUCEUS_POLICY_SOURCE_ID={:016x}",
        hash.finish()
    );
}

fn collect_files(dir: &Path, files: &mut Vec<PathBuf>) {
    let entries = fs::read_dir(dir).unwrap_or_else(|error| {
        panic!("cannot read {}: {error}", dir.display());
    });
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            collect_files(&path, files);
        } else {
            files.push(path);
        }
    }
}

/// 64-bit FNV-1a. The identifier only has to differ between builds, not
/// resist a forger, so a hash that needs no build dependency serves.
struct Fnv1a(u64);

impl Fnv1a {
    fn new() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}
