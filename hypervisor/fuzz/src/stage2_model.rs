//! Target `stage2_model`: the stage-2 engine (crate `stage2`, checking
//! mode on: it panics on a pending frame reused, a valid-to-valid change
//! without break-before-make, or a table freed without flush and grace
//! period) driven by a sequence of operations decoded from the input, and
//! compared with a simple model after each one.
//!
//! The model is a map of runs `start -> (end, pa, perms, memtype, af)`.
//! The engine's leaf geometry (which pages share a block) is not modelled:
//! it is read from the table, and checked instead, leaf by leaf, against
//! the model (aligned, one contiguous output range, one set of attributes,
//! one access flag). Operations whose effect depends on that geometry (the
//! access flag of a block, `MASK`ed clears, migration of pages only) use
//! the leaves found before the operation.
//!
//! After every operation:
//! - its result is the one the model and the argument rules predict;
//! - the leaves around its range agree with the model, and cover exactly
//!   the pages the model maps there; no entry is left locked;
//! - `mapped_pages` is the model's page count, `table_pages` the
//!   allocator's live pages, and the checker has nothing pending;
//! - the shadow TLB ([`ShadowTlb`]) holds no translation that the table
//!   no longer has (stale entry after an unmap, a protect, a split, a
//!   migration, a table removal; after a `FLUSH` harvest, none for a leaf
//!   it cleared), and a harvest without `FLUSH` invalidated nothing;
//! - the release callbacks got back exactly the frames unmapped.
//!
//! At the end: the whole table against the model, `dump`, a scan of
//! everything leaving exactly the tables the leaves need, a full unmap
//! leaving the root only, and every table page freed once when the table
//! is dropped (the allocator panics on a double free, a walk into a freed
//! page, and a write to one).
//!
//! A second RCU CPU can be put online (a reader in the middle of a walk):
//! then unlinked tables must wait for it, and the harness lets it pass
//! quiescent states as an operation.
//!
//! The table-page allocator can be limited: a writer that runs out of
//! table pages must fail with `NoMemory` leaving every page of its range
//! either as it was or as the whole operation would have left it, nothing
//! locked and the counters right (the model then takes the table's state
//! for that range).

use std::cell::RefCell;
use std::collections::BTreeMap;

use hyp_core::addr::{Ipa, PhysAddr};
use stage2::desc::{level_size, LEAF_LEVEL, PA_LIMIT};
use stage2::{
    DescView, FaultOutcome, HarvestError, HarvestFlags, MapError, MapFlags, MemType,
    MigrateOutcome, Perms, PinError, S2Attrs, Stage2, Stage2Error, VisitCtx, Visitor, WalkFlags,
};

use crate::edge::{edgy, pick, Result, Unstructured, PAGE};
use crate::host::{as_cpu, rcu_reset, HostAlloc, ShadowTlb, TlbEntry, RCU};

const MIB2: u64 = 0x20_0000;
const GIB: u64 = 0x4000_0000;
/// Maps of more pages than this use blocks (and a block-aligned output),
/// so that one operation stays cheap.
const MAX_PAGE_MAP: u64 = 4096;
/// Most leaves one map may install (about: tables that exist already
/// add pages), so that one operation stays cheap.
const MAX_MAP_LEAVES: u64 = 8192;
/// Operations per input.
const MAX_OPS: usize = 48;
/// With CPU 1 holding up grace periods, above this many live table pages
/// the harness puts it offline before an operation that can unlink tables
/// (it can unlink at most the live ones), so that the deferred-free queue
/// (256 pages) never fills while CPU 1 is online: a full queue waits for a
/// grace period, which a single thread cannot end from inside the wait.
const CPU1_TABLE_LIMIT: u64 = 192;

type S2<'a> = Stage2<'static, &'a HostAlloc, &'a ShadowTlb>;

/// Panics with the operations so far when `cond` is false.
macro_rules! ensure {
    ($h:expr, $cond:expr, $($arg:tt)+) => {
        if !$cond {
            panic!("{}\n--- operations so far ---\n{}", format!($($arg)+), $h.history.join("\n"));
        }
    };
}

/// [`ensure!`] for equality.
macro_rules! ensure_eq {
    ($h:expr, $left:expr, $right:expr, $($arg:tt)+) => {{
        let (l, r) = (&$left, &$right);
        ensure!($h, l == r, "{}: {:?} != {:?}", format!($($arg)+), l, r);
    }};
}

// ---- the model ----

/// A mapped run `[start, end)` -> `pa..`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
struct Run {
    end: u64,
    pa: u64,
    perms: Perms,
    mem: MemType,
    af: bool,
}

/// Non-overlapping runs keyed by their first IPA.
#[derive(Clone, Default, Debug)]
struct Model {
    runs: BTreeMap<u64, Run>,
}

impl Model {
    /// The runs overlapping `[start, end)`, clipped to it.
    fn pieces(&self, start: u64, end: u64) -> Vec<(u64, Run)> {
        let mut out: Vec<(u64, Run)> = self
            .runs
            .range(..end)
            .rev()
            .take_while(|(_, r)| r.end > start)
            .map(|(&k, r)| {
                let lo = k.max(start);
                (
                    lo,
                    Run {
                        end: r.end.min(end),
                        pa: r.pa + (lo - k),
                        ..*r
                    },
                )
            })
            .collect();
        out.reverse();
        out
    }

    /// Removes `[start, end)`; returns the pieces that were mapped there.
    fn cut(&mut self, start: u64, end: u64) -> Vec<(u64, Run)> {
        let pieces = self.pieces(start, end);
        let hit: Vec<u64> = self
            .runs
            .range(..end)
            .rev()
            .take_while(|(_, r)| r.end > start)
            .map(|(&k, _)| k)
            .collect();
        for k in hit {
            let r = self.runs.remove(&k).expect("run");
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
        }
        pieces
    }

    fn map(&mut self, start: u64, run: Run) {
        self.cut(start, run.end);
        self.runs.insert(start, run);
    }

    /// Applies `f` to the mapped pages of `[start, end)`.
    fn update(&mut self, start: u64, end: u64, f: impl Fn(&mut Run)) {
        for (k, mut r) in self.cut(start, end) {
            f(&mut r);
            self.runs.insert(k, r);
        }
    }

    /// Output address (byte offset included) and run of `ipa`.
    fn lookup(&self, ipa: u64) -> Option<(u64, Run)> {
        let (&k, r) = self.runs.range(..=ipa).next_back()?;
        (ipa < r.end).then(|| (r.pa + (ipa - k), *r))
    }

