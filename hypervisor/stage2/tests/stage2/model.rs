//! Property tests: random map / unmap / leaf-only unmap / protect /
//! empty-table scan sequences checked against a simple model (and, after a
//! scan of everything, the table count against the tables the leaves
//! need), and random (mostly bad) arguments checked against the argument
//! rules.

use std::collections::{BTreeMap, BTreeSet};
use std::vec::Vec;

use hyp_core::addr::{Ipa, PhysAddr};
use proptest::prelude::*;
use stage2::desc::{level_size, LEAF_LEVEL};
use stage2::{
    DescView, MapError, MapFlags, MemType, Perms, S2Attrs, VisitCtx, VisitKind, Visitor, WalkFlags,
};

use crate::common::{HostAlloc, RecordingTlb, KIB4};
use crate::{new_s2, S2};

const MIB2_PAGES: u64 = 512;
/// A small window probed page by page.
const WIN: u64 = 0x4000_0000;
const WIN_PAGES: u64 = 2048;
/// A 1 GiB-aligned region (under another level-0 entry) for 1 GiB blocks.
const GIB: u64 = 0xc0_0000_0000;
const GIB_PAGES: u64 = 1 << 18;
/// Largest range mapped with pages only (keeps a case fast).
const MAX_PAGE_MAP: u64 = 2 * WIN_PAGES;

#[derive(Copy, Clone, Debug)]
enum Op {
    Map {
        ipa: u64,
        pages: u64,
        pa: u64,
        perms: Perms,
        mem: MemType,
        flags: MapFlags,
    },
    Unmap {
        ipa: u64,
        pages: u64,
    },
    /// `unmap_leaves_batched`: emptied tables stay.
    UnmapLeaves {
        ipa: u64,
        pages: u64,
    },
    /// `reclaim_empty_tables`: no change to any translation.
    ReclaimEmpty {
        ipa: u64,
        pages: u64,
    },
    Protect {
        ipa: u64,
        pages: u64,
        perms: Perms,
    },
}

/// A mapped run of the model: `[start, end)` -> `pa..`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
struct Run {
    end: u64,
    pa: u64,
    perms: Perms,
    mem: MemType,
}

/// The model: non-overlapping runs keyed by their start IPA.
#[derive(Default, Debug)]
struct Model {
    runs: BTreeMap<u64, Run>,
}

impl Model {
    /// Removes `[start, end)` and returns the pieces that were mapped there.
    fn cut(&mut self, start: u64, end: u64) -> Vec<(u64, Run)> {
        let hit: Vec<u64> = self
            .runs
            .range(..end)
            .rev()
            .take_while(|(_, r)| r.end > start)
            .map(|(&k, _)| k)
            .collect();
        let mut cut = Vec::new();
        for k in hit {
            let r = self.runs.remove(&k).unwrap();
            if k < start {
                self.runs.insert(k, Run { end: start, ..r });
            }
            if r.end > end {
                self.runs.insert(
                    end,
                    Run {
                        pa: r.pa + (end - k),
                        ..r
                    },
                );
            }
            let lo = k.max(start);
            cut.push((
                lo,
                Run {
                    end: r.end.min(end),
                    pa: r.pa + (lo - k),
                    ..r
                },
            ));
        }
        cut
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Map {
                ipa,
                pages,
                pa,
                perms,
                mem,
                ..
            } => {
                let end = ipa + pages * KIB4;
                self.cut(ipa, end);
                self.runs.insert(
                    ipa,
                    Run {
                        end,
                        pa,
                        perms,
                        mem,
                    },
                );
            }
            Op::Unmap { ipa, pages } | Op::UnmapLeaves { ipa, pages } => {
                self.cut(ipa, ipa + pages * KIB4);
            }
            Op::ReclaimEmpty { .. } => {}
            Op::Protect { ipa, pages, perms } => {
                for (k, r) in self.cut(ipa, ipa + pages * KIB4) {
                    let perms = match r.mem {
                        MemType::Normal => perms,
                        MemType::Device => perms - Perms::EXEC,
                    };
                    self.runs.insert(k, Run { perms, ..r });
                }
            }
        }
    }

    fn lookup(&self, ipa: u64) -> Option<(u64, Perms, MemType)> {
        let (&k, r) = self.runs.range(..=ipa).next_back()?;
        (ipa < r.end).then_some((r.pa + (ipa - k), r.perms, r.mem))
    }

    fn pages(&self) -> u64 {
        self.runs.iter().map(|(k, r)| (r.end - k) / KIB4).sum()
    }

    /// Whether the model maps all of `[ipa, ipa + size)` exactly like one
    /// leaf with output `pa` and `attrs`.
    fn agrees_with_leaf(&self, ipa: u64, size: u64, pa: u64, attrs: S2Attrs) -> bool {
        let mut at = ipa;
        while at < ipa + size {
            match self.runs.range(..=at).next_back() {
                Some((&k, r))
                    if at < r.end
                        && r.pa + (at - k) == pa + (at - ipa)
                        && r.perms == attrs.perms()
                        && r.mem == attrs.mem_type() =>
                {
                    at = r.end;
                }
                _ => return false,
            }
        }
        true
    }
}

