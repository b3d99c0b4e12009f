//! The lockless writers: the fault path (`fault_install`) and page
//! migration (`migrate_page`).

use std::sync::{Barrier, Mutex};
use std::vec::Vec;

use hyp_core::addr::{Ipa, PhysAddr};
use stage2::desc::LOCKED;
use stage2::{FaultOutcome, MapError, MapFlags, MemType, MigrateOutcome, Perms};

use crate::common::{play_cpu, HostAlloc, RecordingTlb, TlbEvent, BLOCKS, GIB1, KIB4, MIB2};
use crate::new_s2;

#[test]
fn fault_installs_a_page_once() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, true);
    let s2 = new_s2(&alloc, &tlb);
    let (rw, normal) = (Perms::RW, MemType::Normal);
    let ipa = Ipa(0x4000_5000);
    assert_eq!(
        s2.fault_install(ipa, PhysAddr(0x8000_0000), rw, normal, true),
        Ok(FaultOutcome::Installed)
    );
    let t = s2.translate(Ipa(0x4000_5abc)).unwrap();
    assert_eq!(
        (t.pa, t.level, t.af, t.perms),
        (PhysAddr(0x8000_0abc), 3, true, rw)
    );
    assert_eq!((s2.mapped_pages(), s2.table_pages()), (1, 4));
    assert!(tlb.take().is_empty(), "filling empty slots needs no TLBI");
    // Again at the same page (any offset in it): the first frame stays.
    assert_eq!(
        s2.fault_install(Ipa(0x4000_5ff8), PhysAddr(0x9000_0000), rw, normal, false),
        Ok(FaultOutcome::AlreadyMapped)
    );
    assert_eq!(s2.translate(ipa).map(|t| t.pa), Some(PhysAddr(0x8000_0000)));
    // A page covered by a block.
    let block = Ipa(0x8000_0000);
    s2.map(block, PhysAddr(0x1_0000_0000), MIB2, rw, normal, BLOCKS)
        .unwrap();
    let inside = Ipa(block.0 + 5 * KIB4);
    assert_eq!(
        s2.fault_install(inside, PhysAddr(0x9000_0000), rw, normal, false),
        Ok(FaultOutcome::AlreadyMapped)
    );
    assert_eq!(s2.translate(inside).map(|t| t.level), Some(2));
    assert_eq!((s2.mapped_pages(), s2.table_pages()), (513, 5));
    // Bad arguments.
    let limit = s2.ipa_limit();
    assert_eq!(
        s2.fault_install(Ipa(limit), PhysAddr(0), rw, normal, false),
        Err(MapError::OutOfRange {
            ipa: Ipa(limit),
            size: KIB4
        })
    );
    assert_eq!(
        s2.fault_install(Ipa(0), PhysAddr(0x10), rw, normal, false),
        Err(MapError::UnalignedPhys(PhysAddr(0x10)))
    );
    assert_eq!(
        s2.fault_install(Ipa(0), PhysAddr(0), Perms::RWX, MemType::Device, false),
        Err(MapError::ExecutableDevice(Ipa(0)))
    );
    // Out of table pages: an error, and the tables made so far stay.
    let small = HostAlloc::with_limit(3);
    let s2 = new_s2(&small, &tlb);
    assert_eq!(
        s2.fault_install(ipa, PhysAddr(0), rw, normal, false),
        Err(MapError::NoMemory)
    );
    assert_eq!((s2.mapped_pages(), s2.table_pages()), (0, 3));
}

