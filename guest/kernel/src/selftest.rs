//! Test mode (`mode=test`): the on-target test suite.
//!
//! Each test is a named function in [`TESTS`]; the runner prints
//! `guest: test NAME ... ok` or `guest: test NAME ... FAILED: reason`,
//! then `guest: N passed, M failed`, and ends the machine through `EXIT`
//! with 0 when nothing failed and 1 otherwise.
//!
//! Tests that need our hypervisor (vendor calls, stage-2 statistics, the
//! injected abort) fail on plain QEMU; that is expected.

use alloc::format;
use alloc::string::String;
use core::fmt;

use aarch64_cpu::registers::{CurrentEL, Readable, TTBR0_EL1};
use hyp_abi::{feature, HYP_UID};
use smccc::psci::{self, Version};
use smccc::Hvc;

use crate::addr::{PhysAddr, PAGE_SIZE};
use crate::demo::touch_run;
use crate::exceptions;
use crate::frames::{self, FrameError};
use crate::mmio;
use crate::mmu::{self, UNBACKED_PROBE};
use crate::power::{self, ExitCode};
use crate::smccc_client::{self, CallError};
use crate::smp::BringUpError;
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
];

/// Why a test failed.
#[derive(Clone, Debug)]
enum Failure {
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
        }
    }
}

impl From<CallError> for Failure {
    fn from(e: CallError) -> Self {
        Self::Hypercall(e)
    }
}

impl From<FrameError> for Failure {
    fn from(e: FrameError) -> Self {
        Self::Frames(e)
    }
}

/// Fails with [`Failure::Value`] unless `ok`.
fn require(
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

/// Runs the suite and ends the machine with its verdict.
pub fn run(system: &System) -> ! {
    log::info!("running {} tests", TESTS.len());
    let (mut passed, mut failed) = (0usize, 0usize);
    for (name, test) in TESTS {
        match test(system) {
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
