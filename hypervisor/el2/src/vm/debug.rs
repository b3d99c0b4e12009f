//! State kept for the debugger: plain `#[no_mangle]` records that the GDB
//! helpers (`scripts/hyp_gdb.py`, see docs/DEBUGGING.md) read from
//! physical memory while QEMU is stopped.
//!
//! - [`HYP_DEBUG_VCPUS`]: per vCPU (= physical CPU, they are pinned 1:1),
//!   its last exit: guest PC and PSTATE, exit kind, ESR_EL2, the faulting
//!   IPA of a stage-2 abort, `x0` (an HVC's function ID), and the number
//!   of exits. Written by that CPU
//!   only, on every exit.
//! - [`HYP_DEBUG_VM`]: the stage-2 registers of the VM (VTTBR_EL2,
//!   VTCR_EL2; the fallback when the gdbstub does not show them), and a
//!   snapshot of the VM's counters taken when it stops.
//! - [`HYP_DEBUG_PROBES`]: when the VM stops, the hypervisor's own
//!   translation of a few IPAs ([`Stage2::translate`](stage2::table::Stage2::translate)),
//!   published before [`hyp_debug_probes_ready`] is called; GDB breaks
//!   there and checks its own walk of the live tables against them.
//!
//! Every field is an `AtomicU64` in a `#[repr(C)]` struct: GDB finds the
//! field offsets in the debug info, and the exit path pays a few `Relaxed`
//! stores (no lock, no read-modify-write: each record has one writer).
//! GDB reads them with all CPUs stopped, so it sees each record either
//! whole or, if a CPU stopped in the middle of [`record_exit`], with some
//! fields of the previous exit; the exit count tells which exit it is.

use super::Vm;
use crate::boot::MAX_CPUS;
use crate::exceptions::{ExitKind, GuestContext};
use aarch64_cpu::registers::{Readable, ESR_EL2, FAR_EL2, HPFAR_EL2, VTCR_EL2, VTTBR_EL2};
use core::convert::Infallible;
use core::sync::atomic::{compiler_fence, AtomicBool, AtomicU64, Ordering};
use hyp_abi::layout;
use hyp_core::addr::{Ipa, PAGE_SIZE};
use stage2::walk::{VisitCtx, Visitor, WalkFlags};
use stage2::{DescView, MemType};
use tock_registers::LocalRegisterCopy;

/// The last exit of one vCPU.
#[repr(C)]
#[derive(Debug)]
pub struct VcpuDebug {
    /// Exits recorded so far (0: the vCPU never exited; its other fields
    /// are meaningless).
    pub exits: AtomicU64,
    /// Guest PC at the exit (ELR_EL2).
    pub pc: AtomicU64,
    /// Guest PSTATE at the exit (SPSR_EL2: `M[3:0]` gives EL1h/EL1t/EL0).
    pub spsr: AtomicU64,
    /// The exit's vector: 0 synchronous, 1 IRQ, 2 FIQ, 3 SError, anything
    /// else the raw value of an exception from AArch32.
    pub kind: AtomicU64,
    /// ESR_EL2 of a synchronous exit (0 for the other kinds).
    pub esr: AtomicU64,
    /// IPA of a data or instruction abort from EL1 (HPFAR_EL2.FIPA and the
    /// page offset of FAR_EL2); 0 for every other exit.
    pub fault_ipa: AtomicU64,
    /// The guest's `x0` at the exit: the function ID of an HVC or SMC.
    pub x0: AtomicU64,
}

impl VcpuDebug {
    const fn new() -> Self {
        Self {
            exits: AtomicU64::new(0),
            pc: AtomicU64::new(0),
            spsr: AtomicU64::new(0),
            kind: AtomicU64::new(0),
            esr: AtomicU64::new(0),
            fault_ipa: AtomicU64::new(0),
            x0: AtomicU64::new(0),
        }
    }
}

/// Last exit of each vCPU, indexed by vCPU (= physical CPU) index.
#[no_mangle]
pub static HYP_DEBUG_VCPUS: [VcpuDebug; MAX_CPUS] = [const { VcpuDebug::new() }; MAX_CPUS];

