//! TLB batching with pending frees ([`TlbBatch`], Linux's `mmu_gather`).
//!
//! An unmap makes entries invalid at once but defers the TLB invalidation:
//! until it is done, a CPU may still translate through a stale TLB or
//! walk-cache entry. So whatever the batch unmapped stays **pending**:
//!
//! - a leaf that an unmap removed stays [`LOCKED`](crate::desc::LOCKED) (invalid, but not
//!   installable) until the flush has completed, and only then becomes
//!   plain invalid: otherwise a fault could install a new frame at the IPA
//!   while other CPUs still translate it to the old one — two live
//!   translations of one IPA, a break-before-make violation (found by the
//!   hostile guest suite: a harvester's bitmap written into the new frame
//!   while its CPU still read the old one);
//! - a frame that a leaf mapped goes back to its owner (the `release`
//!   callback) only after the flush has completed;
//! - a table page that was unlinked goes to the RCU deferred-free queue
//!   after the flush (so its grace period starts after the hardware can no
//!   longer reach it), and is freed when software walkers cannot either.
//!
//! The batch flushes when one of its fixed arrays is full, when
//! [`TlbBatch::flush`] is called, and when it is dropped, so nothing it
//! holds is ever lost. It never allocates.

use hyp_core::addr::{Ipa, PhysAddr};

use core::ptr::NonNull;

use crate::desc::{level_size, Descriptor};
use crate::mm::{TableAlloc, TlbInvalidate};
use crate::table::Stage2;

/// IPAs invalidated one by one; beyond this, the whole VMID is.
const IPA_SLOTS: usize = 32;
/// Frames pending per batch before it flushes by itself.
const FRAME_SLOTS: usize = 64;
/// Table pages pending per batch before it flushes by itself.
const TABLE_SLOTS: usize = 16;

/// What a batch did over its life.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Flushes that invalidated something.
    pub flushes: u64,
    /// Frames handed back to the owner after a flush.
    pub frames_released: u64,
    /// Table pages queued for freeing after a grace period.
    pub tables_deferred: u64,
}

/// A TLB-invalidation batch of one [`Stage2`]; see the module
/// documentation. Created by [`Stage2::batch`].
pub struct TlbBatch<'a, 'r, M: TableAlloc, T: TlbInvalidate> {
    s2: &'a Stage2<'r, M, T>,
    release: &'a mut dyn FnMut(PhysAddr, u64),
    ipas: [(Ipa, u8); IPA_SLOTS],
    n_ipas: usize,
    /// More IPAs than slots, or a table unlinked: invalidate the VMID.
    whole_vmid: bool,
    frames: [(PhysAddr, u64); FRAME_SLOTS],
    n_frames: usize,
    /// Leaves this batch broke to [`LOCKED`](crate::desc::LOCKED), made invalid after the flush.
    /// Valid pointers: a locked entry is not empty, so its table cannot be
    /// unlinked (and freed) while it is here.
    locked: [Option<NonNull<Descriptor>>; FRAME_SLOTS],
    n_locked: usize,
    tables: [PhysAddr; TABLE_SLOTS],
    n_tables: usize,
    stats: BatchStats,
}

impl<M: TableAlloc, T: TlbInvalidate> core::fmt::Debug for TlbBatch<'_, '_, M, T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("TlbBatch")
            .field("ipas", &self.n_ipas)
            .field("whole_vmid", &self.whole_vmid)
            .field("frames", &self.n_frames)
            .field("tables", &self.n_tables)
            .finish()
    }
}

impl<'a, 'r, M: TableAlloc, T: TlbInvalidate> TlbBatch<'a, 'r, M, T> {
    pub(crate) fn new(s2: &'a Stage2<'r, M, T>, release: &'a mut dyn FnMut(PhysAddr, u64)) -> Self {
        Self {
            s2,
            release,
            ipas: [(Ipa(0), 0); IPA_SLOTS],
            n_ipas: 0,
            whole_vmid: false,
            frames: [(PhysAddr(0), 0); FRAME_SLOTS],
            n_frames: 0,
            locked: [None; FRAME_SLOTS],
            n_locked: 0,
            tables: [PhysAddr(0); TABLE_SLOTS],
            n_tables: 0,
            stats: BatchStats::default(),
        }
    }

    /// What the batch did so far.
    pub fn stats(&self) -> BatchStats {
        self.stats
    }

    /// Whether the batch holds nothing to invalidate or free.
    pub fn is_empty(&self) -> bool {
        self.n_ipas == 0
            && !self.whole_vmid
            && self.n_frames == 0
            && self.n_tables == 0
            && self.n_locked == 0
    }

