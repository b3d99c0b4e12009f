//! The memory stress behind the `stress` test: every vCPU at once writes
//! and verifies patterns across guest RAM for a bounded time.
//!
//! Each vCPU owns a private run of frames (a budget of up to
//! [`BUDGET_FRAMES`], split evenly) and the words `i` with
//! `i % vcpus == vcpu` of one small shared run, so that vCPUs also write
//! next to each other in the same pages. A round writes the whole of a
//! vCPU's memory with a pattern that depends on (vCPU, round, address),
//! then reads all of it back and compares; the next round uses a new
//! pattern, so a write that was lost (stale data) or landed elsewhere is
//! seen. All accesses are volatile.
//!
//! What it is for: the hypervisor may move guest pages to new frames while
//! the guest runs (break-before-make, copy, remap); no write may be lost.
//!
//! The vCPUs run [`worker`] through [`smp::run_on_all`]. The plan (regions,
//! end time) is in [`PLAN`], written by the boot vCPU before the job is
//! published; each vCPU writes only its own [`RESULTS`] slot, which the
//! boot vCPU reads after [`smp::run_on_all`] has seen it finish.

use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};
use core::time::Duration;

use crate::addr::{PhysAddr, PAGE_SIZE};
use crate::frames::{self, FrameError, FrameRun};
use crate::smp::{self, BringUpError, JobError, Mpidr, MAX_CPUS};
use crate::timer;

/// Most frames the private regions take together: 16 MiB.
const BUDGET_FRAMES: usize = (16 << 20) / PAGE_SIZE as usize;
/// Smallest private region worth testing: 64 KiB. Below this the test
/// fails with the allocator's error rather than test almost nothing.
const MIN_FRAMES: usize = 16;
/// Frames of the shared, interleaved region: 64 KiB.
const SHARED_FRAMES: usize = 16;
/// How long the boot vCPU waits for the secondaries after its own share
/// (which lasts the time bound).
const FINISH_GRACE: Duration = Duration::from_secs(5);
/// Full rounds every vCPU must complete for the test to count.
const MIN_ROUNDS: u64 = 2;

/// Bytes in a word: the unit of every access.
const WORD: u64 = core::mem::size_of::<u64>() as u64;

/// A run of words, by address and count (the plan holds no [`FrameRun`]:
/// those stay with the boot vCPU, which frees them).
#[derive(Copy, Clone, Debug)]
struct Region {
    start: PhysAddr,
    words: u64,
}

impl Region {
    fn of(run: &FrameRun) -> Self {
        Self {
            start: run.frame(0),
            words: run.count() as u64 * PAGE_SIZE / WORD,
        }
    }
}

/// What every vCPU needs to know, copied out by each at its start.
#[derive(Copy, Clone, Debug)]
struct Plan {
    /// Private region of each vCPU, by DTB index.
    private: [Option<Region>; MAX_CPUS],
    /// The shared region; word `i` belongs to vCPU `i % vcpus`.
    shared: Region,
    /// vCPUs taking part (DTB indices `0..vcpus`).
    vcpus: u64,
    /// Counter value after which no new round starts.
    end: u64,
}

/// The current plan: set by [`run`] before [`smp::run_on_all`] publishes
/// the job (whose lock orders it before every secondary's read), cleared
/// after every vCPU has finished.
static PLAN: spin::Mutex<Option<Plan>> = spin::Mutex::new(None);

/// A word that did not read back as written.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// DTB index of the vCPU that wrote and read it.
    pub vcpu: usize,
    /// Its address.
    pub addr: PhysAddr,
    /// The round (of that vCPU) in which it was found.
    pub round: u64,
    /// What was written.
    pub expected: u64,
    /// What was read.
    pub found: u64,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "vcpu {} round {} at {}: expected {:#018x}, found {:#018x}",
            self.vcpu, self.round, self.addr, self.expected, self.found
        )
    }
}

/// The first mismatch any vCPU found (by whoever takes the lock first).
static FIRST_MISMATCH: spin::Mutex<Option<Mismatch>> = spin::Mutex::new(None);

/// One vCPU's counters. Written only by that vCPU, Relaxed: the boot vCPU
/// reads them after [`smp::run_on_all`] returned, which has Acquire-read
/// the vCPU's Release "done" (or ran the vCPU's share itself).
struct Results {
    /// Full rounds (write and verify) completed.
    rounds: AtomicU64,
    /// Words that did not read back as written.
    mismatches: AtomicU64,
}

static RESULTS: [Results; MAX_CPUS] = [const {
    Results {
        rounds: AtomicU64::new(0),
        mismatches: AtomicU64::new(0),
    }
}; MAX_CPUS];

