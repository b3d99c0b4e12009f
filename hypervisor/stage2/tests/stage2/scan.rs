//! The leaf-only unmap (`unmap_leaves_batched`) and the lockless scan for
//! empty tables (`reclaim_empty_tables`): what is removed, what is kept,
//! segments, errors, and faults racing the scan.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Barrier, Mutex};
use std::vec::Vec;

use hyp_core::addr::{Ipa, PhysAddr};
use stage2::scan::{SCAN_CANDIDATES, SCAN_TABLES};
use stage2::{FaultOutcome, MapError, MemType, Perms, UnmapStats};

use crate::common::{play_cpu, HostAlloc, RecordingTlb, BLOCKS, GIB1, KIB4, MIB2, PAGES};
use crate::{new_s2, S2};

fn map_pages(s2: &S2<'_>, ipa: u64, size: u64) {
    s2.map(
        Ipa(ipa),
        PhysAddr(ipa),
        size,
        Perms::RW,
        MemType::Normal,
        PAGES,
    )
    .unwrap();
}

/// Leaf-unmaps `[ipa, ipa + size)` and flushes.
fn unmap_leaves(s2: &S2<'_>, ipa: u64, size: u64) -> UnmapStats {
    let mut release = |_, _| {};
    let mut batch = s2.batch(&mut release);
    s2.unmap_leaves_batched(Ipa(ipa), size, &mut batch).unwrap()
}

/// Scans `[ipa, ipa + size)`, flushes and frees what it unlinked.
fn reclaim(s2: &S2<'_>, ipa: u64, size: u64) -> u64 {
    let mut release = |_, _| {};
    let mut batch = s2.batch(&mut release);
    let removed = s2.reclaim_empty_tables(Ipa(ipa), size, &mut batch).unwrap();
    batch.flush();
    drop(batch);
    s2.reclaim_tables(true);
    removed
}

#[test]
fn leaf_unmap_keeps_tables_and_the_scan_removes_them() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, false);
    let s2 = new_s2(&alloc, &tlb);
    let rcu = s2.rcu();
    // 512 single pages in a 2 MiB-aligned region: one level-3 table.
    let base = 0x4020_0000;
    for page in 0..512 {
        map_pages(&s2, base + page * KIB4, KIB4);
    }
    assert_eq!((s2.mapped_pages(), s2.table_pages()), (512, 4));
    let released = Mutex::new(Vec::new());
    let mut release = |pa: PhysAddr, size| released.lock().unwrap().push((pa.0, size));
    let mut batch = s2.batch(&mut release);
    let stats = s2
        .unmap_leaves_batched(Ipa(base), MIB2, &mut batch)
        .unwrap();
    assert_eq!(
        stats,
        UnmapStats {
            pages_unmapped: 512,
            tables_freed: 0
        }
    );
    assert_eq!((s2.mapped_pages(), s2.table_pages()), (0, 4));
    assert_eq!(s2.translate(Ipa(base)), None);
    // More frames than a batch holds: it flushed some on its own.
    assert!(
        released.lock().unwrap().len() < 512,
        "some wait for the flush"
    );
    batch.flush();
    assert_eq!(released.lock().unwrap().len(), 512);
    // A CPU is online: the unlinked tables wait for its quiescent state.
    play_cpu(1);
    rcu.online();
    play_cpu(0);
    let removed = s2
        .reclaim_empty_tables(Ipa(base), MIB2, &mut batch)
        .unwrap();
    // The level-3 table, then its parents, emptied one after the other.
    assert_eq!(removed, 3);
    assert_eq!(s2.table_pages(), 4, "pending until flush and grace");
    batch.flush();
    assert_eq!(s2.deferred_tables(), 3);
    assert_eq!(s2.reclaim_tables(false), 0, "CPU 1 holds the grace period");
    play_cpu(1);
    rcu.quiescent();
    rcu.offline();
    play_cpu(0);
    s2.reclaim_tables(true);
    assert_eq!(s2.table_pages(), 4 - removed);
    assert_eq!((s2.table_pages(), alloc.live()), (1, 1));
    drop(batch);
    assert!(s2.check_idle());
    assert_eq!(reclaim(&s2, 0, 1 << 40), 0, "nothing left but the root");
    // The root stays usable.
    map_pages(&s2, base, KIB4);
    assert_eq!(s2.table_pages(), 4);
}

