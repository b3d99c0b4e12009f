//! Time from the generic timer's virtual counter (`CNTVCT_EL0`).
//!
//! Only used for bounded waits and measurements; no timer interrupts.

use core::time::Duration;

use aarch64_cpu::asm::barrier;
use aarch64_cpu::registers::{Readable, CNTFRQ_EL0, CNTVCT_EL0};

/// Counter ticks per second.
pub fn frequency() -> u64 {
    CNTFRQ_EL0.get()
}

/// The virtual counter now. The `isb` keeps the read from being executed
/// ahead of the code before it.
pub fn ticks() -> u64 {
    barrier::isb(barrier::SY);
    CNTVCT_EL0.get()
}

/// Ticks in `d` (saturating); a zero frequency counts as 1 GHz so that
/// waits stay bounded on a broken timer.
pub fn ticks_in(d: Duration) -> u64 {
    let freq = match frequency() {
        0 => 1_000_000_000,
        f => f,
    };
    let ticks = d.as_nanos().saturating_mul(u128::from(freq)) / 1_000_000_000;
    u64::try_from(ticks).unwrap_or(u64::MAX)
}

/// A point in time to wait until.
#[derive(Copy, Clone, Debug)]
pub struct Deadline {
    at: u64,
}

impl Deadline {
    /// `d` from now.
    pub fn after(d: Duration) -> Self {
        Self {
            at: ticks().saturating_add(ticks_in(d)),
        }
    }

    /// Whether the deadline has passed.
    pub fn expired(&self) -> bool {
        ticks() >= self.at
    }
}
