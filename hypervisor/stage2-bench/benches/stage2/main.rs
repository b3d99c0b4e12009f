//! Host benchmarks of the stage-2 engine in its production build (the
//! `stage2` crate without its `check` feature). Every figure is a ratio
//! against a baseline measured in the same run; see `docs/PERFORMANCE.md`.
//!
//! - `harvest_lockfree_vs_rawscan`: `test_clear_young` over the range,
//!   against a raw atomic scan of the same leaf arrays (the floor);
//! - `harvest_lockfree_vs_rwlock`: the same harvest, against the harvest
//!   under the read side of a readers-writer lock (uncontended);
//! - `writer_p99_ratio_lockfree` / `writer_p99_ratio_rwlock`: p99 latency
//!   of a writer (map + unmap of one page) while a harvester runs flat out,
//!   against the p99 without harvester, per design;
//! - `bitmap_vs_perpage`: one `test_and_clear_young` per page against one
//!   range harvest into a bitmap;
//! - `fault_install_2t_cas_vs_lock`: fault installs per second from two
//!   threads, lockless against a global lock around `map`, on disjoint
//!   halves of the range (and `..._interleaved`: alternate pages).
//!
//! Run with `cargo bench -p stage2-bench` (or `scripts/bench`). Quick mode
//! (`BENCH_QUICK=1` or `-- --quick`): 64 MiB instead of 1 GiB, short
//! measurement times. Results: a table on stdout and `summary.json`
//! (`$BENCH_SUMMARY`, default `target/bench/summary.json` of the
//! workspace), whose keys are merged into an existing file. Without
//! `--bench` (as `cargo test --benches` runs it) the binary only checks,
//! on a small table, that every design computes the same bitmap.

mod fault;
mod host;
mod writer;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criterion::{BenchmarkGroup, Criterion, SamplingMode};
use serde_json::{json, Map, Value};

use crate::fault::{Install, Pages};
use crate::host::{Fixture, RCU};
use crate::writer::Design;

/// Sizes and times of one mode.
#[derive(Debug)]
struct Config {
    mode: &'static str,
    /// Pages harvested (4 KiB leaves).
    harvest_pages: u64,
    /// Fault installs per thread per round.
    fault_pages_per_thread: u64,
    warm_up: Duration,
    measurement: Duration,
    sample_size: usize,
    nresamples: usize,
    /// How long each writer-latency run lasts, and the largest random gap
    /// between two writer operations.
    p99_run: Duration,
    p99_max_gap: Duration,
    /// Rounds of the paired cross-check (every design once per round).
    paired_rounds: usize,
}

const FULL: Config = Config {
    mode: "full",
    harvest_pages: 1 << 18, // 1 GiB
    fault_pages_per_thread: 1 << 14,
    warm_up: Duration::from_secs(1),
    measurement: Duration::from_secs(5),
    sample_size: 30,
    nresamples: 20_000,
    p99_run: Duration::from_secs(8),
    p99_max_gap: Duration::from_micros(40),
    paired_rounds: 40,
};

