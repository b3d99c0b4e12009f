//! Pinning a leaf for a hypervisor access to guest memory
//! (`with_page_pinned`): the frame it reports, what a pin blocks, the
//! errors, the access flag, and the restore on a panic.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hyp_core::addr::{Ipa, PhysAddr};
use stage2::desc::LOCKED;
use stage2::{FaultOutcome, HarvestFlags, MapFlags, MemType, MigrateOutcome, Perms, PinError};

use crate::common::{hw_touch, play_cpu, HostAlloc, RecordingTlb, BLOCKS, KIB4, MIB2, PAGES};
use crate::{new_s2, S2};

fn map(s2: &S2<'_>, ipa: u64, pa: u64, size: u64, flags: MapFlags) {
    s2.map(
        Ipa(ipa),
        PhysAddr(pa),
        size,
        Perms::RW,
        MemType::Normal,
        flags,
    )
    .unwrap();
}

#[test]
fn pin_gives_the_page_and_restores_the_exact_entry() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, true);
    let s2 = new_s2(&alloc, &tlb);
    let ipa = Ipa(0x4000_3000);
    map(&s2, ipa.0, 0x8000_3000, KIB4, PAGES);
    let before = alloc.read_entry(s2.root(), ipa, 3);
    let got = s2.with_page_pinned(Ipa(ipa.0 + 0x123), |pa| {
        // Locked: the hardware walker and software walkers see no leaf.
        assert_eq!(alloc.read_entry(s2.root(), ipa, 3), Some(LOCKED));
        assert_eq!(s2.translate(ipa), None);
        pa
    });
    assert_eq!(got, Ok(PhysAddr(0x8000_3000)), "the page, aligned");
    assert_eq!(alloc.read_entry(s2.root(), ipa, 3), before);
    assert!(tlb.take().is_empty(), "no TLB invalidation");
    assert_eq!(s2.mapped_pages(), 1);
    assert!(s2.check_idle());
}

#[test]
fn pin_on_a_block_gives_the_page_inside_it() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, true);
    let s2 = new_s2(&alloc, &tlb);
    let block = Ipa(0x4020_0000);
    map(&s2, block.0, 0x9000_0000, MIB2, BLOCKS);
    let before = alloc.read_entry(s2.root(), block, 2);
    for (offset, want) in [(0, 0x9000_0000), (5 * KIB4 + 0x10, 0x9000_5000)] {
        let got = s2.with_page_pinned(Ipa(block.0 + offset), |pa| {
            // The whole block is locked.
            assert_eq!(alloc.read_entry(s2.root(), block, 2), Some(LOCKED));
            pa
        });
        assert_eq!(got, Ok(PhysAddr(want)));
    }
    let last = Ipa(block.0 + MIB2 - 1);
    assert_eq!(
        s2.with_page_pinned(last, |pa| pa),
        Ok(PhysAddr(0x9000_0000 + MIB2 - KIB4))
    );
    assert_eq!(alloc.read_entry(s2.root(), block, 2), before);
    assert_eq!(s2.translate(block).map(|t| t.level), Some(2), "not split");
    assert!(tlb.take().is_empty());
}

#[test]
fn pin_errors_do_not_call_the_closure() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, false);
    let s2 = new_s2(&alloc, &tlb);
    let block = Ipa(0x4020_0000);
    map(&s2, block.0, 0x9000_0000, MIB2, BLOCKS);
    let page = Ipa(0x4000_0000);
    map(&s2, page.0, 0x8000_0000, KIB4, PAGES);
    let mut calls = 0;
    // No table on the way, and an invalid slot in an existing table.
    for ipa in [Ipa(0x80_0000_0000), Ipa(page.0 + KIB4 + 0x18)] {
        assert_eq!(
            s2.with_page_pinned(ipa, |_| calls += 1),
            Err(PinError::NotMapped(ipa))
        );
    }
    let limit = Ipa(s2.ipa_limit());
    assert_eq!(
        s2.with_page_pinned(limit, |_| calls += 1),
        Err(PinError::OutOfRange(limit))
    );
    assert_eq!(
        s2.with_page_pinned(Ipa(u64::MAX), |_| calls += 1),
        Err(PinError::OutOfRange(Ipa(u64::MAX)))
    );
    assert_eq!(calls, 0);
    // Locked by another pin: the same page, or another page of a pinned
    // block.
    let nested = s2.with_page_pinned(page, |_| s2.with_page_pinned(page, |_| ()));
    assert_eq!(
        nested,
        Ok(Err(PinError::Busy {
            ipa: page,
            level: 3
        }))
    );
    let nested = s2.with_page_pinned(block, |_| {
        s2.with_page_pinned(Ipa(block.0 + 7 * KIB4), |_| ())
    });
    assert_eq!(
        nested,
        Ok(Err(PinError::Busy {
            ipa: block,
            level: 2
        }))
    );
    // Locked by a migration in the middle of its break-before-make.
    let mut release = |_, _| {};
    let mut batch = s2.batch(&mut release);
    let mut during = None;
    s2.migrate_page(page, PhysAddr(0xa000_0000), &mut batch, |_, _| {
        during = Some(s2.with_page_pinned(page, |_| ()));
    })
    .unwrap();
    assert_eq!(
        during,
        Some(Err(PinError::Busy {
            ipa: page,
            level: 3
        }))
    );
    drop(batch);
    assert_eq!(
        s2.with_page_pinned(page, |pa| pa),
        Ok(PhysAddr(0xa000_0000))
    );
    let text = std::format!("{}", PinError::NotMapped(Ipa(0x1000)));
    assert_eq!(text, "IPA 0x1000 is not mapped");
    assert!(s2.check_idle());
}

