//! Test mode (`mode=test`): the on-target test suite.
//!
//! Each test is a named function in [`TESTS`]; the runner prints
//! `guest: test NAME ... ok` or `guest: test NAME ... FAILED: reason`,
//! then `guest: N passed, M failed`, and ends the machine through `EXIT`
//! with 0 when nothing failed and 1 otherwise.
//!
//! Tests that need our hypervisor (vendor calls, stage-2 statistics, the
//! injected abort, the hostile-guest tests) fail on plain QEMU; that is
//! expected.
//!
//! The hostile-guest tests (`psci_cpu_on_bad_mpidr` .. `hypervisor_still_alive`)
//! make calls and accesses a well-behaved kernel would not, and check that
//! the hypervisor gives each the architectural answer (docs/ABI.md, the
//! PSCI specification) and keeps running.

use alloc::format;
use alloc::string::String;
use core::fmt;

use aarch64_cpu::registers::ESR_EL1;
use aarch64_cpu::registers::{CurrentEL, Readable, TTBR0_EL1};
use hyp_abi::psci::error::{ALREADY_ON, INVALID_ADDRESS, INVALID_PARAMETERS};
use hyp_abi::psci::{self, AffinityState, LowestAffinityLevel, Version};
use hyp_abi::{feature, func, HYP_UID};
use smccc::Hvc;

use crate::abi_tests;
use crate::addr::{PhysAddr, PAGE_SIZE};
use crate::boot;
use crate::demo::touch_run;
use crate::exceptions::{self, Expected};
use crate::frames::{self, FrameError};
use crate::mmio;
use crate::mmu::{self, UNBACKED_PROBE};
use crate::power::{self, ExitCode};
use crate::smccc_client::{self, CallError};
use crate::smp::{BringUpError, Mpidr};
use crate::stress::{self, StressError};
use crate::timer;
use crate::System;

/// A test's body.
type TestFn = fn(&System) -> Result<(), Failure>;

/// The suite, in execution order.
const TESTS: &[(&str, TestFn)] = &[
    ("vcpus_up", vcpus_up),
    ("mmu_on", mmu_on),
    ("el1", el1),
    ("touch_memory_mapped_frames", touch_memory_mapped_frames),
    ("abort_outside_ram", abort_outside_ram),
    ("psci_version_features", psci_version_features),
    (
        "unknown_hypercall_not_supported",
        unknown_hypercall_not_supported,
    ),
    ("vendor_uid", vendor_uid),
    ("vendor_revision", vendor_revision),
    ("features", features),
    ("counter_runs", counter_runs),
    ("console_long_line", console_long_line),
    // After `touch_memory_mapped_frames`, which counts freshly mapped
    // frames (this one maps some); before the hostile tests, which find
    // the secondaries OFF again afterwards.
    ("stress", stress),
    ("psci_cpu_on_bad_mpidr", psci_cpu_on_bad_mpidr),
    ("psci_cpu_on_bad_entry", psci_cpu_on_bad_entry),
    ("psci_cpu_on_already_on", psci_cpu_on_already_on),
    ("psci_affinity_info", psci_affinity_info),
    ("exit_code_out_of_range", exit_code_out_of_range),
    ("smc_not_supported", smc_not_supported),
    ("undefined_sysreg_is_undef", undefined_sysreg_is_undef),
    // The aging, release and store calls, bad input first (abi_tests.rs).
    ("aging_features", abi_tests::aging_features),
    ("aging_bad_input", abi_tests::aging_bad_input),
    ("aging_mask_look_around", abi_tests::aging_mask_look_around),
    ("release_bad_input", abi_tests::release_bad_input),
    (
        "release_gives_zeroed_page",
        abi_tests::release_gives_zeroed_page,
    ),
    (
        "release_frees_leaf_table",
        abi_tests::release_frees_leaf_table,
    ),
    ("store_bad_input", abi_tests::store_bad_input),
    ("store_round_trip", abi_tests::store_round_trip),
    ("store_full", abi_tests::store_full),
    ("unknown_vendor_calls", abi_tests::unknown_vendor_calls),
    // Last: everything above must have left the hypervisor running.
    ("hypervisor_still_alive", hypervisor_still_alive),
];