/// The same layout with the ordinary unmap: tables go with the leaves.
#[test]
fn unmap_batched_still_removes_the_tables_it_empties() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, false);
    let s2 = new_s2(&alloc, &tlb);
    let base = 0x4020_0000;
    map_pages(&s2, base, MIB2);
    let mut release = |_, _| {};
    let mut batch = s2.batch(&mut release);
    let stats = s2.unmap_batched(Ipa(base), MIB2, &mut batch).unwrap();
    assert_eq!(
        stats,
        UnmapStats {
            pages_unmapped: 512,
            tables_freed: 3
        }
    );
    drop(batch);
    assert_eq!(s2.table_pages(), 1);
}

#[test]
fn leaf_unmap_splits_blocks_at_the_edges() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, false);
    let s2 = new_s2(&alloc, &tlb);
    let block = 0x4020_0000;
    s2.map(
        Ipa(block),
        PhysAddr(0x9000_0000),
        MIB2,
        Perms::RW,
        MemType::Normal,
        BLOCKS,
    )
    .unwrap();
    let stats = unmap_leaves(&s2, block + KIB4, 2 * KIB4);
    assert_eq!((stats.pages_unmapped, stats.tables_freed), (2, 0));
    assert_eq!(s2.mapped_pages(), 510);
    assert_eq!(s2.translate(Ipa(block)).map(|t| t.level), Some(3));
    assert_eq!(s2.translate(Ipa(block + KIB4)), None);
    // The rest unmapped leaf by leaf: the split table stays until a scan.
    assert_eq!(unmap_leaves(&s2, block, MIB2).pages_unmapped, 510);
    assert_eq!(s2.table_pages(), 4);
    assert_eq!(reclaim(&s2, block, MIB2), 3);
    assert_eq!(s2.table_pages(), 1);
}

/// A table with a valid entry, one with an entry locked (a pin), one with
/// a block: kept; only the empty one goes, and its parent stays because
/// it still links the others.
#[test]
fn the_scan_keeps_tables_in_use() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, false);
    let s2 = new_s2(&alloc, &tlb);
    let base = GIB1;
    let (valid, pinned, empty) = (base, base + MIB2, base + 2 * MIB2);
    map_pages(&s2, valid, 2 * KIB4);
    map_pages(&s2, pinned + 5 * KIB4, KIB4);
    map_pages(&s2, empty, 3 * KIB4);
    unmap_leaves(&s2, valid + KIB4, KIB4);
    unmap_leaves(&s2, empty, 3 * KIB4);
    assert_eq!(s2.table_pages(), 6);
    let mut release = |_, _| {};
    let mut batch = s2.batch(&mut release);
    let removed = s2
        .with_page_pinned(Ipa(pinned + 5 * KIB4), |_| {
            s2.reclaim_empty_tables(Ipa(base), 4 * MIB2, &mut batch)
                .unwrap()
        })
        .unwrap();
    assert_eq!(removed, 1, "only the empty table");
    drop(batch);
    s2.reclaim_tables(true);
    assert_eq!(s2.table_pages(), 5);
    assert!(s2.translate(Ipa(valid)).is_some());
    assert!(s2.translate(Ipa(pinned + 5 * KIB4)).is_some());
    // A level-2 table holding a block is not empty either.
    s2.map(
        Ipa(2 * GIB1),
        PhysAddr(0x9000_0000),
        MIB2,
        Perms::RW,
        MemType::Normal,
        BLOCKS,
    )
    .unwrap();
    assert_eq!(reclaim(&s2, 0, 1 << 40), 0);
    assert_eq!(s2.table_pages(), 6);
    // Once the last leaves go, everything but the root does.
    unmap_leaves(&s2, base, GIB1);
    unmap_leaves(&s2, 2 * GIB1, MIB2);
    assert_eq!(reclaim(&s2, 0, 1 << 40), 5);
    assert_eq!((s2.table_pages(), alloc.live()), (1, 1));
    assert!(s2.check_idle());
}

