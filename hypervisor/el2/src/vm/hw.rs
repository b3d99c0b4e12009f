//! The EL2 side of stage 2: table pages from the frame allocator, TLB
//! maintenance instructions, and the per-CPU virtualization registers
//! (HCR_EL2, VTCR_EL2, VTTBR_EL2, ...).

use crate::memory;
use aarch64_cpu::asm::barrier;
use aarch64_cpu::registers::{
    Readable, Writeable, CNTHCTL_EL2, CNTVOFF_EL2, HCR_EL2, MIDR_EL1, VTCR_EL2, VTTBR_EL2,
};
use hyp_core::addr::{Ipa, PhysAddr, PhysFrame};
use stage2::{Descriptor, TableAlloc, TlbInvalidate};

/// Stage-2 table pages come from the frame allocator; RAM is identity
/// mapped at EL2, so a table's physical address is also its pointer.
#[derive(Debug)]
pub struct FrameTables;

// SAFETY: frames come zeroed from the frame allocator, 4 KiB aligned, below
// 1 << 48 (RAM on `virt`), used for nothing else until freed; RAM stays
// identity mapped forever so `table_ptr` is valid. `Stage2` frees a table
// only after unlink, TLB flush and an RCU grace period, so reusing the
// frame at once is fine.
unsafe impl TableAlloc for FrameTables {
    fn alloc_table(&self) -> Option<PhysAddr> {
        memory::alloc_zeroed_frame(memory::Owner::Table)
            .ok()
            .map(PhysFrame::start)
    }

    unsafe fn free_table(&self, pa: PhysAddr) {
        if let Some(frame) = PhysFrame::from_start(pa) {
            memory::free_frame(frame, memory::Owner::Table);
        }
    }

    fn table_ptr(&self, pa: PhysAddr) -> *const Descriptor {
        pa.as_u64() as *const Descriptor
    }
}

/// TLB maintenance for the VM's VMID (the one in this CPU's VTTBR_EL2,
/// which every CPU sets before it touches stage 2).
#[derive(Debug)]
pub struct VmidTlb;

impl TlbInvalidate for VmidTlb {
    fn invalidate_ipa(&self, ipa: Ipa, _level: u8) {
        barrier::dsb(barrier::ISHST);
        // SAFETY: TLB invalidation by IPA for the current VMID has no effect
        // on memory; the operand is IPA[55:12] as the instruction expects.
        unsafe {
            core::arch::asm!("tlbi ipas2e1is, {}", in(reg) ipa.as_u64() >> 12, options(nostack));
        }
        barrier::dsb(barrier::ISH);
    }

    fn invalidate_stage1(&self) {
        barrier::dsb(barrier::ISHST);
        // SAFETY: invalidates stage-1 and combined entries of the current
        // VMID on all CPUs of the inner shareable domain; no effect on
        // memory.
        unsafe { core::arch::asm!("tlbi vmalle1is", options(nostack)) };
        barrier::dsb(barrier::ISH);
        barrier::isb(barrier::SY);
    }

    fn invalidate_vmid(&self) {
        barrier::dsb(barrier::ISHST);
        // SAFETY: invalidates stage 1+2 entries of the current VMID on all
        // CPUs of the inner shareable domain; no effect on memory.
        unsafe { core::arch::asm!("tlbi vmalls12e1is", options(nostack)) };
        barrier::dsb(barrier::ISH);
        barrier::isb(barrier::SY);
    }
}

/// Stage-2 parameters every CPU loads.
#[derive(Copy, Clone, Debug)]
pub struct Stage2Regs {
    /// IPA bits (T0SZ = 64 - ipa_bits).
    pub ipa_bits: u32,
    /// `ID_AA64MMFR0_EL1.PARange` (capped to 48 bits).
    pub parange: u64,
    /// Who sets the Access Flag (hardware: VTCR_EL2.HA).
    pub af: hyp_abi::AfMode,
    /// Root table.
    pub root: PhysAddr,
    /// VMID.
    pub vmid: u16,
}

/// Programs this CPU for running the VM: stage 2, traps, timer access.
pub fn setup_this_cpu(regs: &Stage2Regs, vmpidr: u64) {
    VTCR_EL2.write(
        VTCR_EL2::T0SZ.val(u64::from(64 - regs.ipa_bits))
            + VTCR_EL2::SL0::Granule4KBLevel0
            + VTCR_EL2::IRGN0::NormalWBRAWA
            + VTCR_EL2::ORGN0::NormalWBRAWA
            + VTCR_EL2::SH0::Inner
            + VTCR_EL2::TG0::Granule4KB
            + VTCR_EL2::PS.val(regs.parange.min(5))
            + VTCR_EL2::VS::Bits8
            + if regs.af == hyp_abi::AfMode::Hardware {
                VTCR_EL2::HA::Enabled
            } else {
                VTCR_EL2::HA::Disabled
            },
    );
    VTTBR_EL2.write(
        VTTBR_EL2::VMID.val(u64::from(regs.vmid)) + VTTBR_EL2::BADDR.val(regs.root.as_u64() >> 1),
    );
    HCR_EL2.write(
        HCR_EL2::VM::Enable
            + HCR_EL2::RW::EL1IsAarch64
            + HCR_EL2::SWIO::SET
            + HCR_EL2::FB::SET
            + HCR_EL2::BSU::InnerShareable
            + HCR_EL2::TSC::EnableTrapEl1SmcToEl2
            + HCR_EL2::TWI::SET
            + HCR_EL2::TWE::SET,
    );
    CNTHCTL_EL2.write(CNTHCTL_EL2::EL1PCEN::SET + CNTHCTL_EL2::EL1PCTEN::SET);
    CNTVOFF_EL2.set(0);
    // SAFETY: VMPIDR_EL2/VPIDR_EL2 only change what the guest reads from
    // MPIDR_EL1/MIDR_EL1 (aarch64-cpu has accessors for neither).
    unsafe {
        core::arch::asm!("msr vmpidr_el2, {}", in(reg) vmpidr, options(nostack));
        core::arch::asm!("msr vpidr_el2, {}", in(reg) MIDR_EL1.get(), options(nostack));
    }
    barrier::isb(barrier::SY);
    VmidTlb.invalidate_vmid();
}