/// Why a test failed.
#[derive(Clone, Debug)]
pub(crate) enum Failure {
    /// A vendor hypercall failed.
    Hypercall(CallError),
    /// A PSCI call failed.
    Psci {
        call: &'static str,
        error: psci::error::Error,
    },
    /// The frame allocator failed.
    Frames(FrameError),
    /// A secondary CPU could not be started.
    BringUp(BringUpError),
    /// A value differs from what the test requires.
    Value {
        what: &'static str,
        expected: String,
        actual: String,
    },
    /// An access that must abort did not.
    NoAbort { ipa: PhysAddr, read: u32 },
    /// The DTB claims the IPA the abort test needs to be unbacked.
    ProbeClaimed(PhysAddr),
    /// A call answered `x0` other than the ABI requires.
    Answer {
        call: String,
        expected: i64,
        actual: i64,
    },
    /// A read of an unimplemented system register did not raise an
    /// Undefined Instruction exception.
    NoUndef { register: &'static str, read: u64 },
    /// Every MPIDR the test would use as "unknown" is in the DTB.
    NoUnknownMpidr,
    /// The all-vCPU memory stress failed.
    Stress(StressError),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Hypercall(e) => write!(f, "{e}"),
            Self::Psci { call, error } => write!(f, "PSCI {call}: {error}"),
            Self::Frames(e) => write!(f, "frame allocator: {e}"),
            Self::BringUp(e) => write!(f, "{e}"),
            Self::Value {
                what,
                expected,
                actual,
            } => write!(f, "{what}: expected {expected}, got {actual}"),
            Self::NoAbort { ipa, read } => {
                write!(f, "read of {ipa} returned {read:#x} without an abort")
            }
            Self::ProbeClaimed(ipa) => write!(f, "{ipa} is claimed by a DTB node"),
            Self::Answer {
                call,
                expected,
                actual,
            } => write!(f, "{call}: expected x0 = {expected}, got {actual}"),
            Self::NoUndef { register, read } => write!(
                f,
                "mrs {register} returned {read:#x} without an Undefined Instruction exception"
            ),
            Self::Stress(e) => write!(f, "{e}"),
            Self::NoUnknownMpidr => write!(
                f,
                "the DTB lists every MPIDR of {UNKNOWN_MPIDRS:#x?}, none is unknown"
            ),
        }
    }
}

impl From<CallError> for Failure {
    fn from(e: CallError) -> Self {
        Self::Hypercall(e)
    }
}

impl From<StressError> for Failure {
    fn from(e: StressError) -> Self {
        Self::Stress(e)
    }
}

impl From<FrameError> for Failure {
    fn from(e: FrameError) -> Self {
        Self::Frames(e)
    }
}

/// Fails with [`Failure::Value`] unless `ok`.
pub(crate) fn require(
    ok: bool,
    what: &'static str,
    expected: impl fmt::Display,
    actual: impl fmt::Display,
) -> Result<(), Failure> {
    if ok {
        Ok(())
    } else {
        Err(Failure::Value {
            what,
            expected: format!("{expected}"),
            actual: format!("{actual}"),
        })
    }
}

/// Fails with [`Failure::Answer`] unless the call described by `call`
/// answered `expected` in `x0`.
pub(crate) fn require_answer(
    call: fmt::Arguments<'_>,
    expected: i64,
    actual: i64,
) -> Result<(), Failure> {
    if actual == expected {
        Ok(())
    } else {
        Err(Failure::Answer {
            call: format!("{call}"),
            expected,
            actual,
        })
    }
}

/// `x0` of an HVC64 call, as the signed number SMCCC and PSCI answers are.
pub(crate) fn hvc64_x0(function: u32, args: &[u64]) -> i64 {
    smccc_client::call64(function, args)[0] as i64
}

