//! Host doubles of the injected services: a checking table allocator over
//! heap pages and a recording TLB; and a stand-in for the hardware walker's
//! access-flag update ([`hw_touch`]).
//!
//! Shared by the `stage2` and `stress` test binaries (the latter includes
//! this file with `#[path]`), so an item one of them does not use carries
//! its own `allow(dead_code)`.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::vec::Vec;

use hyp_core::addr::{Ipa, PhysAddr, PAGE_SIZE};
use stage2::desc::{level_shift, DescView, Descriptor, ENTRIES};
use stage2::{
    MapFlags, Rcu, S2Attrs, Stage2, TableAlloc, TlbInvalidate, VisitCtx, Visitor, WalkFlags,
};

/// Sizes the tests use.
#[allow(dead_code, reason = "not every test binary uses every size")]
pub const KIB4: u64 = 0x1000;
#[allow(dead_code, reason = "not every test binary uses every size")]
pub const MIB2: u64 = 0x20_0000;
#[allow(dead_code, reason = "not every test binary uses every size")]
pub const GIB1: u64 = 0x4000_0000;
/// Page mappings with the access flag set.
#[allow(dead_code, reason = "used by the `stage2` binary only")]
pub const PAGES: MapFlags = MapFlags {
    af: true,
    allow_blocks: false,
};
/// Block mappings (where aligned) with the access flag set.
#[allow(dead_code, reason = "used by the `stage2` binary only")]
pub const BLOCKS: MapFlags = MapFlags {
    af: true,
    allow_blocks: true,
};

std::thread_local! {
    /// The CPU index this thread plays in an RCU domain.
    static CPU: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The CPU this thread plays (set with [`play_cpu`]; 0 by default).
pub fn current_cpu() -> usize {
    CPU.with(std::cell::Cell::get)
}

/// Makes this thread play CPU `index` of every RCU domain.
#[allow(dead_code)]
pub fn play_cpu(index: usize) {
    CPU.with(|c| c.set(index));
}

/// A fresh RCU domain for one test (leaked: a few hundred bytes), in which
/// this thread plays CPU 0 and is offline unless it calls `online`.
pub fn rcu() -> &'static Rcu {
    std::boxed::Box::leak(std::boxed::Box::new(Rcu::new(current_cpu)))
}

/// What freed table pages are filled with (odd: "valid", so a dangling
/// walker would misbehave loudly rather than read zeros).
pub const POISON: u64 = 0xdead_dead_dead_dead;

const PAGE: Layout = match Layout::from_size_align(4096, 4096) {
    Ok(l) => l,
    Err(_) => panic!("bad layout"),
};

#[derive(Default)]
struct AllocState {
    live: HashSet<u64>,
    /// Freed pages stay allocated (quarantine), poisoned, until the
    /// allocator is dropped: PAs are never reused, so a stale pointer is
    /// always caught by `table_ptr` and a late write by the poison check.
    freed: HashSet<u64>,
    allocs: u64,
    frees: u64,
}

/// Table pages from the host heap: `PhysAddr` = host pointer. Panics on a
/// double free, a free of a foreign page, and on a walk into a freed page.
pub struct HostAlloc {
    state: Mutex<AllocState>,
    limit: Option<usize>,
}

impl HostAlloc {
    /// An allocator without a page limit.
    pub fn new() -> Self {
        Self {
            state: Mutex::default(),
            limit: None,
        }
    }

    /// An allocator that fails once `pages` table pages are live.
    #[allow(dead_code, reason = "not used by every test binary")]
    pub fn with_limit(pages: usize) -> Self {
        Self {
            state: Mutex::default(),
            limit: Some(pages),
        }
    }

    /// Table pages currently allocated and not freed.
    pub fn live(&self) -> usize {
        self.state.lock().unwrap().live.len()
    }

    /// (allocations, frees) so far.
    pub fn counts(&self) -> (u64, u64) {
        let s = self.state.lock().unwrap();
        (s.allocs, s.frees)
    }

