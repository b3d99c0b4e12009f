//! The one walk engine: every stage-2 operation (map, unmap, protect,
//! translate, access flag, dump, teardown) is a [`Visitor`] of [`walk`].
//!
//! Modelled on Linux `kvm_pgtable_walk`: the engine visits, in address
//! order, every entry that covers part of the range, at each level; what it
//! reports is chosen by [`WalkFlags`]:
//!
//! - `TABLE_PRE`: a table entry before its children;
//! - `LEAF`: an entry that is not a table (invalid, locked, block, page), so
//!   that a visitor can fill an empty slot or replace a leaf;
//! - `TABLE_POST`: a table entry after its children.
//!
//! After a `TABLE_PRE` or `LEAF` callback the entry is re-read, and if it is
//! (now) a table the walk descends into it: this is how `map` installs a
//! table in an empty slot and how splitting a block works. The first `Err`
//! a visitor returns stops the walk and is returned.
//!
//! The engine itself takes no lock and only loads descriptors (`Acquire`);
//! whoever calls it provides the exclusion the visitor needs.

use bitflags::bitflags;
use hyp_core::addr::{Ipa, PhysAddr};

use crate::desc::{
    level_shift, level_size, DescView, Descriptor, LEAF_LEVEL, PA_LIMIT, START_LEVEL,
};
use crate::mm::{table_entries, TableAlloc};

bitflags! {
    /// Which entries a walk reports to its visitor.
    #[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
    pub struct WalkFlags: u8 {
        /// Entries that are not tables (invalid, locked, blocks, pages).
        const LEAF = 1 << 0;
        /// Table entries, before their children are walked.
        const TABLE_PRE = 1 << 1;
        /// Table entries, after their children were walked.
        const TABLE_POST = 1 << 2;
    }
}

/// Why the visitor is called (the flag that selected the entry).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum VisitKind {
    /// See [`WalkFlags::LEAF`].
    Leaf,
    /// See [`WalkFlags::TABLE_PRE`].
    TablePre,
    /// See [`WalkFlags::TABLE_POST`].
    TablePost,
}

/// What a visitor is told about one entry.
#[derive(Copy, Clone, Debug)]
pub struct VisitCtx<'a> {
    /// The entry itself (read-only outside this crate).
    pub entry: &'a Descriptor,
    /// The value the engine loaded from it just before the call.
    pub old: u64,
    /// Start of the range the entry covers (aligned to [`Self::size`]).
    pub ipa: Ipa,
    /// The entry's level (0..=3).
    pub level: u8,
    /// Why the visitor is called.
    pub kind: VisitKind,
}

impl VisitCtx<'_> {
    /// Bytes the entry covers.
    #[inline]
    pub const fn size(&self) -> u64 {
        level_size(self.level)
    }

    /// `old` decoded at the entry's level.
    #[inline]
    pub const fn view(&self) -> DescView {
        DescView::decode(self.old, self.level)
    }
}

/// A callback of the walk engine.
pub trait Visitor {
    /// What stops a walk early.
    type Error;

    /// Called for each entry selected by the walk's flags.
    fn visit(&mut self, ctx: &VisitCtx<'_>) -> Result<(), Self::Error>;
}

/// Walks the tables under `root` over `[start, start + size)` (clamped to
/// the 48-bit input range), calling `visitor` as `flags` select.
///
/// # Safety
///
/// `root` is a live level-0 table of `mm`, and every table reachable from it
/// stays valid memory for the whole walk: either nobody frees tables
/// concurrently (the caller holds the writer lock) or the caller is a
/// lockless reader covered by the grace of the [`TableAlloc`] contract.
/// Visitors that free tables must only free tables they unlinked.
pub unsafe fn walk<M, V>(
    mm: &M,
    root: PhysAddr,
    start: Ipa,
    size: u64,
    flags: WalkFlags,
    visitor: &mut V,
) -> Result<(), V::Error>
where
    M: TableAlloc + ?Sized,
    V: Visitor + ?Sized,
{
    let end = start.0.saturating_add(size).min(PA_LIMIT);
    let mut w = Walk { mm, flags, visitor };
    // SAFETY: forwarded from the caller.
    unsafe { w.table(root, START_LEVEL, start.0, end) }
}

struct Walk<'m, 'v, M: ?Sized, V: ?Sized> {
    mm: &'m M,
    flags: WalkFlags,
    visitor: &'v mut V,
}

impl<M: TableAlloc + ?Sized, V: Visitor + ?Sized> Walk<'_, '_, M, V> {
    /// Visits the entries of table `pa` (at `level`) covering `[start, end)`.
    ///
    /// # Safety
    ///
    /// As for [`walk`], for `pa`.
    unsafe fn table(
        &mut self,
        pa: PhysAddr,
        level: u8,
        start: u64,
        end: u64,
    ) -> Result<(), V::Error> {
        // SAFETY: `pa` is reachable and stays valid (caller).
        let entries = unsafe { table_entries(self.mm, pa) };
        let size = level_size(level);
        let mut addr = start;
        while addr < end {
            let base = addr & !(size - 1);
            let index = (base >> level_shift(level)) as usize % entries.len();
            let child_end = end.min(base + size);
            // SAFETY: forwarded from the caller.
            unsafe { self.entry(&entries[index], base, level, addr, child_end)? };
            addr = base + size;
        }
        Ok(())
    }

    /// Visits one entry covering `[base, base + size)` of which
    /// `[start, end)` is inside the walk.
    ///
    /// # Safety
    ///
    /// As for [`walk`].
    unsafe fn entry(
        &mut self,
        entry: &Descriptor,
        base: u64,
        level: u8,
        start: u64,
        end: u64,
    ) -> Result<(), V::Error> {
        let is_table = |raw| matches!(DescView::decode(raw, level), DescView::Table { .. });
        let ctx = |old, kind| VisitCtx {
            entry,
            old,
            ipa: Ipa(base),
            level,
            kind,
        };
        let mut old = entry.load();
        if is_table(old) && self.flags.contains(WalkFlags::TABLE_PRE) {
            self.visitor.visit(&ctx(old, VisitKind::TablePre))?;
            old = entry.load();
        }
        if !is_table(old) && self.flags.contains(WalkFlags::LEAF) {
            self.visitor.visit(&ctx(old, VisitKind::Leaf))?;
            old = entry.load();
        }
        let DescView::Table { pa: child } = DescView::decode(old, level) else {
            return Ok(());
        };
        if level < LEAF_LEVEL {
            // SAFETY: `child` was just loaded (Acquire) from a reachable
            // entry, so it is reachable too; the rest is the caller's.
            unsafe { self.table(child, level + 1, start, end)? };
        }
        if self.flags.contains(WalkFlags::TABLE_POST) {
            self.visitor.visit(&ctx(old, VisitKind::TablePost))?;
        }
        Ok(())
    }
}
