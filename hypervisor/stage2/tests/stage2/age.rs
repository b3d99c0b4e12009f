//! The access-flag harvester (`harvest`, `test_young`, `test_clear_young`,
//! `clear_young`): bitmap layout, blocks, batches, `MASK`, `FLUSH`, errors,
//! and what happens when a writer or the hardware acts between two batches
//! of one harvest.

use std::boxed::Box;
use std::cell::RefCell;
use std::format;
use std::vec;
use std::vec::Vec;

use hyp_core::addr::{Ipa, PhysAddr};
use stage2::age::HARVEST_BATCH_PAGES;
use stage2::{Bitmap, HarvestError, HarvestFlags, MapFlags, MemType, Perms, Rcu, S2Attrs, Stage2};

use crate::common::{hw_touch, HostAlloc, RecordingTlb, TlbEvent, Touch, GIB1, KIB4, MIB2};
use crate::{new_s2, S2};

/// Where the page mappings of these tests start.
const BASE: u64 = 0x4000_0000;
const PAGES_OLD: MapFlags = MapFlags {
    af: false,
    allow_blocks: false,
};
const PAGES_YOUNG: MapFlags = MapFlags {
    af: true,
    allow_blocks: false,
};
const BLOCKS_OLD: MapFlags = MapFlags {
    af: false,
    allow_blocks: true,
};
const BLOCKS_YOUNG: MapFlags = MapFlags {
    af: true,
    allow_blocks: true,
};

fn map(s2: &S2<'_>, ipa: u64, size: u64, flags: MapFlags) {
    // Output = input: the frames only need to be distinct.
    s2.map(
        Ipa(ipa),
        PhysAddr(ipa),
        size,
        Perms::RW,
        MemType::Normal,
        flags,
    )
    .unwrap();
}

/// The bitmap of `nwords` words with exactly `pages` set.
fn bitmap_of(pages: impl IntoIterator<Item = u64>, nwords: usize) -> Vec<u64> {
    let mut words = vec![0; nwords];
    for p in pages {
        words[(p / 64) as usize] |= 1 << (p % 64);
    }
    words
}

/// The pages set in `bitmap`.
fn pages_of(bitmap: &[u64]) -> Vec<u64> {
    (0..bitmap.len() as u64 * 64)
        .filter(|&p| bitmap[(p / 64) as usize] & (1 << (p % 64)) != 0)
        .collect()
}

fn page(i: u64) -> Ipa {
    Ipa(BASE + i * KIB4)
}

fn af(s2: &S2<'_>, ipa: Ipa) -> Option<bool> {
    s2.translate(ipa).map(|t| t.af)
}

#[test]
fn untouched_and_unmapped_pages_are_old() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, true);
    let s2 = new_s2(&alloc, &tlb);
    map(&s2, BASE, 64 * KIB4, PAGES_OLD);
    // 64 mapped pages that nobody touched, then 64 unmapped ones.
    let mut bm = [u64::MAX; 2];
    assert_eq!(s2.test_young(page(0), 128, &mut bm[..]), Ok(0));
    assert_eq!(bm, [0, 0]);
    bm = [u64::MAX; 2];
    assert_eq!(s2.test_clear_young(page(0), 128, &mut bm[..]), Ok(0));
    assert_eq!(bm, [0, 0]);
    let flags = HarvestFlags::CLEAR | HarvestFlags::FLUSH;
    assert_eq!(s2.harvest(page(0), 128, &mut bm[..], flags), Ok(0));
    assert!(tlb.take().is_empty(), "nothing cleared, nothing flushed");
    // Far from any table.
    assert_eq!(s2.test_young(Ipa(0xff_0000_0000), 64, &mut bm[..]), Ok(0));
    assert_eq!(bm, [0, 0]);
}

