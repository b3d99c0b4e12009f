//! Stage-1 translation: the kernel's identity map (`TTBR0_EL1`).
//!
//! Built with `aarch64-paging` before the MMU is on, shared by every CPU:
//!
//! | range                       | attributes                                  |
//! |-----------------------------|---------------------------------------------|
//! | guest RAM (DTB `/memory`)   | normal write-back, inner shareable, RW, XN  |
//! | kernel code                 | normal, read-only, executable               |
//! | kernel read-only data       | normal, read-only, XN                       |
//! | the UART page               | device nGnRE, XN                            |
//! | [`UNBACKED_PROBE`] page     | device nGnRE, XN                            |
//!
//! RAM is mapped with 2 MiB blocks where it can be; mapping RAM in stage 1
//! touches none of it, so stage 2 still maps frames only on first use. The
//! probe page lies outside RAM and devices: mapping it in stage 1 lets an
//! access reach stage 2, where the hypervisor answers with a synchronous
//! external abort.
//!
//! Page tables come from the heap (static BSS) through the global allocator.
//!
//! The hostile-guest tests also map arbitrary IPAs (outside RAM, above the
//! output size) through a private window of upper addresses (`TTBR1_EL1`,
//! [`ScratchWindow`]) with descriptors they build themselves.

use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

use aarch64_cpu::asm::barrier;
use aarch64_cpu::registers::{
    ReadWriteable, Readable, Writeable, ID_AA64MMFR0_EL1, MAIR_EL1, PAR_EL1, SCTLR_EL1, TCR_EL1,
    TTBR0_EL1, TTBR1_EL1,
};
use aarch64_paging::descriptor::El1Attributes;
use aarch64_paging::idmap::IdMap;
use aarch64_paging::paging::{Constraints, El1And0, MemoryRegion};
use aarch64_paging::MapError;

use crate::addr::{PhysAddr, PhysRange, PAGE_SIZE};
use crate::boot::{self, ImageLayout};
use crate::platform::Platform;

/// An IPA that is neither RAM nor a device in the hypervisor's guest
/// memory map (QEMU `virt` puts its PCIe MMIO window there; our hypervisor
/// gives the guest nothing there). Mapped as device memory so accesses
/// reach stage 2.
pub const UNBACKED_PROBE: PhysAddr = PhysAddr(hyp_abi::layout::UNBACKED_IPA);

/// ASID of the kernel's address space.
const ASID: usize = 1;
/// Root table level: level 1 with a 4 KiB granule covers 512 GiB.
const ROOT_LEVEL: usize = 1;

/// `MAIR_EL1` slot 0: device nGnRE.
const DEVICE: El1Attributes = El1Attributes::ATTRIBUTE_INDEX_0;
/// `MAIR_EL1` slot 1: normal write-back read/write-allocate.
const NORMAL: El1Attributes =
    El1Attributes::ATTRIBUTE_INDEX_1.union(El1Attributes::INNER_SHAREABLE);

const VALID: El1Attributes = El1Attributes::VALID.union(El1Attributes::ACCESSED);
const NEVER_EXECUTE: El1Attributes = El1Attributes::UXN.union(El1Attributes::PXN);

const DATA: El1Attributes = VALID.union(NORMAL).union(NEVER_EXECUTE);
const CODE: El1Attributes = VALID
    .union(NORMAL)
    .union(El1Attributes::READ_ONLY)
    .union(El1Attributes::UXN);
const RODATA: El1Attributes = DATA.union(El1Attributes::READ_ONLY);
const MMIO: El1Attributes = VALID.union(DEVICE).union(NEVER_EXECUTE);

/// The page tables, kept alive (and reachable for later changes) forever
/// once active.
static KERNEL_MAP: spin::Once<spin::Mutex<IdMap<El1And0>>> = spin::Once::new();

