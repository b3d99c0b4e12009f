//! The hostile-guest suite (`mode=hostile`): everything a well-behaved
//! kernel would not do, each attempt asserting the architectural answer it
//! gets, then the hypercall fuzzer ([`crate::fuzz::run`]).
//!
//! - **Memory outside RAM and devices**: reads, writes (many instruction
//!   forms) and instruction fetches at every class of IPA the guest has no
//!   memory at — below RAM, the holes around the UART and where the host
//!   board has devices, after RAM, the top of the IPA space — and through
//!   stage-1 table entries that point there. The hypervisor answers each
//!   with a synchronous external abort at the guest's EL1 vectors
//!   (`ESR_EL1.EC` 0x25/0x21, FSC 0x10, `FAR_EL1` = the VA). Output
//!   addresses beyond the stage-1 output size fault in stage 1 (an Address
//!   size fault at EL1, no hypervisor involved).
//! - **IPAs equal to the hypervisor's own physical addresses** (its image,
//!   the host DTB, the host copy of our image) are our RAM: accesses and
//!   hypercalls on them see and change only our data.
//! - **Instructions**: EL2/EL3 system registers, TLB and address-translation
//!   operations are UNDEFINED at EL1 (EC 0), EL1 ones execute, an exception
//!   return to EL2/EL3 is illegal (EC 0x0E), WFI/WFE return, SMC answers
//!   `NOT_SUPPORTED` and is not an HVC in disguise.
//! - **PSCI misuse**: `CPU_ON` of online vCPUs, of unknown MPIDRs, with bad
//!   entry points, unknown functions; storms of them from every vCPU, and
//!   every vCPU racing to `CPU_ON` the same OFF vCPU (exactly one wins).
//! - **Aging and release races**: `AGING_TEST_CLEAR` on ranges and bitmaps
//!   that other vCPUs release and touch at the same moment.
//! - **Self-harm**: a vCPU releases its own vectors and stack and takes an
//!   exception; it loops on the zeroed vector inside the guest while the
//!   others check that the hypervisor still answers, then they repair its
//!   vectors and it comes back.
//!
//! Memory handed to the hypervisor comes from the frame allocator (or is
//! RAM nobody uses: the pages between the DTB and the image); stage-1
//! mappings to arbitrary IPAs go through a private TTBR1 window
//! ([`mmu::ScratchWindow`]); exceptions are absorbed by per-CPU probe
//! windows ([`exceptions::with_probe`]) that resume after the probe.
//!
//! Output: `guest: test NAME ... ok` / `... FAILED: why` per test, then
//! `guest: hostile: N passed, M failed`. The single-vCPU tests come first:
//! the hypervisor prints only the first 512 guest-caused warnings (the
//! lines `scripts/smoke` looks for), the storms come after them.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use core::mem::offset_of;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use core::time::Duration;

use aarch64_cpu::registers::ESR_EL1;
use hyp_abi::error::{NOT_SUPPORTED, NO_MEMORY, SUCCESS};
use hyp_abi::layout::{IMAGE_IPA, RAM_BASE, UART_IPA, UART_SIZE, UNBACKED_IPA};
use hyp_abi::psci::error::{ALREADY_ON, INVALID_ADDRESS, INVALID_PARAMETERS, ON_PENDING};
use hyp_abi::psci::{self, AffinityState};
use hyp_abi::{age_flags, func, stats_group};
use tock_registers::LocalRegisterCopy;

use crate::addr::{PhysAddr, PhysRange, PAGE_SIZE};
use crate::exceptions::{self, AbortRecord, ProbeResume, ABORT_ISS};
use crate::frames::{self, FrameError, FrameRun};
use crate::mmu::{self, ScratchKind, ScratchWindow};
use crate::power::{self, ExitCode};
use crate::selftest::{hvc64_x0, require, require_answer, Failure};
use crate::smccc_client::{self, CallError};
use crate::smp::{self, JobError, Mpidr, MAX_CPUS};
use crate::timer::Deadline;
use crate::{boot, System};

/// What the payload copied into executable pages returns in x0.
const PAYLOAD_VALUE: u64 = 0x600d;

#[cfg(target_arch = "aarch64")]
core::arch::global_asm!(
    include_str!("hostile.S"),
    payload_value = const PAYLOAD_VALUE,
    cpu_off_lo = const psci::PSCI_CPU_OFF & 0xffff,
    cpu_off_hi = const psci::PSCI_CPU_OFF >> 16,
    off_sp = const offset_of!(Sacrifice, sp),
    off_vbar = const offset_of!(Sacrifice, vbar),
    off_vectors_va = const offset_of!(Sacrifice, vectors_va),
    off_vectors_ipa = const offset_of!(Sacrifice, vectors_ipa),
    off_stack_ipa = const offset_of!(Sacrifice, stack_ipa),
    off_marker = const offset_of!(Sacrifice, marker),
    off_release_fid = const offset_of!(Sacrifice, release_fid),
    off_stack_release = const offset_of!(Sacrifice, stack_release),
    off_stack_after = const offset_of!(Sacrifice, stack_after),
    off_vectors_release = const offset_of!(Sacrifice, vectors_release),
    off_stage = const offset_of!(Sacrifice, stage),
    off_esr = const offset_of!(Sacrifice, esr),
    off_elr = const offset_of!(Sacrifice, elr),
);

/// A probe of hostile.S: x0 and x1 in, x0 out (see the file's comments).
type Probe = unsafe extern "C" fn(u64, u64) -> u64;

unsafe extern "C" {
    fn hostile_ldr64(addr: u64, sentinel: u64) -> u64;
    fn hostile_str64(addr: u64, value: u64) -> u64;
    fn hostile_ldrb(addr: u64, sentinel: u64) -> u64;
    fn hostile_strh(addr: u64, value: u64) -> u64;
    fn hostile_ldr32(addr: u64, sentinel: u64) -> u64;
    fn hostile_ldp(addr: u64, sentinel: u64) -> u64;
    fn hostile_stp(addr: u64, value: u64) -> u64;
    fn hostile_ldr_post(addr: u64, sentinel: u64) -> u64;
    fn hostile_str_pre(addr: u64, value: u64) -> u64;
    fn hostile_ldxr(addr: u64, sentinel: u64) -> u64;
    fn hostile_ldar(addr: u64, sentinel: u64) -> u64;
    fn hostile_stlr(addr: u64, value: u64) -> u64;
    fn hostile_ldr_q(addr: u64, sentinel: u64) -> u64;
    fn hostile_dc_zva(addr: u64, sentinel: u64) -> u64;
    fn hostile_smc(function: u64, a1: u64, a2: u64, a3: u64) -> u64;
    fn hostile_smc_imm(function: u64) -> u64;
    fn hostile_exec(target: u64, sentinel: u64) -> u64;
    fn hostile_exec_payload();
    fn hostile_exec_payload_end();
    fn hostile_eret(spsr: u64);
    fn hostile_eret_landing();
    fn hostile_race_entry();
    fn hostile_park_entry();
    fn hostile_sacrifice(block: *const Sacrifice);
    fn hostile_sacrifice_udf();
    fn hostile_private_vectors();
    fn hostile_private_vectors_end();
}

/// The address of an assembly symbol.
fn symbol(f: unsafe extern "C" fn()) -> u64 {
    f as usize as u64
}

/// The address of a probe.
fn probe_pc(f: Probe) -> u64 {
    f as usize as u64
}

/// What probes pass and expect back when an instruction is skipped.
const SENTINEL: u64 = 0x5e47_1e15_0bad_cafe;

/// Offset of a probe's access inside its scratch page (leaves room for
/// the pre-indexed store's -16).
const PROBE_OFFSET: u64 = 0x40;

// --- Failures ---------------------------------------------------------------

/// Why a hostile test failed.
#[derive(Clone, Debug)]
enum HostileFailure {
    /// A check of the selftest harness failed (or a call it wraps).
    Check(Failure),
    /// An attempt got another answer than the architecture requires.
    Answer {
        attempt: String,
        expected: String,
        got: String,
    },
    /// An all-vCPU test failed: what each failing vCPU (DTB index) found,
    /// in DTB order, and the runner's error if it had one (a vCPU that did
    /// not finish records nothing).
    OnVcpus {
        failures: Vec<(usize, HostileFailure)>,
        job: Option<JobError>,
    },
    /// Something did not happen in time.
    Timeout {
        what: &'static str,
        waited: Duration,
    },
    /// The suite could not be set up.
    Setup(&'static str),
    /// This vCPU gave up at a barrier because another one failed.
    Abandoned,
}

impl fmt::Display for HostileFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Check(failure) => write!(f, "{failure}"),
            Self::Answer {
                attempt,
                expected,
                got,
            } => write!(f, "{attempt}: expected {expected}, got {got}"),
            Self::OnVcpus { failures, job } => {
                let mut sep = "";
                for (cpu, failure) in failures {
                    write!(f, "{sep}vcpu {cpu}: {failure}")?;
                    sep = "; ";
                }
                if let Some(job) = job {
                    write!(f, "{sep}running on every vCPU: {job}")?;
                }
                Ok(())
            }
            Self::Timeout { what, waited } => write!(f, "{what} within {waited:?}: timed out"),
            Self::Setup(what) => write!(f, "suite set-up: {what}"),
            Self::Abandoned => f.write_str("gave up: another vCPU failed"),
        }
    }
}

impl From<Failure> for HostileFailure {
    fn from(failure: Failure) -> Self {
        Self::Check(failure)
    }
}

impl From<CallError> for HostileFailure {
    fn from(error: CallError) -> Self {
        Self::Check(Failure::from(error))
    }
}

impl From<FrameError> for HostileFailure {
    fn from(error: FrameError) -> Self {
        Self::Check(Failure::from(error))
    }
}

type Outcome = Result<(), HostileFailure>;

/// Fails with [`HostileFailure::Answer`] unless `ok`.
fn answer(
    ok: bool,
    attempt: impl FnOnce() -> String,
    expected: impl fmt::Display,
    got: impl fmt::Display,
) -> Outcome {
    if ok {
        Ok(())
    } else {
        Err(HostileFailure::Answer {
            attempt: attempt(),
            expected: format!("{expected}"),
            got: format!("{got}"),
        })
    }
}

// --- The suite ----------------------------------------------------------------

/// A test's body.
type TestFn = fn(&System) -> Outcome;

/// The suite, in execution order: single-vCPU tests first (their
/// hypervisor warnings must be among the first printed), then the tests
/// that run on every vCPU at once, self-harm last.
const TESTS: &[(&str, TestFn)] = &[
    ("outside_ram_read_write_exec", outside_ram_read_write_exec),
    ("outside_ram_access_forms", outside_ram_access_forms),
    ("uart_without_syndrome", uart_without_syndrome),
    ("stage1_walk_outside_ram", stage1_walk_outside_ram),
    ("beyond_output_size", beyond_output_size),
    ("hypervisor_pa_aliases", hypervisor_pa_aliases),
    (
        "el2_el3_instructions_undefined",
        el2_el3_instructions_undefined,
    ),
    ("el1_instructions_execute", el1_instructions_execute),
    ("illegal_exception_return", illegal_exception_return),
    ("smc_not_supported", smc_not_supported),
    ("psci_misuse", psci_misuse),
    ("abort_storm", abort_storm),
    ("psci_storm", psci_storm),
    ("cpu_on_race", cpu_on_race),
    ("aging_release_race", aging_release_race),
    ("released_bitmap_backed_again", released_bitmap_backed_again),
    ("self_harm", self_harm),
    ("hypervisor_still_alive", hypervisor_still_alive),
];

/// Runs the suite; the fuzzer after it when everything passed, otherwise
/// ends the machine with [`ExitCode::TestsFailed`].
pub fn run(system: &System) -> ! {
    log::info!("hostile: running {} tests", TESTS.len());
    let (passed, failed) = match set_up(system) {
        // Whatever a test did, the hypervisor must still answer.
        Ok(()) => crate::selftest::run_tests(system, TESTS, alive),
        Err(failure) => {
            log::info!("test set_up ... FAILED: {failure}");
            (0, 1)
        }
    };
    log::info!("hostile: {passed} passed, {failed} failed");
    if failed > 0 {
        power::exit(ExitCode::TestsFailed);
    }
    crate::fuzz::run(system)
}