#[test]
fn bit_i_is_page_i_and_only_test_clear_clears() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, false);
    let s2 = new_s2(&alloc, &tlb);
    map(&s2, BASE, 200 * KIB4, PAGES_OLD);
    let young = [0, 1, 63, 64, 130, 199];
    for (n, &p) in young.iter().enumerate() {
        // Half by the software access-flag fault path, half "by hardware".
        if n % 2 == 0 {
            assert!(s2.set_access_flag(page(p)));
        } else {
            let touch = Some(Touch {
                level: 3,
                was_young: false,
            });
            assert_eq!(hw_touch(&s2, page(p)), touch);
        }
    }
    let expect = bitmap_of(young, 4);
    let mut bm = [0; 4];
    for _ in 0..2 {
        assert_eq!(s2.test_young(page(0), 200, &mut bm[..]), Ok(6));
        assert_eq!(bm, expect[..], "test_young does not clear");
    }
    assert_eq!(af(&s2, page(63)), Some(true));
    assert_eq!(s2.test_clear_young(page(0), 200, &mut bm[..]), Ok(6));
    assert_eq!(bm, expect[..]);
    assert!(young.iter().all(|&p| af(&s2, page(p)) == Some(false)));
    assert_eq!(s2.test_clear_young(page(0), 200, &mut bm[..]), Ok(0));
    assert_eq!(bm, [0; 4]);
    // Accessed again between two harvests: young again in the next one.
    hw_touch(&s2, page(5));
    assert!(s2.set_access_flag(page(131)));
    assert_eq!(s2.test_clear_young(page(0), 200, &mut bm[..]), Ok(2));
    assert_eq!(pages_of(&bm), [5, 131]);
    assert_eq!(s2.test_clear_young(page(0), 200, &mut bm[..]), Ok(0));
}

#[test]
fn blocks_report_every_page_they_cover() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, false);
    let s2 = new_s2(&alloc, &tlb);
    let block = BASE + 4 * MIB2;
    map(&s2, block, MIB2, BLOCKS_YOUNG);
    assert_eq!(s2.translate(Ipa(block)).map(|t| t.level), Some(2));
    // 10 unmapped pages, the block, 10 unmapped pages.
    let from = Ipa(block - 10 * KIB4);
    let expect = bitmap_of(10..522, 9);
    let mut bm = [0; 9];
    assert_eq!(s2.test_young(from, 532, &mut bm[..]), Ok(512));
    assert_eq!(bm, expect[..]);
    assert_eq!(s2.test_clear_young(from, 532, &mut bm[..]), Ok(512));
    assert_eq!(bm, expect[..]);
    assert_eq!(af(&s2, Ipa(block)), Some(false));
    assert_eq!(s2.test_clear_young(from, 532, &mut bm[..]), Ok(0));
    // A range inside the block: only its pages are reported, and clearing
    // clears the block (one access flag for all of it).
    hw_touch(&s2, Ipa(block + 7 * KIB4));
    let mut bm = [0; 1];
    let inside = Ipa(block + 100 * KIB4);
    assert_eq!(s2.test_clear_young(inside, 50, &mut bm[..]), Ok(50));
    assert_eq!(bm, [(1 << 50) - 1]);
    assert_eq!(af(&s2, Ipa(block)), Some(false));
    assert_eq!(s2.translate(Ipa(block)).map(|t| t.level), Some(2));
}