/// Why the identity map could not be built.
#[derive(Clone, Debug)]
pub enum MmuError {
    /// `aarch64-paging` refused a mapping.
    Map {
        /// What was being mapped.
        what: &'static str,
        /// Its range.
        range: PhysRange,
        /// Why.
        error: MapError,
    },
    /// A range lies above what the tables can translate.
    OutOfRange {
        /// What was being mapped.
        what: &'static str,
        /// Its range.
        range: PhysRange,
        /// Size of the translated address space.
        limit: u64,
    },
    /// [`init`] was called twice.
    AlreadyActive,
}

impl fmt::Display for MmuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Map { what, range, error } => write!(f, "cannot map {what} {range}: {error}"),
            Self::OutOfRange { what, range, limit } => {
                write!(
                    f,
                    "{what} {range} is beyond the {limit:#x}-byte address space"
                )
            }
            Self::AlreadyActive => f.write_str("the MMU is already set up"),
        }
    }
}

/// Maps `range` (widened to whole pages) with `flags`.
fn map(
    idmap: &mut IdMap<El1And0>,
    what: &'static str,
    range: PhysRange,
    flags: El1Attributes,
) -> Result<(), MmuError> {
    let start = range.start.align_down(PAGE_SIZE);
    let end = range
        .end
        .checked_align_up(PAGE_SIZE)
        .ok_or(MmuError::OutOfRange {
            what,
            range,
            limit: idmap.size() as u64,
        })?;
    if end.as_u64() > idmap.size() as u64 {
        return Err(MmuError::OutOfRange {
            what,
            range,
            limit: idmap.size() as u64,
        });
    }
    let region = MemoryRegion::new(start.as_u64() as usize, end.as_u64() as usize);
    idmap
        .map_range(&region, flags)
        .map_err(|error| MmuError::Map { what, range, error })
}

/// Builds the identity map and turns the boot CPU's MMU and caches on;
/// records the translation registers for the secondaries. `pageable`, if
/// any, is a part of RAM mapped with 4 KiB pages (no blocks), so that
/// single pages of it can be unmapped and mapped again while the map is
/// live ([`set_page_valid`]).
pub fn init(
    platform: &Platform,
    image: &ImageLayout,
    pageable: Option<PhysRange>,
) -> Result<(), MmuError> {
    if KERNEL_MAP.is_completed() {
        return Err(MmuError::AlreadyActive);
    }
    let mut idmap = IdMap::with_asid(ASID, ROOT_LEVEL, El1And0);
    map(&mut idmap, "RAM", platform.ram, DATA)?;
    if let Some(range) = pageable {
        let region = MemoryRegion::new(range.start.as_u64() as usize, range.end.as_u64() as usize);
        idmap
            .map_range_with_constraints(&region, DATA, Constraints::NO_BLOCK_MAPPINGS)
            .map_err(|error| MmuError::Map {
                what: "pageable arena",
                range,
                error,
            })?;
    }
    // Remapping parts of RAM splits blocks; fine while the tables are
    // inactive (no break-before-make needed).
    map(&mut idmap, "kernel code", image.text, CODE)?;
    map(&mut idmap, "kernel rodata", image.rodata, RODATA)?;
    map(&mut idmap, "UART", platform.uart, MMIO)?;
    let probe = PhysRange {
        start: UNBACKED_PROBE,
        end: PhysAddr(UNBACKED_PROBE.as_u64() + PAGE_SIZE),
    };
    map(&mut idmap, "unbacked probe page", probe, MMIO)?;

    MAIR_EL1.write(
        MAIR_EL1::Attr0_Device::nonGathering_nonReordering_EarlyWriteAck
            + MAIR_EL1::Attr1_Normal_Outer::WriteBack_NonTransient_ReadWriteAlloc
            + MAIR_EL1::Attr1_Normal_Inner::WriteBack_NonTransient_ReadWriteAlloc,
    );
    // Output addresses up to what the CPU implements, capped at 48 bits
    // (52-bit output needs a different descriptor format). PARange and IPS
    // share their encoding.
    let pa_bits = ID_AA64MMFR0_EL1.read(ID_AA64MMFR0_EL1::PARange).min(0b101);
    let t0sz = 64 - u64::from(idmap.size().trailing_zeros());
    TCR_EL1.write(
        TCR_EL1::TBI0::Used
            + TCR_EL1::IPS.val(pa_bits)
            + TCR_EL1::TG0::KiB_4
            + TCR_EL1::SH0::Inner
            + TCR_EL1::ORGN0::WriteBack_ReadAlloc_WriteAlloc_Cacheable
            + TCR_EL1::IRGN0::WriteBack_ReadAlloc_WriteAlloc_Cacheable
            + TCR_EL1::EPD0::EnableTTBR0Walks
            + TCR_EL1::A1::TTBR0
            + TCR_EL1::AS::ASID8Bits
            + TCR_EL1::T0SZ.val(t0sz)
            + TCR_EL1::TG1::KiB_4
            + TCR_EL1::EPD1::DisableTTBR1Walks,
    );
    barrier::isb(barrier::SY);

    // SAFETY: the map covers everything the kernel uses — RAM (its image,
    // stacks, heap, the DTB) identity-mapped, and the UART — with the
    // attributes the code expects, and it is kept alive forever in
    // KERNEL_MAP below.
    unsafe {
        idmap.activate();
    }
    invalidate_local_tlb();
    SCTLR_EL1.modify(
        SCTLR_EL1::M::Enable
            + SCTLR_EL1::C::Cacheable
            + SCTLR_EL1::I::Cacheable
            + SCTLR_EL1::A::Disable,
    );
    barrier::isb(barrier::SY);

    boot::publish_secondary_mmu_state(
        MAIR_EL1.get(),
        TCR_EL1.get(),
        TTBR0_EL1.get(),
        SCTLR_EL1.get(),
    );
    KERNEL_MAP.call_once(|| spin::Mutex::new(idmap));
    Ok(())
}