/// Why the stress test failed.
#[derive(Clone, Debug)]
pub enum StressError {
    /// The DTB lists more CPUs than the kernel runs.
    TooManyCpus(usize),
    /// Not enough free frames even for the smallest regions.
    Frames(FrameError),
    /// Not every vCPU ran (or finished) its share.
    Cpus(JobError),
    /// Words read back other than written.
    Mismatch {
        /// The first one found.
        first: Mismatch,
        /// How many in all.
        total: u64,
    },
    /// A vCPU did not complete [`MIN_ROUNDS`] rounds in the time bound.
    TooFewRounds {
        /// Its DTB index.
        vcpu: usize,
        /// Rounds it completed.
        rounds: u64,
    },
}

impl fmt::Display for StressError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooManyCpus(n) => write!(f, "{n} CPUs listed, the kernel runs {MAX_CPUS}"),
            Self::Frames(e) => write!(f, "frame allocator: {e}"),
            Self::Cpus(e) => write!(f, "running on every vCPU: {e}"),
            Self::Mismatch { first, total } => {
                write!(f, "{total} words read back wrong, first: {first}")
            }
            Self::TooFewRounds { vcpu, rounds } => write!(
                f,
                "vcpu {vcpu} completed {rounds} rounds, at least {MIN_ROUNDS} required \
                 (raise stress_ms=)"
            ),
        }
    }
}

/// The memory the test uses, freed by [`Memory::free`] (or leaked while
/// a vCPU may still be writing it).
struct Memory {
    shared: FrameRun,
    private: Vec<FrameRun>,
}

impl Memory {
    /// The shared run, then one private run per vCPU, as large as the
    /// budget and the allocator allow (equal sizes, halved until they fit).
    fn alloc(vcpus: usize) -> Result<Self, FrameError> {
        let shared = frames::alloc(SHARED_FRAMES)?;
        // A power of two: the buddy allocator rounds every run up to one.
        let mut size = 1 << (BUDGET_FRAMES / vcpus).max(1).ilog2();
        loop {
            let mut private = Vec::with_capacity(vcpus);
            let failed = loop {
                if private.len() == vcpus {
                    break None;
                }
                match frames::alloc(size) {
                    Ok(run) => private.push(run),
                    Err(error) => break Some(error),
                }
            };
            match failed {
                None => return Ok(Self { shared, private }),
                Some(error) => {
                    private.into_iter().for_each(frames::free);
                    if size / 2 < MIN_FRAMES {
                        frames::free(shared);
                        return Err(error);
                    }
                    size /= 2;
                }
            }
        }
    }

    fn bytes(&self) -> u64 {
        let frames: usize = self.private.iter().map(FrameRun::count).sum();
        (frames + self.shared.count()) as u64 * PAGE_SIZE
    }

    fn free(self) {
        frames::free(self.shared);
        self.private.into_iter().for_each(frames::free);
    }
}

/// Runs the stress on every CPU of `cpus` for `duration` (every vCPU
/// starts no new round after it), prints
/// `stress vcpus=N rounds=R bytes=B mismatches=M ms=T` and returns the
/// verdict.
pub fn run(cpus: &[Mpidr], duration: Duration) -> Result<(), StressError> {
    let vcpus = cpus.len();
    if vcpus > MAX_CPUS {
        return Err(StressError::TooManyCpus(vcpus));
    }
    if vcpus == 0 {
        return Err(StressError::Cpus(JobError::Start(
            BringUpError::BootCpuNotInDtb(Mpidr::current()),
        )));
    }
    let memory = Memory::alloc(vcpus).map_err(StressError::Frames)?;
    let bytes = memory.bytes();
    let mut private = [None; MAX_CPUS];
    for (slot, run) in private.iter_mut().zip(&memory.private) {
        *slot = Some(Region::of(run));
    }
    for results in &RESULTS {
        results.rounds.store(0, Ordering::Relaxed);
        results.mismatches.store(0, Ordering::Relaxed);
    }
    *FIRST_MISMATCH.lock() = None;
    let start = timer::ticks();
    *PLAN.lock() = Some(Plan {
        private,
        shared: Region::of(&memory.shared),
        vcpus: vcpus as u64,
        end: start.saturating_add(timer::ticks_in(duration)),
    });

    let ran = smp::run_on_all(cpus, worker, FINISH_GRACE);
    let ms = (timer::ticks() - start) * 1000 / timer::frequency().max(1);
    let rounds: Vec<u64> = RESULTS[..vcpus]
        .iter()
        .map(|r| r.rounds.load(Ordering::Relaxed))
        .collect();
    let mismatches: u64 = RESULTS[..vcpus]
        .iter()
        .map(|r| r.mismatches.load(Ordering::Relaxed))
        .sum();
    log::debug!("stress rounds per vcpu {rounds:?}");
    log::info!(
        "stress vcpus={vcpus} rounds={} bytes={bytes} mismatches={mismatches} ms={ms}",
        rounds.iter().sum::<u64>()
    );
    match ran {
        Err(error @ JobError::Stuck { .. }) => {
            // Some vCPU may still write the memory: keep it allocated.
            log::warn!("stress: leaking {bytes} bytes still in use by a stuck vCPU");
            core::mem::forget(memory);
            return Err(StressError::Cpus(error));
        }
        ran => {
            *PLAN.lock() = None;
            memory.free();
            ran.map_err(StressError::Cpus)?;
        }
    }
    if mismatches > 0 {
        let first = FIRST_MISMATCH
            .lock()
            .expect("a vCPU that counts a mismatch records the first");
        return Err(StressError::Mismatch {
            first,
            total: mismatches,
        });
    }
    match rounds.iter().position(|&r| r < MIN_ROUNDS) {
        Some(vcpu) => Err(StressError::TooFewRounds {
            vcpu,
            rounds: rounds[vcpu],
        }),
        None => Ok(()),
    }
}

