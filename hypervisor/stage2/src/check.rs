//! Checking mode (cargo feature `check`, on in the crate's tests): a shadow
//! state per frame and per table page that turns the three bug classes of
//! deferred TLB maintenance into panics at the moment they happen:
//!
//! - **reuse of a pending frame**: a leaf installed over a frame that an
//!   unmap left pending a TLB flush (a stale TLB entry could still reach
//!   it: Xen XSA-480/XSA-346);
//! - **a valid-to-valid change of output address** without
//!   break-before-make (checked on every descriptor write, [`transition`]);
//! - **a table page freed without flush and grace period**: its unlink
//!   must be followed by a complete VMID invalidation, then a grace period
//!   started after that flush must have elapsed.
//!
//! It also checks that a frame an unmap released to its owner was covered
//! by a flush after the unmap. The checker uses `std` (a mutex and ordered
//! maps): it is a host-testing aid, never built for the target.

extern crate std;

use std::collections::BTreeMap;
use std::sync::Mutex;

use hyp_core::addr::PhysAddr;

use crate::desc::{S2Attrs, OA_MASK};
use crate::rcu::{GpTicket, Rcu};

/// Panics if a descriptor write from `old` to `new` changes the output
/// address of a valid entry without passing through an invalid one.
pub(crate) fn transition(old: u64, new: u64) {
    let valid = |d: u64| d & S2Attrs::VALID.bits() != 0;
    if valid(old) && valid(new) && (old & OA_MASK) != (new & OA_MASK) {
        panic!(
            "check: valid->valid output address change without break-before-make: {old:#018x} -> {new:#018x}"
        );
    }
}

#[derive(Debug)]
struct PendingTable {
    /// Value of `flushes` when the table was unlinked.
    unlinked_at: u64,
    /// The grace period it waits for, once queued.
    ticket: Option<GpTicket>,
}

#[derive(Debug, Default)]
struct State {
    /// Complete VMID invalidations so far.
    flushes: u64,
    /// Frames unmapped and not yet released: pa -> (size, `flushes` at the
    /// unmap).
    frames: BTreeMap<u64, (u64, u64)>,
    /// Table pages unlinked and not yet freed.
    tables: BTreeMap<u64, PendingTable>,
}

/// The shadow state of one `Stage2`.
#[derive(Debug, Default)]
pub(crate) struct Checker {
    state: Mutex<State>,
}

impl Checker {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A complete invalidation of the VMID's TLB entries and walk caches
    /// finished.
    pub(crate) fn flushed(&self) {
        self.state().flushes += 1;
    }

    /// `[pa, pa + size)` was unmapped: pending until a flush.
    pub(crate) fn frame_unmapped(&self, pa: PhysAddr, size: u64) {
        let mut s = self.state();
        let at = s.flushes;
        s.frames.insert(pa.0, (size, at));
    }

    /// `[pa, pa + size)` goes back to its owner.
    pub(crate) fn frame_released(&self, pa: PhysAddr, size: u64) {
        let mut s = self.state();
        let flushes = s.flushes;
        match s.frames.remove(&pa.0) {
            Some((sz, at)) if sz == size && flushes > at => {}
            Some((_, at)) if flushes <= at => {
                panic!("check: frame {pa} released before the TLB flush that covers its unmap")
            }
            other => {
                panic!("check: release of frame {pa}+{size:#x} that is not pending ({other:?})")
            }
        }
    }

    /// A leaf is about to map `[pa, pa + size)`.
    pub(crate) fn leaf_installed(&self, pa: PhysAddr, size: u64) {
        let s = self.state();
        let end = pa.0 + size;
        // The pending frame starting last at or before `end`.
        if let Some((&start, &(len, _))) = s.frames.range(..end).next_back() {
            if start + len > pa.0 {
                panic!("check: reuse of frame {start:#x} while it is pending a TLB flush");
            }
        }
    }

    /// Table page `pa` was unlinked.
    pub(crate) fn table_unlinked(&self, pa: PhysAddr) {
        let mut s = self.state();
        let at = s.flushes;
        let old = s.tables.insert(
            pa.0,
            PendingTable {
                unlinked_at: at,
                ticket: None,
            },
        );
        assert!(old.is_none(), "check: table {pa} unlinked twice");
    }

    /// Table page `pa` now waits for grace period `ticket`.
    pub(crate) fn table_queued(&self, pa: PhysAddr, ticket: GpTicket) {
        let mut s = self.state();
        let flushes = s.flushes;
        let Some(t) = s.tables.get_mut(&pa.0) else {
            panic!("check: table {pa} queued for freeing but never unlinked");
        };
        if flushes <= t.unlinked_at {
            panic!("check: table {pa} queued for freeing before a TLB flush after its unlink");
        }
        t.ticket = Some(ticket);
    }

    /// Table page `pa` is being given back to the allocator.
    pub(crate) fn table_freed(&self, pa: PhysAddr, rcu: &Rcu) {
        let mut s = self.state();
        match s.tables.remove(&pa.0) {
            Some(PendingTable {
                ticket: Some(ticket),
                ..
            }) if rcu.elapsed(ticket) => {}
            Some(PendingTable { ticket: None, .. }) => {
                panic!("check: table {pa} freed without a grace period")
            }
            Some(_) => panic!("check: table {pa} freed before its grace period elapsed"),
            None => panic!("check: table {pa} freed but never unlinked"),
        }
    }

    /// Whether nothing is pending (all unmapped frames released, all
    /// unlinked tables freed).
    pub(crate) fn idle(&self) -> bool {
        let s = self.state();
        s.frames.is_empty() && s.tables.is_empty()
    }
}