    fn pages_in(&self, start: u64, end: u64) -> u64 {
        self.pieces(start, end)
            .iter()
            .map(|(k, r)| (r.end - k) / PAGE)
            .sum()
    }

    fn pages(&self) -> u64 {
        self.runs.iter().map(|(k, r)| (r.end - k) / PAGE).sum()
    }

    /// Whether the model maps all of `leaf` exactly like it.
    fn agrees_with(&self, leaf: &Leaf) -> bool {
        let mut at = leaf.base;
        while at < leaf.end() {
            match self.runs.range(..=at).next_back() {
                Some((&k, r))
                    if at < r.end
                        && r.pa + (at - k) == leaf.pa + (at - leaf.base)
                        && r.perms == leaf.attrs.perms()
                        && r.mem == leaf.attrs.mem_type()
                        && r.af == leaf.attrs.af() =>
                {
                    at = r.end;
                }
                _ => return false,
            }
        }
        true
    }
}

// ---- reading the table ----

/// One valid leaf of the table.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
struct Leaf {
    base: u64,
    level: u8,
    pa: u64,
    attrs: S2Attrs,
}

impl Leaf {
    fn size(&self) -> u64 {
        level_size(self.level)
    }

    fn end(&self) -> u64 {
        self.base + self.size()
    }
}

/// Collects the valid leaves a walk meets, and the first locked entry.
#[derive(Default)]
struct Leaves {
    leaves: Vec<Leaf>,
    locked: Option<(u64, u8)>,
}

impl Visitor for Leaves {
    type Error = std::convert::Infallible;

    fn visit(&mut self, ctx: &VisitCtx<'_>) -> std::result::Result<(), Self::Error> {
        match ctx.view() {
            DescView::Locked => {
                self.locked.get_or_insert((ctx.ipa.0, ctx.level));
            }
            view => {
                if let Some((pa, attrs)) = view.leaf_parts() {
                    self.leaves.push(Leaf {
                        base: ctx.ipa.0,
                        level: ctx.level,
                        pa: pa.0,
                        attrs,
                    });
                }
            }
        }
        Ok(())
    }
}

/// The table pages the leaves need: the root, and for each leaf at level
/// `l` the tables of levels `1..=l` on its path.
fn needed_tables(leaves: &[Leaf]) -> u64 {
    let mut tables = std::collections::BTreeSet::new();
    for leaf in leaves {
        for l in 1..=leaf.level {
            tables.insert((l, leaf.base & !(level_size(l - 1) - 1)));
        }
    }
    1 + tables.len() as u64
}

// ---- operations ----

/// What a writer operation is given as its range.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum RangeOp {
    Unmap,
    UnmapLeaves,
    Reclaim,
    Protect(Perms),
}

#[derive(Clone, Debug)]
enum Op {
    Map {
        ipa: u64,
        size: u64,
        pa: u64,
        perms: Perms,
        mem: MemType,
        flags: MapFlags,
    },
    Range {
        op: RangeOp,
        ipa: u64,
        size: u64,
    },
    Fault {
        ipa: u64,
        pa: u64,
        perms: Perms,
        mem: MemType,
        af: bool,
    },
    Migrate {
        ipa: u64,
        new: u64,
    },
    Translate {
        ipa: u64,
    },
    /// A guest access: the translation goes into the TLB, and with
    /// hardware AF (`set_af`) the access flag is set.
    Access {
        ipa: u64,
        set_af: bool,
    },
    TestClearYoung {
        ipa: u64,
    },
    Harvest {
        ipa: u64,
        npages: u64,
        flags: HarvestFlags,
        /// Words of the bitmap relative to what the range needs.
        extra_words: i8,
        /// Initial content of the bitmap (the `MASK` input).
        fill: u64,
    },
    Pin {
        ipa: u64,
    },
    /// CPU `cpu` passes a quiescent state; then deferred tables are freed.
    Quiescent {
        cpu: usize,
    },
    /// CPU 1 goes online (a reader enters a walk) or offline.
    Cpu1Online(bool),
    /// Table-page allocations fail once this many more pages are live
    /// (`None`: never).
    TableLimit(Option<u8>),
    /// Faults on `count` pages `stride` apart from `ipa` (many tables at
    /// once), then optionally a writer over the whole span.
    Scatter {
        ipa: u64,
        count: u8,
        stride: u64,
        then: Option<RangeOp>,
    },
}

/// The address regions operations are drawn from: each crosses or ends at
/// an entry boundary of some level.
fn regions(limit: u64) -> [(u64, u64); 5] {
    [
        // Inside one 1 GiB entry: four 2 MiB entries.
        (GIB, 4 * MIB2),
        // Across a level-1 (1 GiB) boundary.
        (2 * GIB - 2 * MIB2, 4 * MIB2),
        // Across a level-0 (512 GiB) boundary.
        (512 * GIB - 2 * MIB2, 4 * MIB2),
        // A whole gigabyte under another level-0 entry: 1 GiB blocks.
        (768 * GIB, GIB),
        // The top of the IPA space.
        (limit - 4 * MIB2, 4 * MIB2),
    ]
}

/// Decodes inputs into operations for one table.
struct Decoder {
    regions: [(u64, u64); 5],
    limit: u64,
}

impl Decoder {
    /// `(ipa, size)` inside a region, biased to 2 MiB edges.
    fn range(&self, u: &mut Unstructured<'_>) -> Result<(u64, u64)> {
        let (base, len) = self.regions[u.choose_index(self.regions.len())?];
        let total = len / PAGE;
        let tweak =
            |u: &mut Unstructured<'_>| -> Result<i64> { Ok(i64::from(u.int_in_range(-2i8..=2)?)) };
        let first = match u.int_in_range(0u8..=2)? {
            0 => u.int_in_range(0..=total - 1)?,
            1 => (u.int_in_range(0..=total / 512)? * 512).saturating_add_signed(tweak(u)?),
            _ => 0,
        }
        .min(total - 1);
        let pages = match u.int_in_range(0u8..=3)? {
            0 | 1 => u64::from(u.int_in_range(1u16..=600)?),
            2 => (u.int_in_range(1u64..=4)? * 512).saturating_add_signed(tweak(u)?),
            _ => total,
        }
        .clamp(1, total - first);
        Ok((base + first * PAGE, pages * PAGE))
    }

    /// Any `(ipa, size)`, mostly invalid: for the argument rules.
    fn raw_range(&self, u: &mut Unstructured<'_>) -> Result<(u64, u64)> {
        let ipa = match u.int_in_range(0u8..=2)? {
            0 => self
                .limit
                .wrapping_sub(u64::from(u.int_in_range(0u16..=8)?) * PAGE),
            _ => edgy(u)?,
        };
        Ok((ipa, edgy(u)?))
    }