#[test]
fn writers_back_off_from_a_pinned_leaf() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, false);
    let s2 = new_s2(&alloc, &tlb);
    let page = Ipa(0x4000_0000);
    map(&s2, page.0, 0x8000_0000, KIB4, PAGES);
    let block = Ipa(0x4020_0000);
    map(&s2, block.0, 0x9000_0000, MIB2, BLOCKS);
    let mut release = |_, _| {};
    let mut batch = s2.batch(&mut release);
    let mut copies = 0;
    s2.with_page_pinned(page, |_| {
        let moved = s2.migrate_page(page, PhysAddr(0xa000_0000), &mut batch, |_, _| copies += 1);
        assert_eq!(moved, Ok(MigrateOutcome::NotMoved));
        let fault = s2.fault_install(
            page,
            PhysAddr(0xb000_0000),
            Perms::RW,
            MemType::Normal,
            true,
        );
        assert_eq!(fault, Ok(FaultOutcome::Retry));
    })
    .unwrap();
    assert_eq!(copies, 0);
    assert!(batch.is_empty());
    // A fault inside a pinned block meets the lock at level 2.
    s2.with_page_pinned(block, |_| {
        let fault = s2.fault_install(
            Ipa(block.0 + KIB4),
            PhysAddr(0xb000_0000),
            Perms::RW,
            MemType::Normal,
            true,
        );
        assert_eq!(fault, Ok(FaultOutcome::Retry));
    })
    .unwrap();
    // Once released, the migration goes through.
    let moved = s2.migrate_page(page, PhysAddr(0xa000_0000), &mut batch, |_, _| copies += 1);
    assert_eq!(
        moved,
        Ok(MigrateOutcome::Moved {
            old: PhysAddr(0x8000_0000)
        })
    );
    assert_eq!(copies, 1);
}

#[test]
fn pin_keeps_the_access_flag() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, false);
    let s2 = new_s2(&alloc, &tlb);
    let (young, old) = (Ipa(0x4000_0000), Ipa(0x4000_1000));
    map(&s2, young.0, 0x8000_0000, KIB4, PAGES);
    let no_af = MapFlags {
        af: false,
        allow_blocks: false,
    };
    map(&s2, old.0, 0x8000_1000, KIB4, no_af);
    let harvest = |flags| {
        let mut bm = [0u64; 1];
        s2.harvest(young, 2, &mut bm[..], flags).unwrap();
        bm[0]
    };
    s2.with_page_pinned(young, |_| {
        // Skipped while locked: reported old, not cleared.
        assert_eq!(harvest(HarvestFlags::CLEAR), 0);
        assert_eq!(s2.test_and_clear_young(young), None);
        assert!(!s2.set_access_flag(young));
    })
    .unwrap();
    s2.with_page_pinned(old, |_| {
        assert!(hw_touch(&s2, old).is_none(), "the hardware cannot set AF");
    })
    .unwrap();
    assert_eq!(s2.translate(young).map(|t| t.af), Some(true));
    assert_eq!(s2.translate(old).map(|t| t.af), Some(false));
    assert_eq!(harvest(HarvestFlags::CLEAR), 0b01);
    assert_eq!(harvest(HarvestFlags::empty()), 0);
}

