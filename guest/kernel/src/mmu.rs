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

use core::fmt;

use aarch64_cpu::asm::barrier;
use aarch64_cpu::registers::{
    ReadWriteable, Readable, Writeable, ID_AA64MMFR0_EL1, MAIR_EL1, PAR_EL1, SCTLR_EL1, TCR_EL1,
    TTBR0_EL1,
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
