//! Anonymous memory advised to use transparent huge pages, for the lookup
//! tables that lookups read at random.

/// Returns a zeroed buffer of `length_bytes` in an anonymous mapping advised
/// to use transparent huge pages, or `None` when the mapping fails.
///
/// Lookups touch random entries across a whole table, so with 4 KiB pages
/// nearly every lookup also misses the TLB, which costs most under a
/// hypervisor's nested page tables. 2 MiB pages cut the page count by 512.
/// Where the kernel has huge pages disabled, the advice fails or is ignored
/// and the buffer works as before.
pub(crate) fn huge_page_buffer(length_bytes: usize) -> Option<memmap2::MmapMut> {
    if length_bytes == 0 {
        return None;
    }
    let mapping = memmap2::MmapMut::map_anon(length_bytes).ok()?;
    #[cfg(target_os = "linux")]
    let _ = mapping.advise(memmap2::Advice::HugePage);
    Some(mapping)
}
