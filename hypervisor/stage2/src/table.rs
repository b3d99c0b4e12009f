//! The stage-2 page table of one VM ([`Stage2`]): its root, its counters,
//! the writer lock, and the primitives every writer uses (install into an
//! empty slot, break-before-make, block split, table retirement).
//!
//! # Concurrency
//!
//! - **Writers** — [`Stage2::map`], [`Stage2::unmap`], [`Stage2::protect`]
//!   and the splits they do — serialize on `writer`, a spin lock held for
//!   the whole walk. It is never taken by readers.
//! - **Lockless readers** — [`Stage2::translate`], [`Stage2::walk`],
//!   [`Stage2::set_access_flag`], [`Stage2::test_and_clear_young`] — only
//!   load descriptors (`Acquire`) and flip the access flag of a valid leaf
//!   with a compare-exchange (`AcqRel`), the same atomic read-modify-write
//!   the hardware walker uses for hardware AF, so no update is lost. A
//!   reader that meets a locked entry reports "not mapped" (the fault path
//!   retries). Table pages a reader may still be walking stay valid by the
//!   grace rule of the [`TableAlloc`] contract; every table free goes
//!   through `Stage2::retire_table`, the one place where RCU deferral
//!   will hook in.
//! - **Descriptor updates** — an empty slot is filled with a
//!   compare-exchange (invalid -> new); a table allocated for a slot and
//!   lost in that race is freed at once (never published). A valid entry
//!   whose output address, memory type or size changes follows
//!   break-before-make: compare-exchange to [`LOCKED`], `invalidate_ipa` +
//!   `invalidate_vmid`, then a `Release` store of the new value. Changes of
//!   permissions only (protect) and of the access flag need no
//!   break-before-make (Arm ARM, "TLB maintenance requirements"): they are a
//!   compare-exchange of the live entry, followed by invalidation for
//!   permissions. A table is unlinked only after locking its parent entry
//!   and re-checking, under the lock, that the table is empty.
//! - **Counters** (`mapped_pages`, `table_pages`) are `Relaxed`: they are
//!   written under the writer lock and read as statistics.
//!
//! Clearing the access flag invalidates nothing: a translation cached with
//! AF set may hide later accesses until evicted (see DESIGN section 5).

use core::convert::Infallible;
use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

use hyp_core::addr::{Ipa, PhysAddr, PAGE_SIZE};

use crate::desc::{level_size, DescView, Descriptor, MemType, Perms, S2Attrs, LOCKED, PA_LIMIT};
use crate::error::{MapError, Stage2Error};
use crate::mm::{table_entries, TableAlloc, TlbInvalidate};
use crate::ops::{DumpVisitor, MapVisitor, ProtectVisitor, TeardownVisitor, UnmapVisitor};
use crate::walk::{walk, VisitCtx, Visitor, WalkFlags};

/// Smallest supported IPA size (start level 0 needs more than 39 bits).
pub const MIN_IPA_BITS: u8 = 40;
/// Largest supported IPA size (48-bit output, no LPA2).
pub const MAX_IPA_BITS: u8 = 48;

/// Options of [`Stage2::map`].
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct MapFlags {
    /// Install the entries with the access flag set (otherwise the first
    /// guest access takes an access-flag fault, or sets it in hardware).
    pub af: bool,
    /// Use 2 MiB and 1 GiB blocks where range and alignment allow.
    pub allow_blocks: bool,
}

/// What [`Stage2::translate`] found for an IPA.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Translation {
    /// The output address of the IPA (page offset included).
    pub pa: PhysAddr,
    /// The guest's permissions.
    pub perms: Perms,
    /// The memory type.
    pub memtype: MemType,
    /// Level of the leaf: 1 (1 GiB block), 2 (2 MiB block) or 3 (page).
    pub level: u8,
    /// Whether the access flag is set.
    pub af: bool,
}

/// What [`Stage2::unmap`] did.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct UnmapStats {
    /// 4 KiB pages that were mapped and are not any more.
    pub pages_unmapped: u64,
    /// Table pages that became empty and were freed.
    pub tables_freed: u64,
}

/// The stage-2 translation tables of one VM: 4 KiB granule, 4 levels
/// starting at level 0, `ipa_bits` of input address.
pub struct Stage2<M: TableAlloc, T: TlbInvalidate> {
    mm: M,
    tlb: T,
    root: PhysAddr,
    ipa_bits: u8,
    /// Serializes structural writers (map, unmap, protect, split, table
    /// free) for the whole of their walk.
    writer: spin::Mutex<()>,
    /// Leaf coverage in 4 KiB pages (`Relaxed`, written under `writer`).
    mapped_pages: AtomicU64,
    /// Table pages in use, root included (`Relaxed`, written under `writer`).
    table_pages: AtomicU64,
}

