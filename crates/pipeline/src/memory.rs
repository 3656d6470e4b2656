//! How the process allocates, for the CPU pipeline's sake.
//!
//! A denoising step allocates and frees tensors of up to tens of MiB, op after op. glibc hands
//! allocations above its mmap threshold (128 KiB at first) to the kernel and unmaps them on
//! free, so every such tensor costs a round of page faults and page zeroing (a tenth of a
//! 512×512 step, measured with `perf`). [`keep_freed_blocks`] raises the threshold to glibc's
//! maximum (32 MiB) and stops the heap from being trimmed, so those blocks are reused from one
//! op to the next; the peak a generation needs is unchanged.

/// glibc's largest mmap threshold on 64-bit targets.
const MMAP_THRESHOLD: i32 = 32 * 1024 * 1024;

/// Tunes glibc's allocator as above (call once, at start, before the worker threads run); a
/// no-op on other C libraries.
pub fn keep_freed_blocks() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before other threads
    // allocate much, and returns 0 (ignored) for values it refuses.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
