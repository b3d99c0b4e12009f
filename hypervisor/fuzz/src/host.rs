//! Host doubles of the services a `Stage2` is given: a checking table-page
//! allocator over heap pages ([`HostAlloc`]), a shadow TLB that caches
//! translations like a CPU and forgets them only when told to
//! ([`ShadowTlb`]), and an RCU domain with two CPUs that the one fuzzing
//! thread plays in turn ([`RCU`], [`as_cpu`]).
//!
//! Everything is single-threaded (`Cell`/`RefCell`): a fuzz input is one
//! deterministic sequence, so that a crash replays exactly.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};

use hyp_core::addr::{Ipa, PhysAddr};
use stage2::desc::{level_size, Descriptor, ENTRIES, LEAF_LEVEL};
use stage2::{MemType, Perms, Rcu, TableAlloc, TlbInvalidate};

/// What freed table pages are filled with: "valid" descriptors, so that a
/// walker reading a freed page misbehaves loudly instead of seeing zeros.
const POISON: u64 = 0xdead_dead_dead_dead;

const PAGE: Layout = match Layout::from_size_align(4096, 4096) {
    Ok(l) => l,
    Err(_) => panic!("bad layout"),
};

/// The CPU index the fuzzing thread plays in [`RCU`].
static CPU: AtomicUsize = AtomicUsize::new(0);

fn current_cpu() -> usize {
    CPU.load(Ordering::Relaxed)
}

/// The RCU domain of every table the harnesses build. CPU 0 is the
/// harness itself; CPU 1 stands for another CPU in the middle of a
/// lockless walk (online, not quiescent), which holds up grace periods
/// until the harness lets it pass a quiescent state.
pub static RCU: Rcu = Rcu::new(current_cpu);

/// Runs `f` as CPU `cpu` of [`RCU`].
pub fn as_cpu<R>(cpu: usize, f: impl FnOnce() -> R) -> R {
    let before = CPU.swap(cpu, Ordering::Relaxed);
    let r = f();
    CPU.store(before, Ordering::Relaxed);
    r
}

/// Puts both CPUs of [`RCU`] offline (the state every input starts from).
pub fn rcu_reset() {
    as_cpu(1, || RCU.offline());
    as_cpu(0, || RCU.offline());
}

/// Table pages from the host heap (`PhysAddr` = host pointer). Panics on
/// a double free, a free of a foreign page, a walk into a freed page, and
/// (when dropped) on a freed page that was written after its free: freed
/// pages stay allocated and poisoned until the allocator is dropped, so an
/// address is never reused within one input. With a limit
/// ([`HostAlloc::set_limit`]) it runs out of memory like the hypervisor's
/// frame allocator can.
#[derive(Debug, Default)]
pub struct HostAlloc {
    live: RefCell<HashSet<u64>>,
    freed: RefCell<Vec<u64>>,
    allocs: Cell<u64>,
    limit: Cell<Option<u64>>,
}

impl HostAlloc {
    /// From now on, allocations fail while `limit` pages are live (`None`:
    /// never).
    pub fn set_limit(&self, limit: Option<u64>) {
        self.limit.set(limit);
    }

    /// The limit set last.
    pub fn limit(&self) -> Option<u64> {
        self.limit.get()
    }

    /// Table pages allocated and not freed.
    pub fn live(&self) -> u64 {
        self.live.borrow().len() as u64
    }

    /// Table pages freed so far.
    pub fn frees(&self) -> u64 {
        self.freed.borrow().len() as u64
    }

    /// Table pages allocated so far.
    pub fn allocs(&self) -> u64 {
        self.allocs.get()
    }
}

// SAFETY: pages are fresh zeroed 4 KiB-aligned heap allocations (checked to
// lie below 2^48), used only as tables; `table_ptr` of a live page is its
// own address; freed pages are never deallocated or handed out again
// before the allocator is dropped.
unsafe impl TableAlloc for HostAlloc {
    fn alloc_table(&self) -> Option<PhysAddr> {
        if self.limit.get().is_some_and(|limit| self.live() >= limit) {
            return None;
        }
        // SAFETY: `PAGE` has a non-zero size.
        let page = unsafe { alloc_zeroed(PAGE) };
        assert!(!page.is_null(), "host out of memory");
        let pa = page as u64;
        assert!(pa < 1 << 48, "host heap above 48 bits");
        self.live.borrow_mut().insert(pa);
        self.allocs.set(self.allocs.get() + 1);
        Some(PhysAddr(pa))
    }