/// Collects every valid leaf; fails on a locked entry.
#[derive(Default)]
struct Leaves(Vec<(u64, u64, u64, S2Attrs)>);

impl Visitor for Leaves {
    type Error = u64;

    fn visit(&mut self, ctx: &VisitCtx<'_>) -> Result<(), u64> {
        assert_eq!(ctx.kind, VisitKind::Leaf);
        match ctx.view() {
            DescView::Locked => Err(ctx.ipa.0),
            view => {
                if let Some((pa, attrs)) = view.leaf_parts() {
                    self.0.push((ctx.ipa.0, ctx.size(), pa.0, attrs));
                }
                Ok(())
            }
        }
    }
}

/// The table pages that the leaves `(ipa, size, ..)` need: the root, and
/// for each leaf at level `l`, the tables of levels `1..=l` on its path
/// (one per range covered by an entry of the level above).
fn needed_tables(leaves: &[(u64, u64, u64, S2Attrs)]) -> u64 {
    let mut tables = BTreeSet::new();
    for &(ipa, size, _, _) in leaves {
        let level = (1..=LEAF_LEVEL)
            .find(|&l| level_size(l) == size)
            .expect("leaf size");
        for l in 1..=level {
            tables.insert((l, ipa & !(level_size(l - 1) - 1)));
        }
    }
    1 + tables.len() as u64
}

fn perms() -> impl Strategy<Value = Perms> {
    (0u8..8).prop_map(Perms::from_bits_truncate)
}

/// `(first page, pages)` inside a region of `total` pages: page-granular
/// ranges and 2 MiB-granular ones.
fn span(total: u64, max_pages: u64) -> impl Strategy<Value = (u64, u64)> {
    let chunks = total / MIB2_PAGES;
    prop_oneof![
        (0..total, 1..=max_pages).prop_map(move |(f, n)| (f, n.min(total - f))),
        (0..chunks, 1..=4u64)
            .prop_map(move |(c, n)| (c * MIB2_PAGES, n.min(chunks - c) * MIB2_PAGES)),
    ]
}

/// `(ipa, pages)` in the window or in the 1 GiB region.
fn range() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        3 => span(WIN_PAGES, 600).prop_map(|(f, n)| (WIN + f * KIB4, n)),
        1 => span(GIB_PAGES, 600).prop_map(|(f, n)| (GIB + f * KIB4, n)),
        1 => Just((GIB, GIB_PAGES)),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let pa = prop_oneof![
        // Same offset as the IPA in a 1 GiB-aligned frame: blocks possible.
        (1u64..64).prop_map(|g| (g << 30, true)),
        // Only 2 MiB-aligned relative to the IPA.
        (1u64..1024).prop_map(|m| ((m << 21) + (1 << 30), true)),
        // Anything page aligned.
        (0u64..(1 << 28)).prop_map(|p| (p * KIB4, false)),
    ];
    let map = (
        range(),
        pa,
        perms(),
        prop::bool::weighted(0.2),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|((ipa, pages), (pa, aligned), perms, device, af, blocks)| {
            let big = pages > MAX_PAGE_MAP;
            let pa = if aligned {
                pa + ipa % (1 << 30)
            } else if big {
                ipa + (1 << 30)
            } else {
                pa
            };
            let (mem, perms) = if device {
                (MemType::Device, perms - Perms::EXEC)
            } else {
                (MemType::Normal, perms)
            };
            let flags = MapFlags {
                af,
                allow_blocks: blocks || big,
            };
            Op::Map {
                ipa,
                pages,
                pa,
                perms,
                mem,
                flags,
            }
        });
    prop_oneof![
        3 => map,
        2 => range().prop_map(|(ipa, pages)| Op::Unmap { ipa, pages }),
        1 => range().prop_map(|(ipa, pages)| Op::UnmapLeaves { ipa, pages }),
        1 => range().prop_map(|(ipa, pages)| Op::ReclaimEmpty { ipa, pages }),
        2 => (range(), perms()).prop_map(|((ipa, pages), perms)| Op::Protect { ipa, pages, perms }),
    ]
}

