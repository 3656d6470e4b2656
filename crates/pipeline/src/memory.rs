//! How the process allocates, for the CPU pipeline's sake.
//!
//! A denoising step allocates and frees tensors of up to tens of MiB, op after op. glibc hands
//! allocations above its mmap threshold (128 KiB at first) to the kernel and unmaps them on
//! free, so every such tensor costs a round of page faults and page zeroing (a tenth of a
//! 512×512 step, measured with `perf`). [`keep_freed_blocks`] raises the threshold to glibc's
//! maximum (32 MiB) and stops the heap from being trimmed, so those blocks are reused from one
//! op to the next; the peak a generation needs is unchanged. It also caps glibc at two arenas:
//! each arena maps 64 MiB of address space at once and keeps its own freed blocks, so one per
//! thread (glibc's default allows eight per core) makes the process map far more than it uses,
//! which an address-space limit counts; allocations here are few and large, so two serve every
//! thread without contention that shows.

/// glibc's largest mmap threshold on 64-bit targets.
const MMAP_THRESHOLD: i32 = 32 * 1024 * 1024;

/// glibc arenas (see above).
const ARENAS: i32 = 2;

/// Tunes glibc's allocator as above (call once, at start, before the worker threads run); a
/// no-op on other C libraries.
pub fn keep_freed_blocks() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before other threads
    // allocate much, and returns 0 (ignored) for values it refuses.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_ARENA_MAX, ARENAS);
    }
}

thread_local! {
    /// This thread's working buffers for [`with_scratch`].
    static SCRATCH: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on `N` buffers of the given lengths from this thread's scratch, which is kept from
/// call to call: the CPU kernels' per-chunk buffers (patch matrices, Winograd planes, attention
/// blocks) are then neither allocated nor zeroed per chunk, which a profile at 256² showed to
/// cost more than the transforms they serve. Their contents are whatever the last user left, so
/// `f` must write before it reads. When this thread's scratch is already in use (a kernel
/// waiting on rayon may run another kernel's task on the same thread), `f` gets fresh buffers.
///
/// Each kernel bounds its buffers (by [`CHUNK_ELEMS`](crate::conv::CHUNK_ELEMS) or its block
/// sizes), so what a thread keeps is bounded too.
pub fn with_scratch<const N: usize, R>(
    lens: [usize; N],
    f: impl FnOnce([&mut [f32]; N]) -> R,
) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut bufs) => {
            if bufs.len() < N {
                bufs.resize_with(N, Vec::new);
            }
            for (buf, &len) in bufs.iter_mut().zip(&lens) {
                if buf.len() < len {
                    buf.resize(len, 0.0);
                }
            }
            let mut bufs = bufs.iter_mut();
            f(std::array::from_fn(|i| {
                &mut bufs.next().expect("N buffers were made above")[..lens[i]]
            }))
        }
        Err(_) => {
            let mut owned: [Vec<f32>; N] = std::array::from_fn(|i| vec![0.0; lens[i]]);
            f(owned.each_mut().map(|v| v.as_mut_slice()))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::with_scratch;

    #[test]
    fn scratch_is_reused_and_a_nested_call_gets_its_own() {
        let first = with_scratch([8, 4], |[a, b]| {
            a.fill(1.0);
            b.fill(2.0);
            // Nested: this thread's scratch is in use, so fresh (zeroed) buffers.
            with_scratch([8], |[c]| assert!(c.iter().all(|&x| x == 0.0)));
            a.as_ptr() as usize
        });
        with_scratch([6, 4], |[a, b]| {
            assert_eq!(a.as_ptr() as usize, first, "the same buffer again");
            assert_eq!((a.len(), b.len()), (6, 4));
            assert!(b.iter().all(|&x| x == 2.0), "left as the last user left it");
        });
    }
}
