//! The hypercall fuzzer (`mode=fuzz`, and the end of `mode=hostile`).
//!
//! Every vCPU of the DTB issues its share of `fuzz_calls=` hypercalls at
//! once ([`smp::run_on_all`]), from its own generator seeded with
//! `seed ^ vcpu`: call `k` of vCPU `n` is the same in every run with the
//! same seed, machine and vCPU count (no generated value depends on an
//! answer). A call is a function ID (the known ones, their neighbours, the
//! edges of the owner ranges, random ones; sometimes garbage in `x0` bits
//! 63:32; one in twenty over SMC instead of HVC) and four arguments biased
//! to boundaries: 0, page edges, the edges of guest RAM, MMIO, the top of
//! the address space, the calls' limits, unknown flag bits. Every few dozen
//! calls each vCPU runs a traffic round ([`Worker::traffic_round`]):
//! normal aging, release and store use of its own pages, every answer and
//! every page checked against a model.
//!
//! The fuzzer must not kill the kernel it runs in:
//! - calls that end or reset the VM or stop a CPU are never made
//!   ([`denied`]), matched on the function ID with bits 31:30 and 23:16
//!   normalised, so no calling-convention variant slips through;
//! - `CPU_ON` gets an entry point that could be valid only when the target
//!   is exactly the calling vCPU, which is on; any other target gets an
//!   entry that is not 4-byte aligned, invalid whatever the target's state;
//! - an argument that makes the hypervisor write guest memory (the
//!   `MEM_RELEASE` range, the `AGING_TEST_CLEAR` bitmap, the `STORE_GET`
//!   target) and lies wholly in guest RAM is moved into the vCPU's own fuzz
//!   zone, keeping its offset in the page (its alignment class); values
//!   outside RAM or straddling its edges stay as they are: the hypervisor
//!   must reject those ([`Worker::redirect`]);
//! - `AGING_TEST_CLEAR` with `CLEAR` never covers the traffic pages, whose
//!   young bits the traffic rounds check exactly, and the store keys of the
//!   traffic rounds are never fuzzed.
//!
//! Every answer is checked against docs/ABI.md ([`Worker::expected`]): a
//! call the ABI rejects must get exactly its error code, a valid one a
//! value in range or an error the ABI allows for it, an unknown function
//! and any SMC exactly `NOT_SUPPORTED`. Anything else is undocumented and
//! printed with the call (at most [`MAX_REPORTS`] failure lines in all).
//! A rejected call must not have written the sentinel words planted where
//! it would write. At the end the hypervisor's own `STATS` counters must
//! have moved by exactly what the guest saw.
//!
//! Assumes nothing else clears Access Flags of the traffic pages: no
//! hypervisor aging worker (`aging_cpu=`).

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};
use core::time::Duration;

use hyp_abi::error::{INVALID_PARAMETER, NOT_FOUND, NOT_SUPPORTED, NO_MEMORY, SUCCESS};
use hyp_abi::layout::{UART_IPA, UNBACKED_IPA};
use hyp_abi::{age_flags, feature, func, limits, stats_group, AfMode, HYP_UID, REVISION};
use oorandom::Rand64;
use smccc::arch as smccc_arch;
use smccc::psci;
use smccc::psci::error as psci_err;

use crate::addr::{PhysAddr, PhysRange, PAGE_SIZE};
use crate::frames::{self, FrameError};
use crate::kernel::System;
use crate::mmu;
use crate::power::{self, ExitCode};
use crate::smccc_client::{self, CallError, Conduit};
use crate::smp::{self, JobError, Mpidr, MAX_CPUS};
use crate::timer;

/// Pages of a vCPU's fuzz zone: 2 MiB, one stage-2 leaf table, so a
/// release of all of it also frees a table page.
const ZONE_PAGES: u64 = 512;
/// Bytes of a fuzz zone.
const ZONE_BYTES: u64 = ZONE_PAGES * PAGE_SIZE;
/// The largest `AGING_TEST_CLEAR` bitmap (32 KiB).
const MAX_BITMAP_BYTES: u64 = limits::AGING_MAX_PAGES / 8;
/// Pages of a vCPU's traffic zone: [`WINDOWS`] windows, then the bitmap
/// and the store page.
const TRAFFIC_PAGES: u64 = 256;
/// Pages of a traffic window: one bitmap word.
const WINDOW: u64 = 64;
/// Windows of a traffic zone, used in turn.
const WINDOWS: u64 = 3;
/// The traffic zone's bitmap page (word 0 the bitmap, word 1 a sentinel).
const BITMAP_PAGE: u64 = WINDOW * WINDOWS;
/// The traffic zone's page for store round trips.
const STORE_PAGE: u64 = BITMAP_PAGE + 1;
/// u64 words in a page.
const PAGE_WORDS: u64 = PAGE_SIZE / 8;
/// Words of a window page that the traffic rounds write and check.
const SAMPLES: [u64; 4] = [0, 137, 300, PAGE_WORDS - 1];
/// Written where a rejected call must not write (xor the address).
const SENTINEL: u64 = 0x5e47_1e15_f022_5a5a;
/// Store keys of the traffic rounds: `TAG | vcpu << 32 | round`; fuzzed
/// keys never have these top bits.
const TRAFFIC_KEY_TAG: u64 = 0x7af1_c000_0000_0000;
/// The bits of a key that [`TRAFFIC_KEY_TAG`] fixes.
const TRAFFIC_KEY_MASK: u64 = 0xffff_ff00_0000_0000;
/// Fuzzed keys mostly come from a small pool shared by all vCPUs, so that
/// `GET` and `DROP` find entries and the store stays bounded.
const POOL_KEY_BASE: u64 = 0x5eed_0000;
/// Keys in the pool.
const POOL_KEYS: u64 = 64;
/// Random keys a vCPU remembers (for `GET`/`DROP`) before dropping the
/// oldest, which bounds what random-key `PUT`s leave in the store.
const KEY_RING: usize = 16;
/// Failure lines printed, over all vCPUs.
const MAX_REPORTS: u64 = 20;
/// How long the boot vCPU waits for the others after its own share.
const FINISH_TIMEOUT: Duration = Duration::from_secs(600);
/// Fuzzed calls between two traffic rounds: a random count in this range.
const TRAFFIC_EVERY: (u64, u64) = (16, 64);
/// `SMCCC_VERSION` and `PSCI_VERSION` answers: 1.1.
const VERSION_1_1: u64 = 0x1_0001;
/// Function-ID bits 31 (fast call) and 30 (SMC64).
const FAST64: u32 = 0xC000_0000;
/// Function-ID bit 30.
const SMC64: u32 = 1 << 30;
/// The affinity fields of an MPIDR (Aff3, Aff2..Aff0).
const AFF_MASK: u64 = 0xff_00ff_ffff;
/// PSCI 1.3 `SYSTEM_OFF2` (not in the `smccc` crate).
const PSCI_SYSTEM_OFF2: u32 = 0x8400_0015;

/// Calls that end or reset the VM or stop or suspend a CPU, as
/// [`normalise`] leaves them: never made.
const DENIED: [u32; 13] = [
    func::EXIT,
    psci::PSCI_CPU_SUSPEND_64,
    psci::PSCI_CPU_OFF | SMC64,
    psci::PSCI_MIGRATE_64,
    psci::PSCI_SYSTEM_OFF | SMC64,
    psci::PSCI_SYSTEM_RESET | SMC64,
    psci::PSCI_CPU_FREEZE | SMC64,
    psci::PSCI_CPU_DEFAULT_SUSPEND_64,
    psci::PSCI_SYSTEM_SUSPEND_64,
    psci::PSCI_SET_SUSPEND_MODE | SMC64,
    psci::PSCI_SYSTEM_RESET2_64,
    psci::PSCI_MEM_PROTECT | SMC64,
    PSCI_SYSTEM_OFF2 | SMC64,
];

/// The PSCI functions docs/ABI.md documents (and `SMCCC_VERSION`, which
/// `PSCI_FEATURES` reports as SMCCC 1.1 requires): `PSCI_FEATURES` must
/// answer 0 for these and `NOT_SUPPORTED` for any other ID.
const PSCI_IMPLEMENTED: [u32; 10] = [
    psci::PSCI_VERSION,
    psci::PSCI_FEATURES,
    psci::PSCI_CPU_ON_32,
    psci::PSCI_CPU_ON_64,
    psci::PSCI_CPU_OFF,
    psci::PSCI_AFFINITY_INFO_32,
    psci::PSCI_AFFINITY_INFO_64,
    psci::PSCI_SYSTEM_OFF,
    psci::PSCI_SYSTEM_RESET,
    smccc_arch::SMCCC_VERSION,
];

