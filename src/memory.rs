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
