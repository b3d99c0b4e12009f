//! Behaviour of each operation: encodings in real tables, block choice,
//! splits, break-before-make, table reclaim, errors.

use std::string::String;
use std::vec::Vec;

use hyp_core::addr::{Ipa, PhysAddr};
use stage2::desc::LOCKED;
use stage2::{MapError, MapFlags, MemType, Perms, Stage2, Stage2Error, Translation};

use crate::common::{HostAlloc, RecordingTlb, TlbEvent, BLOCKS, GIB1, KIB4, MIB2, PAGES};
use crate::new_s2;

fn rw(level: u8, pa: u64) -> Option<Translation> {
    Some(Translation {
        pa: PhysAddr(pa),
        perms: Perms::RW,
        memtype: MemType::Normal,
        level,
        af: true,
    })
}

#[test]
fn construction_and_vtcr() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, false);
    for bits in [0, 39, 49, 64] {
        assert_eq!(
            Stage2::new(bits, &alloc, &tlb, crate::common::rcu()).err(),
            Some(Stage2Error::UnsupportedIpaBits(bits))
        );
    }
    for (bits, t0sz) in [(40, 24), (44, 20), (48, 16)] {
        let s2 = Stage2::new(bits, &alloc, &tlb, crate::common::rcu()).unwrap();
        assert_eq!(s2.vtcr_t0sz(), t0sz);
        assert!(s2.root().is_page_aligned());
        assert_eq!((s2.table_pages(), s2.mapped_pages()), (1, 0));
    }
    assert_eq!(alloc.live(), 0, "dropping frees the root");
    let none = HostAlloc::with_limit(0);
    assert_eq!(
        Stage2::new(40, &none, &tlb, crate::common::rcu()).err(),
        Some(Stage2Error::NoMemory)
    );
}

#[test]
fn page_descriptor_in_table() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, true);
    let s2 = new_s2(&alloc, &tlb);
    let ipa = Ipa(0x4000_1000);
    s2.map(
        ipa,
        PhysAddr(0x4000_1000),
        KIB4,
        Perms::RW,
        MemType::Normal,
        PAGES,
    )
    .unwrap();
    assert_eq!(
        alloc.read_entry(s2.root(), ipa, 3),
        Some(0x0040_0000_4000_17ff)
    );
    // Every table on the path is a table descriptor to a live page.
    for level in 0..3 {
        let raw = alloc.read_entry(s2.root(), ipa, level).unwrap();
        assert_eq!(raw & 0xfff, 0x003, "table at level {level}");
    }
    assert_eq!(s2.translate(Ipa(0x4000_1abc)), rw(3, 0x4000_1abc));
    assert_eq!(s2.translate(Ipa(0x4000_2000)), None);
    assert_eq!((s2.mapped_pages(), s2.table_pages()), (1, 4));
    assert!(tlb.take().is_empty(), "filling empty slots needs no TLBI");
    // Device, read-only, no AF.
    let dev = Ipa(0x0900_0000);
    let flags = MapFlags { af: false, ..PAGES };
    s2.map(
        dev,
        PhysAddr(0x0900_0000),
        KIB4,
        Perms::READ,
        MemType::Device,
        flags,
    )
    .unwrap();
    assert_eq!(
        alloc.read_entry(s2.root(), dev, 3),
        Some(0x0040_0000_0900_0347)
    );
    let t = s2.translate(dev).unwrap();
    assert_eq!(
        (t.perms, t.memtype, t.af),
        (Perms::READ, MemType::Device, false)
    );
}

