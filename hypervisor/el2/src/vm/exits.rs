//! Guest exits: what a trap from EL1 means and what the hypervisor does.
//!
//! Every exit gets an architectural answer: an SMCCC return value, an
//! emulated MMIO access, a mapped page, an abort injected into the guest,
//! or (for a trapped instruction the hypervisor does not emulate) an
//! undefined-instruction exception injected into the guest. Only what
//! cannot be answered stops the VM, with a report and its own exit status,
//! never a panic: an asynchronous exit the VM never enables (SError, IRQ),
//! no host memory left to back a guest page ([`EXIT_VM_OOM`]), or a vCPU
//! that keeps faulting at the same place without progress
//! ([`EXIT_VM_ABORT_LOOP`]).

use super::guest_warn;
use super::mmio::{ConsoleLine, FaultStatus, DABT_ISS};
use super::{
    smccc, spsr_el1h_masked, BackingError, VcpuEnd, Vm, EXIT_VM_ABORT_LOOP, EXIT_VM_ERROR,
    EXIT_VM_OOM,
};
use crate::exceptions::{ExitKind, GuestContext, Syndrome};
use aarch64_cpu::registers::{
    Readable, Writeable, ELR_EL1, ESR_EL1, ESR_EL2, FAR_EL1, FAR_EL2, HPFAR_EL2, SCTLR_EL1,
    SPSR_EL1, SPSR_EL2, VBAR_EL1,
};
use core::sync::atomic::Ordering;
use hyp_abi::layout;
use hyp_core::addr::{Ipa, PAGE_SIZE};
use log::warn;
use tock_registers::LocalRegisterCopy;

/// What the vCPU loop does next.
pub(super) enum Next {
    /// Enter the guest again.
    Resume,
    /// Leave the vCPU loop.
    Stop(VcpuEnd),
}

/// Puts the EL1 system registers in their reset state before a vCPU
/// starts (MMU and caches off, no vectors). SCTLR_EL1's RES1 bits are set
/// (0x30d0_0800: bits 29, 28, 23, 22, 20, 11).
pub(super) fn reset_el1_state() {
    SCTLR_EL1.set(0x30d0_0800);
    VBAR_EL1.set(0);
}

/// Handles one exit of vCPU `index`.
pub(super) fn handle(vm: &Vm, index: usize, ctx: &mut GuestContext, kind: ExitKind) -> Next {
    if kind != ExitKind::Sync {
        stop_vm(vm, index, ctx, format_args!("unexpected {kind:?} exit"));
    }
    let esr_raw = ESR_EL2.get();
    let esr: LocalRegisterCopy<u64, ESR_EL2::Register> = LocalRegisterCopy::new(esr_raw);
    let ec = esr.read_as_enum(ESR_EL2::EC);
    if !matches!(
        ec,
        Some(ESR_EL2::EC::Value::DataAbortLowerEL | ESR_EL2::EC::Value::InstrAbortLowerEL)
    ) {
        vm.vcpus[index].abort_streak.reset();
    }
    match ec {
        Some(ESR_EL2::EC::Value::HVC64) => smccc::handle_hvc(vm, index, ctx),
        Some(ESR_EL2::EC::Value::SMC64) => {
            // A trapped SMC: ELR points at the instruction itself.
            guest_warn!(
                Call,
                "vm0/vcpu{index}: SMC {:#x} at {:#x}: answered NOT_SUPPORTED",
                ctx.x[0] as u32,
                ctx.elr
            );
            ctx.x[0] = hyp_abi::error::NOT_SUPPORTED as u64;
            ctx.skip_instruction();
            Next::Resume
        }
        Some(ESR_EL2::EC::Value::TrappedWFIorWFE) => {
            ctx.skip_instruction();
            Next::Resume
        }
        Some(ESR_EL2::EC::Value::DataAbortLowerEL) => {
            guest_abort(vm, index, ctx, esr.read(ESR_EL2::ISS), false)
        }
        Some(ESR_EL2::EC::Value::InstrAbortLowerEL) => {
            guest_abort(vm, index, ctx, esr.read(ESR_EL2::ISS), true)
        }
        _ => {
            // A trapped instruction or register access the hypervisor does
            // not emulate: architecturally UNDEFINED for the guest.
            vm.stats.injected_undefs.fetch_add(1, Ordering::Relaxed);
            guest_warn!(
                Fault,
                "vm0/vcpu{index}: trapped {} at pc={:#x}: injecting an undefined-instruction exception",
                Syndrome(esr_raw),
                ctx.elr
            );
            inject_undefined(ctx);
            Next::Resume
        }
    }
}