/// A test and its name; `E` says why it failed.
pub(crate) type NamedTest<E> = (&'static str, fn(&System) -> Result<(), E>);

/// Runs `tests` in order, one `test NAME ... ok` or `... FAILED: why`
/// line each; `after` runs after every test and its failure fails the
/// test. Returns (passed, failed).
pub(crate) fn run_tests<E: fmt::Display>(
    system: &System,
    tests: &[NamedTest<E>],
    after: impl Fn() -> Result<(), E>,
) -> (usize, usize) {
    let (mut passed, mut failed) = (0usize, 0usize);
    for (name, test) in tests {
        match test(system).and_then(|()| after()) {
            Ok(()) => {
                passed += 1;
                log::info!("test {name} ... ok");
            }
            Err(failure) => {
                failed += 1;
                log::info!("test {name} ... FAILED: {failure}");
            }
        }
    }
    (passed, failed)
}

/// Runs the suite and ends the machine with its verdict.
pub fn run(system: &System) -> ! {
    log::info!("running {} tests", TESTS.len());
    let (passed, failed) = run_tests(system, TESTS, || Ok(()));
    log::info!("{passed} passed, {failed} failed");
    power::exit(if failed == 0 {
        ExitCode::Success
    } else {
        ExitCode::TestsFailed
    })
}

/// The kernel runs at EL1.
fn el1(_: &System) -> Result<(), Failure> {
    let el = CurrentEL.read(CurrentEL::EL);
    require(el == 1, "CurrentEL.EL", 1, el)
}

/// The MMU and caches are on, with our tables, and they translate as built.
fn mmu_on(_: &System) -> Result<(), Failure> {
    require(
        mmu::is_enabled(),
        "SCTLR_EL1.{M,C,I}",
        "all set",
        "not all set",
    )?;
    let root = mmu::root_table().map_or(0, PhysAddr::as_u64);
    let ttbr = TTBR0_EL1.get_baddr();
    require(
        root == ttbr,
        "TTBR0_EL1 base",
        format_args!("{root:#x}"),
        format_args!("{ttbr:#x}"),
    )?;
    // A static of the kernel itself: identity-mapped.
    static MARKER: u64 = 0x1234;
    let va = &raw const MARKER as u64;
    let pa = mmu::translate(va);
    require(
        pa == Some(PhysAddr(va)),
        "translation of a kernel static",
        format_args!("{va:#x}"),
        format_args!("{pa:?}"),
    )?;
    let probe = mmu::translate(UNBACKED_PROBE.as_u64());
    require(
        probe == Some(UNBACKED_PROBE),
        "translation of the probe page",
        UNBACKED_PROBE,
        format_args!("{probe:?}"),
    )?;
    let unmapped = UNBACKED_PROBE.as_u64() + PAGE_SIZE;
    let none = mmu::translate(unmapped);
    require(
        none.is_none(),
        "translation of an unmapped page",
        "a fault",
        format_args!("{none:?}"),
    )
}

/// Every CPU of the DTB reported in.
fn vcpus_up(system: &System) -> Result<(), Failure> {
    if let Some(error) = system.bring_up.errors.first() {
        return Err(Failure::BringUp(*error));
    }
    require(
        system.bring_up.up == system.bring_up.listed,
        "vCPUs up",
        system.bring_up.listed,
        system.bring_up.up,
    )
}

/// Prints a line longer than the emulated UART's line limit. The guest
/// cannot see what the hypervisor printed, so `scripts/smoke` checks the
/// other half: the line arrives in pieces marked ` \`, nothing cut.
fn console_long_line(_: &System) -> Result<(), Failure> {
    let mut line = alloc::string::String::from("long-line:");
    let mut i = 0;
    while line.len() < 2 * hyp_abi::layout::UART_MAX_LINE + 50 {
        line.push_str(&alloc::format!(" {i:03}"));
        i += 1;
    }
    log::info!("{line} :end");
    Ok(())
}

/// The virtual counter has a frequency and moves.
fn counter_runs(_: &System) -> Result<(), Failure> {
    let freq = timer::frequency();
    require(freq != 0, "CNTFRQ_EL0", "non-zero", freq)?;
    let start = timer::ticks();
    let deadline = timer::Deadline::after(core::time::Duration::from_millis(1));
    while !deadline.expired() {
        core::hint::spin_loop();
    }
    let end = timer::ticks();
    require(
        end > start,
        "CNTVCT_EL0 after 1 ms",
        format_args!("> {start}"),
        end,
    )
}

/// PSCI is at least 1.0; `PSCI_FEATURES` knows `CPU_ON` and rejects an
/// unknown function.
fn psci_version_features(_: &System) -> Result<(), Failure> {
    /// A function ID in the PSCI range that PSCI 1.1 does not define.
    const UNKNOWN_PSCI_FUNCTION: u32 = 0x8400_001F;
    let version = psci::version::<Hvc>().map_err(|error| Failure::Psci {
        call: "PSCI_VERSION",
        error,
    })?;
    require(
        version >= Version { major: 1, minor: 0 },
        "PSCI version",
        ">= 1.0",
        version,
    )?;
    psci::psci_features::<Hvc>(psci::PSCI_CPU_ON_64).map_err(|error| Failure::Psci {
        call: "PSCI_FEATURES(CPU_ON)",
        error,
    })?;
    let unknown = psci::psci_features::<Hvc>(UNKNOWN_PSCI_FUNCTION);
    require(
        unknown == Err(psci::error::Error::NotSupported),
        "PSCI_FEATURES(0x8400001f)",
        "NOT_SUPPORTED",
        format_args!("{unknown:?}"),
    )
}

/// Function IDs nobody implements answer `NOT_SUPPORTED` (-1).
fn unknown_hypercall_not_supported(_: &System) -> Result<(), Failure> {
    for id in [0xC600_00FFu32, 0xC700_1234] {
        let x0 = smccc_client::call64(id, &[])[0] as i64;
        require(
            x0 == hyp_abi::error::NOT_SUPPORTED,
            "x0 of an unknown function",
            hyp_abi::error::NOT_SUPPORTED,
            format_args!("{x0} (function {id:#x})"),
        )?;
    }
    Ok(())
}

/// The vendor service identifies itself with our UUID.
fn vendor_uid(_: &System) -> Result<(), Failure> {
    let uid = smccc_client::call_uid()?;
    require(
        uid == HYP_UID,
        "CALL_UID",
        format_args!("{HYP_UID:08x?}"),
        format_args!("{uid:08x?}"),
    )
}

/// `REVISION` is the ABI revision this kernel was built against (same
/// major, at least the same minor).
fn vendor_revision(_: &System) -> Result<(), Failure> {
    let (major, minor) = smccc_client::revision()?;
    let (want_major, want_minor) = hyp_abi::REVISION;
    require(
        major == want_major && minor >= want_minor,
        "REVISION",
        format_args!("{want_major}.{want_minor} or a later minor"),
        format_args!("{major}.{minor}"),
    )
}

/// `FEATURES` lists `EXIT` and `STATS`.
fn features(_: &System) -> Result<(), Failure> {
    let features = smccc_client::features()?;
    let wanted = feature::FEATURES | feature::EXIT | feature::STATS;
    require(
        features.has(wanted),
        "FEATURES bitmap",
        format_args!("bits {wanted:#x} set"),
        format_args!("{:#x}", features.calls),
    )
}

/// Touching 16 MiB of never-used frames makes the hypervisor map that many
/// frames (and not wildly more).
fn touch_memory_mapped_frames(_: &System) -> Result<(), Failure> {
    const PAGES: usize = (16 << 20) / PAGE_SIZE as usize;
    let before = smccc_client::stats()?;
    let run = frames::alloc(PAGES)?;
    touch_run(&run, 0xa5a5_a5a5_0000_0000);
    let after = smccc_client::stats()?;
    frames::free(run);
    let grown = after.frames_mapped.wrapping_sub(before.frames_mapped) as i64;
    let pages = PAGES as i64;
    require(
        (pages..2 * pages).contains(&grown),
        "growth of STATS frames mapped after touching 4096 pages",
        format_args!("{pages}..{}", 2 * pages),
        format_args!(
            "{grown} ({} -> {})",
            before.frames_mapped, after.frames_mapped
        ),
    )
}

/// An access outside RAM and devices takes the synchronous external abort
/// the hypervisor injects, and the kernel survives it.
fn abort_outside_ram(system: &System) -> Result<(), Failure> {
    let ipa = UNBACKED_PROBE;
    if !system.platform.is_unclaimed(ipa) {
        return Err(Failure::ProbeClaimed(ipa));
    }
    // SAFETY: the probe page is mapped as device memory; reading it either
    // returns a value or takes the abort armed here.
    let (read, abort) = exceptions::with_expected_abort(ipa, || unsafe { mmio::read32(ipa) });
    let abort = abort.ok_or(Failure::NoAbort { ipa, read })?;
    let far = abort.fault_address();
    require(
        far.is_none_or(|far| far == ipa),
        "FAR_EL1 of the abort",
        ipa,
        format_args!("{far:?}"),
    )
}

/// Affinities the hostile tests use as "no such CPU": QEMU `virt` numbers
/// its CPUs from 0 in Aff0 (a few per cluster), so none of these exists
/// unless the DTB says otherwise (checked by [`unknown_mpidrs`]).
const UNKNOWN_MPIDRS: [u64; 3] = [0xff, 0xff_00, 0xff_0000_0000];

/// The [`UNKNOWN_MPIDRS`] the DTB does not list; at least one.
fn unknown_mpidrs(system: &System) -> Result<impl Iterator<Item = u64> + '_, Failure> {
    let listed = |raw: u64| system.platform.cpus.contains(&Mpidr::from_raw(raw));
    if UNKNOWN_MPIDRS.iter().all(|&raw| listed(raw)) {
        return Err(Failure::NoUnknownMpidr);
    }
    Ok(UNKNOWN_MPIDRS.into_iter().filter(move |&raw| !listed(raw)))
}