/// Makes the 4 KiB page at `pa` (inside the pageable arena given to
/// [`init`]) valid or invalid in the live map. Making it invalid also
/// invalidates its TLB entries on every CPU, so no access can use the old
/// translation once this returns.
pub fn set_page_valid(pa: PhysAddr, valid: bool) {
    let region = MemoryRegion::new(pa.as_u64() as usize, (pa.as_u64() + PAGE_SIZE) as usize);
    let map = KERNEL_MAP.get().expect("the MMU is on");
    let result = map.lock().modify_range(&region, &|_, desc| {
        // Only the level-3 page entry; the walk also hands us the table
        // entries above it.
        if desc.level() != 3 {
            return Ok(());
        }
        if valid {
            desc.modify_flags(El1Attributes::VALID, El1Attributes::empty())
        } else {
            desc.modify_flags(El1Attributes::empty(), El1Attributes::VALID)
        }
    });
    if let Err(e) = result {
        panic!("cannot change the stage-1 entry of {pa}: {e}");
    }
    if valid {
        barrier::dsb(barrier::ISHST);
        barrier::isb(barrier::SY);
    } else {
        // SAFETY: TLB invalidation by VA for all ASIDs (the arena is
        // mapped global) has no effect on memory; the barriers complete
        // it before later accesses.
        unsafe {
            core::arch::asm!(
                "dsb ishst",
                "tlbi vaae1is, {}",
                "dsb ish",
                "isb",
                in(reg) pa.as_u64() >> 12,
                options(nostack, preserves_flags)
            );
        }
    }
}

/// Whether the 4 KiB page at `pa` is mapped (valid) in the live map.
pub fn page_is_valid(pa: PhysAddr) -> bool {
    let region = MemoryRegion::new(pa.as_u64() as usize, (pa.as_u64() + PAGE_SIZE) as usize);
    let map = KERNEL_MAP.get().expect("the MMU is on");
    let mut valid = false;
    let _ = map.lock().walk_range(&region, &mut |_, desc, _| {
        valid = desc.is_valid();
        Ok(())
    });
    valid
}

