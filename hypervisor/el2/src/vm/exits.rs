//! Guest exits: what a trap from EL1 means and what the hypervisor does.
//!
//! Every exit gets an architectural answer: an SMCCC return value, an
//! emulated MMIO access, a mapped page, or an abort injected into the
//! guest. Only an exit that cannot be answered (an SError, an exception
//! class the VM never enables) stops the VM — with a report, never a panic.

use super::mmio::{ConsoleLine, FaultStatus, DABT_ISS};
use super::{smccc, spsr_el1h_masked, VcpuEnd, Vm, EXIT_VM_ERROR};
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
    match esr.read_as_enum(ESR_EL2::EC) {
        Some(ESR_EL2::EC::Value::HVC64) => smccc::handle_hvc(vm, index, ctx),
        Some(ESR_EL2::EC::Value::SMC64) => {
            // A trapped SMC: ELR points at the instruction itself.
            warn!(
                "vm0/vcpu{index}: SMC {:#x} at {:#x}: answered NOT_SUPPORTED",
                ctx.x[0] as u32, ctx.elr
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
        _ => stop_vm(
            vm,
            index,
            ctx,
            format_args!("unexpected exit: {}", Syndrome(esr_raw)),
        ),
    }
}

/// Reports an exit the VM cannot continue from and ends the machine.
fn stop_vm(vm: &Vm, index: usize, ctx: &GuestContext, why: core::fmt::Arguments<'_>) -> ! {
    vm.print_stats();
    crate::power::fatal(
        EXIT_VM_ERROR,
        format_args!(
            "hyp: vm0/vcpu{index}: {why} at pc={:#x} spsr={:#x} far={:#x}: stopping the VM",
            ctx.elr,
            ctx.spsr,
            FAR_EL2.get()
        ),
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
            demand_map(vm, index, ctx, page);
            Next::Resume
        }
        FaultStatus::AccessFlag(_) if vm.in_ram(ipa) => {
            vm.stats.af_faults.fetch_add(1, Ordering::Relaxed);
            if !vm.stage2.set_access_flag(page) {
                // Unmapped between the fault and now: the retry faults again.
                warn!("vm0/vcpu{index}: AF fault at {ipa} but no leaf any more");
            }
            Next::Resume
        }
        FaultStatus::Translation(_) if !instr && is_uart(ipa) => {
            emulate_uart(vm, index, ctx, iss, ipa);
            Next::Resume
        }
        _ => {
            let what = if instr {
                "instruction fetch"
            } else {
                "data access"
            };
            warn!(
                "vm0/vcpu{index}: {what} at IPA {ipa} ({status:?}) pc={:#x} is outside RAM and devices: injecting a synchronous external abort",
                ctx.elr
            );
            vm.stats.injected_aborts.fetch_add(1, Ordering::Relaxed);
            inject_external_abort(ctx, instr, FAR_EL2.get());
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
        warn!("vm0/vcpu{index}: UART access at {ipa} without a valid syndrome (pc={:#x}): injecting an abort", ctx.elr);
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
    let spsr: LocalRegisterCopy<u64, SPSR_EL2::Register> = LocalRegisterCopy::new(ctx.spsr);
    let (same_el, offset) = match spsr.read_as_enum(SPSR_EL2::M) {
        Some(SPSR_EL2::M::Value::EL0t) => (false, VECTOR_LOWER_A64),
        Some(SPSR_EL2::M::Value::EL1t) => (true, VECTOR_CURRENT_SP0),
        _ => (true, VECTOR_CURRENT_SPX),
    };
    let ec = match (instr, same_el) {
        (false, true) => ESR_EL1::EC::Value::DataAbortCurrentEL,
        (false, false) => ESR_EL1::EC::Value::DataAbortLowerEL,
        (true, true) => ESR_EL1::EC::Value::InstrAbortCurrentEL,
        (true, false) => ESR_EL1::EC::Value::InstrAbortLowerEL,
    };
    ESR_EL1.write(
        ESR_EL1::EC.val(ec as u64) + ESR_EL1::IL::SET + ESR_EL1::ISS.val(FSC_SYNC_EXTERNAL_ABORT),
    );
    FAR_EL1.set(far);
    ELR_EL1.set(ctx.elr);
    SPSR_EL1.set(ctx.spsr);
    ctx.elr = VBAR_EL1.get() + offset;
    ctx.spsr = spsr_el1h_masked();
}