/// The first CPU of the DTB other than the calling (boot) one.
fn secondary(system: &System) -> Option<Mpidr> {
    let me = Mpidr::current();
    system.platform.cpus.iter().copied().find(|&cpu| cpu != me)
}

/// `CPU_ON` for an MPIDR the DTB does not list: `INVALID_PARAMETERS`.
fn psci_cpu_on_bad_mpidr(system: &System) -> Result<(), Failure> {
    let entry = boot::secondary_entry_point().as_u64();
    for mpidr in unknown_mpidrs(system)? {
        let x0 = hvc64_x0(psci::PSCI_CPU_ON_64, &[mpidr, entry, 0]);
        require_answer(
            format_args!("CPU_ON(mpidr {mpidr:#x}, entry {entry:#x})"),
            INVALID_PARAMETERS.into(),
            x0,
        )?;
    }
    Ok(())
}

/// `CPU_ON` with an entry point outside RAM or not 4-byte aligned:
/// `INVALID_ADDRESS`. The target is a secondary (OFF after the bring-up);
/// in a 1-vCPU VM the boot CPU itself, which works because the entry point
/// is validated before the power state (as TF-A does too).
fn psci_cpu_on_bad_entry(system: &System) -> Result<(), Failure> {
    let target = secondary(system).unwrap_or_else(Mpidr::current).as_u64();
    let ram = system.platform.ram;
    let valid = boot::secondary_entry_point().as_u64();
    let cases: [(&str, u64); 5] = [
        ("page 1, below RAM", 0x1000),
        ("last word below RAM", ram.start.as_u64() - 4),
        ("first byte after RAM", ram.end.as_u64()),
        ("top of the address space, aligned", u64::MAX - 3),
        ("in RAM but unaligned", valid + 2),
    ];
    for (what, entry) in cases {
        let x0 = hvc64_x0(psci::PSCI_CPU_ON_64, &[target, entry, 0]);
        require_answer(
            format_args!("CPU_ON(mpidr {target:#x}, entry {entry:#x}: {what})"),
            INVALID_ADDRESS.into(),
            x0,
        )?;
    }
    Ok(())
}