const QUICK: Config = Config {
    mode: "quick",
    harvest_pages: 1 << 14, // 64 MiB
    fault_pages_per_thread: 1 << 11,
    warm_up: Duration::from_millis(200),
    measurement: Duration::from_millis(600),
    sample_size: 10,
    nresamples: 1_000,
    p99_run: Duration::from_millis(1000),
    p99_max_gap: Duration::from_micros(40),
    paired_rounds: 10,
};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick")
        || std::env::var("BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
    // The main thread is CPU 0 of the RCU domain for the whole run.
    RCU.online();
    if !args.iter().any(|a| a == "--bench") {
        self_test();
        return;
    }
    let cfg = if quick { &QUICK } else { &FULL };
    if let Ok(name) = std::env::var("BENCH_PROFILE") {
        profile_loop(cfg, &name);
        return;
    }
    let started = Instant::now();
    let load_start = loadavg();
    let summary = summary_path();
    let crit_dir = std::env::var_os("BENCH_CRITERION_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| summary.with_file_name("criterion"))
        // One baseline per mode: Criterion's "change" lines then compare
        // like with like.
        .join(cfg.mode);
    let mut c = Criterion::default()
        .output_directory(&crit_dir)
        .warm_up_time(cfg.warm_up)
        .measurement_time(cfg.measurement)
        .sample_size(cfg.sample_size)
        .nresamples(cfg.nresamples)
        .without_plots();
    let median = |id: &str| median_ns(&crit_dir, id);

    println!(
        "stage2-bench: {} mode, {} MiB harvested, {} fault installs per round",
        cfg.mode,
        cfg.harvest_pages * 4 / 1024,
        2 * cfg.fault_pages_per_thread
    );
    let fx = Fixture::new(cfg.harvest_pages);
    writer::prepare(&fx);
    check_harvests_agree(&fx);

    let rw = spin::RwLock::new(());
    // ---- paired cross-check: the designs in turn, round after round ----
    // Criterion measures one design after the other; on a shared machine a
    // burst of load can hit one and not its baseline. Here every round runs
    // each design once, and the ratio is the median of the per-round ratios.
    // (First, so that it also warms up what Criterion measures next.)
    let harvest_times = {
        let fx = &fx;
        let timed = |f: fn(&Fixture, &mut [u64]) -> u64| {
            let mut bitmap = vec![0u64; fx.words()];
            move || {
                fx.make_young();
                RCU.quiescent();
                let t = Instant::now();
                std::hint::black_box(f(fx, &mut bitmap));
                t.elapsed()
            }
        };
        let (mut lf, mut raw, mut per) = (
            timed(Fixture::harvest),
            timed(Fixture::raw_scan),
            timed(Fixture::harvest_per_page),
        );
        let mut bitmap = vec![0u64; fx.words()];
        let mut locked = || {
            fx.make_young();
            RCU.quiescent();
            let t = Instant::now();
            let _read = rw.read();
            std::hint::black_box(fx.harvest(&mut bitmap));
            t.elapsed()
        };
        alternate(
            cfg.paired_rounds,
            &mut [&mut lf, &mut raw, &mut locked, &mut per],
        )
    };
    let fault_times = {
        let n = cfg.fault_pages_per_thread;
        let mut runs: Vec<Box<dyn FnMut() -> Duration>> = [
            (Install::Cas, Pages::Disjoint),
            (Install::LockedMap, Pages::Disjoint),
            (Install::Cas, Pages::Interleaved),
            (Install::LockedMap, Pages::Interleaved),
        ]
        .into_iter()
        .map(|(how, layout)| Box::new(move || fault::round(how, layout, 2, n)) as Box<_>)
        .collect();
        let mut refs: Vec<&mut dyn FnMut() -> Duration> = runs
            .iter_mut()
            .map(|b| &mut **b as &mut dyn FnMut() -> Duration)
            .collect();
        alternate(cfg.paired_rounds, &mut refs)
    };

    // ---- harvest: lockfree, raw scan, rwlock, per page ----
    {
        let mut g = c.benchmark_group("harvest");
        g.sampling_mode(SamplingMode::Flat);
        let mut bitmap = vec![0u64; fx.words()];
        harvest_bench(&mut g, "lockfree", &fx, &mut bitmap, |fx, b| fx.harvest(b));
        harvest_bench(&mut g, "rawscan", &fx, &mut bitmap, |fx, b| fx.raw_scan(b));
        harvest_bench(&mut g, "rwlock", &fx, &mut bitmap, |fx, b| {
            let _read = rw.read();
            fx.harvest(b)
        });
        harvest_bench(&mut g, "perpage", &fx, &mut bitmap, |fx, b| {
            fx.harvest_per_page(b)
        });
        g.finish();
    }

    // ---- fault installs from two threads (and one, for scaling) ----
    let fault_benches = [
        ("cas_disjoint", Install::Cas, Pages::Disjoint, 2),
        ("lock_map_disjoint", Install::LockedMap, Pages::Disjoint, 2),
        ("lock_cas_disjoint", Install::LockedCas, Pages::Disjoint, 2),
        ("cas_interleaved", Install::Cas, Pages::Interleaved, 2),
        (
            "lock_map_interleaved",
            Install::LockedMap,
            Pages::Interleaved,
            2,
        ),
        (
            "lock_cas_interleaved",
            Install::LockedCas,
            Pages::Interleaved,
            2,
        ),
        ("cas_1t", Install::Cas, Pages::Disjoint, 1),
    ];
    {
        let mut g = c.benchmark_group("fault_install");
        g.sampling_mode(SamplingMode::Flat);
        for (name, how, layout, threads) in fault_benches {
            // The same number of installs per round in every variant.
            let per_thread = 2 * cfg.fault_pages_per_thread / threads;
            g.bench_function(name, |b| {
                b.iter_custom(|iters| {
                    (0..iters)
                        .map(|_| fault::round(how, layout, threads, per_thread))
                        .sum()
                })
            });
        }
        g.finish();
    }

    // ---- writer p99 with and without a harvester ----
    println!(
        "writer latency (map + unmap of one page), runs of {:.1} s, random gaps up to {} us:",
        cfg.p99_run.as_secs_f64(),
        cfg.p99_max_gap.as_micros()
    );
    let (pp50, pp99) = writer::ping_pong(Duration::from_millis(300));
    println!("  thread round trip (machine check): p50 {pp50} ns, p99 {pp99} ns");
    if pp99 > 50_000 {
        println!(
            "  WARNING: the two threads do not run at once (other load on the machine): \
             the writer latencies below measure the scheduler more than the designs"
        );
    }
    let mut p99_runs = Vec::new();
    for design in [Design::LockFree, Design::RwLock] {
        let alone = writer::run(&fx, design, false, cfg.p99_run, cfg.p99_max_gap);
        let busy = writer::run(&fx, design, true, cfg.p99_run, cfg.p99_max_gap);
        for (label, l) in [("alone", &alone), ("with harvester", &busy)] {
            println!(
                "  {design:?} {label}: p50 {} ns, p90 {} ns, p99 {} ns, p99.9 {} ns, max {} ns, {:.2}% over 10 us ({} samples, {} harvest passes of {} us, harvesting {:.0}% of the time)",
                l.quantile(0.5),
                l.quantile(0.9),
                l.quantile(0.99),
                l.quantile(0.999),
                l.sorted_ns.last().copied().unwrap_or(0),
                100.0 * l.fraction_over(10_000),
                l.sorted_ns.len(),
                l.passes,
                l.pass_ns / 1000,
                100.0 * l.busy_fraction
            );
        }
        p99_runs.push((design, alone, busy));
    }

    // ---- ratios ----
    let pages = cfg.harvest_pages;
    let (lockfree, rawscan) = (median("harvest/lockfree"), median("harvest/rawscan"));
    let (rwlock, perpage) = (median("harvest/rwlock"), median("harvest/perpage"));
    let per_page = |ns: f64| ns / pages as f64;
    let mut entries: Vec<(String, Value)> = vec![
        (
            "harvest_lockfree_vs_rawscan".into(),
            json!({
                "ratio": lockfree / rawscan,
                "numerator_ns": lockfree,
                "baseline_ns": rawscan,
                "definition": "median time of test_clear_young over the range / median time of a raw test-and-clear scan of the same leaf arrays (every page young at the start of each iteration)",
                "paired_ratio": paired_ratio(&harvest_times, 0, 1),
                "paired_rounds": cfg.paired_rounds,
                "pages": pages,
                "numerator_ns_per_page": per_page(lockfree),
                "baseline_ns_per_page": per_page(rawscan),
            }),
        ),
        (
            "harvest_lockfree_vs_rwlock".into(),
            json!({
                "ratio": lockfree / rwlock,
                "numerator_ns": lockfree,
                "baseline_ns": rwlock,
                "definition": "median time of the lockless harvest / median time of the same harvest under an uncontended spin::RwLock read lock",
                "paired_ratio": paired_ratio(&harvest_times, 0, 2),
                "paired_rounds": cfg.paired_rounds,
                "pages": pages,
            }),
        ),
        (
            "bitmap_vs_perpage".into(),
            json!({
                "ratio": perpage / lockfree,
                "numerator_ns": perpage,
                "baseline_ns": lockfree,
                "definition": "median time of one test_and_clear_young per page / median time of one range harvest into a bitmap (how many times faster the bitmap is)",
                "paired_ratio": paired_ratio(&harvest_times, 3, 0),
                "paired_rounds": cfg.paired_rounds,
                "pages": pages,
                "numerator_ns_per_page": per_page(perpage),
                "baseline_ns_per_page": per_page(lockfree),
            }),
        ),
    ];
    for (design, alone, busy) in &p99_runs {
        let key = match design {
            Design::LockFree => "writer_p99_ratio_lockfree",
            Design::RwLock => "writer_p99_ratio_rwlock",
        };
        let (num, base) = (busy.quantile(0.99) as f64, alone.quantile(0.99) as f64);
        entries.push((
            key.into(),
            json!({
                "ratio": num / base,
                "numerator_ns": num,
                "baseline_ns": base,
                "definition": "p99 latency of map+unmap of one 4 KiB page while a harvester thread runs flat out / p99 without harvester",
                "p50_ns": busy.quantile(0.5),
                "baseline_p50_ns": alone.quantile(0.5),
                "max_ns": busy.sorted_ns.last(),
                "over_10us_fraction": busy.fraction_over(10_000),
                "baseline_over_10us_fraction": alone.fraction_over(10_000),
                "samples": busy.sorted_ns.len(),
                "baseline_samples": alone.sorted_ns.len(),
                "harvest_passes": busy.passes,
                "harvest_pass_ns": busy.pass_ns,
                "harvest_busy_fraction": busy.busy_fraction,
                "thread_round_trip_p50_ns": pp50,
                "thread_round_trip_p99_ns": pp99,
                "pages": pages,
            }),
        ));
    }
    let installs = 2 * cfg.fault_pages_per_thread;
    let per_s = |ns: f64| installs as f64 / ns * 1e9;
    let cas_1t = median("fault_install/cas_1t");
    for (key, layout, paired) in [
        (
            "fault_install_2t_cas_vs_lock",
            "disjoint",
            paired_ratio(&fault_times, 1, 0),
        ),
        (
            "fault_install_2t_cas_vs_lock_interleaved",
            "interleaved",
            paired_ratio(&fault_times, 3, 2),
        ),
    ] {
        let cas = median(&format!("fault_install/cas_{layout}"));
        let lock_map = median(&format!("fault_install/lock_map_{layout}"));
        let lock_cas = median(&format!("fault_install/lock_cas_{layout}"));
        entries.push((
            key.into(),
            json!({
                "ratio": lock_map / cas,
                "numerator_ns": cas,
                "baseline_ns": lock_map,
                "definition": format!("installs/s of fault_install (CAS) from 2 threads / installs/s of map of one page under a global spin::Mutex from 2 threads, {layout} pages, fresh table per round (= baseline_ns / numerator_ns, times per round)"),
                "pages": layout,
                "paired_ratio": paired,
                "paired_rounds": cfg.paired_rounds,
                "installs_per_round": installs,
                "cas_installs_per_s": per_s(cas),
                "lock_installs_per_s": per_s(lock_map),
                "cas_under_lock_ns": lock_cas,
                "cas_under_lock_installs_per_s": per_s(lock_cas),
                "cas_1_thread_ns": cas_1t,
                "cas_1_thread_installs_per_s": per_s(cas_1t),
            }),
        ));
    }
    let load = [load_start, loadavg()];
    for (_, v) in &mut entries {
        v["mode"] = json!(cfg.mode);
        v["loadavg_1min_start_end"] = json!(load);
    }
    print_table(&entries);
    merge_summary(&summary, entries);
    println!(
        "stage2-bench: {} mode done in {:.1} s; summary in {}",
        cfg.mode,
        started.elapsed().as_secs_f64(),
        summary.display()
    );
}

/// Runs each of `fs` once per round, in turn, for `rounds` rounds; returns
/// the nanoseconds of each run, `[round][f]`.
fn alternate(rounds: usize, fs: &mut [&mut dyn FnMut() -> Duration]) -> Vec<Vec<f64>> {
    (0..rounds)
        .map(|_| fs.iter_mut().map(|f| f().as_nanos() as f64).collect())
        .collect()
}

/// The median over rounds of `times[r][a] / times[r][b]`.
fn paired_ratio(times: &[Vec<f64>], a: usize, b: usize) -> f64 {
    let mut ratios: Vec<f64> = times.iter().map(|t| t[a] / t[b]).collect();
    ratios.sort_by(f64::total_cmp);
    ratios[(ratios.len() - 1) / 2]
}

/// Benchmarks one harvest routine: each iteration starts with every page
/// young (set untimed, as the hardware would), so each does the same work.
fn harvest_bench(
    g: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    fx: &Fixture,
    bitmap: &mut [u64],
    mut f: impl FnMut(&Fixture, &mut [u64]) -> u64,
) {
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                fx.make_young();
                RCU.quiescent();
                let t = Instant::now();
                let young = f(fx, bitmap);
                total += t.elapsed();
                assert_eq!(young, fx.pages, "{name}: every page was young");
            }
            total
        })
    });
}

