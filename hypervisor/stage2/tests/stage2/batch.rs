//! TLB batching with pending frees (`unmap_batched`, `TlbBatch`, deferred
//! table freeing), and the checking mode that turns a wrong order into a
//! panic.

use std::mem::ManuallyDrop;
use std::sync::Mutex;
use std::vec::Vec;

use hyp_core::addr::{Ipa, PhysAddr};
use stage2::{MapError, MapFlags, MemType, Perms, UnmapStats};

use crate::common::{play_cpu, HostAlloc, RecordingTlb, BLOCKS, GIB1, KIB4, MIB2, PAGES};
use crate::{new_s2, S2};

fn map(s2: &S2<'_>, ipa: u64, pa: u64, size: u64, flags: MapFlags) -> Result<(), MapError> {
    s2.map(
        Ipa(ipa),
        PhysAddr(pa),
        size,
        Perms::RW,
        MemType::Normal,
        flags,
    )
}

/// An IPA under the second level-0 entry (512 GiB).
const OTHER_L0: u64 = 1 << 39;

/// Runs `f` as CPU `cpu` of the test's RCU domain (this thread is CPU 0).
fn as_cpu(cpu: usize, f: impl FnOnce()) {
    play_cpu(cpu);
    f();
    play_cpu(0);
}

#[test]
fn unmap_batched_releases_frames_after_the_flush_and_tables_after_grace() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, false);
    let s2 = new_s2(&alloc, &tlb);
    let rcu = s2.rcu();
    // CPU 1 is online (a walker may hold references): grace periods wait
    // for its next quiescent state.
    as_cpu(1, || rcu.online());
    let pages = 0x4000_0000;
    let block = 0x4020_0000;
    map(&s2, pages, 0x10_0000, 4 * KIB4, PAGES).unwrap();
    map(&s2, block, 0x20_0000, MIB2, BLOCKS).unwrap();
    let tables = s2.table_pages();
    assert_eq!((tables, alloc.live() as u64), (4, 4));
    // Each release records how many flushes had been done by then.
    let released = Mutex::new(Vec::new());
    let mut release = |pa: PhysAddr, size| {
        let flushes = tlb.counts().1;
        released.lock().unwrap().push((pa.0, size, flushes));
    };
    let mut batch = s2.batch(&mut release);
    let before = tlb.counts().1;
    let stats = s2.unmap_batched(Ipa(pages), 4 * KIB4, &mut batch).unwrap();
    // The level-3 table went; the level-2 one still holds the block.
    assert_eq!(
        stats,
        UnmapStats {
            pages_unmapped: 4,
            tables_freed: 1
        }
    );
    let stats = s2.unmap_batched(Ipa(block), MIB2, &mut batch).unwrap();
    assert_eq!(
        stats,
        UnmapStats {
            pages_unmapped: 512,
            tables_freed: 2
        }
    );
    assert_eq!(s2.mapped_pages(), 0);
    assert_eq!(s2.translate(Ipa(pages)), None);
    assert!(
        released.lock().unwrap().is_empty(),
        "nothing before the flush"
    );
    assert_eq!(tlb.counts().1, before, "no invalidation yet");
    assert_eq!(alloc.live() as u64, tables, "tables not freed yet");
    batch.flush();
    assert_eq!(batch.stats().frames_released, 5);
    assert_eq!(batch.stats().tables_deferred, 3);
    drop(batch);
    let released = released.into_inner().unwrap();
    let expect: Vec<(u64, u64)> = [0x10_0000, 0x10_1000, 0x10_2000, 0x10_3000]
        .iter()
        .map(|&pa| (pa, KIB4))
        .chain([(0x20_0000, MIB2)])
        .collect();
    let got: Vec<(u64, u64)> = released.iter().map(|r| (r.0, r.1)).collect();
    assert_eq!(got, expect);
    assert!(released.iter().all(|r| r.2 > before), "after the flush");
    // Flushed but not freed: CPU 1 has not been quiescent.
    assert_eq!(s2.deferred_tables(), 3);
    assert_eq!(s2.reclaim_tables(false), 0);
    assert_eq!(alloc.live() as u64, tables);
    assert!(!s2.check_idle(), "tables pending");
    as_cpu(1, || rcu.quiescent());
    assert_eq!(s2.reclaim_tables(false), 3);
    assert_eq!((s2.table_pages(), alloc.live()), (1, 1));
    assert!(s2.check_idle());
    as_cpu(1, || rcu.offline());
}

