//! The virtual machine: one guest at EL1 under stage 2, its vCPUs pinned
//! 1:1 to physical CPUs.
//!
//! - Guest RAM is `[RAM_BASE, RAM_BASE + guest_mem)` in IPA space. The
//!   image and the DTB are mapped eagerly; every other page is backed by a
//!   zeroed frame at its first stage-2 translation fault.
//! - Entries are installed with the Access Flag clear; the CPU sets it
//!   (`VTCR_EL2.HA`, hardware AF) or the hypervisor does on Access-flag
//!   faults (software AF), as [`AfMode`] says.
//! - A vCPU's EL1 system registers live in the physical CPU's registers: a
//!   physical CPU only ever runs its own vCPU, so nothing but the general,
//!   FP/SIMD and return state (`GuestContext`) is switched on an exit.
//!
//! Exits are handled in [`exits`]; PSCI and the vendor service in [`smccc`].

mod aging;
mod debug;
mod exits;
mod gate;
mod guest_dtb;
mod guest_mem;
mod hw;
mod invariants;
mod mmio;
mod smccc;
mod vendor;

use crate::cpu::CpuFeatures;
use crate::exceptions::{enter_guest, GuestContext};
use crate::memory;
use crate::platform::Platform;
use crate::power;
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use hyp_abi::{layout, AfMode};
use hyp_core::addr::{Ipa, PhysAddr, PAGE_SIZE};
use hyp_core::bootargs::{AfPolicy, BootConfig, InvariantChecks};
use log::{info, warn};
use spin::{Mutex, Once};
use stage2::{MapFlags, MemType, Perms, Rcu, Stage2};

/// QEMU exit status when the VM hit something it cannot continue from.
pub const EXIT_VM_ERROR: u8 = 103;
/// QEMU exit status when no host memory is left to back a guest page.
pub const EXIT_VM_OOM: u8 = 104;
/// QEMU exit status when a vCPU is stuck in a loop of aborts.
pub const EXIT_VM_ABORT_LOOP: u8 = 105;
/// QEMU exit status when the invariant checker found a violation.
pub const EXIT_INVARIANT_VIOLATION: u8 = 106;

/// Guest-caused warning lines printed in full per kind; later ones are
/// only counted in the statistics, so a guest cannot flood the console
/// (every byte is a trapped UART write).
const GUEST_NOISE_LINES: u64 = 256;

/// Kinds of guest-caused warnings, each with its own budget (so a storm
/// of faults does not hide the rejected calls, or the reverse).
#[derive(Copy, Clone, Debug)]
pub(crate) enum Noise {
    /// Rejected or unknown hypercalls, SMCs, PSCI misuse.
    Call = 0,
    /// Injected aborts and undefined-instruction exceptions.
    Fault = 1,
}

static GUEST_NOISE: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

/// `warn!` for a guest-caused warning of kind `Noise::$kind`, within that
/// kind's budget ([`guest_noise`]).
macro_rules! guest_warn {
    ($kind:ident, $($arg:tt)+) => {
        if $crate::vm::guest_noise($crate::vm::Noise::$kind) {
            log::warn!($($arg)+);
        }
    };
}
pub(crate) use guest_warn;

/// Whether one more guest-caused warning of `kind` may be printed.
pub(crate) fn guest_noise(kind: Noise) -> bool {
    let n = GUEST_NOISE[kind as usize].fetch_add(1, Ordering::Relaxed);
    if n == GUEST_NOISE_LINES {
        let counters = match kind {
            Noise::Call => "rejected_calls=",
            Noise::Fault => "injected_aborts=, injected_undefs=",
        };
        warn!("vm0: {GUEST_NOISE_LINES} guest-caused {kind:?} warnings printed: further ones are only counted ({counters} in the statistics)");
    }
    n < GUEST_NOISE_LINES
}

/// Injected aborts of one vCPU in a row at the same pc and address (see
/// `exits::ABORT_LOOP_LIMIT`). Only the vCPU's own CPU touches it.
#[derive(Debug, Default)]
struct AbortStreak {
    pc: AtomicU64,
    far: AtomicU64,
    count: AtomicU64,
}

