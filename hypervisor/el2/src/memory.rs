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

/// The frame allocator (all CPUs; the lock protects the buddy state).
static FRAMES: Once<Mutex<FrameAllocator>> = Once::new();

/// The image as a physical range.
pub fn image_range() -> PhysRange {
    let l = boot::image_layout();
    PhysRange::new(hyp_core::addr::PhysAddr(l.start), l.end - l.start)
}

/// Builds the frame allocator over RAM minus `reserved` (plus the image and
/// the DTB). Returns the number of free frames.
pub fn init_frames(platform: &Platform, modules: &[PhysRange]) -> u64 {
    let mut reserved = alloc::vec![image_range(), platform.dtb];
    reserved.extend_from_slice(modules);
    let ranges = free_ranges(&platform.ram, &reserved);
    let fa = FrameAllocator::new(&ranges);
    let free = fa.free_count();
    FRAMES.call_once(|| Mutex::new(fa));
    free
}

fn frames() -> &'static Mutex<FrameAllocator> {
    FRAMES
        .get()
        .expect("frame allocator used before init_frames")
}

/// One zeroed frame.
pub fn alloc_zeroed_frame() -> Result<PhysFrame, FrameError> {
    let frame = frames().lock().alloc()?;
    // SAFETY: the frame was just allocated, so nothing else uses it, and RAM
    // is identity mapped read-write at EL2.
    unsafe { core::ptr::write_bytes(frame.start().as_u64() as *mut u8, 0, PAGE_SIZE as usize) };
    Ok(frame)
}

/// Returns one frame from [`alloc_zeroed_frame`].
pub fn free_frame(frame: PhysFrame) {
    frames().lock().free(frame, 1);
}

/// Returns the frames of `[pa, pa + size)` (whole frames from
/// [`alloc_zeroed_frame`]): the release callback of a stage-2 TLB batch.
pub fn free_frames(pa: PhysAddr, size: u64) {
    let mut at = pa;
    while at.as_u64() < pa.as_u64() + size {
        if let Some(frame) = PhysFrame::from_start(at) {
            free_frame(frame);
        }
        at = at.add(PAGE_SIZE);
    }
}

/// (free, used) frame counts.
pub fn frame_counts() -> (u64, u64) {
    let fa = frames().lock();
    (fa.free_count(), fa.used())
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
