//! Host doubles of the services a `Stage2` needs, built for speed rather
//! than checking (the checking doubles are in `hypervisor/stage2/tests`):
//! a table allocator over heap pages with a free list, a TLB that does
//! nothing, and the RCU domain in which threads play CPUs.
//!
//! Also the fixture most benchmarks share: a table with `pages` 4 KiB
//! leaves from IPA 0 (no blocks), and direct access to its leaf tables for
//! the raw-scan floor and for setting access flags "in hardware".

use std::alloc::{alloc_zeroed, Layout};
use std::cell::Cell;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use hyp_core::addr::{Ipa, PhysAddr, PAGE_SIZE};
use stage2::desc::{DescView, Descriptor, S2Attrs, ENTRIES};
use stage2::{
    MapFlags, MemType, Perms, Rcu, Stage2, TableAlloc, TlbInvalidate, VisitCtx, VisitKind, Visitor,
    WalkFlags,
};

const PAGE: Layout = match Layout::from_size_align(4096, 4096) {
    Ok(l) => l,
    Err(_) => panic!("bad layout"),
};

/// Where the guest frames of the fixtures start (never dereferenced: only
/// encoded into descriptors).
pub const FRAME_BASE: u64 = 0x80_0000_0000;

/// The IPA size of every table in the benchmarks.
pub const IPA_BITS: u8 = 40;

/// Table pages from the host heap (`PhysAddr` = host pointer). Freed pages
/// are zeroed and kept on a free list for the next `alloc_table`; nothing
/// is ever given back to the heap (the allocator lives as long as the
/// process), so a page address stays valid memory forever.
#[derive(Debug, Default)]
pub struct PageAlloc {
    free: Mutex<Vec<u64>>,
}

impl PageAlloc {
    /// The allocator of the process.
    pub fn get() -> &'static Self {
        static ALLOC: std::sync::OnceLock<PageAlloc> = std::sync::OnceLock::new();
        ALLOC.get_or_init(PageAlloc::default)
    }
}

// SAFETY: pages are 4 KiB-aligned heap allocations (checked below 2^48),
// zero-filled (fresh from `alloc_zeroed`, or zeroed in `free_table` before
// they go back on the free list), handed out once until freed; `table_ptr`
// of a page is its own address, and the memory is never deallocated.
unsafe impl TableAlloc for PageAlloc {
    fn alloc_table(&self) -> Option<PhysAddr> {
        if let Some(pa) = self.free.lock().unwrap().pop() {
            return Some(PhysAddr(pa));
        }
        // SAFETY: `PAGE` has a non-zero size.
        let page = unsafe { alloc_zeroed(PAGE) };
        if page.is_null() {
            return None;
        }
        assert!((page as u64) < 1 << 48, "host heap above 48 bits");
        Some(PhysAddr(page as u64))
    }

    unsafe fn free_table(&self, pa: PhysAddr) {
        // SAFETY: `pa` is one of our pages and nobody accesses it any more
        // (the caller's guarantee), so it may be overwritten.
        unsafe { std::ptr::write_bytes(pa.0 as *mut u8, 0, PAGE.size()) };
        self.free.lock().unwrap().push(pa.0);
    }

    fn table_ptr(&self, pa: PhysAddr) -> *const Descriptor {
        pa.0 as *const Descriptor
    }
}

/// A TLB with nothing to invalidate (the host has no stage 2).
#[derive(Debug)]
pub struct NoTlb;

impl TlbInvalidate for NoTlb {
    fn invalidate_ipa(&self, _ipa: Ipa, _level: u8) {}
    fn invalidate_vmid(&self) {}
}

std::thread_local! {
    /// The CPU index this thread plays in [`RCU`].
    static CPU: Cell<usize> = const { Cell::new(0) };
}

fn current_cpu() -> usize {
    CPU.with(Cell::get)
}

/// Makes this thread play CPU `index` of [`RCU`] (threads start as CPU 0).
pub fn play_cpu(index: usize) {
    CPU.with(|c| c.set(index));
}

/// CPUs online on the host (not this thread's affinity, which pinning
/// narrows).
fn host_cpus() -> usize {
    // SAFETY: `sysconf` only reads a system parameter.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).unwrap_or(1).max(1)
}