/// `STATS` answers `SUCCESS`: the hypervisor is alive and serving calls.
fn alive() -> Outcome {
    let x0 = hvc64_x0(func::STATS, &[stats_group::FAULTS]);
    Ok(require_answer(
        format_args!("STATS after the test"),
        SUCCESS,
        x0,
    )?)
}

/// What the tests share: found once by [`set_up`].
#[derive(Debug)]
struct Suite {
    window: ScratchWindow,
    ram: PhysRange,
    cpus: Vec<Mpidr>,
    /// DTB index of the boot CPU (which runs the single-vCPU tests).
    boot_index: usize,
    /// Output-address bits of stage 1 ([`mmu::output_address_bits`]).
    output_bits: u32,
    /// IPAs outside RAM and devices, each a page.
    targets: Vec<Target>,
    /// Affinities no vCPU has.
    unknown_mpidrs: Vec<u64>,
}

static SUITE: spin::Once<Suite> = spin::Once::new();

fn suite() -> &'static Suite {
    SUITE.get().expect("hostile::set_up ran")
}

/// A page of IPA space with no RAM and no device behind it.
#[derive(Copy, Clone, Debug)]
struct Target {
    what: &'static str,
    ipa: u64,
}

fn set_up(system: &System) -> Outcome {
    let cpus = system.platform.cpus.clone();
    if cpus.len() > MAX_CPUS {
        return Err(HostileFailure::Setup("more vCPUs than the kernel supports"));
    }
    let me = Mpidr::current();
    let boot_index = cpus
        .iter()
        .position(|&cpu| cpu == me)
        .ok_or(HostileFailure::Setup("the boot CPU is not in the DTB"))?;
    let window = ScratchWindow::new()?;
    window.enable_on_this_cpu();
    let output_bits = mmu::output_address_bits();
    let targets = outside_targets(system, output_bits);
    let unknown_mpidrs: Vec<u64> = UNKNOWN_MPIDR_CANDIDATES
        .into_iter()
        .chain([cpus.len() as u64])
        .filter(|&raw| !cpus.contains(&Mpidr::from_raw(raw)))
        .collect();
    if unknown_mpidrs.is_empty() {
        return Err(HostileFailure::Setup("every candidate MPIDR is listed"));
    }
    log::info!(
        "hostile: {} vCPUs, RAM {}, stage-1 output {} bits, {} IPAs outside RAM and devices",
        cpus.len(),
        system.platform.ram,
        output_bits,
        targets.len()
    );
    SUITE.call_once(|| Suite {
        window,
        ram: system.platform.ram,
        cpus,
        boot_index,
        output_bits,
        targets,
        unknown_mpidrs,
    });
    Ok(())
}

/// Affinities used as "no such CPU" (QEMU `virt` numbers CPUs from 0 in
/// Aff0); those the DTB lists are left out.
const UNKNOWN_MPIDR_CANDIDATES: [u64; 7] = [
    0xff,
    0x100,
    0xff00,
    0x1_0000,
    0xff_0000,
    0x1_0000_0000,
    0xff_0000_0000,
];

/// One page of every class of IPA the guest has nothing at (that stage 1
/// can produce with `output_bits` and the DTB does not claim).
fn outside_targets(system: &System, output_bits: u32) -> Vec<Target> {
    let ram = system.platform.ram;
    let top = 1u64 << output_bits.min(48);
    let candidates = [
        ("IPA 0", 0),
        ("page 1", PAGE_SIZE),
        ("the host board's GIC distributor", 0x0800_0000),
        ("the page below the UART", UART_IPA - PAGE_SIZE),
        ("the page above the UART", UART_IPA + UART_SIZE),
        ("the host board's RTC", 0x0901_0000),
        ("the host board's virtio-mmio", 0x0a00_0000),
        ("the unbacked probe IPA", UNBACKED_IPA),
        ("the host board's PCIe PIO window", 0x3eff_0000),
        ("the last page below RAM", RAM_BASE - PAGE_SIZE),
        ("the first page after RAM", ram.end.as_u64()),
        ("2 MiB after RAM", ram.end.as_u64() + (2 << 20)),
        ("the last page below 4 GiB", (1 << 32) - PAGE_SIZE),
        ("4 GiB", 1 << 32),
        ("the host board's high PCIe ECAM", 0x40_1000_0000),
        ("512 GiB", 1 << 39),
        ("the last page of a 40-bit IPA space", (1 << 40) - PAGE_SIZE),
        ("the first page above 40 bits", 1 << 40),
        ("the middle of the IPA space's top half", top / 2 + top / 4),
        ("the last page of the IPA space", top - PAGE_SIZE),
    ];
    let mut targets: Vec<Target> = Vec::new();
    for (what, ipa) in candidates {
        let page = PhysRange {
            start: PhysAddr(ipa),
            end: PhysAddr(ipa + PAGE_SIZE),
        };
        let usable = ipa + PAGE_SIZE <= top
            && !ram.overlaps(&page)
            && !system.platform.uart.overlaps(&page)
            && !system.platform.claimed.iter().any(|r| r.overlaps(&page))
            && !targets.iter().any(|t| t.ipa == ipa);
        if usable {
            targets.push(Target { what, ipa });
        }
    }
    targets
}

// --- Scratch pages and probes ---------------------------------------------------

/// Scratch pages each vCPU owns in the window.
const SLOTS_PER_CPU: usize = mmu::SCRATCH_PAGES / MAX_CPUS;

/// What a vCPU uses its scratch pages for.
#[derive(Copy, Clone, Debug)]
enum Slot {
    Data = 0,
    Exec = 1,
    Alias = 2,
    Vectors = 3,
}

/// The window page `slot` of vCPU `cpu`.
fn slot(cpu: usize, slot: Slot) -> usize {
    cpu * SLOTS_PER_CPU + slot as usize
}

/// The architectural answer an attempt must get.
#[derive(Copy, Clone, Debug)]
enum Expect {
    /// A synchronous external abort on a data access at `far`: the
    /// hypervisor's answer to an access outside RAM and devices.
    DataAbort { far: u64 },
    /// A synchronous external abort on an instruction fetch at `far`.
    FetchAbort { far: u64 },
    /// A synchronous external abort on the stage-1 table walk for `far`
    /// (the hypervisor reports it as FSC 0x10; hardware would use the
    /// walk's own codes 0x14..0x17: both are accepted).
    WalkAbort { far: u64, fetch: bool },
    /// A stage-1 level-3 Address size fault at `far`, taken at EL1.
    AddressSize { far: u64, fetch: bool },
    /// An Undefined Instruction exception (EC 0).
    Undefined,
    /// An Illegal Execution state exception (EC 0x0E).
    IllegalState,
}

impl fmt::Display for Expect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::DataAbort { far } => write!(f, "a data external abort (EC 0x25 FSC 0x10) at {far:#x}"),
            Self::FetchAbort { far } => {
                write!(f, "an instruction external abort (EC 0x21 FSC 0x10) at {far:#x}")
            }
            Self::WalkAbort { far, fetch } => write!(
                f,
                "an external abort on the stage-1 walk (EC {:#x} FSC 0x10 or 0x14..0x17) at {far:#x}",
                if *fetch { 0x21 } else { 0x25 }
            ),
            Self::AddressSize { far, fetch } => write!(
                f,
                "a level-3 Address size fault (EC {:#x} FSC 0x3) at {far:#x}",
                if *fetch { 0x21 } else { 0x25 }
            ),
            Self::Undefined => f.write_str("an Undefined Instruction exception (ESR 0x2000000)"),
            Self::IllegalState => {
                f.write_str("an Illegal Execution state exception (ESR 0x3a000000)")
            }
        }
    }
}

/// Checks the exception `record` an attempt raised at `pc` against
/// `expect`; `attempt` names the attempt in the failure.
fn check(
    attempt: &dyn Fn() -> String,
    expect: Expect,
    pc: u64,
    record: Option<AbortRecord>,
) -> Outcome {
    let Some(record) = record else {
        return answer(false, attempt, expect, "no exception");
    };
    let esr = LocalRegisterCopy::<u64, ESR_EL1::Register>::new(record.esr);
    let ec = esr.read(ESR_EL1::EC);
    let il = esr.is_set(ESR_EL1::IL);
    let fsc = record.iss().read(ABORT_ISS::FSC);
    let far_ok = |far: u64| record.fault_address() == Some(PhysAddr(far));
    let data_or_fetch = |fetch: bool| {
        if fetch {
            ESR_EL1::EC::Value::InstrAbortCurrentEL as u64
        } else {
            ESR_EL1::EC::Value::DataAbortCurrentEL as u64
        }
    };
    let ok = record.elr == pc
        && il
        && match expect {
            Expect::DataAbort { far } => {
                ec == ESR_EL1::EC::Value::DataAbortCurrentEL as u64 && fsc == 0x10 && far_ok(far)
            }
            Expect::FetchAbort { far } => {
                ec == ESR_EL1::EC::Value::InstrAbortCurrentEL as u64 && fsc == 0x10 && far_ok(far)
            }
            Expect::WalkAbort { far, fetch } => {
                ec == data_or_fetch(fetch)
                    && (fsc == 0x10 || (0x14..=0x17).contains(&fsc))
                    && far_ok(far)
            }
            Expect::AddressSize { far, fetch } => {
                ec == data_or_fetch(fetch) && fsc == 0b00_0011 && far_ok(far)
            }
            Expect::Undefined => record.esr == (ESR_EL1::EC::Unknown + ESR_EL1::IL::SET).value,
            Expect::IllegalState => {
                record.esr == (ESR_EL1::EC::IllegalExecutionState + ESR_EL1::IL::SET).value
            }
        };
    answer(
        ok,
        attempt,
        format_args!("{expect} with ELR {pc:#x}"),
        record,
    )
}

/// A memory-access probe of hostile.S.
#[derive(Copy, Clone)]
struct Form {
    name: &'static str,
    probe: Probe,
    /// The probe returns its (possibly written-back) base register rather
    /// than the sentinel when the access is skipped.
    returns_base: bool,
    /// Where the access lands relative to the address passed.
    far_offset: i64,
    /// Device or normal memory.
    kind: ScratchKind,
}

/// Every access form `outside_ram_access_forms` tries.
const FORMS: [Form; 14] = [
    form("ldr x", hostile_ldr64, false, 0, ScratchKind::Device),
    form("str x", hostile_str64, true, 0, ScratchKind::Device),
    form("ldrb", hostile_ldrb, false, 0, ScratchKind::Device),
    form("strh", hostile_strh, true, 0, ScratchKind::Device),
    form(
        "ldr w (normal memory)",
        hostile_ldr32,
        false,
        0,
        ScratchKind::Normal,
    ),
    form("ldp", hostile_ldp, false, 0, ScratchKind::Device),
    form(
        "stp (normal memory)",
        hostile_stp,
        true,
        0,
        ScratchKind::Normal,
    ),
    form(
        "ldr post-index",
        hostile_ldr_post,
        true,
        0,
        ScratchKind::Device,
    ),
    form(
        "str pre-index",
        hostile_str_pre,
        true,
        -16,
        ScratchKind::Device,
    ),
    form(
        "ldxr (normal memory)",
        hostile_ldxr,
        false,
        0,
        ScratchKind::Normal,
    ),
    form(
        "ldar (normal memory)",
        hostile_ldar,
        false,
        0,
        ScratchKind::Normal,
    ),
    form("stlr", hostile_stlr, true, 0, ScratchKind::Device),
    form(
        "ldr q (normal memory)",
        hostile_ldr_q,
        false,
        0,
        ScratchKind::Normal,
    ),
    form(
        "dc zva (normal memory)",
        hostile_dc_zva,
        true,
        0,
        ScratchKind::Normal,
    ),
];

const fn form(
    name: &'static str,
    probe: Probe,
    returns_base: bool,
    far_offset: i64,
    kind: ScratchKind,
) -> Form {
    Form {
        name,
        probe,
        returns_base,
        far_offset,
        kind,
    }
}

/// Runs `form` on scratch page `page` (already mapped) and checks it gets
/// `expect` (built from the accessed VA).
fn run_form(
    page: usize,
    form: &Form,
    expect: impl FnOnce(u64) -> Expect,
    what: &dyn Fn() -> String,
) -> Outcome {
    let va = suite().window.va(page) + PROBE_OFFSET;
    let pc = probe_pc(form.probe);
    let far = va.wrapping_add_signed(form.far_offset);
    let value = if form.returns_base { va } else { SENTINEL };
    // SAFETY: the probe makes one access to `va` (a scratch page of this
    // CPU, mapped to an IPA outside RAM or to the UART) and returns; the
    // access either completes or takes the exception the window absorbs,
    // which skips it. It touches no memory of the program.
    let (got, record) =
        exceptions::with_probe(pc, ProbeResume::Next, || unsafe { (form.probe)(va, value) });
    let attempt = || format!("{} {}", form.name, what());
    check(&attempt, expect(far), pc, record)?;
    answer(
        got == value,
        attempt,
        format_args!("{value:#x} back (the instruction skipped)"),
        format_args!("{got:#x}"),
    )
}

