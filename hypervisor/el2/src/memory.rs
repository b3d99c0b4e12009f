//! Memory: the heap, the physical frame allocator, and the EL2 stage-1 MMU.
//!
//! The heap is a static array inside the image (so it is reserved by
//! construction). Every other RAM page that is not the image, the DTB or a
//! loader module goes to the frame allocator. EL2 stage 1 is an identity
//! map built with `aarch64-paging`: image text read-only + executable,
//! rodata read-only, everything else in RAM read-write and never
//! executable, the UART and GIC as device memory.

use crate::boot;
use crate::platform::Platform;
use aarch64_cpu::asm::barrier;
use aarch64_cpu::registers::{
    ReadWriteable, Readable, Writeable, MAIR_EL2, SCTLR_EL2, TCR_EL2, TTBR0_EL2,
};
use aarch64_paging::descriptor::El23Attributes;
use aarch64_paging::idmap::IdMap;
use aarch64_paging::paging::{El2, MemoryRegion};
use buddy_system_allocator::LockedHeap;
use core::sync::atomic::{AtomicU64, Ordering};
use hyp_core::addr::{PhysAddr, PhysFrame, PhysRange, PAGE_SIZE};
use hyp_core::frames::{free_ranges, FrameAllocator, FrameError};
use spin::{Mutex, Once};

/// Heap size: page tables of EL2 and stage 2, VM bookkeeping, allocator metadata.
pub const HEAP_SIZE: usize = 16 << 20;

#[repr(C, align(4096))]
struct HeapArea([u8; HEAP_SIZE]);

static mut HEAP_AREA: HeapArea = HeapArea([0; HEAP_SIZE]);

#[global_allocator]
static HEAP: LockedHeap<33> = LockedHeap::empty();

/// Hands the static heap area to the global allocator (boot CPU, once).
pub fn init_heap() {
    // SAFETY: called once at boot, before any allocation and before other
    // CPUs run; HEAP_AREA is used by nothing else.
    unsafe {
        let start = core::ptr::addr_of_mut!(HEAP_AREA) as usize;
        HEAP.lock().init(start, HEAP_SIZE);
    }
}

/// Who holds a frame of RAM. Every frame the allocator manages carries one
/// owner tag, changed only under the allocator's lock, so that the
/// invariant checker (`vm::invariants`) can tell, for any output address
/// stage 2 reaches, whose frame it is.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Owner {
    /// In the allocator.
    Free = 0,
    /// Backs guest RAM (mapped by a stage-2 leaf, or pending its unmap's
    /// TLB flush).
    Guest = 1,
    /// A stage-2 table page (linked, or waiting for its grace period).
    Table = 2,
    /// Part of the compressed page store.
    Store = 3,
    /// Used by the hypervisor itself.
    Hyp = 4,
    /// Not managed by the allocator: the hypervisor image (with its heap),
    /// the DTB, loader modules, holes.
    Reserved = 5,
}

impl Owner {
    const ALL: [Self; 6] = [
        Self::Free,
        Self::Guest,
        Self::Table,
        Self::Store,
        Self::Hyp,
        Self::Reserved,
    ];

    fn from_u8(v: u8) -> Self {
        Self::ALL
            .get(usize::from(v))
            .copied()
            .unwrap_or(Self::Reserved)
    }

    /// Frames an allocation for this owner must leave free: the store
    /// never takes the last 4 MiB and a guest page never the last 256 KiB,
    /// so that stage-2 tables (which may use everything) can still be
    /// allocated to report and recover.
    const fn reserve(self) -> u64 {
        match self {
            Self::Store => 1024,
            Self::Guest | Self::Hyp => 64,
            _ => 0,
        }
    }
}

/// Frame counts by owner, kept current under the allocator's lock (and
/// read lock-free by `hyp-frames` in GDB, hence `#[no_mangle]`).
#[repr(C)]
#[derive(Debug)]
pub struct FrameCounters {
    /// Frames the allocator manages.
    pub total: AtomicU64,
    /// Free frames.
    pub free: AtomicU64,
    /// Guest frames.
    pub guest: AtomicU64,
    /// Stage-2 table pages.
    pub table: AtomicU64,
    /// Store frames.
    pub store: AtomicU64,
    /// Hypervisor frames.
    pub hyp: AtomicU64,
}

impl FrameCounters {
    fn counter(&self, owner: Owner) -> Option<&AtomicU64> {
        match owner {
            Owner::Free => Some(&self.free),
            Owner::Guest => Some(&self.guest),
            Owner::Table => Some(&self.table),
            Owner::Store => Some(&self.store),
            Owner::Hyp => Some(&self.hyp),
            Owner::Reserved => None,
        }
    }