    /// An address in a region (page aligned, or not with `offset`).
    fn address(&self, u: &mut Unstructured<'_>, offset: bool) -> Result<u64> {
        let (ipa, _) = self.range(u)?;
        let ipa = match u.int_in_range(0u8..=7)? {
            0 => edgy(u)?,
            1 => self.limit,
            _ => ipa,
        };
        Ok(if offset && u.ratio(1, 4)? {
            ipa.wrapping_add(u.int_in_range(1..=PAGE - 1)?)
        } else {
            ipa
        })
    }

    fn perms(u: &mut Unstructured<'_>) -> Result<Perms> {
        Ok(Perms::from_bits_truncate(u.int_in_range(0u8..=7)?))
    }

    fn mem(u: &mut Unstructured<'_>) -> Result<MemType> {
        Ok(if u.ratio(1, 5)? {
            MemType::Device
        } else {
            MemType::Normal
        })
    }

    /// A frame for a single page: page aligned below 2^48, sometimes not
    /// aligned.
    fn frame(u: &mut Unstructured<'_>) -> Result<u64> {
        Ok(match u.int_in_range(0u8..=9)? {
            0 => u.int_in_range(1..=PAGE - 1)? + u.int_in_range(0..=(1u64 << 36) - 1)? * PAGE,
            1 => PA_LIMIT - PAGE,
            _ => u.int_in_range(0..=(1u64 << 24))? * PAGE,
        })
    }

    /// The output address of a map of `[ipa, ipa + size)`.
    fn map_pa(&self, u: &mut Unstructured<'_>, model: &Model, ipa: u64, size: u64) -> Result<u64> {
        let big = size / PAGE > MAX_PAGE_MAP;
        let gib_aligned = |u: &mut Unstructured<'_>| -> Result<u64> {
            Ok((u.int_in_range(1u64..=63)? << 30) + ipa % GIB)
        };
        Ok(match u.int_in_range(0u8..=9)? {
            0..=2 => gib_aligned(u)?,
            3 | 4 if !big => (u.int_in_range(1u64..=1024)? << 21) + ipa % MIB2,
            5 | 6 if !big => u.int_in_range(0..=(1u64 << 28))? * PAGE,
            // The same output as now: an identical mapping.
            7 => match model.lookup(ipa) {
                Some((pa, _)) if !big || pa % GIB == ipa % GIB => pa,
                _ => gib_aligned(u)?,
            },
            // At the end of the output space: fits exactly, or not.
            8 => (PA_LIMIT - size.min(PA_LIMIT) + u64::from(u.int_in_range(0u8..=2)?) * PAGE)
                .wrapping_sub(PAGE),
            _ => gib_aligned(u)? + u64::from(u.int_in_range(0u16..=4095)?),
        })
    }

    fn op(&self, u: &mut Unstructured<'_>, model: &Model) -> Result<Op> {
        Ok(match u.int_in_range(0u8..=23)? {
            0..=4 => {
                let (ipa, size) = if u.ratio(1, 8)? {
                    self.raw_range(u)?
                } else {
                    self.range(u)?
                };
                let pa = self.map_pa(u, model, ipa, size)?;
                let perms = Self::perms(u)?;
                let mem = Self::mem(u)?;
                let flags = MapFlags {
                    af: u.arbitrary()?,
                    allow_blocks: u.arbitrary()? || size / PAGE > MAX_PAGE_MAP,
                };
                Op::Map {
                    ipa,
                    size,
                    pa,
                    perms,
                    mem,
                    flags,
                }
            }
            5..=9 => {
                let op = match u.int_in_range(0u8..=4)? {
                    0 | 1 => RangeOp::Unmap,
                    2 => RangeOp::UnmapLeaves,
                    3 => RangeOp::Reclaim,
                    _ => RangeOp::Protect(Self::perms(u)?),
                };
                let (ipa, size) = if u.ratio(1, 8)? {
                    self.raw_range(u)?
                } else {
                    self.range(u)?
                };
                Op::Range { op, ipa, size }
            }
            10 | 11 => Op::Fault {
                ipa: self.address(u, true)?,
                pa: Self::frame(u)?,
                perms: Self::perms(u)?,
                mem: Self::mem(u)?,
                af: u.arbitrary()?,
            },
            12 => Op::Migrate {
                ipa: self.address(u, true)?,
                new: Self::frame(u)?,
            },
            13 => Op::Translate {
                ipa: self.address(u, true)?,
            },
            14 | 15 => Op::Access {
                ipa: self.address(u, true)?,
                set_af: u.arbitrary()?,
            },
            16 => Op::TestClearYoung {
                ipa: self.address(u, true)?,
            },
            17 | 18 => {
                let (ipa, size) = if u.ratio(1, 8)? {
                    let (ipa, _) = self.raw_range(u)?;
                    (ipa, u64::from(u.int_in_range(0u16..=1024)?) * PAGE)
                } else {
                    self.range(u)?
                };
                let flags = if u.ratio(7, 8)? {
                    pick(
                        u,
                        &[0, 1, 1 | 2, 1 | 4, 1 | 2 | 4, 1, 1 | 2, 2, 4]
                            .map(HarvestFlags::from_bits_truncate),
                    )?
                } else {
                    HarvestFlags::from_bits_truncate(u.arbitrary()?)
                };
                Op::Harvest {
                    ipa,
                    npages: size / PAGE,
                    flags,
                    extra_words: pick(u, &[0, 0, 0, 1, 2, -1])?,
                    fill: pick(u, &[0, u64::MAX, u64::MAX, 0x5555_5555_5555_5555])?,
                }
            }
            19 => Op::Pin {
                ipa: self.address(u, true)?,
            },
            20 => Op::Quiescent {
                cpu: u.int_in_range(0..=1)?,
            },
            21 => Op::Cpu1Online(u.arbitrary()?),
            22 => Op::Scatter {
                ipa: self.address(u, false)?,
                count: u.int_in_range(1u8..=80)?,
                stride: pick(u, &[MIB2, MIB2, GIB, MIB2 + PAGE])?,
                then: pick(
                    u,
                    &[
                        None,
                        Some(RangeOp::Unmap),
                        Some(RangeOp::UnmapLeaves),
                        Some(RangeOp::Reclaim),
                        Some(RangeOp::Protect(Perms::READ)),
                    ],
                )?,
            },
            _ => Op::TableLimit(if u.ratio(3, 4)? {
                Some(u.int_in_range(0u8..=3)?)
            } else {
                None
            }),
        })
    }
}

// ---- the harness ----

