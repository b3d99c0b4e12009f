//! Pinning a leaf while the hypervisor accesses the guest memory it maps
//! ([`Stage2::with_page_pinned`]).
//!
//! When the hypervisor reads or writes guest memory through the frame
//! that stage 2 maps (a hypercall's bitmap, a buffer of an emulated
//! device), that frame must neither be freed (unmap) nor moved (migration)
//! until the access is over. A pin takes the leaf with the writers' own
//! [`LOCKED`] marker, by compare-exchange, for the duration of the access,
//! and then stores the exact value it replaced (`Release`). Every writer
//! already treats a locked entry as busy, so while a leaf is pinned:
//!
//! - `unmap` (its break fails) and `map` / `protect` / a block split (they
//!   meet the lock) report [`MapError::Busy`] to their locked walk, which
//!   restarts until the pin is gone;
//! - `migrate_page` cannot lock the entry: `NotMoved`;
//! - `fault_install` on the page returns `Retry`;
//! - a harvest skips the entry (reported old); its access flag is in the
//!   value the pin restores, so the next harvest sees it.
//!
//! **No TLB invalidation.** Break-before-make invalidates so that no CPU
//! uses an old and a new translation at once; a pin changes no output
//! address (the checker sees valid -> invalid -> the same valid value).
//! A CPU that still caches the translation keeps using the same pinned
//! frame; one that walks meets an invalid entry and takes a stage-2 fault,
//! which the fault path retries.
//!
//! **Lifetime of the entry.** The pinned descriptor lives in a table page
//! that stays linked while the entry is locked: a table with a locked entry
//! is never empty, the seal of the table-removal protocol fails on it, and
//! its ancestors point to it, so no writer unlinks any of them; teardown
//! needs `&mut Stage2`. So the closure runs *outside* the lockless walk
//! that found the leaf (its RCU read-side section is over): it may pass
//! quiescent states and call other operations of the table.
//!
//! Pins must be short (a copy of a page): a locked writer restarts a walk
//! that meets one a bounded number of times before it reports
//! [`MapError::Busy`] to its caller.

use core::fmt;

use hyp_core::addr::{Ipa, PhysAddr, PAGE_SIZE};

use crate::desc::{DescView, Descriptor};
use crate::mm::{TableAlloc, TlbInvalidate};
use crate::table::Stage2;
use crate::walk::VisitCtx;
#[cfg(doc)]
use crate::{desc::LOCKED, error::MapError};

/// Why [`Stage2::with_page_pinned`] did not pin (the closure was not
/// called).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum PinError {
    /// No valid leaf maps the IPA (as given): map its page (demand fault)
    /// and retry.
    NotMapped(Ipa),
    /// The entry that ends the walk to the IPA is locked by a writer
    /// (break-before-make, migration, table removal) or by another pin, or
    /// changed under the pin's compare-exchange by more than its access
    /// flag; retry.
    Busy {
        /// Start of the range the entry covers.
        ipa: Ipa,
        /// The entry's level.
        level: u8,
    },
    /// The IPA is outside the IPA space.
    OutOfRange(Ipa),
}

impl fmt::Display for PinError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotMapped(ipa) => write!(f, "IPA {ipa} is not mapped"),
            Self::Busy { ipa, level } => {
                write!(
                    f,
                    "level-{level} entry at IPA {ipa} is busy (concurrent writer or pin)"
                )
            }
            Self::OutOfRange(ipa) => write!(f, "IPA {ipa} is outside the IPA space"),
        }
    }
}

impl core::error::Error for PinError {}

/// A leaf locked by a pin, as found by the walk.
struct Pinned {
    /// The locked entry (see the module documentation for why it outlives
    /// the walk).
    entry: *const Descriptor,
    /// The value it held when locked, restored at unpin.
    value: u64,
    /// The 4 KiB frame of the pinned IPA.
    page: PhysAddr,
}

/// Restores a pinned entry when dropped, also while unwinding from a
/// panic in the pin's closure.
struct PinGuard<'e> {
    entry: &'e Descriptor,
    value: u64,
}

