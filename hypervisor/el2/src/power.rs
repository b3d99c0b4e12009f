//! Stopping the machine: PSCI `SYSTEM_OFF` for a normal stop, semihosting
//! `SYS_EXIT` when QEMU's exit status must carry a verdict, and the fatal
//! path shared by panics and unexpected exceptions.

use crate::platform::Conduit;
use core::sync::atomic::{AtomicBool, Ordering};
use spin::Once;

/// QEMU exit status of a panic.
pub const EXIT_PANIC: u8 = 101;
/// QEMU exit status of an unexpected EL2 exception.
pub const EXIT_EXCEPTION: u8 = 102;
/// QEMU exit status of a configuration or platform error found at boot.
pub const EXIT_BOOT_ERROR: u8 = 2;

/// Semihosting operation numbers (Arm semihosting v2).
mod semihosting {
    pub const SYS_WRITE0: u64 = 0x04;
    pub const SYS_EXIT: u64 = 0x18;
    /// `ADP_Stopped_ApplicationExit`: the reason code for a normal exit.
    pub const ADP_STOPPED_APPLICATION_EXIT: u64 = 0x20026;
}

/// Set once a CPU has started to stop the machine; others then stay quiet.
static STOPPING: AtomicBool = AtomicBool::new(false);
/// The PSCI conduit, once known from the DTB.
static CONDUIT: Once<Conduit> = Once::new();

/// Records the PSCI conduit for [`system_off`].
pub fn set_conduit(conduit: Conduit) {
    CONDUIT.call_once(|| conduit);
}

/// Whether some CPU is stopping the machine.
pub fn stopping() -> bool {
    STOPPING.load(Ordering::Relaxed)
}

fn semihosting_call(op: u64, param: u64) -> u64 {
    let ret;
    // SAFETY: `hlt #0xf000` is the AArch64 semihosting trap; QEMU runs with
    // `-semihosting-config enable=on,target=native` and handles it. `param`
    // points to memory that stays valid for the call; only x0 is written.
    unsafe {
        core::arch::asm!("hlt #0xf000", inout("x0") op => ret, in("x1") param, options(nostack));
    }
    ret
}

/// Writes `s` (without NUL) through semihosting: the console of last resort,
/// used before the UART is known.
pub fn semihosting_write(s: &str) {
    let mut buf = [0u8; 256];
    for chunk in s.as_bytes().chunks(buf.len() - 1) {
        buf[..chunk.len()].copy_from_slice(chunk);
        buf[chunk.len()] = 0;
        semihosting_call(semihosting::SYS_WRITE0, buf.as_ptr() as u64);
    }
}

/// Ends QEMU with exit status `code` through semihosting. All CPUs stop.
pub fn exit_qemu(code: u8) -> ! {
    STOPPING.store(true, Ordering::Relaxed);
    let block = [semihosting::ADP_STOPPED_APPLICATION_EXIT, u64::from(code)];
    semihosting_call(semihosting::SYS_EXIT, block.as_ptr() as u64);
    // Only reached if semihosting is disabled (then `hlt` traps instead).
    system_off()
}

/// Powers the machine off with PSCI `SYSTEM_OFF`; QEMU exits 0.
pub fn system_off() -> ! {
    STOPPING.store(true, Ordering::Relaxed);
    // Before the DTB is read the conduit is unknown: SMC is what QEMU
    // `virt` with `virtualization=on` uses.
    let result = CONDUIT.get().copied().unwrap_or(Conduit::Smc).system_off();
    // SYSTEM_OFF does not return on success.
    crate::console::emergency_line(format_args!("hyp: PSCI SYSTEM_OFF failed: {result:?}"));
    park()
}

/// Stops this CPU for good (used when another CPU is ending the machine).
pub fn park() -> ! {
    loop {
        aarch64_cpu::asm::wfe();
    }
}

/// Called by `boot.S` if a Rust entry point ever returns.
pub extern "C" fn halt_after_return() -> ! {
    fatal(
        EXIT_PANIC,
        format_args!(
            "hyp: entry point returned on cpu{}",
            crate::boot::cpu_index()
        ),
    )
}

/// Prints `report` as one block that no other CPU interleaves with, then
/// ends QEMU with `code`. If another CPU is already stopping the machine,
/// this one prints and parks, so the first verdict wins.
pub fn fatal(code: u8, report: core::fmt::Arguments<'_>) -> ! {
    let first = !STOPPING.swap(true, Ordering::AcqRel);
    crate::console::emergency_line(report);
    if first {
        exit_qemu(code)
    }
    park()
}