/// The VM's stage-2 registers and its counters when it stopped.
#[repr(C)]
#[derive(Debug)]
pub struct VmDebug {
    /// VTTBR_EL2 (VMID and root table): read on each vCPU's first exit,
    /// rewritten from the VM's own parameters when it stops. 0 until then.
    pub vttbr: AtomicU64,
    /// VTCR_EL2 (T0SZ, start level, granule, HA), recorded with `vttbr`.
    pub vtcr: AtomicU64,
    /// 1 once the VM stopped and the fields below were filled.
    pub stopped: AtomicU64,
    /// IPA bits of the VM.
    pub ipa_bits: AtomicU64,
    /// Guest RAM: first IPA and size in bytes.
    pub ram_base: AtomicU64,
    /// See `ram_base`.
    pub ram_size: AtomicU64,
    /// vCPUs of the VM.
    pub vcpus: AtomicU64,
    /// 4 KiB pages mapped in stage 2.
    pub mapped_pages: AtomicU64,
    /// Stage-2 table pages linked in the tables.
    pub table_pages: AtomicU64,
    /// 0: the VM has no page store (`store=0`); 1: the three store fields
    /// below hold its counters; 2: its lock was held when the VM stopped
    /// (the fields are not filled).
    pub store_state: AtomicU64,
    /// Entries in the page store.
    pub store_entries: AtomicU64,
    /// Payload bytes in the page store.
    pub store_bytes: AtomicU64,
    /// Host frames the page store holds.
    pub store_frames: AtomicU64,
}

/// See [`VmDebug`].
#[no_mangle]
pub static HYP_DEBUG_VM: VmDebug = VmDebug {
    vttbr: AtomicU64::new(0),
    vtcr: AtomicU64::new(0),
    stopped: AtomicU64::new(0),
    ipa_bits: AtomicU64::new(0),
    ram_base: AtomicU64::new(0),
    ram_size: AtomicU64::new(0),
    vcpus: AtomicU64::new(0),
    mapped_pages: AtomicU64::new(0),
    table_pages: AtomicU64::new(0),
    store_state: AtomicU64::new(0),
    store_entries: AtomicU64::new(0),
    store_bytes: AtomicU64::new(0),
    store_frames: AtomicU64::new(0),
};

/// What a probe IPA is (the `kind` of a [`Probe`]; `scripts/hyp_gdb.py`
/// has the same names).
#[derive(Copy, Clone, Debug)]
#[repr(u64)]
enum ProbeKind {
    /// First page of the guest image (mapped eagerly).
    Image = 1,
    /// The guest DTB (mapped eagerly).
    Dtb = 2,
    /// A word in the highest mapped page of guest RAM (mapped on demand).
    Demand = 3,
    /// The highest page of guest RAM that is not mapped.
    UnmappedRam = 4,
    /// An IPA that is neither RAM nor a device.
    OutsideRam = 5,
    /// The first IPA past the IPA space.
    PastIpaSpace = 6,
}

/// What the hypervisor's walk found for a probe (the `state` of a
/// [`Probe`]).
#[derive(Copy, Clone, Debug)]
#[repr(u64)]
enum ProbeState {
    /// Outside the IPA space: no walk.
    OutsideIpaSpace = 0,
    /// The walk ended on an invalid entry.
    Invalid = 1,
    /// The walk ended on an entry locked by a writer.
    Locked = 2,
    /// A valid leaf: `pa`, `level`, `perms`, `device` are filled.
    Mapped = 3,
}

/// One IPA and the hypervisor's translation of it.
#[repr(C)]
#[derive(Debug)]
pub struct Probe {
    /// The IPA.
    pub ipa: AtomicU64,
    /// What it is (`ProbeKind`).
    pub kind: AtomicU64,
    /// What the walk ended on (`ProbeState`).
    pub state: AtomicU64,
    /// `Stage2::translate`'s output address (page offset included), when
    /// mapped.
    pub pa: AtomicU64,
    /// Level of the leaf (1, 2 or 3), when mapped.
    pub level: AtomicU64,
    /// The guest's permissions, when mapped: bit 0 read, 1 write, 2 exec.
    pub perms: AtomicU64,
    /// 1 for Device memory, 0 for Normal, when mapped.
    pub device: AtomicU64,
}

impl Probe {
    const fn new() -> Self {
        Self {
            ipa: AtomicU64::new(0),
            kind: AtomicU64::new(0),
            state: AtomicU64::new(0),
            pa: AtomicU64::new(0),
            level: AtomicU64::new(0),
            perms: AtomicU64::new(0),
            device: AtomicU64::new(0),
        }
    }
}

/// Most probes in [`HYP_DEBUG_PROBES`].
const MAX_PROBES: usize = 8;

/// The probe table.
#[repr(C)]
#[derive(Debug)]
pub struct Probes {
    /// Probes filled (`Release`, after them).
    pub count: AtomicU64,
    /// The probes.
    pub probes: [Probe; MAX_PROBES],
}