#[test]
fn a_full_batch_flushes_before_it_releases() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, false);
    let s2 = new_s2(&alloc, &tlb);
    // More pages than a batch holds: it flushes by itself on the way.
    let n = 200;
    map(&s2, GIB1, 0x100_0000, n * KIB4, PAGES).unwrap();
    let released = Mutex::new(Vec::new());
    let mut release = |pa: PhysAddr, size| {
        // The page is gone from the table before its frame is released.
        let ipa = Ipa(GIB1 + (pa.0 - 0x100_0000));
        assert_eq!(s2.translate(ipa), None);
        released.lock().unwrap().push((pa.0, size, tlb.counts().1));
    };
    let mut batch = s2.batch(&mut release);
    let before = tlb.counts().1;
    s2.unmap_batched(Ipa(GIB1), n * KIB4, &mut batch).unwrap();
    let early = released.lock().unwrap().len();
    assert!(early > 0 && early < n as usize, "{early} released early");
    drop(batch);
    let released = released.into_inner().unwrap();
    assert_eq!(released.len(), n as usize, "the drop flushed the rest");
    assert!(released.iter().all(|r| r.1 == KIB4 && r.2 > before));
    s2.reclaim_tables(true);
    assert_eq!((s2.table_pages(), alloc.live()), (1, 1));
    assert!(s2.check_idle());
}

// ---- the checker ----

#[test]
#[should_panic(expected = "released before the TLB flush")]
fn checker_catches_a_frame_released_without_a_flush() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, false);
    let s2 = new_s2(&alloc, &tlb);
    map(&s2, GIB1, 0x10_0000, KIB4, PAGES).unwrap();
    s2.skip_flush_for_test();
    let mut release = |_, _| {};
    // Not dropped while unwinding: its drop would flush (and panic) again.
    let mut batch = ManuallyDrop::new(s2.batch(&mut release));
    s2.unmap_batched(Ipa(GIB1), KIB4, &mut batch).unwrap();
    batch.flush();
}

#[test]
#[should_panic(expected = "before a TLB flush after its unlink")]
fn checker_catches_a_table_queued_without_a_flush() {
    // Out of table pages, a map leaves empty tables behind.
    let alloc = HostAlloc::with_limit(3);
    let tlb = RecordingTlb::new(&alloc, false);
    let s2 = new_s2(&alloc, &tlb);
    assert_eq!(
        map(&s2, GIB1, 0x10_0000, KIB4, PAGES),
        Err(MapError::NoMemory)
    );
    assert_eq!((s2.mapped_pages(), s2.table_pages()), (0, 3));
    s2.skip_flush_for_test();
    // Removes them (no frame involved); the batch flushes at the end.
    let _ = s2.unmap(Ipa(GIB1), KIB4);
}

#[test]
#[should_panic(expected = "reuse of frame")]
fn checker_catches_a_map_of_a_pending_frame() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, false);
    let s2 = new_s2(&alloc, &tlb);
    map(&s2, GIB1, 0x10_0000, KIB4, PAGES).unwrap();
    let mut release = |_, _| {};
    let mut batch = s2.batch(&mut release);
    s2.unmap_batched(Ipa(GIB1), KIB4, &mut batch).unwrap();
    // The frame is still reachable through a stale TLB entry. (Under
    // another level-0 entry: the emptied tables above GIB1 stay locked
    // until the flush.)
    let _ = map(&s2, OTHER_L0, 0x10_0000, KIB4, PAGES);
}

#[test]
#[should_panic(expected = "reuse of frame")]
fn checker_catches_a_fault_on_a_pending_frame() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, false);
    let s2 = new_s2(&alloc, &tlb);
    map(&s2, GIB1, 0x20_0000, MIB2, BLOCKS).unwrap();
    assert_eq!(s2.translate(Ipa(GIB1)).map(|t| t.level), Some(2));
    let mut release = |_, _| {};
    let mut batch = s2.batch(&mut release);
    s2.unmap_batched(Ipa(GIB1), MIB2, &mut batch).unwrap();
    // A page inside the pending 2 MiB frame, under another level-0 entry.
    let frame = PhysAddr(0x20_0000 + 7 * KIB4);
    let _ = s2.fault_install(Ipa(OTHER_L0), frame, Perms::RW, MemType::Normal, true);
}

#[test]
#[should_panic(expected = "reuse of frame")]
fn checker_catches_a_migration_to_a_pending_frame() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, false);
    let s2 = new_s2(&alloc, &tlb);
    map(&s2, GIB1, 0x10_0000, 2 * KIB4, PAGES).unwrap();
    let mut release = |_, _| {};
    let mut batch = s2.batch(&mut release);
    s2.unmap_batched(Ipa(GIB1), KIB4, &mut batch).unwrap();
    let _ = s2.migrate_page(Ipa(GIB1 + KIB4), PhysAddr(0x10_0000), &mut batch, |_, _| {});
}

/// A map over a live page replaces it with break-before-make; the new
/// output address must not be a frame pending a flush either.
#[test]
#[should_panic(expected = "reuse of frame")]
fn checker_catches_a_remap_to_a_pending_frame() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, false);
    let s2 = new_s2(&alloc, &tlb);
    map(&s2, GIB1, 0x10_0000, KIB4, PAGES).unwrap();
    map(&s2, 2 * GIB1, 0x20_0000, KIB4, PAGES).unwrap();
    let mut release = |_, _| {};
    let mut batch = s2.batch(&mut release);
    s2.unmap_batched(Ipa(GIB1), KIB4, &mut batch).unwrap();
    let _ = map(&s2, 2 * GIB1, 0x10_0000, KIB4, PAGES);
}