/// Fetches from scratch page `page` (mapped executable by the caller) and
/// checks it gets `expect`.
fn run_fetch(
    page: usize,
    expect: impl FnOnce(u64) -> Expect,
    what: &dyn Fn() -> String,
) -> Outcome {
    let va = suite().window.va(page) + PROBE_OFFSET;
    // SAFETY: the probe branches to `va`, whose fetch takes the abort the
    // window absorbs (resuming at the probe's return address), or runs the
    // code the caller put there, which returns.
    let (got, record) = exceptions::with_probe(va, ProbeResume::Return, || unsafe {
        hostile_exec(va, SENTINEL)
    });
    let attempt = || format!("instruction fetch {}", what());
    check(&attempt, expect(va), va, record)?;
    answer(
        got == SENTINEL,
        attempt,
        format_args!("{SENTINEL:#x} back (nothing ran)"),
        format_args!("{got:#x}"),
    )
}

/// Read, write and fetch of `target` from vCPU `cpu`'s scratch pages:
/// each must take the injected external abort.
fn probe_target(cpu: usize, target: &Target) -> Outcome {
    let window = &suite().window;
    let what = || format!("at IPA {:#x} ({})", target.ipa, target.what);
    let data = slot(cpu, Slot::Data);
    window.map(data, target.ipa, ScratchKind::Device);
    run_form(data, &FORMS[0], |far| Expect::DataAbort { far }, &what)?;
    run_form(data, &FORMS[1], |far| Expect::DataAbort { far }, &what)?;
    let exec = slot(cpu, Slot::Exec);
    window.map(exec, target.ipa, ScratchKind::Executable);
    run_fetch(exec, |far| Expect::FetchAbort { far }, &what)?;
    window.unmap(data);
    window.unmap(exec);
    Ok(())
}

// --- Memory outside RAM and devices ----------------------------------------------

/// A read, a write and an instruction fetch at one page of every class of
/// IPA outside RAM and devices each take the synchronous external abort
/// the hypervisor injects (FAR = the VA, ELR = the instruction), and the
/// kernel carries on.
fn outside_ram_read_write_exec(_: &System) -> Outcome {
    let suite = suite();
    require(
        suite.targets.len() >= 12,
        "IPA classes outside RAM and devices the DTB leaves free",
        ">= 12",
        suite.targets.len(),
    )?;
    for target in &suite.targets {
        probe_target(suite.boot_index, target)?;
    }
    Ok(())
}

/// Every access form (sizes, pairs, writeback, exclusive,
/// acquire/release, SIMD, DC ZVA; device and normal memory) outside RAM
/// takes the injected abort; writeback forms leave the base unchanged.
fn outside_ram_access_forms(_: &System) -> Outcome {
    let suite = suite();
    let ipa = suite.ram.end.as_u64() + (1 << 20);
    let page = slot(suite.boot_index, Slot::Data);
    let what = || format!("at IPA {ipa:#x} (1 MiB after RAM)");
    for form in &FORMS {
        suite.window.map(page, ipa, form.kind);
        run_form(page, form, |far| Expect::DataAbort { far }, &what)?;
    }
    suite.window.unmap(page);
    Ok(())
}

/// The emulated UART answers single loads and stores; accesses it cannot
/// decode (no instruction syndrome: pairs, writeback, SIMD) and
/// instruction fetches from it get the injected abort instead.
fn uart_without_syndrome(system: &System) -> Outcome {
    let suite = suite();
    let uart = system.platform.uart.start.as_u64();
    let page = slot(suite.boot_index, Slot::Data);
    suite.window.map(page, uart, ScratchKind::Device);
    // The flag register (offset 0x18) through the scratch page: emulated.
    let fr = suite.window.va(page) + 0x18;
    let pc = probe_pc(hostile_ldr32);
    // SAFETY: one 32-bit load of the UART's flag register, which has no
    // side effect; an exception there is absorbed by the window.
    let (_, record) = exceptions::with_probe(pc, ProbeResume::Next, || unsafe {
        hostile_ldr32(fr, SENTINEL)
    });
    answer(
        record.is_none(),
        || format!("ldr w of the UART flag register through {fr:#x}"),
        "an emulated read",
        format_args!("{record:?}"),
    )?;
    let what = || format!("on the UART page {uart:#x}");
    for index in [5, 6, 7, 8, 12] {
        let form = &FORMS[index];
        run_form(page, form, |far| Expect::DataAbort { far }, &what)?;
    }
    suite.window.unmap(page);
    let exec = slot(suite.boot_index, Slot::Exec);
    suite.window.map(exec, uart, ScratchKind::Executable);
    run_fetch(exec, |far| Expect::FetchAbort { far }, &what)?;
    suite.window.unmap(exec);
    Ok(())
}

/// Stage-1 table entries that point at IPAs outside RAM (and at the UART)
/// make the walk itself abort: loads and fetches through them take an
/// external abort, and the kernel carries on.
fn stage1_walk_outside_ram(_: &System) -> Outcome {
    let suite = suite();
    let cases = [
        (2, 1, UNBACKED_IPA, "a level-2 entry to the unbacked IPA"),
        (2, 2, UART_IPA, "a level-2 entry to the UART"),
        (
            1,
            1,
            suite.ram.end.as_u64(),
            "a level-1 entry to the first page after RAM",
        ),
        (1, 2, 1 << 32, "a level-1 entry to 4 GiB"),
    ];
    for (level, index, table, what) in cases {
        let va = suite.window.set_table_entry(level, index, Some(table)) + PROBE_OFFSET;
        let result = walk_probes(va, table, what);
        suite.window.set_table_entry(level, index, None);
        result?;
    }
    Ok(())
}

/// A load and a fetch at `va`, whose walk reads a "table" at `table`.
fn walk_probes(va: u64, table: u64, what: &str) -> Outcome {
    let attempt = || format!("ldr x at {va:#x} through {what} ({table:#x})");
    let pc = probe_pc(hostile_ldr64);
    // SAFETY: one load from `va`, whose translation aborts (absorbed by
    // the window, which skips the load) or yields garbage that is only
    // returned.
    let (got, record) = exceptions::with_probe(pc, ProbeResume::Next, || unsafe {
        hostile_ldr64(va, SENTINEL)
    });
    check(
        &attempt,
        Expect::WalkAbort {
            far: va,
            fetch: false,
        },
        pc,
        record,
    )?;
    answer(
        got == SENTINEL,
        attempt,
        "the load skipped",
        format_args!("{got:#x}"),
    )?;
    let attempt = || format!("fetch at {va:#x} through {what} ({table:#x})");
    // SAFETY: as in `run_fetch`: the fetch's walk aborts.
    let (got, record) = exceptions::with_probe(va, ProbeResume::Return, || unsafe {
        hostile_exec(va, SENTINEL)
    });
    check(
        &attempt,
        Expect::WalkAbort {
            far: va,
            fetch: true,
        },
        va,
        record,
    )?;
    answer(
        got == SENTINEL,
        attempt,
        "nothing ran",
        format_args!("{got:#x}"),
    )
}

/// Output addresses at or above the stage-1 output size cannot reach
/// stage 2: the access takes a stage-1 Address size fault at EL1, without
/// the hypervisor. With the output size the CPU allows (when a descriptor
/// can hold an address above it: PARange < 48 bits), and with the output
/// size lowered to 40 bits on this CPU (always).
fn beyond_output_size(_: &System) -> Outcome {
    let suite = suite();
    let bits = suite.output_bits;
    if bits < 48 {
        for ipa in [1u64 << bits, (1 << 48) - PAGE_SIZE] {
            address_size_probes(ipa, bits)?;
        }
    } else {
        log::info!("hostile: stage-1 output is 48 bits: no descriptor can map above it");
    }
    let top = 1u64 << bits.min(48);
    mmu::with_40_bit_output(|| {
        for ipa in [1u64 << 40, top - PAGE_SIZE] {
            address_size_probes(ipa, 40)?;
        }
        Ok(())
    })
}

/// A read, a write and a fetch of `ipa`, above a `bits`-bit output size.
fn address_size_probes(ipa: u64, bits: u32) -> Outcome {
    let suite = suite();
    let what = || format!("at output address {ipa:#x} (above {bits} bits)");
    let data = slot(suite.boot_index, Slot::Data);
    suite.window.map(data, ipa, ScratchKind::Device);
    let fault = |far| Expect::AddressSize { far, fetch: false };
    run_form(data, &FORMS[0], fault, &what)?;
    run_form(data, &FORMS[1], fault, &what)?;
    suite.window.unmap(data);
    let exec = slot(suite.boot_index, Slot::Exec);
    suite.window.map(exec, ipa, ScratchKind::Executable);
    run_fetch(exec, |far| Expect::AddressSize { far, fetch: true }, &what)?;
    suite.window.unmap(exec);
    Ok(())
}

// --- IPAs equal to the hypervisor's physical addresses ------------------------------

/// Host physical address of the hypervisor's image (`linker/hypervisor.ld`).
const HYP_IMAGE_PA: u64 = 0x4020_0000;
/// Host physical address of the DTB QEMU gives the hypervisor.
const HOST_DTB_PA: u64 = 0x4000_0000;
/// Host physical address of the loader's copy of our image
/// (`GUEST_LOAD_ADDR` in `scripts/lib.sh`).
const HOST_GUEST_COPY_PA: u64 = 0x4800_0000;

/// Key prefix of this suite's page-store entries.
const KEY_TAG: u64 = 0x4057_11e0 << 32;

/// u64 words in a page.
const PAGE_WORDS: usize = (PAGE_SIZE / 8) as usize;

/// Reads word `i` of the page at `ipa`, through the identity map.
fn read_word(ipa: u64, i: usize) -> u64 {
    assert!(i < PAGE_WORDS);
    // SAFETY: callers pass pages of guest RAM (identity-mapped readable
    // normal memory); volatile because the hypervisor writes them behind
    // the compiler's back.
    unsafe { PhysAddr(ipa).as_ptr::<u64>().add(i).read_volatile() }
}

/// Writes word `i` of the page at `ipa`, through the identity map.
fn write_word(ipa: u64, i: usize, value: u64) {
    assert!(i < PAGE_WORDS);
    // SAFETY: callers pass pages of guest RAM the suite owns (frames it
    // allocated, or the unused RAM below the image), identity-mapped
    // read-write.
    unsafe { PhysAddr(ipa).as_ptr::<u64>().add(i).write_volatile(value) }
}

/// Fails unless the page at `ipa` holds `f(i)` in every word `i`.
fn require_page(ipa: u64, what: &'static str, f: impl Fn(usize) -> u64) -> Outcome {
    for i in 0..PAGE_WORDS {
        let (want, got) = (f(i), read_word(ipa, i));
        require(
            want == got,
            what,
            format_args!("word {i} = {want:#x}"),
            format_args!("{got:#x} (page {ipa:#x})"),
        )?;
    }
    Ok(())
}