/// See [`Probes`].
#[no_mangle]
pub static HYP_DEBUG_PROBES: Probes = Probes {
    count: AtomicU64::new(0),
    probes: [const { Probe::new() }; MAX_PROBES],
};

/// GDB's breakpoint: called once, after [`HYP_DEBUG_PROBES`] is filled.
#[no_mangle]
#[inline(never)]
pub extern "C" fn hyp_debug_probes_ready() {
    // The fence is an effect the optimizer must keep, and with it the
    // call; nothing is inlined here, so a breakpoint on the function
    // (`break hyp_debug_probes_ready`) stops in this frame.
    compiler_fence(Ordering::SeqCst);
}

/// Records vCPU `index`'s exit (called on every exit, before it is
/// handled, on the vCPU's own CPU).
#[inline]
pub(super) fn record_exit(index: usize, ctx: &GuestContext, kind: ExitKind) {
    let Some(r) = HYP_DEBUG_VCPUS.get(index) else {
        return;
    };
    let (raw_kind, esr, fault_ipa) = match kind {
        ExitKind::Sync => {
            let esr = ESR_EL2.get();
            let copy: LocalRegisterCopy<u64, ESR_EL2::Register> = LocalRegisterCopy::new(esr);
            let ipa = match copy.read_as_enum(ESR_EL2::EC) {
                Some(
                    ESR_EL2::EC::Value::DataAbortLowerEL | ESR_EL2::EC::Value::InstrAbortLowerEL,
                ) => (HPFAR_EL2.read(HPFAR_EL2::FIPA) << 12) | (FAR_EL2.get() & (PAGE_SIZE - 1)),
                _ => 0,
            };
            (0, esr, ipa)
        }
        ExitKind::Irq => (1, 0, 0),
        ExitKind::Fiq => (2, 0, 0),
        ExitKind::SError => (3, 0, 0),
        ExitKind::AArch32(raw) => (raw, 0, 0),
    };
    // Single writer (this CPU): plain Relaxed stores, no RMW.
    r.pc.store(ctx.elr, Ordering::Relaxed);
    r.spsr.store(ctx.spsr, Ordering::Relaxed);
    r.kind.store(raw_kind, Ordering::Relaxed);
    r.esr.store(esr, Ordering::Relaxed);
    r.fault_ipa.store(fault_ipa, Ordering::Relaxed);
    r.x0.store(ctx.x[0], Ordering::Relaxed);
    let exits = r.exits.load(Ordering::Relaxed);
    r.exits.store(exits + 1, Ordering::Relaxed);
    if exits == 0 {
        // The registers every vCPU's CPU loaded before entering the guest:
        // the same values on all of them.
        HYP_DEBUG_VM.vttbr.store(VTTBR_EL2.get(), Ordering::Relaxed);
        HYP_DEBUG_VM.vtcr.store(VTCR_EL2.get(), Ordering::Relaxed);
    }
}

/// Set by the first [`at_stop`]: only it fills the probes.
static PROBED: AtomicBool = AtomicBool::new(false);