#[test]
fn gib_block_across_harvest_batches() {
    const GIB_PAGES: u64 = GIB1 / KIB4;
    const {
        assert!(
            HARVEST_BATCH_PAGES * 2 < GIB_PAGES,
            "the block must span several harvest batches"
        );
    }
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, false);
    let s2 = new_s2(&alloc, &tlb);
    let gib = 4 * GIB1;
    map(&s2, gib, GIB1, BLOCKS_YOUNG);
    assert_eq!(s2.translate(Ipa(gib)).map(|t| t.level), Some(1));
    let words = (GIB_PAGES / 64) as usize;
    let mut bm = vec![0; words];
    assert_eq!(
        s2.test_young(Ipa(gib), GIB_PAGES, &mut bm[..]),
        Ok(GIB_PAGES)
    );
    assert!(bm.iter().all(|&w| w == u64::MAX));
    assert_eq!(
        s2.test_clear_young(Ipa(gib), GIB_PAGES, &mut bm[..]),
        Ok(GIB_PAGES)
    );
    assert!(bm.iter().all(|&w| w == u64::MAX), "every batch reports it");
    assert_eq!(af(&s2, Ipa(gib)), Some(false));
    assert_eq!(s2.test_clear_young(Ipa(gib), GIB_PAGES, &mut bm[..]), Ok(0));
    assert!(bm.iter().all(|&w| w == 0));
    // A range that starts inside the block, off word and batch alignment,
    // and crosses two batch boundaries.
    hw_touch(&s2, Ipa(gib + GIB1 - KIB4));
    let n = 2 * HARVEST_BATCH_PAGES + 5;
    let mut bm = vec![u64::MAX; n.div_ceil(64) as usize];
    let from = Ipa(gib + 3 * KIB4);
    assert_eq!(s2.test_clear_young(from, n, &mut bm[..]), Ok(n));
    assert_eq!(bm, bitmap_of(0..n, bm.len()));
    // The block's end: 100 young pages, then 100 unmapped ones.
    hw_touch(&s2, Ipa(gib));
    let mut bm = [0; 4];
    let from = Ipa(gib + GIB1 - 100 * KIB4);
    assert_eq!(s2.test_young(from, 200, &mut bm[..]), Ok(100));
    assert_eq!(bm, bitmap_of(0..100, 4)[..]);
}

#[test]
fn unaligned_ranges_write_exactly_their_words() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, false);
    let s2 = new_s2(&alloc, &tlb);
    const N: u64 = 400;
    map(&s2, BASE, N * KIB4, PAGES_OLD);
    s2.unmap(page(70), 6 * KIB4).unwrap();
    // A fixed scatter of young pages (every page whose index is 0 or 1
    // mod 3, or 5 mod 7), some of them unmapped.
    let young: Vec<u64> = (0..N)
        .filter(|p| p % 3 != 2 || p % 7 == 5)
        .filter(|&p| s2.set_access_flag(page(p)))
        .collect();
    assert!(young.len() > 200);
    for start in [0, 1, 5, 63, 64, 65, 100] {
        for n in [1u64, 2, 63, 64, 65, 127, 129, 130, 200] {
            let needed = n.div_ceil(64) as usize;
            // One spare word, which the harvest must leave alone.
            let mut bm = vec![u64::MAX; needed + 1];
            let expect: Vec<u64> = young
                .iter()
                .filter(|&&p| p >= start && p < start + n)
                .map(|&p| p - start)
                .collect();
            let got = s2.test_young(page(start), n, &mut bm[..]);
            assert_eq!(got, Ok(expect.len() as u64), "start {start} n {n}");
            let mut want = bitmap_of(expect, needed);
            want.push(u64::MAX);
            assert_eq!(bm, want, "start {start} n {n}: bits past the range");
        }
    }
    // The same with clearing: afterwards exactly the range is old.
    let mut bm = [u64::MAX; 4];
    let (start, n) = (5, 130);
    let in_range = young.iter().filter(|&&p| (start..start + n).contains(&p));
    assert_eq!(
        s2.test_clear_young(page(start), n, &mut bm[..]),
        Ok(in_range.count() as u64)
    );
    assert_eq!(bm[3], u64::MAX);
    for &p in &young {
        let cleared = (start..start + n).contains(&p);
        assert_eq!(af(&s2, page(p)), Some(!cleared), "page {p}");
    }
}

#[test]
fn mask_clears_only_the_masked_pages() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, false);
    let s2 = new_s2(&alloc, &tlb);
    map(&s2, BASE, 256 * KIB4, PAGES_YOUNG);
    // Different masks in different words, several masked pages per word.
    let masked = [0, 5, 64, 65, 66, 130, 200, 255];
    let mut bm = bitmap_of(masked, 4);
    assert_eq!(s2.clear_young(page(0), 256, &mut bm[..]), Ok(256));
    assert_eq!(bm, [u64::MAX; 4], "every young page is reported");
    let mut left = [0; 4];
    assert_eq!(s2.test_young(page(0), 256, &mut left[..]), Ok(256 - 8));
    let expect: Vec<u64> = (0..256).filter(|p| !masked.contains(p)).collect();
    assert_eq!(pages_of(&left), expect, "exactly the masked pages cleared");
    // An empty mask clears nothing and still reports.
    let mut bm = [0; 4];
    let flags = HarvestFlags::CLEAR | HarvestFlags::MASK;
    assert_eq!(s2.harvest(page(0), 256, &mut bm[..], flags), Ok(256 - 8));
    assert_eq!(bm, left);
}

