//! The stage-2 page table of one VM ([`Stage2`]): its root, its counters,
//! its RCU domain, the writer lock, and the primitives every writer uses
//! (install into an empty slot, break-before-make, block split, table
//! removal, deferred freeing).
//!
//! # Concurrency
//!
//! - **Lockless readers** — [`Stage2::translate`], [`Stage2::walk`],
//!   [`Stage2::set_access_flag`], the harvester ([`Stage2::harvest`]) —
//!   only load descriptors (`Acquire`) and flip the access flag of a valid
//!   leaf with a compare-exchange (`AcqRel`), the same atomic
//!   read-modify-write the hardware walker uses for hardware AF, so no
//!   update is lost and a writer's lock marker is never overwritten. A
//!   reader that meets a locked entry skips it (harvest) or reports "not
//!   mapped" (the fault path retries). They never take the writer lock and
//!   never allocate.
//! - **Lockless writers** — the stage-2 fault path
//!   ([`Stage2::fault_install`]) and page migration
//!   ([`Stage2::migrate_page`]) — install into empty slots with a
//!   compare-exchange (invalid -> new; the loser frees its unpublished
//!   table at once) and change a live entry with break-before-make.
//! - **Pins** ([`Stage2::with_page_pinned`]) lock a valid leaf with
//!   [`LOCKED`] (compare-exchange, retried over access-flag changes) while
//!   the hypervisor accesses its frame, then store back the exact value;
//!   no TLB invalidation, the output address does not change. Every
//!   writer sees the lock and waits or backs off.
//! - **Locked writers** — [`Stage2::map`], [`Stage2::unmap`],
//!   [`Stage2::protect`] and the block splits and table removals they do —
//!   serialize on `writer`, a spin lock held for the whole walk. A CPU
//!   waiting for it reports quiescent states (it holds no references), so a
//!   lock holder may wait for a grace period.
//! - **Table pages** stay valid for every walker that can reach them by
//!   RCU (QSBR, [`crate::rcu`]): all walkers must run on a CPU that is
//!   online in the table's [`Rcu`] domain, and outside walks (never inside
//!   one) pass quiescent states. A removed table is freed only after:
//!   unlink -> TLB flush of the VMID (walk caches) -> grace period -> free.
//! - **Descriptor updates** — a valid entry whose output address, memory
//!   type or size changes follows break-before-make: compare-exchange to
//!   [`LOCKED`], `invalidate_ipa` + `invalidate_vmid`, then a `Release`
//!   store of the new value. Changes of permissions only (protect) and of
//!   the access flag need no break-before-make (Arm ARM, "TLB maintenance
//!   requirements"). Unmapping makes a leaf invalid with a compare-exchange
//!   and defers its invalidation to a [`TlbBatch`]; the frame stays pending
//!   until the batch's flush.
//! - **Table removal** (a table found empty after an unmap): lock the
//!   parent entry, then **seal** the table: compare-exchange each of its
//!   512 entries from invalid to [`LOCKED`]. A fault that walked into the
//!   table before the parent was locked can then no longer install into it
//!   (its compare-exchange fails and it retries from the root); if any
//!   entry is not invalid, the seal is undone and the table stays. A sealed
//!   table is unlinked, and its page pending in the batch. Tables are
//!   removed by the unmap that empties them ([`Stage2::unmap_batched`])
//!   or later by the empty-table scan ([`Stage2::reclaim_empty_tables`]),
//!   which finds candidates locklessly and removes each with this protocol
//!   under the writer lock. A table holding a locked entry is never
//!   removed (its seal fails), which is what lets a pin use its entry
//!   after its walk ended.
//! - **Counters** (`mapped_pages`, `table_pages`) are `Relaxed` atomics:
//!   statistics, updated by every writer.
//!
//! Clearing the access flag needs no TLB invalidation for correctness; the
//! harvester's `FLUSH` flag asks for one (see DESIGN section 5).

use core::convert::Infallible;
use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

use hyp_core::addr::{Ipa, PhysAddr, PAGE_SIZE};

use crate::batch::TlbBatch;
use crate::desc::{level_size, DescView, Descriptor, MemType, Perms, S2Attrs, LOCKED, PA_LIMIT};
use crate::error::{MapError, Stage2Error};
use crate::mm::{table_entries, TableAlloc, TlbInvalidate};
use crate::ops::{DumpVisitor, MapVisitor, ProtectVisitor, TeardownVisitor, UnmapVisitor};
use crate::rcu::{DeferQueue, Rcu};
use crate::walk::{walk, VisitCtx, Visitor, WalkFlags};