impl AbortStreak {
    /// Notes an injected abort at `pc`/`far`; returns the streak length.
    fn note(&self, pc: u64, far: u64) -> u64 {
        let same = self.pc.load(Ordering::Relaxed) == pc
            && self.far.load(Ordering::Relaxed) == far
            && self.count.load(Ordering::Relaxed) > 0;
        if same {
            self.count.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.pc.store(pc, Ordering::Relaxed);
            self.far.store(far, Ordering::Relaxed);
            self.count.store(1, Ordering::Relaxed);
            1
        }
    }

    /// Any other exit: the vCPU made progress.
    fn reset(&self) {
        self.count.store(0, Ordering::Relaxed);
    }
}

/// The VM's VMID.
const VMID: u16 = 1;
/// PSTATE a vCPU starts in (and exceptions are injected in): EL1h,
/// D/A/I/F masked.
fn spsr_el1h_masked() -> u64 {
    use aarch64_cpu::registers::SPSR_EL2;
    let mut v: tock_registers::LocalRegisterCopy<u64, SPSR_EL2::Register> =
        tock_registers::LocalRegisterCopy::new(0);
    v.modify(
        SPSR_EL2::M::EL1h
            + SPSR_EL2::D::Masked
            + SPSR_EL2::A::Masked
            + SPSR_EL2::I::Masked
            + SPSR_EL2::F::Masked,
    );
    v.get()
}

/// The stage-2 table type of the VM.
pub type GuestStage2 = Stage2<'static, hw::FrameTables, hw::VmidTlb>;

/// The RCU domain of every CPU that walks stage-2 tables: a CPU is online
/// while it runs hypervisor code for the VM, offline (extended quiescent
/// state) while it runs the guest or idles.
static RCU: Rcu = Rcu::new(crate::boot::cpu_index);

/// Power state of a vCPU (PSCI view).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[repr(u8)]
enum PowerState {
    Off = 0,
    /// A CPU_ON is being written (entry point not yet published).
    Claimed = 1,
    /// CPU_ON published: the physical CPU will start it.
    Pending = 2,
    On = 3,
}

impl PowerState {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Claimed,
            2 => Self::Pending,
            3 => Self::On,
            _ => Self::Off,
        }
    }
}

/// One vCPU, pinned to the physical CPU of the same index.
#[derive(Debug)]
struct Vcpu {
    /// The MPIDR the guest sees (that of the physical CPU).
    mpidr: u64,
    /// [`PowerState`]; transitions are CASes (see [`Vm::cpu_on`]).
    state: AtomicU8,
    /// Entry point and context id of a pending CPU_ON (published by the
    /// Release store of `Pending`, read after an Acquire load of it).
    entry: AtomicU64,
    context_id: AtomicU64,
    /// Console line being assembled.
    console: Mutex<mmio::ConsoleLine>,
    /// Abort-loop detection.
    abort_streak: AbortStreak,
}

/// Counters of the VM (Relaxed: statistics only).
#[derive(Debug, Default)]
struct VmStats {
    stage2_faults: AtomicU64,
    af_faults: AtomicU64,
    injected_aborts: AtomicU64,
    /// Trapped instructions answered with an undefined-instruction exception.
    injected_undefs: AtomicU64,
    /// Stage-2 faults that found the page mapped (another vCPU won the
    /// race) or locked by a writer: the guest retried.
    fault_races: AtomicU64,
}

/// Why a guest page could not be backed.
#[derive(Copy, Clone, Debug)]
pub(crate) enum BackingError {
    /// No frame for the page (or for a stage-2 table) is left.
    OutOfMemory,
    /// Stage 2 refused the install.
    Stage2(stage2::MapError),
}

impl fmt::Display for BackingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OutOfMemory => write!(f, "out of host memory"),
            Self::Stage2(e) => write!(f, "stage 2: {e}"),
        }
    }
}

