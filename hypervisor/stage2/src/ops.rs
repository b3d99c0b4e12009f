//! The visitors behind the [`Stage2`] operations: map, unmap, protect,
//! dump and teardown. Writers run under the writer lock (see
//! [`crate::table`] for the concurrency rules); they only use the
//! primitives of [`Stage2`] to change entries.

use core::fmt;

use hyp_core::addr::{PhysAddr, PAGE_SIZE};

use crate::batch::TlbBatch;
use crate::desc::{DescView, MemType, Perms, S2Attrs, LEAF_LEVEL};
use crate::error::MapError;
use crate::mm::{TableAlloc, TlbInvalidate};
use crate::table::{update_af, Stage2, UnmapStats};
use crate::walk::{VisitCtx, VisitKind, Visitor};

/// Whether the entry in `ctx` lies wholly inside `[start, end)`.
fn covers_whole(ctx: &VisitCtx<'_>, start: u64, end: u64) -> bool {
    ctx.ipa.0 >= start && ctx.ipa.0 + ctx.size() <= end
}

/// Whether two leaf attribute sets differ at most in the access flag.
fn same_but_af(a: S2Attrs, b: S2Attrs) -> bool {
    a.symmetric_difference(b).difference(S2Attrs::AF).is_empty()
}

/// Maps `[start, end)` to `pa..` with `attrs` (see [`Stage2::map`]).
pub(crate) struct MapVisitor<'s, 'r, M: TableAlloc, T: TlbInvalidate> {
    pub(crate) s2: &'s Stage2<'r, M, T>,
    pub(crate) start: u64,
    pub(crate) end: u64,
    /// Output address of `start`.
    pub(crate) pa: u64,
    /// Leaf attributes to install.
    pub(crate) attrs: S2Attrs,
    pub(crate) allow_blocks: bool,
}

impl<M: TableAlloc, T: TlbInvalidate> Visitor for MapVisitor<'_, '_, M, T> {
    type Error = MapError;

    fn visit(&mut self, ctx: &VisitCtx<'_>) -> Result<(), MapError> {
        let (base, level) = (ctx.ipa.0, ctx.level);
        let lo = self.start.max(base);
        let out = self.pa + (lo - self.start);
        let leaf_here = level == LEAF_LEVEL
            || (self.allow_blocks
                && (1..LEAF_LEVEL).contains(&level)
                && covers_whole(ctx, self.start, self.end)
                && out.is_multiple_of(ctx.size()));
        // Only used when `leaf_here`, and then `lo == base`.
        let want = DescView::leaf(PhysAddr(out), self.attrs, level).encode();
        match ctx.view() {
            DescView::Invalid if leaf_here => {
                self.s2.install(ctx.entry, ctx.old, want, ctx.ipa, level)?;
                self.s2.account_leaf(level, true);
                Ok(())
            }
            DescView::Invalid => self.s2.install_table(ctx.entry, ctx.old, ctx.ipa, level),
            DescView::Locked => Err(MapError::Busy {
                ipa: ctx.ipa,
                level,
            }),
            DescView::Table { .. } => Ok(()),
            DescView::Block { pa, attrs, .. } | DescView::Page { pa, attrs } => {
                if pa.0 + (lo - base) == out && same_but_af(attrs, self.attrs) {
                    if self.attrs.af() {
                        update_af(ctx.entry, ctx.old, level, true);
                    }
                    Ok(())
                } else if leaf_here {
                    self.s2
                        .replace(ctx.entry, ctx.old, ctx.ipa, level, |_| want)
                } else {
                    self.s2.split_block(ctx.entry, ctx.old, ctx.ipa, level)
                }
            }
        }
    }
}

/// Unmaps `[start, end)` into a batch and removes emptied tables (see
/// [`Stage2::unmap_batched`]). What it does is chosen by the walk's flags
/// ([`Stage2::unmap_walk`]): `LEAF` visits break the leaves (splitting
/// blocks that straddle an edge), `TABLE_POST` visits run the
/// table-removal protocol on each table after its children. The leaf-only
/// unmap ([`Stage2::unmap_leaves_batched`]) walks with `LEAF` alone; the
/// locked phase of the empty-table scan ([`Stage2::reclaim_empty_tables`])
/// with `TABLE_POST` alone.
pub(crate) struct UnmapVisitor<'s, 'b, 'a, 'r, M: TableAlloc, T: TlbInvalidate> {
    pub(crate) s2: &'s Stage2<'r, M, T>,
    pub(crate) start: u64,
    pub(crate) end: u64,
    pub(crate) stats: UnmapStats,
    pub(crate) batch: &'b mut TlbBatch<'a, 'r, M, T>,
}

impl<M: TableAlloc, T: TlbInvalidate> Visitor for UnmapVisitor<'_, '_, '_, '_, M, T> {
    type Error = MapError;