    /// The raw descriptor at `level` on the path to `ipa` from `root`, or
    /// `None` if the path stops earlier (a non-table entry above `level`).
    pub fn read_entry(&self, root: PhysAddr, ipa: Ipa, level: u8) -> Option<u64> {
        let state = self.state.lock().unwrap();
        let mut table = root.0;
        for l in 0..=level {
            assert!(
                state.live.contains(&table),
                "reading a dead table {table:#x}"
            );
            let index = (ipa.0 >> level_shift(l)) as usize % ENTRIES;
            // SAFETY: `table` is a live page of ours (checked above), so the
            // index is inside an allocated, aligned 4 KiB page.
            let raw = unsafe { (*(table as *const Descriptor).add(index)).load() };
            if l == level {
                return Some(raw);
            }
            match DescView::decode(raw, l) {
                DescView::Table { pa } => table = pa.0,
                _ => return None,
            }
        }
        None
    }
}

// SAFETY: pages are fresh zeroed 4 KiB-aligned heap allocations (below 2^48
// on the hosts we test on, checked), used only as tables; `table_ptr` of a
// live page is its own address; freed pages are never deallocated or
// reused before the allocator is dropped.
unsafe impl TableAlloc for HostAlloc {
    fn alloc_table(&self) -> Option<PhysAddr> {
        let mut s = self.state.lock().unwrap();
        if self.limit.is_some_and(|limit| s.live.len() >= limit) {
            return None;
        }
        // SAFETY: `PAGE` has a non-zero size.
        let page = unsafe { alloc_zeroed(PAGE) };
        if page.is_null() {
            return None;
        }
        let pa = page as u64;
        assert!(pa < 1 << 48, "host heap above 48 bits");
        s.live.insert(pa);
        s.allocs += 1;
        Some(PhysAddr(pa))
    }

    unsafe fn free_table(&self, pa: PhysAddr) {
        let mut s = self.state.lock().unwrap();
        assert!(!s.freed.contains(&pa.0), "double free of table {pa}");
        assert!(s.live.remove(&pa.0), "free of foreign table {pa}");
        // SAFETY: `pa` is one of our live 4 KiB pages; nobody may access
        // it any more (the caller's guarantee), so overwriting it is fine.
        unsafe { std::slice::from_raw_parts_mut(pa.0 as *mut u64, ENTRIES).fill(POISON) };
        s.freed.insert(pa.0);
        s.frees += 1;
    }

    fn table_ptr(&self, pa: PhysAddr) -> *const Descriptor {
        let s = self.state.lock().unwrap();
        assert!(
            s.live.contains(&pa.0),
            "walk into a freed or foreign table {pa}"
        );
        pa.0 as *const Descriptor
    }
}

impl Drop for HostAlloc {
    fn drop(&mut self) {
        let s = self.state.get_mut().unwrap();
        for &pa in &s.freed {
            // SAFETY: quarantined pages are still allocated by us.
            let words = unsafe { std::slice::from_raw_parts(pa as *const u64, ENTRIES) };
            if !std::thread::panicking() {
                assert!(
                    words.iter().all(|&w| w == POISON),
                    "freed table {pa:#x} written after free"
                );
            }
        }
        for &pa in s.live.iter().chain(&s.freed) {
            // SAFETY: every page in the sets came from `alloc_zeroed(PAGE)`
            // and is deallocated exactly once here.
            unsafe { dealloc(pa as *mut u8, PAGE) };
        }
    }
}

/// One recorded TLB invalidation, with the raw value of the affected entry
/// at the time of the call (`None`: unknown or not reachable).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum TlbEvent {
    /// `invalidate_ipa(ipa, level)`.
    Ipa {
        ipa: Ipa,
        level: u8,
        entry: Option<u64>,
    },
    /// `invalidate_vmid()`; `entry` is that of the last `Ipa` event.
    Vmid { entry: Option<u64> },
}

/// A TLB that records what it is asked to invalidate, and what the entry
/// held at that moment (so tests can check the break happened first).
pub struct RecordingTlb<'a> {
    alloc: &'a HostAlloc,
    root: Mutex<Option<PhysAddr>>,
    events: Mutex<Vec<TlbEvent>>,
    record: bool,
    last: Mutex<Option<(Ipa, u8)>>,
    counts: Mutex<(u64, u64)>,
}

impl<'a> RecordingTlb<'a> {
    /// A TLB that keeps an event log (`record`) or only counts.
    pub fn new(alloc: &'a HostAlloc, record: bool) -> Self {
        Self {
            alloc,
            root: Mutex::new(None),
            events: Mutex::default(),
            record,
            last: Mutex::new(None),
            counts: Mutex::default(),
        }
    }

