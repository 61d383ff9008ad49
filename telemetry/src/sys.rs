//! The crate's one use of `unsafe`: asking glibc to give freed heap memory
//! back to the kernel, which no safe crate wraps. Everything else in the
//! workspace forbids `unsafe`; this module is allowed it in `lib.rs`.
//!
//! Why it is needed: after a connection flood ends, the buffers of
//! thousands of connections are freed, but glibc keeps them in its arenas
//! (only the top of the main heap is trimmed on its own, and tokio's worker
//! threads allocate from other arenas), so the RSS stays near its peak.
//! `malloc_trim` releases every arena's free pages.

/// Whether [`trim_heap`] can do anything on this target.
pub(crate) const CAN_TRIM: bool = cfg!(all(target_os = "linux", target_env = "gnu"));

/// Returns the free pages of every malloc arena to the kernel; `true` if
/// any were. Walks all arenas under their locks, so it is slow for a large
/// heap: call it from a blocking thread, rarely.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub(crate) fn trim_heap() -> bool {
    // SAFETY: malloc_trim(3) takes a plain integer (the padding to keep at
    // the top of the heap; 0 keeps none), reads and writes only the
    // allocator's own state under the allocator's own locks, and is
    // MT-Safe per the glibc manual. It frees no memory that is in use, so
    // no Rust object is invalidated.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Other allocators (musl, the BSDs, macOS) either return memory on their
/// own or offer no such call.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(crate) fn trim_heap() -> bool {
    false
}
