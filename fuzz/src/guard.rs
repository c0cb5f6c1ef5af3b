//! An allocation guard: a global allocator that notices any single request larger than the
//! limit armed on the current thread, so a decoder that sizes a buffer from a length it read
//! and did not check fails the fuzz target (and the CI smoke) instead of passing because the
//! machine happened to have the memory.
//!
//! libFuzzer's own `-malloc_limit_mb` needs a sanitizer's allocator hooks, which the stable
//! toolchain's `-s none` build does not have; this guard works in every build. The limit is
//! per thread (a `const` thread-local without a destructor, safe to touch from an allocator),
//! so helper threads of a target (the QMP peer) and parallel tests do not interfere.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

thread_local! {
    /// Largest single allocation allowed on this thread; 0 = not armed.
    static LIMIT: Cell<usize> = const { Cell::new(0) };
    /// Largest request above the limit seen while armed.
    static OVER: Cell<usize> = const { Cell::new(0) };
}

/// Requests above this are refused outright (the process then aborts with "memory allocation
/// failed") rather than reserved: an armed limit is always far below it.
const HARD: usize = 8 << 30;

/// The guarding allocator: [`System`] plus the check. Declare it with `#[global_allocator]`.
pub struct Guard;

#[inline]
fn check(size: usize) -> bool {
    let limit = LIMIT.with(Cell::get);
    if limit != 0 && size > limit {
        OVER.with(|o| o.set(o.get().max(size)));
        return size <= HARD;
    }
    true
}

// SAFETY: every method forwards to `System` with the caller's arguments; the check only reads
// and writes this thread's `Cell`s, which never allocate.
unsafe impl GlobalAlloc for Guard {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !check(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !check(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !check(new_size) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Run `f` with single allocations limited to `limit` bytes on this thread and return its
/// result with the largest request above the limit (0 if none). Nested calls keep the outer
/// limit afterwards.
pub fn measure<R>(limit: usize, f: impl FnOnce() -> R) -> (R, usize) {
    struct Restore(usize, usize);
    impl Drop for Restore {
        fn drop(&mut self) {
            LIMIT.with(|l| l.set(self.0));
            OVER.with(|o| o.set(self.1));
        }
    }
    let outer = Restore(LIMIT.with(Cell::get), OVER.with(Cell::get));
    LIMIT.with(|l| l.set(limit));
    OVER.with(|o| o.set(0));
    let r = f();
    let over = OVER.with(Cell::get);
    drop(outer);
    (r, over)
}

/// [`measure`], panicking (after `f` returns) if `f` asked for more than `limit` at once.
pub fn limited<R>(limit: usize, f: impl FnOnce() -> R) -> R {
    let (r, over) = measure(limit, f);
    assert!(
        over == 0,
        "a decoder asked for one allocation of {over} bytes; the limit for this target is \
         {limit} (an allocation sized from an unchecked length?)"
    );
    r
}

/// Whether [`Guard`] is this process's global allocator: a limited allocation is noticed.
pub fn installed() -> bool {
    measure(1, || {
        drop(Vec::<u8>::with_capacity(std::hint::black_box(64)))
    })
    .1 > 0
}