/// The guest.
pub struct Vm {
    stage2: GuestStage2,
    regs: hw::Stage2Regs,
    ram_size: u64,
    vcpus: Vec<Vcpu>,
    stats: VmStats,
    /// The background aging worker, if `aging_cpu=` names a CPU.
    aging_config: Option<aging::AgingConfig>,
    aging: aging::AgingStats,
    /// The compressed page store (`None` with `store=0`).
    store: Option<Mutex<vendor::Store>>,
    vendor: vendor::VendorStats,
    /// Guest RAM may exceed the free host memory (`overcommit=on`).
    overcommit: bool,
    /// When the invariant checker runs.
    invariants: InvariantChecks,
    /// Stop-the-world for the invariant checker.
    gate: gate::Gate,
}

impl fmt::Debug for Vm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vm")
            .field("ram_size", &self.ram_size)
            .field("af", &self.regs.af)
            .field("vcpus", &self.vcpus.len())
            .finish()
    }
}

static VM: Once<Vm> = Once::new();

/// Why the VM could not be created.
#[derive(Debug)]
pub enum VmError {
    /// Guest RAM does not fit in the free frames.
    RamTooSmall {
        /// Frames the configuration needs.
        needed: u64,
        /// Frames free.
        free: u64,
    },
    /// The guest image is not where the bootargs say, or does not fit.
    BadImage(&'static str),
    /// Stage 2 could not be created or filled.
    Stage2(alloc::string::String),
    /// The guest DTB could not be written.
    Dtb(vm_fdt::Error),
}

impl fmt::Display for VmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::RamTooSmall { needed, free } => write!(
                f,
                "RAM too small for the configuration: guest_mem needs {needed} frames (+ tables), {free} free (overcommit=on allows it)"
            ),
            Self::BadImage(why) => write!(f, "guest image: {why}"),
            Self::Stage2(e) => write!(f, "stage 2: {e}"),
            Self::Dtb(e) => write!(f, "guest DTB: {e:?}"),
        }
    }
}

fn stage2_err(e: impl fmt::Display) -> VmError {
    VmError::Stage2(alloc::format!("{e}"))
}

