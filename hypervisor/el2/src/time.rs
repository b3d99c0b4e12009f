//! Time from the generic timer's physical counter.

use aarch64_cpu::registers::{Readable, CNTFRQ_EL0, CNTPCT_EL0};

/// Counter value `ms` milliseconds from now.
pub fn deadline_ms(ms: u64) -> u64 {
    let freq = CNTFRQ_EL0.get().max(1);
    CNTPCT_EL0
        .get()
        .saturating_add(ms.saturating_mul(freq) / 1000)
}

/// Whether the counter has passed `deadline`.
pub fn passed(deadline: u64) -> bool {
    CNTPCT_EL0.get() >= deadline
}
