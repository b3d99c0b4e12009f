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
//! Options: `--workload idle|hotcold|phase|scan`, `--pages N` (4096),
//! `--accesses N` (200000), `--seed S` (1), `--target-pct P` (memory target
//! in percent of pages) and/or `--cold-age A` (proactive reclaim of pages
//! not young for A passes); without either: 40% for the pressure workloads,
//! cold age 4 for `idle`. `--interval N` (default: `pages`), `--batch N`,
//! `--policies a,b,..`, the [`MglruConfig`] knobs `--gens N`,
//! `--insert-distance N`, `--lookaround N`, `--harvest-chunk N`, and
//! `--verbose` (policy internals on stderr).
//!
//! Output, one `key=value` line each: the [`Report`] of every policy, then
//! `lru_refaults=N ...` and `belady_refaults=N ...` when there is a target.
//!
//! [`Report`]: reclaim::Report

use reclaim::driver::{Driver, DriverConfig};
use reclaim::sim::{belady_refaults, lru_refaults, SimBackend};
use reclaim::workload::{Workload, WorkloadConfig, WorkloadKind};
use reclaim::{AnyPolicy, MglruConfig, Policy, PolicyKind};
use std::io::Write;
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
    policies: Vec<PolicyKind>,
    mglru: MglruConfig,
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
        policies: PolicyKind::ALL.to_vec(),
        mglru: MglruConfig::default(),
        verbose: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--verbose" {
            a.verbose = true;
            continue;
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        let u64v = || value.parse::<u64>().map_err(|e| bad(&e));
        let u32v = || value.parse::<u32>().map_err(|e| bad(&e));
        let u8v = || value.parse::<u8>().map_err(|e| bad(&e));
        match flag.as_str() {
            "--workload" => {
                a.workload = WorkloadKind::parse(&value).ok_or_else(|| bad(&"unknown workload"))?;
            }
            "--pages" => a.pages = u32v()?,
            "--accesses" => a.accesses = u64v()?,
            "--seed" => a.seed = u64v()?,
            "--target-pct" => a.target_pct = Some(u32v()?),
            "--cold-age" => a.cold_age = Some(u32v()?),
            "--interval" => a.interval = Some(u32v()?),
            "--batch" => a.batch = u32v()?,
            "--gens" => a.mglru.gens = u8v()?,
            "--insert-distance" => a.mglru.insert_distance = u8v()?,
            "--lookaround" => a.mglru.lookaround = u32v()?,
            "--harvest-chunk" => a.mglru.harvest_chunk = u32v()?,
            "--policies" => {
                a.policies = value
                    .split(',')
                    .map(|p| {
                        PolicyKind::parse(p).ok_or_else(|| bad(&format!("unknown policy {p}")))
                    })
                    .collect::<Result<_, _>>()?;
            }
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    if a.target_pct.is_none() && a.cold_age.is_none() {
        if a.workload == WorkloadKind::Idle {
            a.cold_age = Some(DriverConfig::DEFAULT_COLD_AGE);
        } else {
            a.target_pct = Some(40);
        }
    }
    a.mglru.check().map_err(|e| e.to_string())?;
    Ok(a)
}

fn main() -> ExitCode {
    match simulate() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("simulate: {e}");
            ExitCode::FAILURE
        }
    }
}

fn simulate() -> Result<(), String> {
    let args = parse()?;
    let workload = Workload::new(WorkloadConfig::new(
        args.workload,
        args.pages,
        args.accesses,
        args.seed,
    ))
    .map_err(|e| e.to_string())?;
    let target = args.target_pct.map(|p| DriverConfig::pct(args.pages, p));
    let cfg = DriverConfig {
        target,
        cold_age: args.cold_age,
        interval: args.interval.unwrap_or(args.pages),
        batch: args.batch,
    };
    cfg.check().map_err(|e| e.to_string())?;
    // A closed pipe (`| head`) ends the output quietly.
    let mut out = std::io::stdout().lock();
    let io = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        e.to_string()
    };
    for kind in &args.policies {
        let mut sim = SimBackend::new(args.pages);
        let mut d = Driver::new(kind.build_with(args.pages, args.mglru), &workload, cfg);
        for a in workload.trace() {
            d.step(&mut sim, a)
                .map_err(|e| format!("{}: {e}", kind.name()))?;
        }
        let r = d.report();
        writeln!(out, "{r}").map_err(io)?;
        if args.verbose {
            if let AnyPolicy::Mglru(m) = d.policy() {
                let gens = m.generation_sizes().expect("mglru has generations");
                eprintln!("  {:?} gens={gens}", m.stats());
            }
            for (i, name) in workload.phase_names().iter().enumerate() {
                eprintln!("  phase {name}: {:?}", r.phases[i]);
            }
            eprintln!("  settled half before the change: {:?}", r.pre_tail);
        }
    }
    if let Some(cap) = target {
        let trace: Vec<_> = workload.trace().collect();
        let lru = lru_refaults(trace.iter().copied(), cap);
        let min = belady_refaults(&trace, cap);
        let name = workload.name();
        writeln!(
            out,
            "lru_refaults={} workload={name} capacity={cap}",
            lru.total
        )
        .map_err(io)?;
        writeln!(
            out,
            "belady_refaults={} workload={name} capacity={cap}",
            min.total
        )
        .map_err(io)?;
        if args.verbose {
            eprintln!(
                "  by phase: lru {:?} belady {:?}",
                lru.by_phase, min.by_phase
            );
        }
    }
    Ok(())
}