impl Drop for PinGuard<'_> {
    fn drop(&mut self) {
        // Only the pin's owner writes a locked entry (every other writer
        // compare-exchanges from a value it read, never from `LOCKED`), so
        // a plain `Release` store puts back exactly what was locked.
        self.entry.store(self.value);
    }
}

impl<M: TableAlloc, T: TlbInvalidate> Stage2<'_, M, T> {
    /// Pins the leaf that maps `ipa` and calls `f` with the physical
    /// address of the 4 KiB page containing `ipa` (page aligned; for a
    /// block, the page inside it), so that the hypervisor can access that
    /// frame knowing it is neither unmapped, freed nor migrated until `f`
    /// returns. Then restores the leaf exactly as it was (access flag
    /// included), also when `f` panics. See the
    /// [module documentation](crate::pin) for what waits for a pin.
    ///
    /// Lockless (a read-side walk to the leaf, then a compare-exchange to
    /// [`LOCKED`], retried while only the access flag changes under it);
    /// no TLB invalidation. `f` runs outside the walk: it may pass
    /// quiescent states and use the table, but must not change the mapping
    /// of the pinned leaf (a writer that needs it waits for this very pin
    /// and, after a bounded number of restarts, gives up with
    /// [`MapError::Busy`]), and a second pin of the same leaf from `f` is
    /// [`PinError::Busy`]. The whole block is pinned when a block maps
    /// `ipa`.
    ///
    /// Not from inside a walk of this table (like the other lockless
    /// writers, the calling CPU must be online in the table's RCU domain).
    pub fn with_page_pinned<R>(
        &self,
        ipa: Ipa,
        f: impl FnOnce(PhysAddr) -> R,
    ) -> Result<R, PinError> {
        if ipa.0 >= self.ipa_limit() {
            return Err(PinError::OutOfRange(ipa));
        }
        // After a successful lock the engine re-reads the entry, finds it
        // locked (not a table) and ends the walk: the closure is not
        // called again, so a pin is never lost.
        let pinned = self
            .leaf_at(ipa, |ctx| self.pin_leaf(ctx, ipa))
            .ok_or(PinError::OutOfRange(ipa))??;
        // SAFETY: `entry` points into a table page that the walk reached;
        // the entry now holds our lock, and a table with a locked entry is
        // never unlinked (its seal fails, and its ancestors point to it),
        // nor freed, while `&self` keeps teardown away: the descriptor
        // stays valid until the guard below restores it, within the borrow
        // of `self`.
        let entry = unsafe { &*pinned.entry };
        let _guard = PinGuard {
            entry,
            value: pinned.value,
        };
        Ok(f(pinned.page))
    }

    /// The visit of [`Stage2::with_page_pinned`]: locks the valid leaf in
    /// `ctx`, which covers `ipa`.
    fn pin_leaf(&self, ctx: &VisitCtx<'_>, ipa: Ipa) -> Result<Pinned, PinError> {
        let busy = PinError::Busy {
            ipa: ctx.ipa,
            level: ctx.level,
        };
        let pa = match ctx.view() {
            DescView::Invalid => return Err(PinError::NotMapped(ipa)),
            DescView::Locked | DescView::Table { .. } => return Err(busy),
            DescView::Block { pa, .. } | DescView::Page { pa, .. } => pa,
        };
        // Retries while only the access flag moves (hardware AF, a
        // harvester): the output address read above stays right.
        match self.lock_entry(ctx.entry, ctx.old, ctx.ipa, ctx.level) {
            Ok(value) => Ok(Pinned {
                entry: ctx.entry,
                value,
                page: pa.add(ipa.align_down(PAGE_SIZE).offset_from(ctx.ipa)),
            }),
            Err(_) => match ctx.entry.view(ctx.level) {
                DescView::Invalid => Err(PinError::NotMapped(ipa)),
                _ => Err(busy),
            },
        }
    }
}