fn run(s2: &S2<'_>, op: Op) -> Result<(), MapError> {
    match op {
        Op::Map {
            ipa,
            pages,
            pa,
            perms,
            mem,
            flags,
        } => s2.map(Ipa(ipa), PhysAddr(pa), pages * KIB4, perms, mem, flags),
        Op::Unmap { ipa, pages } => s2.unmap(Ipa(ipa), pages * KIB4).map(drop),
        Op::UnmapLeaves { ipa, pages } => {
            let mut release = |_, _| {};
            let mut batch = s2.batch(&mut release);
            let stats = s2.unmap_leaves_batched(Ipa(ipa), pages * KIB4, &mut batch)?;
            assert_eq!(stats.tables_freed, 0);
            Ok(())
        }
        Op::ReclaimEmpty { ipa, pages } => {
            let mut release = |_, _| {};
            let mut batch = s2.batch(&mut release);
            let tables = s2.table_pages();
            let removed = s2.reclaim_empty_tables(Ipa(ipa), pages * KIB4, &mut batch)?;
            drop(batch);
            // No CPU is online: the flush freed them at once.
            assert_eq!(s2.table_pages(), tables - removed);
            Ok(())
        }
        Op::Protect { ipa, pages, perms } => s2.protect(Ipa(ipa), pages * KIB4, perms),
    }
}

/// Compares the table with the model both ways at `ipa`.
fn probe(s2: &S2<'_>, model: &Model, ipa: u64) -> Result<(), TestCaseError> {
    let got = s2.translate(Ipa(ipa)).map(|t| (t.pa.0, t.perms, t.memtype));
    prop_assert_eq!(got, model.lookup(ipa), "at IPA {:#x}", ipa);
    Ok(())
}

fn check_sequence(ops: &[Op]) -> Result<(), TestCaseError> {
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, false);
    let s2 = new_s2(&alloc, &tlb);
    let mut model = Model::default();
    for &op in ops {
        prop_assert_eq!(run(&s2, op), Ok(()), "{:?}", op);
        model.apply(op);
        prop_assert_eq!(s2.mapped_pages(), model.pages(), "after {:?}", op);
        prop_assert_eq!(s2.table_pages() as usize, alloc.live());
    }
    // Table => model: every leaf agrees with the model, and leaves cover as
    // many pages as the model maps, so the two mapped sets are equal.
    let mut leaves = Leaves::default();
    let walked = s2.walk(Ipa(0), 1 << 40, WalkFlags::LEAF, &mut leaves);
    prop_assert_eq!(walked, Ok(()), "locked entry left behind");
    let mut covered = 0;
    for &(ipa, size, pa, attrs) in &leaves.0 {
        prop_assert!(
            model.agrees_with_leaf(ipa, size, pa, attrs),
            "leaf {:#x}+{:#x}",
            ipa,
            size
        );
        prop_assert!(matches!(size, 0x1000 | 0x20_0000 | 0x4000_0000));
        covered += size / KIB4;
    }
    prop_assert_eq!(covered, model.pages());
    // A scan of everything leaves exactly the tables the leaves need.
    let tables_before = s2.table_pages();
    let removed = {
        let mut release = |_, _| {};
        let mut batch = s2.batch(&mut release);
        s2.reclaim_empty_tables(Ipa(0), 1 << 40, &mut batch)
    };
    prop_assert_eq!(removed, Ok(tables_before - s2.table_pages()));
    prop_assert_eq!(s2.table_pages(), needed_tables(&leaves.0));
    prop_assert_eq!(s2.table_pages() as usize, alloc.live());
    // Model <=> translate: every page of the window, run edges and samples
    // of the 1 GiB region.
    for page in 0..WIN_PAGES {
        probe(&s2, &model, WIN + page * KIB4)?;
    }
    let edges = model
        .runs
        .iter()
        .flat_map(|(&k, r)| [k, r.end - KIB4, r.end, k.saturating_sub(KIB4)]);
    let samples = (0..GIB_PAGES).step_by(509).map(|p| GIB + p * KIB4);
    for ipa in edges.chain(samples) {
        probe(&s2, &model, ipa)?;
    }
    // Unmapping everything leaves the root only; each table freed once
    // (the allocator panics on a double free).
    s2.unmap(Ipa(WIN), WIN_PAGES * KIB4).unwrap();
    s2.unmap(Ipa(GIB), GIB_PAGES * KIB4).unwrap();
    prop_assert_eq!(
        (s2.mapped_pages(), s2.table_pages(), alloc.live()),
        (0, 1, 1)
    );
    let (allocs, frees) = alloc.counts();
    prop_assert_eq!(frees + 1, allocs);
    drop(s2);
    prop_assert_eq!(alloc.live(), 0);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn random_sequences_match_model(ops in prop::collection::vec(op(), 1..16)) {
        check_sequence(&ops)?;
    }
}

