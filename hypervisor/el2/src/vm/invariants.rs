//! The invariant checker: stage 2 against the frame allocator's owner
//! tags, on a stopped world (see [`super::gate`]).
//!
//! It proves, for the moment it runs, what the bug classes of Xen
//! XSA-393/-480/-346 would break:
//!
//! - every stage-2 leaf is inside guest RAM and maps frames tagged
//!   [`Owner::Guest`] — never a free frame (a mapping left behind after a
//!   release), a table, a store frame, or the hypervisor's own memory;
//! - no frame is mapped twice, and no page is both a table and a leaf;
//! - every linked table page is tagged [`Owner::Table`] and their number
//!   matches stage 2's own count;
//! - the allocator balances: the owner tags, the per-owner counters and
//!   the buddy allocator's free count agree, the sum of free, guest,
//!   table, store and hypervisor frames is the total, and every guest
//!   frame is mapped exactly once (so no frame is still waiting for a TLB
//!   flush);
//! - after the final flush nothing is pending: no table page waits for a
//!   grace period and no entry is left locked.
//!
//! A violation is printed with the IPA and the frame it concerns.

use super::Vm;
use crate::memory::{self, Owner};
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;
use hyp_core::addr::{Ipa, PhysAddr, PAGE_SIZE};
use stage2::{DescView, VisitCtx, VisitKind, Visitor, WalkFlags};

/// Violation lines printed in full; the rest are only counted.
const MAX_REPORTED: u64 = 20;

/// Collects violations and prints the first [`MAX_REPORTED`].
struct Reporter<'a> {
    when: &'a str,
    violations: u64,
}

impl Reporter<'_> {
    fn violation(&mut self, what: fmt::Arguments<'_>) {
        self.violations += 1;
        if self.violations <= MAX_REPORTED {
            crate::println!("hyp: invariants ({}): VIOLATION: {what}", self.when);
        }
    }
}

/// The stage-2 walk: checks each entry against the owner tags.
struct LeafCheck<'a, 'r> {
    vm: &'a Vm,
    base: u64,
    /// One bit per managed frame: reached from stage 2 already.
    seen: Vec<u64>,
    report: &'a mut Reporter<'r>,
    leaf_frames: u64,
    tables: u64,
}

impl LeafCheck<'_, '_> {
    /// Marks `pa` as reached; false if it was already.
    fn mark(&mut self, pa: PhysAddr) -> bool {
        let Some(i) = pa
            .as_u64()
            .checked_sub(self.base)
            .map(|o| (o / PAGE_SIZE) as usize)
            .filter(|&i| i / 64 < self.seen.len())
        else {
            return true;
        };
        let (word, bit) = (i / 64, 1u64 << (i % 64));
        let fresh = self.seen[word] & bit == 0;
        self.seen[word] |= bit;
        fresh
    }

    fn table(&mut self, ipa: Ipa, level: u8, pa: PhysAddr) {
        self.tables += 1;
        let owner = memory::owner_of(pa);
        if owner != Owner::Table {
            self.report.violation(format_args!(
                "level-{level} entry for IPA {ipa} points to table page {pa} tagged {owner:?}"
            ));
        }
        if !self.mark(pa) {
            self.report.violation(format_args!(
                "table page {pa} (level-{level} entry for IPA {ipa}) is reachable twice"
            ));
        }
    }

    fn leaf(&mut self, ipa: Ipa, size: u64, pa: PhysAddr) {
        if !self.vm.in_ram(ipa) || !self.vm.in_ram(ipa.add(size - 1)) {
            self.report.violation(format_args!(
                "IPA {ipa} (+{size:#x}) -> frame {pa}: a leaf outside guest RAM"
            ));
        }
        let mut off = 0;
        while off < size {
            let (page, frame) = (ipa.add(off), pa.add(off));
            self.leaf_frames += 1;
            let owner = memory::owner_of(frame);
            if owner != Owner::Guest {
                self.report.violation(format_args!(
                    "IPA {page} -> frame {frame}: the frame is tagged {owner:?}, not Guest"
                ));
            }
            if !self.mark(frame) {
                self.report.violation(format_args!(
                    "IPA {page} -> frame {frame}: the frame is mapped twice (or is also a table)"
                ));
            }
            off += PAGE_SIZE;
        }
    }
}

impl Visitor for LeafCheck<'_, '_> {
    type Error = core::convert::Infallible;

    fn visit(&mut self, ctx: &VisitCtx<'_>) -> Result<(), Self::Error> {
        match (ctx.kind, ctx.view()) {
            (VisitKind::TablePre, DescView::Table { pa }) => self.table(ctx.ipa, ctx.level, pa),
            (VisitKind::Leaf, DescView::Page { pa, .. }) => self.leaf(ctx.ipa, PAGE_SIZE, pa),
            (VisitKind::Leaf, DescView::Block { pa, .. }) => self.leaf(ctx.ipa, ctx.size(), pa),
            (VisitKind::Leaf, DescView::Locked) => self.report.violation(format_args!(
                "level-{} entry for IPA {} is still locked with every CPU stopped",
                ctx.level, ctx.ipa
            )),
            _ => {}
        }
        Ok(())
    }
}

