//! Replays a trace against a policy, on the host ([`crate::sim`]) or on the
//! target (the guest kernel with real memory and hypercalls), and reports.
//!
//! The driver owns the bookkeeping that must not depend on the memory
//! implementation: which pages were never touched, are resident or were
//! evicted, so a *refault* (an access to an evicted page; first touches are
//! not refaults) is counted the same way everywhere, and the same way as
//! the offline references [`crate::sim::lru_refaults`] and
//! [`crate::sim::belady_refaults`].
//!
//! Per access: if the page is not resident and the resident count is at the
//! target, the policy selects a batch of victims and the driver evicts them
//! ([`Memory::evict`]); the page becomes resident ([`Policy::inserted`]);
//! then it is accessed ([`Memory::access`]). Every
//! [`DriverConfig::interval`] accesses the policy runs an aging pass, and in
//! proactive mode ([`DriverConfig::cold_age`]) the driver then evicts what
//! [`Policy::select_cold`] returns.

use crate::backend::Backend;
use crate::policy::Policy;
use crate::workload::{Access, Change, Workload, MAX_PHASES};
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

/// The memory the driver manages: what the guest does with real pages.
///
/// Both calls are about pages of the region `0..pages`. In the simulator
/// they are bookkeeping (an access sets the page's access bit); on the
/// target `access` loads or stores (an evicted page faults and is restored
/// by the guest's fault handler) and `evict` saves the page to the store,
/// unmaps it and releases the frame.
pub trait Memory {
    /// What a failed access or eviction reports.
    type Error: fmt::Debug;

    /// Loads from (or with `write`, stores to) `page`. The driver has made
    /// it resident first.
    fn access(&mut self, page: u32, write: bool) -> Result<(), Self::Error>;

    /// Evicts resident `page`.
    fn evict(&mut self, page: u32) -> Result<(), Self::Error>;
}

/// How the driver runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DriverConfig {
    /// Hard memory target: at most this many resident pages. `None`: no
    /// memory pressure.
    pub target: Option<u32>,
    /// Proactive reclaim: after each aging pass evict the pages not young
    /// for this many passes ([`Policy::select_cold`]).
    pub cold_age: Option<u32>,
    /// Accesses between aging passes.
    pub interval: u32,
    /// Pages evicted at once when a miss finds memory at the target.
    pub batch: u32,
}

impl DriverConfig {
    /// Default eviction batch.
    pub const DEFAULT_BATCH: u32 = 32;
    /// Default age threshold of proactive reclaim, in aging passes.
    pub const DEFAULT_COLD_AGE: u32 = 4;

    /// The defaults for a region of `pages` pages: no target, no proactive
    /// reclaim, an aging pass every `pages` accesses (see the crate docs),
    /// batches of [`Self::DEFAULT_BATCH`].
    pub fn new(pages: u32) -> Self {
        DriverConfig {
            target: None,
            cold_age: None,
            interval: pages.max(1),
            batch: Self::DEFAULT_BATCH,
        }
    }

    /// With a hard memory target of `resident` pages.
    pub fn target(self, resident: u32) -> Self {
        DriverConfig {
            target: Some(resident),
            ..self
        }
    }

    /// With proactive reclaim of pages not young for `passes` passes.
    pub fn cold_age(self, passes: u32) -> Self {
        DriverConfig {
            cold_age: Some(passes),
            ..self
        }
    }

    /// With an aging pass every `accesses` accesses.
    pub fn interval(self, accesses: u32) -> Self {
        DriverConfig {
            interval: accesses,
            ..self
        }
    }

    /// With eviction batches of `pages` pages.
    pub fn batch(self, pages: u32) -> Self {
        DriverConfig {
            batch: pages,
            ..self
        }
    }

    /// `pct` percent of `pages` (rounded down, at least one page).
    pub fn pct(pages: u32, pct: u32) -> u32 {
        ((u64::from(pages) * u64::from(pct) / 100) as u32).max(1)
    }

    /// Checks that nothing is zero that must not be.
    pub fn check(&self) -> Result<(), DriverConfigError> {
        if self.interval == 0 {
            Err(DriverConfigError::ZeroInterval)
        } else if self.batch == 0 {
            Err(DriverConfigError::ZeroBatch)
        } else if self.target == Some(0) {
            Err(DriverConfigError::ZeroTarget)
        } else {
            Ok(())
        }
    }
}

