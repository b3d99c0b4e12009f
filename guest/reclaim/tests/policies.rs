//! The must-pass numbers of the reclaimer on the host simulator, each
//! printed beside the baselines and the offline references (run with
//! `--nocapture` to see them).

use reclaim::backend::{AgeFlags, Backend};
use reclaim::driver::{DriverConfig, Memory, Report};
use reclaim::sim::{belady_refaults, lru_refaults, simulate, Refaults, SimBackend, SimError};
use reclaim::workload::{Access, Workload, WorkloadConfig, WorkloadKind};
use reclaim::{ClockPerPage, Mglru, MglruConfig, Policy, PolicyKind};

const PAGES: u32 = 4096;
const ACCESSES: u64 = 200_000;
const SEED: u64 = 1;

fn workload(kind: WorkloadKind) -> Workload {
    Workload::new(WorkloadConfig::new(kind, PAGES, ACCESSES, SEED)).unwrap()
}

fn pressure() -> DriverConfig {
    DriverConfig::new(PAGES).target(DriverConfig::pct(PAGES, 40))
}

/// Runs every policy and both references; prints them all.
fn all(w: &Workload, cfg: DriverConfig) -> (Vec<Report>, Refaults, Refaults) {
    let reports: Vec<Report> = PolicyKind::ALL
        .iter()
        .map(|&k| simulate(k, w, cfg).unwrap())
        .collect();
    for r in &reports {
        println!("{r}");
    }
    let trace: Vec<Access> = w.trace().collect();
    let cap = cfg.target.unwrap();
    let lru = lru_refaults(trace.iter().copied(), cap);
    let min = belady_refaults(&trace, cap);
    println!("lru_refaults={} by_phase={:?}", lru.total, lru.by_phase);
    println!("belady_refaults={} by_phase={:?}", min.total, min.by_phase);
    for r in &reports {
        assert!(min.total <= r.refaults, "{} beat MIN", r.policy);
    }
    (reports, lru, min)
}

fn by_name<'a>(reports: &'a [Report], name: &str) -> &'a Report {
    reports.iter().find(|r| r.policy == name).unwrap()
}

#[test]
fn hotcold_mglru_within_15_percent_of_exact_lru() {
    let w = workload(WorkloadKind::HotCold);
    let (reports, lru, min) = all(&w, pressure());
    let mglru = by_name(&reports, "mglru");
    let fifo = by_name(&reports, "fifo");
    let ratio = mglru.refaults as f64 / lru.total as f64;
    println!(
        "hotcold: mglru/lru={ratio:.3} fifo/lru={:.3} clock/lru={:.3} min/lru={:.3}",
        fifo.refaults as f64 / lru.total as f64,
        by_name(&reports, "clock-perpage").refaults as f64 / lru.total as f64,
        min.total as f64 / lru.total as f64,
    );
    assert!(
        ratio <= 1.15,
        "mglru {} vs lru {}",
        mglru.refaults,
        lru.total
    );
    // The workload separates policies: without aging information FIFO
    // evicts hot pages.
    assert!(fifo.refaults as f64 > 1.5 * lru.total as f64);
    // The driver kept the target.
    assert!(reports
        .iter()
        .all(|r| r.held_final <= pressure().target.unwrap()));
}

#[test]
fn scan_does_not_flush_the_hot_set() {
    let w = workload(WorkloadKind::Scan);
    let (reports, lru, _) = all(&w, pressure());
    let mglru = by_name(&reports, "mglru");
    let fifo = by_name(&reports, "fifo");
    let clock = by_name(&reports, "clock-perpage");
    let (pre, post) = (mglru.hot_pre().unwrap(), mglru.hot_post().unwrap());
    println!(
        "scan: hot refault rate before/after: mglru {pre}/{post} fifo {}/{} clock {}/{}; \
         refaults after the scan: mglru {} clock {} lru {}",
        fifo.hot_pre().unwrap(),
        fifo.hot_post().unwrap(),
        clock.hot_pre().unwrap(),
        clock.hot_post().unwrap(),
        mglru.phases[3].refaults,
        clock.phases[3].refaults,
        lru.by_phase[3],
    );
    // The settled rate before the scan is ~0, so allow 1 in 1000 on top of
    // twice it.
    assert!(
        post.as_f64() <= 2.0 * pre.as_f64() + 0.001,
        "mglru hot refault rate {post} after the scan, {pre} before"
    );
    assert!(fifo.hot_post().unwrap().as_f64() > post.as_f64());
    // Mglru lost at most 5% of the hot set to the scan...
    let hot = u64::from(w.hot_pages());
    assert!(
        mglru.phases[3].hot_refaults * 20 <= hot,
        "{}",
        mglru.phases[3].hot_refaults
    );
    // ...where a policy without scan resistance loses most of it (so the
    // scan really is a threat).
    assert!(
        clock.phases[3].hot_refaults * 2 >= hot,
        "{}",
        clock.phases[3].hot_refaults
    );
}