    unsafe fn free_table(&self, pa: PhysAddr) {
        assert!(
            self.live.borrow_mut().remove(&pa.0),
            "free of a table page that is not live: {pa}"
        );
        // SAFETY: `pa` is one of our live pages, which nobody may access any
        // more (the caller's guarantee), so overwriting it is fine.
        unsafe { std::slice::from_raw_parts_mut(pa.0 as *mut u64, ENTRIES).fill(POISON) };
        self.freed.borrow_mut().push(pa.0);
    }

    fn table_ptr(&self, pa: PhysAddr) -> *const Descriptor {
        assert!(
            self.live.borrow().contains(&pa.0),
            "walk into a freed or foreign table page {pa}"
        );
        pa.0 as *const Descriptor
    }
}

impl Drop for HostAlloc {
    fn drop(&mut self) {
        for &pa in self.freed.get_mut().iter() {
            // SAFETY: quarantined pages are still allocated by us.
            let words = unsafe { std::slice::from_raw_parts(pa as *const u64, ENTRIES) };
            assert!(
                words.iter().all(|&w| w == POISON),
                "freed table page {pa:#x} written after its free"
            );
        }
        for &pa in self
            .live
            .get_mut()
            .iter()
            .chain(self.freed.get_mut().iter())
        {
            // SAFETY: every page in the sets came from `alloc_zeroed(PAGE)`
            // and is deallocated exactly once, here.
            unsafe { dealloc(pa as *mut u8, PAGE) };
        }
    }
}

/// One cached translation: the leaf at `base`/`level` as it was when a
/// (simulated) guest access loaded it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct TlbEntry {
    /// IPA of the leaf (aligned to its size).
    pub base: u64,
    /// Level of the leaf.
    pub level: u8,
    /// Output address of the leaf.
    pub pa: u64,
    /// Permissions cached.
    pub perms: Perms,
    /// Memory type cached.
    pub mem: MemType,
    /// Access flag cached.
    pub af: bool,
}

/// Most entries each shadow cache keeps (the oldest is evicted: a TLB may
/// always forget).
const TLB_ENTRIES: usize = 64;

/// A TLB that caches what [`ShadowTlb::fill`] gives it in two structures,
/// as an Arm CPU may: stage-2-only entries, removed by `invalidate_ipa`
/// for their IPA and level (the TTL hint must be right), and combined
/// stage-1+2 entries, removed only by `invalidate_stage1` or
/// `invalidate_vmid`. An entry that survives a change of its translation
/// is a stale TLB entry: the harness checks there is none once an
/// operation has returned.
#[derive(Debug, Default)]
pub struct ShadowTlb {
    s2: RefCell<Vec<TlbEntry>>,
    combined: RefCell<Vec<TlbEntry>>,
    ipa_calls: Cell<u64>,
    vmid_calls: Cell<u64>,
    stage1_calls: Cell<u64>,
}

impl ShadowTlb {
    /// A guest access loaded `entry`.
    pub fn fill(&self, entry: TlbEntry) {
        for cache in [&self.s2, &self.combined] {
            let mut cache = cache.borrow_mut();
            cache.retain(|e| e.base != entry.base || e.level != entry.level);
            if cache.len() == TLB_ENTRIES {
                cache.remove(0);
            }
            cache.push(entry);
        }
    }

    /// Every cached entry, stage-2-only ones first.
    pub fn entries(&self) -> Vec<TlbEntry> {
        let mut all = self.s2.borrow().clone();
        all.extend(self.combined.borrow().iter().copied());
        all
    }

    /// Calls so far of (`invalidate_ipa`, `invalidate_vmid`,
    /// `invalidate_stage1`).
    pub fn counts(&self) -> (u64, u64, u64) {
        (
            self.ipa_calls.get(),
            self.vmid_calls.get(),
            self.stage1_calls.get(),
        )
    }
}

impl TlbInvalidate for ShadowTlb {
    fn invalidate_ipa(&self, ipa: Ipa, level: u8) {
        assert!(
            (1..=LEAF_LEVEL).contains(&level) && ipa.0.is_multiple_of(level_size(level)),
            "invalidate_ipa({ipa}, level {level}): not a leaf's IPA and level"
        );
        self.ipa_calls.set(self.ipa_calls.get() + 1);
        self.s2
            .borrow_mut()
            .retain(|e| e.level != level || e.base != ipa.0);
    }

    fn invalidate_vmid(&self) {
        self.vmid_calls.set(self.vmid_calls.get() + 1);
        self.s2.borrow_mut().clear();
        self.combined.borrow_mut().clear();
    }

    fn invalidate_stage1(&self) {
        self.stage1_calls.set(self.stage1_calls.get() + 1);
        self.combined.borrow_mut().clear();
    }
}
