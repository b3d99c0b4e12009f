//! `mode=reclaim`: the reclaim workloads on real memory, under each
//! policy, with the hypervisor's aging bitmaps, page store and release.
//!
//! For every workload (`workloads=`) and policy (`policies=`) the pageable
//! arena is reset (every page dropped and released), the seeded trace is
//! replayed by the `reclaim` crate's [`Driver`] with real accesses
//! ([`pageable::read_page`] / [`pageable::write_page`]; an evicted page
//! faults and is restored by the stage-1 fault handler) and real evictions
//! ([`pageable::evict`]), and the run prints:
//!
//! - `reclaim: sample workload=W policy=P step=N resident=N held=N [gens=..]`
//!   about 40 times per run (`held`: frames the hypervisor holds for the
//!   arena, from `STATS`), which `scripts/plot` draws;
//! - `reclaim: result <the driver's report> pages=N hot_pages=N
//!   hyp_held_avg=N hyp_held_final=N saved_pct=F store_bytes=N
//!   aging_time_pct=F roundtrips=N mismatches=N`.
//!
//! At the end: `reclaim: done runs=N roundtrips=N mismatches=N`, and the
//! machine exits 0 when no run failed and no checksum mismatched.
//!
//! Workloads with a memory target run at `target_pct=` of the arena;
//! `idle` runs without one, with proactive reclaim of pages not young for
//! [`DriverConfig::DEFAULT_COLD_AGE`] passes. The configuration is the one
//! `cargo run -p reclaim --example simulate` uses for the same arguments,
//! so the host replays the very same trace.

use alloc::vec;
use alloc::vec::Vec;

use hyp_abi::stats_group;
use reclaim::backend::{AgeFlags, Backend};
use reclaim::{
    Driver, DriverConfig, Memory, Policy, PolicyKind, Workload, WorkloadConfig, WorkloadKind,
};

use crate::cmdline::ReclaimArgs;
use crate::pageable::{self, EvictError};
use crate::power::{self, ExitCode};
use crate::smccc_client::{self, CallError};
use crate::System;

/// Samples printed per run.
const SAMPLES: u64 = 40;

/// The environment the driver runs in: `AGING_TEST_CLEAR` over the
/// pageable arena (page `i` of the policy is arena page `i`) and the
/// arena's real memory.
#[derive(Debug)]
struct Env {
    /// Most pages per aging call (`AGING_FEATURES`).
    max_pages: u32,
    /// Aging calls made.
    calls: u64,
    /// Timer ticks spent inside the aging calls.
    ticks: u64,
    /// Version last written to each page (0: never written).
    versions: Vec<u32>,
}

impl Env {
    /// An environment for an arena of `pages` pages, using the limits
    /// `AGING_FEATURES` reports.
    fn new(pages: u32) -> Result<Self, CallError> {
        let features = smccc_client::aging_features()?;
        Ok(Self {
            max_pages: u32::try_from(features.max_pages).unwrap_or(u32::MAX),
            calls: 0,
            ticks: 0,
            versions: vec![0; pages as usize],
        })
    }
}

impl Backend for Env {
    type Error = CallError;

    fn max_pages_per_call(&self) -> u32 {
        self.max_pages
    }

    fn test_clear(
        &mut self,
        first: u32,
        npages: u32,
        bitmap: &mut [u64],
        flags: AgeFlags,
    ) -> Result<u64, CallError> {
        let start = crate::timer::ticks();
        self.calls += 1;
        // The bitmap lives in kernel memory, identity mapped: its VA is
        // its IPA.
        let r = smccc_client::aging_test_clear(
            pageable::page_addr(first),
            u64::from(npages),
            bitmap.as_mut_ptr() as u64,
            flags.bits(),
        );
        self.ticks += crate::timer::ticks() - start;
        r
    }

    fn calls(&self) -> u64 {
        self.calls
    }
}

impl Memory for Env {
    type Error = EvictError;

    fn access(&mut self, page: u32, write: bool) -> Result<(), EvictError> {
        let version = &mut self.versions[page as usize];
        // A page's first access writes it, so every later read has
        // contents to check.
        if write || *version == 0 {
            *version += 1;
            pageable::write_page(page, *version);
        } else {
            pageable::read_page(page);
        }
        Ok(())
    }

    fn evict(&mut self, page: u32) -> Result<(), EvictError> {
        pageable::evict(page).map(drop)
    }
}

/// Frames the hypervisor holds for the whole VM.
fn frames_mapped() -> Result<u64, CallError> {
    Ok(smccc_client::stats_group(stats_group::FAULTS)?[0])
}

/// Generation sizes as `scripts/plot` reads them: comma-separated, oldest
/// first, or `-` for a policy without generations.
struct Gens(Option<reclaim::GenSizes>);

impl core::fmt::Display for Gens {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let Some(g) = &self.0 else {
            return f.write_str("-");
        };
        for (i, n) in g.as_slice().iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{n}")?;
        }
        Ok(())
    }
}

