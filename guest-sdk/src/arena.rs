//! A request-scoped allocator: one pointer bump per allocation, for the life of one request.
//!
//! Why it exists: the host runs every request in a fresh instance made from the snapshot taken
//! after [`crate::Plugin::initialize`], and throws the instance away afterwards, so memory a
//! request allocates never needs to be reused. A general allocator (the system's dlmalloc) does
//! reuse: it serves a request's small allocations from the free chunks that `initialize` left
//! scattered through the snapshot's heap, so a request dirties pages all over it. The host then
//! has to restore each dirty page before the slot's next request, and past a few dozen scattered
//! regions wasmtime gives up on restoring them one by one and drops them with `madvise`, which
//! interrupts every core to flush TLBs; the next request faults them all in again.
//!
//! The arena instead hands out one contiguous, zeroed region in order: a request dirties a run
//! of neighbouring pages, the host restores them with a copy, and allocating costs an add and a
//! compare. Measured on all-MiniLM-L6-v2 (`make bench`): see `bench/RESULTS.md`.
//!
//! Opt in with [`request_arena!`](crate::request_arena). The arena serves allocations only after
//! `initialize` has returned (the [`export!`](crate::export) glue switches it on), so whatever
//! `initialize` builds lives where the system allocator put it. When a request needs more than
//! the arena holds, further allocations go to the system allocator: a big request still works,
//! it is only not faster. Freeing is a no-op except for the newest allocation (given back, and
//! grown in place by `realloc`), which is what `Vec` and `String` growth mostly need.
//!
//! Wasm components run one thread per instance, which is what makes the plain `Cell`s sound.

#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set by the export glue once `initialize` has returned (and so in the snapshot).
static SERVING: AtomicBool = AtomicBool::new(false);

/// Called by [`export!`](crate::export) after `initialize`: from here on allocations come from
/// the arena, if the plugin has one. The arena's region is reserved now, so it is part of the
/// snapshot (zeroed memory at the top of the heap, which costs the host nothing to copy).
#[doc(hidden)]
pub fn start_serving() {
    SERVING.store(true, Ordering::Relaxed);
    // the first allocation while serving reserves the region (a no-op without an arena)
    drop(std::hint::black_box(Box::new(0u8)));
}

/// A bump allocator over `N` bytes reserved from the system allocator at the end of
/// `initialize`, falling back to the system allocator. Declare it with
/// [`request_arena!`](crate::request_arena).
pub struct RequestArena<const N: usize> {
    /// Address of the region; 0 until reserved, `usize::MAX` if it could not be.
    base: Cell<usize>,
    /// Offset of the first free byte.
    next: Cell<usize>,
    /// Offset of the newest allocation, the only one `dealloc` and `realloc` can act on.
    last: Cell<usize>,
    /// Everything from here on has never been handed out, so it is still zero.
    high: Cell<usize>,
}

// SAFETY: a wasm32 component instance has exactly one thread; the arena is never shared across
// threads (the host does not enable wasm threads).
unsafe impl<const N: usize> Sync for RequestArena<N> {}

const NOT_RESERVED: usize = 0;

/// `bytes` of fresh zeroed memory, past everything the system allocator holds.
///
/// On wasm32 it grows the linear memory itself rather than asking dlmalloc: a region dlmalloc
/// carved would sit below dlmalloc's top-chunk header, so the snapshot's initialised data would
/// span the whole (zero) region and wasmtime would no longer map it copy-on-write. Grown pages
/// past the last initialised byte stay out of the snapshot's data. dlmalloc copes with memory
/// grown by others (it starts a new segment when it next grows).
#[cfg(target_arch = "wasm32")]
fn reserve(bytes: usize) -> Option<usize> {
    const PAGE: usize = 65536;
    if bytes == 0 {
        return None;
    }
    let old = core::arch::wasm32::memory_grow(0, bytes.div_ceil(PAGE));
    (old != usize::MAX).then(|| old * PAGE)
}

/// Elsewhere (the SDK's own unit tests): leaked zeroed memory from the system allocator.
#[cfg(not(target_arch = "wasm32"))]
fn reserve(bytes: usize) -> Option<usize> {
    let layout = Layout::from_size_align(bytes, 64).ok().filter(|l| l.size() > 0)?;
    // SAFETY: a non-zero size, checked above
    let p = unsafe { System.alloc_zeroed(layout) };
    (!p.is_null()).then_some(p as usize)
}
const UNAVAILABLE: usize = usize::MAX;

