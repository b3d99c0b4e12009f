//! The hostile-guest suite (`mode=hostile`): placeholder, filled in by the
//! hostile-suite work.

use crate::kernel::System;

/// Runs the hostile suite, then the fuzzer's quick mode, and exits.
pub fn run(system: &System) -> ! {
    crate::fuzz::run(system)
}
