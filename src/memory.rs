//! Keeping the idle agent small.

/// Hands freed heap back to the kernel. glibc keeps freed memory in its arenas, so a
/// one-off large allocation (serializing 10,000 maps) would otherwise stay in the idle
/// agent's resident size for good.
pub fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns unused pages of the allocator's own arenas to the
    // kernel; it takes no pointers and is thread-safe.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Allocations of at least this size get a mapping of their own.
const MMAP_THRESHOLD: libc::c_int = 1 << 20;

/// Makes every allocation of a megabyte or more a mapping of its own, unmapped when it is
/// freed. glibc raises its threshold for that each time such a block is freed, after
/// which the `GET /ports` body of 10,000 maps (3 MB, rebuilt every second under a load
/// since it carries live counters) lands in the heap, and the copies still in flight when
/// the last rebuild trimmed the heap stay resident. A fixed threshold stops the raising.
/// Call once at startup, before any thread allocates.
pub fn unmap_large_allocations() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes an allocator tunable; it takes no pointers.
    #[allow(unsafe_code)]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}
