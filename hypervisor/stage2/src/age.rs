//! The Access-Flag harvester: which pages of an IPA range were accessed
//! since the last time their flag was cleared, as a bitmap.
//!
//! [`Stage2::harvest`] is a lockless reader (see [`crate::table`]): one walk
//! of the engine per batch of [`HARVEST_BATCH_PAGES`], with a quiescent
//! state between batches so that a long harvest never holds up a grace
//! period for more than one batch. A leaf is read and reported whole in
//! the batch that reaches it first (the next batch starts after it), so a
//! block larger than a batch is never half-reported. It takes no lock and
//! never allocates.
//!
//! - Bit `i` of the bitmap (word `i / 64`, bit `i % 64`) is page
//!   `ipa + i * 4 KiB`. Every word that covers part of the range is
//!   written; bits past the range in the last word are cleared.
//! - A block mapping reports every 4 KiB page it covers.
//! - `CLEAR` clears the flag with a compare-exchange loop, the same atomic
//!   read-modify-write the hardware walker uses to set it, so a concurrent
//!   hardware update or writer change is never lost or undone. With `MASK`
//!   the bitmap is also an input: only pages whose bit is set in it are
//!   cleared (a block only when all its pages in the range are); the output
//!   still reports every young page.
//! - `FLUSH` invalidates the TLB entries of the leaves it cleared (one
//!   flush at the end, the whole VMID when many), so that a translation
//!   cached with AF set cannot hide the next access.
//! - An entry locked by a writer is skipped: reported old and left alone.
//!   Its access flag is carried into the entry the writer publishes, so the
//!   next harvest sees it: nothing is lost.

use bitflags::bitflags;
use core::fmt;
use hyp_core::addr::{Ipa, PhysAddr, PAGE_SIZE};

use crate::batch::TlbBatch;
use crate::mm::{TableAlloc, TlbInvalidate};
use crate::table::{update_af, Stage2};
use crate::walk::{VisitCtx, Visitor, WalkFlags};

/// Pages walked between two quiescent states of a harvest (32 MiB).
pub const HARVEST_BATCH_PAGES: u64 = 8192;

bitflags! {
    /// Options of [`Stage2::harvest`] (the same bits as the hypercall's).
    #[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
    pub struct HarvestFlags: u32 {
        /// Clear the access flag of the young pages.
        const CLEAR = 1 << 0;
        /// With `CLEAR`: clear only the pages set in the input bitmap.
        const MASK = 1 << 1;
        /// Invalidate the TLB entries of the cleared pages.
        const FLUSH = 1 << 2;
    }
}

/// Where a harvest writes its bits: 64 pages per word. Implemented for
/// `[u64]`; the hypervisor implements it over guest memory.
pub trait Bitmap {
    /// Number of words.
    fn words(&self) -> usize;
    /// Word `i` (`i < words()`).
    fn load(&self, i: usize) -> u64;
    /// Sets word `i` (`i < words()`).
    fn store(&mut self, i: usize, value: u64);
}

impl Bitmap for [u64] {
    fn words(&self) -> usize {
        self.len()
    }

    fn load(&self, i: usize) -> u64 {
        self[i]
    }

    fn store(&mut self, i: usize, value: u64) {
        self[i] = value;
    }
}

/// Why a harvest was refused (nothing was read or changed).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum HarvestError {
    /// The IPA is not 4 KiB aligned.
    Unaligned(Ipa),
    /// `[ipa, ipa + npages * 4 KiB)` overflows or leaves the IPA space.
    OutOfRange {
        /// Start of the range.
        ipa: Ipa,
        /// Its length in pages.
        npages: u64,
    },
    /// The bitmap has fewer words than the range needs.
    BitmapTooSmall {
        /// Words needed.
        needed: u64,
        /// Words given.
        words: usize,
    },
    /// `MASK` or `FLUSH` without `CLEAR`.
    FlagsWithoutClear(HarvestFlags),
}

impl fmt::Display for HarvestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unaligned(ipa) => write!(f, "IPA {ipa} is not 4 KiB aligned"),
            Self::OutOfRange { ipa, npages } => {
                write!(f, "{npages} pages at IPA {ipa} leave the IPA space")
            }
            Self::BitmapTooSmall { needed, words } => {
                write!(f, "bitmap of {words} words, {needed} needed")
            }
            Self::FlagsWithoutClear(flags) => write!(f, "{flags:?} needs CLEAR"),
        }
    }
}