impl<const N: usize> RequestArena<N> {
    /// An arena that reserves `N` bytes when the plugin starts serving.
    #[allow(clippy::new_without_default)]
    pub const fn new() -> Self {
        Self {
            base: Cell::new(NOT_RESERVED),
            next: Cell::new(0),
            last: Cell::new(usize::MAX),
            high: Cell::new(0),
        }
    }

    /// The region's address, reserving it on first use.
    fn region(&self) -> Option<usize> {
        match self.base.get() {
            UNAVAILABLE => None,
            NOT_RESERVED => {
                let base = reserve(N).unwrap_or(UNAVAILABLE);
                self.base.set(base);
                (base != UNAVAILABLE).then_some(base)
            }
            base => Some(base),
        }
    }

    fn owns(&self, ptr: *mut u8) -> bool {
        let (p, base) = (ptr as usize, self.base.get());
        base != NOT_RESERVED && base != UNAVAILABLE && p >= base && p < base + N
    }

    fn advance(&self, next: usize) {
        self.next.set(next);
        self.high.set(self.high.get().max(next));
    }

    fn bump(&self, layout: Layout) -> Option<*mut u8> {
        if !SERVING.load(Ordering::Relaxed) {
            return None;
        }
        let base = self.region()?;
        let start = (base + self.next.get()).checked_next_multiple_of(layout.align())?;
        let end = start.checked_add(layout.size())?;
        if end > base + N {
            return None;
        }
        self.last.set(start - base);
        self.advance(end - base);
        Some(start as *mut u8)
    }
}

// SAFETY: every pointer handed out is either a fresh, suitably aligned range of the region that no
// other live allocation overlaps (`next` only moves past it, or back over the newest allocation
// when that one is freed), or comes from `System` and is given back to `System`.
unsafe impl<const N: usize> GlobalAlloc for RequestArena<N> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match self.bump(layout) {
            Some(p) => p,
            // SAFETY: forwarded with the caller's layout
            None => unsafe { System.alloc(layout) },
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let high = self.high.get();
        match self.bump(layout) {
            Some(p) => {
                // bytes past `high` were never handed out and are still zero; clear the rest
                let start = p as usize - self.base.get();
                let dirty = high.min(start + layout.size()).saturating_sub(start);
                if dirty > 0 {
                    // SAFETY: `p..p + dirty` lies in the region and belongs to this allocation alone
                    unsafe { p.write_bytes(0, dirty) };
                }
                p
            }
            // SAFETY: forwarded with the caller's layout
            None => unsafe { System.alloc_zeroed(layout) },
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if self.owns(ptr) {
            let off = ptr as usize - self.base.get();
            if off == self.last.get() && off + layout.size() == self.next.get() {
                // the newest allocation: hand its bytes back (dirty: `alloc_zeroed` clears them)
                self.next.set(off);
                self.last.set(usize::MAX);
            }
        } else {
            // SAFETY: not ours, so `System` handed it out with this layout
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !self.owns(ptr) {
            // SAFETY: `System` handed it out with this layout
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        let off = ptr as usize - self.base.get();
        if off == self.last.get() && off + layout.size() == self.next.get() && off + new_size <= N {
            // the newest allocation grows or shrinks in place
            self.advance(off + new_size);
            return ptr;
        }
        if new_size <= layout.size() {
            return ptr;
        }
        // SAFETY: `layout.align()` is a valid alignment and `new_size` is non-zero (it exceeds
        // the old size)
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: as in `alloc`
        let fresh = unsafe { self.alloc(new_layout) };
        if !fresh.is_null() {
            // SAFETY: both ranges are live and distinct; the old one holds `layout.size()` bytes
            unsafe { std::ptr::copy_nonoverlapping(ptr, fresh, layout.size()) };
        }
        fresh
    }
}

/// Makes a [`RequestArena`] of `$bytes` the plugin's global allocator.
///
/// ```ignore
/// div_plugin::request_arena!(8 << 20);
/// ```
#[macro_export]
macro_rules! request_arena {
    ($bytes:expr) => {
        #[global_allocator]
        static __DIV_REQUEST_ARENA: $crate::arena::RequestArena<{ $bytes }> =
            $crate::arena::RequestArena::new();
    };
}