/// Reports an exit the VM cannot continue from and ends the machine.
fn stop_vm(vm: &Vm, index: usize, ctx: &GuestContext, why: core::fmt::Arguments<'_>) -> ! {
    stop_vm_with(vm, index, ctx, EXIT_VM_ERROR, why)
}

/// Injected aborts in a row at the same pc and fault address, with no
/// other exit of the vCPU in between, after which the vCPU counts as stuck
/// in an abort loop. A guest whose handler fixes or skips the access never
/// comes near it; one whose vectors themselves fault reaches it in
/// milliseconds.
pub(super) const ABORT_LOOP_LIMIT: u64 = 10_000;

/// [`stop_vm`] with exit status `code` (see [`Vm::end`]). The statistics
/// and the invariant check come first, so the report shows the
/// hypervisor's state.
fn stop_vm_with(
    vm: &Vm,
    index: usize,
    ctx: &GuestContext,
    code: u8,
    why: core::fmt::Arguments<'_>,
) -> ! {
    vm.end(
        index,
        code,
        Some(format_args!(
            "hyp: vm0/vcpu{index}: {why} at pc={:#x} spsr={:#x} far={:#x}: stopping the VM",
            ctx.elr,
            ctx.spsr,
            FAR_EL2.get()
        )),
    )
}

/// The faulting IPA of a stage-2 abort.
fn fault_ipa() -> Ipa {
    let page = HPFAR_EL2.read(HPFAR_EL2::FIPA) << 12;
    Ipa(page | (FAR_EL2.get() & (PAGE_SIZE - 1)))
}

fn guest_abort(vm: &Vm, index: usize, ctx: &mut GuestContext, iss: u64, instr: bool) -> Next {
    let iss: LocalRegisterCopy<u64, DABT_ISS::Register> = LocalRegisterCopy::new(iss);
    let status = FaultStatus::decode(iss.read(DABT_ISS::DFSC));
    let ipa = fault_ipa();
    let page = ipa.align_down(PAGE_SIZE);
    match status {
        FaultStatus::Translation(_) if vm.in_ram(ipa) => {
            vm.vcpus[index].abort_streak.reset();
            demand_map(vm, index, ctx, page);
            Next::Resume
        }
        FaultStatus::AccessFlag(_) if vm.in_ram(ipa) => {
            vm.vcpus[index].abort_streak.reset();
            vm.stats.af_faults.fetch_add(1, Ordering::Relaxed);
            if !vm.stage2.set_access_flag(page) {
                // Unmapped between the fault and now: the retry faults again.
                warn!("vm0/vcpu{index}: AF fault at {ipa} but no leaf any more");
            }
            Next::Resume
        }
        FaultStatus::Translation(_) if !instr && is_uart(ipa) => {
            vm.vcpus[index].abort_streak.reset();
            emulate_uart(vm, index, ctx, iss, ipa);
            Next::Resume
        }
        _ => {
            let what = if instr {
                "instruction fetch"
            } else {
                "data access"
            };
            guest_warn!(
                Fault,
                "vm0/vcpu{index}: {what} at IPA {ipa} ({status:?}) pc={:#x} is outside RAM and devices: injecting a synchronous external abort",
                ctx.elr
            );
            vm.stats.injected_aborts.fetch_add(1, Ordering::Relaxed);
            let far = FAR_EL2.get();
            let streak = vm.vcpus[index].abort_streak.note(ctx.elr, far);
            if streak >= ABORT_LOOP_LIMIT {
                stop_vm_with(
                    vm,
                    index,
                    ctx,
                    EXIT_VM_ABORT_LOOP,
                    format_args!(
                        "abort loop: {streak} synchronous external aborts in a row at the same pc and address ({what} at IPA {ipa}) with no other exit: the guest cannot handle them"
                    ),
                );
            }
            inject_external_abort(ctx, instr, far);
            Next::Resume
        }
    }
}

fn is_uart(ipa: Ipa) -> bool {
    ipa.as_u64() >= layout::UART_IPA && ipa.as_u64() - layout::UART_IPA < layout::UART_SIZE
}