#[test]
fn mask_clears_a_block_only_when_all_its_pages_in_range_are_masked() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, false);
    let s2 = new_s2(&alloc, &tlb);
    let block = BASE + MIB2;
    map(&s2, block - 64 * KIB4, 64 * KIB4, PAGES_YOUNG);
    map(&s2, block, MIB2, BLOCKS_YOUNG);
    let from = Ipa(block - 64 * KIB4);
    // All but one page of the block: the block stays young.
    let mut bm = bitmap_of((64..576).filter(|&p| p != 300), 9);
    assert_eq!(s2.clear_young(from, 576, &mut bm[..]), Ok(576));
    assert_eq!(bm, [u64::MAX; 9]);
    assert_eq!(af(&s2, Ipa(block)), Some(true));
    assert_eq!(af(&s2, from), Some(true), "page 0 was not masked");
    // Every page of the block: cleared, and still reported.
    let mut bm = bitmap_of(64..576, 9);
    assert_eq!(s2.clear_young(from, 576, &mut bm[..]), Ok(576));
    assert_eq!(bm, [u64::MAX; 9]);
    assert_eq!(af(&s2, Ipa(block)), Some(false));
    // A range covering half the block: masking that half is enough.
    hw_touch(&s2, Ipa(block));
    let half = Ipa(block + 256 * KIB4);
    let mut bm = bitmap_of(0..255, 4);
    assert_eq!(s2.clear_young(half, 256, &mut bm[..]), Ok(256));
    assert_eq!(af(&s2, Ipa(block)), Some(true), "one page not masked");
    let mut bm = bitmap_of(0..256, 4);
    assert_eq!(s2.clear_young(half, 256, &mut bm[..]), Ok(256));
    assert_eq!(af(&s2, Ipa(block)), Some(false));
}

#[test]
fn flush_invalidates_only_what_was_cleared() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, true);
    let s2 = new_s2(&alloc, &tlb);
    map(&s2, BASE, 40 * KIB4, PAGES_YOUNG);
    let flush = HarvestFlags::CLEAR | HarvestFlags::FLUSH;
    let mut bm = [0; 1];
    // Without FLUSH: cleared, no invalidation.
    assert_eq!(s2.test_clear_young(page(0), 40, &mut bm[..]), Ok(40));
    assert!(tlb.take().is_empty());
    // Nothing young: nothing to flush.
    assert_eq!(s2.harvest(page(0), 40, &mut bm[..], flush), Ok(0));
    assert!(tlb.take().is_empty());
    // A few cleared: each by IPA (its entry already old), then stage 1.
    for p in [3, 17, 39] {
        hw_touch(&s2, page(p));
    }
    // Not clearing, or clearing nothing (empty mask): no invalidation.
    assert_eq!(s2.test_young(page(0), 40, &mut bm[..]), Ok(3));
    bm = [0];
    let masked = flush | HarvestFlags::MASK;
    assert_eq!(s2.harvest(page(0), 40, &mut bm[..], masked), Ok(3));
    assert!(tlb.take().is_empty());
    assert_eq!(s2.harvest(page(0), 40, &mut bm[..], flush), Ok(3));
    let events = tlb.take();
    assert_eq!(events.len(), 4, "{events:?}");
    for (event, p) in events.iter().zip([3, 17, 39]) {
        let TlbEvent::Ipa { ipa, level, entry } = *event else {
            panic!("{events:?}");
        };
        assert_eq!((ipa, level), (page(p), 3));
        assert!(entry.is_some_and(|e| e & S2Attrs::AF.bits() == 0));
    }
    assert!(matches!(events[3], TlbEvent::Vmid { .. }));
    // Many cleared: one invalidation of the whole VMID.
    for p in 0..40 {
        hw_touch(&s2, page(p));
    }
    assert_eq!(s2.harvest(page(0), 40, &mut bm[..], flush), Ok(40));
    assert!(matches!(tlb.take()[..], [TlbEvent::Vmid { .. }]));
    // A block is invalidated at its level.
    let block = BASE + MIB2;
    map(&s2, block, MIB2, BLOCKS_YOUNG);
    let mut bm = [0; 8];
    assert_eq!(s2.harvest(Ipa(block), 512, &mut bm[..], flush), Ok(512));
    let events = tlb.take();
    assert!(
        matches!(events[..], [TlbEvent::Ipa { ipa, level: 2, .. }, TlbEvent::Vmid { .. }] if ipa == Ipa(block)),
        "{events:?}"
    );
}

