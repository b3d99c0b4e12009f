//! The driver's bookkeeping and report, checked from the memory's side.

use proptest::prelude::*;
use reclaim::backend::{AgeFlags, Backend};
use reclaim::driver::{run, Driver, DriverConfig, Memory, RunError};
use reclaim::sim::{SimBackend, SimError};
use reclaim::workload::{Workload, WorkloadConfig, WorkloadKind};
use reclaim::{MglruConfig, Policy, PolicyKind};
use std::collections::HashSet;

/// A memory that checks what the driver does with it: never more resident
/// pages than the target, no eviction of a page that is not resident; and
/// that can fail an eviction on request.
struct Checked {
    sim: SimBackend,
    resident: HashSet<u32>,
    target: Option<u32>,
    accesses: u64,
    evictions: u64,
    fail_evict_after: Option<u64>,
}

impl Checked {
    fn new(pages: u32, target: Option<u32>) -> Self {
        Checked {
            sim: SimBackend::new(pages),
            resident: HashSet::new(),
            target,
            accesses: 0,
            evictions: 0,
            fail_evict_after: None,
        }
    }
}

#[derive(Debug, PartialEq)]
enum CheckError {
    Sim(SimError),
    Injected,
}

impl Backend for Checked {
    type Error = SimError;
    fn max_pages_per_call(&self) -> u32 {
        self.sim.max_pages_per_call()
    }
    fn test_clear(
        &mut self,
        first: u32,
        npages: u32,
        bitmap: &mut [u64],
        flags: AgeFlags,
    ) -> Result<u64, SimError> {
        self.sim.test_clear(first, npages, bitmap, flags)
    }
    fn calls(&self) -> u64 {
        self.sim.calls()
    }
}

impl Memory for Checked {
    type Error = CheckError;
    fn access(&mut self, page: u32, write: bool) -> Result<(), CheckError> {
        self.accesses += 1;
        self.resident.insert(page);
        if let Some(t) = self.target {
            assert!(
                self.resident.len() <= t as usize,
                "{} resident > target {t}",
                self.resident.len()
            );
        }
        self.sim.access(page, write).map_err(CheckError::Sim)
    }
    fn evict(&mut self, page: u32) -> Result<(), CheckError> {
        if self.fail_evict_after == Some(self.evictions) {
            return Err(CheckError::Injected);
        }
        self.evictions += 1;
        assert!(self.resident.remove(&page), "evicted {page}, not resident");
        self.sim.evict(page).map_err(CheckError::Sim)
    }
}

fn check_run(
    kind: WorkloadKind,
    policy: PolicyKind,
    mglru: MglruConfig,
    cfg: DriverConfig,
    pages: u32,
    accesses: u64,
    seed: u64,
) {
    let w = Workload::new(WorkloadConfig::new(kind, pages, accesses, seed)).unwrap();
    let mut mem = Checked::new(pages, cfg.target);
    let mut d = Driver::new(policy.build_with(pages, mglru), &w, cfg);
    for a in w.trace() {
        d.step(&mut mem, a).unwrap();
    }
    let r = d.report();
    assert_eq!(r.accesses, accesses);
    assert_eq!(mem.accesses, accesses);
    // Every fault is a first touch or a refault; every eviction undoes one.
    assert_eq!(r.first_touches + r.refaults, mem.sim.faults());
    assert_eq!(r.first_touches, u64::from(pages).min(accesses));
    assert_eq!(r.evictions, mem.evictions);
    assert_eq!(u64::from(r.held_final), mem.sim.faults() - mem.evictions);
    assert_eq!(r.held_final as usize, mem.resident.len());
    assert!((0..pages).all(|p| d.is_resident(p) == mem.resident.contains(&p)));
    assert_eq!(d.policy().resident(), r.held_final);
    let phase_total: u64 = r.phases.iter().map(|p| p.refaults).sum();
    assert_eq!(phase_total, r.refaults);
    if let Some(g) = d.policy().generation_sizes() {
        assert!(g.as_slice().len() <= usize::from(mglru.gens));
        assert_eq!(g.as_slice().iter().sum::<u32>(), r.held_final);
    }
    // The same run over the plain simulator reports the same: the memory
    // implementation does not enter the counting.
    let mut plain = SimBackend::new(pages);
    let again = run(policy.build_with(pages, mglru), &mut plain, &w, cfg).unwrap();
    assert_eq!(again, r);
}