#[test]
fn concurrent_faults_on_one_page_install_exactly_once() {
    const THREADS: usize = 8;
    const ROUNDS: u64 = 30;
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, false);
    let s2 = new_s2(&alloc, &tlb);
    let rcu = s2.rcu();
    let barrier = Barrier::new(THREADS);
    let outcomes = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let (s2, barrier, outcomes) = (&s2, &barrier, &outcomes);
            scope.spawn(move || {
                play_cpu(t + 1);
                rcu.online();
                for round in 0..ROUNDS {
                    // A fresh 1 GiB region: the level-2 and level-3 tables
                    // are created by the racing faults.
                    let ipa = Ipa(round * GIB1 + 0x12_3000);
                    let frame = PhysAddr((round * THREADS as u64 + t as u64 + 1) * KIB4);
                    barrier.wait();
                    let outcome = s2
                        .fault_install(ipa, frame, Perms::RW, MemType::Normal, false)
                        .unwrap();
                    outcomes.lock().unwrap().push((round, frame, outcome));
                    rcu.quiescent();
                }
                rcu.offline();
            });
        }
    });
    let outcomes = outcomes.into_inner().unwrap();
    for round in 0..ROUNDS {
        let this: Vec<_> = outcomes.iter().filter(|o| o.0 == round).collect();
        let won: Vec<_> = this
            .iter()
            .filter(|o| o.2 == FaultOutcome::Installed)
            .collect();
        assert_eq!(won.len(), 1, "round {round}: {this:?}");
        assert!(
            this.iter()
                .all(|o| o.2 == FaultOutcome::Installed || o.2 == FaultOutcome::AlreadyMapped),
            "round {round}: {this:?}"
        );
        let ipa = Ipa(round * GIB1 + 0x12_3000);
        assert_eq!(s2.translate(ipa).map(|t| t.pa), Some(won[0].1));
    }
    assert_eq!(s2.mapped_pages(), ROUNDS);
    // Root + level-1 + a level-2 and a level-3 table per round; every
    // table a loser allocated was freed at once.
    assert_eq!(s2.table_pages(), 2 + 2 * ROUNDS);
    assert_eq!(alloc.live() as u64, s2.table_pages());
    let (allocs, frees) = alloc.counts();
    assert_eq!(allocs - frees, s2.table_pages());
    assert_eq!(s2.deferred_tables(), 0);
}

#[test]
fn migration_moves_a_page_and_releases_the_old_frame_after_the_flush() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, true);
    let s2 = new_s2(&alloc, &tlb);
    let (a, b) = (Ipa(0x4000_0000), Ipa(0x4000_1000));
    s2.map(
        a,
        PhysAddr(0x8000_0000),
        KIB4,
        Perms::RW,
        MemType::Normal,
        BLOCKS,
    )
    .unwrap();
    let old_flags = MapFlags {
        af: false,
        ..BLOCKS
    };
    s2.map(
        b,
        PhysAddr(0x8000_1000),
        KIB4,
        Perms::READ,
        MemType::Device,
        old_flags,
    )
    .unwrap();
    tlb.take();
    let released = Mutex::new(Vec::new());
    let mut release = |pa, size| released.lock().unwrap().push((pa, size));
    let mut batch = s2.batch(&mut release);
    let mut copied = Vec::new();
    assert_eq!(
        s2.migrate_page(a, PhysAddr(0x9000_0000), &mut batch, |o, n| copied
            .push((o, n))),
        Ok(MigrateOutcome::Moved {
            old: PhysAddr(0x8000_0000)
        })
    );
    assert_eq!(copied, [(PhysAddr(0x8000_0000), PhysAddr(0x9000_0000))]);
    let t = s2.translate(Ipa(a.0 + 0x10)).unwrap();
    assert_eq!(
        (t.pa, t.af, t.perms, t.level),
        (PhysAddr(0x9000_0010), true, Perms::RW, 3)
    );
    // Break-before-make: invalidated while the entry was locked.
    assert_eq!(
        tlb.take(),
        [
            TlbEvent::Ipa {
                ipa: a,
                level: 3,
                entry: Some(LOCKED)
            },
            TlbEvent::Vmid {
                entry: Some(LOCKED)
            }
        ]
    );
    // Attributes and a clear access flag are carried over too.
    let moved = s2.migrate_page(b, PhysAddr(0x9000_1000), &mut batch, |_, _| {});
    assert!(matches!(moved, Ok(MigrateOutcome::Moved { .. })));
    let t = s2.translate(b).unwrap();
    assert_eq!(
        (t.pa, t.af, t.perms, t.memtype),
        (PhysAddr(0x9000_1000), false, Perms::READ, MemType::Device)
    );
    assert!(
        released.lock().unwrap().is_empty(),
        "pending until the flush"
    );
    assert!(!s2.check_idle());
    batch.flush();
    assert_eq!(
        *released.lock().unwrap(),
        [(PhysAddr(0x8000_0000), KIB4), (PhysAddr(0x8000_1000), KIB4)]
    );
    assert_eq!(batch.stats().frames_released, 2);
    assert!(s2.check_idle());
    assert_eq!(s2.mapped_pages(), 2);
}