/// Function IDs the fuzzer knows by name (none of them [`denied`]).
const KNOWN: [u32; 38] = [
    smccc_arch::SMCCC_VERSION,
    smccc_arch::SMCCC_ARCH_FEATURES,
    smccc_arch::SMCCC_ARCH_SOC_ID,
    smccc_arch::SMCCC_ARCH_WORKAROUND_1,
    smccc_arch::SMCCC_ARCH_WORKAROUND_2,
    smccc_arch::SMCCC_ARCH_WORKAROUND_3,
    psci::PSCI_VERSION,
    psci::PSCI_FEATURES,
    psci::PSCI_CPU_ON_32,
    psci::PSCI_CPU_ON_64,
    psci::PSCI_AFFINITY_INFO_32,
    psci::PSCI_AFFINITY_INFO_64,
    psci::PSCI_MIGRATE_INFO_TYPE,
    psci::PSCI_MIGRATE_INFO_UP_CPU_32,
    psci::PSCI_MIGRATE_INFO_UP_CPU_64,
    psci::PSCI_NODE_HW_STATE_32,
    psci::PSCI_NODE_HW_STATE_64,
    psci::PSCI_STAT_RESIDENCY_32,
    psci::PSCI_STAT_RESIDENCY_64,
    psci::PSCI_STAT_COUNT_32,
    psci::PSCI_STAT_COUNT_64,
    psci::PSCI_MEM_PROTECT_CHECK_RANGE_32,
    psci::PSCI_MEM_PROTECT_CHECK_RANGE_64,
    func::CALL_UID,
    func::REVISION,
    0x8600_FF00,
    0x8600_FF02,
    func::FEATURES,
    func::STATS,
    func::AGING_FEATURES,
    func::AGING_TEST_CLEAR,
    func::MEM_RELEASE,
    func::STORE_PUT,
    func::STORE_GET,
    func::STORE_DROP,
    0x8600_0004,
    0x8600_0005,
    0x8600_0007,
];

/// Edges of the owner ranges and other odd IDs.
#[rustfmt::skip]
const EDGES: [u32; 36] = [
    0xC600_0000, 0xC600_FFFF, 0x8600_0000, 0x8600_FFFF, 0xC600_0009, 0xC600_00FF,
    0xC600_FF01, 0xC600_FF03, 0x8400_0000, 0x8400_001F, 0xC400_0000, 0xC400_001F,
    0x8400_FFFF, 0xC400_FFFF, 0xBF00_FF01, 0xBF00_FF03, 0xBF00_0000, 0xBF00_FFFF,
    0x8000_FFFF, 0xC000_0000, 0x8100_0000, 0x8200_0000, 0x8300_0000, 0x8500_0000,
    0x8700_0000, 0xB000_0000, 0xF200_0000, 0xFF00_FFFF, 0x0000_0000, 0x0000_0001,
    0x7FFF_FFFF, 0xFFFF_FFFF,
    // Yielding (bit 31 clear) forms of vendor calls.
    0x0600_0004, 0x4600_0005,
    // Bits 23:16 must be zero in a fast call.
    0xC601_0004, 0xC6FF_0005,
];

/// The vendor calls and their weights: most fuzzed vendor calls go to
/// the ones with arguments.
const VENDOR_WEIGHTED: [(u32, u64); 10] = [
    (func::AGING_TEST_CLEAR, 8),
    (func::MEM_RELEASE, 5),
    (func::STORE_PUT, 4),
    (func::STORE_GET, 4),
    (func::STORE_DROP, 3),
    (func::STATS, 2),
    (func::FEATURES, 1),
    (func::AGING_FEATURES, 1),
    (func::CALL_UID, 1),
    (func::REVISION, 1),
];

/// The calls the hypervisor's vendor module answers, whose errors its
/// `STATS(AGING)` "rejected" counter counts.
const VENDOR_COUNTED: [u32; 7] = [
    func::AGING_FEATURES,
    func::AGING_TEST_CLEAR,
    func::MEM_RELEASE,
    func::STORE_PUT,
    func::STORE_GET,
    func::STORE_DROP,
    func::STATS,
];

/// The valid `AGING_TEST_CLEAR` flag words.
const VALID_FLAGS: [u64; 5] = [
    0,
    age_flags::CLEAR,
    age_flags::CLEAR | age_flags::MASK,
    age_flags::CLEAR | age_flags::FLUSH,
    age_flags::ALL,
];

/// A function ID with the fast-call and SMC64 bits set and bits 23:16
/// cleared: the form [`DENIED`] and the argument rules match on, so that a
/// hypervisor that ignored those bits could still not be made to run a
/// denied call or write where it must not.
const fn normalise(fid: u32) -> u32 {
    (fid | FAST64) & 0xff00_ffff
}

/// Whether the fuzzer must never make a call with this function ID.
fn denied(fid: u32) -> bool {
    DENIED.contains(&normalise(fid))
}

/// What every vCPU needs, written by the boot vCPU before the job starts
/// (the job lock of [`smp::run_on_all`] orders it before every read).
#[derive(Copy, Clone, Debug)]
struct Plan {
    /// Guest RAM.
    ram: PhysRange,
    /// The kernel image.
    image: PhysRange,
    /// The fuzz zones: vCPU `i`'s starts `i * ZONE_BYTES` after this.
    fuzz: PhysAddr,
    /// All traffic zones: vCPU `i`'s is `TRAFFIC_PAGES` pages from the
    /// start, `i` zones in.
    traffic: PhysRange,
    /// The DTB's CPUs (affinities), `ncpus` of them.
    cpus: [u64; MAX_CPUS],
    /// CPUs in the DTB.
    ncpus: usize,
    /// Fuzzed calls of each vCPU.
    quota: [u64; MAX_CPUS],
    /// `seed=`.
    seed: u64,
    /// Whether the page store is enabled.
    store: bool,
    /// The AF mode `FEATURES` answered (x1).
    af: u64,
    /// A progress line every this many calls (over all vCPUs).
    progress_step: u64,
}

static PLAN: spin::Mutex<Option<Plan>> = spin::Mutex::new(None);

/// What a vCPU counted.
#[derive(Copy, Clone, Debug, Default)]
struct Counts {
    /// Fuzzed calls made.
    calls: u64,
    /// Fuzzed calls answered with a documented success (`x0 >= 0`).
    ok: u64,
    /// Fuzzed calls answered with a documented error other than
    /// `NOT_SUPPORTED`.
    rejected: u64,
    /// Fuzzed calls answered `NOT_SUPPORTED` as documented.
    not_supported: u64,
    /// Fuzzed calls answered other than docs/ABI.md allows.
    undocumented: u64,
    /// Traffic rounds completed.
    traffic_rounds: u64,
    /// Failed content or traffic checks.
    mismatches: u64,
    /// Traffic `STORE_PUT`s answered `NO_MEMORY`.
    store_full: u64,
    /// `AGING_TEST_CLEAR` calls (fuzzed or not) that succeeded.
    aging_ok: u64,
    /// Pages that `MEM_RELEASE` answers (fuzzed or not) said it freed.
    released_pages: u64,
    /// Errors answered by the calls of [`VENDOR_COUNTED`].
    vendor_errors: u64,
    /// Calls whose counting by the hypervisor cannot be known (garbage
    /// `x0` bits answered `NOT_SUPPORTED` while the store is disabled).
    ambiguous: u64,
}

impl Counts {
    fn add(&mut self, o: &Self) {
        self.calls += o.calls;
        self.ok += o.ok;
        self.rejected += o.rejected;
        self.not_supported += o.not_supported;
        self.undocumented += o.undocumented;
        self.traffic_rounds += o.traffic_rounds;
        self.mismatches += o.mismatches;
        self.store_full += o.store_full;
        self.aging_ok += o.aging_ok;
        self.released_pages += o.released_pages;
        self.vendor_errors += o.vendor_errors;
        self.ambiguous += o.ambiguous;
    }
}

/// Each vCPU's counts, stored once when it has finished.
static RESULTS: spin::Mutex<[Option<Counts>; MAX_CPUS]> = spin::Mutex::new([None; MAX_CPUS]);
/// Fuzzed calls made so far by all vCPUs (progress lines only).
static CALLS_DONE: AtomicU64 = AtomicU64::new(0);
/// Failure lines printed so far.
static REPORTS: AtomicU64 = AtomicU64::new(0);

/// Prints a failure line, unless [`MAX_REPORTS`] were printed already.
fn report(args: fmt::Arguments<'_>) {
    let n = REPORTS.fetch_add(1, Ordering::Relaxed);
    if n < MAX_REPORTS {
        log::error!("fuzz: {args}");
    } else if n == MAX_REPORTS {
        log::error!("fuzz: {MAX_REPORTS} failures printed, further ones only counted");
    }
}

/// Why the fuzzer failed.
#[derive(Clone, Debug)]
enum FuzzError {
    /// `FEATURES` failed: no hypervisor of ours.
    Service(CallError),
    /// `FEATURES` answered an unknown AF mode.
    AfMode,
    /// The DTB lists no CPU, or more than the kernel runs.
    Cpus(usize),
    /// No frames for the zones.
    Frames(FrameError),
    /// Not every vCPU ran or finished its share.
    Job(JobError),
    /// Calls were answered other than documented.
    Undocumented(u64),
    /// Content or traffic checks failed.
    Mismatches(u64),
    /// Fewer calls were made than asked for.
    Short {
        /// Calls made.
        done: u64,
        /// Calls asked for.
        total: u64,
    },
    /// A hypervisor counter moved other than the guest's answers say.
    Counter {
        /// The counter.
        what: &'static str,
        /// What the guest counted.
        guest: u64,
        /// How far the hypervisor's counter moved.
        hyp: u64,
    },
}

