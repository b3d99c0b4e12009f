//! The two hardware-facing services a stage-2 table needs and that the user
//! injects: table-page allocation with phys->virt translation
//! ([`TableAlloc`]) and TLB invalidation ([`TlbInvalidate`]).
//!
//! Methods take `&self` (implementations use interior mutability) because
//! walkers run concurrently. `Stage2` may call them while it holds its
//! writer lock: an implementation must not call back into the same
//! `Stage2`'s writer operations (that would deadlock).

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
///   that memory valid until `free_table`;
/// - `free_table(pa)` may reuse the page at once: `Stage2` calls it only
///   after the page was unlinked, the TLBs were invalidated and an RCU
///   grace period elapsed (or for a page that was never published).
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

    /// Invalidates the VMID's stage-1 and combined stage-1+2 entries
    /// (`TLBI VMALLE1IS`), to complete a series of
    /// [`TlbInvalidate::invalidate_ipa`] calls. Defaults to
    /// [`TlbInvalidate::invalidate_vmid`], which covers it.
    fn invalidate_stage1(&self) {
        self.invalidate_vmid();
    }
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

    fn invalidate_stage1(&self) {
        (**self).invalidate_stage1();
    }
}

/// The entries of table page `pa`.
///
/// # Safety
///
/// `pa` came from `mm.alloc_table()` and is not freed yet, and the returned
/// reference does not outlive that: the caller holds the writer lock, or is
/// a lockless reader inside an RCU read-side section (`crate::rcu`), which
/// delays the free of any table it can reach.
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