#[test]
fn idle_proactive_reclaim_takes_the_cold_pages_and_keeps_the_working_set() {
    let w = workload(WorkloadKind::Idle);
    let cfg = DriverConfig::new(PAGES).cold_age(DriverConfig::DEFAULT_COLD_AGE);
    let reports: Vec<Report> = PolicyKind::ALL
        .iter()
        .map(|&k| simulate(k, &w, cfg).unwrap())
        .collect();
    let outside = u64::from(PAGES - w.hot_pages());
    for r in &reports {
        let kept_outside = u64::from(r.held_final - r.held_hot_final);
        let steady = r.phases[2];
        println!(
            "{r}\n  idle {}: evicted {}/{} pages outside the working set, {} refaults in {} steady accesses",
            r.policy,
            outside - kept_outside,
            outside,
            steady.refaults,
            steady.accesses
        );
    }
    let mglru = by_name(&reports, "mglru");
    let kept_outside = u64::from(mglru.held_final - mglru.held_hot_final);
    assert!(
        (outside - kept_outside) * 10 >= outside * 9,
        "kept {kept_outside} of {outside}"
    );
    let steady = mglru.phases[2];
    assert!(steady.refaults * 1000 <= steady.accesses, "{steady:?}");
    // The working set stayed.
    assert!(mglru.held_hot_final * 100 >= w.hot_pages() * 99);
    // FIFO has no aging information: proactive reclaim cannot pick anything.
    assert_eq!(by_name(&reports, "fifo").held_final, PAGES);
    // The bound has teeth: a one-pass threshold evicts working-set pages
    // between two uses.
    let eager = simulate(PolicyKind::Mglru, &w, DriverConfig::new(PAGES).cold_age(1)).unwrap();
    println!("{eager}  (cold_age=1)");
    assert!(eager.phases[2].refaults * 1000 > eager.phases[2].accesses);
}

#[test]
fn phase_resident_set_converges_to_the_new_hot_set() {
    let w = workload(WorkloadKind::Phase);
    let (reports, _, _) = all(&w, pressure());
    for r in &reports {
        println!(
            "phase: {} converged {:?} passes after the change (interval {} accesses)",
            r.policy,
            r.converge_passes,
            pressure().interval
        );
    }
    let mglru = by_name(&reports, "mglru");
    let n = mglru.converge_passes.expect("mglru converged");
    assert!(n <= 6, "{n} passes");
    assert!(mglru.held_hot_final * 100 >= w.hot_pages() * 98);
}

/// Forwards to a [`SimBackend`] and sums the young pages reported, so two
/// policies can be shown to have received the same information.
struct Counting<'a> {
    sim: &'a mut SimBackend,
    young: u64,
}

impl Backend for Counting<'_> {
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
        let n = self.sim.test_clear(first, npages, bitmap, flags)?;
        self.young += n;
        Ok(n)
    }
    fn calls(&self) -> u64 {
        self.sim.calls()
    }
}

#[test]
fn mglru_pass_needs_20x_fewer_calls_than_per_page_clock_for_the_same_information() {
    let resident = DriverConfig::pct(PAGES, 40);
    let mut rng = oorandom::Rand64::new(5);
    let mut mglru = Mglru::new(PAGES, MglruConfig::default());
    let mut clock = ClockPerPage::new(PAGES);
    let (mut sim_m, mut sim_c) = (SimBackend::new(PAGES), SimBackend::new(PAGES));
    // The same resident pages (spread over the region) in both.
    let pages: Vec<u32> = (0..PAGES)
        .filter(|p| p % 5 < 2)
        .take(resident as usize)
        .collect();
    for &p in &pages {
        mglru.inserted(p);
        clock.inserted(p);
        sim_m.access(p, false).unwrap();
        sim_c.access(p, false).unwrap();
    }
    // One pass each to consume the faulting accesses, then the same accesses.
    mglru.age(&mut sim_m).unwrap();
    clock.age(&mut sim_c).unwrap();
    let mut touched = 0;
    for &p in &pages {
        if rng.rand_range(0..3) == 0 {
            sim_m.access(p, false).unwrap();
            sim_c.access(p, false).unwrap();
            touched += 1;
        }
    }
    let (before_m, before_c) = (sim_m.calls(), sim_c.calls());
    let mut cm = Counting {
        sim: &mut sim_m,
        young: 0,
    };
    mglru.age(&mut cm).unwrap();
    let young_m = cm.young;
    let mut cc = Counting {
        sim: &mut sim_c,
        young: 0,
    };
    clock.age(&mut cc).unwrap();
    let young_c = cc.young;
    let (calls_m, calls_c) = (sim_m.calls() - before_m, sim_c.calls() - before_c);
    println!(
        "one pass over {} resident of {PAGES} pages: mglru {calls_m} calls, clock-perpage {calls_c} calls \
         ({}x), both saw {young_m} young pages",
        pages.len(),
        calls_c / calls_m
    );
    assert_eq!((young_m, young_c), (touched, touched));
    assert!(calls_c >= 20 * calls_m);

    // Over a whole run, look-around included.
    let w = workload(WorkloadKind::HotCold);
    let m = simulate(PolicyKind::Mglru, &w, pressure()).unwrap();
    let c = simulate(PolicyKind::ClockPerPage, &w, pressure()).unwrap();
    println!(
        "hotcold run: aging calls mglru {} ({} passes), clock-perpage {} ({:.0}x)",
        m.aging_calls,
        m.passes,
        c.aging_calls,
        c.aging_calls as f64 / m.aging_calls as f64
    );
    assert!(c.aging_calls >= 20 * m.aging_calls);
}

#[test]
fn harvest_respects_the_per_call_limit() {
    let mut sim = SimBackend::with_max_pages_per_call(PAGES, 1000);
    let mut m = Mglru::new(PAGES, MglruConfig::default());
    for p in (0..PAGES).step_by(3) {
        m.inserted(p);
        sim.access(p, false).unwrap();
    }
    m.age(&mut sim).unwrap();
    assert_eq!(sim.calls(), 5);
    assert!((0..PAGES)
        .step_by(3)
        .all(|p| !m.on_probation(p) && !sim.is_young(p)));
}