/// Table pages that may wait for a grace period at once; a writer that
/// finds the queue full waits for the oldest ones.
const DEFERRED_TABLES: usize = 256;

/// How often a locked writer restarts a walk that met an entry locked by a
/// lockless writer (a migration's break-before-make, which finishes in
/// bounded time) before it reports [`MapError::Busy`].
const BUSY_RETRIES: u32 = 1 << 20;

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
    /// Table pages that became empty and were unlinked (each is freed
    /// after a TLB flush and a grace period).
    pub tables_freed: u64,
}

/// The stage-2 translation tables of one VM: 4 KiB granule, 4 levels
/// starting at level 0, `ipa_bits` of input address.
pub struct Stage2<'r, M: TableAlloc, T: TlbInvalidate> {
    mm: M,
    tlb: T,
    /// The RCU domain of every CPU that walks these tables.
    rcu: &'r Rcu,
    root: PhysAddr,
    ipa_bits: u8,
    /// Serializes structural writers (map, unmap, protect, split, table
    /// removal) for the whole of their walk.
    writer: spin::Mutex<()>,
    /// Unlinked, flushed table pages waiting for their grace period.
    deferred: DeferQueue<PhysAddr, DEFERRED_TABLES>,
    #[cfg(feature = "check")]
    checker: crate::check::Checker,
    /// Test switch: flushes skip the TLB invalidation (see
    /// [`Stage2::skip_flush_for_test`]).
    #[cfg(feature = "check")]
    skip_flush: core::sync::atomic::AtomicBool,
    /// Leaf coverage in 4 KiB pages (`Relaxed` atomic adds: statistics,
    /// updated by locked and lockless writers alike).
    mapped_pages: AtomicU64,
    /// Table pages in use, root included, freed-but-deferred pages
    /// included until their grace period ends (`Relaxed`, as above).
    table_pages: AtomicU64,
}

impl<M: TableAlloc, T: TlbInvalidate> fmt::Debug for Stage2<'_, M, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stage2")
            .field("root", &self.root)
            .field("ipa_bits", &self.ipa_bits)
            .field("mapped_pages", &self.mapped_pages())
            .field("table_pages", &self.table_pages())
            .finish_non_exhaustive()
    }
}

impl<'r, M: TableAlloc, T: TlbInvalidate> Stage2<'r, M, T> {
    /// An empty table (just the root) for an IPA space of `ipa_bits` bits,
    /// walked by the CPUs of the RCU domain `rcu`.
    pub fn new(ipa_bits: u8, mm: M, tlb: T, rcu: &'r Rcu) -> Result<Self, Stage2Error> {
        if !(MIN_IPA_BITS..=MAX_IPA_BITS).contains(&ipa_bits) {
            return Err(Stage2Error::UnsupportedIpaBits(ipa_bits));
        }
        let root = mm.alloc_table().ok_or(Stage2Error::NoMemory)?;
        Ok(Self {
            mm,
            tlb,
            rcu,
            root,
            ipa_bits,
            writer: spin::Mutex::new(()),
            deferred: DeferQueue::new(),
            #[cfg(feature = "check")]
            checker: crate::check::Checker::default(),
            #[cfg(feature = "check")]
            skip_flush: core::sync::atomic::AtomicBool::new(false),
            mapped_pages: AtomicU64::new(0),
            table_pages: AtomicU64::new(1),
        })
    }

    /// Physical address of the level-0 table (the VTTBR_EL2 BADDR).
    pub fn root(&self) -> PhysAddr {
        self.root
    }