impl Vm {
    fn create(
        platform: &Platform,
        config: &BootConfig,
        features: &CpuFeatures,
    ) -> Result<Self, VmError> {
        let image = config
            .guest_image
            .ok_or(VmError::BadImage("no guest=ADDR+SIZE bootarg"))?;
        if !platform
            .ram
            .iter()
            .any(|r| r.contains(image.start) && r.contains(PhysAddr(image.end().as_u64() - 1)))
        {
            return Err(VmError::BadImage("not inside RAM"));
        }
        if image.overlaps(&memory::image_range()) || image.overlaps(&platform.dtb) {
            return Err(VmError::BadImage("overlaps the hypervisor or its DTB"));
        }
        let ram_size = config.guest_mem;
        if image.size > ram_size - layout::DTB_MAX_SIZE {
            return Err(VmError::BadImage("larger than guest RAM"));
        }
        let needed = ram_size / PAGE_SIZE;
        let (free, _) = memory::frame_counts();
        // Leave room for the stage-2 tables of a fully touched guest (~1/500)
        // and some slack for the hypervisor, unless overcommitted.
        if needed + needed / 256 + 256 > free {
            if !config.overcommit {
                return Err(VmError::RamTooSmall { needed, free });
            }
            warn!(
                "vm0: overcommitted: guest RAM {} MiB, {} MiB of host memory free: the guest must keep its resident set small (out of memory stops the VM)",
                ram_size >> 20,
                (free * PAGE_SIZE) >> 20
            );
        }

        let hw_af = match config.af {
            AfPolicy::Software => false,
            AfPolicy::Auto => features.hafdbs >= 1,
            AfPolicy::Hardware => {
                if features.hafdbs == 0 {
                    warn!("af=hw but the CPU has no hardware Access Flag (HAFDBS=0): using software AF");
                }
                features.hafdbs >= 1
            }
        };
        let af = if hw_af {
            AfMode::Hardware
        } else {
            AfMode::Software
        };

        let online = crate::smp::online_cpus();
        let aging_config = match config.aging_cpu.map(|c| c as usize) {
            Some(0) => {
                warn!("aging_cpu=0 is the boot CPU, which runs vCPU 0: no aging worker");
                None
            }
            Some(cpu) if cpu >= online => {
                warn!("aging_cpu={cpu} but only {online} CPUs are online: no aging worker");
                None
            }
            Some(cpu) => Some(aging::AgingConfig {
                cpu,
                migrate: config.migrate,
            }),
            None => None,
        };
        // vCPU i runs on CPU i: the worker's CPU and those above it run none.
        let max_vcpus = aging_config.map_or(online, |a| a.cpu);
        let nvcpus = match config.guest_cpus as usize {
            0 => max_vcpus,
            n if n > max_vcpus => {
                warn!("guest_cpus={n} but only {max_vcpus} CPUs can run vCPUs: using {max_vcpus}");
                max_vcpus
            }
            n => n,
        };
        let vcpus = platform.cpus[..nvcpus]
            .iter()
            .enumerate()
            .map(|(i, c)| Vcpu {
                mpidr: (1 << 31) | c.mpidr,
                state: AtomicU8::new(if i == 0 {
                    PowerState::On
                } else {
                    PowerState::Off
                } as u8),
                entry: AtomicU64::new(0),
                context_id: AtomicU64::new(0),
                console: Mutex::new(mmio::ConsoleLine::default()),
                abort_streak: AbortStreak::default(),
            })
            .collect::<Vec<_>>();

        let stage2 = Stage2::new(
            features.ipa_bits() as u8,
            hw::FrameTables,
            hw::VmidTlb,
            &RCU,
        )
        .map_err(stage2_err)?;
        #[cfg(feature = "broken-skip-flush")]
        {
            warn!("vm0: BROKEN BUILD (feature broken-skip-flush): TLB batches skip the flush before freeing");
            stage2.skip_flush_for_test();
        }
        #[cfg(feature = "tlb-check")]
        info!("vm0: TLB checking mode on (feature tlb-check)");
        let regs = hw::Stage2Regs {
            ipa_bits: features.ipa_bits(),
            parange: features.parange,
            af,
            root: stage2.root(),
            vmid: VMID,
        };
        let vm = Self {
            stage2,
            regs,
            ram_size,
            vcpus,
            stats: VmStats::default(),
            aging_config,
            aging: aging::AgingStats::default(),
            store: (config.store_size > 0).then(|| {
                Mutex::new(vendor::Store::new(
                    vendor::StoreFrames,
                    (config.store_size / PAGE_SIZE) as usize,
                ))
            }),
            vendor: vendor::VendorStats::default(),
            overcommit: config.overcommit,
            invariants: config.invariants,
            gate: gate::Gate::new(online),
        };
        // TLB maintenance while filling stage 2 must target our VMID.
        hw::setup_this_cpu(&vm.regs, vm.vcpus[0].mpidr);

        let mpidrs: Vec<u64> = vm.vcpus.iter().map(|v| v.mpidr).collect();
        let dtb = guest_dtb::build(&guest_dtb::GuestDtbSpec {
            ram_size,
            vcpu_mpidrs: &mpidrs,
            bootargs: &config.guest_bootargs,
        })
        .map_err(VmError::Dtb)?;
        vm.load(Ipa(layout::DTB_IPA), dtb.as_ptr(), dtb.len() as u64)?;
        vm.load(
            Ipa(layout::IMAGE_IPA),
            image.start.as_u64() as *const u8,
            image.size,
        )?;
        if config.fault == Some(hyp_core::bootargs::FaultInjection::S2Alias) {
            vm.inject_alias()?;
        }
        info!(
            "vm0: {} vCPUs, RAM {:#x}+{:#x}, image {} bytes from {}, AF {:?}, IPA {} bits",
            vm.vcpus.len(),
            layout::RAM_BASE,
            ram_size,
            image.size,
            image.start,
            af,
            features.ipa_bits()
        );
        Ok(vm)
    }