impl<M: TableAlloc, T: TlbInvalidate> fmt::Debug for Stage2<M, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stage2")
            .field("root", &self.root)
            .field("ipa_bits", &self.ipa_bits)
            .field("mapped_pages", &self.mapped_pages())
            .field("table_pages", &self.table_pages())
            .finish_non_exhaustive()
    }
}

impl<M: TableAlloc, T: TlbInvalidate> Stage2<M, T> {
    /// An empty table (just the root) for an IPA space of `ipa_bits` bits.
    pub fn new(ipa_bits: u8, mm: M, tlb: T) -> Result<Self, Stage2Error> {
        if !(MIN_IPA_BITS..=MAX_IPA_BITS).contains(&ipa_bits) {
            return Err(Stage2Error::UnsupportedIpaBits(ipa_bits));
        }
        let root = mm.alloc_table().ok_or(Stage2Error::NoMemory)?;
        Ok(Self {
            mm,
            tlb,
            root,
            ipa_bits,
            writer: spin::Mutex::new(()),
            mapped_pages: AtomicU64::new(0),
            table_pages: AtomicU64::new(1),
        })
    }

    /// Physical address of the level-0 table (the VTTBR_EL2 BADDR).
    pub fn root(&self) -> PhysAddr {
        self.root
    }

    /// The IPA size in bits.
    pub fn ipa_bits(&self) -> u8 {
        self.ipa_bits
    }

    /// One past the highest IPA (`1 << ipa_bits`).
    pub fn ipa_limit(&self) -> u64 {
        1 << self.ipa_bits
    }

    /// The VTCR_EL2.T0SZ value: `64 - ipa_bits` (with SL0 selecting start
    /// level 0, see [`crate::desc::START_LEVEL`]).
    pub fn vtcr_t0sz(&self) -> u8 {
        64 - self.ipa_bits
    }

    /// 4 KiB pages currently covered by leaves (a 2 MiB block counts 512).
    pub fn mapped_pages(&self) -> u64 {
        self.mapped_pages.load(Ordering::Relaxed)
    }

    /// Table pages in use, the root included.
    pub fn table_pages(&self) -> u64 {
        self.table_pages.load(Ordering::Relaxed)
    }

    /// Maps `[ipa, ipa + size)` to `[pa, pa + size)` with `perms` and
    /// `memtype`, using blocks when `flags.allow_blocks` and alignment
    /// allow. Takes the writer lock.
    ///
    /// Mapping over an identical mapping changes nothing (except setting AF
    /// when `flags.af`). Mapping over a different valid mapping is allowed
    /// and replaces it with break-before-make (blocks in the way are split
    /// first). Existing tables are reused, never collapsed into blocks.
    pub fn map(
        &self,
        ipa: Ipa,
        pa: PhysAddr,
        size: u64,
        perms: Perms,
        memtype: MemType,
        flags: MapFlags,
    ) -> Result<(), MapError> {
        self.check_range(ipa, size)?;
        if !pa.is_page_aligned() {
            return Err(MapError::UnalignedPhys(pa));
        }
        if pa.checked_add(size).is_none_or(|end| end.0 > PA_LIMIT) {
            return Err(MapError::PhysOutOfRange { pa, size });
        }
        if memtype == MemType::Device && perms.contains(Perms::EXEC) {
            return Err(MapError::ExecutableDevice(ipa));
        }
        let mut visitor = MapVisitor {
            s2: self,
            start: ipa.0,
            end: ipa.0 + size,
            pa: pa.0,
            attrs: S2Attrs::leaf(perms, memtype, flags.af),
            allow_blocks: flags.allow_blocks,
        };
        self.write_walk(ipa, size, WalkFlags::LEAF, &mut visitor)
    }

    /// Unmaps `[ipa, ipa + size)` (blocks straddling an edge are split
    /// first) with break-before-make and TLB invalidation of each leaf, then
    /// frees the table pages that became empty. Takes the writer lock.
    pub fn unmap(&self, ipa: Ipa, size: u64) -> Result<UnmapStats, MapError> {
        self.check_range(ipa, size)?;
        let mut visitor = UnmapVisitor {
            s2: self,
            start: ipa.0,
            end: ipa.0 + size,
            stats: UnmapStats::default(),
        };
        self.write_walk(
            ipa,
            size,
            WalkFlags::LEAF | WalkFlags::TABLE_POST,
            &mut visitor,
        )?;
        Ok(visitor.stats)
    }