#[test]
fn blocks_when_aligned() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, false);
    let s2 = new_s2(&alloc, &tlb);
    // 1 GiB block: root + level-1 table.
    s2.map(
        Ipa(GIB1),
        PhysAddr(0x8000_0000),
        GIB1,
        Perms::RWX,
        MemType::Normal,
        BLOCKS,
    )
    .unwrap();
    assert_eq!(
        alloc.read_entry(s2.root(), Ipa(GIB1), 1),
        Some(0x0000_0000_8000_07fd)
    );
    assert_eq!(
        s2.translate(Ipa(GIB1 + 0x1234_5000))
            .map(|t| (t.level, t.pa)),
        Some((1, PhysAddr(0x9234_5000)))
    );
    assert_eq!((s2.table_pages(), s2.mapped_pages()), (2, 1 << 18));
    // 2 MiB block + one page after it: adds a level-2 and a level-3 table.
    let ipa = Ipa(0x8000_0000);
    s2.map(
        ipa,
        PhysAddr(0x4020_0000),
        MIB2 + KIB4,
        Perms::RW,
        MemType::Normal,
        BLOCKS,
    )
    .unwrap();
    assert_eq!(
        alloc.read_entry(s2.root(), ipa, 2),
        Some(0x0040_0000_4020_07fd)
    );
    assert_eq!(s2.translate(Ipa(0x801f_f000)), rw(2, 0x403f_f000));
    assert_eq!(s2.translate(Ipa(0x8020_0000)), rw(3, 0x4040_0000));
    assert_eq!((s2.table_pages(), s2.mapped_pages()), (4, (1 << 18) + 513));
    // The output is only 4 KiB aligned: pages, even with blocks allowed.
    s2.map(
        Ipa(0xc000_0000),
        PhysAddr(0x4000_1000),
        MIB2,
        Perms::RW,
        MemType::Normal,
        BLOCKS,
    )
    .unwrap();
    assert_eq!(s2.translate(Ipa(0xc000_0000)), rw(3, 0x4000_1000));
    // Blocks not allowed: pages.
    s2.map(
        Ipa(0xc020_0000),
        PhysAddr(0x4000_0000),
        MIB2,
        Perms::RW,
        MemType::Normal,
        PAGES,
    )
    .unwrap();
    assert_eq!(s2.translate(Ipa(0xc03f_f000)), rw(3, 0x401f_f000));
}

#[test]
fn partial_unmap_splits_block_with_bbm() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, true);
    let s2 = new_s2(&alloc, &tlb);
    let base = Ipa(0x4000_0000);
    s2.map(
        base,
        PhysAddr(0x8000_0000),
        MIB2,
        Perms::RW,
        MemType::Normal,
        BLOCKS,
    )
    .unwrap();
    let tables = s2.table_pages();
    let hole = Ipa(0x4010_0000);
    let stats = s2.unmap(hole, KIB4).unwrap();
    assert_eq!((stats.pages_unmapped, stats.tables_freed), (1, 0));
    assert_eq!((s2.mapped_pages(), s2.table_pages()), (511, tables + 1));
    assert_eq!(s2.translate(hole), None);
    assert_eq!(s2.translate(Ipa(0x400f_f000)), rw(3, 0x800f_f000));
    assert_eq!(s2.translate(Ipa(0x4010_1000)), rw(3, 0x8010_1000));
    // The block was broken (locked) before the TLBI and the table made
    // after it; then the page was locked before the batch's TLBI, and
    // made invalid only after it.
    let events = tlb.take();
    assert_eq!(
        events,
        [
            TlbEvent::Ipa {
                ipa: base,
                level: 2,
                entry: Some(LOCKED)
            },
            TlbEvent::Vmid {
                entry: Some(LOCKED)
            },
            TlbEvent::Ipa {
                ipa: hole,
                level: 3,
                entry: Some(LOCKED)
            },
            TlbEvent::Vmid {
                entry: Some(LOCKED)
            },
        ]
    );
    assert_eq!(alloc.read_entry(s2.root(), hole, 3), Some(0));
}