/// `CPU_ON` (both conventions) for the calling CPU, which is on, with a
/// valid entry point: `ALREADY_ON`.
fn psci_cpu_on_already_on(_: &System) -> Result<(), Failure> {
    let me = Mpidr::current().as_u64();
    let entry = boot::secondary_entry_point().as_u64();
    for (name, function) in [
        ("CPU_ON_64", psci::PSCI_CPU_ON_64),
        ("CPU_ON_32", psci::PSCI_CPU_ON_32),
    ] {
        let x0 = hvc64_x0(function, &[me, entry, 0]);
        require_answer(
            format_args!("{name}(mpidr {me:#x} = the caller, entry {entry:#x})"),
            ALREADY_ON.into(),
            x0,
        )?;
    }
    Ok(())
}

/// How long `psci_affinity_info` waits for a secondary to finish `CPU_OFF`
/// (it counts itself up just before calling it).
const CPU_OFF_TIMEOUT: core::time::Duration = core::time::Duration::from_secs(1);

/// `AFFINITY_INFO`: the boot CPU is ON, a secondary that did `CPU_OFF` is
/// OFF; level 1 and an unknown MPIDR are `INVALID_PARAMETERS`.
fn psci_affinity_info(system: &System) -> Result<(), Failure> {
    let me = Mpidr::current().as_u64();
    let level0 = LowestAffinityLevel::All as u64;
    let level1 = LowestAffinityLevel::Aff0Ignored as u64;
    let on = AffinityState::On as i64;
    let invalid = i64::from(INVALID_PARAMETERS);
    let cases = [
        ("boot cpu", me, level0, on),
        ("boot cpu", me, level1, invalid),
    ];
    let unknown = unknown_mpidrs(system)?.map(|mpidr| ("unknown cpu", mpidr, level0, invalid));
    for (what, mpidr, level, expected) in cases.into_iter().chain(unknown) {
        let x0 = hvc64_x0(psci::PSCI_AFFINITY_INFO_64, &[mpidr, level]);
        require_answer(
            format_args!("AFFINITY_INFO(mpidr {mpidr:#x} = {what}, level {level})"),
            expected,
            x0,
        )?;
    }
    let Some(secondary) = secondary(system) else {
        log::info!("psci_affinity_info: 1 vCPU, no secondary to find OFF");
        return Ok(());
    };
    let mpidr = secondary.as_u64();
    let off = AffinityState::Off as i64;
    let deadline = timer::Deadline::after(CPU_OFF_TIMEOUT);
    let mut x0 = hvc64_x0(psci::PSCI_AFFINITY_INFO_64, &[mpidr, level0]);
    while x0 != off && !deadline.expired() {
        core::hint::spin_loop();
        x0 = hvc64_x0(psci::PSCI_AFFINITY_INFO_64, &[mpidr, level0]);
    }
    require_answer(
        format_args!(
            "AFFINITY_INFO(mpidr {mpidr:#x} = secondary after CPU_OFF, level {level0}) within {CPU_OFF_TIMEOUT:?}"
        ),
        off,
        x0,
    )
}