#[test]
fn migration_of_anything_but_a_mapped_page_does_nothing() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, false);
    let s2 = new_s2(&alloc, &tlb);
    let block = Ipa(0x4000_0000);
    s2.map(
        block,
        PhysAddr(0x8000_0000),
        MIB2,
        Perms::RW,
        MemType::Normal,
        BLOCKS,
    )
    .unwrap();
    let released = Mutex::new(Vec::new());
    let mut release = |pa, size| released.lock().unwrap().push((pa, size));
    let mut batch = s2.batch(&mut release);
    let new = PhysAddr(0x9000_0000);
    let mut copies = 0;
    for ipa in [Ipa(block.0 + 3 * KIB4), Ipa(0x4100_0000), Ipa(1 << 40)] {
        assert_eq!(
            s2.migrate_page(ipa, new, &mut batch, |_, _| copies += 1),
            Ok(MigrateOutcome::NotMoved),
            "{ipa}"
        );
    }
    assert_eq!(
        s2.migrate_page(block, PhysAddr(0x10), &mut batch, |_, _| copies += 1),
        Err(MapError::UnalignedPhys(PhysAddr(0x10)))
    );
    assert_eq!(copies, 0);
    assert!(batch.is_empty());
    drop(batch);
    assert!(released.lock().unwrap().is_empty());
    assert_eq!(s2.translate(block).map(|t| t.level), Some(2));
    // The new frame was not used: mapping it is no reuse.
    s2.map(
        Ipa(0x4100_0000),
        new,
        KIB4,
        Perms::RW,
        MemType::Normal,
        BLOCKS,
    )
    .unwrap();
    assert!(s2.check_idle());
}

#[test]
fn faults_and_lookups_during_a_migration_see_the_lock() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, false);
    let s2 = new_s2(&alloc, &tlb);
    let ipa = Ipa(0x4000_0000);
    s2.map(
        ipa,
        PhysAddr(0x8000_0000),
        KIB4,
        Perms::RW,
        MemType::Normal,
        BLOCKS,
    )
    .unwrap();
    let mut release = |_, _| {};
    let mut batch = s2.batch(&mut release);
    let mut during = None;
    // The copy runs between break and make.
    s2.migrate_page(ipa, PhysAddr(0x9000_0000), &mut batch, |_, _| {
        during = Some((
            s2.fault_install(ipa, PhysAddr(0xa000_0000), Perms::RW, MemType::Normal, true),
            s2.translate(ipa),
            s2.set_access_flag(ipa),
            s2.test_and_clear_young(ipa),
        ));
    })
    .unwrap();
    assert_eq!(
        during,
        Some((Ok(FaultOutcome::Retry), None, false, None)),
        "a locked entry: retry the fault; no translation, no AF"
    );
    assert_eq!(s2.translate(ipa).map(|t| t.pa), Some(PhysAddr(0x9000_0000)));
    assert_eq!(
        s2.fault_install(ipa, PhysAddr(0xa000_0000), Perms::RW, MemType::Normal, true),
        Ok(FaultOutcome::AlreadyMapped)
    );
}
