//! Exception vectors (`VBAR_EL1`), the trap frame and the fault policy.
//!
//! Every vector saves the complete interrupted context (general-purpose
//! registers, `ELR_EL1`/`SPSR_EL1`, FP/SIMD registers and their control
//! registers) in a [`TrapFrame`] on the current stack and calls
//! [`handle_exception`]; the context is restored from the frame on return,
//! so a handler may resume the interrupted code transparently.
//!
//! Policy: the only exceptions the kernel survives are those the code
//! announced beforehand with [`with_expected`] (see [`Expected`]): a
//! synchronous external abort on a data access (how the hypervisor answers
//! an access outside RAM and devices), or an Undefined Instruction
//! exception (`ESR_EL1.EC` = 0, e.g. an unimplemented system register).
//! It is recorded and the faulting instruction is skipped. The hostile
//! suite's probes announce exceptions differently, with [`with_probe`]: a
//! per-CPU window that absorbs any synchronous exception taken at one pc
//! (the caller asserts on what it was). Anything else is
//! reported (class, syndrome, `FAR_EL1`, `ELR_EL1`) and ends the machine
//! with [`ExitCode::UnhandledException`]. Interrupts stay masked: the
//! kernel uses none.

use core::fmt;
use core::mem::{offset_of, size_of};
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};

use aarch64_cpu::registers::{Readable, ESR_EL1, FAR_EL1, SPSR_EL1};
use tock_registers::{register_bitfields, LocalRegisterCopy};

use crate::addr::PhysAddr;
use crate::power::{self, ExitCode};
use crate::smp::Mpidr;

/// The interrupted context, as saved by the vector code.
#[repr(C)]
pub struct TrapFrame {
    /// `x0`..`x30`.
    pub x: [u64; 31],
    /// Return address (`ELR_EL1`): the faulting instruction for synchronous
    /// aborts.
    pub elr: u64,
    /// Saved `PSTATE` (`SPSR_EL1`).
    pub spsr: u64,
    fpsr: u64,
    fpcr: u64,
    _pad: u64,
    q: [u128; 32],
}

const FRAME_SIZE: usize = size_of::<TrapFrame>();
// The assembly stores x0..x30 in pairs from offset 0 and stores ELR/SPSR
// and FPSR/FPCR with single `stp`s.
const _: () = {
    assert!(offset_of!(TrapFrame, x) == 0);
    assert!(offset_of!(TrapFrame, spsr) == offset_of!(TrapFrame, elr) + 8);
    assert!(offset_of!(TrapFrame, fpcr) == offset_of!(TrapFrame, fpsr) + 8);
    assert!(offset_of!(TrapFrame, q).is_multiple_of(16));
    assert!(FRAME_SIZE.is_multiple_of(16) && FRAME_SIZE < 4096);
};