/// Every harvest design reports the same bitmap (all young, then all old).
fn check_harvests_agree(fx: &Fixture) {
    type Harvest = fn(&Fixture, &mut [u64]) -> u64;
    let designs: [(&str, Harvest); 3] = [
        ("lockfree", Fixture::harvest),
        ("rawscan", Fixture::raw_scan),
        ("perpage", Fixture::harvest_per_page),
    ];
    for (name, f) in designs {
        let mut bitmap = vec![0u64; fx.words()];
        fx.make_young();
        assert_eq!(f(fx, &mut bitmap), fx.pages, "{name}: all young");
        assert!(bitmap.iter().all(|&w| w == u64::MAX), "{name}: bitmap");
        assert_eq!(f(fx, &mut bitmap), 0, "{name}: all old after a clear");
        assert!(bitmap.iter().all(|&w| w == 0), "{name}: bitmap after clear");
    }
}

/// `BENCH_PROFILE=lockfree|rawscan|perpage`: runs that harvest alone for
/// 10 s (every page young before each pass), for a profiler such as
/// `perf record`; measures and writes nothing.
fn profile_loop(cfg: &Config, name: &str) {
    let fx = Fixture::new(cfg.harvest_pages);
    let f: fn(&Fixture, &mut [u64]) -> u64 = match name {
        "lockfree" => Fixture::harvest,
        "rawscan" => Fixture::raw_scan,
        "perpage" => Fixture::harvest_per_page,
        other => panic!("BENCH_PROFILE={other}: lockfree, rawscan or perpage"),
    };
    let mut bitmap = vec![0u64; fx.words()];
    let (start, mut passes) = (Instant::now(), 0u64);
    while start.elapsed() < Duration::from_secs(10) {
        fx.make_young();
        std::hint::black_box(f(&fx, &mut bitmap));
        RCU.quiescent();
        passes += 1;
    }
    println!("stage2-bench: profiled {name}: {passes} passes");
}

