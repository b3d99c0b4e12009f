//! The background aging worker (bootarg `aging_cpu=N`): a physical CPU
//! that runs no vCPU and instead harvests the guest's Access Flags
//! continuously with the lockless harvester, while the guest runs on the
//! other CPUs. With `migrate=N` it is also a migration stress: every pass
//! it moves up to N random guest pages to new frames (break-before-make,
//! copy, remap, one batched flush per pass, old frames freed after it).
//!
//! The worker is an RCU reader like any vCPU exit handler: online for its
//! whole life, passing a quiescent state between harvest chunks and
//! between passes. It never takes the stage-2 writer lock.

use core::sync::atomic::{AtomicU64, Ordering};

use hyp_abi::layout;
use hyp_core::addr::{Ipa, PhysAddr, PAGE_SIZE};
use log::{info, warn};
use stage2::MigrateOutcome;

use super::{fill_frame, Vm, RCU};
use crate::memory;

/// Pages harvested per call (2 MiB): the bitmap lives on the stack.
const CHUNK_PAGES: u64 = 512;
/// Pause between passes, so the worker does not starve the emulated
/// vCPUs of host time (QEMU TCG on a shared host).
const PASS_PAUSE_MS: u64 = 2;
/// Candidate pages tried per requested move (random pages may be
/// unbacked).
const TRIES_PER_MOVE: u32 = 8;

/// What the worker did (Relaxed: statistics).
#[derive(Debug, Default)]
pub(super) struct AgingStats {
    pub(super) passes: AtomicU64,
    pub(super) harvested_pages: AtomicU64,
    pub(super) young: AtomicU64,
    pub(super) migrated: AtomicU64,
}

/// The worker's configuration.
#[derive(Copy, Clone, Debug)]
pub(super) struct AgingConfig {
    /// The physical CPU it runs on.
    pub(super) cpu: usize,
    /// Pages to move per pass (0: none).
    pub(super) migrate: u32,
}

/// A small deterministic PRNG (xorshift64*) for picking pages to move.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Runs the worker on this CPU forever (the machine powers off from a
/// vCPU).
pub(super) fn run(vm: &'static Vm, config: AgingConfig) -> ! {
    info!(
        "vm0: aging worker on cpu{} (migrate={} pages/pass)",
        config.cpu, config.migrate
    );
    RCU.online();
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15 ^ config.cpu as u64);
    loop {
        // A pass is hypervisor work on the VM: the invariant checker's
        // stop-the-world waits for it (see `gate`).
        vm.gate.enter(config.cpu);
        harvest_pass(vm);
        if config.migrate > 0 {
            migrate_pass(vm, config.migrate, &mut rng);
        }
        vm.gate.leave(config.cpu);
        vm.aging.passes.fetch_add(1, Ordering::Relaxed);
        let deadline = crate::time::deadline_ms(PASS_PAUSE_MS);
        while !crate::time::passed(deadline) {
            RCU.quiescent();
            core::hint::spin_loop();
        }
    }
}

/// One `test_clear_young` sweep over guest RAM.
fn harvest_pass(vm: &Vm) {
    let mut bitmap = [0u64; (CHUNK_PAGES / 64) as usize];
    let pages = vm.ram_size / PAGE_SIZE;
    let mut done = 0;
    while done < pages {
        let n = (pages - done).min(CHUNK_PAGES);
        let ipa = Ipa(layout::RAM_BASE + done * PAGE_SIZE);
        match vm.stage2.test_clear_young(ipa, n, &mut bitmap[..]) {
            Ok(young) => {
                vm.aging.young.fetch_add(young, Ordering::Relaxed);
                vm.aging.harvested_pages.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => warn!("vm0: aging worker: harvest at {ipa}: {e}"),
        }
        RCU.quiescent();
        done += n;
    }
}

/// Moves up to `count` random backed guest pages to fresh frames.
fn migrate_pass(vm: &Vm, count: u32, rng: &mut XorShift) {
    let pages = vm.ram_size / PAGE_SIZE;
    let mut release = memory::free_guest_frames;
    let mut batch = vm.stage2.batch(&mut release);
    let mut moved = 0;
    for _ in 0..count * TRIES_PER_MOVE {
        if moved == count {
            break;
        }
        let ipa = Ipa(layout::RAM_BASE + (rng.next() % pages) * PAGE_SIZE);
        if vm.stage2.translate(ipa).is_none() {
            continue;
        }
        let Ok(frame) = memory::alloc_zeroed_frame(memory::Owner::Guest) else {
            break;
        };
        let copy = |old: PhysAddr, new: PhysAddr| {
            // SAFETY: both frames are identity-mapped guest RAM frames; the
            // old one is locked out of the guest (entry locked, TLB
            // invalidated), the new one is ours and not yet mapped.
            unsafe { fill_frame(new, old.as_u64() as *const u8, PAGE_SIZE as usize) };
        };
        match vm.stage2.migrate_page(ipa, frame.start(), &mut batch, copy) {
            Ok(MigrateOutcome::Moved { .. }) => {
                vm.aging.migrated.fetch_add(1, Ordering::Relaxed);
                moved += 1;
            }
            Ok(MigrateOutcome::NotMoved) => memory::free_frame(frame, memory::Owner::Guest),
            Err(e) => {
                memory::free_frame(frame, memory::Owner::Guest);
                warn!("vm0: aging worker: migrate {ipa}: {e}");
            }
        }
    }
    batch.flush();
}