#[test]
fn bad_arguments_change_nothing() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, true);
    let s2 = new_s2(&alloc, &tlb);
    map(&s2, BASE, 4 * KIB4, PAGES_YOUNG);
    let limit = s2.ipa_limit();
    let pattern = 0x5555_aaaa_5555_aaaa;
    let all = HarvestFlags::CLEAR | HarvestFlags::FLUSH;
    let oor = |ipa, npages| Err(HarvestError::OutOfRange { ipa, npages });
    /// (ipa, npages, bitmap words, flags, outcome).
    type Case = (Ipa, u64, usize, HarvestFlags, Result<u64, HarvestError>);
    let cases: [Case; 10] = [
        (
            Ipa(BASE + 0x800),
            1,
            1,
            all,
            Err(HarvestError::Unaligned(Ipa(BASE + 0x800))),
        ),
        (Ipa(limit - KIB4), 2, 1, all, oor(Ipa(limit - KIB4), 2)),
        (Ipa(limit), 1, 1, all, oor(Ipa(limit), 1)),
        (Ipa(BASE), u64::MAX, 1, all, oor(Ipa(BASE), u64::MAX)),
        // npages * 4 KiB overflows to exactly 0.
        (Ipa(BASE), 1 << 52, 1, all, oor(Ipa(BASE), 1 << 52)),
        (
            Ipa(0xffff_ffff_ffff_f000),
            1,
            1,
            all,
            oor(Ipa(0xffff_ffff_ffff_f000), 1),
        ),
        (
            Ipa(BASE),
            65,
            1,
            all,
            Err(HarvestError::BitmapTooSmall {
                needed: 2,
                words: 1,
            }),
        ),
        (
            Ipa(BASE),
            1,
            0,
            HarvestFlags::empty(),
            Err(HarvestError::BitmapTooSmall {
                needed: 1,
                words: 0,
            }),
        ),
        (
            Ipa(BASE),
            4,
            1,
            HarvestFlags::MASK,
            Err(HarvestError::FlagsWithoutClear(HarvestFlags::MASK)),
        ),
        (
            Ipa(BASE),
            4,
            1,
            HarvestFlags::FLUSH | HarvestFlags::MASK,
            Err(HarvestError::FlagsWithoutClear(
                HarvestFlags::FLUSH | HarvestFlags::MASK,
            )),
        ),
    ];
    for (ipa, npages, words, flags, want) in cases {
        let mut bm = vec![pattern; words];
        let got = s2.harvest(ipa, npages, &mut bm[..], flags);
        assert_eq!(got, want, "{ipa} {npages} {flags:?}");
        assert!(bm.iter().all(|&w| w == pattern), "bitmap written");
    }
    // An empty range is fine and touches nothing.
    let mut bm = [pattern];
    assert_eq!(s2.harvest(Ipa(BASE), 0, &mut bm[..], all), Ok(0));
    assert_eq!(bm, [pattern]);
    assert!((0..4).all(|p| af(&s2, page(p)) == Some(true)), "AF kept");
    assert!(tlb.take().is_empty());
    // The errors print their payloads.
    let shown = [
        format!("{}", HarvestError::Unaligned(Ipa(0x800))),
        format!("{}", oor(Ipa(limit), 1).unwrap_err()),
        format!(
            "{}",
            HarvestError::BitmapTooSmall {
                needed: 2,
                words: 1
            }
        ),
        format!("{}", HarvestError::FlagsWithoutClear(HarvestFlags::MASK)),
    ];
    assert_eq!(
        shown,
        [
            "IPA 0x800 is not 4 KiB aligned",
            "1 pages at IPA 0x10000000000 leave the IPA space",
            "bitmap of 1 words, 2 needed",
            "HarvestFlags(MASK) needs CLEAR",
        ]
    );
}