    /// Sets the permissions of every mapped page in `[ipa, ipa + size)` to
    /// `perms` (blocks straddling an edge are split first; unmapped pages
    /// stay unmapped; `EXEC` is dropped for Device memory). Invalidates
    /// the TLB for every changed leaf. Takes the writer lock.
    pub fn protect(&self, ipa: Ipa, size: u64, perms: Perms) -> Result<(), MapError> {
        self.check_range(ipa, size)?;
        let mut visitor = ProtectVisitor {
            s2: self,
            start: ipa.0,
            end: ipa.0 + size,
            perms,
        };
        self.write_walk(ipa, size, WalkFlags::LEAF, &mut visitor)
    }

    /// The translation of `ipa`, or `None` when it is not mapped (or its
    /// entry is locked by a writer). Lockless.
    pub fn translate(&self, ipa: Ipa) -> Option<Translation> {
        let (base, view) = self.leaf_at(ipa, |ctx| (ctx.ipa, ctx.view()))?;
        let (pa, attrs) = view.leaf_parts()?;
        let level = match view {
            DescView::Block { level, .. } => level,
            _ => crate::desc::LEAF_LEVEL,
        };
        Some(Translation {
            pa: pa.add(ipa.offset_from(base)),
            perms: attrs.perms(),
            memtype: attrs.mem_type(),
            level,
            af: attrs.af(),
        })
    }

    /// Software access-flag fault path: sets AF on the leaf covering `ipa`.
    /// Returns whether a valid leaf was found (if not, the guest faults
    /// again and the fault is handled as a translation fault). Lockless.
    pub fn set_access_flag(&self, ipa: Ipa) -> bool {
        self.leaf_at(ipa, |ctx| update_af(ctx.entry, ctx.old, ctx.level, true))
            .flatten()
            .is_some()
    }

    /// Clears AF on the leaf covering `ipa`; returns whether it was set, or
    /// `None` when no valid leaf covers `ipa`. No TLB invalidation (see the
    /// module documentation). Lockless.
    pub fn test_and_clear_young(&self, ipa: Ipa) -> Option<bool> {
        self.leaf_at(ipa, |ctx| update_af(ctx.entry, ctx.old, ctx.level, false))
            .flatten()
    }

    /// Runs a read-only `visitor` over `[ipa, ipa + size)`, clamped to the
    /// IPA space. Lockless, like [`Stage2::translate`].
    pub fn walk<V: Visitor + ?Sized>(
        &self,
        ipa: Ipa,
        size: u64,
        flags: WalkFlags,
        visitor: &mut V,
    ) -> Result<(), V::Error> {
        let limit = self.ipa_limit();
        if ipa.0 >= limit {
            return Ok(());
        }
        let size = size.min(limit - ipa.0);
        // SAFETY: `root` is our live root table; tables a writer frees
        // meanwhile stay valid by the grace rule of the `TableAlloc`
        // contract, and outside visitors cannot write descriptors.
        unsafe { walk(&self.mm, self.root, ipa, size, flags, visitor) }
    }

    /// Writes one line per valid table entry and leaf (and per locked
    /// entry) to `out`. Lockless.
    pub fn dump<W: fmt::Write + ?Sized>(&self, out: &mut W) -> fmt::Result {
        let mut visitor = DumpVisitor { out };
        self.walk(
            Ipa(0),
            self.ipa_limit(),
            WalkFlags::TABLE_PRE | WalkFlags::LEAF,
            &mut visitor,
        )
    }

    /// Checks an IPA range given to a writer.
    fn check_range(&self, ipa: Ipa, size: u64) -> Result<(), MapError> {
        if size == 0 {
            return Err(MapError::ZeroSize(ipa));
        }
        if !ipa.is_page_aligned() {
            return Err(MapError::Unaligned(ipa));
        }
        if !size.is_multiple_of(PAGE_SIZE) {
            return Err(MapError::UnalignedSize(size));
        }
        match ipa.checked_add(size) {
            Some(end) if end.0 <= self.ipa_limit() => Ok(()),
            _ => Err(MapError::OutOfRange { ipa, size }),
        }
    }

