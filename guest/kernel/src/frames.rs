//! The page-frame allocator: 4 KiB frames of guest RAM.
//!
//! A buddy allocator (`buddy_system_allocator::FrameAllocator`) over the
//! RAM after the kernel image. Its bookkeeping lives on the heap, never in
//! the frames themselves: under the hypervisor guest RAM is mapped on
//! demand, and RAM the guest has not used yet must stay unmapped (a test
//! checks the hypervisor's count), so initialising the allocator writes no
//! free frame.

use core::fmt;

use buddy_system_allocator::FrameAllocator;

use crate::addr::{PhysAddr, PhysRange, PAGE_SIZE};

/// log2 of the largest block plus one: up to 2^31 frames (8 TiB).
const ORDER: usize = 32;

static FRAMES: spin::Mutex<FrameAllocator<ORDER>> = spin::Mutex::new(FrameAllocator::new());

/// A run of physically contiguous frames, owned by whoever holds it.
#[derive(Debug, PartialEq, Eq)]
pub struct FrameRun {
    start: PhysAddr,
    count: usize,
}

impl FrameRun {
    /// Number of frames.
    pub fn count(&self) -> usize {
        self.count
    }

    /// The address of frame `i` of the run.
    pub fn frame(&self, i: usize) -> PhysAddr {
        assert!(i < self.count, "frame {i} of a run of {}", self.count);
        PhysAddr(self.start.as_u64() + i as u64 * PAGE_SIZE)
    }
}

/// The allocator cannot satisfy a request.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// No free block of `count` (rounded up to a power of two) frames.
    OutOfFrames {
        /// Frames asked for.
        count: usize,
    },
    /// A request for zero frames.
    Empty,
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OutOfFrames { count } => write!(f, "no free run of {count} frames"),
            Self::Empty => f.write_str("request for zero frames"),
        }
    }
}

/// Adds the whole pages of `range` to the allocator (without touching them).
pub fn add(range: PhysRange) {
    let Some(start) = range.start.checked_align_up(PAGE_SIZE) else {
        return;
    };
    let end = range.end.align_down(PAGE_SIZE);
    if start >= end {
        return;
    }
    let first = (start.as_u64() / PAGE_SIZE) as usize;
    let last = (end.as_u64() / PAGE_SIZE) as usize;
    FRAMES.lock().add_frame(first, last);
}

/// Allocates `count` contiguous frames, aligned to `count` rounded up to a
/// power of two. Their contents are whatever they were (never written by
/// the allocator).
pub fn alloc(count: usize) -> Result<FrameRun, FrameError> {
    if count == 0 {
        return Err(FrameError::Empty);
    }
    let first = FRAMES
        .lock()
        .alloc(count)
        .ok_or(FrameError::OutOfFrames { count })?;
    Ok(FrameRun {
        start: PhysAddr(first as u64 * PAGE_SIZE),
        count,
    })
}

/// Gives a run back.
pub fn free(run: FrameRun) {
    let first = (run.start.as_u64() / PAGE_SIZE) as usize;
    FRAMES.lock().dealloc(first, run.count);
}