struct Harness<'a> {
    /// Leave the tables to `Drop` at the end (no full unmap first).
    keep_tables: bool,
    s2: S2<'a>,
    alloc: &'a HostAlloc,
    tlb: &'a ShadowTlb,
    model: Model,
    limit: u64,
    cpu1_online: bool,
    history: Vec<String>,
}

/// What the rules say about a writer's IPA range.
fn range_rule(limit: u64, ipa: u64, size: u64) -> std::result::Result<(), MapError> {
    if size == 0 {
        Err(MapError::ZeroSize(Ipa(ipa)))
    } else if !ipa.is_multiple_of(PAGE) {
        Err(MapError::Unaligned(Ipa(ipa)))
    } else if !size.is_multiple_of(PAGE) {
        Err(MapError::UnalignedSize(size))
    } else if ipa.checked_add(size).is_none_or(|end| end > limit) {
        Err(MapError::OutOfRange {
            ipa: Ipa(ipa),
            size,
        })
    } else {
        Ok(())
    }
}

/// What the rules say about a map.
fn map_rule(
    limit: u64,
    ipa: u64,
    pa: u64,
    size: u64,
    perms: Perms,
    mem: MemType,
) -> std::result::Result<(), MapError> {
    range_rule(limit, ipa, size)?;
    if !pa.is_multiple_of(PAGE) {
        Err(MapError::UnalignedPhys(PhysAddr(pa)))
    } else if pa.checked_add(size).is_none_or(|end| end > PA_LIMIT) {
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

/// About how many leaves a map of `size` bytes from `ipa` to `pa` installs
/// into an empty table: whole blocks in the middle, pages and smaller
/// blocks at the ends.
fn map_leaves(ipa: u64, pa: u64, size: u64, allow_blocks: bool) -> u64 {
    if !allow_blocks || pa % MIB2 != ipa % MIB2 {
        size / PAGE
    } else if pa % GIB != ipa % GIB {
        size / MIB2 + 2 * 512
    } else {
        size / GIB + 4 * 512
    }
}

/// An error must print.
fn show<T, E: std::fmt::Display>(r: &std::result::Result<T, E>) {
    if let Err(e) = r {
        assert!(!e.to_string().is_empty(), "an error prints nothing");
    }
}

/// The permissions a leaf of `mem` gets when asked for `perms`.
fn effective(perms: Perms, mem: MemType) -> Perms {
    match mem {
        MemType::Normal => perms,
        MemType::Device => perms - Perms::EXEC,
    }
}

impl Harness<'_> {
    fn leaves(&self, start: u64, end: u64) -> Leaves {
        let mut v = Leaves::default();
        if start < end {
            let Ok(()) = self
                .s2
                .walk(Ipa(start), end - start, WalkFlags::LEAF, &mut v);
        }
        v
    }

    /// The valid leaf that maps `ipa` (any byte of it).
    fn leaf_at(&self, ipa: u64) -> Option<Leaf> {
        let page = ipa & !(PAGE - 1);
        self.leaves(page, page.saturating_add(PAGE))
            .leaves
            .first()
            .copied()
    }

    /// `[start, end)` widened to the leaves that contain its two ends.
    fn widen(&self, start: u64, end: u64) -> (u64, u64) {
        let lo = self.leaf_at(start).map_or(start, |l| l.base.min(start));
        let hi = match end.checked_sub(1).and_then(|last| self.leaf_at(last)) {
            Some(l) => l.end().max(end),
            None => end,
        };
        (lo, hi)
    }

    /// The leaves in `[start, end)` agree with the model and cover exactly
    /// the pages it maps there; nothing is left locked.
    fn compare_range(&self, start: u64, end: u64) -> Vec<Leaf> {
        let (start, end) = (start.min(self.limit), end.min(self.limit));
        let found = self.leaves(start, end);
        ensure!(
            self,
            found.locked.is_none(),
            "entry left locked: {:x?}",
            found.locked
        );
        let mut covered = 0;
        for leaf in &found.leaves {
            ensure!(
                self,
                (1..=LEAF_LEVEL).contains(&leaf.level)
                    && leaf.base.is_multiple_of(leaf.size())
                    && leaf.pa.is_multiple_of(leaf.size()),
                "misaligned leaf {leaf:x?}"
            );
            ensure!(
                self,
                self.model.agrees_with(leaf),
                "leaf {leaf:x?} disagrees with the model {:x?}",
                self.model.pieces(leaf.base, leaf.end())
            );
            covered += (leaf.end().min(end) - leaf.base.max(start)) / PAGE;
        }
        ensure_eq!(
            self,
            covered,
            self.model.pages_in(start, end),
            "pages mapped in [{start:#x}, {end:#x})"
        );
        found.leaves
    }

    /// `translate` at `ipa` against the model.
    fn probe(&self, ipa: u64) {
        let got = self
            .s2
            .translate(Ipa(ipa))
            .map(|t| (t.pa.0, t.perms, t.memtype, t.af));
        let want = if ipa < self.limit {
            self.model
                .lookup(ipa)
                .map(|(pa, r)| (pa, r.perms, r.mem, r.af))
        } else {
            None
        };
        ensure_eq!(self, got, want, "translate({ipa:#x})");
    }

    /// Every cached translation is still what the table says.
    fn check_tlb(&self) {
        for e in self.tlb.entries() {
            let now = self.leaf_at(e.base);
            let fresh = now.is_some_and(|l| {
                l.base == e.base
                    && l.level == e.level
                    && l.pa == e.pa
                    && l.attrs.perms() == e.perms
                    && l.attrs.mem_type() == e.mem
            });
            ensure!(
                self,
                fresh,
                "stale TLB entry {e:x?}: the table has {now:x?}"
            );
        }
    }

    /// The invariants that hold after every operation.
    fn check_after(&self, start: u64, end: u64) {
        for ipa in [start.wrapping_sub(PAGE), start, end.wrapping_sub(PAGE), end] {
            self.probe(ipa);
        }
        self.compare_range(start, end);
        ensure_eq!(
            self,
            self.s2.mapped_pages(),
            self.model.pages(),
            "mapped pages"
        );
        ensure_eq!(
            self,
            self.s2.table_pages(),
            self.alloc.live(),
            "table pages"
        );
        if self.s2.deferred_tables() == 0 {
            ensure!(
                self,
                self.s2.check_idle(),
                "checker: something still pending"
            );
        }
        self.check_tlb();
    }

    /// Table pages unlinked since (`frees`, `deferred`) were read: freed
    /// at once or waiting for a grace period.
    fn unlinked_since(&self, frees: u64, deferred: usize) -> u64 {
        (self.alloc.frees() - frees) + self.s2.deferred_tables() as u64 - deferred as u64
    }

    fn exec(&mut self, op: &Op) {
        match *op {
            Op::Map {
                ipa,
                size,
                pa,
                perms,
                mem,
                flags,
            } => self.map(ipa, size, pa, perms, mem, flags),
            Op::Range { op, ipa, size } => self.range_op(op, ipa, size),
            Op::Fault {
                ipa,
                pa,
                perms,
                mem,
                af,
            } => self.fault(ipa, pa, perms, mem, af),
            Op::Migrate { ipa, new } => self.migrate(ipa, new),
            Op::Translate { ipa } => self.probe(ipa),
            Op::Access { ipa, set_af } => self.access(ipa, set_af),
            Op::TestClearYoung { ipa } => {
                let page = ipa & !(PAGE - 1);
                let leaf = self.leaf_at(ipa);
                let got = self.s2.test_and_clear_young(Ipa(ipa));
                ensure_eq!(
                    self,
                    got,
                    leaf.map(|l| l.attrs.af()),
                    "test_and_clear_young"
                );
                if let Some(l) = leaf {
                    self.model.update(l.base, l.end(), |r| r.af = false);
                }
                self.check_after(page, page.saturating_add(PAGE));
            }
            Op::Harvest {
                ipa,
                npages,
                flags,
                extra_words,
                fill,
            } => self.harvest(ipa, npages, flags, extra_words, fill),
            Op::Pin { ipa } => self.pin(ipa),
            Op::Quiescent { cpu } => {
                as_cpu(cpu, || RCU.quiescent());
                self.s2.reclaim_tables(false);
                if cpu == 1 || !self.cpu1_online {
                    ensure_eq!(
                        self,
                        self.s2.deferred_tables(),
                        0,
                        "deferred after a grace period"
                    );
                }
                self.check_after(0, 0);
            }
            Op::Scatter {
                ipa,
                count,
                stride,
                then,
            } => {
                for i in 0..u64::from(count) {
                    let at = ipa.saturating_add(i * stride);
                    self.fault(at, (1 << 30) + i * PAGE, Perms::RW, MemType::Normal, true);
                }
                if let Some(op) = then {
                    let page = ipa & !(PAGE - 1);
                    let span = (u64::from(count) * stride).min(self.limit.saturating_sub(page));
                    self.range_op(op, page, span.next_multiple_of(PAGE).max(PAGE));
                }
            }
            Op::TableLimit(extra) => {
                let live = self.alloc.live();
                self.alloc.set_limit(extra.map(|k| live + u64::from(k)));
            }
            Op::Cpu1Online(online) => {
                as_cpu(1, || if online { RCU.online() } else { RCU.offline() });
                self.cpu1_online = online;
            }
        }
    }

    fn map(&mut self, ipa: u64, size: u64, pa: u64, perms: Perms, mem: MemType, flags: MapFlags) {
        let want = map_rule(self.limit, ipa, pa, size, perms, mem);
        if want.is_ok() && map_leaves(ipa, pa, size, flags.allow_blocks) > MAX_MAP_LEAVES {
            return;
        }
        let end = ipa.wrapping_add(size);
        let (lo, hi) = if want.is_ok() {
            self.widen(ipa, end)
        } else {
            (0, 0)
        };
        // Pieces already mapped exactly so keep their access flag (and get
        // it set on their whole leaf with `af`).
        let mut keep = Vec::new();
        let mut set_af = Vec::new();
        if want.is_ok() {
            for (k, r) in self.model.pieces(ipa, end) {
                if r.pa == pa + (k - ipa) && r.perms == effective(perms, mem) && r.mem == mem {
                    keep.push((k, r));
                    if flags.af {
                        set_af.extend(self.leaves(k, r.end).leaves);
                    }
                }
            }
        }
        let mut after = self.model.clone();
        if want.is_ok() {
            let run = Run {
                end,
                pa,
                perms: effective(perms, mem),
                mem,
                af: flags.af,
            };
            after.map(ipa, run);
            for (k, r) in keep {
                after.update(k, r.end, |now| now.af = r.af);
            }
            for l in set_af {
                after.update(l.base, l.end(), |r| r.af = true);
            }
        }
        let got = self.s2.map(Ipa(ipa), PhysAddr(pa), size, perms, mem, flags);
        show(&got);
        if self.out_of_memory(&got, want.is_ok()) {
            self.partial(lo, hi, &after, "map");
            return self.check_after(lo, hi);
        }
        ensure_eq!(self, got, want, "map");
        if want.is_err() {
            return self.check_after(0, 0);
        }
        self.model = after;
        self.check_after(lo, hi);
    }

    /// Whether `got` is an out-of-memory error the table-page limit
    /// allows (the rules having accepted the arguments).
    fn out_of_memory<T>(&self, got: &std::result::Result<T, MapError>, valid: bool) -> bool {
        valid && self.alloc.limit().is_some() && matches!(got, Err(MapError::NoMemory))
    }

    /// After a writer failed for lack of table pages in `[lo, hi)`: every
    /// page is as before or as the complete operation (`after`) would have
    /// left it, nothing is locked; the model takes what the table has.
    fn partial(&mut self, lo: u64, hi: u64, after: &Model, what: &str) {
        let found = self.leaves(lo, hi);
        ensure!(
            self,
            found.locked.is_none(),
            "{what} out of memory left an entry locked: {:x?}",
            found.locked
        );
        let state = |m: &Model, p: u64| m.lookup(p).map(|(pa, r)| (pa, r.perms, r.mem));
        // Between two boundaries of a leaf or of a run of either model,
        // each of the three is unmapped throughout or one linear mapping:
        // checking the first page of each segment checks them all.
        let mut edges = vec![lo, hi];
        for l in &found.leaves {
            edges.extend([l.base, l.end()]);
        }
        for m in [&self.model, after] {
            for (k, r) in m.pieces(lo, hi) {
                edges.extend([k, r.end]);
            }
        }
        edges.retain(|&e| (lo..hi).contains(&e));
        edges.sort_unstable();
        edges.dedup();
        let mut i = 0;
        for p in edges {
            while found.leaves.get(i).is_some_and(|l| l.end() <= p) {
                i += 1;
            }
            let got = found
                .leaves
                .get(i)
                .filter(|l| l.base <= p)
                .map(|l| (l.pa + (p - l.base), l.attrs.perms(), l.attrs.mem_type()));
            let (before, want) = (state(&self.model, p), state(after, p));
            ensure!(
                self,
                got == before || got == want,
                "{what} out of memory: pages from {p:#x} are {got:x?}, neither {before:x?} nor {want:x?}"
            );
        }
        self.model.cut(lo, hi);
        for l in &found.leaves {
            let (start, end) = (l.base.max(lo), l.end().min(hi));
            let run = Run {
                end,
                pa: l.pa + (start - l.base),
                perms: l.attrs.perms(),
                mem: l.attrs.mem_type(),
                af: l.attrs.af(),
            };
            self.model.runs.insert(start, run);
        }
        self.history
            .push(format!("  (out of memory: {what} partly done)"));
    }

    fn range_op(&mut self, op: RangeOp, ipa: u64, size: u64) {
        if self.cpu1_online && self.alloc.live() > CPU1_TABLE_LIMIT {
            as_cpu(1, || RCU.offline());
            self.cpu1_online = false;
            self.history.push("  (CPU 1 offline: many tables)".into());
        }
        let want = range_rule(self.limit, ipa, size);
        let end = ipa.wrapping_add(size);
        let (lo, hi) = if want.is_ok() {
            self.widen(ipa, end)
        } else {
            (0, 0)
        };
        let (frees, deferred) = (self.alloc.frees(), self.s2.deferred_tables());
        let released = RefCell::new(Vec::new());
        let mut release = |pa: PhysAddr, size: u64| released.borrow_mut().push((pa.0, size));
        match op {
            RangeOp::Unmap | RangeOp::UnmapLeaves => {
                // Planted bug: the model keeps the last page of a range.
                let end = if crate::PLANTED && size > PAGE {
                    end.wrapping_sub(PAGE)
                } else {
                    end
                };
                let pages = if want.is_ok() {
                    self.model.pages_in(ipa, end)
                } else {
                    0
                };
                let got = {
                    let mut batch = self.s2.batch(&mut release);
                    if op == RangeOp::Unmap {
                        self.s2.unmap_batched(Ipa(ipa), size, &mut batch)
                    } else {
                        self.s2.unmap_leaves_batched(Ipa(ipa), size, &mut batch)
                    }
                };
                let unlinked = self.unlinked_since(frees, deferred);
                show(&got);
                if self.out_of_memory(&got, want.is_ok()) {
                    let mut after = self.model.clone();
                    after.cut(ipa, end);
                    let before = self.model.pages_in(lo, hi);
                    self.partial(lo, hi, &after, "unmap");
                    let back: u64 = released.borrow().iter().map(|&(_, s)| s / PAGE).sum();
                    let gone = before - self.model.pages_in(lo, hi);
                    ensure_eq!(self, back, gone, "{op:?} out of memory: pages released");
                    return self.check_after(lo, hi);
                }
                ensure_eq!(
                    self,
                    got.map(|s| s.pages_unmapped),
                    want.map(|()| pages),
                    "{op:?}"
                );
                if let Ok(stats) = got {
                    ensure_eq!(
                        self,
                        stats.tables_freed,
                        unlinked,
                        "{op:?}: tables unlinked"
                    );
                    if op == RangeOp::UnmapLeaves {
                        ensure_eq!(
                            self,
                            stats.tables_freed,
                            0,
                            "leaf-only unmap removed tables"
                        );
                    }
                    let back: u64 = released.borrow().iter().map(|&(_, s)| s / PAGE).sum();
                    ensure_eq!(self, back, pages, "{op:?}: pages released");
                    for (k, r) in self.model.cut(ipa, end) {
                        let frames = released.borrow();
                        ensure!(
                            self,
                            frames.iter().any(|&(pa, s)| pa <= r.pa && r.pa < pa + s),
                            "{op:?}: frame {:#x} of {k:#x} not released",
                            r.pa
                        );
                    }
                }
            }
            RangeOp::Reclaim => {
                let got = {
                    let mut batch = self.s2.batch(&mut release);
                    self.s2.reclaim_empty_tables(Ipa(ipa), size, &mut batch)
                };
                let unlinked = self.unlinked_since(frees, deferred);
                ensure_eq!(self, got, want.map(|()| unlinked), "reclaim_empty_tables");
                ensure!(
                    self,
                    released.borrow().is_empty(),
                    "reclaim released frames"
                );
            }
            RangeOp::Protect(perms) => {
                let got = self.s2.protect(Ipa(ipa), size, perms);
                show(&got);
                let mut after = self.model.clone();
                if want.is_ok() {
                    after.update(ipa, end, |r| r.perms = effective(perms, r.mem));
                }
                if self.out_of_memory(&got, want.is_ok()) {
                    self.partial(lo, hi, &after, "protect");
                } else {
                    ensure_eq!(self, got, want, "protect");
                    self.model = after;
                }
            }
        }
        self.check_after(lo, hi);
    }

    fn fault(&mut self, ipa: u64, pa: u64, perms: Perms, mem: MemType, af: bool) {
        let page = ipa & !(PAGE - 1);
        let want = if page >= self.limit {
            Err(MapError::OutOfRange {
                ipa: Ipa(page),
                size: PAGE,
            })
        } else if !pa.is_multiple_of(PAGE) {
            Err(MapError::UnalignedPhys(PhysAddr(pa)))
        } else if mem == MemType::Device && perms.contains(Perms::EXEC) {
            Err(MapError::ExecutableDevice(Ipa(page)))
        } else if self.model.lookup(page).is_some() {
            Ok(FaultOutcome::AlreadyMapped)
        } else {
            Ok(FaultOutcome::Installed)
        };
        let got = self
            .s2
            .fault_install(Ipa(ipa), PhysAddr(pa), perms, mem, af);
        show(&got);
        if !self.out_of_memory(&got, want == Ok(FaultOutcome::Installed)) {
            ensure_eq!(self, got, want, "fault_install");
        }
        if got == Ok(FaultOutcome::Installed) {
            let run = Run {
                end: page + PAGE,
                pa,
                perms: effective(perms, mem),
                mem,
                af,
            };
            self.model.map(page, run);
        }
        self.check_after(page, page.saturating_add(PAGE));
    }

    fn migrate(&mut self, ipa: u64, new: u64) {
        let page = ipa & !(PAGE - 1);
        let leaf = self.leaf_at(ipa);
        let want = match leaf {
            _ if !new.is_multiple_of(PAGE) => Err(MapError::UnalignedPhys(PhysAddr(new))),
            Some(l) if l.level == LEAF_LEVEL => Ok(MigrateOutcome::Moved {
                old: PhysAddr(l.pa),
            }),
            _ => Ok(MigrateOutcome::NotMoved),
        };
        let released = RefCell::new(Vec::new());
        let mut release = |pa: PhysAddr, size: u64| released.borrow_mut().push((pa.0, size));
        let mut copies = Vec::new();
        let got = {
            let mut batch = self.s2.batch(&mut release);
            self.s2
                .migrate_page(Ipa(ipa), PhysAddr(new), &mut batch, |old, new| {
                    copies.push((old.0, new.0))
                })
        };
        ensure_eq!(self, got, want, "migrate_page");
        if let Ok(MigrateOutcome::Moved { old }) = got {
            ensure_eq!(self, copies, vec![(old.0, new)], "migrate_page copies");
            ensure_eq!(
                self,
                *released.borrow(),
                vec![(old.0, PAGE)],
                "migrate_page releases"
            );
            self.model.update(page, page + PAGE, |r| r.pa = new);
        } else {
            ensure!(
                self,
                copies.is_empty() && released.borrow().is_empty(),
                "unmoved page copied"
            );
        }
        self.check_after(page, page.saturating_add(PAGE));
    }

    fn access(&mut self, ipa: u64, set_af: bool) {
        let page = ipa & !(PAGE - 1);
        if set_af {
            let leaf = self.leaf_at(ipa);
            ensure_eq!(
                self,
                self.s2.set_access_flag(Ipa(ipa)),
                leaf.is_some(),
                "set_access_flag"
            );
            if let Some(l) = leaf {
                self.model.update(l.base, l.end(), |r| r.af = true);
            }
        }
        if let Some(l) = self.leaf_at(ipa) {
            self.tlb.fill(TlbEntry {
                base: l.base,
                level: l.level,
                pa: l.pa,
                perms: l.attrs.perms(),
                mem: l.attrs.mem_type(),
                af: l.attrs.af(),
            });
        }
        self.check_after(page, page.saturating_add(PAGE));
    }

    fn harvest(&mut self, ipa: u64, npages: u64, flags: HarvestFlags, extra: i8, fill: u64) {
        let needed = npages.div_ceil(64);
        let words = needed.saturating_add_signed(extra.into());
        if words > 1 << 16 {
            return;
        }
        let mut bitmap = vec![fill; words as usize];
        let input = bitmap.clone();
        let mask_flags = HarvestFlags::MASK | HarvestFlags::FLUSH;
        let end = npages
            .checked_mul(PAGE)
            .and_then(|len| ipa.checked_add(len));
        let want_err = if !ipa.is_multiple_of(PAGE) {
            Some(HarvestError::Unaligned(Ipa(ipa)))
        } else if flags.intersects(mask_flags) && !flags.contains(HarvestFlags::CLEAR) {
            Some(HarvestError::FlagsWithoutClear(flags))
        } else if end.is_none_or(|end| end > self.limit) {
            Some(HarvestError::OutOfRange {
                ipa: Ipa(ipa),
                npages,
            })
        } else if needed > words {
            Some(HarvestError::BitmapTooSmall {
                needed,
                words: words as usize,
            })
        } else {
            None
        };
        let tlb_calls = self.tlb.counts();
        if let Some(e) = want_err {
            let got = self.s2.harvest(Ipa(ipa), npages, &mut bitmap[..], flags);
            show(&got);
            ensure_eq!(self, got, Err(e), "harvest");
            ensure!(self, bitmap == input, "a refused harvest wrote its bitmap");
            return self.check_after(0, 0);
        }
        let end = ipa + npages * PAGE;
        // The answer, from the model.
        let mut want = input.clone();
        want[..needed as usize].fill(0);
        let mut young = 0;
        for (k, r) in self.model.pieces(ipa, end) {
            if r.af {
                for p in (k - ipa) / PAGE..(r.end - ipa) / PAGE {
                    want[(p / 64) as usize] |= 1 << (p % 64);
                }
                young += (r.end - k) / PAGE;
            }
        }
        // What it clears: whole leaves, with MASK only those whose pages in
        // the range are all set in the input.
        let masked =
            |p0: u64, p1: u64| (p0..p1).all(|p| input[(p / 64) as usize] >> (p % 64) & 1 == 1);
        let mut cleared = Vec::new();
        if flags.contains(HarvestFlags::CLEAR) {
            for l in self.leaves(ipa, end).leaves {
                let (p0, p1) = (
                    (l.base.max(ipa) - ipa) / PAGE,
                    (l.end().min(end) - ipa) / PAGE,
                );
                if l.attrs.af() && (!flags.contains(HarvestFlags::MASK) || masked(p0, p1)) {
                    cleared.push(l);
                }
            }
        }
        let (lo, hi) = self.widen(ipa, end);
        // The named forms of the three usual flag sets.
        let (s2, at) = (&self.s2, Ipa(ipa));
        let got = match flags {
            f if f.is_empty() => s2.test_young(at, npages, &mut bitmap[..]),
            HarvestFlags::CLEAR => s2.test_clear_young(at, npages, &mut bitmap[..]),
            f if f == HarvestFlags::CLEAR | HarvestFlags::MASK => {
                s2.clear_young(at, npages, &mut bitmap[..])
            }
            _ => s2.harvest(at, npages, &mut bitmap[..], flags),
        };
        ensure_eq!(self, got, Ok(young), "harvest: young pages");
        ensure!(
            self,
            bitmap == want,
            "harvest bitmap {bitmap:x?}, want {want:x?}"
        );
        for l in &cleared {
            self.model.update(l.base, l.end(), |r| r.af = false);
        }
        if flags.contains(HarvestFlags::FLUSH) {
            for e in self.tlb.entries() {
                ensure!(
                    self,
                    !cleared
                        .iter()
                        .any(|l| l.base == e.base && l.level == e.level),
                    "FLUSH harvest left TLB entry {e:x?} of a cleared leaf"
                );
            }
        } else {
            ensure_eq!(
                self,
                self.tlb.counts(),
                tlb_calls,
                "harvest without FLUSH invalidated"
            );
        }
        self.check_after(lo, hi);
    }

    fn pin(&mut self, ipa: u64) {
        let page = ipa & !(PAGE - 1);
        let before = self.s2.translate(Ipa(ipa));
        let want = if page >= self.limit {
            Err(PinError::OutOfRange(Ipa(ipa)))
        } else {
            match self.model.lookup(page) {
                Some((pa, _)) => Ok(pa),
                None => Err(PinError::NotMapped(Ipa(ipa))),
            }
        };
        let s2 = &self.s2;
        let mut inside = None;
        let got = s2.with_page_pinned(Ipa(ipa), |frame| {
            let mut young = [0u64; 1];
            let region = page & !(MIB2 - 1);
            let mut release = |_, _| {};
            let (removed, migrated) = {
                let mut batch = s2.batch(&mut release);
                let removed =
                    s2.reclaim_empty_tables(Ipa(region), MIB2.min(self.limit - region), &mut batch);
                let migrated = s2.migrate_page(Ipa(ipa), PhysAddr(PAGE), &mut batch, |_, _| {});
                (removed, migrated)
            };
            let nested = s2.with_page_pinned(Ipa(ipa), |_| ());
            inside = Some((
                nested,
                migrated,
                s2.translate(Ipa(ipa)),
                s2.leaf_view(Ipa(ipa)),
                s2.fault_install(Ipa(ipa), PhysAddr(0), Perms::READ, MemType::Normal, true),
                s2.set_access_flag(Ipa(ipa)),
                s2.test_and_clear_young(Ipa(ipa)),
                s2.test_young(Ipa(page), 1, &mut young[..]),
                removed,
            ));
            frame.0
        });
        show(&got);
        ensure_eq!(self, got, want, "with_page_pinned");
        if let Some((nested, migrated, translation, view, fault, set, clear, harvest, removed)) =
            inside
        {
            ensure!(
                self,
                matches!(nested, Err(PinError::Busy { .. })),
                "pin of a pinned page: {nested:?}"
            );
            show(&nested);
            ensure_eq!(
                self,
                migrated,
                Ok(MigrateOutcome::NotMoved),
                "migration of a pinned page"
            );
            ensure_eq!(self, translation, None, "translate of a pinned page");
            ensure_eq!(
                self,
                view,
                Some(DescView::Locked),
                "leaf_view of a pinned page"
            );
            ensure_eq!(
                self,
                fault,
                Ok(FaultOutcome::Retry),
                "fault on a pinned page"
            );
            ensure!(
                self,
                !set && clear.is_none(),
                "access flag of a pinned page changed"
            );
            ensure_eq!(self, harvest, Ok(0), "harvest of a pinned page");
            ensure_eq!(self, removed, Ok(0), "scan of the pinned page's 2 MiB");
        }
        ensure_eq!(
            self,
            self.s2.translate(Ipa(ipa)),
            before,
            "translation after the pin"
        );
        self.check_after(page, page.saturating_add(PAGE));
    }

    /// The end of an input: the whole table against the model, dump, a full
    /// scan, a full unmap.
    fn finish(&mut self) {
        self.history.push("-- finish".into());
        self.alloc.set_limit(None);
        // The reader on CPU 1 leaves: the full scan and unmap below may
        // unlink more tables than the deferred queue holds.
        as_cpu(1, || RCU.offline());
        self.cpu1_online = false;
        self.s2.reclaim_tables(false);
        let leaves = self.compare_range(0, self.limit);
        let mut edges = Vec::new();
        for (&k, r) in &self.model.runs {
            edges.extend([k, r.end - PAGE, r.end, k.wrapping_sub(PAGE)]);
        }
        for ipa in edges {
            self.probe(ipa);
        }
        let mut dump = String::new();
        ensure!(self, self.s2.dump(&mut dump).is_ok(), "dump failed");
        let dumped = dump
            .lines()
            .filter(|l| l.contains(" page ") || l.contains(" block "))
            .count();
        ensure_eq!(self, dumped, leaves.len(), "leaves in the dump");
        self.history.push(format!("{:?}", self.s2));
        if self.keep_tables {
            // `Drop` tears the tables down, deferred pages included.
            return;
        }
        let mut release = |_, _| {};
        let removed = {
            let mut batch = self.s2.batch(&mut release);
            self.s2.reclaim_empty_tables(Ipa(0), self.limit, &mut batch)
        };
        ensure!(self, removed.is_ok(), "full scan: {removed:?}");
        self.s2.reclaim_tables(false);
        ensure_eq!(
            self,
            self.s2.deferred_tables(),
            0,
            "deferred after the scan"
        );
        ensure_eq!(
            self,
            self.s2.table_pages(),
            needed_tables(&leaves),
            "tables after a full scan"
        );
        let unmapped = self.s2.unmap(Ipa(0), self.limit).map(|s| s.pages_unmapped);
        ensure_eq!(self, unmapped, Ok(self.model.pages()), "full unmap");
        self.s2.reclaim_tables(false);
        ensure_eq!(
            self,
            (
                self.s2.mapped_pages(),
                self.s2.table_pages(),
                self.alloc.live()
            ),
            (0, 1, 1),
            "after a full unmap"
        );
        ensure!(
            self,
            self.s2.check_idle(),
            "checker: something pending at the end"
        );
    }
}

/// Whether `HYP_FUZZ_TRACE` is set: print each input's operations (to
/// read a reproducer with `scripts/fuzz --replay`).
fn trace() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("HYP_FUZZ_TRACE").is_some())
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok((bits, cpu0_online, keep_tables)) = (|| -> Result<(u8, bool, bool)> {
        Ok((
            pick(&mut u, &[40, 40, 40, 44, 48])?,
            u.arbitrary()?,
            u.ratio(1, 4)?,
        ))
    })() else {
        return;
    };
    rcu_reset();
    if cpu0_online {
        RCU.online();
    }
    let alloc = HostAlloc::default();
    let tlb = ShadowTlb::default();
    for bad in [39, 49] {
        let e = Stage2::new(bad, &alloc, &tlb, &RCU).map(drop);
        show(&e);
        assert_eq!(e, Err(Stage2Error::UnsupportedIpaBits(bad)));
    }
    {
        let s2 = Stage2::new(bits, &alloc, &tlb, &RCU).expect("root table");
        let limit = s2.ipa_limit();
        let decoder = Decoder {
            regions: regions(limit),
            limit,
        };
        if trace() {
            eprintln!(
                "Stage2::new({bits}), CPU 0 online: {cpu0_online}, keep tables: {keep_tables}"
            );
        }
        let mut h = Harness {
            keep_tables,
            s2,
            alloc: &alloc,
            tlb: &tlb,
            model: Model::default(),
            limit,
            cpu1_online: false,
            history: vec![format!(
                "Stage2::new({bits}), CPU 0 online: {cpu0_online}, keep tables: {keep_tables}"
            )],
        };
        for _ in 0..MAX_OPS {
            if u.is_empty() {
                break;
            }
            let Ok(op) = decoder.op(&mut u, &h.model) else {
                break;
            };
            h.history.push(format!("{op:x?}"));
            if trace() {
                eprintln!("{op:x?}");
            }
            h.exec(&op);
        }
        h.finish();
    }
    rcu_reset();
    assert_eq!(alloc.live(), 0, "table pages left after the drop");
    assert_eq!(alloc.allocs(), alloc.frees(), "every table page freed once");
}