    /// The RCU domain of the CPUs that walk these tables.
    pub fn rcu(&self) -> &'r Rcu {
        self.rcu
    }

    /// A TLB batch whose pending frames go to `release(pa, size)` once the
    /// flush that covers their unmap has completed.
    pub fn batch<'a>(
        &'a self,
        release: &'a mut dyn FnMut(PhysAddr, u64),
    ) -> TlbBatch<'a, 'r, M, T> {
        TlbBatch::new(self, release)
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
    /// first) and removes the table pages that became empty; the frames
    /// the leaves mapped are dropped (see [`Stage2::unmap_batched`] to get
    /// them back). Flushes before it returns. Takes the writer lock.
    pub fn unmap(&self, ipa: Ipa, size: u64) -> Result<UnmapStats, MapError> {
        let mut release = |_, _| {};
        let mut batch = self.batch(&mut release);
        self.unmap_batched(ipa, size, &mut batch)
    }

    /// Unmaps `[ipa, ipa + size)` into `batch`: the leaves are invalid when
    /// this returns, their TLB invalidation and the release of their frames
    /// happen at the batch's next flush, and emptied table pages are freed
    /// after that flush and a grace period. Takes the writer lock.
    pub fn unmap_batched(
        &self,
        ipa: Ipa,
        size: u64,
        batch: &mut TlbBatch<'_, 'r, M, T>,
    ) -> Result<UnmapStats, MapError> {
        self.check_range(ipa, size)?;
        self.unmap_walk(ipa, size, WalkFlags::LEAF | WalkFlags::TABLE_POST, batch)
    }

    /// [`Stage2::unmap_batched`] without the table removal: the leaves of
    /// `[ipa, ipa + size)` are invalid when this returns (blocks
    /// straddling an edge are split first), their invalidation and frames
    /// go through `batch`, but table pages left empty stay linked, so the
    /// writer lock is held only for the leaf breaks (no 512-entry
    /// emptiness check and seal per table). [`Stage2::reclaim_empty_tables`]
    /// finds and removes the empty tables later. `tables_freed` of the
    /// result is always 0. Takes the writer lock.
    pub fn unmap_leaves_batched(
        &self,
        ipa: Ipa,
        size: u64,
        batch: &mut TlbBatch<'_, 'r, M, T>,
    ) -> Result<UnmapStats, MapError> {
        self.check_range(ipa, size)?;
        self.unmap_walk(ipa, size, WalkFlags::LEAF, batch)
    }

    /// Runs the unmap visitor over `[ipa, ipa + size)` under the writer
    /// lock; `flags` say what it does: `LEAF` breaks the leaves,
    /// `TABLE_POST` removes the tables found empty after their children.
    pub(crate) fn unmap_walk(
        &self,
        ipa: Ipa,
        size: u64,
        flags: WalkFlags,
        batch: &mut TlbBatch<'_, 'r, M, T>,
    ) -> Result<UnmapStats, MapError> {
        let mut visitor = UnmapVisitor {
            s2: self,
            start: ipa.0,
            end: ipa.0 + size,
            stats: UnmapStats::default(),
            batch,
        };
        self.write_walk(ipa, size, flags, &mut visitor)?;
        Ok(visitor.stats)
    }

    /// Frees the table pages whose grace period has elapsed; with `wait`,
    /// first waits for the grace period of all queued pages. Returns how
    /// many were freed. Not from inside a walk.
    pub fn reclaim_tables(&self, wait: bool) -> usize {
        self.deferred
            .reclaim(self.rcu, wait, |pa| self.free_table_now(pa))
    }

    /// Table pages unlinked and waiting for their grace period.
    pub fn deferred_tables(&self) -> usize {
        self.deferred.len()
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

    /// The entry that ends the walk to `ipa` (a leaf, an invalid slot, or
    /// a writer's lock), decoded; `None` outside the IPA space. Lockless:
    /// one walk that tells "mapped", "empty" and "being changed" apart.
    pub fn leaf_view(&self, ipa: Ipa) -> Option<DescView> {
        self.leaf_at(ipa, |ctx| ctx.view())
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
    /// module documentation). Lockless: the per-page form of
    /// [`Stage2::harvest`].
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
    pub(crate) fn check_range(&self, ipa: Ipa, size: u64) -> Result<(), MapError> {
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

    /// Takes the writer lock, reporting quiescent states while it waits
    /// (the caller holds no table references), so that a holder waiting
    /// for a grace period cannot deadlock with us.
    fn lock_writer(&self) -> spin::MutexGuard<'_, ()> {
        loop {
            if let Some(guard) = self.writer.try_lock() {
                return guard;
            }
            self.rcu.quiescent();
            core::hint::spin_loop();
        }
    }

    /// Runs a writer visitor under the writer lock. A walk that meets an
    /// entry locked by a lockless writer ([`MapError::Busy`]) is restarted:
    /// the operations are idempotent and such locks are short.
    fn write_walk<V: Visitor<Error = MapError>>(
        &self,
        ipa: Ipa,
        size: u64,
        flags: WalkFlags,
        visitor: &mut V,
    ) -> Result<(), MapError> {
        let _writer = self.lock_writer();
        let mut tries = 0;
        loop {
            // SAFETY: `root` is our live root table; we hold the writer
            // lock, so only our visitor unlinks tables, and it frees them
            // only after a flush and a grace period.
            match unsafe { walk(&self.mm, self.root, ipa, size, flags, visitor) } {
                Err(MapError::Busy { .. }) if tries < BUSY_RETRIES => {
                    tries += 1;
                    // We are the only CPU that unlinks tables (writer
                    // lock), so reporting a quiescent state here cannot
                    // free anything this walk still uses.
                    self.rcu.quiescent();
                    core::hint::spin_loop();
                }
                result => return result,
            }
        }
    }

    /// Calls `f` on the entry that is not a table on the path to `ipa`
    /// (`None` when `ipa` is outside the IPA space).
    pub(crate) fn leaf_at<R>(&self, ipa: Ipa, f: impl FnMut(&VisitCtx<'_>) -> R) -> Option<R> {
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
        #[cfg(feature = "check")]
        if let Some((pa, _)) = DescView::decode(new, level).leaf_parts() {
            self.checker.leaf_installed(pa, level_size(level));
        }
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
        old: u64,
        ipa: Ipa,
        level: u8,
    ) -> Result<u64, MapError> {
        self.break_entry(entry, old, LOCKED, ipa, level)
    }

    /// Compare-exchanges `entry` from `old` to the invalid value `to`
    /// ([`LOCKED`] or 0), retrying while a valid entry only changes its
    /// access flag. Returns the value replaced.
    pub(crate) fn break_entry(
        &self,
        entry: &Descriptor,
        mut old: u64,
        to: u64,
        ipa: Ipa,
        level: u8,
    ) -> Result<u64, MapError> {
        loop {
            match entry.compare_exchange(old, to) {
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
        #[cfg(feature = "check")]
        self.checker.flushed();
    }

    /// The flush of a [`TlbBatch`]: the leaves at `ipas` by IPA and then
    /// the VMID's stage-1 and combined entries, or (`whole_vmid`) the whole
    /// VMID including walk caches.
    pub(crate) fn flush_tlb(&self, ipas: &[(Ipa, u8)], whole_vmid: bool) {
        #[cfg(feature = "check")]
        if self.skip_flush.load(Ordering::Relaxed) {
            return;
        }
        if whole_vmid {
            self.tlb.invalidate_vmid();
        } else {
            for &(ipa, level) in ipas {
                self.tlb.invalidate_ipa(ipa, level);
            }
            self.tlb.invalidate_stage1();
        }
        #[cfg(feature = "check")]
        self.checker.flushed();
    }

    /// Test switch of the checking mode: from now on, batch flushes skip
    /// the TLB invalidation (a deliberately wrong free order, which the
    /// checker must catch).
    #[cfg(feature = "check")]
    pub fn skip_flush_for_test(&self) {
        self.skip_flush.store(true, Ordering::Relaxed);
    }

    /// Whether the checker sees nothing pending: every unmapped frame was
    /// released after a flush and every unlinked table freed.
    #[cfg(feature = "check")]
    pub fn check_idle(&self) -> bool {
        self.checker.idle()
    }

    #[cfg(feature = "check")]
    pub(crate) fn checker(&self) -> &crate::check::Checker {
        &self.checker
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
        let new = make(locked);
        #[cfg(feature = "check")]
        if let Some((pa, _)) = DescView::decode(new, level).leaf_parts() {
            self.checker.leaf_installed(pa, level_size(level));
        }
        entry.store(new);
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
        // SAFETY: `pa` was loaded from a table entry we can reach, inside a
        // walk (RCU read-side section), so it is live.
        let entries = unsafe { table_entries(&self.mm, pa) };
        entries
            .iter()
            .all(|e| e.load() == DescView::Invalid.encode())
    }

    /// The table-removal protocol for table `child`, linked from `entry`
    /// (holding `old`, at `level`, covering `ipa`): lock the parent entry,
    /// seal every entry of `child` (invalid -> [`LOCKED`]) so that no fault
    /// can install into it any more, unlink it, and leave the page pending
    /// in `batch` (VMID flush, then a grace period, then free). Entries the
    /// batch itself locked (leaves it unmapped, waiting for its flush)
    /// count as empty. The parent entry stays locked until the batch's
    /// flush, so no fault can link a new table (and map a new frame) under
    /// it while TLBs may still hold translations through the old one.
    /// Returns whether the table was removed; if some entry was in use,
    /// the seal is undone and nothing changes. Writer lock held.
    pub(crate) fn remove_table(
        &self,
        entry: &Descriptor,
        old: u64,
        ipa: Ipa,
        level: u8,
        child: PhysAddr,
        batch: &mut TlbBatch<'_, 'r, M, T>,
    ) -> Result<bool, MapError> {
        // SAFETY: `child` is reachable from `entry`, inside a walk under
        // the writer lock, and only writer-lock holders (us) unlink tables.
        let entries = unsafe { table_entries(&self.mm, child) };
        let invalid = DescView::Invalid.encode();
        let ours = |e: &Descriptor| e.load() == LOCKED && batch.holds_lock(e);
        if !entries.iter().all(|e| e.load() == invalid || ours(e)) {
            return Ok(false);
        }
        let locked = self.lock_entry(entry, old, ipa, level)?;
        for (i, e) in entries.iter().enumerate() {
            if e.compare_exchange(invalid, LOCKED).is_err() && !ours(e) {
                // In use after all: undo our seals (the batch's locks stay).
                for s in entries[..i].iter().filter(|s| !ours(s)) {
                    s.store(invalid);
                }
                entry.store(locked);
                return Ok(false);
            }
        }
        batch.table_unlinked(child);
        batch.entry_locked(entry);
        Ok(true)
    }

    /// Frees a table page at teardown, bypassing the grace period.
    ///
    /// # Safety
    ///
    /// `pa` is a table of ours that no walker, software or hardware, can
    /// reach any more.
    pub(crate) unsafe fn free_unreachable_table(&self, pa: PhysAddr) {
        self.table_pages.fetch_sub(1, Ordering::Relaxed);
        // SAFETY: the caller's guarantees are those of `free_table`.
        unsafe { self.mm.free_table(pa) };
    }

    /// Queues the unlinked and flushed table page `pa` behind a grace
    /// period. Called by a [`TlbBatch`] flush, which may run inside an
    /// unmap walk under the writer lock: if the queue is full this waits
    /// for a grace period, reporting quiescent states for this CPU, which
    /// is safe because only writer-lock holders unlink tables, so nothing
    /// this CPU's walk still uses can be freed meanwhile.
    pub(crate) fn defer_free_table(&self, pa: PhysAddr) {
        self.deferred
            .defer(self.rcu, pa, |pa| self.free_table_now(pa));
        #[cfg(feature = "check")]
        if let Some(ticket) = self.deferred.newest_ticket() {
            self.checker.table_queued(pa, ticket);
        }
    }

    /// Gives a table page whose grace period elapsed back to the allocator.
    fn free_table_now(&self, pa: PhysAddr) {
        #[cfg(feature = "check")]
        self.checker.table_freed(pa, self.rcu);
        self.table_pages.fetch_sub(1, Ordering::Relaxed);
        // SAFETY: `pa` was unlinked, the VMID flushed and a grace period
        // elapsed since (the deferred queue's contract).
        unsafe { self.mm.free_table(pa) };
    }
}

/// Sets (`set`) or clears the access flag of the valid leaf in `entry`
/// (holding `old` at `level`) with a compare-exchange loop, so that a
/// concurrent lock by a writer is never overwritten. Returns the previous
/// AF, or `None` if the entry is not a valid leaf.
#[inline]
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

impl<M: TableAlloc, T: TlbInvalidate> Drop for Stage2<'_, M, T> {
    /// Frees every table page, the ones waiting for a grace period
    /// included. The guest must no longer run with this table on any CPU;
    /// the VMID is invalidated before the pages go. `&mut self` proves that
    /// no software walker is left.
    fn drop(&mut self) {
        self.tlb.invalidate_vmid();
        let mut visitor = TeardownVisitor { s2: self };
        let (limit, flags) = (self.ipa_limit(), WalkFlags::TABLE_POST);
        // SAFETY: `&mut self`: no other walker exists; the teardown visitor
        // frees each table only after its children were walked.
        let Ok(()) = unsafe { walk(&self.mm, self.root, Ipa(0), limit, flags, &mut visitor) };
        let mut deferred = 0;
        // Every walker is gone (`&mut self`), so the grace period of the
        // queued pages is over: free them without waiting.
        self.deferred.drain(|pa| {
            deferred += 1;
            // SAFETY: unlinked and flushed before it was queued; no walker
            // is left.
            unsafe { self.mm.free_table(pa) };
        });
        self.table_pages.fetch_sub(deferred, Ordering::Relaxed);
        // SAFETY: the root is ours, unreachable once `self` is gone, and the
        // VMID was invalidated above.
        unsafe { self.free_unreachable_table(self.root) };
    }
}