/// A percentage with two decimals, printed from integers.
struct Pct(u64, u64);

impl core::fmt::Display for Pct {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let hundredths = (self.0 * 10_000).checked_div(self.1).unwrap_or(0);
        write!(f, "{}.{:02}", hundredths / 100, hundredths % 100)
    }
}

/// Why a run failed.
#[derive(Debug)]
enum RunFailure {
    Call(CallError),
    Driver(alloc::string::String),
}

impl core::fmt::Display for RunFailure {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Call(e) => write!(f, "{e}"),
            Self::Driver(e) => f.write_str(e),
        }
    }
}

impl From<CallError> for RunFailure {
    fn from(e: CallError) -> Self {
        Self::Call(e)
    }
}

/// Runs one workload under one policy; prints samples and the result.
fn run_one(args: &ReclaimArgs, kind: WorkloadKind, policy: PolicyKind) -> Result<(), RunFailure> {
    let pages = pageable::pages();
    pageable::reset()?;
    let baseline = frames_mapped()?;
    let workload = Workload::new(WorkloadConfig::new(kind, pages, args.accesses, args.seed))
        .map_err(|e| RunFailure::Driver(alloc::format!("{e}")))?;
    let mut cfg = DriverConfig::new(pages);
    cfg = if kind == WorkloadKind::Idle {
        cfg.cold_age(DriverConfig::DEFAULT_COLD_AGE)
    } else {
        cfg.target(DriverConfig::pct(pages, args.target_pct))
    };
    let mut env = Env::new(pages)?;
    let mut driver = Driver::new(policy.build(pages), &workload, cfg);
    let (refaults0, mismatches0) = (pageable::refaults(), pageable::mismatches());
    let total = workload.trace().count() as u64;
    let every = (total / SAMPLES).max(1);
    let (mut held_sum, mut samples) = (0u64, 0u64);
    let start = crate::timer::ticks();
    for (i, access) in workload.trace().enumerate() {
        driver
            .step(&mut env, access)
            .map_err(|e| RunFailure::Driver(alloc::format!("{e}")))?;
        let step = i as u64 + 1;
        if step.is_multiple_of(every) || step == total {
            let held = frames_mapped()?.saturating_sub(baseline);
            held_sum += held;
            samples += 1;
            log::info!(
                "reclaim: sample workload={} policy={} step={step} resident={} held={held} gens={}",
                kind.name(),
                policy.name(),
                driver.resident(),
                Gens(driver.policy().generation_sizes()),
            );
        }
    }
    let elapsed = crate::timer::ticks() - start;
    let report = driver.report();
    let held_final = frames_mapped()?.saturating_sub(baseline);
    let store_bytes = smccc_client::stats_group(stats_group::STORE)?[1];
    let roundtrips = pageable::refaults() - refaults0;
    let mismatches = pageable::mismatches() - mismatches0;
    log::info!(
        "reclaim: result {report} pages={pages} hot_pages={} hyp_held_avg={} hyp_held_final={held_final} saved_pct={} store_bytes={store_bytes} aging_time_pct={} roundtrips={roundtrips} mismatches={mismatches}",
        workload.hot_pages(),
        held_sum / samples.max(1),
        Pct(u64::from(pages) - u64::from(report.held_avg).min(u64::from(pages)), u64::from(pages)),
        Pct(env.ticks, elapsed),
    );
    Ok(())
}

/// `mode=reclaim`: every workload under every policy, then the verdict.
pub fn run(system: &System) -> ! {
    let args = &system.cmdline.reclaim;
    let mut plan = Vec::new();
    for w in &args.workloads {
        let Some(kind) = WorkloadKind::parse(w) else {
            power::fatal(&alloc::format!("workloads: unknown workload `{w}`"));
        };
        for p in &args.policies {
            let Some(policy) = PolicyKind::parse(p) else {
                power::fatal(&alloc::format!("policies: unknown policy `{p}`"));
            };
            plan.push((kind, policy));
        }
    }
    log::info!(
        "reclaim: start pages={} accesses={} seed={} target_pct={} runs={}",
        pageable::pages(),
        args.accesses,
        args.seed,
        args.target_pct,
        plan.len()
    );
    let mut failed = 0;
    for &(kind, policy) in &plan {
        if let Err(e) = run_one(args, kind, policy) {
            failed += 1;
            log::error!(
                "reclaim: run workload={} policy={} failed: {e}",
                kind.name(),
                policy.name()
            );
        }
    }
    let mismatches = pageable::mismatches();
    log::info!(
        "reclaim: done runs={} failed={failed} roundtrips={} mismatches={mismatches}",
        plan.len(),
        pageable::refaults()
    );
    if let Err(e) = pageable::reset() {
        log::warn!("reclaim: final reset: {e}");
    }
    power::exit(if failed == 0 && mismatches == 0 {
        ExitCode::Success
    } else {
        ExitCode::TestsFailed
    })
}