    /// Runs a writer visitor under the writer lock.
    fn write_walk<V: Visitor<Error = MapError>>(
        &self,
        ipa: Ipa,
        size: u64,
        flags: WalkFlags,
        visitor: &mut V,
    ) -> Result<(), MapError> {
        let _writer = self.writer.lock();
        // SAFETY: `root` is our live root table and we hold the writer lock,
        // so only our visitor frees tables, and only those it unlinked.
        unsafe { walk(&self.mm, self.root, ipa, size, flags, visitor) }
    }

    /// Calls `f` on the entry that is not a table on the path to `ipa`
    /// (`None` when `ipa` is outside the IPA space).
    fn leaf_at<R>(&self, ipa: Ipa, f: impl FnMut(&VisitCtx<'_>) -> R) -> Option<R> {
        struct LeafFn<F, R>(F, Option<R>);
        impl<F: FnMut(&VisitCtx<'_>) -> R, R> Visitor for LeafFn<F, R> {
            type Error = Infallible;
            fn visit(&mut self, ctx: &VisitCtx<'_>) -> Result<(), Infallible> {
                self.1 = Some((self.0)(ctx));
                Ok(())
            }
        }
        let mut visitor = LeafFn(f, None);
        match self.walk(
            ipa.align_down(PAGE_SIZE),
            PAGE_SIZE,
            WalkFlags::LEAF,
            &mut visitor,
        ) {
            Ok(()) => visitor.1,
            Err(never) => match never {},
        }
    }

    // ---- primitives shared by the writer visitors (writer lock held) ----

    /// Counts a leaf at `level` as mapped (`added`) or unmapped.
    pub(crate) fn account_leaf(&self, level: u8, added: bool) {
        let pages = level_size(level) / PAGE_SIZE;
        if added {
            self.mapped_pages.fetch_add(pages, Ordering::Relaxed);
        } else {
            self.mapped_pages.fetch_sub(pages, Ordering::Relaxed);
        }
    }

    /// Fills the empty slot `entry` (holding `old`) with `new`.
    pub(crate) fn install(
        &self,
        entry: &Descriptor,
        old: u64,
        new: u64,
        ipa: Ipa,
        level: u8,
    ) -> Result<(), MapError> {
        entry
            .compare_exchange(old, new)
            .map(drop)
            .map_err(|_| MapError::Busy { ipa, level })
    }

    /// Fills the empty slot `entry` (holding `old`) with a new, empty table.
    pub(crate) fn install_table(
        &self,
        entry: &Descriptor,
        old: u64,
        ipa: Ipa,
        level: u8,
    ) -> Result<(), MapError> {
        let table = self.mm.alloc_table().ok_or(MapError::NoMemory)?;
        let result = self.install(
            entry,
            old,
            DescView::Table { pa: table }.encode(),
            ipa,
            level,
        );
        self.account_new_table(table, result)
    }

    /// Books a freshly allocated `table` once the attempt to publish it
    /// ended with `result`: counted if published, freed at once if not.
    fn account_new_table(
        &self,
        table: PhysAddr,
        result: Result<(), MapError>,
    ) -> Result<(), MapError> {
        match result {
            Ok(()) => {
                self.table_pages.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                // SAFETY: `table` came from `alloc_table` and was never
                // published, so no walker can have seen it.
                unsafe { self.mm.free_table(table) };
                Err(e)
            }
        }
    }

    /// The break of break-before-make: compare-exchange `entry` from `old` to
    /// [`LOCKED`], retrying while a valid entry only changes its access flag
    /// (hardware AF or a lockless AF update). Returns the value locked.
    pub(crate) fn lock_entry(
        &self,
        entry: &Descriptor,
        mut old: u64,
        ipa: Ipa,
        level: u8,
    ) -> Result<u64, MapError> {
        loop {
            match entry.compare_exchange(old, LOCKED) {
                Ok(_) => return Ok(old),
                Err(now) if now ^ old == S2Attrs::AF.bits() && old & S2Attrs::VALID.bits() != 0 => {
                    old = now;
                }
                Err(_) => return Err(MapError::Busy { ipa, level }),
            }
        }
    }

    /// TLB invalidation after the entry at `ipa`/`level` that held `old` was
    /// broken or changed: the leaf by IPA and then the whole VMID for the
    /// combined stage-1+2 entries; a table entry by VMID (walk caches).
    pub(crate) fn invalidate(&self, ipa: Ipa, level: u8, old: u64) {
        if DescView::decode(old, level).leaf_parts().is_some() {
            self.tlb.invalidate_ipa(ipa, level);
        }
        self.tlb.invalidate_vmid();
    }

    /// Break-before-make: lock `entry` (holding `old`), invalidate, then
    /// publish `make(locked value)` with `Release`.
    pub(crate) fn replace(
        &self,
        entry: &Descriptor,
        old: u64,
        ipa: Ipa,
        level: u8,
        make: impl FnOnce(u64) -> u64,
    ) -> Result<(), MapError> {
        let locked = self.lock_entry(entry, old, ipa, level)?;
        self.invalidate(ipa, level, locked);
        entry.store(make(locked));
        Ok(())
    }

    /// Replaces the block in `entry` (holding `old`, covering `ipa` at
    /// `level`) by a table of 512 equivalent entries one level down (same
    /// attributes, AF included). Does nothing if `old` is not a block.
    pub(crate) fn split_block(
        &self,
        entry: &Descriptor,
        old: u64,
        ipa: Ipa,
        level: u8,
    ) -> Result<(), MapError> {
        let DescView::Block { pa, attrs, .. } = DescView::decode(old, level) else {
            return Ok(());
        };
        let table = self.mm.alloc_table().ok_or(MapError::NoMemory)?;
        let child = level + 1;
        let step = level_size(child);
        let result = self.replace(entry, old, ipa, level, |locked| {
            // The access flag may have changed since `old` was read.
            let attrs = attrs
                .difference(S2Attrs::AF)
                .union(S2Attrs::from_bits_truncate(locked).intersection(S2Attrs::AF));
            // SAFETY: `table` is a live page of ours, not yet published.
            let entries = unsafe { table_entries(&self.mm, table) };
            let mut out = pa;
            for e in entries {
                e.store(DescView::leaf(out, attrs, child).encode());
                out = out.add(step);
            }
            DescView::Table { pa: table }.encode()
        });
        self.account_new_table(table, result)
    }

    /// Whether every entry of table `pa` is invalid (a locked entry counts
    /// as in use).
    pub(crate) fn table_is_empty(&self, pa: PhysAddr) -> bool {
        // SAFETY: `pa` was loaded from a table entry we can reach, under the
        // writer lock, so it is live.
        let entries = unsafe { table_entries(&self.mm, pa) };
        entries
            .iter()
            .all(|e| DescView::decode(e.load(), 1) == DescView::Invalid)
    }

    /// The one place table pages are freed after having been published.
    /// (RCU-deferred freeing will replace the direct free here.)
    ///
    /// # Safety
    ///
    /// `pa` is a table of ours that no descriptor points to any more, and
    /// the TLBs were invalidated after it was unlinked.
    pub(crate) unsafe fn retire_table(&self, pa: PhysAddr) {
        self.table_pages.fetch_sub(1, Ordering::Relaxed);
        // SAFETY: the caller's guarantees are those of `free_table`.
        unsafe { self.mm.free_table(pa) };
    }
}

/// Sets (`set`) or clears the access flag of the valid leaf in `entry`
/// (holding `old` at `level`) with a compare-exchange loop, so that a
/// concurrent lock by a writer is never overwritten. Returns the previous
/// AF, or `None` if the entry is not a valid leaf.
pub(crate) fn update_af(entry: &Descriptor, mut old: u64, level: u8, set: bool) -> Option<bool> {
    loop {
        let (_, attrs) = DescView::decode(old, level).leaf_parts()?;
        let new = if set {
            old | S2Attrs::AF.bits()
        } else {
            old & !S2Attrs::AF.bits()
        };
        if new == old {
            return Some(attrs.af());
        }
        match entry.compare_exchange(old, new) {
            Ok(_) => return Some(attrs.af()),
            Err(now) => old = now,
        }
    }
}

impl<M: TableAlloc, T: TlbInvalidate> Drop for Stage2<M, T> {
    /// Frees every table page. The guest must no longer run with this
    /// table on any CPU; the VMID is invalidated before the pages go.
    fn drop(&mut self) {
        self.tlb.invalidate_vmid();
        let mut visitor = TeardownVisitor { s2: self };
        let (limit, flags) = (self.ipa_limit(), WalkFlags::TABLE_POST);
        // SAFETY: `&mut self`: no other walker exists; the teardown visitor
        // frees each table only after its children were walked.
        let Ok(()) = unsafe { walk(&self.mm, self.root, Ipa(0), limit, flags, &mut visitor) };
        // SAFETY: the root is ours, unreachable once `self` is gone, and the
        // VMID was invalidated above.
        unsafe { self.retire_table(self.root) };
    }
}
