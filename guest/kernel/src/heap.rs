//! The kernel heap: a buddy allocator over a static array in BSS.
//!
//! The array is part of the image's BSS, which the boot code zeroes, so
//! the heap never touches the RAM the frame allocator hands out. Page
//! tables (allocated by `aarch64-paging` through the global allocator)
//! live here too.

use core::cell::UnsafeCell;

use buddy_system_allocator::LockedHeap;

/// Bytes of heap.
pub const HEAP_SIZE: usize = 1024 * 1024;

/// The heap's memory; only the allocator accesses it.
#[repr(C, align(4096))]
struct HeapArea(UnsafeCell<[u8; HEAP_SIZE]>);

// SAFETY: the area is handed to the allocator once, by `init` on the boot
// CPU; afterwards only the allocator (behind its lock) touches it.
unsafe impl Sync for HeapArea {}

static HEAP_AREA: HeapArea = HeapArea(UnsafeCell::new([0; HEAP_SIZE]));

#[global_allocator]
static ALLOCATOR: LockedHeap<32> = LockedHeap::empty();

/// Hands the heap area to the allocator.
///
/// # Safety
///
/// Call exactly once, on the boot CPU, before any allocation.
pub unsafe fn init() {
    let start = HEAP_AREA.0.get() as usize;
    // SAFETY: the area is static, unused by anything else, and given to the
    // allocator only once (the caller's promise).
    unsafe { ALLOCATOR.lock().init(start, HEAP_SIZE) };
}

/// Bytes currently allocated from the heap.
pub fn used() -> usize {
    ALLOCATOR.lock().stats_alloc_actual()
}

/// Adds `bytes` (rounded up to whole pages) of frames from the frame
/// allocator to the heap: for bookkeeping that scales with the
/// configuration (the reclaimer's per-page state over a large arena).
pub fn grow(bytes: usize) -> Result<(), crate::frames::FrameError> {
    let pages = bytes.div_ceil(crate::addr::PAGE_SIZE as usize);
    let run = crate::frames::alloc(pages)?;
    // The frames now belong to the heap for good (the run is not given
    // back).
    let start = run.frame(0).as_u64() as usize;
    // SAFETY: the run is RAM (identity mapped read-write), was just taken
    // from the frame allocator and is never given back, so nothing else
    // uses it.
    unsafe {
        ALLOCATOR
            .lock()
            .add_to_heap(start, start + pages * crate::addr::PAGE_SIZE as usize)
    };
    Ok(())
}