/// Two IPAs may map the same frame (stage 2 allows aliases, and `map`
/// accepts them); unmapping both leaves the frame pending twice.
#[test]
fn checker_accepts_an_aliased_frame_unmapped_twice() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, false);
    let s2 = new_s2(&alloc, &tlb);
    map(&s2, GIB1, 0x10_0000, KIB4, PAGES).unwrap();
    map(&s2, 2 * GIB1, 0x10_0000, KIB4, PAGES).unwrap();
    let released = Mutex::new(Vec::new());
    let mut release = |pa: PhysAddr, size| released.lock().unwrap().push((pa.0, size));
    // Not dropped while unwinding: its drop would flush (and panic) again.
    let mut batch = ManuallyDrop::new(s2.batch(&mut release));
    s2.unmap_batched(Ipa(GIB1), KIB4, &mut batch).unwrap();
    s2.unmap_batched(Ipa(2 * GIB1), KIB4, &mut batch).unwrap();
    batch.flush();
    ManuallyDrop::into_inner(batch);
    assert_eq!(released.into_inner().unwrap().len(), 2);
    assert!(s2.check_idle());
}

#[test]
fn checker_is_silent_on_the_right_order() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, false);
    let s2 = new_s2(&alloc, &tlb);
    let released = Mutex::new(Vec::new());
    let mut release = |pa: PhysAddr, size| released.lock().unwrap().push((pa.0, size));
    // The sequences of the tests above, with the flush where it belongs.
    map(&s2, GIB1, 0x10_0000, 2 * KIB4, PAGES).unwrap();
    let mut batch = s2.batch(&mut release);
    s2.unmap_batched(Ipa(GIB1), KIB4, &mut batch).unwrap();
    assert!(!s2.check_idle(), "the frame is pending");
    batch.flush();
    map(&s2, 2 * GIB1, 0x10_0000, KIB4, PAGES).unwrap();
    s2.unmap_batched(Ipa(2 * GIB1), KIB4, &mut batch).unwrap();
    batch.flush();
    let frame = PhysAddr(0x10_0000);
    let fault = s2.fault_install(Ipa(3 * GIB1), frame, Perms::RW, MemType::Normal, true);
    assert!(fault.is_ok());
    s2.unmap_batched(Ipa(3 * GIB1), KIB4, &mut batch).unwrap();
    batch.flush();
    let moved = s2.migrate_page(Ipa(GIB1 + KIB4), frame, &mut batch, |_, _| {});
    assert!(matches!(moved, Ok(stage2::MigrateOutcome::Moved { .. })));
    s2.unmap_batched(Ipa(0), 4 * GIB1, &mut batch).unwrap();
    drop(batch);
    assert_eq!(s2.reclaim_tables(true), 0, "no CPU online: freed at once");
    assert_eq!(
        (s2.mapped_pages(), s2.table_pages(), alloc.live()),
        (0, 1, 1)
    );
    assert!(s2.check_idle());
    let released = released.into_inner().unwrap();
    assert_eq!(
        released,
        [
            (0x10_0000, KIB4),
            (0x10_0000, KIB4),
            (0x10_0000, KIB4),
            (0x10_1000, KIB4),
            (0x10_0000, KIB4)
        ]
    );
}

/// Break-before-make across a batch: until the flush, an unmapped leaf is
/// locked, so a fault cannot install a new frame at its IPA while TLBs may
/// still translate it to the old one (found by the hostile guest suite).
#[test]
fn an_unmapped_leaf_cannot_be_refilled_before_the_flush() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, false);
    let s2 = new_s2(&alloc, &tlb);
    let ipa = 0x4000_0000;
    map(&s2, ipa, 0x10_0000, 2 * KIB4, PAGES).unwrap();
    let mut release = |_, _| {};
    let mut batch = s2.batch(&mut release);
    s2.unmap_leaves_batched(Ipa(ipa), 2 * KIB4, &mut batch)
        .unwrap();
    assert_eq!(s2.translate(Ipa(ipa)), None);
    assert_eq!(s2.leaf_view(Ipa(ipa)), Some(stage2::DescView::Locked));
    let refill = |s2: &S2<'_>| {
        s2.fault_install(
            Ipa(ipa),
            PhysAddr(0x30_0000),
            Perms::RW,
            MemType::Normal,
            true,
        )
    };
    assert_eq!(refill(&s2), Ok(stage2::FaultOutcome::Retry));
    batch.flush();
    assert_eq!(s2.leaf_view(Ipa(ipa)), Some(stage2::DescView::Invalid));
    assert_eq!(refill(&s2), Ok(stage2::FaultOutcome::Installed));
    assert_eq!(
        s2.translate(Ipa(ipa)).map(|t| t.pa),
        Some(PhysAddr(0x30_0000))
    );
}
