//! The lockless scan for empty table pages
//! ([`Stage2::reclaim_empty_tables`]).
//!
//! A leaf-only unmap ([`Stage2::unmap_leaves_batched`]) leaves emptied
//! table pages linked, so that releases hold the writer lock only for
//! their leaf breaks. The scan removes those pages later, in two phases:
//!
//! 1. **Nominate, lockless.** A read-side walk of the range with
//!    `TABLE_POST` (children before parents) loads the 512 entries of each
//!    table it passes and records the ones that are all invalid (the IPA
//!    of the entry that links them) in a fixed array. No lock, no
//!    allocation; a fault may install into a nominated table right after
//!    it was checked, which the second phase copes with.
//! 2. **Remove, locked.** For each candidate, under the writer lock, a walk
//!    of the one path from the root to the candidate's first page runs the
//!    table-removal protocol (see [`crate::table`]; the unmap visitor with
//!    `TABLE_POST` alone) on every table on it, deepest first:
//!    the seal re-checks emptiness with compare-exchanges (a table a fault
//!    installed into meanwhile is kept, and a fault that walked into it
//!    before the parent was locked fails on the seal and retries), and a
//!    parent left empty by the removal of its last child is removed by the
//!    same walk. The root has no parent entry and is never removed.
//!
//! The scan of a long range goes in segments: one stops after
//! [`SCAN_TABLES`] tables or [`SCAN_CANDIDATES`] candidates, its candidates
//! are handled, the calling CPU passes a quiescent state, and the next
//! segment starts after the last entry the previous one finished (the
//! ancestors of that entry are walked again, so they are still checked
//! after their children). Unlinked pages wait in the caller's batch for
//! its flush and then for a grace period, as with unmap.

use hyp_core::addr::{Ipa, PAGE_SIZE};

use crate::batch::TlbBatch;
use crate::desc::DescView;
use crate::error::MapError;
use crate::mm::{TableAlloc, TlbInvalidate};
use crate::table::Stage2;
use crate::walk::{VisitCtx, Visitor, WalkFlags};

/// Candidates one scan segment collects before they are handled.
pub const SCAN_CANDIDATES: usize = 32;
/// Tables one scan segment examines (at most 512 loads each) before the
/// calling CPU passes a quiescent state.
pub const SCAN_TABLES: usize = 64;

/// The read-side half of the scan: nominates empty tables.
struct EmptyScan<'s, 'r, M: TableAlloc, T: TlbInvalidate> {
    s2: &'s Stage2<'r, M, T>,
    /// Where the entries linking the empty tables found start.
    found: [Ipa; SCAN_CANDIDATES],
    n_found: usize,
    /// Tables examined in this segment.
    examined: usize,
}

/// Ends a scan segment early; the next one starts at `next`.
struct SegmentEnd {
    next: u64,
}

impl<M: TableAlloc, T: TlbInvalidate> Visitor for EmptyScan<'_, '_, M, T> {
    type Error = SegmentEnd;

    fn visit(&mut self, ctx: &VisitCtx<'_>) -> Result<(), SegmentEnd> {
        let DescView::Table { pa } = ctx.view() else {
            return Ok(());
        };
        self.examined += 1;
        // Lockless: `pa` may be unlinked by a writer meanwhile, but it
        // stays valid memory for this read-side section (grace period).
        if self.s2.table_is_empty(pa) {
            self.found[self.n_found] = ctx.ipa;
            self.n_found += 1;
        }
        if self.n_found == SCAN_CANDIDATES || self.examined == SCAN_TABLES {
            // Everything below the end of this entry is done but its
            // ancestors, which the next segment walks again.
            return Err(SegmentEnd {
                next: ctx.ipa.0 + ctx.size(),
            });
        }
        Ok(())
    }
}

impl<'r, M: TableAlloc, T: TlbInvalidate> Stage2<'r, M, T> {
    /// Finds the table pages in `[ipa, ipa + size)` whose 512 entries are
    /// all invalid, without the writer lock, and removes them with the
    /// table-removal protocol under the writer lock, one at a time; a
    /// parent emptied by the removal of its last child goes too, the root
    /// never (see the [module documentation](crate::scan)). A table with
    /// any valid or locked entry is kept, also one that a concurrent fault
    /// installs into while the scan runs. Returns the number of table
    /// pages unlinked: they are pending in `batch`, freed after its flush
    /// and a grace period ([`Stage2::reclaim_tables`]).
    ///
    /// The whole of every table the range touches is checked, as
    /// [`Stage2::unmap_batched`] does for the tables it walks. Passes
    /// quiescent states for the calling CPU between segments: never call
    /// it from inside a walk or while holding references into the tables.
    pub fn reclaim_empty_tables(
        &self,
        ipa: Ipa,
        size: u64,
        batch: &mut TlbBatch<'_, 'r, M, T>,
    ) -> Result<u64, MapError> {
        self.check_range(ipa, size)?;
        let end = ipa.0 + size;
        let mut at = ipa.0;
        let mut removed = 0;
        while at < end {
            let mut scan = EmptyScan {
                s2: self,
                found: [Ipa(0); SCAN_CANDIDATES],
                n_found: 0,
                examined: 0,
            };
            let next = match self.walk(Ipa(at), end - at, WalkFlags::TABLE_POST, &mut scan) {
                Ok(()) => end,
                Err(SegmentEnd { next }) => next,
            };
            // The segment's references are dropped (its walk is over).
            self.rcu().quiescent();
            for &linked_at in &scan.found[..scan.n_found] {
                // The path to the candidate's first page: whatever table
                // its parent entry links now (the candidate, unless a
                // writer replaced it), then its ancestors.
                let stats = self.unmap_walk(linked_at, PAGE_SIZE, WalkFlags::TABLE_POST, batch)?;
                removed += stats.tables_freed;
            }
            at = next;
        }
        Ok(removed)
    }
}
