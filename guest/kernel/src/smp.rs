//! Secondary vCPUs: PSCI `CPU_ON`, report-in, `CPU_OFF`.
//!
//! The boot CPU starts every other CPU of the DTB with `CPU_ON` (entry
//! [`crate::boot::secondary_entry_point`], context id = the CPU's DTB
//! index). A secondary comes up in `boot.rs` with its own stack and the
//! shared page tables, prints `guest: vcpu N up`, counts itself in
//! [`VCPUS_UP`] and powers itself off with `CPU_OFF`; the hypervisor then
//! idles its physical CPU. The boot CPU waits, bounded by the generic
//! timer, until every started CPU has reported.

use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicUsize, Ordering};
use core::time::Duration;

use aarch64_cpu::registers::{Readable, MPIDR_EL1};
use smccc::psci;
use smccc::Hvc;
use tock_registers::LocalRegisterCopy;

use crate::boot;
use crate::power::{self, ExitCode};
use crate::timer::Deadline;

/// Most CPUs the kernel brings up (it has this many secondary stacks).
pub const MAX_CPUS: usize = 8;

/// How long the boot CPU waits for the secondaries to report in.
const BRING_UP_TIMEOUT: Duration = Duration::from_secs(5);

/// The affinity fields (Aff3..Aff0) of an `MPIDR_EL1` value: what a DTB
/// `/cpus/cpu@N` `reg` holds and what PSCI `CPU_ON` takes.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Mpidr(u64);

impl Mpidr {
    /// Keeps only the affinity fields of `raw` (an `MPIDR_EL1` value or a
    /// DTB `reg`).
    pub fn from_raw(raw: u64) -> Self {
        let r = LocalRegisterCopy::<u64, MPIDR_EL1::Register>::new(raw);
        Self(
            (MPIDR_EL1::Aff3.val(r.read(MPIDR_EL1::Aff3))
                + MPIDR_EL1::Aff2.val(r.read(MPIDR_EL1::Aff2))
                + MPIDR_EL1::Aff1.val(r.read(MPIDR_EL1::Aff1))
                + MPIDR_EL1::Aff0.val(r.read(MPIDR_EL1::Aff0)))
            .value,
        )
    }

    /// The calling CPU's affinity.
    pub fn current() -> Self {
        Self::from_raw(MPIDR_EL1.get())
    }

    /// The affinity value.
    pub const fn as_u64(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Mpidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// CPUs that have reported in, the boot CPU included. Release on increment
/// (the secondary's "up" line is printed before), Acquire on read.
static VCPUS_UP: AtomicUsize = AtomicUsize::new(0);

/// Why a secondary CPU did not come up.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum BringUpError {
    /// The DTB lists more CPUs than the kernel has stacks for.
    TooManyCpus {
        /// DTB index of the CPU.
        index: usize,
    },
    /// PSCI `CPU_ON` failed.
    CpuOn {
        /// DTB index of the CPU.
        index: usize,
        /// Its affinity.
        mpidr: Mpidr,
        /// PSCI's answer.
        error: psci::error::Error,
    },
    /// The boot CPU is not in the DTB's `/cpus`.
    BootCpuNotInDtb(Mpidr),
}

impl fmt::Display for BringUpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooManyCpus { index } => {
                write!(
                    f,
                    "cpu {index}: not started, the kernel supports {MAX_CPUS} CPUs"
                )
            }
            Self::CpuOn {
                index,
                mpidr,
                error,
            } => {
                write!(f, "cpu {index} (mpidr {mpidr}): CPU_ON failed: {error}")
            }
            Self::BootCpuNotInDtb(mpidr) => {
                write!(f, "the boot CPU (mpidr {mpidr}) is not listed in /cpus")
            }
        }
    }
}

/// What [`start_secondaries`] achieved.
#[derive(Clone, Debug)]
pub struct BringUp {
    /// CPUs listed in the DTB.
    pub listed: usize,
    /// CPUs that reported in, the boot CPU included.
    pub up: usize,
    /// CPUs that could not be started.
    pub errors: Vec<BringUpError>,
}

/// Starts every CPU of `cpus` (DTB order) except the calling one, and waits
/// for them to report in.
///
/// Requires the MMU to be on and [`boot::publish_secondary_mmu_state`] to
/// have been called.
pub fn start_secondaries(cpus: &[Mpidr]) -> BringUp {
    let me = Mpidr::current();
    let mut errors = Vec::new();
    if !cpus.contains(&me) {
        errors.push(BringUpError::BootCpuNotInDtb(me));
    }
    VCPUS_UP.store(1, Ordering::Release);
    let mut expected = 1;
    for (index, &mpidr) in cpus.iter().enumerate() {
        if mpidr == me {
            continue;
        }
        if index >= MAX_CPUS {
            errors.push(BringUpError::TooManyCpus { index });
            continue;
        }
        let entry = boot::secondary_entry_point().as_u64();
        match psci::cpu_on::<Hvc>(mpidr.as_u64(), entry, index as u64) {
            Ok(()) => expected += 1,
            Err(error) => errors.push(BringUpError::CpuOn {
                index,
                mpidr,
                error,
            }),
        }
    }
    let deadline = Deadline::after(BRING_UP_TIMEOUT);
    while VCPUS_UP.load(Ordering::Acquire) < expected && !deadline.expired() {
        core::hint::spin_loop();
    }
    BringUp {
        listed: cpus.len(),
        up: VCPUS_UP.load(Ordering::Acquire),
        errors,
    }
}

/// Rust entry of a secondary CPU, called by `secondary_entry` with its MMU
/// on, its stack and vectors set.
pub extern "C" fn secondary_main(index: u64) -> ! {
    log::info!("vcpu {index} up");
    VCPUS_UP.fetch_add(1, Ordering::Release);
    // CPU_OFF does not return when it succeeds.
    match psci::cpu_off::<Hvc>() {
        Ok(()) => log::error!("vcpu {index}: CPU_OFF returned success"),
        Err(error) => log::error!("vcpu {index}: CPU_OFF failed: {error}"),
    }
    power::exit(ExitCode::Fatal)
}