/// A pseudo-random word stream (splitmix64) from `seed`.
fn pattern(seed: u64, i: usize) -> u64 {
    let mut z = seed.wrapping_add((i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Cleans `[va, va + len)` to the point of unification and invalidates
/// the instruction caches, so that code written as data can be fetched.
fn sync_code(va: u64, len: u64) {
    let mut line = va & !63;
    while line < va + len {
        // SAFETY: cleaning a data-cache line writes back data the program
        // wrote; it changes no memory contents.
        unsafe {
            core::arch::asm!("dc cvau, {}", in(reg) line, options(nostack, preserves_flags));
        }
        line += 64;
    }
    // SAFETY: instruction-cache invalidation and barriers have no effect
    // on memory contents.
    unsafe {
        core::arch::asm!(
            "dsb ish",
            "ic ialluis",
            "dsb ish",
            "isb",
            options(nostack, preserves_flags)
        );
    }
}

/// Copies `len` bytes of code at `from` (our own image) to `to` (RAM we
/// own), word by word.
fn copy_code(from: u64, to: u64, len: u64) {
    for off in (0..len).step_by(4) {
        // SAFETY: `from` is code of our image (mapped readable) and `to` a
        // page the caller owns; both 4-byte aligned, `len` inside them.
        unsafe {
            let word = ((from + off) as *const u32).read_volatile();
            ((to + off) as *mut u32).write_volatile(word);
        }
    }
}

/// IPAs numerically equal to the hypervisor's own physical addresses are
/// our RAM. `STORE_PUT` of the pages at the host DTB's, the hypervisor
/// image's and the host image copy's addresses stores *our* pages (got
/// back, they equal what we read there). Pages we own at such addresses
/// (the unused RAM below our image; a frame inside the hypervisor image's
/// range) can be written, read through another mapping, used as an aging
/// bitmap, released (then read as zeros), filled by `STORE_GET`, and
/// executed.
fn hypervisor_pa_aliases(system: &System) -> Outcome {
    let suite = suite();
    let scratch = frames::alloc(1)?;
    let result = alias_round_trips(system, &scratch).and_then(|()| {
        let below_image = unused_below_image(system).ok_or(HostileFailure::Setup(
            "no unused RAM page between the DTB and the image",
        ))?;
        own_alias_page(below_image, "the unused RAM below our image", &scratch)?;
        let frame = frames::alloc(1)?;
        let ipa = frame.frame(0).as_u64();
        let in_hyp = (HYP_IMAGE_PA..HOST_GUEST_COPY_PA).contains(&ipa);
        let result = own_alias_page(
            ipa,
            if in_hyp {
                "a frame numerically inside the hypervisor's image and heap"
            } else {
                "a frame of ours"
            },
            &scratch,
        );
        frames::free(frame);
        result
    });
    frames::free(scratch);
    suite.window.unmap(slot(suite.boot_index, Slot::Alias));
    suite.window.unmap(slot(suite.boot_index, Slot::Exec));
    result
}

/// `STORE_PUT` of the pages at the hypervisor's own addresses, got back
/// into `scratch`, equals what we read there.
fn alias_round_trips(system: &System, scratch: &FrameRun) -> Outcome {
    let dst = scratch.frame(0).as_u64();
    let cases = [
        ("the host DTB's address (our DTB)", HOST_DTB_PA),
        ("the hypervisor's first code page (our image)", HYP_IMAGE_PA),
        ("the host copy of our image", HOST_GUEST_COPY_PA),
    ];
    for (n, (what, ipa)) in cases.into_iter().enumerate() {
        if !system.platform.ram.contains(PhysAddr(ipa)) {
            continue;
        }
        let key = KEY_TAG | n as u64;
        smccc_client::store_put(key, ipa)?;
        for i in 0..PAGE_WORDS {
            write_word(dst, i, !SENTINEL);
        }
        smccc_client::store_get(key, dst)?;
        for i in 0..PAGE_WORDS {
            let (ours, got) = (read_word(ipa, i), read_word(dst, i));
            answer(
                ours == got,
                || format!("STORE_PUT({ipa:#x}: {what}) then STORE_GET, word {i}"),
                format_args!("{ours:#x} (our page)"),
                format_args!("{got:#x}"),
            )?;
        }
    }
    Ok(())
}

/// The highest page between the DTB and our image that nothing uses.
fn unused_below_image(system: &System) -> Option<u64> {
    let platform = &system.platform;
    (1..=8u64).map(|k| IMAGE_IPA - k * PAGE_SIZE).find(|&ipa| {
        let page = PhysRange {
            start: PhysAddr(ipa),
            end: PhysAddr(ipa + PAGE_SIZE),
        };
        platform.ram.covers(&page)
            && !platform.dtb.overlaps(&page)
            && !platform.reserved.iter().any(|r| r.overlaps(&page))
    })
}

/// The checks of [`hypervisor_pa_aliases`] on a page `ipa` we own.
fn own_alias_page(ipa: u64, what: &'static str, scratch: &FrameRun) -> Outcome {
    let suite = suite();
    let bitmap = scratch.frame(0).as_u64();
    let seed = ipa ^ 0xa11a5;
    for i in 0..PAGE_WORDS {
        write_word(ipa, i, pattern(seed, i));
    }
    // Another mapping of the same IPA sees the same data.
    let alias = slot(suite.boot_index, Slot::Alias);
    suite.window.map(alias, ipa, ScratchKind::Normal);
    let alias_va = suite.window.va(alias);
    for i in (0..PAGE_WORDS).step_by(61) {
        // SAFETY: the alias page maps `ipa` (RAM we own) read-write normal.
        let got = unsafe { (alias_va as *const u64).add(i).read_volatile() };
        answer(
            got == pattern(seed, i),
            || format!("word {i} of {ipa:#x} ({what}) through a second mapping"),
            format_args!("{:#x}", pattern(seed, i)),
            format_args!("{got:#x}"),
        )?;
    }
    // The page as an aging bitmap (of itself): the hypervisor writes our
    // page, one word.
    write_word(bitmap, 0, SENTINEL);
    write_word(bitmap, 1, SENTINEL);
    let young = smccc_client::aging_test_clear(ipa, 1, bitmap, 0)?;
    let (w0, w1) = (read_word(bitmap, 0), read_word(bitmap, 1));
    answer(
        young == 1 && w0 == 1 && w1 == SENTINEL,
        || {
            format!(
                "AGING_TEST_CLEAR({ipa:#x}: {what}, 1, bitmap {bitmap:#x}, 0) of the written page"
            )
        },
        "young 1, bitmap word 0 = 0x1, word 1 unwritten",
        format_args!("young {young}, words {w0:#x} {w1:#x}"),
    )?;
    write_word(ipa, 0, SENTINEL);
    let young = smccc_client::aging_test_clear(bitmap, 1, ipa, 0)?;
    let w0 = read_word(ipa, 0);
    answer(
        young == 1 && w0 == 1 && read_word(ipa, 1) == pattern(seed, 1),
        || format!("AGING_TEST_CLEAR(touched page, 1, bitmap {ipa:#x}: {what}, 0)"),
        "young 1, our page's word 0 = 0x1, word 1 untouched",
        format_args!("young {young}, word 0 = {w0:#x}"),
    )?;
    // Released: reads zeros.
    let released = smccc_client::mem_release(ipa, 1)?;
    require(
        released.pages == 1,
        "MEM_RELEASE x0 of a written page at a hypervisor address",
        1,
        released.pages,
    )?;
    require_page(ipa, "a released page at a hypervisor address", |_| 0)?;
    // STORE_GET fills it.
    let key = KEY_TAG | 0x100 | (ipa >> 12);
    for i in 0..PAGE_WORDS {
        write_word(bitmap, i, pattern(seed ^ 1, i));
    }
    smccc_client::store_put(key, bitmap)?;
    smccc_client::store_get(key, ipa)?;
    require_page(ipa, "a page at a hypervisor address after STORE_GET", |i| {
        pattern(seed ^ 1, i)
    })?;
    // And it runs our code.
    let payload = symbol(hostile_exec_payload);
    let len = symbol(hostile_exec_payload_end) - payload;
    copy_code(payload, ipa + PROBE_OFFSET, len);
    sync_code(ipa + PROBE_OFFSET, len);
    let exec = slot(suite.boot_index, Slot::Exec);
    suite.window.map(exec, ipa, ScratchKind::Executable);
    let entry = suite.window.va(exec) + PROBE_OFFSET;
    // SAFETY: `entry` holds the payload just copied (`movz x0, #..; ret`),
    // mapped executable; any exception there is absorbed by the window.
    let (got, record) = exceptions::with_probe(entry, ProbeResume::Return, || unsafe {
        hostile_exec(entry, SENTINEL)
    });
    answer(
        record.is_none() && got == PAYLOAD_VALUE,
        || format!("executing our code copied to {ipa:#x} ({what})"),
        format_args!("x0 = {PAYLOAD_VALUE:#x}"),
        format_args!("x0 = {got:#x}, exception {record:?}"),
    )?;
    suite.window.unmap(exec);
    suite.window.unmap(alias);
    // Leave the page unbacked, as it was.
    smccc_client::mem_release(ipa, 1)?;
    Ok(())
}

// --- Instructions ---------------------------------------------------------------------

/// Defines a table of probes: each `insn` followed by `ret` (8 bytes), from
/// the symbol `$start`, and the matching `&[&str]` of names.
macro_rules! instruction_probes {
    ($names:ident, $start:literal, $( $name:literal => $insn:literal ),+ $(,)?) => {
        #[cfg(target_arch = "aarch64")]
        core::arch::global_asm!(concat!(
            "    .pushsection .text.hostile_probes, \"ax\"\n",
            "    .balign 8\n",
            "    .global ", $start, "\n",
            $start, ":\n",
            $( "    ", $insn, "\n    ret\n", )+
            "    .popsection\n"
        ));
        /// Names of the probes of the table, in order.
        const $names: &[&str] = &[$($name),+];
    };
}

// EL2 and EL3 registers and operations: UNDEFINED at EL1 (HCR_EL2.NV is
// clear; EL3 is not implemented or not accessible). x0 = the sentinel in,
// the register out.
instruction_probes!(UNDEF_PROBES, "hostile_undef_probes",
    "mrs hcr_el2" => "mrs x0, hcr_el2",
    "msr hcr_el2" => "msr hcr_el2, xzr",
    "mrs vttbr_el2" => "mrs x0, vttbr_el2",
    "msr vttbr_el2" => "msr vttbr_el2, xzr",
    "mrs vtcr_el2" => "mrs x0, vtcr_el2",
    "mrs vbar_el2" => "mrs x0, vbar_el2",
    "msr vbar_el2" => "msr vbar_el2, xzr",
    "mrs sctlr_el2" => "mrs x0, sctlr_el2",
    "msr sctlr_el2" => "msr sctlr_el2, xzr",
    "mrs tcr_el2" => "mrs x0, tcr_el2",
    "mrs ttbr0_el2" => "mrs x0, ttbr0_el2",
    "mrs esr_el2" => "mrs x0, esr_el2",
    "mrs far_el2" => "mrs x0, far_el2",
    "mrs hpfar_el2" => "mrs x0, hpfar_el2",
    "mrs elr_el2" => "mrs x0, elr_el2",
    "msr elr_el2" => "msr elr_el2, xzr",
    "mrs spsr_el2" => "mrs x0, spsr_el2",
    "mrs tpidr_el2" => "mrs x0, tpidr_el2",
    "mrs mdcr_el2" => "mrs x0, mdcr_el2",
    "mrs cptr_el2" => "mrs x0, cptr_el2",
    "mrs cnthctl_el2" => "mrs x0, cnthctl_el2",
    "msr cntvoff_el2" => "msr cntvoff_el2, xzr",
    "mrs vpidr_el2" => "mrs x0, vpidr_el2",
    "msr vmpidr_el2" => "msr vmpidr_el2, xzr",
    "mrs sp_el1" => "mrs x0, sp_el1",
    "mrs sp_el2" => "mrs x0, sp_el2",
    "mrs sctlr_el12 (s3_5_c1_c0_0)" => "mrs x0, s3_5_c1_c0_0",
    "mrs contextidr_el2 (s3_4_c13_c0_1)" => "mrs x0, s3_4_c13_c0_1",
    "mrs scr_el3" => "mrs x0, scr_el3",
    "msr scr_el3" => "msr scr_el3, xzr",
    "mrs sctlr_el3" => "mrs x0, sctlr_el3",
    "mrs vbar_el3" => "mrs x0, vbar_el3",
    "mrs elr_el3" => "mrs x0, elr_el3",
    "mrs mdcr_el3" => "mrs x0, mdcr_el3",
    "tlbi alle2" => "tlbi alle2",
    "tlbi alle2is" => "tlbi alle2is",
    "tlbi vae2is" => "tlbi vae2is, x0",
    "tlbi alle1" => "tlbi alle1",
    "tlbi alle1is" => "tlbi alle1is",
    "tlbi vmalls12e1" => "tlbi vmalls12e1",
    "tlbi vmalls12e1is" => "tlbi vmalls12e1is",
    "tlbi ipas2e1is" => "tlbi ipas2e1is, x0",
    "tlbi alle3" => "tlbi alle3",
    "at s1e2r" => "at s1e2r, x0",
    "at s1e2w" => "at s1e2w, x0",
    "at s12e1r" => "at s12e1r, x0",
    "at s12e1w" => "at s12e1w, x0",
    "at s12e0r" => "at s12e0r, x0",
    "at s1e3r" => "at s1e3r, x0",
);

// EL0/EL1 registers: readable at EL1 (the value is not the sentinel).
instruction_probes!(READ_PROBES, "hostile_read_probes",
    "mrs midr_el1" => "mrs x0, midr_el1",
    "mrs mpidr_el1" => "mrs x0, mpidr_el1",
    "mrs id_aa64mmfr0_el1" => "mrs x0, id_aa64mmfr0_el1",
    "mrs ctr_el0" => "mrs x0, ctr_el0",
    "mrs cntvct_el0" => "mrs x0, cntvct_el0",
    "mrs sctlr_el1" => "mrs x0, sctlr_el1",
    "mrs vbar_el1" => "mrs x0, vbar_el1",
    "mrs tcr_el1" => "mrs x0, tcr_el1",
);

// EL1 instructions that execute (or trap to the hypervisor and return):
// x0 comes back unchanged.
instruction_probes!(QUIET_PROBES, "hostile_quiet_probes",
    "nop" => "nop",
    "isb" => "isb",
    "dsb sy" => "dsb sy",
    "tlbi vmalle1" => "tlbi vmalle1",
    "at s1e1r" => "at s1e1r, x0",
    "wfi (traps, skipped)" => "wfi",
    "wfe (traps or returns)" => "wfe",
    "sev; wfe" => "sev",
    "wfe after sev" => "wfe",
    "yield" => "yield",
);

unsafe extern "C" {
    fn hostile_undef_probes();
    fn hostile_read_probes();
    fn hostile_quiet_probes();
}

/// Runs probe `index` of the table at `start` with x0 = the sentinel;
/// returns x0 and the exception it raised, if any.
fn run_table_probe(start: unsafe extern "C" fn(), index: usize) -> (u64, u64, Option<AbortRecord>) {
    let pc = symbol(start) + 8 * index as u64;
    // SAFETY: `pc` is the start of a probe of the table (one instruction
    // then `ret`, 8 bytes each); it follows the C calling convention,
    // taking and returning x0, and touches no memory.
    let probe: unsafe extern "C" fn(u64) -> u64 = unsafe { core::mem::transmute(pc as usize) };
    // SAFETY: as above; an exception at the probe's instruction is
    // absorbed by the window and skipped.
    let (got, record) =
        exceptions::with_probe(pc, ProbeResume::Next, || unsafe { probe(SENTINEL) });
    (pc, got, record)
}

/// EL2 and EL3 system registers, TLB maintenance and address translation
/// are UNDEFINED at EL1: each raises EC 0 at EL1, at the instruction, and
/// a read leaves its register unchanged.
fn el2_el3_instructions_undefined(_: &System) -> Outcome {
    for (index, name) in UNDEF_PROBES.iter().enumerate() {
        let (pc, got, record) = run_table_probe(hostile_undef_probes, index);
        let attempt = || format!("{name} at EL1");
        check(&attempt, Expect::Undefined, pc, record)?;
        answer(
            got == SENTINEL,
            attempt,
            "x0 unchanged",
            format_args!("{got:#x}"),
        )?;
    }
    Ok(())
}

/// The control group: EL1 and EL0 registers read at EL1 without an
/// exception; barriers, EL1 TLB and AT operations, WFI/WFE (trapped and
/// skipped) and hints execute and return.
fn el1_instructions_execute(_: &System) -> Outcome {
    for (index, name) in READ_PROBES.iter().enumerate() {
        let (_, got, record) = run_table_probe(hostile_read_probes, index);
        answer(
            record.is_none() && got != SENTINEL,
            || format!("{name} at EL1"),
            "a value, no exception",
            format_args!("{got:#x}, exception {record:?}"),
        )?;
    }
    let (_, mpidr, _) = run_table_probe(hostile_read_probes, 1);
    require(
        Mpidr::from_raw(mpidr) == Mpidr::current(),
        "MPIDR_EL1 read by the probe",
        Mpidr::current(),
        Mpidr::from_raw(mpidr),
    )?;
    for (index, name) in QUIET_PROBES.iter().enumerate() {
        let (_, got, record) = run_table_probe(hostile_quiet_probes, index);
        answer(
            record.is_none() && got == SENTINEL,
            || format!("{name} at EL1"),
            "no exception, x0 unchanged",
            format_args!("{got:#x}, exception {record:?}"),
        )?;
    }
    Ok(())
}

/// `ERET` from EL1 to EL2, EL3 or a reserved mode is an illegal exception
/// return: the PE stays at EL1 with `PSTATE.IL` set and the next
/// instruction takes an Illegal Execution state exception (EC 0x0E).
fn illegal_exception_return(_: &System) -> Outcome {
    /// `SPSR.DAIF`: everything masked, as the kernel runs.
    const DAIF: u64 = 0xf << 6;
    let cases = [
        ("EL2h", 0b1001),
        ("EL2t", 0b1000),
        ("EL3h", 0b1101),
        ("reserved mode 0b0010", 0b0010),
    ];
    let landing = symbol(hostile_eret_landing);
    for (what, mode) in cases {
        let spsr = DAIF | mode;
        // SAFETY: the probe sets ELR_EL1/SPSR_EL1 and returns with ERET to
        // its own landing instruction; an illegal return stays at EL1 and
        // the landing's exception is absorbed (skipped, IL cleared). A
        // legal return (none of these) would land there too.
        let ((), record) =
            exceptions::with_probe(landing, ProbeResume::Next, || unsafe { hostile_eret(spsr) });
        check(
            &|| format!("ERET from EL1 with SPSR {spsr:#x} ({what})"),
            Expect::IllegalState,
            landing,
            record,
        )?;
    }
    Ok(())
}

/// `SMC` traps to the hypervisor (`HCR_EL2.TSC`) and is answered
/// `NOT_SUPPORTED` whatever it asks, execution continuing after it: a PSCI
/// `CPU_ON` through SMC starts nothing, a `MEM_RELEASE` releases nothing,
/// an `EXIT` does not end the machine.
fn smc_not_supported(_: &System) -> Outcome {
    let suite = suite();
    let page = frames::alloc(1)?;
    let ipa = page.frame(0).as_u64();
    write_word(ipa, 0, SENTINEL);
    let target = suite
        .cpus
        .iter()
        .copied()
        .find(|&cpu| cpu != Mpidr::current());
    let entry = symbol(hostile_park_entry);
    let cases: [(&str, u32, [u64; 3]); 6] = [
        ("PSCI_VERSION", psci::PSCI_VERSION, [0; 3]),
        (
            "CPU_ON of an OFF vCPU",
            psci::PSCI_CPU_ON_64,
            [target.map_or(0, Mpidr::as_u64), entry, 0],
        ),
        (
            "MEM_RELEASE of a written page",
            func::MEM_RELEASE,
            [ipa, 1, 0],
        ),
        ("EXIT(7)", func::EXIT, [7, 0, 0]),
        ("STATS", func::STATS, [0; 3]),
        ("an unknown function", 0xC600_00FF, [0; 3]),
    ];
    let result = (|| {
        for (what, function, [a1, a2, a3]) in cases {
            // SAFETY: SMC with SMCCC arguments; the hypervisor traps it.
            // Were it executed as the call it names, the checks below
            // would see it (EXIT(7) would end the machine with 7).
            let x0 = unsafe { hostile_smc(u64::from(function), a1, a2, a3) } as i64;
            require_answer(
                format_args!("SMC #0 {what} ({function:#x})"),
                NOT_SUPPORTED,
                x0,
            )?;
        }
        // SAFETY: as above, with a non-zero immediate.
        let x0 = unsafe { hostile_smc_imm(u64::from(psci::PSCI_VERSION)) } as i64;
        require_answer(format_args!("SMC #0x1234 PSCI_VERSION"), NOT_SUPPORTED, x0)?;
        let word = read_word(ipa, 0);
        require(
            word == SENTINEL,
            "the page an SMC MEM_RELEASE named (not released)",
            format_args!("{SENTINEL:#x}"),
            format_args!("{word:#x}"),
        )?;
        if let Some(target) = target {
            let state = hvc64_x0(psci::PSCI_AFFINITY_INFO_64, &[target.as_u64(), 0]);
            require_answer(
                format_args!("AFFINITY_INFO({target}) after an SMC CPU_ON"),
                AffinityState::Off as i64,
                state,
            )?;
        }
        Ok(())
    })();
    frames::free(page);
    result
}

// --- PSCI ---------------------------------------------------------------------------

/// Entry points `CPU_ON` must refuse with `INVALID_ADDRESS`.
fn bad_entries() -> [(&'static str, u64); 10] {
    let ram = suite().ram;
    let valid = boot::secondary_entry_point().as_u64();
    [
        ("IPA 0", 0),
        ("page 1", PAGE_SIZE),
        ("the last word below RAM", ram.start.as_u64() - 4),
        ("the first byte after RAM", ram.end.as_u64()),
        ("in RAM, 2-byte aligned", valid + 2),
        ("in RAM, 1-byte aligned", valid + 1),
        ("the UART", UART_IPA),
        ("the unbacked IPA", UNBACKED_IPA),
        ("2^40", 1 << 40),
        ("the top of the address space", !3),
    ]
}

/// PSCI misuse from one vCPU: `CPU_ON` of itself (`ALREADY_ON`), of
/// unknown MPIDRs (`INVALID_PARAMETERS`), with bad entry points for OFF
/// and ON vCPUs (`INVALID_ADDRESS`); `AFFINITY_INFO` with levels above 0
/// or unknown MPIDRs (`INVALID_PARAMETERS`); PSCI functions that
/// `PSCI_FEATURES` says are not supported answer `NOT_SUPPORTED`. None of
/// it starts a vCPU.
fn psci_misuse(_: &System) -> Outcome {
    let suite = suite();
    let me = Mpidr::current().as_u64();
    let entry = boot::secondary_entry_point().as_u64();
    for function in [psci::PSCI_CPU_ON_64, psci::PSCI_CPU_ON_32] {
        require_answer(
            format_args!("CPU_ON {function:#x} of the caller"),
            ALREADY_ON.into(),
            hvc64_x0(function, &[me, entry, 0]),
        )?;
        // A 32-bit call sees only the low halves of its arguments (SMCCC).
        let wide = function == psci::PSCI_CPU_ON_64;
        for &mpidr in &suite.unknown_mpidrs {
            if !wide && mpidr > u64::from(u32::MAX) {
                continue;
            }
            require_answer(
                format_args!("CPU_ON {function:#x} of unknown MPIDR {mpidr:#x}"),
                INVALID_PARAMETERS.into(),
                hvc64_x0(function, &[mpidr, entry, 0]),
            )?;
        }
    }
    let garbage = 0xdead_beef_u64 << 32;
    require_answer(
        format_args!(
            "CPU_ON_32 of the caller and a valid entry, upper halves {garbage:#x} (ignored)"
        ),
        ALREADY_ON.into(),
        hvc64_x0(psci::PSCI_CPU_ON_32, &[me | garbage, entry | garbage, 0]),
    )?;
    for &cpu in &suite.cpus {
        for (what, bad) in bad_entries() {
            require_answer(
                format_args!("CPU_ON({cpu}, entry {bad:#x}: {what})"),
                INVALID_ADDRESS.into(),
                hvc64_x0(psci::PSCI_CPU_ON_64, &[cpu.as_u64(), bad, 0]),
            )?;
        }
    }
    for level in [1, 2, 3, 0xff, u64::MAX] {
        require_answer(
            format_args!("AFFINITY_INFO(caller, level {level:#x})"),
            INVALID_PARAMETERS.into(),
            hvc64_x0(psci::PSCI_AFFINITY_INFO_64, &[me, level]),
        )?;
    }
    for &mpidr in &suite.unknown_mpidrs {
        require_answer(
            format_args!("AFFINITY_INFO(unknown MPIDR {mpidr:#x}, 0)"),
            INVALID_PARAMETERS.into(),
            hvc64_x0(psci::PSCI_AFFINITY_INFO_64, &[mpidr, 0]),
        )?;
    }
    let not_supported = i64::from(psci::error::NOT_SUPPORTED);
    for function in [
        psci::PSCI_CPU_SUSPEND_64,
        psci::PSCI_MIGRATE_64,
        psci::PSCI_MIGRATE_INFO_UP_CPU_64,
        psci::PSCI_CPU_FREEZE,
        psci::PSCI_SYSTEM_SUSPEND_64,
        psci::PSCI_SYSTEM_RESET2_64,
        psci::PSCI_MEM_PROTECT,
        psci::PSCI_STAT_COUNT_64,
        0x8400_001f,
    ] {
        if hvc64_x0(psci::PSCI_FEATURES, &[u64::from(function)]) != not_supported {
            // Implemented: calling it would do what it says.
            continue;
        }
        require_answer(
            format_args!("PSCI function {function:#x}, which PSCI_FEATURES says is not supported"),
            not_supported,
            hvc64_x0(function, &[0, 0, 0]),
        )?;
    }
    every_other_vcpu_off("after the rejected calls")
}

/// The caller is ON and every other vCPU is OFF (a vCPU that has just
/// finished a job may take a moment to get there).
fn every_other_vcpu_off(when: &str) -> Outcome {
    let me = Mpidr::current();
    require_answer(
        format_args!("AFFINITY_INFO(caller {me}, 0) {when}"),
        AffinityState::On as i64,
        hvc64_x0(psci::PSCI_AFFINITY_INFO_64, &[me.as_u64(), 0]),
    )?;
    for &cpu in suite().cpus.iter().filter(|&&cpu| cpu != me) {
        wait_off(cpu).map_err(|_| HostileFailure::Answer {
            attempt: format!("AFFINITY_INFO({cpu}, 0) {when}"),
            expected: format!("OFF within {OFF_TIMEOUT:?}"),
            got: format!(
                "{}",
                hvc64_x0(psci::PSCI_AFFINITY_INFO_64, &[cpu.as_u64(), 0])
            ),
        })?;
    }
    Ok(())
}

// --- Running on every vCPU -------------------------------------------------------------

/// How long a vCPU waits for the others at a [`barrier`].
const BARRIER_TIMEOUT: Duration = Duration::from_secs(10);

/// vCPUs that take part in the barrier of the current job.
static BARRIER_PARTIES: AtomicUsize = AtomicUsize::new(0);
/// vCPUs that have reached the current barrier.
static BARRIER_ARRIVED: AtomicUsize = AtomicUsize::new(0);
/// Barriers completed: a waiter leaves when it changes. The last arrival
/// resets the count, then bumps this with Release; waiters read it with
/// Acquire, so they see what every party did before arriving.
static BARRIER_GENERATION: AtomicUsize = AtomicUsize::new(0);

/// Waits until every party of the current job has called it as often.
fn barrier() -> Outcome {
    let generation = BARRIER_GENERATION.load(Ordering::Acquire);
    let parties = BARRIER_PARTIES.load(Ordering::Relaxed);
    if BARRIER_ARRIVED.fetch_add(1, Ordering::AcqRel) + 1 == parties {
        BARRIER_ARRIVED.store(0, Ordering::Relaxed);
        BARRIER_GENERATION.fetch_add(1, Ordering::Release);
        return Ok(());
    }
    let deadline = Deadline::after(BARRIER_TIMEOUT);
    while BARRIER_GENERATION.load(Ordering::Acquire) == generation {
        if JOB_FAILED.load(Ordering::Acquire) {
            return Err(HostileFailure::Abandoned);
        }
        if deadline.expired() {
            return Err(HostileFailure::Timeout {
                what: "the other vCPUs reaching the barrier",
                waited: BARRIER_TIMEOUT,
            });
        }
        core::hint::spin_loop();
    }
    Ok(())
}

/// What each vCPU's share of the current job found.
static JOB_OUTCOMES: [spin::Mutex<Option<Outcome>>; MAX_CPUS] =
    [const { spin::Mutex::new(None) }; MAX_CPUS];

/// Set when a vCPU's share of the current job failed: the others stop
/// waiting for it at their barriers.
static JOB_FAILED: AtomicBool = AtomicBool::new(false);

/// Records vCPU `cpu`'s outcome of the current job.
fn finish(cpu: usize, outcome: Outcome) {
    if outcome.is_err() {
        JOB_FAILED.store(true, Ordering::Release);
    }
    *JOB_OUTCOMES[cpu].lock() = Some(outcome);
}

/// Runs `job` on every vCPU (see [`smp::run_on_all`]) with `parties` of
/// them in its barriers; fails with the first vCPU's failure (DTB order).
fn on_all_vcpus(parties: usize, job: smp::Job, timeout: Duration) -> Outcome {
    let suite = suite();
    for outcome in &JOB_OUTCOMES {
        *outcome.lock() = None;
    }
    JOB_FAILED.store(false, Ordering::Relaxed);
    BARRIER_ARRIVED.store(0, Ordering::Relaxed);
    BARRIER_PARTIES.store(parties, Ordering::Relaxed);
    let ran = smp::run_on_all(&suite.cpus, job, timeout);
    let mut failures = Vec::new();
    for (cpu, outcome) in JOB_OUTCOMES.iter().enumerate().take(suite.cpus.len()) {
        match outcome.lock().take() {
            Some(Ok(())) => {}
            Some(Err(failure)) => failures.push((cpu, failure)),
            // Only a vCPU the runner reports as unfinished may have none.
            None if ran.is_err() => {}
            None => failures.push((cpu, HostileFailure::Setup("the job recorded no outcome"))),
        }
    }
    // The vCPUs that gave up because of another one only add noise.
    if failures
        .iter()
        .any(|(_, f)| !matches!(f, HostileFailure::Abandoned))
    {
        failures.retain(|(_, f)| !matches!(f, HostileFailure::Abandoned));
    }
    match ran {
        Ok(n) if failures.is_empty() => Ok(require(
            n == suite.cpus.len(),
            "vCPUs that ran the job",
            suite.cpus.len(),
            n,
        )?),
        Ok(_) => Err(HostileFailure::OnVcpus {
            failures,
            job: None,
        }),
        Err(job) => Err(HostileFailure::OnVcpus {
            failures,
            job: Some(job),
        }),
    }
}

/// Rounds of [`abort_storm`].
const STORM_ROUNDS: usize = 2;

/// Every vCPU at once reads, writes and fetches at every class of IPA
/// outside RAM, with `STATS` calls in between: each access gets its
/// injected abort, each call its answer.
fn abort_storm(_: &System) -> Outcome {
    on_all_vcpus(suite().cpus.len(), abort_storm_job, Duration::from_secs(30))
}

fn abort_storm_job(cpu: usize) {
    finish(cpu, abort_storm_on(cpu));
}

fn abort_storm_on(cpu: usize) -> Outcome {
    let suite = suite();
    suite.window.enable_on_this_cpu();
    barrier()?;
    for _ in 0..STORM_ROUNDS {
        for target in &suite.targets {
            probe_target(cpu, target)?;
            let x0 = hvc64_x0(func::STATS, &[stats_group::FAULTS]);
            require_answer(format_args!("STATS amid the storm"), SUCCESS, x0)?;
        }
    }
    barrier()
}

/// Rounds of [`psci_storm`].
const PSCI_ROUNDS: usize = 24;

/// Every vCPU at once, while all are ON: `CPU_ON` of every vCPU
/// (`ALREADY_ON`), of unknown MPIDRs, with bad entry points; `AFFINITY_INFO`
/// of every vCPU (ON) and with a bad level; unknown function IDs
/// (`NOT_SUPPORTED`); `PSCI_VERSION`.
fn psci_storm(_: &System) -> Outcome {
    on_all_vcpus(suite().cpus.len(), psci_storm_job, Duration::from_secs(30))
}

fn psci_storm_job(cpu: usize) {
    finish(cpu, psci_storm_on(cpu));
}

fn psci_storm_on(cpu: usize) -> Outcome {
    let suite = suite();
    let entry = boot::secondary_entry_point().as_u64();
    let bad = bad_entries();
    let me = Mpidr::current().as_u64();
    barrier()?;
    for round in 0..PSCI_ROUNDS {
        for &target in &suite.cpus {
            let t = target.as_u64();
            require_answer(
                format_args!("CPU_ON({target}) while every vCPU is ON"),
                ALREADY_ON.into(),
                hvc64_x0(psci::PSCI_CPU_ON_64, &[t, entry, round as u64]),
            )?;
            require_answer(
                format_args!("AFFINITY_INFO({target}, 0) while every vCPU is ON"),
                AffinityState::On as i64,
                hvc64_x0(psci::PSCI_AFFINITY_INFO_64, &[t, 0]),
            )?;
        }
        let unknown = suite.unknown_mpidrs[(round + cpu) % suite.unknown_mpidrs.len()];
        require_answer(
            format_args!("CPU_ON(unknown MPIDR {unknown:#x})"),
            INVALID_PARAMETERS.into(),
            hvc64_x0(psci::PSCI_CPU_ON_64, &[unknown, entry, 0]),
        )?;
        let (what, bad_entry) = bad[(round + cpu) % bad.len()];
        let target = suite.cpus[round % suite.cpus.len()];
        require_answer(
            format_args!("CPU_ON({target}, entry {bad_entry:#x}: {what})"),
            INVALID_ADDRESS.into(),
            hvc64_x0(psci::PSCI_CPU_ON_64, &[target.as_u64(), bad_entry, 0]),
        )?;
        require_answer(
            format_args!("AFFINITY_INFO(caller, level 1)"),
            INVALID_PARAMETERS.into(),
            hvc64_x0(psci::PSCI_AFFINITY_INFO_64, &[me, 1]),
        )?;
        let unknown_id = 0xC600_0100 | (round as u32 & 0xff);
        require_answer(
            format_args!("unknown function {unknown_id:#x}"),
            NOT_SUPPORTED,
            hvc64_x0(unknown_id, &[1, 2, 3]),
        )?;
        require_answer(
            format_args!("PSCI_VERSION"),
            0x0001_0001,
            hvc64_x0(psci::PSCI_VERSION, &[]),
        )?;
    }
    barrier()
}

/// Rounds of [`cpu_on_race`].
const RACE_ROUNDS: usize = 12;
/// How long a raced vCPU may take to power itself off again.
const OFF_TIMEOUT: Duration = Duration::from_secs(2);

/// The vCPU the racers start (DTB index), and their answers this round.
static RACE_TARGET: AtomicUsize = AtomicUsize::new(0);
static RACE_ANSWERS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// The word a raced vCPU waits on before it powers off again (its
/// `CPU_ON` context id): 0 while the round's calls are being made, so that
/// a winner cannot be OFF again before every racer has called. On a cache
/// line of its own, which the racers clean to the point of coherency: the
/// raced vCPU reads it with its MMU off.
#[repr(C, align(64))]
struct ReleaseWord(AtomicU64);

static RACE_RELEASE: ReleaseWord = ReleaseWord(AtomicU64::new(0));

/// Sets [`RACE_RELEASE`] and makes it visible to a reader with its MMU off.
fn set_race_release(value: u64) {
    RACE_RELEASE.0.store(value, Ordering::SeqCst);
    let line = &raw const RACE_RELEASE as u64;
    // SAFETY: cleaning and invalidating a data-cache line to the point of
    // coherency writes back data the program wrote; it changes no memory
    // contents.
    unsafe {
        core::arch::asm!(
            "dc civac, {}",
            "dsb sy",
            in(reg) line,
            options(nostack, preserves_flags)
        );
    }
}

/// Every other vCPU at once `CPU_ON`s the same OFF vCPU, round after
/// round: exactly one call succeeds, the others answer `ALREADY_ON` or
/// `ON_PENDING` (the raced vCPU stays ON until every racer has called,
/// then powers itself off).
fn cpu_on_race(_: &System) -> Outcome {
    let suite = suite();
    let n = suite.cpus.len();
    let Some(target) = (0..n).rev().find(|&i| i != suite.boot_index) else {
        log::info!("hostile: cpu_on_race: 1 vCPU, nothing to race for");
        return Ok(());
    };
    RACE_TARGET.store(target, Ordering::Relaxed);
    let result = on_all_vcpus(n - 1, cpu_on_race_job, Duration::from_secs(30));
    // Whatever happened, let a started target go OFF again.
    set_race_release(1);
    result.and_then(|()| wait_off(suite.cpus[target]))
}

fn cpu_on_race_job(cpu: usize) {
    let target = RACE_TARGET.load(Ordering::Relaxed);
    if cpu == target {
        // Powers off (smp) and becomes the prize.
        finish(cpu, Ok(()));
        return;
    }
    finish(cpu, cpu_on_race_on(cpu, target));
}

/// Waits until vCPU `target` is OFF.
fn wait_off(target: Mpidr) -> Outcome {
    let deadline = Deadline::after(OFF_TIMEOUT);
    loop {
        let state = hvc64_x0(psci::PSCI_AFFINITY_INFO_64, &[target.as_u64(), 0]);
        if state == AffinityState::Off as i64 {
            return Ok(());
        }
        if deadline.expired() {
            return Err(HostileFailure::Timeout {
                what: "a vCPU powering itself off",
                waited: OFF_TIMEOUT,
            });
        }
        core::hint::spin_loop();
    }
}

fn cpu_on_race_on(cpu: usize, target: usize) -> Outcome {
    let suite = suite();
    let mpidr = suite.cpus[target];
    let entry = symbol(hostile_race_entry);
    let release = &raw const RACE_RELEASE as u64;
    // The first racer in DTB order opens and closes the rounds.
    let leader = cpu == usize::from(target == 0);
    let racers = suite.cpus.len() - 1;
    for round in 0..RACE_ROUNDS {
        wait_off(mpidr)?;
        if leader {
            set_race_release(0);
        }
        barrier()?;
        let x0 = hvc64_x0(psci::PSCI_CPU_ON_64, &[mpidr.as_u64(), entry, release]);
        RACE_ANSWERS[cpu].store(x0 as u64, Ordering::Relaxed);
        barrier()?;
        let answers: Vec<i64> = (0..suite.cpus.len())
            .filter(|&i| i != target)
            .map(|i| RACE_ANSWERS[i].load(Ordering::Relaxed) as i64)
            .collect();
        let wins = answers.iter().filter(|&&a| a == SUCCESS).count();
        let losses_ok = answers
            .iter()
            .all(|&a| a == SUCCESS || a == i64::from(ALREADY_ON) || a == i64::from(ON_PENDING));
        answer(
            wins == 1 && losses_ok && answers.len() == racers,
            || format!("round {round}: {racers} vCPUs racing to CPU_ON({mpidr})"),
            "exactly one SUCCESS, the others ALREADY_ON or ON_PENDING",
            format_args!("{answers:?}"),
        )?;
        // Nobody overwrites the answers before everyone has read them.
        barrier()?;
        if leader {
            set_race_release(1);
        }
    }
    wait_off(mpidr)
}

// --- Aging and release races ------------------------------------------------------------

/// Pages of the race arena (one stage-2 leaf table).
const ARENA_PAGES: u64 = 512;
/// Arena pages the toucher writes; the rest hold the inner harvester's
/// bitmaps (inside the range it ages and the releaser releases).
const TOUCHED_PAGES: u64 = 496;
/// Bitmap pages of the outer harvester (outside the arena).
const OUTER_BITMAPS: u64 = 8;
/// How long the roles run.
const RACE_TIME: Duration = Duration::from_millis(300);

static ARENA: AtomicU64 = AtomicU64::new(0);
static OUTER: AtomicU64 = AtomicU64::new(0);
static RACE_CALLS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// What a vCPU does in [`aging_release_race`] (by DTB index; extra vCPUs
/// release).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Role {
    /// Ages the whole arena into bitmaps outside it, every flag mix.
    OuterHarvester,
    /// Releases random runs of the arena and the outer bitmaps.
    Releaser,
    /// Writes and reads back words of the arena.
    Toucher,
    /// Ages the whole arena into bitmaps inside it.
    InnerHarvester,
}

fn role(cpu: usize) -> Role {
    match cpu {
        0 => Role::OuterHarvester,
        1 => Role::Releaser,
        2 => Role::Toucher,
        3 => Role::InnerHarvester,
        _ => Role::Releaser,
    }
}

/// Every vCPU at once, for [`RACE_TIME`]: harvesters age an arena whose
/// pages — and whose bitmap pages — a releaser gives back and a toucher
/// writes at the same moment. Every call answers success (or
/// `NO_MEMORY`), never more young pages than the range has, a bitmap never
/// shows more young pages than the call reported, a touched word reads
/// back as written or as zero (released meanwhile). Afterwards a release
/// of the arena leaves every page zero.
fn aging_release_race(_: &System) -> Outcome {
    let suite = suite();
    let arena = frames::alloc(ARENA_PAGES as usize)?;
    let outer = frames::alloc(OUTER_BITMAPS as usize)?;
    ARENA.store(arena.frame(0).as_u64(), Ordering::Relaxed);
    OUTER.store(outer.frame(0).as_u64(), Ordering::Relaxed);
    let result =
        on_all_vcpus(suite.cpus.len(), aging_race_job, Duration::from_secs(30)).and_then(|()| {
            let calls: Vec<(Role, u64)> = (0..suite.cpus.len())
                .map(|cpu| (role(cpu), RACE_CALLS[cpu].load(Ordering::Relaxed)))
                .collect();
            log::info!("hostile: aging_release_race calls per vCPU: {calls:?}");
            let base = arena.frame(0).as_u64();
            let released = smccc_client::mem_release(base, ARENA_PAGES)?;
            require(
                released.pages <= ARENA_PAGES,
                "MEM_RELEASE(arena) x0 after the race",
                format_args!("<= {ARENA_PAGES}"),
                released.pages,
            )?;
            for p in 0..ARENA_PAGES {
                let ipa = base + p * PAGE_SIZE;
                let word = read_word(ipa, p as usize % PAGE_WORDS);
                require(
                    word == 0,
                    "a word of the released arena",
                    0,
                    format_args!("{word:#x} (page {p})"),
                )?;
            }
            require_page(
                base + (ARENA_PAGES - 1) * PAGE_SIZE,
                "the last released page",
                |_| 0,
            )
        });
    frames::free(arena);
    frames::free(outer);
    result
}

fn aging_race_job(cpu: usize) {
    finish(cpu, aging_race_on(cpu));
}

fn aging_race_on(cpu: usize) -> Outcome {
    let arena = ARENA.load(Ordering::Relaxed);
    let outer = OUTER.load(Ordering::Relaxed);
    RACE_CALLS[cpu].store(0, Ordering::Relaxed);
    barrier()?;
    let deadline = Deadline::after(RACE_TIME);
    let mut calls = 0u64;
    let mut rng = 0x5eed_0000 ^ cpu as u64;
    while !deadline.expired() {
        rng = pattern(rng, 0);
        match role(cpu) {
            Role::OuterHarvester => {
                let bitmap = outer + (calls % OUTER_BITMAPS) * PAGE_SIZE;
                harvest(arena, bitmap, calls)?;
            }
            Role::InnerHarvester => {
                let spare = ARENA_PAGES - TOUCHED_PAGES;
                let bitmap = arena + (TOUCHED_PAGES + calls % spare) * PAGE_SIZE;
                harvest(arena, bitmap, calls)?;
            }
            Role::Releaser => {
                let (ipa, pages) = if calls % 4 == 3 {
                    (outer + (rng % OUTER_BITMAPS) * PAGE_SIZE, 1)
                } else {
                    let first = rng % ARENA_PAGES;
                    let pages = (1 + (rng >> 20) % 64).min(ARENA_PAGES - first);
                    (arena + first * PAGE_SIZE, pages)
                };
                let r = smccc_client::call64(func::MEM_RELEASE, &[ipa, pages]);
                let x0 = r[0] as i64;
                answer(
                    (0..=pages as i64).contains(&x0),
                    || format!("MEM_RELEASE({ipa:#x}, {pages}) amid aging"),
                    format_args!("0..={pages} pages released"),
                    x0,
                )?;
            }
            Role::Toucher => {
                let p = calls % TOUCHED_PAGES;
                let ipa = arena + p * PAGE_SIZE;
                let i = p as usize % PAGE_WORDS;
                let value = (p << 32) | (calls & 0xffff_fffe) | 1;
                write_word(ipa, i, value);
                let got = read_word(ipa, i);
                answer(
                    got == value || got == 0,
                    || format!("word {i} of arena page {p} read back amid releases"),
                    format_args!("{value:#x} or 0 (released meanwhile)"),
                    format_args!("{got:#x}"),
                )?;
            }
        }
        calls += 1;
    }
    RACE_CALLS[cpu].store(calls, Ordering::Relaxed);
    require(calls > 0, "calls a role made in the race", "> 0", calls)?;
    barrier()
}

/// One `AGING_TEST_CLEAR` of the whole arena into `bitmap`, with the
/// `n`th flag mix.
fn harvest(arena: u64, bitmap: u64, n: u64) -> Outcome {
    use age_flags::{CLEAR, FLUSH, MASK};
    const MIXES: [u64; 5] = [0, CLEAR, CLEAR | FLUSH, CLEAR | MASK, CLEAR | MASK | FLUSH];
    let flags = MIXES[(n % MIXES.len() as u64) as usize];
    let words = (ARENA_PAGES / 64) as usize;
    // All ones: the input of MASK, and for every call a canary the answer
    // must overwrite (or a release zero).
    for i in 0..words {
        write_word(bitmap, i, u64::MAX);
    }
    let x0 = hvc64_x0(func::AGING_TEST_CLEAR, &[arena, ARENA_PAGES, bitmap, flags]);
    if x0 == NO_MEMORY {
        return Ok(());
    }
    let attempt = || {
        format!(
            "AGING_TEST_CLEAR({arena:#x}, {ARENA_PAGES}, {bitmap:#x}, {flags:#x}) amid releases"
        )
    };
    answer(
        (0..=ARENA_PAGES as i64).contains(&x0),
        attempt,
        format_args!("0..={ARENA_PAGES} young pages or NO_MEMORY"),
        x0,
    )?;
    let bitmap_words: Vec<u64> = (0..words).map(|i| read_word(bitmap, i)).collect();
    let bits: u64 = bitmap_words.iter().map(|w| u64::from(w.count_ones())).sum();
    answer(
        bits <= x0 as u64,
        attempt,
        format_args!(
            "the answer in the bitmap (at most {x0} bits set; words released meanwhile read 0)"
        ),
        format_args!(
            "{bits} bits set: {bitmap_words:x?}{}",
            if bitmap_words.iter().all(|&w| w == u64::MAX) {
                " (the canary written before the call: this vCPU reads another frame than \
                 the one the answer went to, e.g. stage 2 remapped the page before the TLB \
                 flush of a concurrent MEM_RELEASE)"
            } else {
                ""
            }
        ),
    )
}

/// A bitmap page the guest released is backed again by the hypervisor's
/// write: after touching pages 0, 3 and 63 of a released range and
/// releasing the (written) bitmap page, `AGING_TEST_CLEAR` reports
/// exactly those three, in a page that is otherwise zero.
fn released_bitmap_backed_again(_: &System) -> Outcome {
    let run = frames::alloc(128)?;
    let result = (|| {
        let range = run.frame(0).as_u64();
        let bitmap = run.frame(64).as_u64();
        smccc_client::mem_release(range, 64)?;
        for i in 0..PAGE_WORDS {
            write_word(bitmap, i, SENTINEL);
        }
        for p in [0u64, 3, 63] {
            write_word(range + p * PAGE_SIZE, 0, p + 1);
        }
        let released = smccc_client::mem_release(bitmap, 1)?;
        require(
            released.pages == 1,
            "MEM_RELEASE of the written bitmap page",
            1,
            released.pages,
        )?;
        let young = smccc_client::aging_test_clear(range, 64, bitmap, 0)?;
        let want = 1u64 | 1 << 3 | 1 << 63;
        let word = read_word(bitmap, 0);
        require(
            young == 3 && word == want,
            "AGING_TEST_CLEAR into the released bitmap page",
            format_args!("young 3, bitmap {want:#x}"),
            format_args!("young {young}, bitmap {word:#x}"),
        )?;
        require_page(bitmap, "the rest of the re-backed bitmap page", |i| {
            if i == 0 {
                want
            } else {
                0
            }
        })
    })();
    frames::free(run);
    result
}

// --- Self-harm ------------------------------------------------------------------------

/// The sacrificial vCPU's state, shared with hostile.S (which stores into
/// it through raw offsets; `regs` must stay first).
#[repr(C)]
struct Sacrifice {
    /// x19..x30 of the caller of `hostile_sacrifice`.
    regs: [AtomicU64; 12],
    sp: AtomicU64,
    vbar: AtomicU64,
    /// Where the private vectors are mapped (executable scratch page).
    vectors_va: AtomicU64,
    /// The frame behind them.
    vectors_ipa: AtomicU64,
    /// The private stack page.
    stack_ipa: AtomicU64,
    /// Pushed on the private stack before its release.
    marker: AtomicU64,
    /// `MEM_RELEASE`'s function ID.
    release_fid: AtomicU64,
    /// x0 of the release of the stack page.
    stack_release: AtomicU64,
    /// The marker's slot read back after that release.
    stack_after: AtomicU64,
    /// x0 of the release of the vectors page.
    vectors_release: AtomicU64,
    /// 1 once both are released (stored with release semantics).
    stage: AtomicU64,
    /// `ESR_EL1` / `ELR_EL1` of the exception that reached a private
    /// vector (0 until then).
    esr: AtomicU64,
    elr: AtomicU64,
}

const _: () = assert!(offset_of!(Sacrifice, regs) == 0);

static SACRIFICE: Sacrifice = Sacrifice {
    regs: [const { AtomicU64::new(0) }; 12],
    sp: AtomicU64::new(0),
    vbar: AtomicU64::new(0),
    vectors_va: AtomicU64::new(0),
    vectors_ipa: AtomicU64::new(0),
    stack_ipa: AtomicU64::new(0),
    marker: AtomicU64::new(0),
    release_fid: AtomicU64::new(0),
    stack_release: AtomicU64::new(0),
    stack_after: AtomicU64::new(0),
    vectors_release: AtomicU64::new(0),
    stage: AtomicU64::new(0),
    esr: AtomicU64::new(0),
    elr: AtomicU64::new(0),
};

/// The sacrificial vCPU (DTB index).
static VICTIM: AtomicUsize = AtomicUsize::new(0);
/// vCPUs that have checked the hypervisor while the victim was down.
static CHECKED: AtomicUsize = AtomicUsize::new(0);

/// How long the others wait for the victim to release its pages, and
/// for it to come back after the repair.
const VICTIM_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the victim is left looping before the repair.
const VICTIM_DOWN: Duration = Duration::from_millis(20);
/// How long the boot vCPU waits for the victim after each repair.
const REPAIR_PAUSE: Duration = Duration::from_millis(50);
/// Size of the vector table.
const VECTORS_SIZE: u64 = 0x800;
/// Offset of the vector the victim loops on: synchronous, current EL, SPx.
const VECTOR_CURRENT_SPX: u64 = 0x200;

/// Self-harm: the last vCPU switches to vectors and a stack of its own,
/// `MEM_RELEASE`s the stack page (what it pushed reads back zero) and the
/// vectors page, and takes an exception: the vector is now zeros (UDF),
/// so it raises the same exception at the vector forever, inside the
/// guest. Meanwhile the other vCPUs check that the hypervisor answers
/// (`STATS`, `AGING_FEATURES`, `AFFINITY_INFO` = ON), that the victim has
/// not come back, and that both released pages read zero; then the boot
/// vCPU writes the vectors back, and the victim's next exception (EC 0 at
/// the vector) reaches them and returns it to the kernel.
fn self_harm(_: &System) -> Outcome {
    let suite = suite();
    let n = suite.cpus.len();
    let Some(victim) = (0..n).rev().find(|&i| i != suite.boot_index) else {
        log::info!("hostile: self_harm: 1 vCPU, no vCPU to sacrifice");
        return Ok(());
    };
    VICTIM.store(victim, Ordering::Relaxed);
    CHECKED.store(0, Ordering::Relaxed);
    let pages = frames::alloc(2)?;
    let (vectors_ipa, stack_ipa) = (pages.frame(0).as_u64(), pages.frame(1).as_u64());
    let source = symbol(hostile_private_vectors);
    require(
        symbol(hostile_private_vectors_end) - source == VECTORS_SIZE,
        "size of hostile_private_vectors",
        VECTORS_SIZE,
        symbol(hostile_private_vectors_end) - source,
    )?;
    for i in 0..PAGE_WORDS {
        write_word(vectors_ipa, i, 0);
        write_word(stack_ipa, i, 0);
    }
    copy_code(source, vectors_ipa, VECTORS_SIZE);
    sync_code(vectors_ipa, VECTORS_SIZE);
    let page = slot(victim, Slot::Vectors);
    suite.window.map(page, vectors_ipa, ScratchKind::Executable);
    let vectors_va = suite.window.va(page);
    let s = &SACRIFICE;
    s.vectors_va.store(vectors_va, Ordering::Relaxed);
    s.vectors_ipa.store(vectors_ipa, Ordering::Relaxed);
    s.stack_ipa.store(stack_ipa, Ordering::Relaxed);
    s.marker.store(SENTINEL, Ordering::Relaxed);
    s.release_fid
        .store(u64::from(func::MEM_RELEASE), Ordering::Relaxed);
    for field in [&s.stack_release, &s.stack_after, &s.vectors_release] {
        field.store(u64::MAX, Ordering::Relaxed);
    }
    for field in [&s.stage, &s.esr, &s.elr] {
        field.store(0, Ordering::Relaxed);
    }
    let result = on_all_vcpus(n, self_harm_job, Duration::from_secs(30)).and_then(|()| {
        let udf = symbol(hostile_sacrifice_udf);
        let (esr, elr) = (s.esr.load(Ordering::Acquire), s.elr.load(Ordering::Acquire));
        answer(
            elr != udf,
            || String::from("the victim's exception after releasing its vectors"),
            "taken at the zeroed vector",
            format_args!("caught by the intact private vectors at the udf ({udf:#x}): the vectors page survived MEM_RELEASE"),
        )?;
        let vector = vectors_va + VECTOR_CURRENT_SPX;
        answer(
            esr == (ESR_EL1::EC::Unknown + ESR_EL1::IL::SET).value
                && (elr == vector || elr == vector + 4),
            || String::from("the exception the victim looped on"),
            format_args!("EC 0 (ESR 0x2000000) at the zeroed vector {vector:#x}"),
            format_args!("ESR {esr:#x} at {elr:#x}"),
        )?;
        let results = [
            ("MEM_RELEASE of the victim's stack page", s.stack_release.load(Ordering::Relaxed), 1),
            ("MEM_RELEASE of the victim's vectors page", s.vectors_release.load(Ordering::Relaxed), 1),
            ("the victim's pushed marker after its stack's release", s.stack_after.load(Ordering::Relaxed), 0),
        ];
        for (what, got, want) in results {
            require(got == want, what, want, format_args!("{got:#x}"))?;
        }
        Ok(())
    });
    suite.window.unmap(page);
    frames::free(pages);
    result
}

fn self_harm_job(cpu: usize) {
    finish(cpu, self_harm_on(cpu));
}

fn self_harm_on(cpu: usize) -> Outcome {
    let suite = suite();
    let s = &SACRIFICE;
    let victim = VICTIM.load(Ordering::Relaxed);
    if cpu == victim {
        suite.window.enable_on_this_cpu();
        // SAFETY: `SACRIFICE` is set up for this vCPU (private vectors
        // mapped executable at `vectors_va`, a private stack page); the
        // routine saves and restores every callee-saved register, the
        // stack pointer and VBAR_EL1, and returns once its vectors are
        // repaired. It uses no other memory of the program.
        unsafe { hostile_sacrifice(s) };
        return Ok(());
    }
    let deadline = Deadline::after(VICTIM_TIMEOUT);
    while s.stage.load(Ordering::Acquire) != 1 {
        if deadline.expired() {
            return Err(HostileFailure::Timeout {
                what: "the victim releasing its vectors and stack",
                waited: VICTIM_TIMEOUT,
            });
        }
        core::hint::spin_loop();
    }
    // The hypervisor answers while the victim is down. Counted done
    // whatever the outcome: the boot vCPU repairs the victim in any case.
    let checked = check_while_down(suite.cpus[victim]);
    CHECKED.fetch_add(1, Ordering::AcqRel);
    if cpu != suite.boot_index {
        return checked;
    }
    let observed = observe_victim_down();
    let vectors = s.vectors_ipa.load(Ordering::Relaxed);
    let deadline = Deadline::after(VICTIM_TIMEOUT);
    let mut repairs = 0u32;
    while s.esr.load(Ordering::Acquire) == 0 {
        if deadline.expired() {
            let entry = VECTOR_CURRENT_SPX as usize / 8;
            return Err(HostileFailure::Answer {
                attempt: String::from("the victim, after its vectors were repaired"),
                expected: format!("back within {VICTIM_TIMEOUT:?}"),
                got: format!(
                    "not back after {repairs} repairs; vectors page word {entry}, {} = {:#x}, {:#x}; {}",
                    entry + 1,
                    read_word(vectors, entry),
                    read_word(vectors, entry + 1),
                    observed.err().map_or(String::new(), |e| format!("{e}")),
                ),
            });
        }
        // Written again while the victim does not come back: QEMU's TCG
        // can keep executing code translated from the zeroed page when
        // the write races with its translation (cross-modifying code);
        // each write invalidates the translations of the page again.
        repair_vectors(vectors);
        repairs += 1;
        let pause = Deadline::after(REPAIR_PAUSE);
        while s.esr.load(Ordering::Acquire) == 0 && !pause.expired() {
            core::hint::spin_loop();
        }
    }
    if repairs > 1 {
        log::info!(
            "hostile: self_harm: the victim came back after {repairs} repairs of its vectors"
        );
    }
    checked.and(observed)
}

/// The hypervisor's answers while `victim` loops in its zeroed vector.
fn check_while_down(victim: Mpidr) -> Outcome {
    smccc_client::stats()?;
    smccc_client::aging_features()?;
    require_answer(
        format_args!("AFFINITY_INFO({victim}) of the looping victim"),
        AffinityState::On as i64,
        hvc64_x0(psci::PSCI_AFFINITY_INFO_64, &[victim.as_u64(), 0]),
    )?;
    Ok(())
}

/// The boot vCPU's checks before the repair: once every other vCPU has
/// checked the hypervisor, and [`VICTIM_DOWN`] after the release, the
/// victim has not come back and both released pages read zero.
fn observe_victim_down() -> Outcome {
    let s = &SACRIFICE;
    let down = Deadline::after(VICTIM_DOWN);
    while !down.expired() {
        core::hint::spin_loop();
    }
    let others = suite().cpus.len() - 1;
    let deadline = Deadline::after(VICTIM_TIMEOUT);
    while CHECKED.load(Ordering::Acquire) < others {
        if deadline.expired() {
            return Err(HostileFailure::Timeout {
                what: "the other vCPUs checking the hypervisor",
                waited: VICTIM_TIMEOUT,
            });
        }
        core::hint::spin_loop();
    }
    let esr = s.esr.load(Ordering::Acquire);
    require(
        esr == 0,
        "the victim, 20 ms after releasing its vectors",
        "still looping (no ESR recorded)",
        format_args!(
            "back with ESR {esr:#x} at {:#x}",
            s.elr.load(Ordering::Relaxed)
        ),
    )?;
    require_page(
        s.vectors_ipa.load(Ordering::Relaxed),
        "the victim's released vectors page",
        |_| 0,
    )?;
    require_page(
        s.stack_ipa.load(Ordering::Relaxed),
        "the victim's released stack page",
        |_| 0,
    )
}

/// Writes the private vectors back into the page at `vectors` while the
/// victim executes it: per entry the literal first, then the branch, then
/// the load, so that a half-written entry is still zeros (UDF) where the
/// victim enters it and it simply takes the exception again.
fn repair_vectors(vectors: u64) {
    let source = symbol(hostile_private_vectors);
    for (offset, len) in [(8, 8), (4, 4), (0, 4)] {
        for entry in (0..VECTORS_SIZE).step_by(0x80) {
            copy_code(source + entry + offset, vectors + entry + offset, len);
        }
        sync_code(vectors, VECTORS_SIZE);
    }
}

// --- The end ---------------------------------------------------------------------------

/// After everything above, the hypervisor answers every kind of call:
/// `STATS` of every group, `AGING_FEATURES`, `FEATURES`, `PSCI_VERSION`
/// 1.1, and every vCPU is OFF again but the caller.
fn hypervisor_still_alive(_: &System) -> Outcome {
    for group in [
        stats_group::FAULTS,
        stats_group::MEMORY,
        stats_group::STORE,
        stats_group::AGING,
    ] {
        smccc_client::stats_group(group)?;
    }
    smccc_client::aging_features()?;
    smccc_client::features()?;
    require_answer(
        format_args!("PSCI_VERSION (1.1)"),
        0x0001_0001,
        hvc64_x0(psci::PSCI_VERSION, &[]),
    )?;
    every_other_vcpu_off("at the end")
}
