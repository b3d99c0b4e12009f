//! The offline references against simple models.

use proptest::prelude::*;
use reclaim::sim::{belady_refaults, lru_refaults};
use reclaim::workload::{Access, Workload, WorkloadConfig, WorkloadKind};

fn trace(pages: &[u32], phase_every: usize) -> Vec<Access> {
    pages
        .iter()
        .enumerate()
        .map(|(i, &page)| Access {
            page,
            write: false,
            phase: (i / phase_every.max(1)).min(3) as u8,
        })
        .collect()
}

/// LRU the obvious way: a recency list, O(n * capacity).
fn naive_lru(trace: &[Access], cap: usize) -> (u64, [u64; 4]) {
    let mut order: Vec<u32> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let (mut total, mut by_phase) = (0, [0u64; 4]);
    for a in trace {
        if let Some(i) = order.iter().position(|&p| p == a.page) {
            order.remove(i);
        } else {
            if !seen.insert(a.page) {
                total += 1;
                by_phase[a.phase as usize] += 1;
            }
            if order.len() == cap {
                order.remove(0);
            }
        }
        order.push(a.page);
    }
    (total, by_phase)
}

/// The fewest refaults over every possible eviction choice (tiny traces).
fn brute_force_min(trace: &[Access], cap: usize) -> u64 {
    fn go(trace: &[Access], cap: usize, resident: &mut Vec<u32>, seen: &mut Vec<u32>) -> u64 {
        let Some((a, rest)) = trace.split_first() else {
            return 0;
        };
        if resident.contains(&a.page) {
            return go(rest, cap, resident, seen);
        }
        let refault = u64::from(seen.contains(&a.page));
        let first = !seen.contains(&a.page);
        if first {
            seen.push(a.page);
        }
        let best = if resident.len() < cap {
            resident.push(a.page);
            let r = go(rest, cap, resident, seen);
            resident.pop();
            r
        } else {
            (0..resident.len())
                .map(|i| {
                    let old = std::mem::replace(&mut resident[i], a.page);
                    let r = go(rest, cap, resident, seen);
                    resident[i] = old;
                    r
                })
                .min()
                .unwrap()
        };
        if first {
            seen.pop();
        }
        refault + best
    }
    go(trace, cap, &mut Vec::new(), &mut Vec::new())
}

proptest! {
    #[test]
    fn lru_matches_the_naive_model(
        pages in prop::collection::vec(0u32..24, 0..400),
        cap in 1usize..16,
        phase_every in 1usize..200,
    ) {
        let t = trace(&pages, phase_every);
        let fast = lru_refaults(t.iter().copied(), cap as u32);
        let (total, by_phase) = naive_lru(&t, cap);
        prop_assert_eq!(fast.total, total);
        prop_assert_eq!(fast.by_phase, by_phase);
    }

    #[test]
    fn belady_never_loses_to_lru(
        pages in prop::collection::vec(0u32..32, 0..500),
        cap in 1u32..20,
    ) {
        let t = trace(&pages, 100);
        let min = belady_refaults(&t, cap);
        let lru = lru_refaults(t.iter().copied(), cap);
        prop_assert!(min.total <= lru.total, "min {} lru {}", min.total, lru.total);
        prop_assert_eq!(min.by_phase.iter().sum::<u64>(), min.total);
    }

    #[test]
    fn belady_is_the_optimum_on_tiny_traces(
        pages in prop::collection::vec(0u32..6, 0..11),
        cap in 1usize..4,
    ) {
        let t = trace(&pages, 100);
        prop_assert_eq!(belady_refaults(&t, cap as u32).total, brute_force_min(&t, cap));
    }
}

#[test]
fn references_on_a_workload_trace() {
    let w = Workload::new(WorkloadConfig::new(WorkloadKind::HotCold, 512, 20_000, 3)).unwrap();
    let t: Vec<Access> = w.trace().collect();
    for cap in [1, 64, 205, 511, 512] {
        let lru = lru_refaults(t.iter().copied(), cap);
        let (naive, _) = naive_lru(&t, cap as usize);
        let min = belady_refaults(&t, cap);
        assert_eq!(lru.total, naive);
        assert!(min.total <= lru.total);
        if cap == 512 {
            // Everything fits: no refaults at all.
            assert_eq!((lru.total, min.total), (0, 0));
        }
    }
}
