//! Host (and `no_std`) simulation: a backend over simulated access bits,
//! and the offline references every policy is compared with.
//!
//! - [`SimBackend`] is both the [`Backend`] (the hypervisor's view: one
//!   access bit per page, `test_clear` with the ABI's semantics and checks)
//!   and the [`Memory`] (the guest's view: an access sets the page's bit,
//!   an eviction unmaps it, so its bit is gone). It counts calls and
//!   faults. The TLB is not modelled: `FLUSH` is accepted and has no effect.
//! - [`lru_refaults`] (exact LRU) and [`belady_refaults`] (MIN: evict the
//!   page used furthest in the future) replay a trace with a fixed capacity
//!   and count refaults like [`crate::driver`] does.

use crate::backend::{words_for, AgeFlags, Backend};
use crate::driver::{self, DriverConfig, Memory, Report, RunErrorOf};
use crate::policy::PolicyKind;
use crate::workload::{Access, Workload, MAX_PHASES};
use alloc::collections::{BTreeMap, BinaryHeap};
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

/// A bad simulated call (the target's hypervisor would return an SMCCC
/// error for each of these).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimError {
    /// The range leaves the region.
    OutOfRange {
        /// First page.
        first: u32,
        /// Pages.
        npages: u32,
    },
    /// More pages than one call may cover.
    TooManyPages(u32),
    /// The bitmap is shorter than the range.
    BitmapTooSmall {
        /// Words given.
        words: usize,
        /// Words needed.
        needed: usize,
    },
    /// `MASK` or `FLUSH` without `CLEAR`.
    Flags(AgeFlags),
    /// Eviction of a page that is not mapped.
    NotResident(u32),
}

impl fmt::Display for SimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SimError::OutOfRange { first, npages } => {
                write!(f, "pages {first}..+{npages} leave the region")
            }
            SimError::TooManyPages(n) => write!(f, "{n} pages in one call"),
            SimError::BitmapTooSmall { words, needed } => {
                write!(f, "bitmap of {words} words, {needed} needed")
            }
            SimError::Flags(flags) => write!(f, "flags {flags:?} need CLEAR"),
            SimError::NotResident(p) => write!(f, "page {p} evicted but not resident"),
        }
    }
}

/// Simulated access bits (and mappings) of a region.
#[derive(Debug, Clone)]
pub struct SimBackend {
    pages: u32,
    max_pages_per_call: u32,
    young: Vec<u64>,
    mapped: Vec<u64>,
    calls: u64,
    faults: u64,
}

impl SimBackend {
    /// What the guest passes on the target.
    pub const DEFAULT_MAX_PAGES_PER_CALL: u32 = 262_144;

    /// A region of `pages` unmapped pages.
    pub fn new(pages: u32) -> Self {
        Self::with_max_pages_per_call(pages, Self::DEFAULT_MAX_PAGES_PER_CALL)
    }

    /// Same, with a different per-call limit.
    pub fn with_max_pages_per_call(pages: u32, max: u32) -> Self {
        SimBackend {
            pages,
            max_pages_per_call: max,
            young: vec![0; words_for(pages)],
            mapped: vec![0; words_for(pages)],
            calls: 0,
            faults: 0,
        }
    }

    /// Accesses that found their page unmapped.
    pub fn faults(&self) -> u64 {
        self.faults
    }

    /// Whether `page`'s access bit is set.
    pub fn is_young(&self, page: u32) -> bool {
        crate::backend::bit(&self.young, page)
    }
}

impl Backend for SimBackend {
    type Error = SimError;

    fn max_pages_per_call(&self) -> u32 {
        self.max_pages_per_call
    }

