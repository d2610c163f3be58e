//! What the load pipeline's threads share: a panic caught for its item
//! alone, and a malloc heap grown once before the work (leaf).

use std::any::Any;
use std::panic::AssertUnwindSafe;

/// The most [`reserve_heap`] grows one thread's heap by.
const MAX_HEAP_RESERVE: usize = 32 * 1024 * 1024;

/// Grows this thread's malloc heap by about `bytes` up front, and frees it
/// again (the pages are never touched, so they cost no memory).
///
/// glibc gives each thread's arena a heap that it makes writable page by
/// page as it grows, one `mprotect` each time, and every `mprotect` holds
/// the process's memory-map lock for writing. While the pool constructs
/// plugins beside the opening thread, those `mprotect`s (about 2,000 per
/// thread in a 1,000-plugin pass) stopped the opening thread's `dlopen`
/// at every page fault of its own (measured in BENCHMARKS.md, "Stop 25").
/// A heap that shrinks stays writable (glibc remembers how far it made it
/// writable), so growing it once here, in blocks just under malloc's
/// `mmap` threshold, leaves the pass's allocations nothing to `mprotect`.
/// With another allocator this is a few allocations that do nothing.
/// Hand-written: no crate reserves an arena's heap.
pub(super) fn reserve_heap(bytes: usize) {
    /// Under glibc's default `mmap` threshold (128 KiB): taken from the heap.
    const BLOCK: usize = 120 * 1024;
    let blocks: Vec<Vec<u8>> = (0..bytes.min(MAX_HEAP_RESERVE).div_ceil(BLOCK))
        .map(|_| Vec::with_capacity(BLOCK))
        .collect();
    drop(std::hint::black_box(blocks));
}

/// Runs `f`, turning a panic into its message.
pub(super) fn catch_panic<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    // The loader's own state is not borrowed across `f` (locks are taken and
    // released inside it), so nothing is left half-updated by an unwind.
    std::panic::catch_unwind(AssertUnwindSafe(f)).map_err(|payload| panic_message(&*payload))
}

/// The message of a panic payload (`panic!` with a literal or a format).
fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic with a non-string payload".to_owned())
}
