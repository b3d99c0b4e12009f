//! Secondary vCPUs: PSCI `CPU_ON`, report-in, `CPU_OFF`, and running a
//! job on every vCPU.
//!
//! The boot CPU starts every other CPU of the DTB with `CPU_ON` (entry
//! [`crate::boot::secondary_entry_point`], context id = the CPU's DTB
//! index). A secondary comes up in `boot.rs` with its own stack and the
//! shared page tables, prints `guest: vcpu N up`, counts itself in
//! [`VCPUS_UP`] and powers itself off with `CPU_OFF`; the hypervisor then
//! idles its physical CPU. The boot CPU waits, bounded by the generic
//! timer, until every started CPU has reported.
//!
//! [`run_on_all`] reuses the same path to run a [`Job`] on every vCPU at
//! once: it publishes the job in [`JOB`] and starts the (by then OFF)
//! secondaries again with `CPU_ON`; a secondary that finds a job runs it
//! instead of reporting in, marks itself in [`JOB_DONE`] and goes back
//! OFF. So between jobs every secondary is OFF, as after the bring-up.

use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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

/// How long [`run_on_all`] retries `CPU_ON` of a secondary that is still
/// on: one that has just finished (its bring-up or the previous job) and
/// not yet reached `CPU_OFF`.
const CPU_OFF_TIMEOUT: Duration = Duration::from_secs(1);

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

/// Work that [`run_on_all`] runs once on every vCPU, called with the
/// vCPU's DTB index. A plain `fn`: whatever it needs lives in statics, so
/// nothing it uses can go out of scope while a CPU that did not finish in
/// time is still running it.
pub type Job = fn(usize);

/// The job secondaries run when started; `None` during the bring-up and
/// between jobs. Set by [`run_on_all`] before its `CPU_ON`s, cleared once
/// every CPU that may run it has finished; left set when one did not
/// finish in time, so that no second job is started while it may still
/// be in the first. The lock also orders: a secondary that reads the job
/// sees everything the boot CPU wrote before publishing it.
static JOB: spin::Mutex<Option<Job>> = spin::Mutex::new(None);

/// DTB indices (one bit each) of the secondaries that have finished the
/// current job. `fetch_or` with Release after the job returns, so what the
/// job wrote is visible to the boot CPU, which reads with Acquire.
static JOB_DONE: AtomicU64 = AtomicU64::new(0);
const _: () = assert!(MAX_CPUS <= u64::BITS as usize);

/// Why [`run_on_all`] did not run its job on every CPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobError {
    /// A previous job has CPUs that never finished it: no new job starts.
    Busy,
    /// A CPU could not be started (or the caller is not in the DTB). Every
    /// CPU that was started has finished: none is in the job any more.
    Start(BringUpError),
    /// These secondaries (bits = DTB indices) did not finish within the
    /// timeout, or could not be started because they never went OFF and
    /// may still pick the job up. The job's data must stay valid.
    Stuck {
        /// Bit `i` set: CPU `i` may still be running the job.
        unfinished: u64,
        /// How long the caller waited after its own share of the job.
        timeout: Duration,
    },
}

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Busy => f.write_str("a previous job is still running on some CPU"),
            Self::Start(error) => write!(f, "{error}"),
            Self::Stuck {
                unfinished,
                timeout,
            } => {
                write!(f, "not finished {timeout:?} after the caller's share, CPUs")?;
                for cpu in (0..MAX_CPUS).filter(|&cpu| unfinished & (1 << cpu) != 0) {
                    write!(f, " {cpu}")?;
                }
                Ok(())
            }
        }
    }
}

