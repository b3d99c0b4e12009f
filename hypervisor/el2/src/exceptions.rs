//! EL2 exception vectors (`exceptions.S`) and the fatal-exception report.
//!
//! The hypervisor never expects an exception from EL2 itself: one means a
//! bug (or the `fault=el2` test), so it is decoded, printed as one block,
//! and the machine stops with [`EXIT_EXCEPTION`](crate::power::EXIT_EXCEPTION).
//! Exceptions from EL1 are guest exits and end up in `vcpu_run`'s caller.

use aarch64_cpu::registers::{Readable, Writeable, ESR_EL2, FAR_EL2, VBAR_EL2};
use core::fmt;
use tock_registers::LocalRegisterCopy;

/// Registers saved by `el2_trap_common`.
#[repr(C)]
#[derive(Debug)]
pub struct TrapFrame {
    /// x0..x30.
    pub x: [u64; 31],
    /// ELR_EL2: where the exception was taken.
    pub elr: u64,
    /// SPSR_EL2: the interrupted PSTATE.
    pub spsr: u64,
    /// The stack pointer before the exception.
    pub sp: u64,
}

/// The general-purpose, FP/SIMD and return state of a guest vCPU, switched
/// by `vcpu_run` and the exit path in `exceptions.S`.
#[repr(C, align(16))]
#[derive(Debug, Clone)]
pub struct GuestContext {
    /// x0..x30.
    pub x: [u64; 31],
    /// Guest PC (ELR_EL2 on exit/entry).
    pub elr: u64,
    /// Guest PSTATE (SPSR_EL2 on exit/entry).
    pub spsr: u64,
    _pad: u64,
    /// q0..q31 as pairs of u64, then FPCR, FPSR.
    pub fp: [u64; 66],
}

impl GuestContext {
    /// A context that enters at `pc` in `spsr` with `x0 = arg`.
    pub fn new(pc: u64, spsr: u64, arg: u64) -> Self {
        let mut x = [0; 31];
        x[0] = arg;
        Self {
            x,
            elr: pc,
            spsr,
            _pad: 0,
            fp: [0; 66],
        }
    }

    /// Resumes after the trapped instruction (A64: always 4 bytes).
    pub fn skip_instruction(&mut self) {
        self.elr += 4;
    }
}

/// Why `vcpu_run` returned: the vector the guest exit came through.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ExitKind {
    /// Synchronous exception (HVC, SMC, abort, trapped instruction...).
    Sync,
    /// IRQ.
    Irq,
    /// FIQ.
    Fiq,
    /// SError.
    SError,
    /// An exception from AArch32, which the VM never enables.
    AArch32(u64),
}

impl ExitKind {
    fn from_raw(raw: u64) -> Self {
        match raw {
            0 => Self::Sync,
            1 => Self::Irq,
            2 => Self::Fiq,
            3 => Self::SError,
            other => Self::AArch32(other),
        }
    }
}

core::arch::global_asm!(
    include_str!("exceptions.S"),
    frame_size = const core::mem::size_of::<TrapFrame>(),
    el2_exception = sym el2_exception,
    ctx_elr = const core::mem::offset_of!(GuestContext, elr),
    ctx_fp = const core::mem::offset_of!(GuestContext, fp),
);

extern "C" {
    static el2_vectors: u8;
    fn vcpu_run(ctx: *mut GuestContext) -> u64;
}

/// Runs the guest described by `ctx` on this CPU until it exits.
///
/// # Safety
/// Stage 2, `HCR_EL2` and the guest's EL1 state must be set up so that the
/// guest cannot reach hypervisor memory; `ctx` must describe an EL1 state.
pub unsafe fn enter_guest(ctx: &mut GuestContext) -> ExitKind {
    // SAFETY: `vcpu_run` saves and restores every callee-saved register and
    // the stack pointer, and only touches `*ctx`, which we borrow mutably;
    // the caller guarantees the guest is confined by stage 2.
    ExitKind::from_raw(unsafe { vcpu_run(ctx) })
}

/// Points `VBAR_EL2` at the vectors of `exceptions.S` (each CPU, at boot).
pub fn install_vectors() {
    let base = core::ptr::addr_of!(el2_vectors) as u64;
    VBAR_EL2.set(base);
    aarch64_cpu::asm::barrier::isb(aarch64_cpu::asm::barrier::SY);
}

/// A decoded ESR, for reports.
pub struct Syndrome(pub u64);

impl fmt::Display for Syndrome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let esr: LocalRegisterCopy<u64, ESR_EL2::Register> = LocalRegisterCopy::new(self.0);
        let ec = esr.read(ESR_EL2::EC);
        let name = match esr.read_as_enum(ESR_EL2::EC) {
            Some(ESR_EL2::EC::Value::Unknown) => "unknown reason",
            Some(ESR_EL2::EC::Value::TrappedWFIorWFE) => "WFI/WFE",
            Some(ESR_EL2::EC::Value::TrappedFP) => "FP/SIMD access trapped",
            Some(ESR_EL2::EC::Value::IllegalExecutionState) => "illegal execution state",
            Some(ESR_EL2::EC::Value::HVC64) => "HVC (AArch64)",
            Some(ESR_EL2::EC::Value::SMC64) => "SMC (AArch64)",
            Some(ESR_EL2::EC::Value::TrappedMsrMrs) => "MSR/MRS/system instruction",
            Some(ESR_EL2::EC::Value::InstrAbortLowerEL) => "instruction abort from lower EL",
            Some(ESR_EL2::EC::Value::InstrAbortCurrentEL) => "instruction abort from EL2",
            Some(ESR_EL2::EC::Value::PCAlignmentFault) => "PC alignment fault",
            Some(ESR_EL2::EC::Value::DataAbortLowerEL) => "data abort from lower EL",
            Some(ESR_EL2::EC::Value::DataAbortCurrentEL) => "data abort from EL2",
            Some(ESR_EL2::EC::Value::SPAlignmentFault) => "SP alignment fault",
            Some(ESR_EL2::EC::Value::SError) => "SError",
            Some(ESR_EL2::EC::Value::Brk64) => "BRK",
            _ => "other",
        };
        write!(
            f,
            "esr={:#x} ec={:#04x} ({}) il={} iss={:#x}",
            self.0,
            ec,
            name,
            esr.read(ESR_EL2::IL),
            esr.read(ESR_EL2::ISS)
        )
    }
}

const KIND_NAMES: [&str; 8] = [
    "sync (SP_EL0)",
    "irq (SP_EL0)",
    "fiq (SP_EL0)",
    "serror (SP_EL0)",
    "sync",
    "irq",
    "fiq",
    "serror",
];

/// Rust side of the EL2 vectors: reports and stops the machine.
extern "C" fn el2_exception(frame: &TrapFrame, kind: u64) -> ! {
    let kind_name = KIND_NAMES.get(kind as usize).copied().unwrap_or("?");
    crate::power::fatal(
        crate::power::EXIT_EXCEPTION,
        format_args!(
            "hyp: FATAL unexpected EL2 exception on cpu{} kind={}: {}\n  far={:#018x} elr={:#018x} spsr={:#x} sp={:#x} x0={:#x} x1={:#x} x30={:#x}",
            crate::boot::cpu_index(),
            kind_name,
            Syndrome(ESR_EL2.get()),
            FAR_EL2.get(),
            frame.elr,
            frame.spsr,
            frame.sp,
            frame.x[0],
            frame.x[1],
            frame.x[30],
        ),
    )
}