#[test]
fn partial_protect_splits_gib_block_at_edges() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, false);
    let s2 = new_s2(&alloc, &tlb);
    s2.map(
        Ipa(GIB1),
        PhysAddr(2 * GIB1),
        GIB1,
        Perms::RW,
        MemType::Normal,
        BLOCKS,
    )
    .unwrap();
    // [GIB1 + 2 MiB - 4 KiB, GIB1 + 6 MiB + 4 KiB): pages at both edges,
    // whole 2 MiB blocks in the middle.
    let start = GIB1 + MIB2 - KIB4;
    let size = 4 * MIB2 + 2 * KIB4;
    s2.protect(Ipa(start), size, Perms::READ).unwrap();
    let at = |ipa: u64| s2.translate(Ipa(ipa)).map(|t| (t.level, t.perms, t.pa.0));
    assert_eq!(
        at(start - KIB4),
        Some((3, Perms::RW, 2 * GIB1 + MIB2 - 2 * KIB4))
    );
    assert_eq!(at(start), Some((3, Perms::READ, 2 * GIB1 + MIB2 - KIB4)));
    assert_eq!(at(GIB1 + MIB2), Some((2, Perms::READ, 2 * GIB1 + MIB2)));
    assert_eq!(
        at(GIB1 + 4 * MIB2 + KIB4),
        Some((2, Perms::READ, 2 * GIB1 + 4 * MIB2 + KIB4))
    );
    assert_eq!(
        at(GIB1 + 5 * MIB2),
        Some((3, Perms::READ, 2 * GIB1 + 5 * MIB2))
    );
    assert_eq!(
        at(GIB1 + 5 * MIB2 + KIB4),
        Some((3, Perms::RW, 2 * GIB1 + 5 * MIB2 + KIB4))
    );
    assert_eq!(
        at(GIB1 + 100 * MIB2),
        Some((2, Perms::RW, 2 * GIB1 + 100 * MIB2))
    );
    // root + L1 + L2 (from the 1 GiB split) + two L3 tables at the edges.
    assert_eq!((s2.table_pages(), s2.mapped_pages()), (5, 1 << 18));
    // Protect with the same permissions changes nothing and splits nothing.
    let tlbi = tlb.counts();
    s2.protect(Ipa(GIB1 + 200 * MIB2), KIB4, Perms::RW).unwrap();
    assert_eq!((s2.table_pages(), tlb.counts()), (5, tlbi));
    // Unmapping all of it frees every table but the root.
    let stats = s2.unmap(Ipa(GIB1), GIB1).unwrap();
    assert_eq!((stats.pages_unmapped, stats.tables_freed), (1 << 18, 4));
    assert_eq!(
        (s2.table_pages(), s2.mapped_pages(), alloc.live()),
        (1, 0, 1)
    );
}

#[test]
fn remap_uses_break_before_make() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, true);
    let s2 = new_s2(&alloc, &tlb);
    let ipa = Ipa(0x4000_0000);
    s2.map(
        ipa,
        PhysAddr(0x1000_0000),
        KIB4,
        Perms::RW,
        MemType::Normal,
        PAGES,
    )
    .unwrap();
    // Identical: idempotent, no TLBI.
    s2.map(
        ipa,
        PhysAddr(0x1000_0000),
        KIB4,
        Perms::RW,
        MemType::Normal,
        PAGES,
    )
    .unwrap();
    assert!(tlb.take().is_empty());
    // Different output: break, invalidate, make.
    s2.map(
        ipa,
        PhysAddr(0x2000_0000),
        KIB4,
        Perms::RW,
        MemType::Normal,
        PAGES,
    )
    .unwrap();
    assert_eq!(
        tlb.take(),
        [
            TlbEvent::Ipa {
                ipa,
                level: 3,
                entry: Some(LOCKED)
            },
            TlbEvent::Vmid {
                entry: Some(LOCKED)
            },
        ]
    );
    assert_eq!(s2.translate(ipa).unwrap().pa, PhysAddr(0x2000_0000));
    assert_eq!(s2.mapped_pages(), 1);
    // A page with a different output inside a live block: split, then BBM.
    let blk = Ipa(0x4020_0000);
    s2.map(
        blk,
        PhysAddr(0x3000_0000),
        MIB2,
        Perms::RW,
        MemType::Normal,
        BLOCKS,
    )
    .unwrap();
    tlb.take();
    s2.map(
        Ipa(0x4030_0000),
        PhysAddr(0x5000_0000),
        KIB4,
        Perms::READ,
        MemType::Normal,
        BLOCKS,
    )
    .unwrap();
    let levels: Vec<_> = tlb
        .take()
        .into_iter()
        .filter_map(|e| match e {
            TlbEvent::Ipa { level, entry, .. } => Some((level, entry)),
            TlbEvent::Vmid { .. } => None,
        })
        .collect();
    assert_eq!(levels, [(2, Some(LOCKED)), (3, Some(LOCKED))]);
    let t = s2.translate(Ipa(0x4030_0000)).unwrap();
    assert_eq!(
        (t.pa, t.perms, t.level),
        (PhysAddr(0x5000_0000), Perms::READ, 3)
    );
    assert_eq!(s2.translate(Ipa(0x4030_1000)), rw(3, 0x3010_1000));
    assert_eq!(s2.mapped_pages(), 513);
    // Mapping a page identical to part of a block does not split it.
    let tables = s2.table_pages();
    s2.map(
        Ipa(GIB1 * 2),
        PhysAddr(GIB1),
        MIB2,
        Perms::RW,
        MemType::Normal,
        BLOCKS,
    )
    .unwrap();
    s2.map(
        Ipa(GIB1 * 2 + KIB4),
        PhysAddr(GIB1 + KIB4),
        KIB4,
        Perms::RW,
        MemType::Normal,
        PAGES,
    )
    .unwrap();
    assert_eq!(s2.translate(Ipa(GIB1 * 2 + KIB4)), rw(2, GIB1 + KIB4));
    assert_eq!(
        s2.table_pages(),
        tables + 1,
        "a level-2 table, no level-3 one"
    );
}