impl fmt::Display for FuzzError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Service(e) => write!(f, "no vendor service: {e}"),
            Self::AfMode => f.write_str("FEATURES x1 is not a known AF mode"),
            Self::Cpus(n) => write!(f, "{n} CPUs in the DTB, the kernel runs 1..={MAX_CPUS}"),
            Self::Frames(e) => write!(f, "frames for the zones: {e}"),
            Self::Job(e) => write!(f, "running on every vCPU: {e}"),
            Self::Undocumented(n) => write!(f, "{n} calls answered other than documented"),
            Self::Mismatches(n) => write!(f, "{n} content or traffic checks failed"),
            Self::Short { done, total } => write!(f, "{done} of {total} calls made"),
            Self::Counter { what, guest, hyp } => write!(
                f,
                "hypervisor counter {what} moved by {hyp}, the guest's answers add up to {guest}"
            ),
        }
    }
}

impl From<CallError> for FuzzError {
    fn from(e: CallError) -> Self {
        Self::Service(e)
    }
}

impl From<FrameError> for FuzzError {
    fn from(e: FrameError) -> Self {
        Self::Frames(e)
    }
}

/// Runs the fuzzer (`fuzz_calls=` calls, `seed=`) and exits with its
/// verdict.
pub fn run(system: &System) -> ! {
    let failures = fuzz(system).unwrap_or_else(|error| vec![error]);
    for failure in &failures {
        log::error!("fuzz: FAILED: {failure}");
    }
    power::exit(if failures.is_empty() {
        ExitCode::Success
    } else {
        ExitCode::TestsFailed
    })
}

/// The hypervisor counters the fuzzer cross-checks: vendor calls rejected,
/// `AGING_TEST_CLEAR` calls, pages released.
fn hyp_counters() -> Result<[u64; 3], CallError> {
    let [aging_calls, _, rejected] = smccc_client::stats_group(stats_group::AGING)?;
    let [_, _, released] = smccc_client::stats_group(stats_group::MEMORY)?;
    Ok([rejected, aging_calls, released])
}

/// Runs the fuzzer; `Err` if it could not start, else its failures.
fn fuzz(system: &System) -> Result<Vec<FuzzError>, FuzzError> {
    let cpus = &system.platform.cpus;
    let ncpus = cpus.len();
    if ncpus == 0 || ncpus > MAX_CPUS {
        return Err(FuzzError::Cpus(ncpus));
    }
    let features = smccc_client::features()?;
    let af = features.af_mode.ok_or(FuzzError::AfMode)? as u64;
    let store = features.has(feature::STORE);
    let slots = ncpus.next_power_of_two();
    // Never freed: the machine ends right after the run, and a stuck vCPU
    // could still be using them.
    let fuzz_run = frames::alloc(slots * ZONE_PAGES as usize)?;
    let traffic_run = frames::alloc(slots * TRAFFIC_PAGES as usize)?;
    let traffic_start = traffic_run.frame(0);
    let traffic = PhysRange {
        start: traffic_start,
        end: PhysAddr(traffic_start.as_u64() + traffic_run.count() as u64 * PAGE_SIZE),
    };

    let total = system.cmdline.fuzz_calls;
    let seed = system.cmdline.reclaim.seed;
    let mut quota = [0; MAX_CPUS];
    for (i, q) in quota.iter_mut().enumerate().take(ncpus) {
        *q = total / ncpus as u64 + u64::from((i as u64) < total % ncpus as u64);
    }
    let mut listed = [0; MAX_CPUS];
    for (slot, cpu) in listed.iter_mut().zip(cpus) {
        *slot = cpu.as_u64();
    }
    *RESULTS.lock() = [None; MAX_CPUS];
    CALLS_DONE.store(0, Ordering::Relaxed);
    REPORTS.store(0, Ordering::Relaxed);
    let before = hyp_counters()?;
    *PLAN.lock() = Some(Plan {
        ram: system.platform.ram,
        image: system.image.whole,
        fuzz: fuzz_run.frame(0),
        traffic,
        cpus: listed,
        ncpus,
        quota,
        seed,
        store,
        af,
        progress_step: (total / 10).max(1),
    });
    log::info!(
        "fuzz: start calls={total} vcpus={ncpus} seed={seed} af={} store={} zones {} + {traffic}",
        if af == AfMode::Hardware as u64 {
            "hardware"
        } else {
            "software"
        },
        if store { "on" } else { "off" },
        fuzz_run.frame(0),
    );

    let start = timer::ticks();
    let ran = smp::run_on_all(cpus, worker, FINISH_TIMEOUT);
    let ms = (timer::ticks() - start) * 1000 / timer::frequency().max(1);
    let mut sum = Counts::default();
    let finished = {
        let results = RESULTS.lock();
        results.iter().flatten().for_each(|c| sum.add(c));
        results.iter().flatten().count()
    };
    let after = hyp_counters()?;
    let delta = [0, 1, 2].map(|i| after[i].wrapping_sub(before[i]));
    log::info!(
        "fuzz: hypervisor counters rejected=+{} aging_calls=+{} released_pages=+{} (guest: {} {} {}) store_full={} ms={ms} calls_per_s={}",
        delta[0],
        delta[1],
        delta[2],
        sum.vendor_errors,
        sum.aging_ok,
        sum.released_pages,
        sum.store_full,
        sum.calls * 1000 / ms.max(1),
    );
    log::info!(
        "fuzz: done calls={} vcpus={finished} seed={seed} ok={} rejected={} not_supported={} undocumented={} traffic_rounds={} mismatches={}",
        sum.calls,
        sum.ok,
        sum.rejected,
        sum.not_supported,
        sum.undocumented,
        sum.traffic_rounds,
        sum.mismatches,
    );
    let mut failures = Vec::new();
    if let Err(error) = ran {
        failures.push(FuzzError::Job(error));
    }
    if sum.undocumented > 0 {
        failures.push(FuzzError::Undocumented(sum.undocumented));
    }
    if sum.mismatches > 0 {
        failures.push(FuzzError::Mismatches(sum.mismatches));
    }
    if sum.calls != total {
        failures.push(FuzzError::Short {
            done: sum.calls,
            total,
        });
    }
    let checks = [
        ("rejected_calls", sum.vendor_errors, delta[0]),
        ("aging_calls", sum.aging_ok, delta[1]),
        ("released_pages", sum.released_pages, delta[2]),
    ];
    for (what, guest, hyp) in checks {
        if what == "rejected_calls" && sum.ambiguous > 0 {
            log::warn!(
                "fuzz: {} calls of unknown counting: rejected_calls not checked",
                sum.ambiguous
            );
        } else if guest != hyp {
            failures.push(FuzzError::Counter { what, guest, hyp });
        }
    }
    Ok(failures)
}

/// One vCPU's share ([`smp::Job`]).
fn worker(vcpu: usize) {
    let Some(plan) = *PLAN.lock() else {
        return;
    };
    if vcpu >= plan.ncpus {
        return;
    }
    let mut worker = Worker::new(vcpu, plan);
    worker.run();
    RESULTS.lock()[vcpu] = Some(worker.counts);
}

/// A fuzzed call.
#[derive(Copy, Clone, Debug)]
struct Call {
    conduit: Conduit,
    /// The whole `x0`: function ID and whatever bits 63:32 carry.
    x0: u64,
    /// `x1..x4`.
    args: [u64; 4],
}

impl Call {
    /// The function ID as the hypervisor reads it (`w0`).
    fn fid(&self) -> u32 {
        self.x0 as u32
    }
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d] = self.args;
        let conduit = match self.conduit {
            Conduit::Hvc => "hvc",
            Conduit::Smc => "smc",
        };
        write!(
            f,
            "{conduit}({:#x}; {a:#x}, {b:#x}, {c:#x}, {d:#x})",
            self.x0
        )
    }
}

