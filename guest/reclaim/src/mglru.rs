//! Multi-generational aging (after Linux MGLRU) fed by aging bitmaps.
//!
//! Generations are numbered by a sequence: `min_seq..=max_seq` are alive,
//! at most `gens` of them; each resident page belongs to one. A page costs
//! one byte: resident bit, probation bit and the generation's slot
//! (`seq % gens`, unique because at most `gens` sequences are alive).
//!
//! - **Aging pass** ([`Policy::age`]): drop empty oldest generations,
//!   advance `max_seq` (open a new youngest generation) if fewer than
//!   `gens` are alive, then harvest the whole region with `CLEAR | FLUSH` in
//!   chunks of up to [`MglruConfig::harvest_chunk`] pages (one call per
//!   chunk) and promote every young resident page to the youngest
//!   generation. If nothing was promoted the new generation is closed again:
//!   a pass that saw no use (the middle of a scan, an idle machine) does not
//!   age the pages in use.
//! - **Eviction** ([`Policy::select_victims`]): candidates are the pages of
//!   the oldest generation, visited by a cursor in address order. Before
//!   evicting, one `test_clear(window, CLEAR | MASK | FLUSH)` over the
//!   aligned [`MglruConfig::lookaround`]-page window around the next
//!   candidate, with the candidates as the mask (**look-around**): young
//!   candidates are kept (promoted) instead of evicted, and young
//!   neighbours found in the same bitmap are promoted without another call
//!   (their flags are left set: the reclaimer did not decide on them).
//! - **Scan resistance**: a page that becomes resident enters generation
//!   `max_seq - insert_distance` (never the youngest) *on probation*. The
//!   first young bit seen for it (by a pass or a look-around) is presumed to
//!   be the access that faulted it in and only ends the probation; it is
//!   promoted only when seen young again later. A one-off sequential scan
//!   therefore stays in the old generations and is evicted before the hot
//!   set.
//! - **Proactive reclaim** ([`Policy::select_cold`]): every generation
//!   remembers the last pass in which a page entered it; a page has not been
//!   young for at least `pass - that` passes (a lower bound, so proactive
//!   reclaim errs towards keeping pages).

use crate::backend::{bit, for_each_set, set_bit, words_for, AgeFlags, Backend};
use crate::policy::{GenSizes, Policy, MAX_GENS};
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

/// Page state bit: the page is resident (managed by the policy).
const RESIDENT: u8 = 0x80;
/// Page state bit: resident since the last time it was seen young; its next
/// young bit only ends the probation.
const PROBATION: u8 = 0x40;
/// Page state bits: slot (`seq % gens`) of the page's generation.
const SLOT_MASK: u8 = 0x1f;
const _: () = assert!(MAX_GENS <= SLOT_MASK as usize + 1);

/// Tunables of [`Mglru`]; see the crate docs for why the defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MglruConfig {
    /// Number of generations, `4..=MAX_GENS`.
    pub gens: u8,
    /// New pages enter generation `max_seq - insert_distance` (clamped to
    /// the oldest), `1..gens`.
    pub insert_distance: u8,
    /// Pages per harvest call of an aging pass (also capped by
    /// [`Backend::max_pages_per_call`]); sizes the bitmap buffer.
    pub harvest_chunk: u32,
    /// Look-around window in pages: a power of two in `64..=512`.
    pub lookaround: u32,
}

impl Default for MglruConfig {
    fn default() -> Self {
        MglruConfig {
            gens: 4,
            insert_distance: 2,
            harvest_chunk: 4096,
            lookaround: 512,
        }
    }
}

/// An [`MglruConfig`] out of range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MglruConfigError {
    /// `gens` not in `4..=MAX_GENS`.
    Gens(u8),
    /// `insert_distance` not in `1..gens`.
    InsertDistance(u8),
    /// `lookaround` not a power of two in `64..=512`.
    Lookaround(u32),
    /// `harvest_chunk` below 64.
    HarvestChunk(u32),
}