/// A [`DriverConfig`] the driver cannot run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverConfigError {
    /// `interval` is zero.
    ZeroInterval,
    /// `batch` is zero.
    ZeroBatch,
    /// `target` is zero.
    ZeroTarget,
}

impl fmt::Display for DriverConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DriverConfigError::ZeroInterval => "aging interval must be positive",
            DriverConfigError::ZeroBatch => "eviction batch must be positive",
            DriverConfigError::ZeroTarget => "memory target must be positive",
        })
    }
}

/// Why a run stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunError<B, M> {
    /// The backend failed.
    Backend(B),
    /// The memory failed.
    Memory(M),
    /// Memory is at the target and the policy selected no victim.
    NoVictims {
        /// Pages resident.
        resident: u32,
        /// The target.
        target: u32,
    },
}

impl<B: fmt::Debug, M: fmt::Debug> fmt::Display for RunError<B, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunError::Backend(e) => write!(f, "backend: {e:?}"),
            RunError::Memory(e) => write!(f, "memory: {e:?}"),
            RunError::NoVictims { resident, target } => {
                write!(
                    f,
                    "no victims with {resident} pages resident at target {target}"
                )
            }
        }
    }
}

/// The error of a driver over `E`.
pub type RunErrorOf<E> = RunError<<E as Backend>::Error, <E as Memory>::Error>;

/// Counts of one phase (or of a part of one).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PhaseStats {
    /// Accesses.
    pub accesses: u64,
    /// First touches.
    pub first_touches: u64,
    /// Accesses to evicted pages.
    pub refaults: u64,
    /// Accesses to pages hot in this phase.
    pub hot_accesses: u64,
    /// Refaults of pages hot in this phase.
    pub hot_refaults: u64,
}

/// `num / den` printed with four decimals, integer arithmetic only (`-`
/// when `den` is zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fixed4 {
    /// Numerator.
    pub num: u64,
    /// Denominator.
    pub den: u64,
}

impl Fixed4 {
    /// The ratio as a float (host-side analysis).
    pub fn as_f64(self) -> f64 {
        if self.den == 0 {
            0.0
        } else {
            self.num as f64 / self.den as f64
        }
    }
}

impl fmt::Display for Fixed4 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.den == 0 {
            return f.write_str("-");
        }
        let scaled =
            (u128::from(self.num) * 10_000 + u128::from(self.den) / 2) / u128::from(self.den);
        write!(f, "{}.{:04}", scaled / 10_000, scaled % 10_000)
    }
}

/// What a run did. [`fmt::Display`] prints it as one `key=value` line that
/// host and target share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Workload name.
    pub workload: &'static str,
    /// Policy name.
    pub policy: &'static str,
    /// Pages of the region.
    pub pages: u32,
    /// Memory target, if any.
    pub target: Option<u32>,
    /// Proactive age threshold, if any.
    pub cold_age: Option<u32>,
    /// Accesses replayed.
    pub accesses: u64,
    /// First touches.
    pub first_touches: u64,
    /// Accesses to evicted pages.
    pub refaults: u64,
    /// Resident pages averaged over accesses.
    pub held_avg: u32,
    /// Resident pages at the end.
    pub held_final: u32,
    /// Resident pages at the end that are hot in the last phase.
    pub held_hot_final: u32,
    /// Backend calls made during the run (aging hypercalls).
    pub aging_calls: u64,
    /// Pages evicted.
    pub evictions: u64,
    /// Aging passes.
    pub passes: u64,
    /// Per-phase counts (the first `nphases` are meaningful).
    pub phases: [PhaseStats; MAX_PHASES],
    /// Phases of the workload.
    pub nphases: u8,
    /// The change the workload measures, if any.
    pub change: Option<Change>,
    /// Counts over the second half of the phase before the change (settled).
    pub pre_tail: PhaseStats,
    /// Aging passes from the start of the phase after the change until 98%
    /// of that phase's hot set was resident (`None`: never, or no change).
    pub converge_passes: Option<u32>,
}

impl Report {
    /// Refaults per access.
    pub fn refault_rate(&self) -> Fixed4 {
        Fixed4 {
            num: self.refaults,
            den: self.accesses,
        }
    }

