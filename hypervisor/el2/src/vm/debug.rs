//! State kept for the debugger (GDB helpers in `scripts/hyp_gdb.py`):
//! placeholder, filled in by the GDB-helpers work.

use super::Vm;
use crate::exceptions::{ExitKind, GuestContext};

/// Records vCPU `index`'s exit (called on every exit, before it is handled).
#[inline]
pub(super) fn record_exit(_index: usize, _ctx: &GuestContext, _kind: ExitKind) {}

/// Called when the VM stops (EXIT, SYSTEM_OFF, a fatal VM error), before
/// the statistics are printed.
pub(super) fn at_stop(_vm: &Vm) {}