/// Interesting values for addresses and sizes: powers of two and their
/// neighbours, the IPA and PA limits, page multiples, anything.
fn edgy() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        (0u32..64, -2i64..=2).prop_map(|(s, d)| (1u64 << s).wrapping_add_signed(d * 0x1000)),
        (0u32..64, -2i64..=2).prop_map(|(s, d)| (1u64 << s).wrapping_add_signed(d)),
        (0u64..32).prop_map(|p| p * KIB4),
        Just(u64::MAX),
        Just(!0xfff),
    ]
}

/// What the rules say about a writer's IPA range (40-bit IPA space).
fn range_rule(ipa: u64, size: u64) -> Result<(), MapError> {
    if size == 0 {
        Err(MapError::ZeroSize(Ipa(ipa)))
    } else if !ipa.is_multiple_of(KIB4) {
        Err(MapError::Unaligned(Ipa(ipa)))
    } else if !size.is_multiple_of(KIB4) {
        Err(MapError::UnalignedSize(size))
    } else if ipa.checked_add(size).is_none_or(|end| end > 1 << 40) {
        Err(MapError::OutOfRange {
            ipa: Ipa(ipa),
            size,
        })
    } else {
        Ok(())
    }
}

/// What the rules say about a map.
fn map_rule(ipa: u64, pa: u64, size: u64, perms: Perms, mem: MemType) -> Result<(), MapError> {
    range_rule(ipa, size)?;
    if !pa.is_multiple_of(KIB4) {
        Err(MapError::UnalignedPhys(PhysAddr(pa)))
    } else if pa.checked_add(size).is_none_or(|end| end > 1 << 48) {
        Err(MapError::PhysOutOfRange {
            pa: PhysAddr(pa),
            size,
        })
    } else if mem == MemType::Device && perms.contains(Perms::EXEC) {
        Err(MapError::ExecutableDevice(Ipa(ipa)))
    } else {
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn bad_arguments_are_errors(ipa in edgy(), pa in edgy(), size in edgy(), perms in perms(), device in any::<bool>()) {
        let alloc = HostAlloc::new();
        let tlb = RecordingTlb::new(&alloc, false);
        let s2 = new_s2(&alloc, &tlb);
        let mem = if device { MemType::Device } else { MemType::Normal };
        let want = map_rule(ipa, pa, size, perms, mem);
        // A valid map is only done when cheap: few pages or 1 GiB blocks.
        let gib = level_size(1);
        let cheap = size <= 256 * KIB4 || (ipa % gib == 0 && pa % gib == 0 && size % gib == 0);
        if want.is_err() || cheap {
            let flags = MapFlags { af: true, allow_blocks: true };
            prop_assert_eq!(s2.map(Ipa(ipa), PhysAddr(pa), size, perms, mem, flags), want);
        }
        prop_assert_eq!(s2.protect(Ipa(ipa), size, Perms::READ), range_rule(ipa, size));
        prop_assert_eq!(s2.unmap(Ipa(ipa), size).map(drop), range_rule(ipa, size));
        prop_assert_eq!((s2.mapped_pages(), s2.table_pages()), (0, 1));
    }
}
