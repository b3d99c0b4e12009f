//! Ending the machine: exit codes, `EXIT`, PSCI `SYSTEM_OFF`.
//!
//! Under our hypervisor the vendor `EXIT(code)` hypercall ends the machine
//! with `code` as QEMU's exit status, which is how tests report a verdict.
//! Without it (plain QEMU answers unknown calls with `NOT_SUPPORTED`) the
//! kernel falls back to PSCI `SYSTEM_OFF`, which loses the code but still
//! ends the run. If even that returns, the CPU halts after saying so.

use core::fmt;

use smccc::psci;
use smccc::Hvc;

use crate::smccc_client;

/// Exit statuses of the guest.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitCode {
    /// Everything passed.
    Success = 0,
    /// The test suite ran and some tests failed.
    TestsFailed = 1,
    /// A fatal error during boot or in a subsystem.
    Fatal = 2,
    /// An exception the kernel could not handle.
    UnhandledException = 3,
    /// A Rust panic.
    Panic = 4,
}

impl fmt::Display for ExitCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} ({})", self, *self as u8)
    }
}

/// Ends the machine with `code`, reporting each step that fails.
pub fn exit(code: ExitCode) -> ! {
    if code != ExitCode::Success {
        log::info!("exiting with code {}", code as u8);
    }
    let error = smccc_client::exit(code as u8);
    log::warn!("EXIT hypercall unavailable ({error}); falling back to PSCI SYSTEM_OFF");
    system_off()
}

/// Like [`exit`] but prints nothing: for a fault inside the fault report.
pub fn exit_quietly(code: ExitCode) -> ! {
    let _ = smccc_client::exit(code as u8);
    let _ = psci::system_off::<Hvc>();
    halt()
}

/// Powers the machine off with PSCI `SYSTEM_OFF`.
pub fn system_off() -> ! {
    match psci::system_off::<Hvc>() {
        Ok(()) => log::error!("PSCI SYSTEM_OFF returned success; halting"),
        Err(error) => log::error!("PSCI SYSTEM_OFF failed: {error}; halting"),
    }
    halt()
}

/// Stops this CPU for good (after a message was printed).
fn halt() -> ! {
    loop {
        aarch64_cpu::asm::wfi();
    }
}

/// Reports a fatal error and ends the machine with [`ExitCode::Fatal`].
pub fn fatal(error: &dyn fmt::Display) -> ! {
    log::error!("fatal: {error}");
    exit(ExitCode::Fatal)
}