    /// Hot-page refaults per hot access in the settled half of the phase
    /// before the change.
    pub fn hot_pre(&self) -> Option<Fixed4> {
        self.change.map(|_| Fixed4 {
            num: self.pre_tail.hot_refaults,
            den: self.pre_tail.hot_accesses,
        })
    }

    /// Hot-page refaults per hot access over the phase after the change.
    pub fn hot_post(&self) -> Option<Fixed4> {
        self.change.map(|c| {
            let p = &self.phases[c.post as usize];
            Fixed4 {
                num: p.hot_refaults,
                den: p.hot_accesses,
            }
        })
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "workload={} policy={} accesses={} refaults={} refault_rate={} held_avg={} held_final={} aging_calls={} evicted={}",
            self.workload,
            self.policy,
            self.accesses,
            self.refaults,
            self.refault_rate(),
            self.held_avg,
            self.held_final,
            self.aging_calls,
            self.evictions,
        )?;
        if self.cold_age.is_some() {
            write!(f, " held_hot={}", self.held_hot_final)?;
        }
        if let (Some(pre), Some(post)) = (self.hot_pre(), self.hot_post()) {
            write!(f, " hot_pre={pre} hot_post={post} converge=")?;
            match self.converge_passes {
                Some(n) => write!(f, "{n}")?,
                None => f.write_str("-")?,
            }
        }
        Ok(())
    }
}

/// Page states of the driver.
const UNTOUCHED: u8 = 0;
const RESIDENT: u8 = 1;
const EVICTED: u8 = 2;

/// Replays accesses against a policy; see the module docs.
#[derive(Debug)]
pub struct Driver<P> {
    policy: P,
    workload: Workload,
    cfg: DriverConfig,
    state: Vec<u8>,
    resident: u32,
    victims: Vec<u32>,
    since_pass: u32,
    start_calls: Option<u64>,
    phase: u8,
    /// Passes since the phase after the change started.
    passes_since_change: Option<u32>,
    held_sum: u64,
    report: Report,
}

impl<P: Policy> Driver<P> {
    /// A driver for `workload`'s trace (the workload also tells hot pages
    /// apart for the report).
    ///
    /// # Panics
    ///
    /// If [`DriverConfig::check`] fails.
    pub fn new(policy: P, workload: &Workload, cfg: DriverConfig) -> Self {
        if let Err(e) = cfg.check() {
            panic!("bad DriverConfig: {e}");
        }
        let pages = workload.pages();
        let report = Report {
            workload: workload.name(),
            policy: policy.name(),
            pages,
            target: cfg.target,
            cold_age: cfg.cold_age,
            accesses: 0,
            first_touches: 0,
            refaults: 0,
            held_avg: 0,
            held_final: 0,
            held_hot_final: 0,
            aging_calls: 0,
            evictions: 0,
            passes: 0,
            phases: [PhaseStats::default(); MAX_PHASES],
            nphases: workload.phase_names().len() as u8,
            change: workload.change(),
            pre_tail: PhaseStats::default(),
            converge_passes: None,
        };
        Driver {
            policy,
            workload: workload.clone(),
            cfg,
            state: vec![UNTOUCHED; pages as usize],
            resident: 0,
            victims: Vec::with_capacity(cfg.batch as usize),
            since_pass: 0,
            start_calls: None,
            phase: 0,
            passes_since_change: None,
            held_sum: 0,
            report,
        }
    }

    /// The policy.
    pub fn policy(&self) -> &P {
        &self.policy
    }

    /// Pages resident now.
    pub fn resident(&self) -> u32 {
        self.resident
    }

    /// Whether `page` is resident now.
    pub fn is_resident(&self, page: u32) -> bool {
        self.state[page as usize] == RESIDENT
    }