impl core::error::Error for HarvestError {}

/// The harvest visitor: accumulates one bitmap word at a time.
struct AgeVisitor<'b, 'f, 'a, 'r, B: Bitmap + ?Sized, M: TableAlloc, T: TlbInvalidate> {
    /// IPA of bit 0 and end of the harvested range.
    start: u64,
    end: u64,
    /// End of the last leaf reported (or found old): everything below it
    /// is done.
    covered_until: u64,
    flags: HarvestFlags,
    bitmap: &'b mut B,
    /// Index of the word being assembled, its bits so far, and (MASK) its
    /// input value.
    cur: usize,
    word: u64,
    mask: u64,
    young: u64,
    flush: Option<&'f mut TlbBatch<'a, 'r, M, T>>,
}

/// The spans of bitmap words that pages `[p0, p1)` touch: (word, bits).
fn word_spans(p0: u64, p1: u64) -> impl Iterator<Item = (usize, u64)> {
    let mut p = p0;
    core::iter::from_fn(move || {
        if p >= p1 {
            return None;
        }
        let (w, lo) = ((p / 64) as usize, p % 64);
        let hi = (p1 - (p - lo)).min(64);
        p += hi - lo;
        Some((w, (u64::MAX >> (64 - (hi - lo))) << lo))
    })
}

impl<B: Bitmap + ?Sized, M: TableAlloc, T: TlbInvalidate> AgeVisitor<'_, '_, '_, '_, B, M, T> {
    /// The input mask word `w` (`w >= cur`: not yet overwritten).
    fn input(&self, w: usize) -> u64 {
        if !self.flags.contains(HarvestFlags::MASK) {
            0
        } else if w == self.cur {
            self.mask
        } else {
            self.bitmap.load(w)
        }
    }

    /// Moves the word being assembled to `w` (`>= cur`), writing the
    /// current one and zeroing those in between.
    fn seek(&mut self, w: usize) {
        if w == self.cur {
            return;
        }
        self.bitmap.store(self.cur, self.word);
        for skipped in self.cur + 1..w {
            self.bitmap.store(skipped, 0);
        }
        self.mask = self.input(w);
        self.cur = w;
        self.word = 0;
    }

    /// Whether every page in `[p0, p1)` is set in the input mask.
    fn masked(&self, p0: u64, p1: u64) -> bool {
        word_spans(p0, p1).all(|(w, bits)| self.input(w) & bits == bits)
    }

    /// Sets bits `[p0, p1)`.
    fn set(&mut self, p0: u64, p1: u64) {
        for (w, bits) in word_spans(p0, p1) {
            self.seek(w);
            self.word |= bits;
        }
    }

    /// Writes the last word and zeroes the rest of the `npages` range.
    fn finish(&mut self, npages: u64) {
        self.bitmap.store(self.cur, self.word);
        for rest in self.cur + 1..npages.div_ceil(64) as usize {
            self.bitmap.store(rest, 0);
        }
    }

    /// Page index of `ipa` (inside the range).
    fn page(&self, ipa: u64) -> u64 {
        (ipa - self.start) / PAGE_SIZE
    }
}

impl<B: Bitmap + ?Sized, M: TableAlloc, T: TlbInvalidate> Visitor
    for AgeVisitor<'_, '_, '_, '_, B, M, T>
{
    type Error = core::convert::Infallible;

    fn visit(&mut self, ctx: &VisitCtx<'_>) -> Result<(), Self::Error> {
        let leaf_end = ctx.ipa.0 + ctx.size();
        // Leaves come in address order; one that ends inside what was
        // already reported is the child of a block split while we visited
        // it (the engine re-reads and descends): its pages were reported.
        if leaf_end <= self.covered_until {
            return Ok(());
        }
        let Some((_, attrs)) = ctx.view().leaf_parts() else {
            return Ok(());
        };
        // A leaf is reported whole, even past the current batch (a 1 GiB
        // block): the next batch starts after it, so a block is read and
        // cleared exactly once per harvest.
        self.covered_until = leaf_end;
        if !attrs.af() {
            return Ok(());
        }
        let (p0, p1) = (
            self.page(ctx.ipa.0.max(self.start)),
            self.page(leaf_end.min(self.end)),
        );
        if self.flags.contains(HarvestFlags::CLEAR)
            && (!self.flags.contains(HarvestFlags::MASK) || self.masked(p0, p1))
            && update_af(ctx.entry, ctx.old, ctx.level, false) == Some(true)
        {
            if let Some(batch) = self.flush.as_deref_mut() {
                batch.ipa_changed(ctx.ipa, ctx.level);
            }
        }
        self.set(p0, p1);
        self.young += p1 - p0;
        Ok(())
    }
}

