//! Writer latency under a concurrent harvester, for two designs:
//!
//! - **lockfree** (the engine as it is): the harvester is a lockless RCU
//!   reader; a writer (`map` + `unmap`) only takes the engine's writer
//!   lock, which the harvester never takes;
//! - **rwlock** (the baseline design): every harvest pass holds the read
//!   side of a readers-writer lock for the whole range, every writer the
//!   write side. The writer announces itself first (`upgradeable_read`,
//!   which stops new readers) and then waits for the current pass to end
//!   (`upgrade`): a writer-preferring lock, so the writer is never starved,
//!   only delayed by at most one pass.
//!
//! Criterion does not do percentiles, so this is a plain timing loop: the
//! main thread (CPU 0 of the RCU domain) times each writer operation with
//! `Instant`, the harvester thread (CPU 1) runs flat out meanwhile.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hyp_core::addr::{Ipa, PhysAddr, PAGE_SIZE};
use stage2::{MapFlags, MemType, Perms};

use crate::host::{pin_to_cpu, play_cpu, unpin, Fixture, FRAME_BASE, RCU};

/// The page the writer maps and unmaps: outside the harvested range (in
/// another level-1 entry), with a neighbour kept mapped so that its leaf
/// table never becomes empty (no table is allocated or removed: the
/// operation measured is one leaf install and one leaf removal).
const WRITER_IPA: u64 = 1 << 32;
const NEIGHBOUR_IPA: u64 = WRITER_IPA + PAGE_SIZE;
const WRITER_PA: u64 = FRAME_BASE + (1 << 36);

/// The two designs compared.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Design {
    /// Lockless harvester (the engine).
    LockFree,
    /// Harvest under the read side of a readers-writer lock.
    RwLock,
}

/// Latencies of one run, in nanoseconds, sorted.
#[derive(Debug)]
pub struct Latencies {
    /// Every sample, ascending.
    pub sorted_ns: Vec<u64>,
    /// Harvest passes the harvester completed meanwhile.
    pub passes: u64,
    /// The fraction of the run the harvester spent in passes (under the
    /// read lock, for the rwlock design).
    pub busy_fraction: f64,
    /// Mean duration of a harvest pass meanwhile (0 without harvester).
    pub pass_ns: u64,
}

impl Latencies {
    /// The `q` quantile (nearest rank).
    pub fn quantile(&self, q: f64) -> u64 {
        let n = self.sorted_ns.len();
        let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
        self.sorted_ns[rank - 1]
    }

    /// The fraction of samples above `ns`.
    pub fn fraction_over(&self, ns: u64) -> f64 {
        let below = self.sorted_ns.partition_point(|&x| x <= ns);
        (self.sorted_ns.len() - below) as f64 / self.sorted_ns.len().max(1) as f64
    }
}

/// Maps the neighbour page that pins the writer's leaf table.
pub fn prepare(fx: &Fixture) {
    fx.s2
        .map(
            Ipa(NEIGHBOUR_IPA),
            PhysAddr(WRITER_PA + PAGE_SIZE),
            PAGE_SIZE,
            Perms::RW,
            MemType::Normal,
            MapFlags::default(),
        )
        .expect("map neighbour");
}

/// One writer operation: map the page, unmap it.
fn map_unmap(fx: &Fixture) {
    fx.s2
        .map(
            Ipa(WRITER_IPA),
            PhysAddr(WRITER_PA),
            PAGE_SIZE,
            Perms::RW,
            MemType::Normal,
            MapFlags::default(),
        )
        .expect("writer map");
    let stats = fx
        .s2
        .unmap(Ipa(WRITER_IPA), PAGE_SIZE)
        .expect("writer unmap");
    debug_assert_eq!((stats.pages_unmapped, stats.tables_freed), (1, 0));
}