/// Runs every check (the caller has stopped the world). `when` names the
/// occasion in the report (`final`, `exit`). Returns the number of
/// violations.
pub(super) fn check(vm: &Vm, when: &str) -> u64 {
    let mut report = Reporter {
        when,
        violations: 0,
    };
    // The final flush: tables unlinked earlier are freed after their
    // grace period (every other CPU is offline or in the guest).
    vm.stage2.reclaim_tables(true);
    let pending = vm.stage2.deferred_tables();
    if pending != 0 {
        report.violation(format_args!(
            "{pending} unlinked table pages still wait for a grace period after the final flush"
        ));
    }
    #[cfg(feature = "tlb-check")]
    if !vm.stage2.check_idle() {
        report.violation(format_args!(
            "the TLB checker still sees frames or tables pending a flush"
        ));
    }

    let snap = memory::frame_snapshot();
    let mut walk = LeafCheck {
        vm,
        base: snap.base.as_u64(),
        seen: vec![0u64; snap.tagged_frames.div_ceil(64) as usize],
        report: &mut report,
        leaf_frames: 0,
        tables: 1,
    };
    let root = vm.stage2.root();
    if memory::owner_of(root) != Owner::Table {
        walk.report.violation(format_args!(
            "the stage-2 root {root} is tagged {:?}",
            memory::owner_of(root)
        ));
    }
    walk.mark(root);
    let _ = vm.stage2.walk(
        Ipa(0),
        vm.stage2.ipa_limit(),
        WalkFlags::TABLE_PRE | WalkFlags::LEAF,
        &mut walk,
    );
    let (leaf_frames, tables) = (walk.leaf_frames, walk.tables);

    let tag = |o: Owner| snap.tagged[o as usize];
    let managed: u64 = [
        Owner::Free,
        Owner::Guest,
        Owner::Table,
        Owner::Store,
        Owner::Hyp,
    ]
    .iter()
    .map(|&o| tag(o))
    .sum();
    if managed != snap.total {
        report.violation(format_args!(
            "allocator does not balance: free {} + guest {} + tables {} + store {} + hypervisor {} = {managed}, total {}",
            tag(Owner::Free), tag(Owner::Guest), tag(Owner::Table), tag(Owner::Store), tag(Owner::Hyp), snap.total
        ));
    }
    if tag(Owner::Free) != snap.allocator_free {
        report.violation(format_args!(
            "{} frames tagged free but the buddy allocator has {} free",
            tag(Owner::Free),
            snap.allocator_free
        ));
    }
    for o in [
        Owner::Free,
        Owner::Guest,
        Owner::Table,
        Owner::Store,
        Owner::Hyp,
    ] {
        if snap.counted[o as usize] != tag(o) {
            report.violation(format_args!(
                "counter for {o:?} says {} but {} frames are tagged so",
                snap.counted[o as usize],
                tag(o)
            ));
        }
    }
    if snap.mismatches > 0 {
        if let Some(m) = snap.first_mismatch {
            report.violation(format_args!(
                "{} frees or allocations found the wrong owner; first: frame {} expected {:?}, tagged {:?}",
                snap.mismatches, m.frame, m.expected, m.found
            ));
        }
    }
    if leaf_frames != tag(Owner::Guest) {
        report.violation(format_args!(
            "{} frames are tagged Guest but stage 2 maps {leaf_frames}: {}",
            tag(Owner::Guest),
            if leaf_frames < tag(Owner::Guest) {
                "guest frames leaked or still pending a flush"
            } else {
                "stage 2 maps frames it does not own"
            }
        ));
    }
    if tables != tag(Owner::Table) || tables != vm.stage2.table_pages() {
        report.violation(format_args!(
            "stage 2 reaches {tables} table pages, {} are tagged Table, stage 2 counts {}",
            tag(Owner::Table),
            vm.stage2.table_pages()
        ));
    }
    let store_frames = vm
        .store
        .as_ref()
        .map_or(0, |s| s.lock().stats().frames_used);
    if store_frames != tag(Owner::Store) {
        report.violation(format_args!(
            "the store holds {store_frames} frames, {} are tagged Store",
            tag(Owner::Store)
        ));
    }
    let violations = report.violations;
    if violations == 0 {
        crate::println!(
            "hyp: invariants ({when}): ok: leaves={leaf_frames} tables={tables} guest={} store={} free={} hyp={} total={} violations=0",
            tag(Owner::Guest),
            tag(Owner::Store),
            tag(Owner::Free),
            tag(Owner::Hyp),
            snap.total
        );
    } else {
        crate::println!(
            "hyp: invariants ({when}): {violations} violations (leaves={leaf_frames} tables={tables} guest={} free={} total={})",
            tag(Owner::Guest),
            tag(Owner::Free),
            snap.total
        );
    }
    violations
}
