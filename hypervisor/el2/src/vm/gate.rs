//! Stop-the-world for the invariant checker: a CPU that wants a stable
//! view of stage 2 and the frame allocator closes the gate and waits until
//! no other CPU is inside hypervisor code for the VM.
//!
//! A vCPU passes the gate on every exit ([`Gate::enter`]) and leaves it
//! before it enters the guest again ([`Gate::leave`]); the aging worker
//! does the same around each pass. A CPU running guest code cannot change
//! stage 2 or the allocator (that takes an exit), so once every other CPU
//! is outside the gate the checker sees a quiescent machine. CPUs waiting
//! at a closed gate are RCU-offline, so the checker may wait for grace
//! periods. The fast path is one store and one load per exit.

use super::RCU;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, Ordering};

/// How long [`Gate::close`] waits for the other CPUs before it gives up
/// (a CPU stuck inside the hypervisor is itself worth a report).
const QUIESCE_TIMEOUT_MS: u64 = 2_000;

/// See the module documentation.
#[derive(Debug)]
pub(super) struct Gate {
    closed: AtomicBool,
    inside: Vec<AtomicBool>,
}

/// Why the gate could not be closed.
#[derive(Copy, Clone, Debug)]
pub(super) struct StillInside {
    /// A CPU that did not leave in time.
    pub(super) cpu: usize,
}

impl Gate {
    /// A gate for CPUs `0..cpus`.
    pub(super) fn new(cpus: usize) -> Self {
        Self {
            closed: AtomicBool::new(false),
            inside: (0..cpus).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    /// CPU `cpu` enters hypervisor code for the VM (it is RCU-online);
    /// waits while the gate is closed.
    pub(super) fn enter(&self, cpu: usize) {
        let Some(me) = self.inside.get(cpu) else {
            return;
        };
        loop {
            // SeqCst pairs with `close`: either the closer sees us inside,
            // or we see the gate closed.
            me.store(true, Ordering::SeqCst);
            if !self.closed.load(Ordering::SeqCst) {
                return;
            }
            me.store(false, Ordering::SeqCst);
            RCU.offline();
            while self.closed.load(Ordering::SeqCst) {
                core::hint::spin_loop();
            }
            RCU.online();
        }
    }

    /// CPU `cpu` leaves hypervisor code (about to run the guest or idle).
    pub(super) fn leave(&self, cpu: usize) {
        if let Some(me) = self.inside.get(cpu) {
            me.store(false, Ordering::SeqCst);
        }
    }

    /// Closes the gate for CPU `me` (which is inside) and waits until no
    /// other CPU is inside. Another closer goes first: this CPU then waits
    /// at the gate like any other. On a timeout the gate is reopened.
    pub(super) fn close(&self, me: usize) -> Result<(), StillInside> {
        while self
            .closed
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            self.leave(me);
            self.enter(me);
        }
        let deadline = crate::time::deadline_ms(QUIESCE_TIMEOUT_MS);
        for (cpu, inside) in self.inside.iter().enumerate() {
            if cpu == me {
                continue;
            }
            while inside.load(Ordering::SeqCst) {
                // Holds no stage-2 reference here: a CPU inside may be
                // waiting for a grace period that needs this one.
                RCU.quiescent();
                if crate::time::passed(deadline) {
                    self.open();
                    return Err(StillInside { cpu });
                }
                core::hint::spin_loop();
            }
        }
        Ok(())
    }

    /// Reopens the gate.
    pub(super) fn open(&self) {
        self.closed.store(false, Ordering::SeqCst);
    }
}