/// `Ok` if `ok`, else what was expected.
fn need(ok: bool, expected: &'static str) -> Result<(), &'static str> {
    if ok {
        Ok(())
    } else {
        Err(expected)
    }
}

/// A well-mixed value of `x` (SplitMix64's finaliser, a bijection).
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Reads the word at `addr`.
///
/// Every address passed here lies in the calling vCPU's own zones: RAM
/// frames allocated for the fuzzer, identity mapped, 8-byte aligned.
fn read_word(addr: u64) -> u64 {
    // SAFETY: see above; volatile because the hypervisor writes these
    // words behind the compiler's back.
    unsafe { core::ptr::read_volatile(PhysAddr(addr).as_ptr::<u64>()) }
}

/// Writes the word at `addr` (an address as for [`read_word`]).
fn write_word(addr: u64, value: u64) {
    // SAFETY: as in `read_word`.
    unsafe { core::ptr::write_volatile(PhysAddr(addr).as_ptr::<u64>(), value) }
}

/// The words of a store round-trip page for `seed`: a PRNG stream, then a
/// checksum of it in the last word.
fn store_word(seed: u64, i: u64, sum: &mut u64) -> u64 {
    if i + 1 < PAGE_WORDS {
        let w = mix(seed ^ i.wrapping_mul(0xd605_bbb5_8c8a_bbb5));
        *sum = sum.rotate_left(7) ^ w;
        w
    } else {
        *sum
    }
}

/// What word `j` of traffic page `page` holds for `tag` (0: a zero page).
fn sample(tag: u64, page: u64, j: u64) -> u64 {
    if tag == 0 {
        0
    } else {
        mix(tag ^ page.rotate_left(17) ^ j)
    }
}

/// One vCPU's fuzzer.
struct Worker {
    vcpu: usize,
    plan: Plan,
    /// This vCPU's affinity.
    me: u64,
    /// This vCPU's fuzz zone.
    zone: u64,
    /// This vCPU's traffic zone.
    tzone: u64,
    /// The fuzzed calls' generator.
    rng: Rand64,
    /// The traffic rounds' generator.
    trng: Rand64,
    counts: Counts,
    /// Per window page: the tag of its samples (0: zeros).
    tags: Vec<u64>,
    /// Random keys this vCPU used for `PUT`, oldest dropped when replaced.
    ring: [u64; KEY_RING],
    ring_next: usize,
    /// Index of the current fuzzed call of this vCPU.
    call_no: u64,
}

impl Worker {
    fn new(vcpu: usize, plan: Plan) -> Self {
        let seed = plan.seed ^ vcpu as u64;
        Self {
            vcpu,
            plan,
            me: Mpidr::current().as_u64(),
            zone: plan.fuzz.as_u64() + vcpu as u64 * ZONE_BYTES,
            tzone: plan.traffic.start.as_u64() + vcpu as u64 * TRAFFIC_PAGES * PAGE_SIZE,
            rng: Rand64::new(u128::from(seed)),
            trng: Rand64::new(u128::from(seed) | 1u128 << 64),
            counts: Counts::default(),
            tags: vec![0; (WINDOW * WINDOWS) as usize],
            ring: [POOL_KEY_BASE; KEY_RING],
            ring_next: 0,
            call_no: 0,
        }
    }

    fn run(&mut self) {
        // Start from known state: both zones released (zero, unbacked).
        for (start, pages) in [(self.zone, ZONE_PAGES), (self.tzone, TRAFFIC_PAGES)] {
            let r = self.hvc(func::MEM_RELEASE, [start, pages, 0, 0]);
            self.traffic_check(
                (0..=pages as i64).contains(&(r[0] as i64)),
                "MEM_RELEASE of a whole zone at the start",
                "0..=npages",
                r[0],
            );
        }
        let quota = self.plan.quota[self.vcpu];
        let mut until_traffic = self.traffic_gap();
        for k in 0..quota {
            self.call_no = k;
            let call = self.gen_call();
            self.fuzz_one(call);
            let done = CALLS_DONE.fetch_add(1, Ordering::Relaxed) + 1;
            if done.is_multiple_of(self.plan.progress_step) {
                log::info!("fuzz: vcpu{} {done} calls", self.vcpu);
            }
            until_traffic -= 1;
            if until_traffic == 0 {
                self.traffic_round();
                until_traffic = self.traffic_gap();
            }
        }
        self.traffic_round();
    }

    fn traffic_gap(&mut self) -> u64 {
        self.trng.rand_range(TRAFFIC_EVERY.0..TRAFFIC_EVERY.1)
    }

    // ---- making calls ------------------------------------------------

    /// Makes a call and counts what the hypervisor's counters will count.
    fn raw(&mut self, conduit: Conduit, x0: u64, args: [u64; 4]) -> [u64; 4] {
        let [a, b, c, d] = args;
        // SAFETY: every call goes through `denied` and `redirect` (fuzzed
        // ones) or is built by the traffic rounds on this vCPU's own
        // zones: it cannot end or stop this CPU, and the hypervisor writes
        // guest memory only inside this vCPU's zones, which the kernel
        // uses for nothing else and the fuzzer accesses only with
        // volatile accesses.
        let r = unsafe { smccc_client::raw_call(conduit, [x0, a, b, c, d]) };
        if conduit == Conduit::Hvc {
            self.account(x0, r);
        }
        r
    }

    /// An HVC with a plain function ID (the traffic rounds).
    fn hvc(&mut self, fid: u32, args: [u64; 4]) -> [u64; 4] {
        self.raw(Conduit::Hvc, u64::from(fid), args)
    }

    /// Counts the answer of an HVC the way the hypervisor's `STATS`
    /// counters do (see [`Counts`]).
    fn account(&mut self, x0: u64, r: [u64; 4]) {
        let fid = x0 as u32;
        if !VENDOR_COUNTED.contains(&fid) {
            return;
        }
        let answer = r[0] as i64;
        if answer == NOT_SUPPORTED && x0 >> 32 != 0 {
            // Garbage bits 63:32: answered as an unknown call (not
            // counted), unless the store is off, when a store call's
            // own NOT_SUPPORTED looks the same.
            if !self.plan.store {
                self.counts.ambiguous += 1;
            }
            return;
        }
        if answer < 0 {
            self.counts.vendor_errors += 1;
        } else if fid == func::AGING_TEST_CLEAR {
            self.counts.aging_ok += 1;
        } else if fid == func::MEM_RELEASE {
            self.counts.released_pages += r[0];
        }
    }

    // ---- fuzzed calls ------------------------------------------------

    fn fuzz_one(&mut self, call: Call) {
        let planted = self.plant(&call);
        let r = self.raw(call.conduit, call.x0, call.args);
        self.counts.calls += 1;
        match self.judge(&call, r) {
            Ok(()) => match r[0] as i64 {
                0.. => self.counts.ok += 1,
                NOT_SUPPORTED => self.counts.not_supported += 1,
                _ => self.counts.rejected += 1,
            },
            Err(expected) => {
                self.counts.undocumented += 1;
                report(format_args!(
                    "vcpu{} call {}: UNDOCUMENTED {call} -> x0={:#x} x1={:#x}, expected {expected}",
                    self.vcpu, self.call_no, r[0], r[1]
                ));
            }
        }
        self.check_planted(&call, r, planted);
    }

    /// Whether the answer `r` to `call` is one docs/ABI.md allows.
    fn judge(&self, call: &Call, r: [u64; 4]) -> Result<(), &'static str> {
        let x0 = r[0] as i64;
        if call.conduit == Conduit::Smc {
            return need(x0 == NOT_SUPPORTED, "NOT_SUPPORTED (SMC is not a conduit)");
        }
        let as_call = self.expected(call.fid(), call.args, r);
        // SMCCC passes the function ID in w0; a hypervisor may also refuse
        // garbage in bits 63:32.
        if call.x0 >> 32 != 0 && as_call.is_err() && x0 == NOT_SUPPORTED {
            return Ok(());
        }
        as_call
    }

    /// The documented answers of function `fid` with arguments `a`.
    fn expected(&self, fid: u32, a: [u64; 4], r: [u64; 4]) -> Result<(), &'static str> {
        let x0 = r[0] as i64;
        let p = &self.plan;
        match fid {
            smccc_arch::SMCCC_VERSION => need(r[0] == VERSION_1_1, "0x10001 (SMCCC 1.1)"),
            smccc_arch::SMCCC_ARCH_FEATURES => {
                need(x0 >= 0 || x0 == NOT_SUPPORTED, ">= 0 or NOT_SUPPORTED")
            }
            psci::PSCI_VERSION => need(r[0] == VERSION_1_1, "0x10001 (PSCI 1.1)"),
            psci::PSCI_FEATURES => {
                if PSCI_IMPLEMENTED.contains(&(a[0] as u32)) {
                    need(x0 == 0, "0 (a documented PSCI function)")
                } else {
                    need(
                        x0 == i64::from(psci_err::NOT_SUPPORTED),
                        "NOT_SUPPORTED (not a documented PSCI function)",
                    )
                }
            }
            psci::PSCI_CPU_ON_32 | psci::PSCI_CPU_ON_64 => self.cpu_on_expected(a, x0),
            psci::PSCI_AFFINITY_INFO_32 | psci::PSCI_AFFINITY_INFO_64 => {
                self.affinity_expected(a, x0)
            }
            func::CALL_UID => need(
                (0..4).all(|i| r[i] as u32 == HYP_UID[i]),
                "the service UUID in w0..w3",
            ),
            func::REVISION => need(
                r[0] as u32 == REVISION.0 && r[1] as u32 == REVISION.1,
                "the revision in w0, w1",
            ),
            func::FEATURES => need(
                r[0] == self.feature_bits() && r[1] == p.af,
                "the call bitmap and AF mode FEATURES answered at the start",
            ),
            func::STATS => {
                if a[0] <= stats_group::AGING {
                    need(x0 == SUCCESS, "SUCCESS (a known group)")
                } else {
                    need(x0 == INVALID_PARAMETER, "INVALID_PARAMETER (unknown group)")
                }
            }
            func::AGING_FEATURES => need(
                r == [
                    age_flags::ALL,
                    limits::AGING_MAX_PAGES,
                    limits::RELEASE_MAX_PAGES,
                    p.af,
                ],
                "the flags, both limits and the AF mode",
            ),
            func::AGING_TEST_CLEAR => {
                if self.aging_valid(a) {
                    need(
                        (0..=a[1] as i64).contains(&x0) || x0 == NO_MEMORY,
                        "young pages 0..=npages, or NO_MEMORY",
                    )
                } else {
                    need(
                        x0 == INVALID_PARAMETER,
                        "INVALID_PARAMETER (bad range, bitmap or flags)",
                    )
                }
            }
            func::MEM_RELEASE => {
                if self.range_valid(a[0], a[1], limits::RELEASE_MAX_PAGES) {
                    need(
                        (0..=a[1] as i64).contains(&x0) || x0 == NO_MEMORY,
                        "pages released 0..=npages, or NO_MEMORY",
                    )
                } else {
                    need(x0 == INVALID_PARAMETER, "INVALID_PARAMETER (bad range)")
                }
            }
            func::STORE_PUT | func::STORE_GET | func::STORE_DROP if !p.store => {
                need(x0 == NOT_SUPPORTED, "NOT_SUPPORTED (the store is disabled)")
            }
            func::STORE_PUT => {
                if self.range_valid(a[1], 1, 1) {
                    need(
                        (x0 == SUCCESS && r[1] > 0) || x0 == NO_MEMORY,
                        "SUCCESS with x1 > 0, or NO_MEMORY",
                    )
                } else {
                    need(x0 == INVALID_PARAMETER, "INVALID_PARAMETER (bad page)")
                }
            }
            func::STORE_GET => {
                if self.range_valid(a[1], 1, 1) {
                    need(
                        [SUCCESS, NOT_FOUND, NO_MEMORY].contains(&x0),
                        "SUCCESS, NOT_FOUND or NO_MEMORY",
                    )
                } else {
                    need(x0 == INVALID_PARAMETER, "INVALID_PARAMETER (bad page)")
                }
            }
            func::STORE_DROP => need([SUCCESS, NOT_FOUND].contains(&x0), "SUCCESS or NOT_FOUND"),
            _ => need(x0 == NOT_SUPPORTED, "NOT_SUPPORTED (unknown function)"),
        }
    }

    fn feature_bits(&self) -> u64 {
        if self.plan.store {
            feature::ALL
        } else {
            feature::ALL & !feature::STORE
        }
    }

    /// `CPU_ON(target, entry)`: never SUCCESS (see [`Worker::redirect`]).
    fn cpu_on_expected(&self, a: [u64; 4], x0: i64) -> Result<(), &'static str> {
        let [target, entry, ..] = a;
        let already = i64::from(psci_err::ALREADY_ON);
        let invalid = i64::from(psci_err::INVALID_PARAMETERS);
        let pending = i64::from(psci_err::ON_PENDING);
        let bad_entry = i64::from(psci_err::INVALID_ADDRESS);
        if target == self.me {
            if entry % 4 == 0 && self.plan.ram.contains(PhysAddr(entry)) {
                need(x0 == already, "ALREADY_ON (the caller itself)")
            } else {
                need(
                    x0 == already || x0 == bad_entry,
                    "ALREADY_ON or INVALID_ADDRESS (the caller itself, a bad entry)",
                )
            }
        } else if !self.listed(target) {
            need(x0 == invalid, "INVALID_PARAMETERS (no such MPIDR)")
        } else {
            need(
                [invalid, already, pending, bad_entry].contains(&x0),
                "INVALID_PARAMETERS, ALREADY_ON, ON_PENDING or INVALID_ADDRESS (unaligned entry)",
            )
        }
    }

    /// `AFFINITY_INFO(target, lowest level)`.
    fn affinity_expected(&self, a: [u64; 4], x0: i64) -> Result<(), &'static str> {
        let [target, level, ..] = a;
        let invalid = i64::from(psci_err::INVALID_PARAMETERS);
        if level as u32 != 0 {
            need(x0 == invalid, "INVALID_PARAMETERS (level above 0)")
        } else if target == self.me && level == 0 {
            need(x0 == 0, "0 (ON: the caller itself)")
        } else if !self.listed(target) {
            need(x0 == invalid, "INVALID_PARAMETERS (no such MPIDR)")
        } else {
            need(
                [0, 1, 2, invalid].contains(&x0),
                "ON, OFF, ON_PENDING or INVALID_PARAMETERS",
            )
        }
    }

    /// Whether `target` names a CPU of the DTB, read as 64 or as 32 bits.
    fn listed(&self, target: u64) -> bool {
        let as64 = target & AFF_MASK;
        let as32 = target & 0xffff_ffff & AFF_MASK;
        self.plan.cpus[..self.plan.ncpus]
            .iter()
            .any(|&cpu| cpu == as64 || cpu == as32)
    }

    /// Whether `[start, start + len)` lies wholly in guest RAM.
    fn in_ram(&self, start: u64, len: u64) -> bool {
        let ram = self.plan.ram;
        len > 0
            && start >= ram.start.as_u64()
            && start
                .checked_add(len)
                .is_some_and(|end| end <= ram.end.as_u64())
    }

    /// Whether `[start, start + len)` lies wholly in this vCPU's fuzz zone.
    fn in_zone(&self, start: u64, len: u64) -> bool {
        start >= self.zone
            && start
                .checked_add(len)
                .is_some_and(|end| end <= self.zone + ZONE_BYTES)
    }

    /// docs/ABI.md's range rule: aligned, `1..=max` pages, inside RAM.
    fn range_valid(&self, ipa: u64, npages: u64, max: u64) -> bool {
        ipa.is_multiple_of(PAGE_SIZE)
            && (1..=max).contains(&npages)
            && self.in_ram(ipa, npages * PAGE_SIZE)
    }

    /// docs/ABI.md's rules for `AGING_TEST_CLEAR`.
    fn aging_valid(&self, [ipa, npages, bitmap, flags]: [u64; 4]) -> bool {
        let flags_ok = flags & !age_flags::ALL == 0
            && (flags & (age_flags::MASK | age_flags::FLUSH) == 0 || flags & age_flags::CLEAR != 0);
        flags_ok
            && self.range_valid(ipa, npages, limits::AGING_MAX_PAGES)
            && bitmap.is_multiple_of(8)
            && self.in_ram(bitmap, npages.div_ceil(64) * 8)
    }

    /// Plants sentinels where `call` could write in this vCPU's zone:
    /// `[0]` where a rejected call must not write, `[1]` the word after an
    /// `AGING_TEST_CLEAR` bitmap, which no answer may write.
    fn plant(&mut self, call: &Call) -> [Option<u64>; 2] {
        let a = call.args;
        let mut at = [None, None];
        let page_of = |addr: u64| addr & !(PAGE_SIZE - 1);
        match normalise(call.fid()) {
            func::AGING_TEST_CLEAR => {
                let word = a[2] & !7;
                if self.in_zone(word, 8) {
                    at[0] = Some(word);
                }
                if a[2].is_multiple_of(8) && (1..=limits::AGING_MAX_PAGES).contains(&a[1]) {
                    let after = a[2].wrapping_add(a[1].div_ceil(64) * 8);
                    if self.in_zone(after, 8) {
                        at[1] = Some(after);
                    }
                }
            }
            func::MEM_RELEASE if self.in_zone(page_of(a[0]), PAGE_SIZE) => {
                at[0] = Some(page_of(a[0]));
            }
            func::STORE_GET if self.in_zone(page_of(a[1]), PAGE_SIZE) => {
                at[0] = Some(page_of(a[1]));
            }
            _ => {}
        }
        for &addr in at.iter().flatten() {
            write_word(addr, SENTINEL ^ addr);
        }
        at
    }

    /// Checks the sentinels [`Worker::plant`] planted, and the bitmap of
    /// a successful `AGING_TEST_CLEAR` in this vCPU's zone.
    fn check_planted(&mut self, call: &Call, r: [u64; 4], at: [Option<u64>; 2]) {
        let x0 = r[0] as i64;
        if x0 < 0 && x0 != NO_MEMORY {
            if let Some(addr) = at[0] {
                let found = read_word(addr);
                self.fuzz_check(
                    found == SENTINEL ^ addr,
                    call,
                    format_args!("a rejected call wrote {addr:#x} (now {found:#x})"),
                );
            }
        }
        if let Some(addr) = at[1] {
            let found = read_word(addr);
            self.fuzz_check(
                found == SENTINEL ^ addr,
                call,
                format_args!("the word after the bitmap, {addr:#x}, was written ({found:#x})"),
            );
        }
        let [_, npages, bitmap, _] = call.args;
        let words = npages.div_ceil(64);
        if call.conduit == Conduit::Hvc
            && call.fid() == func::AGING_TEST_CLEAR
            && x0 >= 0
            && words <= 64
            && self.in_zone(bitmap, words * 8)
        {
            let mut young = 0;
            for w in 0..words {
                young += u64::from(read_word(bitmap + w * 8).count_ones());
            }
            let tail = match npages % 64 {
                0 => 0,
                used => read_word(bitmap + (words - 1) * 8) >> used,
            };
            self.fuzz_check(
                young == r[0] && tail == 0,
                call,
                format_args!(
                    "bitmap has {young} bits set (bits past npages {tail:#x}), x0 says {}",
                    r[0]
                ),
            );
        }
    }

    fn fuzz_check(&mut self, ok: bool, call: &Call, what: fmt::Arguments<'_>) {
        if !ok {
            self.counts.mismatches += 1;
            report(format_args!(
                "vcpu{} call {}: MISMATCH {call}: {what}",
                self.vcpu, self.call_no
            ));
        }
    }

    // ---- generating calls --------------------------------------------

    /// A random number in `[0, n)` (0 if `n` is 0).
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.rng.rand_range(0..n)
        }
    }

    /// One chance in `n`.
    fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    fn ram_pages(&self) -> u64 {
        self.plan.ram.size() / PAGE_SIZE
    }

    /// A page-aligned address of guest RAM.
    fn ram_page(&mut self) -> u64 {
        let n = self.ram_pages();
        self.plan.ram.start.as_u64() + self.below(n) * PAGE_SIZE
    }

    /// A page of this vCPU's fuzz zone.
    fn zone_page(&mut self) -> u64 {
        self.zone + self.below(ZONE_PAGES) * PAGE_SIZE
    }

    fn gen_call(&mut self) -> Call {
        let fid = loop {
            let fid = self.gen_fid();
            if !denied(fid) {
                break fid;
            }
        };
        let conduit = if self.one_in(20) {
            Conduit::Smc
        } else {
            Conduit::Hvc
        };
        let high = if self.one_in(12) {
            if self.one_in(4) {
                // What a sign-extended 32-bit ID looks like.
                0xffff_ffff_0000_0000
            } else {
                (self.rng.rand_u64() << 32).max(1 << 32)
            }
        } else {
            0
        };
        let mut args = self.gen_args(fid);
        self.redirect(fid, &mut args);
        Call {
            conduit,
            x0: high | u64::from(fid),
            args,
        }
    }

    fn gen_fid(&mut self) -> u32 {
        match self.below(100) {
            0..=39 => self.vendor_fid(),
            40..=54 => self.pick(&KNOWN),
            55..=69 => {
                let base = match self.below(3) {
                    0 => self.pick(&KNOWN),
                    1 => self.pick(&EDGES),
                    _ => self.pick(&DENIED),
                };
                if self.one_in(2) {
                    base.wrapping_add(1)
                } else {
                    base.wrapping_sub(1)
                }
            }
            70..=79 => self.pick(&EDGES),
            80..=89 => {
                // A random function of a random owner.
                let owner = self.below(64) as u32;
                let bits = if self.one_in(2) { FAST64 } else { 1 << 31 };
                bits | owner << 24 | self.below(0x1_0000) as u32
            }
            _ => self.rng.rand_u64() as u32,
        }
    }

    /// A vendor call, by [`VENDOR_WEIGHTED`].
    fn vendor_fid(&mut self) -> u32 {
        let total: u64 = VENDOR_WEIGHTED.iter().map(|&(_, w)| w).sum();
        let mut roll = self.below(total);
        for (fid, weight) in VENDOR_WEIGHTED {
            if roll < weight {
                return fid;
            }
            roll -= weight;
        }
        func::FEATURES
    }

    fn gen_args(&mut self, fid: u32) -> [u64; 4] {
        let mut a = [self.any(), self.any(), self.any(), self.any()];
        match normalise(fid) {
            func::AGING_TEST_CLEAR => match self.below(3) {
                0 => {
                    a = self.valid_aging();
                    if self.one_in(2) {
                        let i = self.below(4) as usize;
                        a[i] = match i {
                            1 => self.npages_edge(limits::AGING_MAX_PAGES),
                            3 => self.flags(),
                            _ => self.addr_edge(),
                        };
                    }
                }
                1 => {
                    let (ipa, npages) = self.edge_range(limits::AGING_MAX_PAGES);
                    let bitmap = if self.one_in(2) {
                        self.edge_bitmap(npages)
                    } else {
                        self.zone_page()
                    };
                    a = [ipa, npages, bitmap, self.pick(&VALID_FLAGS)];
                    if self.one_in(2) {
                        // A valid range with a bitmap at an edge.
                        a[..2].copy_from_slice(&self.valid_aging()[..2]);
                        a[2] = self.edge_bitmap(a[1]);
                    }
                }
                _ => {
                    a = [
                        self.addr(),
                        self.npages(limits::AGING_MAX_PAGES),
                        self.addr(),
                        self.flags(),
                    ];
                }
            },
            func::MEM_RELEASE => match self.below(3) {
                0 => {
                    a[0] = self.ram_page();
                    a[1] = 1 + self.below(ZONE_PAGES);
                }
                1 => (a[0], a[1]) = self.edge_range(limits::RELEASE_MAX_PAGES),
                _ => {
                    a[0] = self.addr();
                    a[1] = self.npages(limits::RELEASE_MAX_PAGES);
                }
            },
            func::STORE_PUT => {
                a[0] = self.key(true);
                a[1] = match self.below(3) {
                    0 => self.ram_page(),
                    1 => self.edge_range(1).0,
                    _ => self.addr(),
                };
            }
            func::STORE_GET => {
                a[0] = self.key(false);
                a[1] = match self.below(3) {
                    0 => self.zone_page(),
                    1 => self.edge_range(1).0,
                    _ => self.addr(),
                };
            }
            func::STORE_DROP => a[0] = self.key(false),
            func::STATS => a[0] = self.group(),
            f if f == psci::PSCI_FEATURES | SMC64 => a[0] = self.fid_arg(),
            f if f == psci::PSCI_CPU_ON_64 => {
                a[0] = self.target();
                a[1] = if self.one_in(2) {
                    self.ram_page() + 4 * self.below(PAGE_SIZE / 4)
                } else {
                    self.addr()
                };
            }
            f if f == psci::PSCI_AFFINITY_INFO_64 => {
                a[0] = self.target();
                a[1] = match self.below(4) {
                    0 | 1 => 0,
                    2 => 1 + self.below(3),
                    _ => self.rng.rand_u64(),
                };
            }
            _ => {}
        }
        a
    }

    /// A page range at an edge of what is valid for a call whose limit is
    /// `max`: ending exactly at the end of RAM or one page past it,
    /// starting at the start of RAM or one page below, starting at the end
    /// of RAM, ending exactly at 2^64 or one page past (wrapping), the
    /// limit or one page more, unaligned near the end of RAM.
    fn edge_range(&mut self, max: u64) -> (u64, u64) {
        let (s, e) = (self.plan.ram.start.as_u64(), self.plan.ram.end.as_u64());
        let fit = max.min(self.ram_pages());
        let k = match self.below(4) {
            0 => 1,
            1 => 1 + self.below(8.min(fit)),
            2 => 1 + self.below(fit),
            _ => fit,
        };
        let over = self.below(2);
        let top = !(PAGE_SIZE - 1);
        match self.below(7) {
            0 => (e - k * PAGE_SIZE, k + over),
            1 => (s - over * PAGE_SIZE, k + over),
            2 => (e, k),
            3 => (top - (k - 1) * PAGE_SIZE, k + over),
            4 => (
                s + self.below(self.ram_pages() - k + 1) * PAGE_SIZE,
                max + over,
            ),
            5 => (e - k * PAGE_SIZE + self.pick(&[1, 8, PAGE_SIZE / 2]), k),
            _ => (s - k * PAGE_SIZE, k + over),
        }
    }

    /// An `AGING_TEST_CLEAR` bitmap address at an edge of RAM for
    /// `npages`: ending exactly at the end of RAM, one word past it,
    /// starting one word below RAM, unaligned at the end.
    fn edge_bitmap(&mut self, npages: u64) -> u64 {
        let (s, e) = (self.plan.ram.start.as_u64(), self.plan.ram.end.as_u64());
        let bytes = if (1..=limits::AGING_MAX_PAGES).contains(&npages) {
            npages.div_ceil(64) * 8
        } else {
            8
        };
        match self.below(5) {
            0 => e - bytes,
            1 => e - bytes + 8,
            2 => s - 8,
            3 => e - bytes + 4,
            _ => e,
        }
    }

    /// A valid `AGING_TEST_CLEAR` (before redirection).
    fn valid_aging(&mut self) -> [u64; 4] {
        let ram_pages = self.ram_pages();
        let npages = match self.below(20) {
            0 => 1 + self.below(ram_pages.min(limits::AGING_MAX_PAGES)),
            1..=3 => 65 + self.below(4096.min(ram_pages).saturating_sub(64)),
            _ => 1 + self.below(64),
        };
        let ipa = if npages <= ZONE_PAGES && self.one_in(3) {
            self.zone + self.below(ZONE_PAGES - npages + 1) * PAGE_SIZE
        } else {
            self.plan.ram.start.as_u64() + self.below(ram_pages - npages + 1) * PAGE_SIZE
        };
        let bitmap = self.zone + self.below((ZONE_BYTES - MAX_BITMAP_BYTES) / 8) * 8;
        [ipa, npages, bitmap, self.pick(&VALID_FLAGS)]
    }

    /// Any argument.
    fn any(&mut self) -> u64 {
        match self.below(6) {
            0 | 1 => self.addr(),
            2 => self.npages(limits::RELEASE_MAX_PAGES),
            3 => self.flags(),
            4 => self.key(false),
            _ => self.rng.rand_u64(),
        }
    }

    /// An address, biased to interesting places.
    fn addr(&mut self) -> u64 {
        let ram = self.plan.ram;
        match self.below(100) {
            0..=19 => self.zone_page(),
            20..=22 => self.zone_page() + 1 + self.below(PAGE_SIZE - 1),
            23..=37 => self.ram_page(),
            38..=40 => {
                let t = self.plan.traffic;
                t.start.as_u64() + self.below(t.size() / PAGE_SIZE) * PAGE_SIZE
            }
            41..=43 => {
                let image = self.plan.image;
                image.start.as_u64() + self.below(image.size() / PAGE_SIZE) * PAGE_SIZE
            }
            44..=65 => self.addr_edge(),
            66..=71 => self.rng.rand_u64(),
            72..=79 => self.rng.rand_u64() & ((1 << 48) - 1) & !(PAGE_SIZE - 1),
            _ => ram.start.as_u64() + self.below(ram.size()),
        }
    }

    /// Boundary addresses: the edges of RAM, MMIO, the address space.
    fn addr_edge(&mut self) -> u64 {
        let s = self.plan.ram.start.as_u64();
        let e = self.plan.ram.end.as_u64();
        let edges = [
            s,
            s - PAGE_SIZE,
            s - 8,
            s - 1,
            s + 1,
            s + PAGE_SIZE,
            e,
            e - PAGE_SIZE,
            e - 2 * PAGE_SIZE,
            e - 8,
            e - 1,
            e + 8,
            e + PAGE_SIZE,
            0,
            1,
            8,
            PAGE_SIZE - 1,
            PAGE_SIZE,
            PAGE_SIZE + 1,
            UART_IPA,
            UART_IPA + 0x18,
            UART_IPA + PAGE_SIZE - 8,
            UNBACKED_IPA,
            1 << 40,
            (1 << 40) - PAGE_SIZE,
            1 << 47,
            1 << 48,
            (1 << 48) - PAGE_SIZE,
            u64::MAX,
            u64::MAX - (PAGE_SIZE - 1),
            u64::MAX - 7,
            1 << 63,
            u64::from(u32::MAX),
            s | 1 << 32,
            s | 1 << 63,
        ];
        self.pick(&edges)
    }

    /// A page count for a call whose limit is `max`.
    fn npages(&mut self, max: u64) -> u64 {
        match self.below(10) {
            0..=3 => 1 + self.below(64),
            4 | 5 => 1 + self.below(max),
            _ => self.npages_edge(max),
        }
    }

    fn npages_edge(&mut self, max: u64) -> u64 {
        let ram_pages = self.ram_pages();
        let edges = [
            0,
            1,
            2,
            63,
            64,
            65,
            511,
            512,
            513,
            max - 1,
            max,
            max + 1,
            limits::RELEASE_MAX_PAGES + 1,
            limits::AGING_MAX_PAGES + 1,
            ram_pages,
            ram_pages + 1,
            1 << 52,
            u64::MAX / PAGE_SIZE + 1,
            1 << 32,
            i64::MAX as u64,
            u64::MAX,
        ];
        self.pick(&edges)
    }

    fn flags(&mut self) -> u64 {
        if self.below(10) < 7 {
            self.below(8)
        } else {
            let odd = [
                8,
                16,
                1 << 63,
                u64::MAX,
                age_flags::CLEAR | 8,
                age_flags::ALL | 1 << 32,
                !age_flags::ALL,
                self.rng.rand_u64(),
            ];
            self.pick(&odd)
        }
    }

    /// A store key; `put`: the key of a `PUT` (random ones are remembered
    /// and dropped later, see [`KEY_RING`]).
    fn key(&mut self, put: bool) -> u64 {
        match self.below(10) {
            0..=5 => POOL_KEY_BASE + self.below(POOL_KEYS),
            6 => {
                let odd = [0, 1, 2, u64::MAX, u64::MAX - 1, 1 << 63, TRAFFIC_KEY_TAG];
                self.pick(&odd)
            }
            7 => {
                let ring = self.ring;
                self.pick(&ring)
            }
            _ => {
                let key = self.rng.rand_u64();
                if put {
                    let old = core::mem::replace(&mut self.ring[self.ring_next], key);
                    self.ring_next = (self.ring_next + 1) % KEY_RING;
                    if old & !0xff != POOL_KEY_BASE {
                        self.drop_key(old);
                    }
                }
                key
            }
        }
    }

    /// Drops a random key a `PUT` may have stored (housekeeping, not a
    /// fuzzed call): `SUCCESS` or `NOT_FOUND`.
    fn drop_key(&mut self, key: u64) {
        if !self.plan.store || key & TRAFFIC_KEY_MASK == TRAFFIC_KEY_TAG {
            return;
        }
        let r = self.hvc(func::STORE_DROP, [key, 0, 0, 0]);
        self.traffic_check(
            [SUCCESS, NOT_FOUND].contains(&(r[0] as i64)),
            "STORE_DROP of an old random key",
            "SUCCESS or NOT_FOUND",
            r[0],
        );
    }

    fn group(&mut self) -> u64 {
        if self.below(10) < 7 {
            self.below(4)
        } else {
            let odd = [4, 5, 1 << 32, u64::MAX, 1 << 63, self.rng.rand_u64()];
            self.pick(&odd)
        }
    }

    /// The function-ID argument of `PSCI_FEATURES`.
    fn fid_arg(&mut self) -> u64 {
        let fid = match self.below(4) {
            0 => self.pick(&KNOWN),
            1 => self.pick(&PSCI_IMPLEMENTED),
            2 => self.pick(&DENIED) & !SMC64,
            _ => self.rng.rand_u64() as u32,
        };
        let high = if self.one_in(8) {
            self.rng.rand_u64() << 32
        } else {
            0
        };
        high | u64::from(fid)
    }

    /// A `CPU_ON` / `AFFINITY_INFO` target.
    fn target(&mut self) -> u64 {
        match self.below(10) {
            0..=3 => self.me,
            4..=6 => {
                let i = self.below(self.plan.ncpus as u64) as usize;
                self.plan.cpus[i]
            }
            _ => {
                let odd = [
                    0xff,
                    0xff00,
                    0xff_0000_0000,
                    AFF_MASK,
                    u64::MAX,
                    1 << 40,
                    self.me | 1 << 32,
                    self.me | 1 << 40,
                    self.rng.rand_u64(),
                ];
                self.pick(&odd)
            }
        }
    }

    /// Moves `fid`'s memory-writing arguments that lie in RAM into this
    /// vCPU's fuzz zone (keeping their offset in the page), keeps `CLEAR`
    /// off the traffic zones and the fuzzed keys off the traffic keys, and
    /// makes every `CPU_ON` entry invalid unless the target is this vCPU.
    fn redirect(&mut self, fid: u32, a: &mut [u64; 4]) {
        let page_of = |addr: u64| addr & !(PAGE_SIZE - 1);
        match normalise(fid) {
            func::MEM_RELEASE => {
                let n = a[1];
                if (1..=limits::RELEASE_MAX_PAGES).contains(&n)
                    && self.in_ram(page_of(a[0]), n * PAGE_SIZE)
                {
                    let n = (n - 1) % ZONE_PAGES + 1;
                    a[0] = self.fold(a[0], n);
                    a[1] = n;
                }
            }
            func::AGING_TEST_CLEAR => {
                let n = a[1];
                let counted = (1..=limits::AGING_MAX_PAGES).contains(&n);
                let words = if counted { n.div_ceil(64) } else { 1 };
                if self.in_ram(a[2] & !7, words * 8) {
                    let offset = a[2].wrapping_sub(self.plan.ram.start.as_u64());
                    a[2] = self.zone + offset % (ZONE_BYTES - MAX_BITMAP_BYTES);
                }
                let pages = if counted { n } else { 1 };
                let t = self.plan.traffic;
                let start = page_of(a[0]);
                if a[3] & age_flags::CLEAR != 0
                    && start < t.end.as_u64()
                    && start.saturating_add(pages * PAGE_SIZE) > t.start.as_u64()
                {
                    let n = if counted { (n - 1) % ZONE_PAGES + 1 } else { 1 };
                    a[0] = self.fold(a[0], n);
                    if counted {
                        a[1] = n;
                    }
                }
            }
            func::STORE_GET if self.in_ram(page_of(a[1]), PAGE_SIZE) => {
                a[1] = self.fold(a[1], 1);
            }
            // A read, but it pins the page for the copy, and a pinned page
            // harvests as old: kept off the traffic pages.
            func::STORE_PUT if self.plan.traffic.contains(PhysAddr(a[1])) => {
                a[1] = self.fold(a[1], 1);
            }
            f if f == psci::PSCI_CPU_ON_64 && a[0] != self.me => {
                a[1] = (a[1] & !3) | self.rng.rand_range(1..4);
            }
            _ => {}
        }
        if matches!(
            normalise(fid),
            func::STORE_PUT | func::STORE_GET | func::STORE_DROP
        ) && a[0] & TRAFFIC_KEY_MASK == TRAFFIC_KEY_TAG
        {
            a[0] ^= 1 << 62;
        }
    }

    /// `addr` moved into the fuzz zone where `npages` pages from it fit,
    /// keeping its offset in the page.
    fn fold(&self, addr: u64, npages: u64) -> u64 {
        let page = addr.wrapping_sub(self.plan.ram.start.as_u64()) / PAGE_SIZE;
        let slots = ZONE_PAGES - npages + 1;
        self.zone + page % slots * PAGE_SIZE + (addr & (PAGE_SIZE - 1))
    }

    // ---- traffic -----------------------------------------------------

    /// Counts and reports a failed traffic check.
    fn traffic_check(&mut self, ok: bool, what: &str, expected: &str, got: u64) {
        if !ok {
            self.counts.mismatches += 1;
            report(format_args!(
                "vcpu{} round {} (after call {}): MISMATCH {what}: expected {expected}, got {got:#x}",
                self.vcpu, self.counts.traffic_rounds, self.call_no
            ));
        }
    }

    /// `AGING_TEST_CLEAR(base, n, bitmap, flags)` with `n <= 64`: returns
    /// `x0` and the bitmap word, after checking the next word unwritten.
    fn age(&mut self, base: u64, n: u64, bitmap: u64, flags: u64) -> (u64, u64) {
        write_word(bitmap + 8, SENTINEL);
        let r = self.hvc(func::AGING_TEST_CLEAR, [base, n, bitmap, flags]);
        let next = read_word(bitmap + 8);
        self.traffic_check(
            next == SENTINEL,
            "the word after a one-word bitmap",
            "unwritten",
            next,
        );
        (r[0], read_word(bitmap))
    }

    /// Checks an [`Worker::age`] answer: `young` pages, bitmap `bits`.
    fn expect_young(&mut self, what: &str, (x0, word): (u64, u64), bits: u64) {
        let young = u64::from(bits.count_ones());
        if x0 != young {
            self.traffic_check(false, what, "x0 = young pages of the model", x0);
        }
        if word != bits {
            report(format_args!(
                "vcpu{} round {}: MISMATCH {what}: bitmap {word:#x}, model {bits:#x}",
                self.vcpu, self.counts.traffic_rounds
            ));
            self.counts.mismatches += 1;
        }
    }

    /// One traffic round on the next window of this vCPU's traffic zone:
    /// the window's content against the model, aging with every flag
    /// combination against the model of which pages were accessed, a
    /// release, and a store round trip.
    ///
    /// Why the order: the window is read first, which leaves every page
    /// young and its translation cached; `CLEAR|FLUSH` must then report
    /// every page and drop those translations, or the touches right after
    /// would not set the flags again (a `FLUSH` that does not flush is
    /// seen here, unless some other TLB invalidation came in between).
    /// The rounds' `CLEAR`s without `FLUSH` are followed by a local TLB
    /// invalidation, so the next round's reads set the flags again.
    fn traffic_round(&mut self) {
        self.counts.traffic_rounds += 1;
        let first = self.counts.traffic_rounds % WINDOWS * WINDOW;
        let base = self.tzone + first * PAGE_SIZE;
        let bitmap = self.tzone + BITMAP_PAGE * PAGE_SIZE;
        let (clear, mask, flush) = (age_flags::CLEAR, age_flags::MASK, age_flags::FLUSH);
        // Sometimes fewer pages: the bits past them must read 0.
        let n = if self.trng.rand_range(0..4) == 0 {
            self.trng.rand_range(33..WINDOW + 1)
        } else {
            WINDOW
        };
        let in_range = if n == 64 { u64::MAX } else { (1 << n) - 1 };

        // Every page of the window reads as the model says, and is now
        // young (a released one is backed again by the read).
        let mut bad = None;
        for i in 0..WINDOW {
            let page = base + i * PAGE_SIZE;
            let tag = self.tags[(first + i) as usize];
            for j in SAMPLES {
                let (found, want) = (read_word(page + j * 8), sample(tag, page, j));
                if found != want && bad.is_none() {
                    bad = Some((page + j * 8, found, want));
                }
            }
        }
        if let Some((addr, found, want)) = bad {
            self.counts.mismatches += 1;
            report(format_args!(
                "vcpu{} round {}: MISMATCH window word {addr:#x}: {found:#x}, model {want:#x}",
                self.vcpu, self.counts.traffic_rounds
            ));
        }
        let a = self.age(base, n, bitmap, clear | flush);
        self.expect_young("CLEAR|FLUSH of the window just read", a, in_range);
        let touched = self.trng.rand_u64() & in_range;
        for i in (0..WINDOW).filter(|i| touched & (1 << i) != 0) {
            let tag = self.trng.rand_u64() | 1;
            let page = base + i * PAGE_SIZE;
            for j in SAMPLES {
                write_word(page + j * 8, sample(tag, page, j));
            }
            self.tags[(first + i) as usize] = tag;
        }
        let a = self.age(base, n, bitmap, 0);
        self.expect_young(
            "young bits of the pages touched after CLEAR|FLUSH",
            a,
            touched,
        );
        // Look-around: all young reported, only the masked ones cleared.
        let mask_bits = self.trng.rand_u64() & in_range;
        write_word(bitmap, mask_bits);
        let a = self.age(base, n, bitmap, clear | mask);
        self.expect_young("CLEAR|MASK (reports every young page)", a, touched);
        let a = self.age(base, n, bitmap, 0);
        self.expect_young(
            "after CLEAR|MASK (unmasked still young)",
            a,
            touched & !mask_bits,
        );
        let a = self.age(base, n, bitmap, clear);
        self.expect_young("CLEAR of the rest", a, touched & !mask_bits);
        let a = self.age(base, n, bitmap, 0);
        self.expect_young("after CLEAR (all old)", a, 0);
        mmu::invalidate_local_tlb();

        // Release a run of the window: every page of it is backed (read
        // above), so all of them are freed, and they read zero next time.
        let start = self.trng.rand_range(0..WINDOW);
        let count = self.trng.rand_range(1..WINDOW - start + 1);
        let r = self.hvc(func::MEM_RELEASE, [base + start * PAGE_SIZE, count, 0, 0]);
        self.traffic_check(
            r[0] == count,
            "MEM_RELEASE of a run of backed window pages",
            "npages",
            r[0],
        );
        let run = (first + start) as usize..(first + start + count) as usize;
        self.tags[run].fill(0);
        if self.plan.store {
            self.traffic_store();
        }
    }

    /// A store round trip under a traffic key: `PUT`, then either a
    /// scrambled (or released) page and `GET` back, or `DROP`.
    fn traffic_store(&mut self) {
        let page = self.tzone + STORE_PAGE * PAGE_SIZE;
        let key =
            TRAFFIC_KEY_TAG | (self.vcpu as u64) << 32 | (self.counts.traffic_rounds & 0xffff_ffff);
        let seed = self.trng.rand_u64();
        let mut sum = 0;
        for i in 0..PAGE_WORDS {
            write_word(page + i * 8, store_word(seed, i, &mut sum));
        }
        let r = self.hvc(func::STORE_PUT, [key, page, 0, 0]);
        match r[0] as i64 {
            SUCCESS if r[1] > 0 => {}
            NO_MEMORY => {
                self.counts.store_full += 1;
                return;
            }
            _ => {
                self.traffic_check(
                    false,
                    "STORE_PUT",
                    "SUCCESS with x1 > 0, or NO_MEMORY",
                    r[0],
                );
                return;
            }
        }
        if self.trng.rand_range(0..4) != 0 {
            if self.trng.rand_range(0..2) == 0 {
                let r = self.hvc(func::MEM_RELEASE, [page, 1, 0, 0]);
                self.traffic_check(r[0] == 1, "MEM_RELEASE of the written page", "1", r[0]);
            } else {
                for i in 0..PAGE_WORDS {
                    write_word(page + i * 8, !i);
                }
            }
            let r = self.hvc(func::STORE_GET, [key, page, 0, 0]);
            self.traffic_check(r[0] == 0, "STORE_GET of the key put", "SUCCESS", r[0]);
            let mut sum = 0;
            let bad =
                (0..PAGE_WORDS).find(|&i| read_word(page + i * 8) != store_word(seed, i, &mut sum));
            if let Some(i) = bad {
                let found = read_word(page + i * 8);
                self.traffic_check(false, "a word of the page got back", "what was put", found);
            }
            write_word(page, SENTINEL);
            let r = self.hvc(func::STORE_GET, [key, page, 0, 0]);
            self.traffic_check(
                r[0] as i64 == NOT_FOUND,
                "a second STORE_GET (GET is exclusive)",
                "NOT_FOUND",
                r[0],
            );
        } else {
            let r = self.hvc(func::STORE_DROP, [key, 0, 0, 0]);
            self.traffic_check(r[0] == 0, "STORE_DROP of the key put", "SUCCESS", r[0]);
            let r = self.hvc(func::STORE_DROP, [key, 0, 0, 0]);
            self.traffic_check(
                r[0] as i64 == NOT_FOUND,
                "a second STORE_DROP",
                "NOT_FOUND",
                r[0],
            );
            write_word(page, SENTINEL);
            let r = self.hvc(func::STORE_GET, [key, page, 0, 0]);
            self.traffic_check(
                r[0] as i64 == NOT_FOUND,
                "STORE_GET of a dropped key",
                "NOT_FOUND",
                r[0],
            );
        }
        let word = read_word(page);
        self.traffic_check(
            word == SENTINEL,
            "the STORE_GET target after NOT_FOUND",
            "untouched",
            word,
        );
    }
}