impl<M: TableAlloc, T: TlbInvalidate> Stage2<'_, M, T> {
    /// Reports in `bitmap` which of the `npages` pages from `ipa` are young
    /// (access flag set), clearing the flags as `flags` say (see the
    /// [module documentation](crate::age)). Returns the number of young
    /// pages. Lockless: never takes the writer lock, never allocates;
    /// passes a quiescent state every [`HARVEST_BATCH_PAGES`], so it must
    /// not be called from inside a walk.
    pub fn harvest<B: Bitmap + ?Sized>(
        &self,
        ipa: Ipa,
        npages: u64,
        bitmap: &mut B,
        flags: HarvestFlags,
    ) -> Result<u64, HarvestError> {
        if !ipa.is_page_aligned() {
            return Err(HarvestError::Unaligned(ipa));
        }
        if flags.intersects(HarvestFlags::MASK | HarvestFlags::FLUSH)
            && !flags.contains(HarvestFlags::CLEAR)
        {
            return Err(HarvestError::FlagsWithoutClear(flags));
        }
        let in_range = npages
            .checked_mul(PAGE_SIZE)
            .and_then(|len| ipa.0.checked_add(len))
            .is_some_and(|end| end <= self.ipa_limit());
        if !in_range {
            return Err(HarvestError::OutOfRange { ipa, npages });
        }
        let needed = npages.div_ceil(64);
        if needed > bitmap.words() as u64 {
            return Err(HarvestError::BitmapTooSmall {
                needed,
                words: bitmap.words(),
            });
        }
        if npages == 0 {
            return Ok(0);
        }
        let mut release = |_: PhysAddr, _: u64| {};
        let mut batch = self.batch(&mut release);
        let end = ipa.0 + npages * PAGE_SIZE;
        let mut visitor = AgeVisitor {
            start: ipa.0,
            end,
            covered_until: ipa.0,
            flags,
            mask: if flags.contains(HarvestFlags::MASK) {
                bitmap.load(0)
            } else {
                0
            },
            bitmap,
            cur: 0,
            word: 0,
            young: 0,
            flush: flags.contains(HarvestFlags::FLUSH).then_some(&mut batch),
        };
        let mut at = ipa.0;
        while at < end {
            let batch_end = end.min(at + HARVEST_BATCH_PAGES * PAGE_SIZE);
            let Ok(()) = self.walk(Ipa(at), batch_end - at, WalkFlags::LEAF, &mut visitor);
            at = batch_end.max(visitor.covered_until);
            if at < end {
                self.rcu().quiescent();
            }
        }
        visitor.finish(npages);
        let young = visitor.young;
        batch.flush();
        Ok(young)
    }

    /// [`Stage2::harvest`] without clearing: which pages are young.
    pub fn test_young<B: Bitmap + ?Sized>(
        &self,
        ipa: Ipa,
        npages: u64,
        bitmap: &mut B,
    ) -> Result<u64, HarvestError> {
        self.harvest(ipa, npages, bitmap, HarvestFlags::empty())
    }

    /// [`Stage2::harvest`] with `CLEAR`: which pages were young, now old.
    pub fn test_clear_young<B: Bitmap + ?Sized>(
        &self,
        ipa: Ipa,
        npages: u64,
        bitmap: &mut B,
    ) -> Result<u64, HarvestError> {
        self.harvest(ipa, npages, bitmap, HarvestFlags::CLEAR)
    }

    /// Clears the access flag of the pages set in `mask` (look-around:
    /// the reclaimer decided on exactly these), reporting in `mask` which
    /// pages of the range were young.
    pub fn clear_young<B: Bitmap + ?Sized>(
        &self,
        ipa: Ipa,
        npages: u64,
        mask: &mut B,
    ) -> Result<u64, HarvestError> {
        self.harvest(ipa, npages, mask, HarvestFlags::CLEAR | HarvestFlags::MASK)
    }
}