#[cfg(target_arch = "aarch64")]
core::arch::global_asm!(
    r#"
.macro GUEST_VECTOR kind
    .balign 0x80
    sub     sp, sp, #{frame_size}
    stp     x0, x1, [sp]
    mov     x0, #\kind
    b       guest_exception_common
.endm

    .section .text.vectors, "ax"
    .balign 0x800
    .global guest_exception_vectors
guest_exception_vectors:
    GUEST_VECTOR 0
    GUEST_VECTOR 1
    GUEST_VECTOR 2
    GUEST_VECTOR 3
    GUEST_VECTOR 4
    GUEST_VECTOR 5
    GUEST_VECTOR 6
    GUEST_VECTOR 7
    GUEST_VECTOR 8
    GUEST_VECTOR 9
    GUEST_VECTOR 10
    GUEST_VECTOR 11
    GUEST_VECTOR 12
    GUEST_VECTOR 13
    GUEST_VECTOR 14
    GUEST_VECTOR 15

    .balign 0x80
guest_exception_common:
    stp     x2, x3, [sp, #16]
    stp     x4, x5, [sp, #32]
    stp     x6, x7, [sp, #48]
    stp     x8, x9, [sp, #64]
    stp     x10, x11, [sp, #80]
    stp     x12, x13, [sp, #96]
    stp     x14, x15, [sp, #112]
    stp     x16, x17, [sp, #128]
    stp     x18, x19, [sp, #144]
    stp     x20, x21, [sp, #160]
    stp     x22, x23, [sp, #176]
    stp     x24, x25, [sp, #192]
    stp     x26, x27, [sp, #208]
    stp     x28, x29, [sp, #224]
    str     x30, [sp, #240]
    mrs     x2, elr_el1
    mrs     x3, spsr_el1
    stp     x2, x3, [sp, #{off_elr}]
    mrs     x2, fpsr
    mrs     x3, fpcr
    stp     x2, x3, [sp, #{off_fpsr}]
    add     x2, sp, #{off_q}
    stp     q0, q1, [x2, #0]
    stp     q2, q3, [x2, #32]
    stp     q4, q5, [x2, #64]
    stp     q6, q7, [x2, #96]
    stp     q8, q9, [x2, #128]
    stp     q10, q11, [x2, #160]
    stp     q12, q13, [x2, #192]
    stp     q14, q15, [x2, #224]
    stp     q16, q17, [x2, #256]
    stp     q18, q19, [x2, #288]
    stp     q20, q21, [x2, #320]
    stp     q22, q23, [x2, #352]
    stp     q24, q25, [x2, #384]
    stp     q26, q27, [x2, #416]
    stp     q28, q29, [x2, #448]
    stp     q30, q31, [x2, #480]

    mov     x1, x0
    mov     x0, sp
    bl      {handler}

    add     x2, sp, #{off_q}
    ldp     q0, q1, [x2, #0]
    ldp     q2, q3, [x2, #32]
    ldp     q4, q5, [x2, #64]
    ldp     q6, q7, [x2, #96]
    ldp     q8, q9, [x2, #128]
    ldp     q10, q11, [x2, #160]
    ldp     q12, q13, [x2, #192]
    ldp     q14, q15, [x2, #224]
    ldp     q16, q17, [x2, #256]
    ldp     q18, q19, [x2, #288]
    ldp     q20, q21, [x2, #320]
    ldp     q22, q23, [x2, #352]
    ldp     q24, q25, [x2, #384]
    ldp     q26, q27, [x2, #416]
    ldp     q28, q29, [x2, #448]
    ldp     q30, q31, [x2, #480]
    ldp     x2, x3, [sp, #{off_fpsr}]
    msr     fpsr, x2
    msr     fpcr, x3
    ldp     x2, x3, [sp, #{off_elr}]
    msr     elr_el1, x2
    msr     spsr_el1, x3
    ldp     x0, x1, [sp, #0]
    ldp     x2, x3, [sp, #16]
    ldp     x4, x5, [sp, #32]
    ldp     x6, x7, [sp, #48]
    ldp     x8, x9, [sp, #64]
    ldp     x10, x11, [sp, #80]
    ldp     x12, x13, [sp, #96]
    ldp     x14, x15, [sp, #112]
    ldp     x16, x17, [sp, #128]
    ldp     x18, x19, [sp, #144]
    ldp     x20, x21, [sp, #160]
    ldp     x22, x23, [sp, #176]
    ldp     x24, x25, [sp, #192]
    ldp     x26, x27, [sp, #208]
    ldp     x28, x29, [sp, #224]
    ldr     x30, [sp, #240]
    add     sp, sp, #{frame_size}
    eret
    "#,
    frame_size = const FRAME_SIZE,
    off_elr = const offset_of!(TrapFrame, elr),
    off_fpsr = const offset_of!(TrapFrame, fpsr),
    off_q = const offset_of!(TrapFrame, q),
    handler = sym handle_exception,
);

register_bitfields! {u64,
    /// ISS of a data or instruction abort (`ESR_ELx.EC` = 0x20, 0x21, 0x24,
    /// 0x25). The fields other than `FSC`, `FNV`, `EA` and `S1PTW` are only
    /// defined for data aborts.
    pub ABORT_ISS [
        /// Instruction syndrome valid (`SAS`..`AR`).
        ISV OFFSET(24) NUMBITS(1) [],
        /// Access size.
        SAS OFFSET(22) NUMBITS(2) [
            Byte = 0b00,
            Halfword = 0b01,
            Word = 0b10,
            Doubleword = 0b11
        ],
        /// Transfer register.
        SRT OFFSET(16) NUMBITS(5) [],
        /// `FAR` not valid.
        FNV OFFSET(10) NUMBITS(1) [],
        /// External abort type.
        EA OFFSET(9) NUMBITS(1) [],
        /// Fault on a stage-2 walk of a stage-1 table.
        S1PTW OFFSET(7) NUMBITS(1) [],
        /// Write not read.
        WNR OFFSET(6) NUMBITS(1) [],
        /// Data (or instruction) fault status code.
        FSC OFFSET(0) NUMBITS(6) [
            AddressSizeLevel0 = 0b00_0000,
            AddressSizeLevel1 = 0b00_0001,
            AddressSizeLevel2 = 0b00_0010,
            AddressSizeLevel3 = 0b00_0011,
            TranslationLevel0 = 0b00_0100,
            TranslationLevel1 = 0b00_0101,
            TranslationLevel2 = 0b00_0110,
            TranslationLevel3 = 0b00_0111,
            AccessFlagLevel1 = 0b00_1001,
            AccessFlagLevel2 = 0b00_1010,
            AccessFlagLevel3 = 0b00_1011,
            PermissionLevel1 = 0b00_1101,
            PermissionLevel2 = 0b00_1110,
            PermissionLevel3 = 0b00_1111,
            SynchronousExternalAbort = 0b01_0000,
            SynchronousExternalAbortWalkLevel0 = 0b01_0100,
            SynchronousExternalAbortWalkLevel1 = 0b01_0101,
            SynchronousExternalAbortWalkLevel2 = 0b01_0110,
            SynchronousExternalAbortWalkLevel3 = 0b01_0111,
            Alignment = 0b10_0001,
            TlbConflict = 0b11_0000
        ]
    ]
}

/// Which vector was taken: where the exception came from.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Current EL, using `SP_EL0`.
    CurrentElSp0,
    /// Current EL, using `SP_EL1` (the kernel's normal state).
    CurrentElSpx,
    /// EL0 in AArch64.
    LowerElAarch64,
    /// EL0 in AArch32.
    LowerElAarch32,
}

/// Which vector was taken: the type of exception.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Synchronous exception.
    Synchronous,
    /// IRQ.
    Irq,
    /// FIQ.
    Fiq,
    /// SError (asynchronous abort).
    SError,
}

/// Decodes the vector number (0..16) the assembly passes to the handler.
fn decode_vector(vector: u64) -> (Origin, Kind) {
    let origin = match vector / 4 {
        0 => Origin::CurrentElSp0,
        1 => Origin::CurrentElSpx,
        2 => Origin::LowerElAarch64,
        _ => Origin::LowerElAarch32,
    };
    let kind = match vector % 4 {
        0 => Kind::Synchronous,
        1 => Kind::Irq,
        2 => Kind::Fiq,
        _ => Kind::SError,
    };
    (origin, kind)
}

/// A synchronous exception (an abort, or an Undefined Instruction
/// exception), as the handler saw it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct AbortRecord {
    /// `ESR_EL1`.
    pub esr: u64,
    /// `FAR_EL1` (meaningful only when `FNV` is clear).
    pub far: u64,
    /// Address of the faulting instruction.
    pub elr: u64,
}

impl AbortRecord {
    /// The exception class, if it is one `aarch64-cpu` knows.
    pub fn class(&self) -> Option<ESR_EL1::EC::Value> {
        LocalRegisterCopy::<u64, ESR_EL1::Register>::new(self.esr).read_as_enum(ESR_EL1::EC)
    }

    /// The abort-specific syndrome.
    pub fn iss(&self) -> LocalRegisterCopy<u64, ABORT_ISS::Register> {
        LocalRegisterCopy::new(
            LocalRegisterCopy::<u64, ESR_EL1::Register>::new(self.esr).read(ESR_EL1::ISS),
        )
    }

    /// Whether this is a synchronous external abort on a data access taken
    /// from the current EL: what the hypervisor injects for an access it
    /// cannot back.
    pub fn is_data_external_abort(&self) -> bool {
        matches!(self.class(), Some(ESR_EL1::EC::Value::DataAbortCurrentEL))
            && matches!(
                self.iss().read_as_enum(ABORT_ISS::FSC),
                Some(ABORT_ISS::FSC::Value::SynchronousExternalAbort)
            )
    }

    /// Whether this is an Undefined Instruction exception taken from the
    /// current EL (`ESR_EL1.EC` = 0, "Unknown reason"): what an EL1 access
    /// to an unimplemented system register raises.
    pub fn is_undefined(&self) -> bool {
        matches!(self.class(), Some(ESR_EL1::EC::Value::Unknown))
    }

    /// Whether this is a level-3 translation fault on a data access taken
    /// from the current EL: an access to a page unmapped in stage 1 (an
    /// evicted page of the pageable arena).
    pub fn is_translation_fault_at_current_el(&self) -> bool {
        matches!(self.class(), Some(ESR_EL1::EC::Value::DataAbortCurrentEL))
            && matches!(
                self.iss().read_as_enum(ABORT_ISS::FSC),
                Some(ABORT_ISS::FSC::Value::TranslationLevel3)
            )
    }

    /// `FAR_EL1`, when the syndrome says it is valid.
    pub fn fault_address(&self) -> Option<PhysAddr> {
        (!self.iss().is_set(ABORT_ISS::FNV)).then_some(PhysAddr(self.far))
    }
}

impl fmt::Display for AbortRecord {
    /// One compact line (the hypervisor's console wraps lines at 200
    /// bytes): `ESR=.. EC=.. FSC=.. FAR=.. ELR=..` (no `FSC`/`FAR` for an
    /// Undefined Instruction exception).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ESR={:#x} ", self.esr)?;
        match self.class() {
            Some(ec) => write!(f, "EC={ec:?}")?,
            None => write!(f, "EC=unknown")?,
        }
        // FSC and FAR mean nothing for an Undefined Instruction exception.
        if !self.is_undefined() {
            let iss = self.iss();
            match iss.read_as_enum::<ABORT_ISS::FSC::Value>(ABORT_ISS::FSC) {
                Some(fsc) => write!(f, " FSC={fsc:?}")?,
                None => write!(f, " FSC={:#04x}", iss.read(ABORT_ISS::FSC))?,
            }
            match self.fault_address() {
                Some(far) => write!(f, " FAR={:#x}", far.as_u64())?,
                None => f.write_str(" FAR=invalid")?,
            }
        }
        write!(f, " ELR={:#x}", self.elr)
    }
}

/// An exception the code announces before provoking it ([`with_expected`]).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Expected {
    /// A synchronous external abort on a data access to this IPA (`FAR_EL1`
    /// must match it when the syndrome says it is valid).
    DataExternalAbort(PhysAddr),
    /// An Undefined Instruction exception (`ESR_EL1.EC` = 0) raised by the
    /// instruction at this address, or with `None` by whichever instruction
    /// raises the next one on this CPU.
    Undefined(Option<u64>),
}

/// [`ExpectedSlot::kind`] values.
const KIND_DATA_EXTERNAL_ABORT: u8 = 0;
const KIND_UNDEFINED_AT: u8 = 1;
const KIND_UNDEFINED_NEXT: u8 = 2;

/// The single expected-exception slot. At most one CPU arms it at a time
/// ([`SLOT_OWNER`]); the handler on that CPU consumes it. All fields are
/// accessed with sequentially consistent atomics: the slot is armed and
/// read on the same CPU as the exception, so ordering only has to hold
/// against that CPU's own exception entry and return, which are context
/// synchronizing.
struct ExpectedSlot {
    armed: AtomicBool,
    /// `KIND_*`: which [`Expected`] variant is armed.
    kind: AtomicU8,
    /// The IPA of a `DataExternalAbort`, the PC of an `Undefined(Some(_))`.
    target: AtomicU64,
    cpu: AtomicU64,
    taken: AtomicBool,
    esr: AtomicU64,
    far: AtomicU64,
    elr: AtomicU64,
}

static SLOT: ExpectedSlot = ExpectedSlot {
    armed: AtomicBool::new(false),
    kind: AtomicU8::new(KIND_DATA_EXTERNAL_ABORT),
    target: AtomicU64::new(0),
    cpu: AtomicU64::new(0),
    taken: AtomicBool::new(false),
    esr: AtomicU64::new(0),
    far: AtomicU64::new(0),
    elr: AtomicU64::new(0),
};

/// Serializes users of [`SLOT`].
static SLOT_OWNER: spin::Mutex<()> = spin::Mutex::new(());

/// Runs `access`, which is expected to take a synchronous external abort
/// on a data access to `ipa`: [`with_expected`] with
/// [`Expected::DataExternalAbort`].
pub fn with_expected_abort<R>(
    ipa: PhysAddr,
    access: impl FnOnce() -> R,
) -> (R, Option<AbortRecord>) {
    with_expected(Expected::DataExternalAbort(ipa), access)
}

/// Runs `access`, which is expected to raise the synchronous exception
/// `expected` on this CPU. Such an exception is recorded, the faulting
/// instruction skipped, and the record returned alongside `access`'s result
/// (which is then whatever the skipped instruction left in its destination
/// register: its old value). `None` if no such exception happened. At most
/// one exception is absorbed; any other one is fatal as usual.
pub fn with_expected<R>(
    expected: Expected,
    access: impl FnOnce() -> R,
) -> (R, Option<AbortRecord>) {
    let (kind, target) = match expected {
        Expected::DataExternalAbort(ipa) => (KIND_DATA_EXTERNAL_ABORT, ipa.as_u64()),
        Expected::Undefined(Some(pc)) => (KIND_UNDEFINED_AT, pc),
        Expected::Undefined(None) => (KIND_UNDEFINED_NEXT, 0),
    };
    let _owner = SLOT_OWNER.lock();
    SLOT.taken.store(false, Ordering::SeqCst);
    SLOT.kind.store(kind, Ordering::SeqCst);
    SLOT.target.store(target, Ordering::SeqCst);
    SLOT.cpu.store(Mpidr::current().as_u64(), Ordering::SeqCst);
    SLOT.armed.store(true, Ordering::SeqCst);
    let result = access();
    SLOT.armed.store(false, Ordering::SeqCst);
    let record = SLOT.taken.load(Ordering::SeqCst).then(|| AbortRecord {
        esr: SLOT.esr.load(Ordering::SeqCst),
        far: SLOT.far.load(Ordering::SeqCst),
        elr: SLOT.elr.load(Ordering::SeqCst),
    });
    (result, record)
}

/// Consumes the expected-exception slot if `exception` is the one it
/// announced.
fn take_expected(exception: &AbortRecord) -> bool {
    if !SLOT.armed.load(Ordering::SeqCst)
        || SLOT.cpu.load(Ordering::SeqCst) != Mpidr::current().as_u64()
    {
        return false;
    }
    let target = SLOT.target.load(Ordering::SeqCst);
    let announced = match SLOT.kind.load(Ordering::SeqCst) {
        KIND_DATA_EXTERNAL_ABORT => {
            exception.is_data_external_abort()
                && exception
                    .fault_address()
                    .is_none_or(|far| far.as_u64() == target)
        }
        KIND_UNDEFINED_AT => exception.is_undefined() && exception.elr == target,
        KIND_UNDEFINED_NEXT => exception.is_undefined(),
        _ => false,
    };
    if !announced {
        return false;
    }
    SLOT.esr.store(exception.esr, Ordering::SeqCst);
    SLOT.far.store(exception.far, Ordering::SeqCst);
    SLOT.elr.store(exception.elr, Ordering::SeqCst);
    SLOT.taken.store(true, Ordering::SeqCst);
    SLOT.armed.store(false, Ordering::SeqCst);
    true
}

/// Where a [`with_probe`] window resumes after the exception it absorbed.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ProbeResume {
    /// At the instruction after the faulting one (`ELR_EL1` + 4): the
    /// probe's instruction is skipped.
    Next,
    /// At the return address in `x30`: the probe branched to the faulting
    /// address with `blr` (an instruction fetch that aborts is reported
    /// at the fetched address, so there is no instruction to skip).
    Return,
}

/// [`ProbeSlot::resume`] values.
const RESUME_NEXT: u8 = 0;
const RESUME_RETURN: u8 = 1;

/// One CPU's probe window ([`with_probe`]). `owner` is claimed with a CAS
/// (0 = free, else the owner's MPIDR affinity + 1); the other fields are
/// written by the owner and read by the handler on the same CPU, with
/// sequentially consistent atomics as in [`ExpectedSlot`].
struct ProbeSlot {
    owner: AtomicU64,
    armed: AtomicBool,
    pc: AtomicU64,
    resume: AtomicU8,
    taken: AtomicBool,
    esr: AtomicU64,
    far: AtomicU64,
    elr: AtomicU64,
}

/// One probe window per CPU: unlike [`with_expected`], probes on several
/// CPUs at once do not serialize.
static PROBE_SLOTS: [ProbeSlot; crate::smp::MAX_CPUS] = [const {
    ProbeSlot {
        owner: AtomicU64::new(0),
        armed: AtomicBool::new(false),
        pc: AtomicU64::new(0),
        resume: AtomicU8::new(RESUME_NEXT),
        taken: AtomicBool::new(false),
        esr: AtomicU64::new(0),
        far: AtomicU64::new(0),
        elr: AtomicU64::new(0),
    }
}; crate::smp::MAX_CPUS];

/// Runs `probe` with a window on this CPU: the first synchronous exception
/// from the current EL whose `ELR_EL1` is `pc`, whatever its class, is
/// recorded and execution resumes as `resume` says (`PSTATE.IL` cleared,
/// so an Illegal Execution state exception can be absorbed too). Returns
/// `probe`'s result and the record, `None` if no such exception happened.
/// Any other exception is fatal as usual. The caller asserts on the
/// record: a probe states where it may fault, not how.
///
/// Windows do not nest; every CPU can have one open at the same time.
pub fn with_probe<R>(
    pc: u64,
    resume: ProbeResume,
    probe: impl FnOnce() -> R,
) -> (R, Option<AbortRecord>) {
    let me = Mpidr::current().as_u64() + 1;
    assert!(
        !PROBE_SLOTS
            .iter()
            .any(|slot| slot.owner.load(Ordering::SeqCst) == me),
        "nested probe windows"
    );
    let slot = PROBE_SLOTS
        .iter()
        .find(|slot| {
            slot.owner
                .compare_exchange(0, me, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        })
        .expect("a probe slot per CPU");
    slot.taken.store(false, Ordering::SeqCst);
    slot.pc.store(pc, Ordering::SeqCst);
    slot.resume.store(
        match resume {
            ProbeResume::Next => RESUME_NEXT,
            ProbeResume::Return => RESUME_RETURN,
        },
        Ordering::SeqCst,
    );
    slot.armed.store(true, Ordering::SeqCst);
    let result = probe();
    slot.armed.store(false, Ordering::SeqCst);
    let record = slot.taken.load(Ordering::SeqCst).then(|| AbortRecord {
        esr: slot.esr.load(Ordering::SeqCst),
        far: slot.far.load(Ordering::SeqCst),
        elr: slot.elr.load(Ordering::SeqCst),
    });
    slot.owner.store(0, Ordering::SeqCst);
    (result, record)
}

/// Consumes this CPU's probe window if `exception` was taken at its pc,
/// and sets `frame` up to resume as the window says.
fn take_probe(exception: &AbortRecord, frame: &mut TrapFrame) -> bool {
    let me = Mpidr::current().as_u64() + 1;
    let Some(slot) = PROBE_SLOTS.iter().find(|slot| {
        slot.owner.load(Ordering::SeqCst) == me
            && slot.armed.load(Ordering::SeqCst)
            && slot.pc.load(Ordering::SeqCst) == exception.elr
    }) else {
        return false;
    };
    slot.esr.store(exception.esr, Ordering::SeqCst);
    slot.far.store(exception.far, Ordering::SeqCst);
    slot.elr.store(exception.elr, Ordering::SeqCst);
    slot.taken.store(true, Ordering::SeqCst);
    slot.armed.store(false, Ordering::SeqCst);
    frame.elr = match slot.resume.load(Ordering::SeqCst) {
        RESUME_RETURN => frame.x[30],
        // A64 instructions are 4 bytes.
        _ => exception.elr + 4,
    };
    let mut spsr = LocalRegisterCopy::<u64, SPSR_EL1::Register>::new(frame.spsr);
    spsr.modify(SPSR_EL1::IL::CLEAR);
    frame.spsr = spsr.get();
    true
}

/// Set once some CPU is reporting a fatal exception: a second one (or a
/// fault inside the report) goes straight to power-off.
static REPORTING: AtomicBool = AtomicBool::new(false);

/// Called by the vector code with the saved context and the vector number.
extern "C" fn handle_exception(frame: &mut TrapFrame, vector: u64) {
    let (origin, kind) = decode_vector(vector);
    let abort = AbortRecord {
        esr: ESR_EL1.get(),
        far: FAR_EL1.get(),
        elr: frame.elr,
    };
    if origin == Origin::CurrentElSpx
        && kind == Kind::Synchronous
        && crate::pageable::handle_fault(&abort)
    {
        // An evicted page is back: retry the access.
        return;
    }
    if origin == Origin::CurrentElSpx && kind == Kind::Synchronous && take_expected(&abort) {
        // A64 instructions are 4 bytes (ESR_EL1.IL is set for them).
        frame.elr += 4;
        return;
    }
    if origin == Origin::CurrentElSpx && kind == Kind::Synchronous && take_probe(&abort, frame) {
        return;
    }
    if REPORTING.swap(true, Ordering::SeqCst) {
        power::exit_quietly(ExitCode::UnhandledException);
    }
    report(origin, kind, &abort, frame);
    power::exit(ExitCode::UnhandledException);
}

/// Prints a decoded report of an exception the kernel cannot handle.
fn report(origin: Origin, kind: Kind, abort: &AbortRecord, frame: &TrapFrame) {
    let esr = LocalRegisterCopy::<u64, ESR_EL1::Register>::new(abort.esr);
    log::error!(
        "unhandled exception: {kind:?} from {origin:?} on cpu {}",
        Mpidr::current()
    );
    if kind != Kind::Synchronous {
        log::error!(
            "  ELR_EL1={:#018x} SPSR_EL1={:#010x}",
            frame.elr,
            frame.spsr
        );
        return;
    }
    match esr.read_as_enum::<ESR_EL1::EC::Value>(ESR_EL1::EC) {
        Some(ec) => log::error!("  EC={:#04x} ({ec:?})", esr.read(ESR_EL1::EC)),
        None => log::error!("  EC={:#04x} (unknown class)", esr.read(ESR_EL1::EC)),
    }
    log::error!(
        "  ESR_EL1={:#010x} IL={} ISS={:#09x}",
        abort.esr,
        esr.read(ESR_EL1::IL),
        esr.read(ESR_EL1::ISS)
    );
    if matches!(
        esr.read_as_enum(ESR_EL1::EC),
        Some(
            ESR_EL1::EC::Value::DataAbortCurrentEL
                | ESR_EL1::EC::Value::DataAbortLowerEL
                | ESR_EL1::EC::Value::InstrAbortCurrentEL
                | ESR_EL1::EC::Value::InstrAbortLowerEL
        )
    ) {
        let iss = abort.iss();
        let fsc = iss.read(ABORT_ISS::FSC);
        match iss.read_as_enum::<ABORT_ISS::FSC::Value>(ABORT_ISS::FSC) {
            Some(name) => log::error!("  FSC={fsc:#04x} ({name:?})"),
            None => log::error!("  FSC={fsc:#04x} (unknown)"),
        }
        log::error!(
            "  WnR={} FnV={} EA={} S1PTW={} ISV={} SAS={} SRT={}",
            iss.read(ABORT_ISS::WNR),
            iss.read(ABORT_ISS::FNV),
            iss.read(ABORT_ISS::EA),
            iss.read(ABORT_ISS::S1PTW),
            iss.read(ABORT_ISS::ISV),
            iss.read(ABORT_ISS::SAS),
            iss.read(ABORT_ISS::SRT)
        );
    }
    log::error!(
        "  FAR_EL1={:#018x} ELR_EL1={:#018x} SPSR_EL1={:#010x}",
        abort.far,
        abort.elr,
        frame.spsr
    );
    log::error!(
        "  x0={:#x} x1={:#x} x29={:#x} x30={:#x}",
        frame.x[0],
        frame.x[1],
        frame.x[29],
        frame.x[30]
    );
}
