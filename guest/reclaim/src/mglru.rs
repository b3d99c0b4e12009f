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
    /// If the configuration is out of range (see [`MglruConfig`]).
    pub fn new(pages: u32, cfg: MglruConfig) -> Self {
        assert!(
            (4..=MAX_GENS as u8).contains(&cfg.gens),
            "gens must be in 4..={MAX_GENS}"
        );
        assert!(
            (1..cfg.gens).contains(&cfg.insert_distance),
            "insert_distance must be in 1..gens"
        );
        assert!(
            cfg.lookaround.is_power_of_two() && (64..=512).contains(&cfg.lookaround),
            "lookaround must be a power of two in 64..=512"
        );
        assert!(cfg.harvest_chunk >= 64, "harvest_chunk must be >= 64");
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
    /// effect.)
    fn end_probation(&mut self, page: u32, s: u8) {
        self.state[page as usize] = s & !PROBATION;
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