    fn test_clear(
        &mut self,
        first: u32,
        npages: u32,
        bitmap: &mut [u64],
        flags: AgeFlags,
    ) -> Result<u64, SimError> {
        self.calls += 1;
        if first.checked_add(npages).is_none_or(|end| end > self.pages) {
            return Err(SimError::OutOfRange { first, npages });
        }
        if npages > self.max_pages_per_call {
            return Err(SimError::TooManyPages(npages));
        }
        let needed = words_for(npages);
        if bitmap.len() < needed {
            return Err(SimError::BitmapTooSmall {
                words: bitmap.len(),
                needed,
            });
        }
        if flags.intersects(AgeFlags::MASK | AgeFlags::FLUSH) && !flags.contains(AgeFlags::CLEAR) {
            return Err(SimError::Flags(flags));
        }
        let mut count = 0;
        for (w, out) in bitmap[..needed].iter_mut().enumerate() {
            let base = first + w as u32 * 64;
            let n = (npages - w as u32 * 64).min(64);
            let mut young = 0u64;
            for i in 0..n {
                if crate::backend::bit(&self.young, base + i) {
                    young |= 1 << i;
                }
            }
            let clear = if flags.contains(AgeFlags::MASK) {
                young & *out
            } else if flags.contains(AgeFlags::CLEAR) {
                young
            } else {
                0
            };
            for i in 0..n {
                if clear >> i & 1 != 0 {
                    crate::backend::clear_bit(&mut self.young, base + i);
                }
            }
            *out = young;
            count += u64::from(young.count_ones());
        }
        Ok(count)
    }

    fn calls(&self) -> u64 {
        self.calls
    }
}

impl Memory for SimBackend {
    type Error = SimError;

    fn access(&mut self, page: u32, _write: bool) -> Result<(), SimError> {
        if page >= self.pages {
            return Err(SimError::OutOfRange {
                first: page,
                npages: 1,
            });
        }
        if !crate::backend::bit(&self.mapped, page) {
            self.faults += 1;
            crate::backend::set_bit(&mut self.mapped, page);
        }
        crate::backend::set_bit(&mut self.young, page);
        Ok(())
    }

    fn evict(&mut self, page: u32) -> Result<(), SimError> {
        if page >= self.pages || !crate::backend::bit(&self.mapped, page) {
            return Err(SimError::NotResident(page));
        }
        crate::backend::clear_bit(&mut self.mapped, page);
        crate::backend::clear_bit(&mut self.young, page);
        Ok(())
    }
}

/// Runs `policy` (built with its defaults) over a fresh [`SimBackend`].
pub fn simulate(
    policy: PolicyKind,
    workload: &Workload,
    cfg: DriverConfig,
) -> Result<Report, RunErrorOf<SimBackend>> {
    let mut sim = SimBackend::new(workload.pages());
    driver::run(policy.build(workload.pages()), &mut sim, workload, cfg)
}

/// Refaults of an offline replay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Refaults {
    /// All refaults.
    pub total: u64,
    /// Refaults by phase.
    pub by_phase: [u64; MAX_PHASES],
}

impl Refaults {
    fn count(&mut self, phase: u8) {
        self.total += 1;
        self.by_phase[phase as usize] += 1;
    }
}

/// Exact LRU with `capacity` pages: refaults (accesses to pages seen before
/// and evicted since). O(n log capacity).
pub fn lru_refaults(trace: impl IntoIterator<Item = Access>, capacity: u32) -> Refaults {
    assert!(capacity > 0, "capacity must be positive");
    let mut out = Refaults::default();
    // page -> time of its last access, while resident; and the inverse.
    let mut last: BTreeMap<u32, u64> = BTreeMap::new();
    let mut by_time: BTreeMap<u64, u32> = BTreeMap::new();
    let mut seen: Vec<bool> = Vec::new();
    for (t, a) in trace.into_iter().enumerate() {
        let t = t as u64;
        let p = a.page as usize;
        if p >= seen.len() {
            seen.resize(p + 1, false);
        }
        match last.insert(a.page, t) {
            Some(old) => {
                by_time.remove(&old);
            }
            None => {
                if seen[p] {
                    out.count(a.phase);
                }
                seen[p] = true;
                if by_time.len() == capacity as usize {
                    let (_, victim) = by_time.pop_first().expect("full, so not empty");
                    last.remove(&victim);
                }
            }
        }
        by_time.insert(t, a.page);
    }
    out
}