impl BringUpError {
    /// `CPU_ON` failed because the CPU is still on (or about to be): it
    /// has not reached `CPU_OFF` yet.
    fn still_on(&self) -> bool {
        matches!(
            self,
            Self::CpuOn {
                error: psci::error::Error::AlreadyOn | psci::error::Error::OnPending,
                ..
            }
        )
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
        match cpu_on(index, mpidr) {
            Ok(()) => expected += 1,
            Err(error) => errors.push(error),
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

/// Starts CPU `index` (DTB order) at the secondary entry point.
fn cpu_on(index: usize, mpidr: Mpidr) -> Result<(), BringUpError> {
    if index >= MAX_CPUS {
        return Err(BringUpError::TooManyCpus { index });
    }
    let entry = boot::secondary_entry_point().as_u64();
    psci::cpu_on::<Hvc>(mpidr.as_u64(), entry, index as u64).map_err(|error| BringUpError::CpuOn {
        index,
        mpidr,
        error,
    })
}

/// Runs `job` on every CPU of `cpus` (DTB order) at once: starts the
/// secondaries on it, runs it on the calling CPU, then waits up to
/// `timeout` for the secondaries to finish. Returns how many CPUs ran it,
/// the caller included.
///
/// The secondaries must be OFF (as [`start_secondaries`] leaves them); one
/// still on is retried for [`CPU_OFF_TIMEOUT`]. After any return other
/// than [`JobError::Stuck`], no CPU is running `job`.
pub fn run_on_all(cpus: &[Mpidr], job: Job, timeout: Duration) -> Result<usize, JobError> {
    let me = Mpidr::current();
    let Some(my_index) = cpus.iter().position(|&cpu| cpu == me) else {
        return Err(JobError::Start(BringUpError::BootCpuNotInDtb(me)));
    };
    {
        let mut slot = JOB.lock();
        if slot.is_some() {
            return Err(JobError::Busy);
        }
        // No CPU is in a job (the slot is empty), so nobody sets bits.
        JOB_DONE.store(0, Ordering::Relaxed);
        *slot = Some(job);
    }
    // Bits of the CPUs that are or may be running the job.
    let mut running = 0u64;
    let mut first_error = None;
    for (index, &mpidr) in cpus.iter().enumerate() {
        if index == my_index {
            continue;
        }
        let deadline = Deadline::after(CPU_OFF_TIMEOUT);
        let result = loop {
            match cpu_on(index, mpidr) {
                Err(error) if error.still_on() && !deadline.expired() => core::hint::spin_loop(),
                result => break result,
            }
        };
        match result {
            Ok(()) => running |= 1 << index,
            Err(error) => {
                // Still on after the retries: it may yet read the job.
                if error.still_on() {
                    running |= 1 << index;
                }
                first_error.get_or_insert(error);
            }
        }
    }
    job(my_index);
    let deadline = Deadline::after(timeout);
    while JOB_DONE.load(Ordering::Acquire) & running != running && !deadline.expired() {
        core::hint::spin_loop();
    }
    let done = JOB_DONE.load(Ordering::Acquire);
    let unfinished = running & !done;
    if unfinished != 0 {
        return Err(JobError::Stuck {
            unfinished,
            timeout,
        });
    }
    *JOB.lock() = None;
    match first_error {
        Some(error) => Err(JobError::Start(error)),
        None => Ok(1 + running.count_ones() as usize),
    }
}

/// Rust entry of a secondary CPU, called by `secondary_entry` with its MMU
/// on, its stack and vectors set: runs the published job, if any, or
/// reports in, then goes OFF.
pub extern "C" fn secondary_main(index: u64) -> ! {
    // Copied out: the lock is not held while the job runs.
    let job = *JOB.lock();
    match job {
        Some(job) => {
            job(index as usize);
            JOB_DONE.fetch_or(1 << index, Ordering::Release);
        }
        None => {
            log::info!("vcpu {index} up");
            VCPUS_UP.fetch_add(1, Ordering::Release);
        }
    }
    // CPU_OFF does not return when it succeeds.
    match psci::cpu_off::<Hvc>() {
        Ok(()) => log::error!("vcpu {index}: CPU_OFF returned success"),
        Err(error) => log::error!("vcpu {index}: CPU_OFF failed: {error}"),
    }
    power::exit(ExitCode::Fatal)
}
