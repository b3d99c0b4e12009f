//! The lockless writers: the stage-2 fault path ([`Stage2::fault_install`])
//! and page migration ([`Stage2::migrate_page`]).
//!
//! Both run as RCU readers (the calling CPU online, outside any other
//! walk) and never take the writer lock:
//!
//! - a fault walks to the faulting page, installing missing tables with a
//!   compare-exchange on the empty slot (the loser frees its never-published
//!   table at once) and then the page itself the same way. An entry locked
//!   by a writer (break-before-make, or a table being removed: sealed)
//!   makes it give up with [`FaultOutcome::Retry`]: the guest re-executes
//!   the access and faults again once the writer is done.
//! - a migration replaces a live page with break-before-make: lock the
//!   entry, invalidate its TLB entries, copy, publish the new page with its
//!   access flag carried over; the old frame stays pending in a
//!   [`TlbBatch`] until that batch's flush.

use hyp_core::addr::{Ipa, PhysAddr, PAGE_SIZE};

use crate::batch::TlbBatch;
use crate::desc::{DescView, MemType, Perms, S2Attrs, LEAF_LEVEL};
use crate::error::MapError;
use crate::mm::{TableAlloc, TlbInvalidate};
use crate::table::Stage2;
use crate::walk::{VisitCtx, Visitor, WalkFlags};

/// What [`Stage2::fault_install`] did.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum FaultOutcome {
    /// The page now maps the given frame.
    Installed,
    /// Something already maps the page (another vCPU's fault won the race,
    /// or a block covers it); the frame was not used.
    AlreadyMapped,
    /// A writer holds an entry on the path; the frame was not used. Let the
    /// guest retry the access.
    Retry,
}

/// What [`Stage2::migrate_page`] did.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum MigrateOutcome {
    /// The page now maps the new frame; the old one is pending in the
    /// batch.
    Moved {
        /// The frame the page mapped before.
        old: PhysAddr,
    },
    /// No 4 KiB page maps the IPA (unmapped, a block, or locked); the new
    /// frame was not used.
    NotMoved,
}

struct FaultVisitor<'s, 'r, M: TableAlloc, T: TlbInvalidate> {
    s2: &'s Stage2<'r, M, T>,
    leaf: u64,
    outcome: FaultOutcome,
}

impl<M: TableAlloc, T: TlbInvalidate> Visitor for FaultVisitor<'_, '_, M, T> {
    type Error = MapError;

    fn visit(&mut self, ctx: &VisitCtx<'_>) -> Result<(), MapError> {
        let (entry, ipa, level) = (ctx.entry, ctx.ipa, ctx.level);
        self.outcome = match ctx.view() {
            DescView::Invalid if level < LEAF_LEVEL => {
                // Lost race: the engine re-reads the entry and descends
                // into the winner's table (or stops at a lock: Retry).
                match self.s2.install_table(entry, ctx.old, ipa, level) {
                    Ok(()) | Err(MapError::Busy { .. }) => FaultOutcome::Retry,
                    Err(e) => return Err(e),
                }
            }
            DescView::Invalid => match self.s2.install(entry, ctx.old, self.leaf, ipa, level) {
                Ok(()) => {
                    self.s2.account_leaf(level, true);
                    FaultOutcome::Installed
                }
                Err(_) => match entry.view(level) {
                    DescView::Page { .. } => FaultOutcome::AlreadyMapped,
                    _ => FaultOutcome::Retry,
                },
            },
            DescView::Locked => FaultOutcome::Retry,
            DescView::Block { .. } | DescView::Page { .. } => FaultOutcome::AlreadyMapped,
            DescView::Table { .. } => FaultOutcome::Retry,
        };
        Ok(())
    }
}

impl<'r, M: TableAlloc, T: TlbInvalidate> Stage2<'r, M, T> {
    /// The stage-2 fault path: maps the 4 KiB page at `ipa` to the frame
    /// `pa` if nothing maps it yet, creating tables as needed. Lockless
    /// (see the [module documentation](crate::fault)); the caller keeps
    /// ownership of `pa` unless the outcome is [`FaultOutcome::Installed`].
    pub fn fault_install(
        &self,
        ipa: Ipa,
        pa: PhysAddr,
        perms: Perms,
        memtype: MemType,
        af: bool,
    ) -> Result<FaultOutcome, MapError> {
        let ipa = ipa.align_down(PAGE_SIZE);
        if ipa.0 >= self.ipa_limit() {
            return Err(MapError::OutOfRange {
                ipa,
                size: PAGE_SIZE,
            });
        }
        if !pa.is_page_aligned() {
            return Err(MapError::UnalignedPhys(pa));
        }
        if memtype == MemType::Device && perms.contains(Perms::EXEC) {
            return Err(MapError::ExecutableDevice(ipa));
        }
        let attrs = S2Attrs::leaf(perms, memtype, af);
        let mut visitor = FaultVisitor {
            s2: self,
            leaf: DescView::leaf(pa, attrs, LEAF_LEVEL).encode(),
            outcome: FaultOutcome::Retry,
        };
        self.walk(ipa, PAGE_SIZE, WalkFlags::LEAF, &mut visitor)?;
        Ok(visitor.outcome)
    }

    /// Moves the 4 KiB page at `ipa` to the frame `new`: break-before-make
    /// (lock the entry, invalidate), `copy(old, new)`, then publish the new
    /// page with the same attributes and access flag. The old frame is
    /// released by `batch` after its next flush. Lockless; a page being
    /// changed by someone else is [`MigrateOutcome::NotMoved`].
    pub fn migrate_page(
        &self,
        ipa: Ipa,
        new: PhysAddr,
        batch: &mut TlbBatch<'_, 'r, M, T>,
        copy: impl FnOnce(PhysAddr, PhysAddr),
    ) -> Result<MigrateOutcome, MapError> {
        if !new.is_page_aligned() {
            return Err(MapError::UnalignedPhys(new));
        }
        let ipa = ipa.align_down(PAGE_SIZE);
        let mut copy = Some(copy);
        let outcome = self.leaf_at(ipa, |ctx| {
            let DescView::Page { pa: old, .. } = ctx.view() else {
                return MigrateOutcome::NotMoved;
            };
            let Ok(locked) = self.lock_entry(ctx.entry, ctx.old, ctx.ipa, ctx.level) else {
                return MigrateOutcome::NotMoved;
            };
            self.invalidate(ctx.ipa, ctx.level, locked);
            if let Some(copy) = copy.take() {
                copy(old, new);
            }
            let attrs = S2Attrs::from_bits_truncate(locked) & S2Attrs::LEAF_MASK;
            #[cfg(feature = "check")]
            self.checker().leaf_installed(new, PAGE_SIZE);
            ctx.entry
                .store(DescView::leaf(new, attrs, LEAF_LEVEL).encode());
            MigrateOutcome::Moved { old }
        });
        let outcome = outcome.unwrap_or(MigrateOutcome::NotMoved);
        if let MigrateOutcome::Moved { old } = outcome {
            batch.leaf_unmapped(ipa, LEAF_LEVEL, old);
        }
        Ok(outcome)
    }
}