/// A small xorshift generator: the gaps between writer operations.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Times writer operations in `design` for `duration`, with a harvester
/// thread running flat out over the fixture if `harvester`. Operations
/// arrive at random intervals of up to `max_gap` (busy-waited, untimed),
/// on a schedule of their own, so they fall at random points of the
/// harvester's passes, as sporadic unmaps and remaps would; the first 100
/// are not kept. The writer runs pinned to CPU 0, the harvester to CPU 1. The calling thread
/// must be CPU 0, online.
pub fn run(
    fx: &Fixture,
    design: Design,
    harvester: bool,
    duration: Duration,
    max_gap: Duration,
) -> Latencies {
    let rw = spin::RwLock::new(());
    let (started, stop) = (AtomicBool::new(false), AtomicBool::new(false));
    let passes = AtomicU64::new(0);
    let harvest_ns = AtomicU64::new(0);
    let mut lat = Vec::new();
    pin_to_cpu(0);
    std::thread::scope(|s| {
        if harvester {
            s.spawn(|| {
                pin_to_cpu(1);
                play_cpu(1);
                RCU.online();
                let mut bitmap = vec![0u64; fx.words()];
                started.store(true, Ordering::Relaxed);
                while !stop.load(Ordering::Relaxed) {
                    // The guest touches its pages again (hardware AF: no
                    // lock), so that every pass has the same work to do.
                    fx.make_young();
                    let pass = |bitmap: &mut [u64]| {
                        let t = Instant::now();
                        std::hint::black_box(fx.harvest(bitmap));
                        t.elapsed().as_nanos() as u64
                    };
                    let ns = match design {
                        Design::LockFree => pass(&mut bitmap),
                        Design::RwLock => {
                            let _read = rw.read();
                            pass(&mut bitmap)
                        }
                    };
                    harvest_ns.fetch_add(ns, Ordering::Relaxed);
                    passes.fetch_add(1, Ordering::Relaxed);
                    RCU.quiescent();
                }
                RCU.offline();
            });
            while !started.load(Ordering::Relaxed) {
                std::thread::yield_now();
            }
        }
        let max_gap_ns = max_gap.as_nanos().max(1) as u64;
        let mut seed = 0x9e37_79b9_7f4a_7c15;
        let mut gap = || Duration::from_nanos(next_random(&mut seed) % max_gap_ns);
        let start = Instant::now();
        let (mut next, mut done) = (start, 0u64);
        while start.elapsed() < duration {
            // Open loop: arrivals follow their own random schedule, and
            // those that fall while the previous operation still runs are
            // dropped, so an operation starts at a moment independent of
            // the harvester's phase (a closed loop would start the next
            // operation right after a wait, always in the harvester's
            // window between two passes).
            let now = Instant::now();
            next += gap();
            while next < now {
                next += gap();
            }
            while Instant::now() < next {
                std::hint::spin_loop();
            }
            let t = Instant::now();
            match design {
                Design::LockFree => map_unmap(fx),
                Design::RwLock => {
                    let _write = rw.upgradeable_read().upgrade();
                    map_unmap(fx);
                }
            }
            let ns = t.elapsed().as_nanos() as u64;
            done += 1;
            if done > 100 {
                lat.push(ns);
            }
            RCU.quiescent();
        }
        stop.store(true, Ordering::Relaxed);
    });
    unpin();
    lat.sort_unstable();
    let passes = passes.into_inner();
    let harvest_ns = harvest_ns.into_inner();
    Latencies {
        sorted_ns: lat,
        passes,
        pass_ns: harvest_ns.checked_div(passes).unwrap_or(0),
        busy_fraction: harvest_ns as f64 / duration.as_nanos() as f64,
    }
}

/// A check of the machine rather than of the engine: the round-trip time
/// between two threads pinned as in [`run`] (a flag passed back and forth)
/// for `duration`, as the (p50, p99) in nanoseconds. Both threads running at once gives
/// some hundred nanoseconds; milliseconds mean they took turns on one CPU
/// (other load), and then writer latencies measure the scheduler.
pub fn ping_pong(duration: Duration) -> (u64, u64) {
    let flag = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let mut lat = Vec::new();
    pin_to_cpu(0);
    std::thread::scope(|s| {
        s.spawn(|| {
            pin_to_cpu(1);
            let mut seen = 0;
            while !stop.load(Ordering::Relaxed) {
                let v = flag.load(Ordering::Acquire);
                if v != seen && v % 2 == 1 {
                    flag.store(v + 1, Ordering::Release);
                    seen = v + 1;
                }
                std::hint::spin_loop();
            }
        });
        let start = Instant::now();
        let mut v = 0;
        while start.elapsed() < duration {
            let t = Instant::now();
            flag.store(v + 1, Ordering::Release);
            while flag.load(Ordering::Acquire) != v + 2 {
                std::hint::spin_loop();
            }
            v += 2;
            lat.push(t.elapsed().as_nanos() as u64);
        }
        stop.store(true, Ordering::Relaxed);
    });
    unpin();
    lat.sort_unstable();
    let l = Latencies {
        sorted_ns: lat,
        passes: 0,
        pass_ns: 0,
        busy_fraction: 0.0,
    };
    (l.quantile(0.5), l.quantile(0.99))
}