/// `EXIT` with a code above 255 is `INVALID_PARAMETER` and does not end
/// the machine: the test goes on to the next case, and the suite to the
/// next test.
fn exit_code_out_of_range(_: &System) -> Result<(), Failure> {
    // u64::MAX first: a hypervisor truncating the code to 8 bits would end
    // the machine with 255, a visible failure, rather than with 0 (256).
    for code in [u64::MAX, 256] {
        let x0 = hvc64_x0(func::EXIT, &[code]);
        require_answer(
            format_args!("EXIT({code:#x})"),
            hyp_abi::error::INVALID_PARAMETER,
            x0,
        )?;
    }
    Ok(())
}

/// An `SMC` (HCR_EL2.TSC traps it to the hypervisor) is answered
/// `NOT_SUPPORTED` whatever the function: it is not an HVC in disguise.
/// Without a hypervisor trapping it (and no EL3) `SMC` is undefined at EL1;
/// that is caught and reported instead of ending the suite.
fn smc_not_supported(_: &System) -> Result<(), Failure> {
    for (name, function) in [
        ("PSCI_VERSION", psci::PSCI_VERSION),
        ("SMCCC_VERSION", smccc::arch::SMCCC_VERSION),
        ("STATS", func::STATS),
    ] {
        let (ret, undef) = exceptions::with_expected(Expected::Undefined(None), || {
            smccc::smc64(function, [0; 17])
        });
        if let Some(undef) = undef {
            return Err(Failure::Value {
                what: "SMC #0",
                expected: "a trap to the hypervisor".into(),
                actual: format!("an Undefined Instruction exception at EL1 ({undef})"),
            });
        }
        let x0 = ret[0] as i64;
        require_answer(
            format_args!("SMC #0 {name} ({function:#x})"),
            hyp_abi::error::NOT_SUPPORTED,
            x0,
        )?;
    }
    Ok(())
}

// Probes for `undefined_sysreg_is_undef`. Each reads, as its first
// instruction, an implementation-defined system register (op0 = 3,
// CRn = 15) that QEMU's `max` and `cortex-a57` CPUs do not implement, then
// returns. x0 carries a sentinel in and the register out: when the
// Undefined Instruction exception is absorbed, the `mrs` is skipped and the
// sentinel comes back.
#[cfg(target_arch = "aarch64")]
core::arch::global_asm!(
    r#"
    .pushsection .text.undef_probes, "ax"
    .balign 4
    .global guest_undef_probe_s3_0_c15_c15_7
guest_undef_probe_s3_0_c15_c15_7:
    mrs     x0, s3_0_c15_c15_7
    ret
    .global guest_undef_probe_s3_1_c15_c15_7
guest_undef_probe_s3_1_c15_c15_7:
    mrs     x0, s3_1_c15_c15_7
    ret
    .popsection
    "#
);