impl fmt::Display for MglruConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MglruConfigError::Gens(n) => write!(f, "gens {n} not in 4..={MAX_GENS}"),
            MglruConfigError::InsertDistance(d) => write!(f, "insert_distance {d} not in 1..gens"),
            MglruConfigError::Lookaround(w) => {
                write!(f, "lookaround {w} not a power of two in 64..=512")
            }
            MglruConfigError::HarvestChunk(n) => write!(f, "harvest_chunk {n} below 64"),
        }
    }
}

impl MglruConfig {
    /// Checks the ranges documented on the fields.
    pub fn check(&self) -> Result<(), MglruConfigError> {
        if !(4..=MAX_GENS as u8).contains(&self.gens) {
            return Err(MglruConfigError::Gens(self.gens));
        }
        if !(1..self.gens).contains(&self.insert_distance) {
            return Err(MglruConfigError::InsertDistance(self.insert_distance));
        }
        if !self.lookaround.is_power_of_two() || !(64..=512).contains(&self.lookaround) {
            return Err(MglruConfigError::Lookaround(self.lookaround));
        }
        if self.harvest_chunk < 64 {
            return Err(MglruConfigError::HarvestChunk(self.harvest_chunk));
        }
        Ok(())
    }
}

/// Counters of what [`Mglru`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MglruStats {
    /// Aging passes.
    pub passes: u64,
    /// Backend calls made by aging passes.
    pub harvest_calls: u64,
    /// Backend calls made by look-around.
    pub lookaround_calls: u64,
    /// Pages promoted by aging passes.
    pub promoted_by_pass: u64,
    /// Eviction candidates found young by look-around and kept.
    pub candidates_kept: u64,
    /// Neighbours promoted from a look-around bitmap.
    pub neighbours_promoted: u64,
    /// Probations ended (first young bit after becoming resident).
    pub probations_ended: u64,
    /// Pages selected by [`Policy::select_victims`].
    pub evicted: u64,
    /// Pages selected by [`Policy::select_cold`].
    pub selected_cold: u64,
    /// Passes that found nothing to promote and so opened no generation.
    pub passes_without_advance: u64,
}

/// The multi-generational policy.
#[derive(Debug, Clone)]
pub struct Mglru {
    cfg: MglruConfig,
    pages: u32,
    /// `RESIDENT | PROBATION | slot` per page.
    state: Vec<u8>,
    min_seq: u64,
    max_seq: u64,
    /// Pages per slot.
    sizes: [u32; MAX_GENS],
    /// Per slot: the last pass in which a page entered the generation.
    entered: [u64; MAX_GENS],
    pass: u64,
    /// Where the next eviction looks for candidates.
    cursor: u32,
    resident: u32,
    /// Harvest and look-around bitmap.
    bitmap: Vec<u64>,
    stats: MglruStats,
}