#[test]
fn unmap_everything_frees_every_table_once() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, false);
    let s2 = new_s2(&alloc, &tlb);
    let ranges = [
        (0x4000_0000, 0x1_0000),
        (0x4080_0000, 3 * MIB2),
        (0x80_0000_0000, GIB1 + KIB4),
        (0xff_ffe0_0000, MIB2),
    ];
    for (i, &(ipa, size)) in ranges.iter().enumerate() {
        let flags = if i % 2 == 0 { PAGES } else { BLOCKS };
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
    let mapped: u64 = ranges.iter().map(|r| r.1 / KIB4).sum();
    assert_eq!(s2.mapped_pages(), mapped);
    let before = s2.table_pages();
    assert_eq!(before as usize, alloc.live());
    let mut freed = 0;
    let mut pages = 0;
    for &(ipa, size) in &ranges {
        let stats = s2.unmap(Ipa(ipa), size).unwrap();
        freed += stats.tables_freed;
        pages += stats.pages_unmapped;
    }
    assert_eq!((pages, s2.mapped_pages()), (mapped, 0));
    assert_eq!((s2.table_pages(), alloc.live()), (1, 1));
    assert_eq!(freed, before - 1);
    let (allocs, frees) = alloc.counts();
    assert_eq!(frees, allocs - 1);
    // Unmapping nothing is fine and frees nothing.
    assert_eq!(s2.unmap(Ipa(0), 1 << 40).unwrap().tables_freed, 0);
    drop(s2);
    assert_eq!(alloc.live(), 0);
}

#[test]
fn drop_frees_all_tables() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, false);
    let s2 = new_s2(&alloc, &tlb);
    s2.map(
        Ipa(0),
        PhysAddr(0),
        4 * MIB2 + KIB4,
        Perms::RW,
        MemType::Normal,
        PAGES,
    )
    .unwrap();
    s2.map(
        Ipa(0x80_0000_0000),
        PhysAddr(0),
        KIB4,
        Perms::RW,
        MemType::Normal,
        PAGES,
    )
    .unwrap();
    assert!(alloc.live() > 5);
    drop(s2);
    let (allocs, frees) = alloc.counts();
    assert_eq!((alloc.live() as u64, frees), (0, allocs));
}