unsafe extern "C" {
    /// Reads `s3_0_c15_c15_7` into x0 (defined above); returns `sentinel`
    /// if the read is skipped.
    fn guest_undef_probe_s3_0_c15_c15_7(sentinel: u64) -> u64;
    /// Reads `s3_1_c15_c15_7` into x0 (defined above); returns `sentinel`
    /// if the read is skipped.
    fn guest_undef_probe_s3_1_c15_c15_7(sentinel: u64) -> u64;
}

/// A probe: the register it reads, the probe, and whether the exception is
/// expected at the probe's first instruction or as the next one.
type UndefProbe = (&'static str, unsafe extern "C" fn(u64) -> u64, bool);

/// The probes `undefined_sysreg_is_undef` runs: both ways of arming.
const UNDEF_PROBES: [UndefProbe; 2] = [
    ("s3_0_c15_c15_7", guest_undef_probe_s3_0_c15_c15_7, true),
    ("s3_1_c15_c15_7", guest_undef_probe_s3_1_c15_c15_7, false),
];

/// Reading an unimplemented system register at EL1 raises an Undefined
/// Instruction exception at EL1 (`ESR_EL1` = EC 0 "Unknown reason", IL
/// set) at the `mrs`; the kernel absorbs it and the hypervisor is not
/// involved (or, if it traps the access, must answer the same way).
fn undefined_sysreg_is_undef(_: &System) -> Result<(), Failure> {
    const SENTINEL: u64 = 0x5e47_1e15_0bad_cafe;
    let want_esr = (ESR_EL1::EC::Unknown + ESR_EL1::IL::SET).value;
    for (register, probe, at_pc) in UNDEF_PROBES {
        let pc = probe as usize as u64;
        let expected = Expected::Undefined(at_pc.then_some(pc));
        // SAFETY: the probe only reads a system register into x0 and
        // returns, touching no memory; the read either yields a value or
        // raises the Undefined Instruction exception armed here, which
        // skips it.
        let (read, undef) = exceptions::with_expected(expected, || unsafe { probe(SENTINEL) });
        let undef = undef.ok_or(Failure::NoUndef { register, read })?;
        require(
            undef.esr == want_esr,
            "ESR_EL1 of the Undefined Instruction exception",
            format_args!("{want_esr:#x}"),
            format_args!("{:#x} ({register}: {undef})", undef.esr),
        )?;
        require(
            undef.elr == pc,
            "ELR_EL1 of the Undefined Instruction exception",
            format_args!("{pc:#x} (the mrs {register})"),
            format_args!("{:#x}", undef.elr),
        )?;
        require(
            read == SENTINEL,
            "x0 after the skipped mrs",
            format_args!("{SENTINEL:#x} (unchanged)"),
            format_args!("{read:#x} ({register})"),
        )?;
    }
    Ok(())
}

/// Every vCPU at once writes and verifies patterns over its own memory and
/// its interleaved words of a shared run, for `stress_ms=`; nothing may
/// read back other than written (see `stress.rs`).
fn stress(system: &System) -> Result<(), Failure> {
    let duration = core::time::Duration::from_millis(system.cmdline.stress_ms);
    Ok(stress::run(&system.platform.cpus, duration)?)
}

/// After every hostile call above, the hypervisor still answers: `STATS`
/// with `SUCCESS` and `PSCI_VERSION` with 1.1.
fn hypervisor_still_alive(_: &System) -> Result<(), Failure> {
    let stats = smccc_client::call64(func::STATS, &[]);
    require_answer(
        format_args!("STATS"),
        hyp_abi::error::SUCCESS,
        stats[0] as i64,
    )?;
    let psci_1_1 = Version { major: 1, minor: 1 };
    require_answer(
        format_args!("PSCI_VERSION (1.1)"),
        i64::from(u32::from(psci_1_1)),
        hvc64_x0(psci::PSCI_VERSION, &[]),
    )
}