    /// Replays one access.
    pub fn step<E: Backend + Memory>(
        &mut self,
        env: &mut E,
        a: Access,
    ) -> Result<(), RunErrorOf<E>> {
        let start = *self.start_calls.get_or_insert(env.calls());
        let index = self.report.accesses;
        if a.phase != self.phase {
            self.phase = a.phase;
            if self.report.change.is_some_and(|c| c.post == a.phase) {
                self.passes_since_change = Some(0);
            }
        }
        let hot = self.workload.is_hot(a.page, a.phase);
        let in_tail = self.report.change.is_some_and(|c| {
            let (s, e) = self.workload.phase_span(c.pre);
            c.pre == a.phase && index >= s + (e - s) / 2
        });

        let page = a.page as usize;
        let was = self.state[page];
        if was != RESIDENT {
            self.make_room(env)?;
            self.policy.inserted(a.page);
            self.state[page] = RESIDENT;
            self.resident += 1;
        }
        env.access(a.page, a.write).map_err(RunError::Memory)?;

        let refault = was == EVICTED;
        let count = |s: &mut PhaseStats| {
            s.accesses += 1;
            s.first_touches += u64::from(was == UNTOUCHED);
            s.refaults += u64::from(refault);
            s.hot_accesses += u64::from(hot);
            s.hot_refaults += u64::from(hot && refault);
        };
        count(&mut self.report.phases[a.phase as usize]);
        if in_tail {
            count(&mut self.report.pre_tail);
        }
        self.report.accesses += 1;
        self.report.first_touches += u64::from(was == UNTOUCHED);
        self.report.refaults += u64::from(refault);
        self.held_sum += u64::from(self.resident);

        self.since_pass += 1;
        if self.since_pass == self.cfg.interval {
            self.since_pass = 0;
            self.pass(env)?;
        }
        self.report.aging_calls = env.calls() - start;
        Ok(())
    }

    fn make_room<E: Backend + Memory>(&mut self, env: &mut E) -> Result<(), RunErrorOf<E>> {
        let Some(target) = self.cfg.target else {
            return Ok(());
        };
        if self.resident < target {
            return Ok(());
        }
        let mut victims = core::mem::take(&mut self.victims);
        victims.clear();
        let n = self.cfg.batch.min(self.resident) as usize;
        let result = self.policy.select_victims(env, n, &mut victims);
        let result = result.map_err(RunError::Backend).and_then(|()| {
            if victims.is_empty() {
                return Err(RunError::NoVictims {
                    resident: self.resident,
                    target,
                });
            }
            self.evict_all(env, &victims)
        });
        self.victims = victims;
        result
    }

    fn evict_all<E: Backend + Memory>(
        &mut self,
        env: &mut E,
        victims: &[u32],
    ) -> Result<(), RunErrorOf<E>> {
        for &v in victims {
            debug_assert_eq!(self.state[v as usize], RESIDENT, "victim {v} not resident");
            env.evict(v).map_err(RunError::Memory)?;
            self.state[v as usize] = EVICTED;
            self.resident -= 1;
            self.report.evictions += 1;
        }
        debug_assert_eq!(self.policy.resident(), self.resident);
        Ok(())
    }

    fn pass<E: Backend + Memory>(&mut self, env: &mut E) -> Result<(), RunErrorOf<E>> {
        self.policy.age(env).map_err(RunError::Backend)?;
        self.report.passes += 1;
        if let Some(age) = self.cfg.cold_age {
            let mut victims = core::mem::take(&mut self.victims);
            victims.clear();
            let result = self
                .policy
                .select_cold(env, age, &mut victims)
                .map_err(RunError::Backend)
                .and_then(|()| self.evict_all(env, &victims));
            self.victims = victims;
            result?;
        }
        if let Some(n) = self.passes_since_change.as_mut() {
            *n += 1;
            let n = *n;
            if self.report.converge_passes.is_none()
                && self.hot_resident(self.phase) * 50 >= self.workload.hot_pages() * 49
            {
                self.report.converge_passes = Some(n);
                self.passes_since_change = None;
            }
        }
        Ok(())
    }

    /// Resident pages that are hot in `phase`.
    fn hot_resident(&self, phase: u8) -> u32 {
        (0..self.workload.pages())
            .filter(|&p| self.state[p as usize] == RESIDENT && self.workload.is_hot(p, phase))
            .count() as u32
    }

    /// The report so far.
    pub fn report(&self) -> Report {
        let mut r = self.report.clone();
        r.held_avg = self.held_sum.checked_div(r.accesses).unwrap_or(0) as u32;
        r.held_final = self.resident;
        r.held_hot_final = self.hot_resident(self.phase);
        r
    }
}

/// Replays `workload`'s whole trace against `policy` over `env`.
pub fn run<P: Policy, E: Backend + Memory>(
    policy: P,
    env: &mut E,
    workload: &Workload,
    cfg: DriverConfig,
) -> Result<Report, RunErrorOf<E>> {
    let mut driver = Driver::new(policy, workload, cfg);
    for a in workload.trace() {
        driver.step(env, a)?;
    }
    Ok(driver.report())
}