#[test]
fn locked_entry_is_skipped_and_its_flag_carried_over() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, false);
    let s2 = new_s2(&alloc, &tlb);
    map(&s2, BASE, 2 * KIB4, PAGES_YOUNG);
    let mut release = |_, _| {};
    let mut batch = s2.batch(&mut release);
    let mut during = None;
    // The copy runs while the entry is locked for break-before-make.
    s2.migrate_page(page(0), PhysAddr(0x9000_0000), &mut batch, |_, _| {
        let mut bm = [0; 1];
        during = Some((s2.test_clear_young(page(0), 2, &mut bm[..]), bm[0]));
    })
    .unwrap();
    assert_eq!(during, Some((Ok(1), 0b10)), "locked page 0 reported old");
    let mut bm = [0; 1];
    assert_eq!(s2.test_clear_young(page(0), 2, &mut bm[..]), Ok(1));
    assert_eq!(bm, [0b01], "its flag survived in the new entry");
}

// ---- a writer or the hardware between two batches of one harvest ----

std::thread_local! {
    /// Run once at the next `current_cpu` call of [`hooked_rcu`]: that is
    /// the quiescent state between two harvest batches when armed just
    /// before a harvest.
    static AT_QUIESCENT: RefCell<Option<Box<dyn FnOnce()>>> = RefCell::new(None);
}

fn hooked_cpu() -> usize {
    if let Some(hook) = AT_QUIESCENT.with(|h| h.borrow_mut().take()) {
        hook();
    }
    crate::common::current_cpu()
}

/// A table whose RCU domain runs the armed hook at the next quiescent
/// state (leaked, so that hooks may hold on to it).
fn hooked_s2() -> &'static S2<'static> {
    let alloc = Box::leak(Box::new(HostAlloc::new()));
    let tlb = Box::leak(Box::new(RecordingTlb::new(alloc, false)));
    let rcu = Box::leak(Box::new(Rcu::new(hooked_cpu)));
    Box::leak(Box::new(Stage2::new(40, &*alloc, &*tlb, rcu).unwrap()))
}

fn at_next_quiescent(hook: impl FnOnce() + 'static) {
    AT_QUIESCENT.with(|h| *h.borrow_mut() = Some(Box::new(hook)));
}

/// A 2 MiB block at `block`, and a harvest range that starts
/// `HARVEST_BATCH_PAGES - 1` pages before it and ends one page after it:
/// the first batch ends after the block's first page, so the harvester
/// reports the block whole in the first batch and passes a quiescent
/// state before the page after it.
fn straddling(block: u64) -> (Ipa, u64, Vec<u64>) {
    let from = Ipa(block - (HARVEST_BATCH_PAGES - 1) * KIB4);
    let n = HARVEST_BATCH_PAGES - 1 + 512 + 1;
    (from, n, vec![0; n.div_ceil(64) as usize])
}

/// Block pages (0..512) that neither `first` nor `second` reported.
fn block_pages_never_reported(first: &[u64], second: &[u64]) -> Vec<u64> {
    let skip = HARVEST_BATCH_PAGES - 1;
    let reported = |bm: &[u64], p: u64| bm[(p / 64) as usize] & (1 << (p % 64)) != 0;
    (0..512)
        .filter(|&i| !reported(first, skip + i) && !reported(second, skip + i))
        .collect()
}

#[test]
fn hook_runs_between_batches() {
    // The harness of the two tests below: the hook runs exactly once, at
    // the quiescent state between the batches.
    let s2 = hooked_s2();
    let block = 64 * MIB2;
    map(s2, block, MIB2, BLOCKS_OLD);
    let (from, n, mut bm) = straddling(block);
    let ran = std::rc::Rc::new(std::cell::Cell::new(false));
    let seen = ran.clone();
    at_next_quiescent(move || seen.set(true));
    assert_eq!(s2.test_clear_young(from, n, &mut bm[..]), Ok(0));
    assert!(ran.get());
    assert!(AT_QUIESCENT.with(|h| h.borrow().is_none()));
}