/// Drops this CPU's stage-1 TLB entries (all ASIDs), and with them the
/// combined stage 1+2 entries of the VM.
pub fn invalidate_local_tlb() {
    // SAFETY: TLB invalidation has no effect on memory contents; the
    // barriers make it complete before later translations.
    unsafe {
        core::arch::asm!(
            "tlbi vmalle1",
            "dsb nsh",
            "isb",
            options(nostack, preserves_flags)
        );
    }
}

/// Whether this CPU's stage-1 MMU and caches are on.
pub fn is_enabled() -> bool {
    SCTLR_EL1.matches_all(SCTLR_EL1::M::Enable + SCTLR_EL1::C::Cacheable + SCTLR_EL1::I::Cacheable)
}

/// Physical address of the root table of the kernel map, once active.
pub fn root_table() -> Option<PhysAddr> {
    KERNEL_MAP
        .get()
        .map(|m| PhysAddr(m.lock().root_address().0 as u64))
}

/// Translates `va` for an EL1 read with the live stage-1 tables
/// (`AT S1E1R`); `None` if that would fault.
pub fn translate(va: u64) -> Option<PhysAddr> {
    // SAFETY: AT only performs a translation and writes PAR_EL1; the isb
    // makes the result visible to the read below.
    unsafe {
        core::arch::asm!("at s1e1r, {}", "isb", in(reg) va, options(nostack, preserves_flags));
    }
    let par = PAR_EL1.extract();
    if par.matches_all(PAR_EL1::F::TranslationAborted) {
        return None;
    }
    Some(PhysAddr(
        par.read(PAR_EL1::PA) * PAGE_SIZE + (va % PAGE_SIZE),
    ))
}

/// First virtual address of the [`ScratchWindow`]: the bottom of the upper
/// (`TTBR1_EL1`) range with a 39-bit upper VA space.
pub const SCRATCH_BASE: u64 = 0xffff_ff80_0000_0000;
/// `TCR_EL1.T1SZ` of the window: a 2^39-byte upper range, walked from
/// level 1 like the kernel's own map.
const SCRATCH_T1SZ: u64 = 25;
/// Pages of the window that [`ScratchWindow::map`] can map (one level-3
/// table: 2 MiB).
pub const SCRATCH_PAGES: usize = 512;
/// Entries of a 4 KiB translation table.
const TABLE_ENTRIES: usize = 512;
/// Bytes one level-2 entry of the window covers.
const LEVEL2_BLOCK: u64 = 2 << 20;
/// Bytes one level-1 entry of the window covers.
const LEVEL1_BLOCK: u64 = 1 << 30;
/// Output-address bits of a 4 KiB-granule descriptor without FEAT_LPA2:
/// bits 47..12.
const DESCRIPTOR_OA: u64 = 0x0000_ffff_ffff_f000;

/// What a scratch page maps its IPA as.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ScratchKind {
    /// Device nGnRE, never executable: one access reaches stage 2 exactly
    /// as the instruction issued it.
    Device,
    /// Normal write-back memory, read-write, never executable.
    Normal,
    /// Normal write-back memory, read-only and executable at EL1.
    Executable,
}

impl ScratchKind {
    fn attributes(self) -> El1Attributes {
        let leaf = El1Attributes::TABLE_OR_PAGE;
        match self {
            Self::Device => MMIO.union(leaf),
            Self::Normal => DATA.union(leaf),
            Self::Executable => CODE.union(leaf),
        }
    }
}

/// A private stage-1 window for the hostile-guest tests: upper virtual
/// addresses (`TTBR1_EL1`, unused by the kernel) whose pages map any IPA
/// the caller names, with raw descriptors the tests control completely —
/// including table entries that point at IPAs outside RAM, which
/// `aarch64-paging` (rightly) cannot express.
///
/// The tables live in three frames that are never freed: a level-1 root
/// whose entry 0 points at a level-2 table whose entry 0 points at the
/// level-3 table of the [`SCRATCH_PAGES`] pages. Every entry is an
/// `AtomicU64`; each CPU changes only the pages it owns (the caller's
/// convention), and every change that removes or replaces a valid entry is
/// followed by a broadcast TLB invalidation, so no CPU keeps using an old
/// translation once the call returns. Mappings are global (nG = 0).
#[derive(Debug)]
pub struct ScratchWindow {
    root: PhysAddr,
    level2: PhysAddr,
    level3: PhysAddr,
}