    /// The count of `owner` (0 for [`Owner::Reserved`], which is not counted).
    pub fn get(&self, owner: Owner) -> u64 {
        self.counter(owner).map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

/// The frame counts by owner.
#[no_mangle]
pub static HYP_FRAMES: FrameCounters = FrameCounters {
    total: AtomicU64::new(0),
    free: AtomicU64::new(0),
    guest: AtomicU64::new(0),
    table: AtomicU64::new(0),
    store: AtomicU64::new(0),
    hyp: AtomicU64::new(0),
};

/// A frame handed to or taken from an owner that does not hold it: a
/// double free, a free by the wrong owner, or an allocator that handed
/// out a frame it did not have. Recorded (the first one in detail) for
/// the invariant checker; never a panic.
#[derive(Copy, Clone, Debug)]
pub struct OwnerMismatch {
    /// The frame.
    pub frame: PhysAddr,
    /// The owner the caller expected.
    pub expected: Owner,
    /// The owner the tag said.
    pub found: Owner,
}

/// The frame allocator and the owner tag of every frame from the lowest
/// to the highest RAM address (all CPUs; the lock protects both).
struct Frames {
    alloc: FrameAllocator,
    base: u64,
    tags: alloc::vec::Vec<u8>,
    mismatches: u64,
    first_mismatch: Option<OwnerMismatch>,
}

impl Frames {
    fn tag_index(&self, pa: PhysAddr) -> Option<usize> {
        let i = usize::try_from(pa.as_u64().checked_sub(self.base)? / PAGE_SIZE).ok()?;
        (i < self.tags.len()).then_some(i)
    }

    /// Moves `frame` from `from` to `to`, recording a mismatch if its tag
    /// was not `from` (the tag and counters then follow the actual tag).
    fn retag(&mut self, frame: PhysAddr, from: Owner, to: Owner) {
        let Some(i) = self.tag_index(frame) else {
            self.mismatch(frame, from, Owner::Reserved);
            return;
        };
        let found = Owner::from_u8(self.tags[i]);
        if found != from {
            self.mismatch(frame, from, found);
        }
        self.tags[i] = to as u8;
        if let Some(c) = HYP_FRAMES.counter(found) {
            c.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(c) = HYP_FRAMES.counter(to) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn mismatch(&mut self, frame: PhysAddr, expected: Owner, found: Owner) {
        self.mismatches += 1;
        self.first_mismatch.get_or_insert(OwnerMismatch {
            frame,
            expected,
            found,
        });
    }
}

static FRAMES: Once<Mutex<Frames>> = Once::new();

/// The image as a physical range.
pub fn image_range() -> PhysRange {
    let l = boot::image_layout();
    PhysRange::new(hyp_core::addr::PhysAddr(l.start), l.end - l.start)
}

/// Builds the frame allocator over RAM minus `reserved` (plus the image and
/// the DTB), and tags every frame. Returns the number of free frames.
pub fn init_frames(platform: &Platform, modules: &[PhysRange]) -> u64 {
    let mut reserved = alloc::vec![image_range(), platform.dtb];
    reserved.extend_from_slice(modules);
    let ranges = free_ranges(&platform.ram, &reserved);
    let fa = FrameAllocator::new(&ranges);
    let free = fa.free_count();
    let base = platform
        .ram
        .iter()
        .map(|r| r.start.as_u64())
        .min()
        .unwrap_or(0);
    let end = platform
        .ram
        .iter()
        .map(|r| r.end().as_u64())
        .max()
        .unwrap_or(0);
    let mut tags = alloc::vec![Owner::Reserved as u8; ((end - base) / PAGE_SIZE) as usize];
    for r in &ranges {
        let first = ((r.start.as_u64() - base) / PAGE_SIZE) as usize;
        tags[first..first + (r.size / PAGE_SIZE) as usize].fill(Owner::Free as u8);
    }
    HYP_FRAMES.total.store(fa.total(), Ordering::Relaxed);
    HYP_FRAMES.free.store(free, Ordering::Relaxed);
    FRAMES.call_once(|| {
        Mutex::new(Frames {
            alloc: fa,
            base,
            tags,
            mismatches: 0,
            first_mismatch: None,
        })
    });
    free
}

fn frames() -> &'static Mutex<Frames> {
    FRAMES
        .get()
        .expect("frame allocator used before init_frames")
}

/// One zeroed frame for `owner`. Fails with `OutOfFrames` when taking it
/// would leave fewer free frames than `owner` must leave (see
/// [`Owner::reserve`]).
pub fn alloc_zeroed_frame(owner: Owner) -> Result<PhysFrame, FrameError> {
    let frame = {
        let mut f = frames().lock();
        if f.alloc.free_count() <= owner.reserve() {
            return Err(FrameError::OutOfMemory { count: 1 });
        }
        let frame = f.alloc.alloc()?;
        f.retag(frame.start(), Owner::Free, owner);
        frame
    };
    // SAFETY: the frame was just allocated, so nothing else uses it, and RAM
    // is identity mapped read-write at EL2.
    unsafe { core::ptr::write_bytes(frame.start().as_u64() as *mut u8, 0, PAGE_SIZE as usize) };
    Ok(frame)
}

/// Returns one frame from [`alloc_zeroed_frame`] that `owner` holds.
pub fn free_frame(frame: PhysFrame, owner: Owner) {
    let mut f = frames().lock();
    f.retag(frame.start(), owner, Owner::Free);
    f.alloc.free(frame, 1);
}

/// Returns the guest frames of `[pa, pa + size)` (whole frames from
/// [`alloc_zeroed_frame`]): the release callback of a stage-2 TLB batch.
pub fn free_guest_frames(pa: PhysAddr, size: u64) {
    let mut at = pa;
    while at.as_u64() < pa.as_u64() + size {
        if let Some(frame) = PhysFrame::from_start(at) {
            free_frame(frame, Owner::Guest);
        }
        at = at.add(PAGE_SIZE);
    }
}

/// (free, used) frame counts.
pub fn frame_counts() -> (u64, u64) {
    let f = frames().lock();
    (f.alloc.free_count(), f.alloc.used())
}

/// A consistent view of the allocator for the invariant checker.
#[derive(Clone, Debug)]
pub struct FrameSnapshot {
    /// Frames managed.
    pub total: u64,
    /// Address of the first tagged frame (the lowest RAM address).
    pub base: PhysAddr,
    /// Frames tagged, from `base` (managed or reserved).
    pub tagged_frames: u64,
    /// Free frames as the buddy allocator counts them.
    pub allocator_free: u64,
    /// Frames by owner as the tags say (indexed by `Owner as usize`).
    pub tagged: [u64; 6],
    /// Frames by owner as the counters say (same indexing).
    pub counted: [u64; 6],
    /// Owner mismatches seen at allocation or free, and the first one.
    pub mismatches: u64,
    /// The first mismatch.
    pub first_mismatch: Option<OwnerMismatch>,
}

/// Counts tags and reads the allocator, under its lock.
pub fn frame_snapshot() -> FrameSnapshot {
    let f = frames().lock();
    let mut tagged = [0u64; 6];
    for &t in &f.tags {
        tagged[Owner::from_u8(t) as usize] += 1;
    }
    let mut counted = [0u64; 6];
    for o in Owner::ALL {
        counted[o as usize] = HYP_FRAMES.get(o);
    }
    FrameSnapshot {
        total: f.alloc.total(),
        base: PhysAddr(f.base),
        tagged_frames: f.tags.len() as u64,
        allocator_free: f.alloc.free_count(),
        tagged,
        counted,
        mismatches: f.mismatches,
        first_mismatch: f.first_mismatch,
    }
}

/// The owner tag of the frame at `pa` (`Reserved` outside RAM).
pub fn owner_of(pa: PhysAddr) -> Owner {
    let f = frames().lock();
    f.tag_index(pa)
        .map_or(Owner::Reserved, |i| Owner::from_u8(f.tags[i]))
}

// MAIR_EL2 attribute indices.
const MAIR_DEVICE: El23Attributes = El23Attributes::ATTRIBUTE_INDEX_0;
const MAIR_NORMAL: El23Attributes = El23Attributes::ATTRIBUTE_INDEX_1;

const BASE: El23Attributes = El23Attributes::VALID
    .union(El23Attributes::ACCESSED)
    .union(El23Attributes::USER_RES1);
const NORMAL: El23Attributes = BASE
    .union(MAIR_NORMAL)
    .union(El23Attributes::INNER_SHAREABLE);
const CODE: El23Attributes = NORMAL.union(El23Attributes::READ_ONLY);
const RODATA: El23Attributes = NORMAL
    .union(El23Attributes::READ_ONLY)
    .union(El23Attributes::XN);
const DATA: El23Attributes = NORMAL.union(El23Attributes::XN);
const DEVICE: El23Attributes = BASE.union(MAIR_DEVICE).union(El23Attributes::XN);

/// VA size of the EL2 identity map: 39 bits (level-1 root), enough for any
/// `virt` RAM layout below 512 GiB.
const VA_BITS: u64 = 39;

/// Register values every CPU loads to turn its MMU on (written by the boot
/// CPU before secondaries start; read by them with the MMU still off).
static MMU_TTBR0: AtomicU64 = AtomicU64::new(0);
static MMU_TCR: AtomicU64 = AtomicU64::new(0);

static IDMAP: Once<Mutex<IdMap<El2>>> = Once::new();

/// Errors while building the EL2 map.
#[derive(Debug)]
pub struct MmuError(aarch64_paging::MapError);

impl core::fmt::Display for MmuError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "EL2 stage-1 map: {}", self.0)
    }
}