    /// Tells the TLB which table it serves, so events carry entry values.
    #[allow(dead_code, reason = "not used by every test binary")]
    pub fn attach(&self, root: PhysAddr) {
        *self.root.lock().unwrap() = Some(root);
    }

    /// Takes the recorded events.
    #[allow(dead_code, reason = "not used by every test binary")]
    pub fn take(&self) -> Vec<TlbEvent> {
        std::mem::take(&mut *self.events.lock().unwrap())
    }

    /// (invalidate_ipa calls, invalidate_vmid calls) so far.
    pub fn counts(&self) -> (u64, u64) {
        *self.counts.lock().unwrap()
    }

    fn entry(&self, ipa: Ipa, level: u8) -> Option<u64> {
        let root = (*self.root.lock().unwrap())?;
        self.alloc.read_entry(root, ipa, level)
    }
}

impl TlbInvalidate for RecordingTlb<'_> {
    fn invalidate_ipa(&self, ipa: Ipa, level: u8) {
        self.counts.lock().unwrap().0 += 1;
        if self.record {
            *self.last.lock().unwrap() = Some((ipa, level));
            let entry = self.entry(ipa, level);
            self.events
                .lock()
                .unwrap()
                .push(TlbEvent::Ipa { ipa, level, entry });
        }
    }

    fn invalidate_vmid(&self) {
        self.counts.lock().unwrap().1 += 1;
        if self.record {
            let last = *self.last.lock().unwrap();
            let entry = last.and_then(|(ipa, level)| self.entry(ipa, level));
            self.events.lock().unwrap().push(TlbEvent::Vmid { entry });
        }
    }
}

/// What [`hw_touch`] found at the IPA it touched.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Touch {
    /// Level of the valid leaf that maps the IPA.
    pub level: u8,
    /// Whether its access flag was already set (the hardware writes nothing
    /// then).
    pub was_young: bool,
}

/// Accesses `ipa` the way a CPU with hardware access-flag management
/// (`VTCR_EL2.HA`) does: if a valid leaf maps it, set its AF with an atomic
/// compare-exchange of the whole descriptor, retried while the entry stays a
/// valid leaf; never write an invalid, locked or table entry. `None`: no
/// valid leaf (the access would take a stage-2 fault).
///
/// Lockless like the harvester: in a multi-threaded test the calling thread
/// must be online in the table's RCU domain.
pub fn hw_touch<M: TableAlloc, T: TlbInvalidate>(s2: &Stage2<'_, M, T>, ipa: Ipa) -> Option<Touch> {
    struct HwAf(Option<Touch>);
    impl Visitor for HwAf {
        type Error = core::convert::Infallible;
        fn visit(&mut self, ctx: &VisitCtx<'_>) -> Result<(), Self::Error> {
            let raw = descriptor_word(ctx.entry);
            let mut old = raw.load(Ordering::Acquire);
            self.0 = loop {
                if DescView::decode(old, ctx.level).leaf_parts().is_none() {
                    break None;
                }
                let touch = |was_young| Touch {
                    level: ctx.level,
                    was_young,
                };
                if old & S2Attrs::AF.bits() != 0 {
                    break Some(touch(true));
                }
                let new = old | S2Attrs::AF.bits();
                match raw.compare_exchange(old, new, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => break Some(touch(false)),
                    Err(now) => old = now,
                }
            };
            Ok(())
        }
    }
    let mut visitor = HwAf(None);
    let Ok(()) = s2.walk(
        ipa.align_down(PAGE_SIZE),
        PAGE_SIZE,
        WalkFlags::LEAF,
        &mut visitor,
    );
    visitor.0
}

/// The atomic word of a descriptor, for the writes only the hardware walker
/// makes (the crate keeps `Descriptor`'s own writers private).
fn descriptor_word(entry: &Descriptor) -> &AtomicU64 {
    // SAFETY: `Descriptor` is `#[repr(transparent)]` over `AtomicU64`, so the
    // pointer cast keeps size, alignment and validity, and the lifetime is
    // that of `entry`; an atomic may be written through a shared reference.
    unsafe { &*(entry as *const Descriptor).cast::<AtomicU64>() }
}