/// One vCPU's share ([`smp::Job`]): rounds until the plan's end time, and
/// at least [`MIN_ROUNDS`] (on a loaded host a vCPU may get little time
/// before the deadline; the round minimum, not the clock, makes the test
/// meaningful, and the boot vCPU's wait bound still catches a stuck one).
fn worker(vcpu: usize) {
    let Some(plan) = *PLAN.lock() else {
        return;
    };
    let (Some(private), Some(results)) =
        (plan.private.get(vcpu).copied().flatten(), RESULTS.get(vcpu))
    else {
        return;
    };
    let spans = [
        Span {
            first: private.start,
            count: private.words,
            stride: WORD,
        },
        // This vCPU's words of the shared region: every `vcpus`-th from
        // its own index.
        Span {
            first: PhysAddr(plan.shared.start.as_u64() + vcpu as u64 * WORD),
            count: plan
                .shared
                .words
                .saturating_sub(vcpu as u64)
                .div_ceil(plan.vcpus),
            stride: plan.vcpus * WORD,
        },
    ];
    let mut round = 0u64;
    let mut mismatches = 0u64;
    // Whether this vCPU has offered its first mismatch to FIRST_MISMATCH.
    let mut offered = false;
    while round < MIN_ROUNDS || timer::ticks() < plan.end {
        let seed = seed(vcpu, round);
        for span in &spans {
            span.write(seed);
        }
        for span in &spans {
            let bad = span.verify(seed, |addr, expected, found| {
                if !offered {
                    offered = true;
                    FIRST_MISMATCH.lock().get_or_insert(Mismatch {
                        vcpu,
                        addr,
                        round,
                        expected,
                        found,
                    });
                }
            });
            mismatches += bad;
        }
        round += 1;
        results.rounds.store(round, Ordering::Relaxed);
        results.mismatches.store(mismatches, Ordering::Relaxed);
    }
}

/// The per-(vCPU, round) seed: SplitMix64's finaliser of a unique input,
/// a bijection, so no two rounds of any vCPUs share a seed.
fn seed(vcpu: usize, round: u64) -> u64 {
    let mut z = (((vcpu as u64) << 56) ^ round).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The word written at `addr`: the seed mixed with an odd multiple of the
/// address (a bijection), so that within a round every word differs and
/// between rounds every word changes.
fn pattern(seed: u64, addr: u64) -> u64 {
    seed ^ addr.wrapping_mul(0xd605_bbb5_8c8a_bbb5)
}

/// Words a vCPU owns: `count` of them from `first`, `stride` bytes apart.
#[derive(Copy, Clone, Debug)]
struct Span {
    first: PhysAddr,
    count: u64,
    stride: u64,
}

impl Span {
    /// Writes every word with its [`pattern`] for `seed`.
    fn write(&self, seed: u64) {
        let mut addr = self.first.as_u64();
        for _ in 0..self.count {
            // SAFETY: the span lies in frames allocated for this test,
            // where only this vCPU accesses these words (its private run,
            // or its own interleaved words of the shared run); they are
            // RAM, mapped read-write, and 8-byte aligned.
            unsafe {
                core::ptr::write_volatile(PhysAddr(addr).as_ptr::<u64>(), pattern(seed, addr))
            };
            addr += self.stride;
        }
    }

    /// Reads back what [`Span::write`] wrote; calls `on_mismatch(addr,
    /// expected, found)` for every word that differs and returns how many
    /// did.
    fn verify(&self, seed: u64, mut on_mismatch: impl FnMut(PhysAddr, u64, u64)) -> u64 {
        let mut bad = 0;
        let mut addr = self.first.as_u64();
        for _ in 0..self.count {
            // SAFETY: as in `Span::write`, the same words.
            let found = unsafe { core::ptr::read_volatile(PhysAddr(addr).as_ptr::<u64>()) };
            let expected = pattern(seed, addr);
            if found != expected {
                bad += 1;
                on_mismatch(PhysAddr(addr), expected, found);
            }
            addr += self.stride;
        }
        bad
    }
}
