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
//! by a flush after the unmap. The checker needs `alloc` (ordered maps)
//! and a spin lock, so it runs in the host tests and in the hypervisor's
//! checking build (`hypervisor` feature `tlb-check`), where a violation is
//! a hypervisor panic naming the frame.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use spin::Mutex;

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
    /// unmap), one entry per unmapped leaf (a frame may be mapped at
    /// several IPAs, so unmapped and released several times).
    frames: BTreeMap<u64, Vec<(u64, u64)>>,
    /// Table pages unlinked and not yet freed.
    tables: BTreeMap<u64, PendingTable>,
}

/// The shadow state of one `Stage2`.
#[derive(Debug, Default)]
pub(crate) struct Checker {
    state: Mutex<State>,
}

impl Checker {
    fn state(&self) -> spin::MutexGuard<'_, State> {
        self.state.lock()
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
        s.frames.entry(pa.0).or_default().push((size, at));
    }

    /// `[pa, pa + size)` goes back to its owner.
    pub(crate) fn frame_released(&self, pa: PhysAddr, size: u64) {
        let mut s = self.state();
        let flushes = s.flushes;
        let Some(pending) = s.frames.get_mut(&pa.0) else {
            panic!("check: release of frame {pa}+{size:#x} that is not pending");
        };
        let Some(i) = pending.iter().position(|&(sz, _)| sz == size) else {
            panic!("check: release of frame {pa}+{size:#x}, pending with another size");
        };
        let (_, at) = pending.swap_remove(i);
        if pending.is_empty() {
            s.frames.remove(&pa.0);
        }
        if flushes <= at {
            panic!("check: frame {pa} released before the TLB flush that covers its unmap");
        }
    }

    /// `[pa, pa + size)` is about to be mapped by a leaf.
    pub(crate) fn leaf_installed(&self, pa: PhysAddr, size: u64) {
        let s = self.state();
        let end = pa.0 + size;
        // Pending frames are at most 1 GiB: look back that far.
        let from = pa.0.saturating_sub(1 << 30);
        for (&start, pending) in s.frames.range(from..end) {
            if pending.iter().any(|&(len, _)| start + len > pa.0) {
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