#[test]
fn bad_input_is_rejected() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, false);
    let s2 = new_s2(&alloc, &tlb);
    let map = |ipa, pa, size, perms, mem| s2.map(Ipa(ipa), PhysAddr(pa), size, perms, mem, BLOCKS);
    let n = MemType::Normal;
    assert_eq!(
        map(0x4000_0800, 0, KIB4, Perms::RW, n),
        Err(MapError::Unaligned(Ipa(0x4000_0800)))
    );
    assert_eq!(
        map(0, 0x10, KIB4, Perms::RW, n),
        Err(MapError::UnalignedPhys(PhysAddr(0x10)))
    );
    assert_eq!(
        map(0, 0, 0x1800, Perms::RW, n),
        Err(MapError::UnalignedSize(0x1800))
    );
    assert_eq!(
        map(0x1000, 0, 0, Perms::RW, n),
        Err(MapError::ZeroSize(Ipa(0x1000)))
    );
    let oor = |ipa, size| {
        Err(MapError::OutOfRange {
            ipa: Ipa(ipa),
            size,
        })
    };
    assert_eq!(map(1 << 40, 0, KIB4, Perms::RW, n), oor(1 << 40, KIB4));
    assert_eq!(
        map((1 << 40) - KIB4, 0, 2 * KIB4, Perms::RW, n),
        oor((1 << 40) - KIB4, 2 * KIB4)
    );
    assert_eq!(
        map(u64::MAX - 0x7ff, 0, KIB4, Perms::RW, n),
        Err(MapError::Unaligned(Ipa(u64::MAX - 0x7ff)))
    );
    assert_eq!(
        map(0xffff_ffff_ffff_f000, 0, KIB4, Perms::RW, n),
        oor(0xffff_ffff_ffff_f000, KIB4)
    );
    assert_eq!(
        map(KIB4, 0, u64::MAX - 0xfff, Perms::RW, n),
        oor(KIB4, u64::MAX - 0xfff)
    );
    let pa_oor = |pa, size| {
        Err(MapError::PhysOutOfRange {
            pa: PhysAddr(pa),
            size,
        })
    };
    assert_eq!(map(0, 1 << 48, KIB4, Perms::RW, n), pa_oor(1 << 48, KIB4));
    assert_eq!(
        map(0, u64::MAX - 0xfff, KIB4, Perms::RW, n),
        pa_oor(u64::MAX - 0xfff, KIB4)
    );
    assert_eq!(
        map(0, 0, KIB4, Perms::RWX, MemType::Device),
        Err(MapError::ExecutableDevice(Ipa(0)))
    );
    assert_eq!(
        s2.unmap(Ipa(0x10), KIB4),
        Err(MapError::Unaligned(Ipa(0x10)))
    );
    assert_eq!(s2.unmap(Ipa(0), 0), Err(MapError::ZeroSize(Ipa(0))));
    assert_eq!(
        s2.protect(Ipa(1 << 40), KIB4, Perms::READ),
        oor(1 << 40, KIB4)
    );
    assert_eq!(s2.translate(Ipa(u64::MAX)), None);
    assert!(!s2.set_access_flag(Ipa(1 << 40)));
    assert_eq!(s2.test_and_clear_young(Ipa(u64::MAX)), None);
    assert_eq!(
        (s2.table_pages(), s2.mapped_pages()),
        (1, 0),
        "nothing was touched"
    );
    // Errors print their payload.
    let text = std::format!(
        "{}",
        MapError::OutOfRange {
            ipa: Ipa(1 << 40),
            size: KIB4
        }
    );
    assert_eq!(
        text,
        "IPA range 0x10000000000+0x1000 is outside the IPA space"
    );
}

#[test]
fn out_of_table_pages() {
    let alloc = HostAlloc::with_limit(3);
    let tlb = RecordingTlb::new(&alloc, false);
    let s2 = new_s2(&alloc, &tlb);
    let ipa = Ipa(0x4000_0000);
    // Needs root + 3 tables: the level-3 table does not fit.
    assert_eq!(
        s2.map(ipa, PhysAddr(0), KIB4, Perms::RW, MemType::Normal, PAGES),
        Err(MapError::NoMemory)
    );
    assert_eq!((s2.mapped_pages(), s2.table_pages()), (0, 3));
    // A 2 MiB block fits in the tables there are.
    s2.map(ipa, PhysAddr(0), MIB2, Perms::RW, MemType::Normal, BLOCKS)
        .unwrap();
    // Splitting it needs a fourth table: refused, block intact.
    assert_eq!(s2.unmap(ipa, KIB4), Err(MapError::NoMemory));
    assert_eq!(s2.translate(ipa).map(|t| t.level), Some(2));
    // Unmapping the whole block reclaims the empty tables.
    s2.unmap(ipa, MIB2).unwrap();
    assert_eq!(
        (s2.mapped_pages(), s2.table_pages(), alloc.live()),
        (0, 1, 1)
    );
}

