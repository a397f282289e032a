//! A global allocator for tests that wraps `System` and, while a window is open, counts the
//! allocations made on threads whose OS name starts with a chosen prefix (the proxy names its
//! workers `epoxy-worker-N`) separately from all other allocations.
//!
//! It must never allocate itself: the thread name is read with `prctl(PR_GET_NAME)` into a
//! stack buffer, and nothing here touches thread-locals or `std::thread::current()` (which may
//! allocate, or be unavailable while a thread is being torn down).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Name prefix of the threads whose allocations are counted as "matching".
pub const WORKER_PREFIX: &[u8] = b"epoxy-worker";

pub struct CountingAlloc {
    enabled: AtomicBool,
    matching: AtomicUsize,
    other: AtomicUsize,
}

impl CountingAlloc {
    pub const fn new() -> CountingAlloc {
        CountingAlloc {
            enabled: AtomicBool::new(false),
            matching: AtomicUsize::new(0),
            other: AtomicUsize::new(0),
        }
    }

    /// Resets both counters and starts counting.
    pub fn start_window(&self) {
        self.matching.store(0, Ordering::SeqCst);
        self.other.store(0, Ordering::SeqCst);
        self.enabled.store(true, Ordering::SeqCst);
    }

    /// Stops counting; returns (allocations on matching threads, on all other threads).
    pub fn end_window(&self) -> (usize, usize) {
        self.enabled.store(false, Ordering::SeqCst);
        (
            self.matching.load(Ordering::SeqCst),
            self.other.load(Ordering::SeqCst),
        )
    }

    fn note(&self) {
        if !self.enabled.load(Ordering::Relaxed) {
            return;
        }
        if current_thread_matches() {
            self.matching.fetch_add(1, Ordering::Relaxed);
        } else {
            self.other.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Default for CountingAlloc {
    fn default() -> Self {
        CountingAlloc::new()
    }
}

/// Whether the calling thread's OS name starts with `WORKER_PREFIX`. Does not allocate.
pub fn current_thread_matches() -> bool {
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes (including the NUL) into the pointed-to
    // buffer, which is 16 bytes long and lives for the whole call.
    let rc = unsafe {
        libc::prctl(
            libc::PR_GET_NAME,
            name.as_mut_ptr() as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    rc == 0 && name.starts_with(WORKER_PREFIX)
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so the
// `GlobalAlloc` contract is exactly the one `System` fulfils; counting only touches atomics.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.note();
        // SAFETY: forwarded with the caller's (valid, non-zero-size) layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.note();
        // SAFETY: forwarded with the caller's (valid, non-zero-size) layout.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        self.note();
        // SAFETY: `ptr` was allocated by this allocator (i.e. by `System`) with `layout`, as
        // the caller guarantees; `new_size` is valid per the caller's contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by this allocator (i.e. by `System`) with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}