fn region(r: PhysRange) -> MemoryRegion {
    MemoryRegion::new(r.start.as_u64() as usize, r.end().as_u64() as usize)
}

/// Builds the identity map and enables the MMU on the boot CPU.
pub fn init_mmu(platform: &Platform, parange: u64) -> Result<(), MmuError> {
    let mut idmap = IdMap::new(1, El2);
    let l = boot::image_layout();
    let (image_start, text_end) = (l.start as usize, l.text_end as usize);
    let (rodata_end, image_end) = (l.rodata_end as usize, l.end as usize);
    let maps = [
        (MemoryRegion::new(image_start, text_end), CODE),
        (MemoryRegion::new(text_end, rodata_end), RODATA),
        (MemoryRegion::new(rodata_end, image_end), DATA),
        (region(platform.uart), DEVICE),
        (region(platform.gic), DEVICE),
    ];
    for ram in &platform.ram {
        // RAM outside the image: data. The image part is overwritten below
        // with finer permissions (map_range replaces entries).
        idmap.map_range(&region(*ram), DATA).map_err(MmuError)?;
    }
    for (r, attrs) in maps {
        idmap.map_range(&r, attrs).map_err(MmuError)?;
    }

    TCR_EL2.write(
        TCR_EL2::T0SZ.val(64 - VA_BITS)
            + TCR_EL2::TG0::KiB_4
            + TCR_EL2::SH0::Inner
            + TCR_EL2::ORGN0::WriteBack_ReadAlloc_WriteAlloc_Cacheable
            + TCR_EL2::IRGN0::WriteBack_ReadAlloc_WriteAlloc_Cacheable
            + TCR_EL2::PS.val(parange.min(5)),
    );
    barrier::isb(barrier::SY);
    // SAFETY: the map covers the image (code, data, stacks), the heap (in
    // the image), the DTB and all RAM, the UART and the GIC: everything the
    // hypervisor touches. The IdMap is kept alive forever in IDMAP below.
    unsafe { idmap.activate() };
    MMU_TTBR0.store(TTBR0_EL2.get(), Ordering::Relaxed);
    MMU_TCR.store(TCR_EL2.get(), Ordering::Relaxed);
    IDMAP.call_once(|| Mutex::new(idmap));
    enable_mmu_this_cpu();
    Ok(())
}

