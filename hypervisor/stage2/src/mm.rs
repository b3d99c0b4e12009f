//! The two hardware-facing services a stage-2 table needs and that the user
//! injects: table-page allocation with phys->virt translation
//! ([`TableAlloc`]) and TLB invalidation ([`TlbInvalidate`]).
//!
//! Methods take `&self` (implementations use interior mutability) because
//! walkers run concurrently. `Stage2` calls them while it holds its writer
//! lock: an implementation must not call back into the same `Stage2`'s
//! writer operations (that would deadlock).

use hyp_core::addr::{Ipa, PhysAddr};

use crate::desc::{Descriptor, ENTRIES};

/// Allocation of zeroed 4 KiB table pages and access to their entries.
///
/// # Safety
///
/// The table code dereferences what this trait returns, so an implementation
/// must guarantee:
///
/// - `alloc_table` returns the address of a 4 KiB-aligned page below
///   `1 << 48`, zero-filled, used for nothing else and not returned again
///   until it has been passed to `free_table`;
/// - for such an address, `table_ptr` returns a pointer, aligned and valid
///   for reads and atomic writes, to the page's 512 descriptors, and keeps
///   that memory valid until `free_table` (and the grace below);
/// - after `free_table(pa)`, the page stays valid memory (not unmapped, not
///   reused) until every lockless reader (`Stage2::translate`,
///   `set_access_flag`, `test_and_clear_young`, `walk`) that began before
///   the call has returned. This holds trivially when lockless readers never
///   run concurrently with writers that free tables (`unmap`); otherwise the
///   implementation defers the reuse past a grace period (RCU).
pub unsafe trait TableAlloc {
    /// A zeroed 4 KiB table page, or `None` when memory is exhausted.
    fn alloc_table(&self) -> Option<PhysAddr>;

    /// Gives a table page back.
    ///
    /// # Safety
    ///
    /// `pa` came from [`TableAlloc::alloc_table`] of this allocator, was not
    /// freed since, and no walker can reach it any more (no descriptor points
    /// to it and the TLBs were invalidated after it was unlinked).
    unsafe fn free_table(&self, pa: PhysAddr);

    /// Phys -> virt: where the 512 entries of table page `pa` can be accessed.
    fn table_ptr(&self, pa: PhysAddr) -> *const Descriptor;
}

/// TLB maintenance for the VMID of one stage-2 table. Implementations
/// include the barriers (DSB ISH before and after, as the architecture
/// requires), so that invalidation is complete when the call returns.
pub trait TlbInvalidate {
    /// Invalidates stage-2 entries for `ipa` whose leaf is at `level`
    /// (`TLBI IPAS2E1IS`, with `level` as the TTL hint).
    fn invalidate_ipa(&self, ipa: Ipa, level: u8);

    /// Invalidates everything cached for the VMID, including combined
    /// stage-1+2 entries and walk caches (`TLBI VMALLS12E1IS`, or
    /// `VMALLE1IS` after `IPAS2E1IS`).
    fn invalidate_vmid(&self);
}

// SAFETY: every method forwards to `A`, which upholds the contract.
unsafe impl<A: TableAlloc + ?Sized> TableAlloc for &A {
    fn alloc_table(&self) -> Option<PhysAddr> {
        (**self).alloc_table()
    }

    unsafe fn free_table(&self, pa: PhysAddr) {
        // SAFETY: the caller's guarantees are those `A::free_table` needs.
        unsafe { (**self).free_table(pa) }
    }

    fn table_ptr(&self, pa: PhysAddr) -> *const Descriptor {
        (**self).table_ptr(pa)
    }
}

impl<T: TlbInvalidate + ?Sized> TlbInvalidate for &T {
    fn invalidate_ipa(&self, ipa: Ipa, level: u8) {
        (**self).invalidate_ipa(ipa, level);
    }

    fn invalidate_vmid(&self) {
        (**self).invalidate_vmid();
    }
}

/// The entries of table page `pa`.
///
/// # Safety
///
/// `pa` came from `mm.alloc_table()`, and either it is not freed yet or the
/// caller is a lockless reader covered by the grace of the [`TableAlloc`]
/// contract; the returned reference must not outlive that.
pub(crate) unsafe fn table_entries<M: TableAlloc + ?Sized>(
    mm: &M,
    pa: PhysAddr,
) -> &[Descriptor; ENTRIES] {
    // SAFETY: by the `TableAlloc` contract `table_ptr` points to the 512
    // aligned descriptors of the live page `pa` (caller's guarantee);
    // `Descriptor` is an atomic, so a shared reference permits the
    // concurrent accesses of other walkers and of the hardware.
    unsafe { &*mm.table_ptr(pa).cast::<[Descriptor; ENTRIES]>() }
}