#[test]
fn the_scan_cascades_across_levels_and_spares_the_root() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, false);
    let s2 = new_s2(&alloc, &tlb);
    // Level-3 tables under two level-2 tables under one level-1 table,
    // and one more chain under another level-0 entry.
    let pages = [
        GIB1,
        GIB1 + 3 * MIB2,
        GIB1 + 100 * MIB2,
        2 * GIB1 + MIB2,
        2 * GIB1 + 511 * MIB2,
        0x80_0000_0000,
    ];
    for &ipa in &pages {
        map_pages(&s2, ipa, KIB4);
    }
    let tables = s2.table_pages();
    assert_eq!(tables, 1 + 1 + 2 + 5 + 3);
    for &ipa in &pages {
        unmap_leaves(&s2, ipa, KIB4);
    }
    assert_eq!(s2.table_pages(), tables);
    assert_eq!(reclaim(&s2, 0, 1 << 40), tables - 1);
    assert_eq!((s2.table_pages(), alloc.live()), (1, 1));
    let (allocs, frees) = alloc.counts();
    assert_eq!(allocs, frees + 1);
}

#[test]
fn the_scan_only_checks_tables_its_range_touches() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, false);
    let s2 = new_s2(&alloc, &tlb);
    let (a, b) = (GIB1, GIB1 + 8 * MIB2);
    map_pages(&s2, a, KIB4);
    map_pages(&s2, b, KIB4);
    unmap_leaves(&s2, a, KIB4);
    unmap_leaves(&s2, b, KIB4);
    // The range touches `a`'s table only; the parent still links `b`'s.
    assert_eq!(reclaim(&s2, a + MIB2 - KIB4, KIB4), 1);
    assert_eq!(s2.table_pages(), 4);
    assert_eq!(reclaim(&s2, a, MIB2), 0);
    // `b`'s goes, and with it the parents it was the last child of.
    assert_eq!(reclaim(&s2, b, 8 * MIB2), 3);
    assert_eq!(s2.table_pages(), 1);
}

/// More candidates and more tables than one segment holds: the scan
/// resumes after each segment and misses nothing.
#[test]
fn the_scan_goes_in_segments() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, false);
    let s2 = new_s2(&alloc, &tlb);
    let all_empty = (2 * SCAN_CANDIDATES + 3) as u64;
    let slots = all_empty + (3 * SCAN_TABLES + 5) as u64;
    let base = GIB1;
    for slot in 0..slots {
        map_pages(&s2, base + slot * MIB2 + 7 * KIB4, KIB4);
    }
    let tables = s2.table_pages();
    assert_eq!(tables, 3 + slots);
    // First a run of empty tables (segments end on a full candidate
    // array), then mostly tables in use (they end on the table budget).
    let empty = |slot| slot < all_empty || slot % 4 == 0;
    let mut kept = 0;
    for slot in 0..slots {
        if empty(slot) {
            unmap_leaves(&s2, base + slot * MIB2, MIB2);
        } else {
            kept += 1;
        }
    }
    assert_eq!(reclaim(&s2, base, slots * MIB2), slots - kept);
    assert_eq!(s2.table_pages(), 3 + kept);
    for slot in 0..slots {
        let t = s2.translate(Ipa(base + slot * MIB2 + 7 * KIB4));
        assert_eq!(t.is_some(), !empty(slot), "slot {slot}");
    }
    unmap_leaves(&s2, base, slots * MIB2);
    assert_eq!(reclaim(&s2, base, slots * MIB2), kept + 2);
    assert_eq!(s2.table_pages(), 1);
}

#[test]
fn bad_ranges_are_rejected() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, false);
    let s2 = new_s2(&alloc, &tlb);
    let mut release = |_, _| {};
    let mut batch = s2.batch(&mut release);
    let oor = Err(MapError::OutOfRange {
        ipa: Ipa(1 << 40),
        size: KIB4,
    });
    let cases = [
        (0x10, KIB4, Err(MapError::Unaligned(Ipa(0x10)))),
        (0, 0x800, Err(MapError::UnalignedSize(0x800))),
        (0, 0, Err(MapError::ZeroSize(Ipa(0)))),
        (1 << 40, KIB4, oor),
    ];
    for (ipa, size, want) in cases {
        assert_eq!(
            s2.reclaim_empty_tables(Ipa(ipa), size, &mut batch),
            want.map(|()| 0)
        );
        assert_eq!(
            s2.unmap_leaves_batched(Ipa(ipa), size, &mut batch)
                .map(drop),
            want
        );
    }
    assert!(batch.is_empty());
}