    /// Copies `len` bytes from hypervisor memory at `src` into fresh frames
    /// mapped at `ipa` (eager mapping of the image and DTB).
    fn load(&self, ipa: Ipa, src: *const u8, len: u64) -> Result<(), VmError> {
        let mut off = 0;
        while off < len {
            let frame = memory::alloc_zeroed_frame(memory::Owner::Guest).map_err(stage2_err)?;
            let n = (len - off).min(PAGE_SIZE);
            // SAFETY: `src + off .. + n` is inside the source (the loader
            // module or the DTB vector), the frame is fresh, ours and
            // identity mapped; the two do not overlap.
            unsafe { fill_frame(frame.start(), src.add(off as usize), n as usize) };
            self.map_ram_page(ipa.add(off), frame.start())?;
            off += PAGE_SIZE;
        }
        Ok(())
    }

    /// Test only (`fault=s2alias`): maps the frame of the image's first
    /// page a second time, at the last page of guest RAM — the kind of
    /// double mapping the invariant checker must report.
    fn inject_alias(&self) -> Result<(), VmError> {
        let frame = self
            .stage2
            .translate(Ipa(layout::IMAGE_IPA))
            .ok_or_else(|| stage2_err("the image is not mapped"))?
            .pa;
        let alias = Ipa(layout::RAM_BASE + self.ram_size - PAGE_SIZE);
        warn!("vm0: fault injection (fault=s2alias): frame {frame} mapped at {alias} too");
        self.map_ram_page(alias, frame)
    }

    fn map_ram_page(&self, ipa: Ipa, pa: PhysAddr) -> Result<(), VmError> {
        self.stage2
            .map(
                ipa,
                pa,
                PAGE_SIZE,
                Perms::RWX,
                MemType::Normal,
                MapFlags {
                    af: false,
                    allow_blocks: false,
                },
            )
            .map_err(stage2_err)?;
        Ok(())
    }

    /// Backs guest page `page` with a zeroed frame unless it is backed or
    /// locked already (the lockless fault path, racing other vCPUs with
    /// compare-exchanges). Returns whether this call installed it.
    fn install_zeroed(&self, page: Ipa) -> Result<bool, BackingError> {
        if self.stage2.leaf_view(page) != Some(stage2::DescView::Invalid) {
            return Ok(false);
        }
        let frame = memory::alloc_zeroed_frame(memory::Owner::Guest)
            .map_err(|_| BackingError::OutOfMemory)?;
        match self
            .stage2
            .fault_install(page, frame.start(), Perms::RWX, MemType::Normal, false)
        {
            Ok(stage2::FaultOutcome::Installed) => Ok(true),
            Ok(stage2::FaultOutcome::AlreadyMapped | stage2::FaultOutcome::Retry) => {
                memory::free_frame(frame, memory::Owner::Guest);
                Ok(false)
            }
            Err(e) => {
                memory::free_frame(frame, memory::Owner::Guest);
                Err(match e {
                    stage2::MapError::NoMemory => BackingError::OutOfMemory,
                    e => BackingError::Stage2(e),
                })
            }
        }
    }

    /// Whether `ipa` is guest RAM.
    fn in_ram(&self, ipa: Ipa) -> bool {
        ipa.as_u64() >= layout::RAM_BASE && ipa.as_u64() - layout::RAM_BASE < self.ram_size
    }

    /// Stops the world, prints the statistics and runs the final
    /// invariant check (unless `invariants=off`). Returns the number of
    /// violations. Called by vCPU `index` when the VM ends.
    fn stop_checks(&self, index: usize) -> u64 {
        let closed = self.gate.close(index);
        self.print_stats();
        match closed {
            Err(e) => {
                crate::println!(
                    "hyp: invariants (final): not checked: cpu{} did not leave the hypervisor in time",
                    e.cpu
                );
                0
            }
            Ok(()) if self.invariants == InvariantChecks::Off => 0,
            Ok(()) => invariants::check(self, "final"),
        }
    }

    /// Ends the VM and the machine after [`Vm::stop_checks`]: with exit
    /// status `code` and, for a VM error, its `report` line; or with
    /// [`EXIT_INVARIANT_VIOLATION`] if the final check failed.
    fn end(&self, index: usize, code: u8, report: Option<fmt::Arguments<'_>>) -> ! {
        let violations = self.stop_checks(index);
        let code = if violations > 0 {
            EXIT_INVARIANT_VIOLATION
        } else {
            code
        };
        match report {
            Some(report) => power::fatal(code, report),
            None if violations > 0 => power::fatal(
                code,
                format_args!("hyp: vm0: {violations} invariant violations: failing the run"),
            ),
            None => power::exit_qemu(code),
        }
    }