impl ScratchWindow {
    /// Allocates and links the tables (all other entries invalid).
    pub fn new() -> Result<Self, crate::frames::FrameError> {
        // Never given back to the allocator: the tables stay in use for
        // the rest of the run.
        let run = crate::frames::alloc(3)?;
        let window = Self {
            root: run.frame(0),
            level2: run.frame(1),
            level3: run.frame(2),
        };
        for table in [window.root, window.level2, window.level3] {
            for i in 0..TABLE_ENTRIES {
                table_entry(table, i).store(0, Ordering::Relaxed);
            }
        }
        let table = El1Attributes::VALID.union(El1Attributes::TABLE_OR_PAGE);
        table_entry(window.level2, 0).store(
            window.level3.as_u64() | table.bits() as u64,
            Ordering::Relaxed,
        );
        table_entry(window.root, 0).store(
            window.level2.as_u64() | table.bits() as u64,
            Ordering::Relaxed,
        );
        barrier::dsb(barrier::ISHST);
        Ok(window)
    }

    /// Turns `TTBR1_EL1` walks on for this CPU, with the window's root.
    /// Each CPU calls it before it uses the window (secondaries start from
    /// the boot CPU's published registers, which leave TTBR1 off).
    pub fn enable_on_this_cpu(&self) {
        TTBR1_EL1.set_baddr(self.root.as_u64());
        TCR_EL1.modify(
            TCR_EL1::T1SZ.val(SCRATCH_T1SZ)
                + TCR_EL1::TG1::KiB_4
                + TCR_EL1::SH1::Inner
                + TCR_EL1::ORGN1::WriteBack_ReadAlloc_WriteAlloc_Cacheable
                + TCR_EL1::IRGN1::WriteBack_ReadAlloc_WriteAlloc_Cacheable
                + TCR_EL1::EPD1::EnableTTBR1Walks,
        );
        barrier::isb(barrier::SY);
        invalidate_local_tlb();
    }

    /// The virtual address of scratch page `page`.
    pub fn va(&self, page: usize) -> u64 {
        assert!(page < SCRATCH_PAGES, "scratch page {page}");
        SCRATCH_BASE + page as u64 * PAGE_SIZE
    }

    /// Maps scratch page `page` to the page at `ipa` (any page-aligned IPA
    /// a descriptor can hold, inside RAM or not) as `kind`, replacing what
    /// it mapped (break-before-make).
    pub fn map(&self, page: usize, ipa: u64, kind: ScratchKind) {
        assert!(
            ipa & !DESCRIPTOR_OA == 0,
            "IPA {ipa:#x} is not a page a 4 KiB descriptor can hold"
        );
        let va = self.va(page);
        let entry = table_entry(self.level3, page);
        self.break_entry(entry, va);
        entry.store(ipa | kind.attributes().bits() as u64, Ordering::Release);
        barrier::dsb(barrier::ISHST);
        barrier::isb(barrier::SY);
    }

    /// Makes scratch page `page` invalid.
    pub fn unmap(&self, page: usize) {
        let va = self.va(page);
        self.break_entry(table_entry(self.level3, page), va);
    }