/// Sets this thread's affinity to `cpus` (best effort: ignored if refused).
fn set_affinity(cpus: impl Iterator<Item = usize>) {
    // SAFETY: `set` is a plain bit mask owned by this frame, zeroed as its
    // C definition requires; `CPU_SET` writes inside it (it bounds-checks
    // the index) and `sched_setaffinity(0, ..)` reads it, for the calling
    // thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for cpu in cpus {
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Pins this thread to host CPU `cpu` modulo the CPUs there are, so that
/// the two threads of a concurrent benchmark run on different CPUs
/// instead of taking turns on one.
pub fn pin_to_cpu(cpu: usize) {
    set_affinity(std::iter::once(cpu % host_cpus()));
}

/// Lets this thread run on every CPU again.
pub fn unpin() {
    set_affinity(0..host_cpus());
}

/// The one RCU domain of the benchmarks: the main thread is CPU 0, helper
/// threads (harvester, second faulting vCPU) are CPU 1.
pub static RCU: Rcu = Rcu::new(current_cpu);

/// A stage-2 table of the benchmarks.
pub type S2 = Stage2<'static, &'static PageAlloc, NoTlb>;

/// An empty table.
pub fn new_table() -> S2 {
    Stage2::new(IPA_BITS, PageAlloc::get(), NoTlb, &RCU).expect("stage-2 table")
}

/// The access flag (bit 10).
pub const AF: u64 = S2Attrs::AF.bits();

/// A table with `pages` 4 KiB leaves from IPA 0 (mapped with AF set and no
/// blocks), and the addresses of its leaf tables in IPA order.
#[derive(Debug)]
pub struct Fixture {
    /// The table.
    pub s2: S2,
    /// Leaves mapped from IPA 0.
    pub pages: u64,
    /// Level-3 tables covering `[0, pages * 4 KiB)`, in IPA order.
    leaf_tables: Vec<u64>,
}

impl Fixture {
    /// Maps `pages` (a multiple of 512) and finds the leaf tables.
    pub fn new(pages: u64) -> Self {
        assert!(pages.is_multiple_of(ENTRIES as u64));
        let s2 = new_table();
        let leaf = MapFlags {
            af: true,
            allow_blocks: false,
        };
        s2.map(
            Ipa(0),
            PhysAddr(FRAME_BASE),
            pages * PAGE_SIZE,
            Perms::RW,
            MemType::Normal,
            leaf,
        )
        .expect("map fixture");

        /// Collects the tables that level-2 entries point to.
        struct LeafTables(Vec<u64>);
        impl Visitor for LeafTables {
            type Error = Infallible;
            fn visit(&mut self, ctx: &VisitCtx<'_>) -> Result<(), Infallible> {
                if let (VisitKind::TablePre, 2, DescView::Table { pa }) =
                    (ctx.kind, ctx.level, ctx.view())
                {
                    self.0.push(pa.0);
                }
                Ok(())
            }
        }
        let mut found = LeafTables(Vec::new());
        let Ok(()) = s2.walk(Ipa(0), pages * PAGE_SIZE, WalkFlags::TABLE_PRE, &mut found);
        assert_eq!(found.0.len() as u64, pages / ENTRIES as u64);
        Self {
            s2,
            pages,
            leaf_tables: found.0,
        }
    }

    /// Bitmap words for the whole range.
    pub fn words(&self) -> usize {
        self.pages.div_ceil(64) as usize
    }

    /// The leaf tables, in IPA order, as the atomics they are.
    pub fn leaves(&self) -> impl Iterator<Item = &[AtomicU64; ENTRIES]> + '_ {
        self.leaf_tables.iter().map(|&pa| {
            // SAFETY: `pa` is a live level-3 table of `self.s2` (nothing in
            // the benchmarks unmaps the fixture's range, so it stays linked
            // as long as `self`), a 4 KiB-aligned page of 512 descriptors,
            // which are `#[repr(transparent)]` atomics: every access to it,
            // ours and the engine's, is atomic.
            unsafe { &*(pa as *const [AtomicU64; ENTRIES]) }
        })
    }

    /// Sets the access flag of every leaf, the way the hardware walker does
    /// (an atomic OR), so that the next harvest finds all pages young.
    pub fn make_young(&self) {
        for table in self.leaves() {
            for e in table {
                e.fetch_or(AF, Ordering::Relaxed);
            }
        }
    }

    /// The floor of a harvest: the same test-and-clear of bit 10 (a
    /// compare-exchange loop, `AcqRel`, as the engine's) and the same
    /// bitmap, straight over the leaf arrays, without walk, decoding or
    /// visitor. Returns the number of young pages.
    pub fn raw_scan(&self, bitmap: &mut [u64]) -> u64 {
        let mut young = 0;
        let mut words = bitmap.iter_mut();
        for table in self.leaves() {
            for chunk in table.chunks(64) {
                let mut word = 0;
                for (bit, e) in chunk.iter().enumerate() {
                    let mut old = e.load(Ordering::Acquire);
                    while old & AF != 0 {
                        match e.compare_exchange(
                            old,
                            old & !AF,
                            Ordering::AcqRel,
                            Ordering::Acquire,
                        ) {
                            Ok(_) => {
                                word |= 1 << bit;
                                young += 1;
                                break;
                            }
                            Err(now) => old = now,
                        }
                    }
                }
                *words.next().expect("bitmap too small") = word;
            }
        }
        young
    }

    /// The engine's harvest of the whole range (`test_clear_young`).
    pub fn harvest(&self, bitmap: &mut [u64]) -> u64 {
        self.s2
            .test_clear_young(Ipa(0), self.pages, bitmap)
            .expect("harvest")
    }

    /// One `test_and_clear_young` per page, assembling the same bitmap.
    pub fn harvest_per_page(&self, bitmap: &mut [u64]) -> u64 {
        bitmap.fill(0);
        let mut young = 0;
        for page in 0..self.pages {
            if self.s2.test_and_clear_young(Ipa(page * PAGE_SIZE)) == Some(true) {
                bitmap[(page / 64) as usize] |= 1 << (page % 64);
                young += 1;
            }
        }
        young
    }
}