    /// `invariants=exit`: a full check after vCPU `index`'s exit; a
    /// violation stops the machine at once.
    fn check_after_exit(&self, index: usize) {
        if self.gate.close(index).is_err() {
            return;
        }
        let violations = invariants::check(self, "exit");
        self.gate.open();
        if violations > 0 {
            self.print_stats();
            power::fatal(
                EXIT_INVARIANT_VIOLATION,
                format_args!(
                    "hyp: vm0/vcpu{index}: {violations} invariant violations after an exit: failing the run"
                ),
            )
        }
    }

    /// Prints the statistics line scripts and tests read.
    fn print_stats(&self) {
        debug::at_stop(self);
        for (i, v) in self.vcpus.iter().enumerate() {
            let mut c = v.console.lock();
            if !c.is_empty() {
                c.flush(i, false);
            }
        }
        let frames = self.stage2.mapped_pages();
        if self.aging_config.is_some() {
            let a = &self.aging;
            crate::println!(
                "hyp: vm0 aging passes={} harvested_pages={} young={} migrated={}",
                a.passes.load(Ordering::Relaxed),
                a.harvested_pages.load(Ordering::Relaxed),
                a.young.load(Ordering::Relaxed),
                a.migrated.load(Ordering::Relaxed),
            );
        }
        crate::println!(
            "hyp: vm0 stats mapped_frames={} mapped_mib={} ram_mib={} stage2_faults={} fault_races={} af_faults={} injected_aborts={} injected_undefs={} af={:?}",
            frames,
            (frames * PAGE_SIZE) >> 20,
            self.ram_size >> 20,
            self.stats.stage2_faults.load(Ordering::Relaxed),
            self.stats.fault_races.load(Ordering::Relaxed),
            self.stats.af_faults.load(Ordering::Relaxed),
            self.stats.injected_aborts.load(Ordering::Relaxed),
            self.stats.injected_undefs.load(Ordering::Relaxed),
            self.regs.af,
        );
        let v = &self.vendor;
        let store = self.store.as_ref().map(|s| s.lock().stats());
        crate::println!(
            "hyp: vm0 memory table_pages={} tables_unlinked={} released_pages={} release_calls={} aging_calls={} aging_pages={} rejected_calls={} store_entries={} store_bytes={} store_frames={}",
            self.stage2.table_pages(),
            v.tables_unlinked.load(Ordering::Relaxed),
            v.released_pages.load(Ordering::Relaxed),
            v.release_calls.load(Ordering::Relaxed),
            v.aging_calls.load(Ordering::Relaxed),
            v.aging_pages.load(Ordering::Relaxed),
            v.rejected.load(Ordering::Relaxed),
            store.map_or(0, |s| s.entries),
            store.map_or(0, |s| s.stored_bytes),
            store.map_or(0, |s| s.frames_used),
        );
    }
}

/// Copies `len` bytes from `src` to the start of guest frame `frame` and
/// makes them visible to a guest running with caches or MMU off, and to
/// its instruction fetches ([`clean_dcache_page`]).
///
/// # Safety
///
/// `src..src + len` is readable, `len <= PAGE_SIZE`, `frame` is an
/// identity-mapped frame nobody else writes meanwhile, and the two do not
/// overlap.
pub(super) unsafe fn fill_frame(frame: PhysAddr, src: *const u8, len: usize) {
    // SAFETY: the caller's guarantees.
    unsafe { core::ptr::copy_nonoverlapping(src, frame.as_u64() as *mut u8, len) };
    clean_dcache_page(frame);
}

