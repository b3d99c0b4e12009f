//! Secondary CPUs: started with PSCI `CPU_ON` through the DTB's conduit,
//! each on its own stack (`boot.S`) with `TPIDR_EL2` = its DTB index.

use crate::platform::Platform;
use aarch64_cpu::registers::Readable;
use core::sync::atomic::{AtomicUsize, Ordering};
use log::{error, info};

/// CPUs that have reported in (the boot CPU included).
static ONLINE: AtomicUsize = AtomicUsize::new(1);

/// Starts every CPU of the DTB but the boot CPU (index 0) and waits up to
/// `timeout_ms` for them to report in. Returns how many CPUs are online.
pub fn start_secondaries(platform: &Platform, timeout_ms: u64) -> usize {
    let entry = crate::boot::_secondary_start as *const () as u64;
    let mut expected = 1;
    for (index, cpu) in platform.cpus.iter().enumerate().skip(1) {
        if index >= crate::boot::MAX_CPUS {
            error!(
                "cpu{index} (mpidr {:#x}) ignored: more than {} CPUs",
                cpu.mpidr,
                crate::boot::MAX_CPUS
            );
            continue;
        }
        match platform.psci.cpu_on(cpu.mpidr, entry, index as u64) {
            Ok(()) => expected += 1,
            Err(e) => error!("PSCI CPU_ON cpu{index} mpidr={:#x}: {e:?}", cpu.mpidr),
        }
    }
    let deadline = crate::time::deadline_ms(timeout_ms);
    while ONLINE.load(Ordering::Acquire) < expected && !crate::time::passed(deadline) {
        core::hint::spin_loop();
    }
    let online = ONLINE.load(Ordering::Acquire);
    if online < expected {
        error!("only {online} of {expected} CPUs reported in within {timeout_ms} ms");
    }
    online
}

/// Number of CPUs online.
pub fn online_cpus() -> usize {
    ONLINE.load(Ordering::Acquire)
}

/// Rust entry of a secondary CPU (called by `boot.S`, MMU off).
#[no_mangle]
pub extern "C" fn secondary_main(index: u64) -> ! {
    crate::boot::set_cpu_index(index as usize);
    crate::memory::enable_mmu_this_cpu();
    crate::exceptions::install_vectors();
    secondary_report_in(index as usize);
    crate::vm::secondary_idle(index as usize)
}

/// A secondary CPU announces itself (a function of its own so that
/// debuggers have a stable place to stop on a secondary CPU).
#[no_mangle]
#[inline(never)]
pub extern "C" fn secondary_report_in(index: usize) {
    let mpidr = aarch64_cpu::registers::MPIDR_EL1.get();
    info!("cpu{index} up (mpidr={mpidr:#x})");
    ONLINE.fetch_add(1, Ordering::Release);
}