    /// Points entry `index` (>= 1) of the window's level-`level` table (1
    /// or 2) at a "next-level table" at `table_ipa`, or makes it invalid
    /// with `None`. The IPA is not checked: a walk through the entry reads
    /// whatever lies there, or faults. Returns the first virtual address
    /// the entry translates.
    pub fn set_table_entry(&self, level: usize, index: usize, table_ipa: Option<u64>) -> u64 {
        assert!(
            (1..TABLE_ENTRIES).contains(&index),
            "entry {index}: 0 holds the window"
        );
        let (table, va) = match level {
            1 => (self.root, SCRATCH_BASE + index as u64 * LEVEL1_BLOCK),
            2 => (self.level2, SCRATCH_BASE + index as u64 * LEVEL2_BLOCK),
            _ => panic!("the window has no level-{level} table entries to redirect"),
        };
        let entry = table_entry(table, index);
        self.break_entry(entry, va);
        if let Some(ipa) = table_ipa {
            assert!(ipa & !DESCRIPTOR_OA == 0, "table IPA {ipa:#x}");
            let table = El1Attributes::VALID.union(El1Attributes::TABLE_OR_PAGE);
            entry.store(ipa | table.bits() as u64, Ordering::Release);
            barrier::dsb(barrier::ISHST);
            barrier::isb(barrier::SY);
        }
        va
    }

    /// Makes `entry` (translating `va`) invalid and, if it was valid,
    /// invalidates every CPU's TLB and walk-cache entries for `va`.
    fn break_entry(&self, entry: &AtomicU64, va: u64) {
        if entry.swap(0, Ordering::AcqRel) & El1Attributes::VALID.bits() as u64 == 0 {
            return;
        }
        // TLBI operand: VA[55:12].
        let operand = (va >> 12) & ((1 << 44) - 1);
        // SAFETY: TLB invalidation by VA for all ASIDs (the window's
        // entries are global) has no effect on memory; the barriers make
        // the invalid entry visible first and complete the invalidation
        // before later accesses.
        unsafe {
            core::arch::asm!(
                "dsb ishst",
                "tlbi vaae1is, {}",
                "dsb ish",
                "isb",
                in(reg) operand,
                options(nostack, preserves_flags)
            );
        }
    }
}

/// Entry `index` of the translation table in the frame at `table`.
fn table_entry(table: PhysAddr, index: usize) -> &'static AtomicU64 {
    assert!(index < TABLE_ENTRIES, "table entry {index}");
    // SAFETY: `table` is one of the scratch window's frames (allocated in
    // `ScratchWindow::new` and never freed), identity-mapped read-write
    // normal memory; the entry is 8-byte aligned and inside the frame.
    // Translation tables are only ever accessed through these atomics.
    unsafe { &*table.as_ptr::<AtomicU64>().add(index) }
}

/// Output-address bits this CPU's stage 1 can produce: `TCR_EL1.IPS`,
/// capped by what the CPU implements (`ID_AA64MMFR0_EL1.PARange`), as the
/// architecture caps it.
pub fn output_address_bits() -> u32 {
    let ips = TCR_EL1.read(TCR_EL1::IPS);
    let pa_range = ID_AA64MMFR0_EL1.read(ID_AA64MMFR0_EL1::PARange);
    address_size_bits(ips.min(pa_range))
}

/// Bits of an `IPS` / `PARange` encoding (they share it).
fn address_size_bits(encoding: u64) -> u32 {
    match encoding {
        0b000 => 32,
        0b001 => 36,
        0b010 => 40,
        0b011 => 42,
        0b100 => 44,
        0b101 => 48,
        _ => 52,
    }
}

/// Runs `f` on this CPU with stage-1 output addresses limited to 40 bits
/// (`TCR_EL1.IPS`), then restores the previous limit. Every address the
/// kernel uses lies far below 2^40; a descriptor that maps above it makes
/// an access take a stage-1 Address size fault at EL1.
pub fn with_40_bit_output<R>(f: impl FnOnce() -> R) -> R {
    let saved = TCR_EL1.read(TCR_EL1::IPS);
    TCR_EL1.modify(TCR_EL1::IPS::Bits_40);
    barrier::isb(barrier::SY);
    invalidate_local_tlb();
    let result = f();
    TCR_EL1.modify(TCR_EL1::IPS.val(saved));
    barrier::isb(barrier::SY);
    invalidate_local_tlb();
    result
}