    /// Whether `entry` is one this batch locked and will make invalid at
    /// its flush (so a table holding only such entries counts as empty).
    pub(crate) fn holds_lock(&self, entry: &Descriptor) -> bool {
        self.locked[..self.n_locked]
            .iter()
            .any(|e| *e == Some(NonNull::from(entry)))
    }

    /// `entry` was locked by the caller (the parent of a table it
    /// unlinked): make it invalid after the flush.
    pub(crate) fn entry_locked(&mut self, entry: &Descriptor) {
        if self.n_locked == FRAME_SLOTS {
            self.flush();
        }
        self.locked[self.n_locked] = Some(NonNull::from(entry));
        self.n_locked += 1;
    }

    /// The leaf `entry` at `ipa`/`level`, which mapped `pa`, was broken to
    /// [`LOCKED`](crate::desc::LOCKED) by the caller: invalidate it, make it plain invalid after
    /// the flush, then release the frame(s).
    pub(crate) fn leaf_locked(&mut self, entry: &Descriptor, ipa: Ipa, level: u8, pa: PhysAddr) {
        if self.n_frames == FRAME_SLOTS {
            self.flush();
        }
        self.entry_locked(entry);
        self.leaf_unmapped(ipa, level, pa);
    }

    /// The translation of `ipa` (a leaf at `level`) changed in a way that
    /// needs no break-before-make (access flag cleared): invalidate it.
    pub(crate) fn ipa_changed(&mut self, ipa: Ipa, level: u8) {
        if self.n_ipas < IPA_SLOTS {
            self.ipas[self.n_ipas] = (ipa, level);
            self.n_ipas += 1;
        } else {
            self.whole_vmid = true;
        }
    }

    /// The leaf at `ipa`/`level` mapping `pa` was made invalid: invalidate
    /// it, and release the frame(s) only after that.
    pub(crate) fn leaf_unmapped(&mut self, ipa: Ipa, level: u8, pa: PhysAddr) {
        if self.n_frames == FRAME_SLOTS {
            self.flush();
        }
        let size = level_size(level);
        #[cfg(feature = "check")]
        self.s2.checker().frame_unmapped(pa, size);
        self.ipa_changed(ipa, level);
        self.frames[self.n_frames] = (pa, size);
        self.n_frames += 1;
    }

    /// Table page `pa` was unlinked: invalidate the VMID (walk caches),
    /// then free it after a grace period.
    pub(crate) fn table_unlinked(&mut self, pa: PhysAddr) {
        if self.n_tables == TABLE_SLOTS {
            self.flush();
        }
        #[cfg(feature = "check")]
        self.s2.checker().table_unlinked(pa);
        self.whole_vmid = true;
        self.tables[self.n_tables] = pa;
        self.n_tables += 1;
    }

    /// Invalidates what was recorded, then releases the pending frames and
    /// queues the pending table pages behind a grace period.
    pub fn flush(&mut self) {
        if self.is_empty() {
            return;
        }
        self.s2
            .flush_tlb(&self.ipas[..self.n_ipas], self.whole_vmid);
        self.stats.flushes += 1;
        self.n_ipas = 0;
        self.whole_vmid = false;
        // The old translations are gone from every TLB: the locked leaves
        // may now be filled again.
        for entry in self.locked[..core::mem::take(&mut self.n_locked)]
            .iter()
            .flatten()
        {
            // SAFETY: a pointer into a live table (see `locked`); only this
            // batch writes an entry it locked.
            unsafe { entry.as_ref() }.store(0);
        }
        // Empty the arrays before handing anything out, so that a release
        // callback that panics cannot make `Drop` hand it out again.
        let (frames, n_frames) = (self.frames, core::mem::take(&mut self.n_frames));
        let (tables, n_tables) = (self.tables, core::mem::take(&mut self.n_tables));
        self.stats.frames_released += n_frames as u64;
        self.stats.tables_deferred += n_tables as u64;
        for &(pa, size) in &frames[..n_frames] {
            #[cfg(feature = "check")]
            self.s2.checker().frame_released(pa, size);
            (self.release)(pa, size);
        }
        for &pa in &tables[..n_tables] {
            self.s2.defer_free_table(pa);
        }
        if n_tables > 0 {
            // Tables come only from writer-lock holders, for whom passing
            // a quiescent state here is safe (see `defer_free_table`).
            self.s2.reclaim_tables(false);
        }
    }
}

impl<M: TableAlloc, T: TlbInvalidate> Drop for TlbBatch<'_, '_, M, T> {
    fn drop(&mut self) {
        self.flush();
    }
}