#[test]
fn every_policy_and_workload_keeps_the_books() {
    for kind in WorkloadKind::ALL {
        for policy in PolicyKind::ALL {
            let cfg = DriverConfig::new(1024).target(300);
            check_run(kind, policy, MglruConfig::default(), cfg, 1024, 30_000, 9);
            let cfg = DriverConfig::new(1024).cold_age(3);
            check_run(kind, policy, MglruConfig::default(), cfg, 1024, 30_000, 9);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn random_configurations_keep_the_books(
        kind in 0usize..4,
        policy in 0usize..3,
        pages in 64u32..1500,
        accesses in 0u64..20_000,
        seed in any::<u64>(),
        target_pct in 5u32..101,
        cold_age in prop::option::of(1u32..6),
        interval in 1u32..3000,
        batch in 1u32..80,
        gens in 4u8..=16,
        dist in 1u8..4,
        lookaround_shift in 0u32..4,
    ) {
        let cfg = DriverConfig::new(pages)
            .target(DriverConfig::pct(pages, target_pct))
            .interval(interval)
            .batch(batch);
        let cfg = DriverConfig { cold_age, ..cfg };
        let mglru = MglruConfig {
            gens,
            insert_distance: dist.min(gens - 1),
            lookaround: 64 << lookaround_shift,
            ..MglruConfig::default()
        };
        check_run(WorkloadKind::ALL[kind], PolicyKind::ALL[policy], mglru, cfg, pages, accesses, seed);
    }
}

#[test]
fn memory_errors_stop_the_run() {
    let w = Workload::new(WorkloadConfig::new(WorkloadKind::HotCold, 256, 5000, 1)).unwrap();
    let mut mem = Checked::new(256, Some(100));
    mem.fail_evict_after = Some(40);
    let err = run(
        PolicyKind::Mglru.build(256),
        &mut mem,
        &w,
        DriverConfig::new(256).target(100),
    )
    .unwrap_err();
    assert_eq!(err, RunError::Memory(CheckError::Injected));
    assert!(err.to_string().starts_with("memory: "));
}

#[test]
fn report_is_one_key_value_line() {
    let w = Workload::new(WorkloadConfig::new(WorkloadKind::Scan, 16384, 800_000, 1)).unwrap();
    let cfg = DriverConfig::new(16384).target(DriverConfig::pct(16384, 40));
    let mut sim = SimBackend::new(16384);
    let r = run(PolicyKind::ClockPerPage.build(16384), &mut sim, &w, cfg).unwrap();
    let line = r.to_string();
    println!("{line} ({} chars)", line.len());
    assert!(!line.contains('\n'));
    assert!(line.len() <= 200, "{} chars", line.len());
    let kv: Vec<(&str, &str)> = line
        .split(' ')
        .map(|t| t.split_once('=').expect("key=value"))
        .collect();
    let keys: Vec<&str> = kv.iter().map(|(k, _)| *k).collect();
    assert_eq!(
        keys,
        [
            "workload",
            "policy",
            "accesses",
            "refaults",
            "refault_rate",
            "held_avg",
            "held_final",
            "aging_calls",
            "evicted",
            "hot_pre",
            "hot_post",
            "converge"
        ]
    );
    assert_eq!(kv[0].1, "scan");
    assert_eq!(kv[1].1, "clock-perpage");
    assert_eq!(kv[2].1, "800000");
    let rate = kv[4].1;
    assert!(rate.len() == 6 && rate.starts_with("0."), "{rate}");
    assert!(kv.iter().all(|(_, v)| !v.is_empty()));
    // Values a script can check against the struct.
    assert_eq!(kv[3].1, r.refaults.to_string());
    assert_eq!(kv[7].1, r.aging_calls.to_string());
}

#[test]
#[should_panic(expected = "memory target must be positive")]
fn a_zero_target_is_refused() {
    let w = Workload::new(WorkloadConfig::new(WorkloadKind::HotCold, 64, 10, 1)).unwrap();
    Driver::new(
        PolicyKind::Fifo.build(64),
        &w,
        DriverConfig::new(64).target(0),
    );
}

#[test]
#[should_panic(expected = "aging interval must be positive")]
fn a_zero_interval_is_refused() {
    let w = Workload::new(WorkloadConfig::new(WorkloadKind::HotCold, 64, 10, 1)).unwrap();
    Driver::new(
        PolicyKind::Fifo.build(64),
        &w,
        DriverConfig::new(64).interval(0),
    );
}