/// Enables the MMU on the running CPU with the boot CPU's tables (MAIR_EL2
/// indices as [`MAIR_DEVICE`] and [`MAIR_NORMAL`] say).
pub fn enable_mmu_this_cpu() {
    MAIR_EL2.write(
        MAIR_EL2::Attr0_Device::nonGathering_nonReordering_EarlyWriteAck
            + MAIR_EL2::Attr1_Normal_Outer::WriteBack_NonTransient_ReadWriteAlloc
            + MAIR_EL2::Attr1_Normal_Inner::WriteBack_NonTransient_ReadWriteAlloc,
    );
    TCR_EL2.set(MMU_TCR.load(Ordering::Relaxed));
    TTBR0_EL2.set(MMU_TTBR0.load(Ordering::Relaxed));
    barrier::dsb(barrier::ISH);
    // SAFETY: invalidating this CPU's EL2 TLB entries before enabling the
    // MMU has no effect on memory.
    unsafe { core::arch::asm!("tlbi alle2", options(nostack)) };
    barrier::dsb(barrier::ISH);
    barrier::isb(barrier::SY);
    SCTLR_EL2.modify(
        SCTLR_EL2::M::Enable
            + SCTLR_EL2::C::Cacheable
            + SCTLR_EL2::I::Cacheable
            + SCTLR_EL2::WXN::Enable,
    );
    barrier::isb(barrier::SY);
}

/// Cleans the MMU parameters to the point of coherency so that secondary
/// CPUs, which read them with their MMU (and caches) off, see them.
pub fn publish_mmu_params() {
    for p in [&MMU_TTBR0, &MMU_TCR] {
        // SAFETY: `dc cvac` on a valid, mapped address only writes back a
        // cache line; it does not change memory contents.
        unsafe { core::arch::asm!("dc cvac, {}", in(reg) p.as_ptr(), options(nostack)) };
    }
    barrier::dsb(barrier::SY);
}