/// A block old when the harvest starts, accessed (hardware AF) between
/// its two batches. Which of its pages the guest accessed is unknown, so
/// either this harvest reports all of them or it leaves the flag for the
/// next one; reporting only the second batch's part and clearing the flag
/// loses an access to the first part.
#[test]
fn block_accessed_between_batches_is_not_lost() {
    let s2 = hooked_s2();
    let block = 64 * MIB2;
    map(s2, block, MIB2, BLOCKS_OLD);
    let (from, n, mut first) = straddling(block);
    at_next_quiescent(move || {
        hw_touch(s2, Ipa(block));
    });
    s2.test_clear_young(from, n, &mut first[..]).unwrap();
    let mut second = vec![0; first.len()];
    s2.test_clear_young(from, n, &mut second[..]).unwrap();
    let lost = block_pages_never_reported(&first, &second);
    assert!(lost.is_empty(), "block pages never reported: {lost:?}");
}

/// A block young when the harvest starts (the guest accessed some page of
/// it), split by a writer between the harvest's two batches: the flag the
/// first batch cleared covered every page of the block, so every page must
/// be reported.
#[test]
fn block_split_between_batches_is_not_lost() {
    let s2 = hooked_s2();
    let block = 64 * MIB2;
    map(s2, block, MIB2, BLOCKS_YOUNG);
    let (from, n, mut first) = straddling(block);
    at_next_quiescent(move || {
        s2.protect(Ipa(block + 300 * KIB4), KIB4, Perms::READ)
            .unwrap();
    });
    s2.test_clear_young(from, n, &mut first[..]).unwrap();
    assert_eq!(s2.translate(Ipa(block)).map(|t| t.level), Some(3));
    let mut second = vec![0; first.len()];
    s2.test_clear_young(from, n, &mut second[..]).unwrap();
    let lost = block_pages_never_reported(&first, &second);
    assert!(lost.is_empty(), "{} block pages never reported", lost.len());
}

/// A bitmap that runs a hook when a given word is written (the harvester
/// writes word `w` when it moves past it, in the middle of its walk).
struct HookedBitmap<'h> {
    words: Vec<u64>,
    hook: Option<(usize, Box<dyn FnOnce() + 'h>)>,
}

impl Bitmap for HookedBitmap<'_> {
    fn words(&self) -> usize {
        self.words.len()
    }

    fn load(&self, i: usize) -> u64 {
        self.words[i]
    }

    fn store(&mut self, i: usize, value: u64) {
        if self.hook.as_ref().is_some_and(|(at, _)| *at == i) {
            if let Some((_, hook)) = self.hook.take() {
                hook();
            }
        }
        self.words[i] = value;
    }
}

/// The count a harvest returns is the number of bits it set, even when a
/// writer splits a young block while the harvester visits it (the walk
/// then descends into the new table and meets the same pages again).
#[test]
fn young_count_matches_the_bitmap_when_a_block_splits_mid_visit() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, false);
    let s2 = new_s2(&alloc, &tlb);
    let block = BASE + MIB2;
    map(&s2, block - 64 * KIB4, KIB4, PAGES_YOUNG);
    map(&s2, block, MIB2, BLOCKS_YOUNG);
    let split = || {
        s2.protect(Ipa(block + 300 * KIB4), KIB4, Perms::READ)
            .unwrap();
    };
    // Word 0 (the page before the block) is written when the block's bits
    // start: inside the block's visit.
    let mut bm = HookedBitmap {
        words: vec![0; 9],
        hook: Some((0, Box::new(split))),
    };
    let young = s2.test_young(Ipa(block - 64 * KIB4), 576, &mut bm);
    assert!(bm.hook.is_none(), "the split ran");
    let bits: u32 = bm.words.iter().map(|w| w.count_ones()).sum();
    assert_eq!(bits, 513);
    assert_eq!(young, Ok(u64::from(bits)));
}
