//! Replays a seeded workload on the host simulator and prints one report
//! line per policy, then the offline references over the same trace and
//! capacity, so scripts can compare a target run with the host.
//!
//! ```text
//! cargo run --release -p reclaim --example simulate -- \
//!     --workload hotcold --pages 4096 --accesses 200000 --seed 1 --target-pct 40
//! cargo run --release -p reclaim --example simulate -- --workload idle --cold-age 4
//! ```
//!
//! Options: `--workload idle|hotcold|phase|scan`, `--pages N`,
//! `--accesses N`, `--seed S`, `--target-pct P` (memory target, percent of
//! pages) or `--cold-age A` (proactive reclaim after A idle passes; both may
//! be given), `--interval N` (default: `pages`), `--batch N`,
//! `--policies a,b,..`, `--gens N`, `--insert-distance N`, `--lookaround N`,
//! `--harvest-chunk N` ([`MglruConfig`]), `--verbose` (policy internals on
//! stderr).

use reclaim::driver::{self, DriverConfig};
use reclaim::sim::{belady_refaults, lru_refaults, SimBackend};
use reclaim::workload::{Workload, WorkloadConfig, WorkloadKind};
use reclaim::{AnyPolicy, MglruConfig, Policy, PolicyKind};
use std::process::ExitCode;

struct Args {
    workload: WorkloadKind,
    pages: u32,
    accesses: u64,
    seed: u64,
    target_pct: Option<u32>,
    cold_age: Option<u32>,
    interval: Option<u32>,
    batch: u32,
    mglru: MglruConfig,
    policies: Vec<PolicyKind>,
    verbose: bool,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        workload: WorkloadKind::HotCold,
        pages: 4096,
        accesses: 200_000,
        seed: 1,
        target_pct: None,
        cold_age: None,
        interval: None,
        batch: DriverConfig::DEFAULT_BATCH,
        mglru: MglruConfig::default(),
        policies: PolicyKind::ALL.to_vec(),
        verbose: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--verbose" {
            a.verbose = true;
            continue;
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |v: &str| v.parse::<u64>().map_err(|e| format!("{flag} {v}: {e}"));
        let num32 = |v: &str| v.parse::<u32>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--workload" => {
                a.workload = WorkloadKind::parse(&value)
                    .ok_or_else(|| format!("unknown workload {value}"))?;
            }
            "--pages" => a.pages = num32(&value)?,
            "--accesses" => a.accesses = num(&value)?,
            "--seed" => a.seed = num(&value)?,
            "--target-pct" => a.target_pct = Some(num32(&value)?),
            "--cold-age" => a.cold_age = Some(num32(&value)?),
            "--interval" => a.interval = Some(num32(&value)?),
            "--gens" => a.mglru.gens = num32(&value)? as u8,
            "--insert-distance" => a.mglru.insert_distance = num32(&value)? as u8,
            "--lookaround" => a.mglru.lookaround = num32(&value)?,
            "--harvest-chunk" => a.mglru.harvest_chunk = num32(&value)?,
            "--batch" => a.batch = num32(&value)?,
            "--policies" => {
                a.policies = value
                    .split(',')
                    .map(|p| PolicyKind::parse(p).ok_or_else(|| format!("unknown policy {p}")))
                    .collect::<Result<_, _>>()?;
            }
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    if a.target_pct.is_none() && a.cold_age.is_none() {
        a.target_pct = Some(if a.workload == WorkloadKind::Idle {
            100
        } else {
            40
        });
        if a.workload == WorkloadKind::Idle {
            a.target_pct = None;
            a.cold_age = Some(DriverConfig::DEFAULT_COLD_AGE);
        }
    }
    Ok(a)
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("simulate: {e}");
            return ExitCode::from(2);
        }
    };
    let workload = match Workload::new(WorkloadConfig::new(
        args.workload,
        args.pages,
        args.accesses,
        args.seed,
    )) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("simulate: {e}");
            return ExitCode::from(2);
        }
    };
    let target = args.target_pct.map(|p| DriverConfig::pct(args.pages, p));
    let cfg = DriverConfig {
        target,
        cold_age: args.cold_age,
        interval: args.interval.unwrap_or(args.pages),
        batch: args.batch,
    };
    for kind in &args.policies {
        let mut sim = SimBackend::new(args.pages);
        let mut d = driver::Driver::new(kind.build_with(args.pages, args.mglru), &workload, cfg);
        for a in workload.trace() {
            if let Err(e) = d.step(&mut sim, a) {
                eprintln!("simulate: {}: {e}", kind.name());
                return ExitCode::FAILURE;
            }
        }
        println!("{}", d.report());
        if args.verbose {
            if let AnyPolicy::Mglru(m) = d.policy() {
                eprintln!(
                    "  {:?} gens={}",
                    m.stats(),
                    m.generation_sizes().expect("mglru has generations")
                );
            }
            let r = d.report();
            for (i, name) in workload.phase_names().iter().enumerate() {
                eprintln!("  phase {name}: {:?}", r.phases[i]);
            }
            eprintln!("  pre_tail: {:?}", r.pre_tail);
        }
    }
    if let Some(cap) = target {
        let trace: Vec<_> = workload.trace().collect();
        let lru = lru_refaults(trace.iter().copied(), cap);
        let min = belady_refaults(&trace, cap);
        println!(
            "lru_refaults={} workload={} capacity={cap}",
            lru.total,
            workload.name()
        );
        println!(
            "belady_refaults={} workload={} capacity={cap}",
            min.total,
            workload.name()
        );
        if args.verbose {
            eprintln!(
                "  lru by phase {:?}, belady by phase {:?}",
                lru.by_phase, min.by_phase
            );
        }
    }
    ExitCode::SUCCESS
}