/// Sets the flag when dropped (also on a panic), so that the other threads
/// of a test stop.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Threads that set and clear the access flag of the pinned page race
/// with the pin's compare-exchange (until both sides made progress, within
/// a time bound): the pin retries (an access-flag change is never
/// "busy"), so every pin succeeds and finds the right frame.
#[test]
fn pin_retries_over_access_flag_races() {
    const PINS: u64 = 20_000;
    const FLIPS: u64 = 2_000;
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, false);
    let s2 = new_s2(&alloc, &tlb);
    let rcu = s2.rcu();
    let ipa = Ipa(0x4000_0000);
    map(&s2, ipa.0, 0x8000_0000, KIB4, PAGES);
    let stop = AtomicBool::new(false);
    let flips = AtomicU64::new(0);
    std::thread::scope(|scope| {
        for t in 0..2 {
            let (s2, stop, flips) = (&s2, &stop, &flips);
            scope.spawn(move || {
                play_cpu(2 + t);
                rcu.online();
                while !stop.load(Ordering::Relaxed) {
                    let flipped = if t == 0 {
                        hw_touch(s2, ipa).is_some_and(|t| !t.was_young)
                    } else {
                        s2.test_and_clear_young(ipa) == Some(true)
                    };
                    flips.fetch_add(u64::from(flipped), Ordering::Relaxed);
                    rcu.quiescent();
                }
                rcu.offline();
            });
        }
        let _stop = StopOnDrop(&stop);
        play_cpu(1);
        rcu.online();
        let start = Instant::now();
        let mut pins = 0;
        while (pins < PINS || flips.load(Ordering::Relaxed) < FLIPS)
            && start.elapsed() < Duration::from_secs(20)
        {
            assert_eq!(s2.with_page_pinned(ipa, |pa| pa), Ok(PhysAddr(0x8000_0000)));
            pins += 1;
            rcu.quiescent();
        }
        rcu.offline();
        play_cpu(0);
    });
    assert!(flips.load(Ordering::Relaxed) > 0);
    let t = s2.translate(ipa).unwrap();
    assert_eq!(
        (t.pa, t.perms, t.level),
        (PhysAddr(0x8000_0000), Perms::RW, 3)
    );
}

#[test]
fn pin_restores_the_entry_when_the_closure_panics() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, false);
    let s2 = new_s2(&alloc, &tlb);
    let ipa = Ipa(0x4000_0000);
    map(&s2, ipa.0, 0x8000_0000, KIB4, PAGES);
    let before = alloc.read_entry(s2.root(), ipa, 3);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        s2.with_page_pinned(ipa, |_| panic!("guest access failed"))
    }));
    assert!(result.is_err());
    assert_eq!(alloc.read_entry(s2.root(), ipa, 3), before);
    assert_eq!(s2.unmap(ipa, KIB4).map(|s| s.pages_unmapped), Ok(1));
}

/// A pin held by one CPU while another runs `writer` on the pinned leaf:
/// the writer's walk restarts on the lock until the pin is released, and
/// only then does it finish. Returns what `writer` returned.
fn writer_waits_for_pin<R: Send>(
    s2: &S2<'_>,
    alloc: &HostAlloc,
    pin_at: Ipa,
    level: u8,
    writer: impl FnOnce() -> R + Send,
) -> R {
    let rcu = s2.rcu();
    let (pinned, unpinning, written) = (
        AtomicBool::new(false),
        AtomicBool::new(false),
        AtomicBool::new(false),
    );
    std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            play_cpu(2);
            rcu.online();
            while !pinned.load(Ordering::SeqCst) {
                std::hint::spin_loop();
            }
            let result = writer();
            assert!(
                unpinning.load(Ordering::SeqCst),
                "the writer finished while the leaf was pinned"
            );
            written.store(true, Ordering::SeqCst);
            rcu.offline();
            result
        });
        play_cpu(1);
        rcu.online();
        s2.with_page_pinned(pin_at, |_| {
            pinned.store(true, Ordering::SeqCst);
            for _ in 0..20 {
                std::thread::sleep(Duration::from_millis(1));
                assert!(!written.load(Ordering::SeqCst));
                assert_eq!(alloc.read_entry(s2.root(), pin_at, level), Some(LOCKED));
            }
            unpinning.store(true, Ordering::SeqCst);
        })
        .unwrap();
        rcu.offline();
        play_cpu(0);
        writer.join().unwrap()
    })
}

#[test]
fn pin_blocks_unmap_until_released() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, false);
    let s2 = new_s2(&alloc, &tlb);
    let ipa = Ipa(0x4000_3000);
    map(&s2, ipa.0, 0x8000_3000, KIB4, PAGES);
    let released = Mutex::new(Vec::new());
    let unmapped = writer_waits_for_pin(&s2, &alloc, ipa, 3, || {
        let mut release = |pa, size| released.lock().unwrap().push((pa, size));
        let mut batch = s2.batch(&mut release);
        let stats = s2.unmap_batched(ipa, KIB4, &mut batch).unwrap();
        assert!(released.lock().unwrap().is_empty(), "not before the flush");
        stats.pages_unmapped
    });
    assert_eq!(unmapped, 1);
    assert_eq!(
        released.into_inner().unwrap(),
        [(PhysAddr(0x8000_3000), KIB4)]
    );
    assert_eq!(s2.translate(ipa), None);
}