/// Called when the VM stops (EXIT, SYSTEM_OFF, a fatal VM error), before
/// the statistics are printed, on a CPU that is online in the VM's RCU
/// domain (so the lockless walks below are allowed). Records the VM's
/// registers and counters, then, the first time, the probe translations,
/// and calls [`hyp_debug_probes_ready`].
pub(super) fn at_stop(vm: &Vm) {
    let d = &HYP_DEBUG_VM;
    let mut vttbr: LocalRegisterCopy<u64, VTTBR_EL2::Register> = LocalRegisterCopy::new(0);
    vttbr.modify(
        VTTBR_EL2::VMID.val(u64::from(vm.regs.vmid))
            + VTTBR_EL2::BADDR.val(vm.regs.root.as_u64() >> 1),
    );
    d.vttbr.store(vttbr.get(), Ordering::Relaxed);
    d.vtcr.store(VTCR_EL2.get(), Ordering::Relaxed);
    d.ipa_bits
        .store(u64::from(vm.regs.ipa_bits), Ordering::Relaxed);
    d.ram_base.store(layout::RAM_BASE, Ordering::Relaxed);
    d.ram_size.store(vm.ram_size, Ordering::Relaxed);
    d.vcpus.store(vm.vcpus.len() as u64, Ordering::Relaxed);
    d.mapped_pages
        .store(vm.stage2.mapped_pages(), Ordering::Relaxed);
    d.table_pages
        .store(vm.stage2.table_pages(), Ordering::Relaxed);
    // try_lock: a CPU stopped by a fatal error may hold the store's lock.
    let store_state = match vm.store.as_ref().map(|s| s.try_lock()) {
        None => 0,
        Some(None) => 2,
        Some(Some(store)) => {
            let s = store.stats();
            d.store_entries.store(s.entries, Ordering::Relaxed);
            d.store_bytes.store(s.stored_bytes, Ordering::Relaxed);
            d.store_frames.store(s.frames_used, Ordering::Relaxed);
            1
        }
    };
    d.store_state.store(store_state, Ordering::Relaxed);
    d.stopped.store(1, Ordering::Release);

    if PROBED.swap(true, Ordering::AcqRel) {
        return;
    }
    let ram_end = layout::RAM_BASE + vm.ram_size;
    let candidates: [Option<(ProbeKind, u64)>; 6] = [
        Some((ProbeKind::Image, layout::IMAGE_IPA)),
        Some((ProbeKind::Dtb, layout::DTB_IPA)),
        // A word inside the page, to check that the offset is carried.
        highest_mapped_page(vm, layout::IMAGE_IPA, ram_end).map(|p| (ProbeKind::Demand, p + 0x7f8)),
        highest_unmapped_page(vm, ram_end).map(|p| (ProbeKind::UnmappedRam, p)),
        Some((ProbeKind::OutsideRam, layout::UNBACKED_IPA)),
        Some((ProbeKind::PastIpaSpace, vm.stage2.ipa_limit())),
    ];
    let mut n = 0;
    for (kind, ipa) in candidates.into_iter().flatten() {
        let Some(p) = HYP_DEBUG_PROBES.probes.get(n) else {
            break;
        };
        record_probe(vm, p, kind, ipa);
        n += 1;
    }
    HYP_DEBUG_PROBES.count.store(n as u64, Ordering::Release);
    hyp_debug_probes_ready();
}

/// Fills `p` with the hypervisor's answer for `ipa`.
fn record_probe(vm: &Vm, p: &Probe, kind: ProbeKind, ipa: u64) {
    let state = match vm.stage2.translate(Ipa(ipa)) {
        Some(t) => {
            p.pa.store(t.pa.as_u64(), Ordering::Relaxed);
            p.level.store(u64::from(t.level), Ordering::Relaxed);
            p.perms.store(u64::from(t.perms.bits()), Ordering::Relaxed);
            p.device
                .store(u64::from(t.memtype == MemType::Device), Ordering::Relaxed);
            ProbeState::Mapped
        }
        // Not mapped: tell an empty slot from a writer's lock.
        None => match vm.stage2.leaf_view(Ipa(ipa)) {
            None => ProbeState::OutsideIpaSpace,
            Some(DescView::Locked) => ProbeState::Locked,
            Some(_) => ProbeState::Invalid,
        },
    };
    p.ipa.store(ipa, Ordering::Relaxed);
    p.kind.store(kind as u64, Ordering::Relaxed);
    p.state.store(state as u64, Ordering::Relaxed);
}

/// Finds the highest valid leaf in `[start, end)`.
struct HighestLeaf(Option<u64>);

impl Visitor for HighestLeaf {
    type Error = Infallible;

    fn visit(&mut self, ctx: &VisitCtx<'_>) -> Result<(), Infallible> {
        if ctx.view().leaf_parts().is_some() {
            // The walk goes in address order: the last one wins. Its last
            // page, for a block.
            self.0 = Some(ctx.ipa.as_u64() + ctx.size() - PAGE_SIZE);
        }
        Ok(())
    }
}

/// The highest mapped page in `[start, end)`: above the image, a page the
/// guest touched (stack, heap, `touch=`), mapped on demand.
fn highest_mapped_page(vm: &Vm, start: u64, end: u64) -> Option<u64> {
    let mut v = HighestLeaf(None);
    match vm
        .stage2
        .walk(Ipa(start), end - start, WalkFlags::LEAF, &mut v)
    {
        Ok(()) => v.0.filter(|&p| p < end),
        Err(never) => match never {},
    }
}

/// The highest page below `end` whose walk ends on an invalid entry
/// (searching at most 4096 pages down).
fn highest_unmapped_page(vm: &Vm, end: u64) -> Option<u64> {
    (1..=4096u64)
        .map(|i| end - i * PAGE_SIZE)
        .take_while(|&p| p >= layout::RAM_BASE)
        .find(|&p| vm.stage2.leaf_view(Ipa(p)) == Some(DescView::Invalid))
}