    fn visit(&mut self, ctx: &VisitCtx<'_>) -> Result<(), MapError> {
        match (ctx.kind, ctx.view()) {
            (VisitKind::TablePost, DescView::Table { pa }) => {
                let (entry, old, ipa, level) = (ctx.entry, ctx.old, ctx.ipa, ctx.level);
                if self
                    .s2
                    .remove_table(entry, old, ipa, level, pa, self.batch)?
                {
                    self.stats.tables_freed += 1;
                }
                Ok(())
            }
            // Unmapped by this very batch earlier (waiting for its flush):
            // nothing left to do here.
            (VisitKind::Leaf, DescView::Locked) if self.batch.holds_lock(ctx.entry) => Ok(()),
            (VisitKind::Leaf, DescView::Locked) => Err(MapError::Busy {
                ipa: ctx.ipa,
                level: ctx.level,
            }),
            (VisitKind::Leaf, DescView::Block { .. } | DescView::Page { .. }) => {
                if covers_whole(ctx, self.start, self.end) {
                    let (ipa, level) = (ctx.ipa, ctx.level);
                    // Locked, not invalid, until the batch's flush: no fault
                    // may install a new frame while TLBs still hold the old.
                    let gone = self.s2.lock_entry(ctx.entry, ctx.old, ipa, level)?;
                    // `gone` is the leaf we were given, its AF maybe changed.
                    if let Some((pa, _)) = DescView::decode(gone, level).leaf_parts() {
                        self.batch.leaf_locked(ctx.entry, ipa, level, pa);
                    }
                    self.s2.account_leaf(level, false);
                    self.stats.pages_unmapped += ctx.size() / PAGE_SIZE;
                    Ok(())
                } else {
                    self.s2.split_block(ctx.entry, ctx.old, ctx.ipa, ctx.level)
                }
            }
            _ => Ok(()),
        }
    }
}

/// Sets permissions over `[start, end)` (see [`Stage2::protect`]).
pub(crate) struct ProtectVisitor<'s, 'r, M: TableAlloc, T: TlbInvalidate> {
    pub(crate) s2: &'s Stage2<'r, M, T>,
    pub(crate) start: u64,
    pub(crate) end: u64,
    pub(crate) perms: Perms,
}

impl<M: TableAlloc, T: TlbInvalidate> Visitor for ProtectVisitor<'_, '_, M, T> {
    type Error = MapError;

    fn visit(&mut self, ctx: &VisitCtx<'_>) -> Result<(), MapError> {
        let busy = MapError::Busy {
            ipa: ctx.ipa,
            level: ctx.level,
        };
        let attrs = match ctx.view() {
            DescView::Locked => return Err(busy),
            DescView::Block { attrs, .. } | DescView::Page { attrs, .. } => attrs,
            _ => return Ok(()),
        };
        if attrs.with_perms(self.perms) == attrs {
            return Ok(());
        }
        if !covers_whole(ctx, self.start, self.end) {
            return self.s2.split_block(ctx.entry, ctx.old, ctx.ipa, ctx.level);
        }
        // Permissions only: a compare-exchange of the live entry (no
        // break-before-make needed), retried if the access flag moves.
        let mut old = ctx.old;
        loop {
            let Some((pa, attrs)) = DescView::decode(old, ctx.level).leaf_parts() else {
                return Err(busy);
            };
            let new = DescView::leaf(pa, attrs.with_perms(self.perms), ctx.level).encode();
            match ctx.entry.compare_exchange(old, new) {
                Ok(_) => break,
                Err(now) => old = now,
            }
        }
        self.s2.invalidate(ctx.ipa, ctx.level, old);
        Ok(())
    }
}

/// Frees every table below the root ([`Stage2`]'s `Drop`).
pub(crate) struct TeardownVisitor<'s, 'r, M: TableAlloc, T: TlbInvalidate> {
    pub(crate) s2: &'s Stage2<'r, M, T>,
}

impl<M: TableAlloc, T: TlbInvalidate> Visitor for TeardownVisitor<'_, '_, M, T> {
    type Error = core::convert::Infallible;

    fn visit(&mut self, ctx: &VisitCtx<'_>) -> Result<(), Self::Error> {
        if let (VisitKind::TablePost, DescView::Table { pa }) = (ctx.kind, ctx.view()) {
            ctx.entry.store(DescView::Invalid.encode());
            // SAFETY: the table is being dropped (no other walker, the guest
            // no longer runs on it, VMID invalidated first); the entry that
            // pointed to `pa` was just cleared and its children are freed.
            unsafe { self.s2.free_unreachable_table(pa) };
        }
        Ok(())
    }
}

/// Writes one line per table entry, leaf and locked entry.
pub(crate) struct DumpVisitor<'w, W: fmt::Write + ?Sized> {
    pub(crate) out: &'w mut W,
}

impl<W: fmt::Write + ?Sized> Visitor for DumpVisitor<'_, W> {
    type Error = fmt::Error;

    fn visit(&mut self, ctx: &VisitCtx<'_>) -> fmt::Result {
        let (level, ipa) = (ctx.level, ctx.ipa.0);
        let (kind, pa, attrs) = match ctx.view() {
            DescView::Invalid => return Ok(()),
            DescView::Locked => return writeln!(self.out, "L{level} {ipa:#014x} locked"),
            DescView::Table { pa } => ("table", pa, None),
            DescView::Block { pa, attrs, .. } => ("block", pa, Some(attrs)),
            DescView::Page { pa, attrs } => ("page", pa, Some(attrs)),
        };
        write!(
            self.out,
            "L{level} {ipa:#014x} {kind:<5} -> {pa:#014x}",
            pa = pa.0
        )?;
        if let Some(attrs) = attrs {
            let p = attrs.perms();
            let flag = |f, c| if p.contains(f) { c } else { '-' };
            let mem = match attrs.mem_type() {
                MemType::Normal => "normal",
                MemType::Device => "device",
            };
            write!(
                self.out,
                " {}{}{} {mem} {}",
                flag(Perms::READ, 'r'),
                flag(Perms::WRITE, 'w'),
                flag(Perms::EXEC, 'x'),
                if attrs.af() { "af" } else { "--" },
            )?;
        }
        writeln!(self.out)
    }
}