/// Backs `page` with a zeroed frame, unless another vCPU did meanwhile.
fn demand_map(vm: &Vm, index: usize, ctx: &GuestContext, page: Ipa) {
    vm.stats.stage2_faults.fetch_add(1, Ordering::Relaxed);
    match vm.install_zeroed(page) {
        Ok(true) => {}
        // Mapped by another vCPU meanwhile, or being moved: the guest
        // retries the access.
        Ok(false) => {
            vm.stats.fault_races.fetch_add(1, Ordering::Relaxed);
        }
        Err(BackingError::OutOfMemory) => {
            let f = &crate::memory::HYP_FRAMES;
            stop_vm_with(
                vm,
                index,
                ctx,
                EXIT_VM_OOM,
                format_args!(
                    "out of memory: no host frame left to back guest page {page} (guest RAM {} MiB{}; host frames: total={} free={} guest={} tables={} store={}); the guest's resident set does not fit",
                    vm.ram_size >> 20,
                    if vm.overcommit { ", overcommitted" } else { "" },
                    f.total.load(Ordering::Relaxed),
                    f.free.load(Ordering::Relaxed),
                    f.guest.load(Ordering::Relaxed),
                    f.table.load(Ordering::Relaxed),
                    f.store.load(Ordering::Relaxed),
                ),
            )
        }
        Err(e) => stop_vm(
            vm,
            index,
            ctx,
            format_args!("cannot back guest page {page}: {e}"),
        ),
    }
}

fn emulate_uart(
    vm: &Vm,
    index: usize,
    ctx: &mut GuestContext,
    iss: LocalRegisterCopy<u64, DABT_ISS::Register>,
    ipa: Ipa,
) {
    if !iss.is_set(DABT_ISS::ISV) {
        guest_warn!(Fault, "vm0/vcpu{index}: UART access at {ipa} without a valid syndrome (pc={:#x}): injecting an abort", ctx.elr);
        vm.stats.injected_aborts.fetch_add(1, Ordering::Relaxed);
        inject_external_abort(ctx, false, FAR_EL2.get());
        return;
    }
    let offset = ipa.as_u64() - layout::UART_IPA;
    let reg = iss.read(DABT_ISS::SRT) as usize;
    if iss.is_set(DABT_ISS::WNR) {
        let value = if reg == 31 { 0 } else { ctx.x[reg] };
        vm.vcpus[index].console.lock().write(index, offset, value);
    } else if reg != 31 {
        ctx.x[reg] = ConsoleLine::READ_VALUE;
    }
    ctx.skip_instruction();
}

/// Vector offsets in VBAR_EL1.
const VECTOR_CURRENT_SP0: u64 = 0x000;
const VECTOR_CURRENT_SPX: u64 = 0x200;
const VECTOR_LOWER_A64: u64 = 0x400;
/// Fault status code of a synchronous external abort.
const FSC_SYNC_EXTERNAL_ABORT: u64 = 0b01_0000;

/// Delivers a synchronous external abort to the guest's EL1 vectors, as
/// the hardware would for an access nothing answers.
fn inject_external_abort(ctx: &mut GuestContext, instr: bool, far: u64) {
    let same_el = exception_target(ctx).0;
    let ec = match (instr, same_el) {
        (false, true) => ESR_EL1::EC::Value::DataAbortCurrentEL,
        (false, false) => ESR_EL1::EC::Value::DataAbortLowerEL,
        (true, true) => ESR_EL1::EC::Value::InstrAbortCurrentEL,
        (true, false) => ESR_EL1::EC::Value::InstrAbortLowerEL,
    };
    FAR_EL1.set(far);
    inject_sync(ctx, ec as u64, FSC_SYNC_EXTERNAL_ABORT);
}

/// Delivers an undefined-instruction exception (EC 0, "unknown reason")
/// for the instruction at the guest's PC, as for an instruction that is
/// UNDEFINED at EL1.
fn inject_undefined(ctx: &mut GuestContext) {
    inject_sync(ctx, ESR_EL1::EC::Value::Unknown as u64, 0);
}

/// Whether an exception taken now is from the current EL (EL1) and the
/// vector offset it uses.
fn exception_target(ctx: &GuestContext) -> (bool, u64) {
    let spsr: LocalRegisterCopy<u64, SPSR_EL2::Register> = LocalRegisterCopy::new(ctx.spsr);
    match spsr.read_as_enum(SPSR_EL2::M) {
        Some(SPSR_EL2::M::Value::EL0t) => (false, VECTOR_LOWER_A64),
        Some(SPSR_EL2::M::Value::EL1t) => (true, VECTOR_CURRENT_SP0),
        _ => (true, VECTOR_CURRENT_SPX),
    }
}

/// Takes a synchronous exception with class `ec` and syndrome `iss` to the
/// guest's EL1 vectors at the guest's PC (ELR_EL2 points at the faulting
/// or trapped instruction).
fn inject_sync(ctx: &mut GuestContext, ec: u64, iss: u64) {
    let offset = exception_target(ctx).1;
    ESR_EL1.write(ESR_EL1::EC.val(ec) + ESR_EL1::IL::SET + ESR_EL1::ISS.val(iss));
    ELR_EL1.set(ctx.elr);
    SPSR_EL1.set(ctx.spsr);
    ctx.elr = VBAR_EL1.get() + offset;
    ctx.spsr = spsr_el1h_masked();
}