/// Writes a page back to the point of coherency, so that a guest running
/// with its MMU (and caches) off reads what the hypervisor wrote.
fn clean_dcache_page(pa: PhysAddr) {
    const LINE: u64 = 64;
    let mut a = pa.as_u64();
    while a < pa.as_u64() + PAGE_SIZE {
        // SAFETY: cleaning a cache line of identity-mapped RAM does not
        // change memory contents.
        unsafe { core::arch::asm!("dc cvac, {}", in(reg) a, options(nostack)) };
        a += LINE;
    }
    aarch64_cpu::asm::barrier::dsb(aarch64_cpu::asm::barrier::SY);
    // SAFETY: invalidating the instruction caches has no effect on memory.
    unsafe { core::arch::asm!("ic ialluis", options(nostack)) };
    aarch64_cpu::asm::barrier::dsb(aarch64_cpu::asm::barrier::SY);
}

/// How a vCPU's run ended.
enum VcpuEnd {
    /// PSCI CPU_OFF: the physical CPU idles until the next CPU_ON.
    Off,
}

/// Runs the VM on the boot CPU (vCPU 0), or powers off without a guest.
pub fn run_primary(platform: &Platform, config: &BootConfig, features: &CpuFeatures) -> ! {
    if config.guest_image.is_none() {
        info!("no guest image (bootarg guest=ADDR+SIZE): powering off");
        power::system_off()
    }
    let vm = match Vm::create(platform, config, features) {
        Ok(vm) => VM.call_once(|| vm),
        Err(e) => power::fatal(power::EXIT_BOOT_ERROR, format_args!("hyp: error: {e}")),
    };
    aarch64_cpu::asm::sev();
    run_vcpu(vm, 0, layout::IMAGE_IPA, layout::DTB_IPA);
    idle_loop(vm, 0)
}

/// What a secondary CPU does once it is up: wait for the VM, then for a
/// PSCI CPU_ON of its vCPU.
pub fn secondary_idle(index: usize) -> ! {
    let vm = loop {
        if let Some(vm) = VM.get() {
            break vm;
        }
        aarch64_cpu::asm::wfe();
    };
    if let Some(config) = vm.aging_config.filter(|a| a.cpu == index) {
        // TLB maintenance by the worker must target the VM's VMID.
        hw::setup_this_cpu(&vm.regs, vm.vcpus[0].mpidr);
        aging::run(vm, config)
    }
    if index >= vm.vcpus.len() {
        info!("cpu{index}: no vCPU for this CPU, parking");
        power::park()
    }
    hw::setup_this_cpu(&vm.regs, vm.vcpus[index].mpidr);
    idle_loop(vm, index)
}

fn idle_loop(vm: &'static Vm, index: usize) -> ! {
    let vcpu = &vm.vcpus[index];
    loop {
        if PowerState::from_u8(vcpu.state.load(Ordering::Acquire)) == PowerState::Pending {
            let entry = vcpu.entry.load(Ordering::Relaxed);
            let ctx = vcpu.context_id.load(Ordering::Relaxed);
            vcpu.state.store(PowerState::On as u8, Ordering::Release);
            run_vcpu(vm, index, entry, ctx);
        } else {
            aarch64_cpu::asm::wfe();
        }
    }
}

fn run_vcpu(vm: &'static Vm, index: usize, entry: u64, arg: u64) {
    exits::reset_el1_state();
    let mut ctx = GuestContext::new(entry, spsr_el1h_masked(), arg);
    info!("vm0/vcpu{index}: starting at {entry:#x} (x0={arg:#x})");
    loop {
        // Guest code holds no stage-2 references: an extended quiescent
        // state from entry to the next exit.
        RCU.offline();
        // SAFETY: stage 2 confines the guest to its RAM (and traps on
        // everything else), HCR_EL2 runs it at EL1 in AArch64, and `ctx`
        // is an EL1h state (setup_this_cpu ran on this CPU).
        let kind = unsafe { enter_guest(&mut ctx) };
        RCU.online();
        vm.gate.enter(index);
        debug::record_exit(index, &ctx, kind);
        let next = exits::handle(vm, index, &mut ctx, kind);
        if vm.invariants == InvariantChecks::EveryExit {
            vm.check_after_exit(index);
        }
        vm.gate.leave(index);
        match next {
            exits::Next::Resume => {}
            exits::Next::Stop(VcpuEnd::Off) => {
                RCU.offline();
                info!("vm0/vcpu{index}: off");
                return;
            }
        }
    }
}