/// Test mode (`cargo test --benches`): the checks on a small table, one
/// round of each fault design and a few writer operations.
fn self_test() {
    let fx = Fixture::new(4096);
    writer::prepare(&fx);
    check_harvests_agree(&fx);
    for how in [Install::Cas, Install::LockedMap, Install::LockedCas] {
        for layout in [Pages::Disjoint, Pages::Interleaved] {
            fault::round(how, layout, 2, 1024);
        }
    }
    fault::round(Install::Cas, Pages::Disjoint, 1, 1024);
    for design in [Design::LockFree, Design::RwLock] {
        for harvester in [false, true] {
            let run = Duration::from_millis(100);
            let l = writer::run(&fx, design, harvester, run, Duration::from_micros(10));
            assert!(!l.sorted_ns.is_empty());
        }
    }
    println!("stage2-bench: self-test ok (run with `cargo bench` to measure)");
}

/// The median time per iteration Criterion estimated for benchmark `id`.
fn median_ns(dir: &Path, id: &str) -> f64 {
    let path = dir.join(id).join("new").join("estimates.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let v: Value = serde_json::from_str(&text).expect("criterion estimates");
    v["median"]["point_estimate"]
        .as_f64()
        .unwrap_or_else(|| panic!("no median in {}", path.display()))
}

/// The 1-minute load average (NaN where unknown): other work on the
/// machine, recorded with the results.
fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// `$BENCH_SUMMARY`, or `target/bench/summary.json` of the workspace.
fn summary_path() -> PathBuf {
    std::env::var_os("BENCH_SUMMARY")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bench/summary.json")
        })
}

fn print_table(entries: &[(String, Value)]) {
    println!();
    println!(
        "{:<42} {:>10} {:>8} {:>16} {:>16}  mode",
        "metric", "ratio", "paired", "numerator_ns", "baseline_ns"
    );
    for (key, v) in entries {
        let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "{key:<42} {:>10.3} {:>8} {:>16.0} {:>16.0}  {}",
            f("ratio"),
            v["paired_ratio"]
                .as_f64()
                .map_or("-".into(), |r| format!("{r:.3}")),
            f("numerator_ns"),
            f("baseline_ns"),
            v["mode"].as_str().unwrap_or("?")
        );
    }
    println!();
}

/// Adds `entries` to the JSON object in `path` (created if missing).
fn merge_summary(path: &Path, entries: Vec<(String, Value)>) {
    let mut root: Map<String, Value> = std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    root.extend(entries);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("summary directory");
    }
    let text = serde_json::to_string_pretty(&Value::Object(root)).expect("json");
    std::fs::write(path, text + "\n").unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}
