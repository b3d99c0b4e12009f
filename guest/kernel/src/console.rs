//! The console: a PL011 UART, a line lock and the `log` backend.
//!
//! Only the two registers the hypervisor emulates are used: `UARTDR`
//! (write a byte) and `UARTFR.TXFF` (transmit FIFO full). Every record is
//! printed as whole lines, each starting with `guest: `, under a lock that
//! all CPUs share, so lines of different vCPUs never interleave. The lock
//! knows its owner: a CPU that takes an exception while printing (or
//! panics) writes its report without waiting for itself.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicU64, Ordering};

use tock_registers::{register_bitfields, LocalRegisterCopy};

use crate::addr::PhysAddr;
use crate::mmio;
use crate::smp::Mpidr;

/// Offset of the data register.
const UARTDR: u64 = 0x000;
/// Offset of the flag register.
const UARTFR: u64 = 0x018;

register_bitfields! {u32,
    /// PL011 flag register.
    UARTFR_BITS [
        /// Transmit FIFO full.
        TXFF OFFSET(5) NUMBITS(1) []
    ]
}

/// How many times to poll a full transmit FIFO before dropping a byte: a
/// wedged UART must not hang the kernel.
const TXFF_POLL_LIMIT: u32 = 1_000_000;

/// Every line starts with this.
const LINE_PREFIX: &str = "guest: ";

/// Base address of the UART, 0 until [`init`].
static UART_BASE: AtomicU64 = AtomicU64::new(0);

/// Owner of the console: 0 when free, otherwise `MPIDR affinity + 1` of
/// the CPU printing. Acquire on taking, Release on giving back, so the
/// bytes of one line reach the UART before the next owner's.
static OWNER: AtomicU64 = AtomicU64::new(0);

/// Uses the PL011 at `base` from now on.
pub fn init(base: PhysAddr) {
    UART_BASE.store(base.as_u64(), Ordering::Release);
}

/// Writes one byte, waiting (boundedly) for room in the FIFO.
fn put_byte(base: PhysAddr, byte: u8) {
    let fr = PhysAddr(base.as_u64() + UARTFR);
    for _ in 0..TXFF_POLL_LIMIT {
        // SAFETY: `base` is the PL011 from the DTB, mapped as device memory
        // (or the MMU is off); reading UARTFR has no side effect.
        let flags =
            LocalRegisterCopy::<u32, UARTFR_BITS::Register>::new(unsafe { mmio::read32(fr) });
        if !flags.is_set(UARTFR_BITS::TXFF) {
            break;
        }
        core::hint::spin_loop();
    }
    // SAFETY: as above; writing UARTDR transmits one byte.
    unsafe { mmio::write32(PhysAddr(base.as_u64() + UARTDR), u32::from(byte)) };
}

/// Exclusive use of the console for the lines of one record.
struct ConsoleGuard {
    base: PhysAddr,
    /// False when this CPU already owned the console (re-entry from an
    /// exception or a panic): the outer owner releases it.
    release: bool,
    at_line_start: bool,
}

impl ConsoleGuard {
    /// Takes the console, or `None` if there is none yet.
    fn acquire() -> Option<Self> {
        let base = UART_BASE.load(Ordering::Acquire);
        if base == 0 {
            return None;
        }
        let me = Mpidr::current().as_u64() + 1;
        let mut release = true;
        loop {
            match OWNER.compare_exchange_weak(0, me, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) => break,
                Err(owner) if owner == me => {
                    release = false;
                    break;
                }
                Err(_) => core::hint::spin_loop(),
            }
        }
        let mut guard = Self {
            base: PhysAddr(base),
            release,
            at_line_start: true,
        };
        if !release {
            // Terminate the interrupted line so the report starts cleanly.
            put_byte(guard.base, b'\n');
            guard.at_line_start = true;
        }
        Some(guard)
    }
}

impl Write for ConsoleGuard {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for byte in s.bytes() {
            if self.at_line_start {
                for p in LINE_PREFIX.bytes() {
                    put_byte(self.base, p);
                }
                self.at_line_start = false;
            }
            put_byte(self.base, byte);
            if byte == b'\n' {
                self.at_line_start = true;
            }
        }
        Ok(())
    }
}

impl Drop for ConsoleGuard {
    fn drop(&mut self) {
        if !self.at_line_start {
            put_byte(self.base, b'\n');
        }
        if self.release {
            OWNER.store(0, Ordering::Release);
        }
    }
}

/// Prints `args` as one or more whole lines (a newline is added).
pub fn print_lines(args: fmt::Arguments<'_>) {
    if let Some(mut guard) = ConsoleGuard::acquire() {
        // The console cannot fail: a full FIFO drops bytes instead.
        let _ = guard.write_fmt(args);
    }
}

/// The `log` backend: `guest: ` + a level tag (none for `info`) + message.
struct Logger;

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let tag = match record.level() {
            log::Level::Error => "error: ",
            log::Level::Warn => "warning: ",
            log::Level::Info => "",
            log::Level::Debug => "debug: ",
            log::Level::Trace => "trace: ",
        };
        print_lines(format_args!("{tag}{}", record.args()));
    }

    fn flush(&self) {}
}

static LOGGER: Logger = Logger;

/// Installs the `log` backend at `level`. Idempotent: later calls only
/// change the level.
pub fn init_logger(level: log::LevelFilter) {
    // Fails only if a logger is already installed, which is then ours.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}
