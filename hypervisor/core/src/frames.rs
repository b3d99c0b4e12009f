//! Physical frame allocation.
//!
//! [`free_ranges`] computes what RAM is left once the reserved regions (the
//! hypervisor image, the DTB, loader modules) are cut out; [`FrameAllocator`]
//! is a buddy allocator over those frames (`buddy_system_allocator`'s
//! `FrameAllocator`, which keeps its metadata on the heap, never in the
//! frames themselves) with typed frames and counters.
//!
//! Not synchronised: the EL2 binary wraps it in a lock.

use crate::addr::{PhysAddr, PhysFrame, PhysRange, PAGE_SIZE};
use alloc::vec::Vec;

/// RAM minus reserved regions, trimmed inwards to whole pages, sorted by
/// address, without empty ranges.
pub fn free_ranges(ram: &[PhysRange], reserved: &[PhysRange]) -> Vec<PhysRange> {
    let mut out: Vec<PhysRange> = ram.to_vec();
    for r in reserved {
        let mut next = Vec::with_capacity(out.len() + 1);
        for f in out {
            if !f.overlaps(r) {
                next.push(f);
                continue;
            }
            if f.start < r.start {
                next.push(PhysRange::new(f.start, r.start.0 - f.start.0));
            }
            if r.end() < f.end() {
                next.push(PhysRange::new(r.end(), f.end().0 - r.end().0));
            }
        }
        out = next;
    }
    let mut pages: Vec<PhysRange> = out
        .into_iter()
        .filter_map(|f| {
            let start = f.start.checked_align_up(PAGE_SIZE)?;
            let end = f.end().align_down(PAGE_SIZE);
            (end > start).then(|| PhysRange::new(start, end.0 - start.0))
        })
        .collect();
    pages.sort_by_key(|r| r.start);
    pages
}

/// Errors of the frame allocator.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// No run of `count` free frames is left.
    OutOfMemory {
        /// Frames asked for.
        count: u64,
    },
}

impl core::fmt::Display for FrameError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::OutOfMemory { count } => write!(f, "out of physical frames (wanted {count})"),
        }
    }
}

/// A buddy allocator of 4 KiB frames with free/used counters.
pub struct FrameAllocator {
    buddy: buddy_system_allocator::FrameAllocator<33>,
    total: u64,
    used: u64,
}

impl core::fmt::Debug for FrameAllocator {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("FrameAllocator")
            .field("total", &self.total)
            .field("used", &self.used)
            .finish()
    }
}

impl FrameAllocator {
    /// An allocator over `ranges` (page aligned, as from [`free_ranges`]).
    pub fn new(ranges: &[PhysRange]) -> Self {
        let mut buddy = buddy_system_allocator::FrameAllocator::new();
        let mut total = 0;
        for r in ranges {
            let first = PhysFrame::containing(r.start).number();
            let end = first + r.size / PAGE_SIZE;
            buddy.add_frame(first as usize, end as usize);
            total += end - first;
        }
        Self {
            buddy,
            total,
            used: 0,
        }
    }

    /// One frame.
    pub fn alloc(&mut self) -> Result<PhysFrame, FrameError> {
        self.alloc_contiguous(1).map(|(f, _)| f)
    }

    /// `count` physically contiguous frames, aligned to the next power of
    /// two of `count`. Returns the first frame and the count to free.
    pub fn alloc_contiguous(&mut self, count: u64) -> Result<(PhysFrame, u64), FrameError> {
        let n = usize::try_from(count).map_err(|_| FrameError::OutOfMemory { count })?;
        let first = self
            .buddy
            .alloc(n)
            .ok_or(FrameError::OutOfMemory { count })?;
        self.used += count;
        Ok((PhysFrame::from_number(first as u64), count))
    }

    /// Returns frames obtained from [`alloc`](Self::alloc) or
    /// [`alloc_contiguous`](Self::alloc_contiguous) (same `count`).
    pub fn free(&mut self, first: PhysFrame, count: u64) {
        self.buddy.dealloc(first.number() as usize, count as usize);
        self.used -= count;
    }

    /// Frames managed in all.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Frames currently handed out.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Frames currently free.
    pub fn free_count(&self) -> u64 {
        self.total - self.used
    }
}

/// Whether `addr` lies in one of `ranges`.
pub fn in_ranges(ranges: &[PhysRange], addr: PhysAddr) -> bool {
    ranges.iter().any(|r| r.contains(addr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn r(start: u64, size: u64) -> PhysRange {
        PhysRange::new(PhysAddr(start), size)
    }

    #[test]
    fn subtracts_image_dtb_and_modules() {
        let ram = [r(0x4000_0000, 0x1000_0000)];
        let reserved = [
            r(0x4000_0000, 0x1_0800),  // DTB, not page sized
            r(0x4020_0000, 0x10_0000), // image
            r(0x4800_0123, 0x2000),    // module, unaligned
            r(0x3000_0000, 0x100),     // outside RAM: no effect
            r(0x4fff_f000, 0x10_0000), // straddles the end
        ];
        let free = free_ranges(&ram, &reserved);
        assert_eq!(
            free,
            vec![
                r(0x4001_1000, 0x4020_0000 - 0x4001_1000),
                r(0x4030_0000, 0x4800_0000 - 0x4030_0000),
                r(0x4800_3000, 0x4fff_f000 - 0x4800_3000),
            ]
        );
    }

    #[test]
    fn counts_and_exhaustion() {
        let mut fa = FrameAllocator::new(&[r(0x4000_0000, 16 * PAGE_SIZE)]);
        assert_eq!(fa.total(), 16);
        let frames: Vec<_> = (0..16).map(|_| fa.alloc().unwrap()).collect();
        assert_eq!(fa.free_count(), 0);
        assert_eq!(fa.alloc(), Err(FrameError::OutOfMemory { count: 1 }));
        let distinct: BTreeSet<_> = frames.iter().collect();
        assert_eq!(distinct.len(), 16);
        for f in frames {
            assert!(f.start().0 >= 0x4000_0000 && f.start().0 < 0x4001_0000);
            fa.free(f, 1);
        }
        assert_eq!((fa.used(), fa.free_count()), (0, 16));
        let (first, n) = fa.alloc_contiguous(8).unwrap();
        assert_eq!(first.number() % 8, 0, "buddy blocks are naturally aligned");
        fa.free(first, n);
    }

    proptest! {
        /// Free ranges never overlap a reserved region, stay inside RAM,
        /// are page aligned, and cover every whole page that is in RAM and
        /// outside every reserved region.
        #[test]
        fn free_ranges_match_a_page_model(
            reserved in proptest::collection::vec((0u64..64, 1u64..12), 0..6),
            reserved_off in proptest::collection::vec(0u64..4096, 6),
        ) {
            let ram = [r(0x4000_0000, 64 * PAGE_SIZE)];
            let res: Vec<_> = reserved.iter().zip(&reserved_off)
                .map(|(&(p, n), &off)| r(0x4000_0000 + p * PAGE_SIZE + off, n * 1000))
                .collect();
            let free = free_ranges(&ram, &res);
            for page in 0..64u64 {
                let start = PhysAddr(0x4000_0000 + page * PAGE_SIZE);
                let page_range = PhysRange::new(start, PAGE_SIZE);
                let expect_free = !res.iter().any(|x| x.overlaps(&page_range));
                prop_assert_eq!(in_ranges(&free, start), expect_free, "page {}", page);
            }
            for f in &free {
                prop_assert!(f.start.is_page_aligned() && f.size % PAGE_SIZE == 0 && f.size > 0);
            }
        }
    }
}