#[test]
fn pin_blocks_protect_remap_and_split_until_released() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, false);
    let s2 = new_s2(&alloc, &tlb);
    let ipa = Ipa(0x4000_3000);
    map(&s2, ipa.0, 0x8000_3000, KIB4, PAGES);
    writer_waits_for_pin(&s2, &alloc, ipa, 3, || {
        s2.protect(ipa, KIB4, Perms::READ).unwrap();
    });
    assert_eq!(s2.translate(ipa).map(|t| t.perms), Some(Perms::READ));
    writer_waits_for_pin(&s2, &alloc, ipa, 3, || {
        map(&s2, ipa.0, 0x8800_0000, KIB4, PAGES)
    });
    assert_eq!(s2.translate(ipa).map(|t| t.pa), Some(PhysAddr(0x8800_0000)));
    // A pin anywhere in a block holds off its split.
    let block = Ipa(0x4020_0000);
    map(&s2, block.0, 0x9000_0000, MIB2, BLOCKS);
    let inside = Ipa(block.0 + 9 * KIB4);
    writer_waits_for_pin(&s2, &alloc, inside, 2, || {
        s2.unmap(Ipa(block.0 + KIB4), KIB4).unwrap();
    });
    assert_eq!(
        s2.translate(inside).map(|t| (t.level, t.pa)),
        Some((3, PhysAddr(0x9000_9000)))
    );
    assert_eq!(s2.translate(Ipa(block.0 + KIB4)), None);
}

/// A migrator moves one page to fresh frames again and again and releases
/// each old frame after its flush; a pinner pins the page meanwhile, until
/// both made progress (at least `ROUNDS` pins and moves, within a time
/// bound). The frame a pin reports is never released while the pin holds
/// it.
#[test]
fn pins_and_migrations_race() {
    const ROUNDS: u64 = 2_000;
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, false);
    let s2 = new_s2(&alloc, &tlb);
    let rcu = s2.rcu();
    let ipa = Ipa(0x4000_0000);
    map(&s2, ipa.0, 0x1_0000_0000, KIB4, PAGES);
    let released = Mutex::new(HashSet::new());
    let stop = AtomicBool::new(false);
    let (moved, pinned) = (AtomicU64::new(0), AtomicU64::new(0));
    std::thread::scope(|scope| {
        scope.spawn(|| {
            play_cpu(2);
            rcu.online();
            let mut release = |pa: PhysAddr, _| {
                assert!(released.lock().unwrap().insert(pa.0), "released twice");
            };
            let mut batch = s2.batch(&mut release);
            let mut next = 0x1_0000_0000;
            while !stop.load(Ordering::Relaxed) {
                next += KIB4;
                let outcome = s2
                    .migrate_page(ipa, PhysAddr(next), &mut batch, |_, _| {})
                    .unwrap();
                if let MigrateOutcome::Moved { .. } = outcome {
                    moved.fetch_add(1, Ordering::Relaxed);
                    batch.flush();
                }
                rcu.quiescent();
            }
            drop(batch);
            rcu.offline();
        });
        let _stop = StopOnDrop(&stop);
        play_cpu(1);
        rcu.online();
        let start = Instant::now();
        while (pinned.load(Ordering::Relaxed) < ROUNDS || moved.load(Ordering::Relaxed) < ROUNDS)
            && start.elapsed() < Duration::from_secs(20)
        {
            let result = s2.with_page_pinned(ipa, |pa| {
                for _ in 0..8 {
                    assert!(!released.lock().unwrap().contains(&pa.0));
                    std::hint::spin_loop();
                }
            });
            match result {
                Ok(()) => {
                    pinned.fetch_add(1, Ordering::Relaxed);
                }
                // The migration holds the entry: back off.
                Err(PinError::Busy { .. }) => {}
                Err(e) => panic!("{e}"),
            }
            rcu.quiescent();
        }
        rcu.offline();
        play_cpu(0);
    });
    assert!(pinned.load(Ordering::Relaxed) > 0);
    assert!(moved.load(Ordering::Relaxed) > 0);
    let t = s2.translate(ipa).unwrap();
    assert!(!released.lock().unwrap().contains(&t.pa.0));
    assert!(s2.check_idle());
}