/// Counts a finished thread when dropped.
struct Done<'a>(&'a AtomicUsize);

impl Drop for Done<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// Rounds of: empty the region's leaves (tables stay), a first scan removes
/// the empty tables, then fault installers fill random pages (creating
/// tables again, and installing into tables the scanner nominates) while
/// the scanner keeps removing every table it finds empty. An installed
/// page is never lost: after each round every page whose fault reported
/// `Installed` translates to its frame, and the page count matches.
#[test]
fn faults_racing_the_scan_are_never_lost() {
    const FAULTERS: usize = 3;
    const ROUNDS: u64 = 150;
    const FAULTS: u64 = 48;
    // Eight 2 MiB slots, each with its own level-3 table.
    const PAGES_IN_REGION: u64 = 8 * 512;
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, false);
    let s2 = new_s2(&alloc, &tlb);
    let rcu = s2.rcu();
    let base = 3 * GIB1 - 4 * MIB2;
    let region = PAGES_IN_REGION * KIB4;
    let next_frame = AtomicU64::new(0x10_0000_0000);
    let (removed, retries) = (AtomicU64::new(0), AtomicU64::new(0));
    for round in 0..ROUNDS {
        let installed = Mutex::new(Vec::new());
        let done = AtomicUsize::new(0);
        let go = Barrier::new(FAULTERS + 1);
        std::thread::scope(|scope| {
            for t in 0..FAULTERS {
                let (s2, installed, done, next_frame, retries, go) =
                    (&s2, &installed, &done, &next_frame, &retries, &go);
                scope.spawn(move || {
                    play_cpu(1 + t);
                    go.wait();
                    rcu.online();
                    // Counted on the way out even on a panic, so that the
                    // scanner stops and the panic is reported.
                    let _done = Done(done);
                    let mut x = ((round << 8) | t as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                    for _ in 0..FAULTS {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let ipa = Ipa(base + x % PAGES_IN_REGION * KIB4);
                        let frame = PhysAddr(next_frame.fetch_add(KIB4, Ordering::Relaxed));
                        let outcome = s2
                            .fault_install(ipa, frame, Perms::RW, MemType::Normal, false)
                            .unwrap();
                        match outcome {
                            FaultOutcome::Installed => installed.lock().unwrap().push((ipa, frame)),
                            FaultOutcome::Retry => {
                                retries.fetch_add(1, Ordering::Relaxed);
                            }
                            FaultOutcome::AlreadyMapped => {}
                        }
                        rcu.quiescent();
                        // Lets the scanner in between on a busy host.
                        std::thread::yield_now();
                    }
                    rcu.offline();
                });
            }
            let (s2, done, removed, go) = (&s2, &done, &removed, &go);
            scope.spawn(move || {
                play_cpu(1 + FAULTERS);
                rcu.online();
                let mut release = |_, _| {};
                let mut batch = s2.batch(&mut release);
                let mut first = true;
                loop {
                    let finished = done.load(Ordering::SeqCst) == FAULTERS;
                    let n = s2
                        .reclaim_empty_tables(Ipa(base), region, &mut batch)
                        .unwrap();
                    removed.fetch_add(n, Ordering::Relaxed);
                    batch.flush();
                    s2.reclaim_tables(false);
                    rcu.quiescent();
                    if std::mem::take(&mut first) {
                        go.wait();
                    }
                    if finished {
                        break;
                    }
                }
                drop(batch);
                rcu.offline();
            });
        });
        let installed = installed.into_inner().unwrap();
        for &(ipa, frame) in &installed {
            assert_eq!(
                s2.translate(ipa).map(|t| t.pa),
                Some(frame),
                "round {round}: page {ipa} lost"
            );
        }
        assert_eq!(s2.mapped_pages(), installed.len() as u64);
        unmap_leaves(&s2, base, region);
    }
    assert!(removed.load(Ordering::Relaxed) > 0);
    reclaim(&s2, base, region);
    assert_eq!((s2.table_pages(), alloc.live()), (1, 1));
    assert!(s2.check_idle());
    std::eprintln!(
        "scan vs faults: {} tables removed, {} faults retried",
        removed.load(Ordering::Relaxed),
        retries.load(Ordering::Relaxed)
    );
}