/// Belady's MIN with `capacity` pages (on a miss at capacity, evict the
/// resident page whose next use is furthest away): the fewest refaults any
/// policy can have on this trace. O(n log n).
pub fn belady_refaults(trace: &[Access], capacity: u32) -> Refaults {
    assert!(capacity > 0, "capacity must be positive");
    let n = trace.len();
    let pages = trace.iter().map(|a| a.page as usize + 1).max().unwrap_or(0);
    // next[i]: index of the next access to trace[i].page, or n + page for
    // "never" (distinct, so the heap has no ties).
    let mut next = vec![0u64; n];
    let mut upcoming = vec![u64::MAX; pages];
    for i in (0..n).rev() {
        let p = trace[i].page as usize;
        next[i] = if upcoming[p] == u64::MAX {
            (n + p) as u64
        } else {
            upcoming[p]
        };
        upcoming[p] = i as u64;
    }
    let mut out = Refaults::default();
    // Resident pages with their current next use; heap entries are (next
    // use, page) and stale ones are skipped.
    let mut next_use = vec![u64::MAX; pages];
    let mut seen = vec![false; pages];
    let mut heap = BinaryHeap::new();
    let mut resident = 0u32;
    for (i, a) in trace.iter().enumerate() {
        let p = a.page as usize;
        if next_use[p] == u64::MAX {
            if seen[p] {
                out.count(a.phase);
            }
            seen[p] = true;
            if resident == capacity {
                loop {
                    let (when, victim) = heap.pop().expect("resident pages are in the heap");
                    if next_use[victim as usize] == when {
                        next_use[victim as usize] = u64::MAX;
                        break;
                    }
                }
            } else {
                resident += 1;
            }
        }
        next_use[p] = next[i];
        heap.push((next[i], a.page));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::set_bit;

    #[test]
    fn test_clear_reports_clears_and_masks() {
        let mut sim = SimBackend::new(200);
        for p in [0, 3, 64, 130, 199] {
            sim.access(p, false).unwrap();
        }
        let mut map = [0u64; 4];
        // Test only: nothing cleared.
        assert_eq!(sim.test_clear(0, 200, &mut map, AgeFlags::empty()), Ok(5));
        assert_eq!(map, [1 | 8, 1, 4, 1 << 7]);
        // Masked clear: only page 3 and 130; every young page reported.
        let mut map = [0u64; 4];
        set_bit(&mut map, 3);
        set_bit(&mut map, 130);
        set_bit(&mut map, 131);
        let f = AgeFlags::CLEAR | AgeFlags::MASK | AgeFlags::FLUSH;
        assert_eq!(sim.test_clear(0, 200, &mut map, f), Ok(5));
        assert_eq!(map, [1 | 8, 1, 4, 1 << 7]);
        assert!(!sim.is_young(3) && !sim.is_young(130) && sim.is_young(0));
        // Sub-range, unaligned: bits relative to `first`.
        let mut map = [0u64; 1];
        assert_eq!(sim.test_clear(60, 10, &mut map, AgeFlags::CLEAR), Ok(1));
        assert_eq!(map, [1 << 4]);
        assert!(!sim.is_young(64));
        assert_eq!(sim.calls(), 3);
    }

    #[test]
    fn bad_calls_are_refused() {
        let mut sim = SimBackend::with_max_pages_per_call(128, 64);
        let mut map = [0u64; 2];
        assert_eq!(
            sim.test_clear(100, 29, &mut map, AgeFlags::CLEAR),
            Err(SimError::OutOfRange {
                first: 100,
                npages: 29
            })
        );
        assert_eq!(
            sim.test_clear(u32::MAX, 2, &mut map, AgeFlags::CLEAR),
            Err(SimError::OutOfRange {
                first: u32::MAX,
                npages: 2
            })
        );
        assert_eq!(
            sim.test_clear(0, 65, &mut map, AgeFlags::CLEAR),
            Err(SimError::TooManyPages(65))
        );
        assert_eq!(
            sim.test_clear(0, 64, &mut map[..0], AgeFlags::CLEAR),
            Err(SimError::BitmapTooSmall {
                words: 0,
                needed: 1
            })
        );
        assert_eq!(
            sim.test_clear(0, 64, &mut map, AgeFlags::MASK),
            Err(SimError::Flags(AgeFlags::MASK))
        );
        assert_eq!(sim.evict(5), Err(SimError::NotResident(5)));
    }

    #[test]
    fn eviction_unmaps_so_the_next_access_faults() {
        let mut sim = SimBackend::new(8);
        sim.access(2, true).unwrap();
        sim.access(2, false).unwrap();
        assert_eq!(sim.faults(), 1);
        sim.evict(2).unwrap();
        assert!(!sim.is_young(2));
        sim.access(2, false).unwrap();
        assert_eq!(sim.faults(), 2);
    }
}