#[test]
fn access_flag() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, true);
    let s2 = new_s2(&alloc, &tlb);
    let old = MapFlags {
        af: false,
        allow_blocks: true,
    };
    s2.map(
        Ipa(0x4000_0000),
        PhysAddr(0x4000_0000),
        MIB2,
        Perms::RW,
        MemType::Normal,
        old,
    )
    .unwrap();
    // Splitting a block keeps its AF (clear here) on every page.
    let other = Ipa(0x4020_0000);
    s2.map(
        other,
        PhysAddr(0x4020_0000),
        MIB2,
        Perms::RW,
        MemType::Normal,
        old,
    )
    .unwrap();
    s2.unmap(other, KIB4).unwrap();
    assert_eq!(
        s2.translate(Ipa(0x4020_1000)).map(|t| (t.level, t.af)),
        Some((3, false))
    );
    s2.unmap(other, MIB2).unwrap();
    let probe = Ipa(0x4012_3000);
    assert_eq!(s2.translate(probe).map(|t| t.af), Some(false));
    assert_eq!(s2.test_and_clear_young(probe), Some(false));
    assert!(s2.set_access_flag(probe));
    assert_eq!(
        s2.translate(Ipa(0x4000_0000)).map(|t| t.af),
        Some(true),
        "the whole block"
    );
    assert_eq!(
        alloc.read_entry(s2.root(), probe, 2),
        Some(0x0040_0000_4000_07fd)
    );
    assert_eq!(s2.test_and_clear_young(probe), Some(true));
    assert_eq!(s2.test_and_clear_young(probe), Some(false));
    assert!(!s2.set_access_flag(Ipa(0x4020_0000)), "not mapped");
    assert_eq!(s2.test_and_clear_young(Ipa(0x4020_0000)), None);
    // A split keeps AF per page; re-mapping identically with AF sets it
    // without a TLBI.
    s2.set_access_flag(probe);
    s2.protect(probe, KIB4, Perms::READ).unwrap();
    assert_eq!(
        s2.translate(Ipa(0x4000_0000)).map(|t| (t.level, t.af)),
        Some((3, true))
    );
    s2.test_and_clear_young(Ipa(0x4000_0000));
    tlb.take();
    let young = MapFlags {
        af: true,
        allow_blocks: false,
    };
    s2.map(
        Ipa(0x4000_0000),
        PhysAddr(0x4000_0000),
        KIB4,
        Perms::RW,
        MemType::Normal,
        young,
    )
    .unwrap();
    assert_eq!(s2.translate(Ipa(0x4000_0000)).map(|t| t.af), Some(true));
    assert!(tlb.take().is_empty());
    assert!(s2
        .translate(probe)
        .is_some_and(|t| t.af && t.perms == Perms::READ));
}

#[test]
fn device_is_never_executable() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, false);
    let s2 = new_s2(&alloc, &tlb);
    s2.map(
        Ipa(0x0900_0000),
        PhysAddr(0x0900_0000),
        KIB4,
        Perms::RW,
        MemType::Device,
        PAGES,
    )
    .unwrap();
    s2.protect(Ipa(0x0900_0000), KIB4, Perms::RWX).unwrap();
    let t = s2.translate(Ipa(0x0900_0000)).unwrap();
    assert_eq!((t.perms, t.memtype), (Perms::RW, MemType::Device));
}

#[test]
fn dump_lists_tables_and_leaves() {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, false);
    let s2 = new_s2(&alloc, &tlb);
    s2.map(
        Ipa(0x4000_0000),
        PhysAddr(0x8000_0000),
        MIB2 + KIB4,
        Perms::RWX,
        MemType::Normal,
        BLOCKS,
    )
    .unwrap();
    let mut out = String::new();
    s2.dump(&mut out).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 5, "{out}");
    assert!(lines[0].starts_with("L0 0x000000000000 table -> "), "{out}");
    assert!(lines[1].starts_with("L1 0x000040000000 table -> "), "{out}");
    assert_eq!(
        lines[2],
        "L2 0x000040000000 block -> 0x000080000000 rwx normal af"
    );
    assert!(lines[3].starts_with("L2 0x000040200000 table -> "), "{out}");
    assert_eq!(
        lines[4],
        "L3 0x000040200000 page  -> 0x000080200000 rwx normal af"
    );
}
