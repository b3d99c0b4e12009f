//! The console: a PL011 UART found in the DTB, a `log` backend over it, and
//! `println!`.
//!
//! Every line is written whole under one lock, prefixed with the CPU index,
//! so lines from different CPUs never interleave. Before the UART is known
//! (or if the DTB has none) output goes through semihosting.

use crate::boot::cpu_index;
use core::fmt::{self, Write};
use hyp_core::addr::PhysAddr;
use spin::Mutex;
use tock_registers::interfaces::{Readable, Writeable};
use tock_registers::register_bitfields;
use tock_registers::register_structs;
use tock_registers::registers::{ReadOnly, ReadWrite};

register_bitfields! {u32,
    /// PL011 flag register.
    FR [
        /// Transmit FIFO full.
        TXFF OFFSET(5) NUMBITS(1) []
    ]
}

register_structs! {
    /// The PL011 registers the console uses.
    Pl011Regs {
        (0x00 => dr: ReadWrite<u32>),
        (0x04 => _reserved),
        (0x18 => fr: ReadOnly<u32, FR::Register>),
        (0x1c => @END),
    }
}

/// Where console bytes go.
enum Sink {
    /// Semihosting `SYS_WRITE0` (before the UART is known).
    Semihosting,
    /// A memory-mapped PL011 at this address (see [`use_pl011`]).
    Pl011(usize),
}

impl Sink {
    fn write_bytes(&self, s: &str) {
        match self {
            Sink::Semihosting => crate::power::semihosting_write(s),
            Sink::Pl011(base) => {
                // SAFETY: `use_pl011`'s caller guaranteed a PL011 at `base`
                // for the program's lifetime; access is through MMIO cells.
                let regs = unsafe { &*(*base as *const Pl011Regs) };
                for b in s.bytes() {
                    if b == b'\n' {
                        Self::put(regs, b'\r');
                    }
                    Self::put(regs, b);
                }
            }
        }
    }

    fn put(regs: &Pl011Regs, b: u8) {
        while regs.fr.is_set(FR::TXFF) {
            core::hint::spin_loop();
        }
        regs.dr.set(u32::from(b));
    }
}

impl Write for Sink {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.write_bytes(s);
        Ok(())
    }
}

/// The console lock: held for a whole line.
static CONSOLE: Mutex<Sink> = Mutex::new(Sink::Semihosting);

/// Switches the console to the PL011 at `base`.
///
/// # Safety
/// `base` must be the MMIO base of a PL011, mapped (or the MMU off) for as
/// long as the hypervisor runs.
pub unsafe fn use_pl011(base: PhysAddr) {
    *CONSOLE.lock() = Sink::Pl011(base.as_u64() as usize);
}

/// Writes one line, prefixed with `[cpuN] `, atomically with respect to
/// other CPUs.
pub fn line(args: fmt::Arguments<'_>) {
    write_line(&mut CONSOLE.lock(), args);
}

fn write_line(sink: &mut Sink, args: fmt::Arguments<'_>) {
    let _ = writeln!(sink, "[cpu{}] {}", cpu_index(), args);
}

/// Writes a line even if the console lock is held (by a CPU that faulted
/// while printing, say): waits a bounded time for the lock, then takes it.
pub fn emergency_line(args: fmt::Arguments<'_>) {
    for _ in 0..10_000_000 {
        if let Some(mut sink) = CONSOLE.try_lock() {
            write_line(&mut sink, args);
            return;
        }
        core::hint::spin_loop();
    }
    // SAFETY: the holder has not released the lock for millions of
    // iterations: it is stuck (e.g. faulted inside `line`). We are stopping
    // the machine, so breaking the lock cannot hurt more than losing the
    // report would.
    unsafe { CONSOLE.force_unlock() };
    line(args);
}

/// `println!` over the console: one whole line per call.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => { $crate::console::line(format_args!($($arg)*)) };
}

/// The `log` backend.
struct Logger;

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) && !crate::power::stopping() {
            line(format_args!("{:<5} {}", record.level(), record.args()));
        }
    }

    fn flush(&self) {}
}

static LOGGER: Logger = Logger;

/// Installs the `log` backend at `level`.
pub fn init_log(level: log::LevelFilter) {
    // A second call (there is none) would fail harmlessly.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}