impl Mglru {
    /// An empty policy over `pages` pages.
    ///
    /// # Panics
    ///
    /// If [`MglruConfig::check`] fails.
    pub fn new(pages: u32, cfg: MglruConfig) -> Self {
        if let Err(e) = cfg.check() {
            panic!("bad MglruConfig: {e}");
        }
        let words = words_for(cfg.harvest_chunk.max(cfg.lookaround));
        Mglru {
            cfg,
            pages,
            state: vec![0; pages as usize],
            min_seq: 0,
            max_seq: u64::from(cfg.gens) - 1,
            sizes: [0; MAX_GENS],
            entered: [0; MAX_GENS],
            pass: 0,
            cursor: 0,
            resident: 0,
            bitmap: vec![0; words],
            stats: MglruStats::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> MglruConfig {
        self.cfg
    }

    /// What it did so far.
    pub fn stats(&self) -> MglruStats {
        self.stats
    }

    /// Oldest and youngest live sequence numbers.
    pub fn seqs(&self) -> (u64, u64) {
        (self.min_seq, self.max_seq)
    }

    /// The generation (sequence number) of a resident page.
    pub fn generation_of(&self, page: u32) -> Option<u64> {
        let s = self.state[page as usize];
        (s & RESIDENT != 0).then(|| self.seq_of(s & SLOT_MASK))
    }

    /// Whether `page` is resident and still on probation.
    pub fn on_probation(&self, page: u32) -> bool {
        self.state[page as usize] & (RESIDENT | PROBATION) == RESIDENT | PROBATION
    }

    fn slot(&self, seq: u64) -> u8 {
        (seq % u64::from(self.cfg.gens)) as u8
    }

    fn seq_of(&self, slot: u8) -> u64 {
        let n = u64::from(self.cfg.gens);
        self.min_seq + (u64::from(slot) + n - self.min_seq % n) % n
    }

    fn drop_empty_oldest(&mut self) {
        while self.min_seq < self.max_seq && self.sizes[self.slot(self.min_seq) as usize] == 0 {
            self.min_seq += 1;
        }
    }

    /// Opens a new, empty youngest generation if fewer than `gens` are alive.
    fn try_advance(&mut self) -> bool {
        if self.max_seq - self.min_seq + 1 >= u64::from(self.cfg.gens) {
            return false;
        }
        self.max_seq += 1;
        let slot = self.slot(self.max_seq) as usize;
        debug_assert_eq!(self.sizes[slot], 0, "a reused slot is empty");
        self.entered[slot] = self.pass;
        true
    }

    /// Moves resident `page` (state `s`) into generation `seq`.
    fn move_to(&mut self, page: u32, s: u8, seq: u64) {
        let old = (s & SLOT_MASK) as usize;
        let new = self.slot(seq);
        self.sizes[old] -= 1;
        self.sizes[new as usize] += 1;
        self.entered[new as usize] = self.pass;
        self.state[page as usize] = (s & !SLOT_MASK) | new;
    }

    /// The generation new pages enter.
    fn insert_seq(&self) -> u64 {
        self.max_seq
            .saturating_sub(u64::from(self.cfg.insert_distance))
            .max(self.min_seq)
    }

    /// First young bit of a page on probation: presumed to be the access
    /// that made it resident, so it only ends the probation. (Lifting the
    /// page back to the insertion generation here was tried: no measurable
    /// effect.) The page was young all the same, so for proactive reclaim
    /// its generation counts as entered now; otherwise a page refaulted
    /// under a one-pass threshold would be selected again before it could
    /// ever be promoted.
    fn end_probation(&mut self, page: u32, s: u8) {
        self.state[page as usize] = s & !PROBATION;
        self.entered[(s & SLOT_MASK) as usize] = self.pass;
        self.stats.probations_ended += 1;
    }

    /// Harvests the whole region with `CLEAR | FLUSH`, one call per chunk,
    /// and promotes the young pages.
    fn harvest<B: Backend>(&mut self, backend: &mut B) -> Result<(), B::Error> {
        let chunk = self
            .cfg
            .harvest_chunk
            .min(backend.max_pages_per_call())
            .max(1);
        let mut first = 0;
        while first < self.pages {
            let n = chunk.min(self.pages - first);
            let words = words_for(n);
            let mut map = core::mem::take(&mut self.bitmap);
            map[..words].fill(0);
            let result = backend.test_clear(
                first,
                n,
                &mut map[..words],
                AgeFlags::CLEAR | AgeFlags::FLUSH,
            );
            self.stats.harvest_calls += 1;
            if let Err(e) = result {
                self.bitmap = map;
                return Err(e);
            }
            let max_slot = self.slot(self.max_seq);
            for_each_set(&map[..words], n, |i| {
                let page = first + i;
                let s = self.state[page as usize];
                if s & RESIDENT == 0 {
                    // Young but not ours (e.g. touched outside the driver).
                } else if s & PROBATION != 0 {
                    self.end_probation(page, s);
                } else if s & SLOT_MASK != max_slot {
                    self.promote(page, s);
                    self.stats.promoted_by_pass += 1;
                } else {
                    self.entered[max_slot as usize] = self.pass;
                }
            });
            self.bitmap = map;
            first += n;
        }
        Ok(())
    }

    fn promote(&mut self, page: u32, s: u8) {
        self.move_to(page, s, self.max_seq);
    }

    fn forget(&mut self, page: u32, s: u8, out: &mut Vec<u32>) {
        self.sizes[(s & SLOT_MASK) as usize] -= 1;
        self.state[page as usize] = 0;
        self.resident -= 1;
        out.push(page);
    }

    /// First resident page at or after `from` (wrapping) in `slot`.
    fn next_in_slot(&self, from: u32, slot: u8) -> Option<u32> {
        let want = RESIDENT | slot;
        let mask = RESIDENT | SLOT_MASK;
        let from = if from >= self.pages { 0 } else { from };
        let (tail, head) = self.state.split_at(from as usize);
        head.iter()
            .position(|&s| s & mask == want)
            .map(|i| from + i as u32)
            .or_else(|| {
                tail.iter()
                    .position(|&s| s & mask == want)
                    .map(|i| i as u32)
            })
    }

    /// One look-around over the window holding `cand`: evicts up to `need`
    /// old candidates into `out`, keeps young ones, promotes young
    /// neighbours. Returns how many were evicted and where to resume.
    fn look_around<B: Backend>(
        &mut self,
        backend: &mut B,
        cand: u32,
        need: usize,
        out: &mut Vec<u32>,
    ) -> Result<(usize, u32), B::Error> {
        let w = self.cfg.lookaround;
        let start = cand & !(w - 1);
        let len = w.min(self.pages - start);
        let words = words_for(len);
        let target = RESIDENT | self.slot(self.min_seq);
        let mask = RESIDENT | SLOT_MASK;
        // Candidates behind the cursor in this window were looked at in this
        // lap already; leave them for the next one.
        let is_candidate = |page: u32, s: u8| page >= cand && s & mask == target;

        let map = &mut self.bitmap[..words];
        map.fill(0);
        for i in cand - start..len {
            if is_candidate(start + i, self.state[(start + i) as usize]) {
                set_bit(map, i);
            }
        }
        backend.test_clear(
            start,
            len,
            map,
            AgeFlags::CLEAR | AgeFlags::MASK | AgeFlags::FLUSH,
        )?;
        self.stats.lookaround_calls += 1;

        let mut taken = 0;
        let mut resume = start + len;
        for i in 0..len {
            let page = start + i;
            let s = self.state[page as usize];
            if s & RESIDENT == 0 {
                continue;
            }
            let young = bit(&self.bitmap[..words], i);
            if is_candidate(page, s) {
                if young {
                    if s & PROBATION != 0 {
                        self.end_probation(page, s);
                    } else {
                        self.promote(page, s);
                        self.stats.candidates_kept += 1;
                    }
                } else if taken < need {
                    self.forget(page, s, out);
                    taken += 1;
                    if taken == need {
                        resume = page + 1;
                    }
                }
            } else if young && s & PROBATION == 0 {
                if self.slot(self.max_seq) != s & SLOT_MASK {
                    self.stats.neighbours_promoted += 1;
                }
                self.promote(page, s);
            }
        }
        Ok((taken, if resume >= self.pages { 0 } else { resume }))
    }
}

impl Policy for Mglru {
    fn name(&self) -> &'static str {
        "mglru"
    }

    fn inserted(&mut self, page: u32) {
        debug_assert_eq!(
            self.state[page as usize] & RESIDENT,
            0,
            "page {page} already resident"
        );
        self.drop_empty_oldest();
        if self.min_seq == self.max_seq {
            // Keep the youngest generation for pages seen young twice.
            self.try_advance();
        }
        let slot = self.slot(self.insert_seq());
        self.sizes[slot as usize] += 1;
        self.entered[slot as usize] = self.pass;
        self.state[page as usize] = RESIDENT | PROBATION | slot;
        self.resident += 1;
    }

    fn age<B: Backend>(&mut self, backend: &mut B) -> Result<(), B::Error> {
        self.pass += 1;
        self.stats.passes += 1;
        self.drop_empty_oldest();
        let opened = self.try_advance();
        let result = self.harvest(backend);
        if opened && self.sizes[self.slot(self.max_seq) as usize] == 0 {
            // Nothing was young: a pass that saw no use (say, in the middle
            // of a scan) must not age the pages that are still in use.
            self.max_seq -= 1;
            self.stats.passes_without_advance += 1;
        }
        result
    }

    fn select_victims<B: Backend>(
        &mut self,
        backend: &mut B,
        n: usize,
        out: &mut Vec<u32>,
    ) -> Result<(), B::Error> {
        let mut taken = 0;
        // Every look-around settles at least one candidate for good (evicted,
        // promoted out of the oldest generation, or its probation ended and
        // its flag cleared), so this bound is never reached unless pages are
        // touched concurrently; it only guarantees termination.
        let mut budget = 3 * u64::from(self.resident) + 8;
        while taken < n && self.resident > 0 && budget > 0 {
            budget -= 1;
            self.drop_empty_oldest();
            let slot = self.slot(self.min_seq);
            let cand = self.next_in_slot(self.cursor, slot);
            debug_assert!(cand.is_some(), "the oldest generation is not empty");
            let Some(cand) = cand else {
                break;
            };
            let (got, resume) = self.look_around(backend, cand, n - taken, out)?;
            taken += got;
            self.cursor = resume;
        }
        self.stats.evicted += taken as u64;
        Ok(())
    }

    fn select_cold<B: Backend>(
        &mut self,
        _backend: &mut B,
        min_age: u32,
        out: &mut Vec<u32>,
    ) -> Result<(), B::Error> {
        let cold_slots: u32 = (0..self.cfg.gens)
            .filter(|&slot| {
                let seq = self.seq_of(slot);
                seq <= self.max_seq
                    && self.sizes[slot as usize] > 0
                    && self.pass - self.entered[slot as usize] >= u64::from(min_age)
            })
            .fold(0, |acc, slot| acc | 1 << slot);
        if cold_slots == 0 {
            return Ok(());
        }
        let before = out.len();
        for page in 0..self.pages {
            let s = self.state[page as usize];
            if s & RESIDENT != 0 && cold_slots >> (s & SLOT_MASK) & 1 != 0 {
                self.forget(page, s, out);
            }
        }
        self.stats.selected_cold += (out.len() - before) as u64;
        self.drop_empty_oldest();
        Ok(())
    }

    fn resident(&self) -> u32 {
        self.resident
    }

    fn generation_sizes(&self) -> Option<GenSizes> {
        Some(GenSizes::new(
            (self.min_seq..=self.max_seq).map(|seq| self.sizes[self.slot(seq) as usize]),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::Memory;
    use crate::sim::SimBackend;

    fn setup(pages: u32) -> (Mglru, SimBackend) {
        (
            Mglru::new(pages, MglruConfig::default()),
            SimBackend::new(pages),
        )
    }

    /// Inserts `pages` as the driver does (resident, then accessed).
    fn fault_in(m: &mut Mglru, sim: &mut SimBackend, pages: impl IntoIterator<Item = u32>) {
        for p in pages {
            m.inserted(p);
            sim.access(p, false).unwrap();
        }
    }

    fn touch(sim: &mut SimBackend, pages: impl IntoIterator<Item = u32>) {
        for p in pages {
            sim.access(p, false).unwrap();
        }
    }

    #[test]
    fn new_pages_enter_below_the_youngest_on_probation() {
        let (mut m, mut sim) = setup(256);
        fault_in(&mut m, &mut sim, [5]);
        let (min, max) = m.seqs();
        // Empty at first, so only two generations are alive: the older one.
        assert_eq!((min + 1, m.generation_of(5)), (max, Some(min)));
        assert!(m.on_probation(5));
        // With all four alive: two below the youngest.
        m.age(&mut sim).unwrap();
        for p in 6..9 {
            touch(&mut sim, [5, p - 1]);
            m.age(&mut sim).unwrap();
            fault_in(&mut m, &mut sim, [p]);
        }
        let (min, max) = m.seqs();
        assert_eq!(max - min, 3);
        assert_eq!(m.generation_of(8), Some(max - 2));
        assert_eq!(m.resident(), 4);
        assert_eq!(m.generation_of(9), None);
    }

    #[test]
    fn the_faulting_access_alone_does_not_promote() {
        let (mut m, mut sim) = setup(256);
        fault_in(&mut m, &mut sim, [5, 6]);
        let g = m.generation_of(5).unwrap();
        // Pass 1 sees both young: presumed to be the faults; probation ends.
        m.age(&mut sim).unwrap();
        assert!(!m.on_probation(5) && !m.on_probation(6));
        assert_eq!((m.generation_of(5), m.generation_of(6)), (Some(g), Some(g)));
        // Page 6 is used again, page 5 is not: only 6 reaches the youngest.
        touch(&mut sim, [6]);
        m.age(&mut sim).unwrap();
        assert_eq!(m.generation_of(6), Some(m.seqs().1));
        assert_eq!(m.generation_of(5), Some(g));
        assert_eq!(m.stats().promoted_by_pass, 1);
    }

    #[test]
    fn a_pass_that_sees_no_use_opens_no_generation() {
        let (mut m, mut sim) = setup(256);
        fault_in(&mut m, &mut sim, 0..10);
        m.age(&mut sim).unwrap();
        let seqs = m.seqs();
        m.age(&mut sim).unwrap();
        m.age(&mut sim).unwrap();
        assert_eq!(m.seqs(), seqs);
        assert!(m.stats().passes_without_advance >= 2);
        touch(&mut sim, [3]);
        m.age(&mut sim).unwrap();
        assert_eq!(m.seqs(), (seqs.0, seqs.1 + 1));
        assert_eq!(m.generation_of(3), Some(seqs.1 + 1));
    }

    #[test]
    fn generations_stay_within_the_configured_count() {
        let (mut m, mut sim) = setup(256);
        fault_in(&mut m, &mut sim, 0..256);
        for round in 0..20u32 {
            touch(&mut sim, (round % 8..256).step_by(8));
            m.age(&mut sim).unwrap();
            let (min, max) = m.seqs();
            assert!(max - min < 4, "{min}..={max}");
            let sizes = m.generation_sizes().unwrap();
            assert!(sizes.as_slice().len() <= 4);
            assert_eq!(sizes.as_slice().iter().sum::<u32>(), 256);
        }
    }

    #[test]
    fn eviction_takes_the_oldest_generation_first() {
        let (mut m, mut sim) = setup(64);
        fault_in(&mut m, &mut sim, 0..64);
        m.age(&mut sim).unwrap();
        touch(&mut sim, 0..32);
        m.age(&mut sim).unwrap();
        let mut out = Vec::new();
        m.select_victims(&mut sim, 8, &mut out).unwrap();
        assert_eq!(out, (32..40).collect::<Vec<_>>());
        assert_eq!(m.resident(), 56);
        assert!(out.iter().all(|&p| m.generation_of(p).is_none()));
        // The cursor goes on where it stopped.
        m.select_victims(&mut sim, 4, &mut out).unwrap();
        assert_eq!(out[8..], [40, 41, 42, 43]);
    }

    #[test]
    fn look_around_is_one_masked_call_that_also_promotes_neighbours() {
        let (mut m, mut sim) = setup(1024);
        fault_in(&mut m, &mut sim, 0..512);
        m.age(&mut sim).unwrap(); // probations end
        touch(&mut sim, 100..110);
        m.age(&mut sim).unwrap(); // 100..110 -> a new youngest generation
        touch(&mut sim, 200..210);
        m.age(&mut sim).unwrap(); // 200..210 -> the next one; 100..110 below
        let (min, max) = m.seqs();
        assert_eq!(m.generation_of(105), Some(max - 1));
        assert_eq!(m.generation_of(10), Some(min));
        // A young candidate, a young neighbour in a middle generation and
        // one in the youngest.
        touch(&mut sim, [10, 105, 205]);
        let calls = sim.calls();
        let mut out = Vec::new();
        m.select_victims(&mut sim, 12, &mut out).unwrap();
        assert_eq!(sim.calls() - calls, 1, "one call for the whole window");
        assert_eq!(out, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12]);
        // The candidate was kept and its flag cleared (it was in the mask)...
        assert_eq!(m.generation_of(10), Some(max));
        assert!(!sim.is_young(10));
        // ...the neighbour was promoted from the same bitmap, flag left set.
        assert_eq!(m.generation_of(105), Some(max));
        assert!(sim.is_young(105) && sim.is_young(205));
        let s = m.stats();
        assert_eq!(
            (s.candidates_kept, s.neighbours_promoted, s.lookaround_calls),
            (1, 1, 1)
        );
    }

    #[test]
    fn a_young_candidate_on_probation_is_spared_once() {
        let (mut m, mut sim) = setup(64);
        fault_in(&mut m, &mut sim, 0..64);
        let mut out = Vec::new();
        m.select_victims(&mut sim, 8, &mut out).unwrap();
        // First look: all young, but those bits are the faults: spared, flags
        // cleared. Second look (the next lap): evicted.
        assert_eq!(out, (0..8).collect::<Vec<_>>());
        assert_eq!(sim.calls(), 2);
        assert!((8..64).all(|p| !m.on_probation(p)));
    }

    #[test]
    fn select_cold_takes_pages_not_young_for_min_age_passes() {
        let (mut m, mut sim) = setup(128);
        fault_in(&mut m, &mut sim, 0..100);
        m.age(&mut sim).unwrap();
        for _ in 0..4 {
            touch(&mut sim, 0..50);
            m.age(&mut sim).unwrap();
        }
        // 50..100 were last young in pass 1 (their faults), 4 passes ago.
        let mut out = Vec::new();
        m.select_cold(&mut sim, 5, &mut out).unwrap();
        assert!(out.is_empty(), "{out:?}");
        m.select_cold(&mut sim, 4, &mut out).unwrap();
        assert_eq!(out, (50..100).collect::<Vec<_>>());
        m.select_cold(&mut sim, 1, &mut out).unwrap();
        assert_eq!(out.len(), 50, "0..50 were young in the last pass");
        assert_eq!(m.resident(), 50);
        assert_eq!(m.stats().selected_cold, 50);
    }

    #[test]
    fn ending_probation_counts_as_young_for_proactive_reclaim() {
        let (mut m, mut sim) = setup(64);
        fault_in(&mut m, &mut sim, 0..8);
        for _ in 0..5 {
            m.age(&mut sim).unwrap();
        }
        // Refault page 20 into the old generation of 0..8.
        fault_in(&mut m, &mut sim, [20]);
        m.age(&mut sim).unwrap();
        let mut out = Vec::new();
        m.select_cold(&mut sim, 1, &mut out).unwrap();
        assert!(out.is_empty(), "{out:?}: page 20 was young in this pass");
        m.age(&mut sim).unwrap();
        m.select_cold(&mut sim, 1, &mut out).unwrap();
        assert_eq!(out, [0, 1, 2, 3, 4, 5, 6, 7, 20]);
    }

    #[test]
    fn eviction_empties_memory_when_asked_for_everything() {
        let (mut m, mut sim) = setup(300);
        fault_in(&mut m, &mut sim, 0..300);
        m.age(&mut sim).unwrap();
        touch(&mut sim, 0..300);
        let mut out = Vec::new();
        m.select_victims(&mut sim, 1000, &mut out).unwrap();
        out.sort_unstable();
        assert_eq!(out, (0..300).collect::<Vec<_>>());
        assert_eq!(m.resident(), 0);
        // And it starts over cleanly.
        fault_in(&mut m, &mut sim, [7]);
        assert!(m.on_probation(7));
        assert_eq!(m.resident(), 1);
    }

    #[test]
    #[should_panic(expected = "lookaround")]
    fn bad_lookaround_is_refused() {
        Mglru::new(
            64,
            MglruConfig {
                lookaround: 100,
                ..MglruConfig::default()
            },
        );
    }
}
