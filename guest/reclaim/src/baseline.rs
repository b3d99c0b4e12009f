//! The baselines every [`crate::mglru::Mglru`] result is a ratio against.
//!
//! - [`Fifo`]: no aging information at all; evicts in insertion order and
//!   never calls the backend.
//! - [`ClockPerPage`]: CLOCK (second chance) where every page check is one
//!   `test_clear(page, 1, .., CLEAR | FLUSH)` call: what a reclaimer pays
//!   when the hypervisor offers only a per-page "test and clear young".

use crate::backend::{AgeFlags, Backend};
use crate::policy::{GenSizes, Policy};
use alloc::collections::VecDeque;
use alloc::vec;
use alloc::vec::Vec;

/// First in, first out.
#[derive(Debug, Clone, Default)]
pub struct Fifo {
    queue: VecDeque<u32>,
}

impl Fifo {
    /// An empty FIFO; `pages` sizes its queue up front.
    pub fn new(pages: u32) -> Self {
        Fifo {
            queue: VecDeque::with_capacity(pages as usize),
        }
    }
}

impl Policy for Fifo {
    fn name(&self) -> &'static str {
        "fifo"
    }

    fn inserted(&mut self, page: u32) {
        self.queue.push_back(page);
    }

    fn age<B: Backend>(&mut self, _backend: &mut B) -> Result<(), B::Error> {
        Ok(())
    }

    fn select_victims<B: Backend>(
        &mut self,
        _backend: &mut B,
        n: usize,
        out: &mut Vec<u32>,
    ) -> Result<(), B::Error> {
        let n = n.min(self.queue.len());
        out.extend(self.queue.drain(..n));
        Ok(())
    }

    fn select_cold<B: Backend>(
        &mut self,
        _backend: &mut B,
        _min_age: u32,
        _out: &mut Vec<u32>,
    ) -> Result<(), B::Error> {
        Ok(())
    }

    fn resident(&self) -> u32 {
        self.queue.len() as u32
    }

    fn generation_sizes(&self) -> Option<GenSizes> {
        None
    }
}

/// Per-page state of [`ClockPerPage`]: seen young by a pass and not yet
/// given its second chance.
const REFERENCED: u8 = 0x80;
/// Low bits: aging passes in a row that found the page old (saturating).
const IDLE_MASK: u8 = 0x7f;

/// CLOCK with one hypercall per page check.
///
/// An aging pass checks every resident page once (`resident` calls) and
/// remembers "young" in a per-page bit and "old for k passes" in a per-page
/// counter; eviction sweeps the hand, checking each page with a call of its
/// own and giving a second chance to pages young now or since the last pass.
#[derive(Debug, Clone)]
pub struct ClockPerPage {
    /// Resident pages in clock order; the hand is the front.
    ring: VecDeque<u32>,
    /// [`REFERENCED`] | idle passes, per page of the region.
    state: Vec<u8>,
}

impl ClockPerPage {
    /// An empty clock over `pages` pages.
    pub fn new(pages: u32) -> Self {
        ClockPerPage {
            ring: VecDeque::with_capacity(pages as usize),
            state: vec![0; pages as usize],
        }
    }

    /// One per-page call: was `page` young (and clear it)?
    fn check<B: Backend>(backend: &mut B, page: u32) -> Result<bool, B::Error> {
        let mut word = [0u64; 1];
        let young = backend.test_clear(page, 1, &mut word, AgeFlags::CLEAR | AgeFlags::FLUSH)?;
        Ok(young != 0)
    }
}

impl Policy for ClockPerPage {
    fn name(&self) -> &'static str {
        "clock-perpage"
    }

    fn inserted(&mut self, page: u32) {
        self.state[page as usize] = 0;
        self.ring.push_back(page);
    }

    fn age<B: Backend>(&mut self, backend: &mut B) -> Result<(), B::Error> {
        for &page in &self.ring {
            let s = &mut self.state[page as usize];
            if Self::check(backend, page)? {
                *s = REFERENCED;
            } else {
                *s = (*s & REFERENCED) | (*s & IDLE_MASK).saturating_add(1).min(IDLE_MASK);
            }
        }
        Ok(())
    }

    fn select_victims<B: Backend>(
        &mut self,
        backend: &mut B,
        n: usize,
        out: &mut Vec<u32>,
    ) -> Result<(), B::Error> {
        let mut taken = 0;
        // Each page is given at most one second chance per call, so two laps
        // always suffice (nothing runs between the checks).
        let mut budget = 2 * self.ring.len() + 1;
        while taken < n && budget > 0 {
            let Some(page) = self.ring.pop_front() else {
                break;
            };
            budget -= 1;
            let s = &mut self.state[page as usize];
            let referenced = *s & REFERENCED != 0;
            if Self::check(backend, page)? || referenced {
                *s = 0;
                self.ring.push_back(page);
            } else {
                out.push(page);
                taken += 1;
            }
        }
        Ok(())
    }

    fn select_cold<B: Backend>(
        &mut self,
        _backend: &mut B,
        min_age: u32,
        out: &mut Vec<u32>,
    ) -> Result<(), B::Error> {
        let state = &self.state;
        self.ring.retain(|&page| {
            let s = state[page as usize];
            let cold = u32::from(s & IDLE_MASK) >= min_age;
            if cold {
                out.push(page);
            }
            !cold
        });
        Ok(())
    }

    fn resident(&self) -> u32 {
        self.ring.len() as u32
    }

    fn generation_sizes(&self) -> Option<GenSizes> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::Memory;
    use crate::sim::SimBackend;

    #[test]
    fn fifo_evicts_in_insertion_order_without_calls() {
        let mut sim = SimBackend::new(16);
        let mut fifo = Fifo::new(16);
        for p in [3, 1, 4, 15, 9] {
            fifo.inserted(p);
            sim.access(p, false).unwrap();
        }
        let mut out = Vec::new();
        fifo.age(&mut sim).unwrap();
        fifo.select_victims(&mut sim, 2, &mut out).unwrap();
        assert_eq!(out, [3, 1]);
        fifo.select_victims(&mut sim, 10, &mut out).unwrap();
        assert_eq!(out, [3, 1, 4, 15, 9]);
        assert_eq!(fifo.resident(), 0);
        assert_eq!(sim.calls(), 0);
    }

    #[test]
    fn clock_gives_young_pages_a_second_chance_one_call_each() {
        let mut sim = SimBackend::new(16);
        let mut clock = ClockPerPage::new(16);
        for p in 0..4 {
            clock.inserted(p);
        }
        sim.access(0, false).unwrap();
        sim.access(2, true).unwrap();
        let mut out = Vec::new();
        clock.select_victims(&mut sim, 2, &mut out).unwrap();
        assert_eq!(out, [1, 3]);
        // 0 (young, second chance), 1, 2 (young), 3.
        assert_eq!(sim.calls(), 4);
        // 0 and 2 lost their young bit to the check: next in line.
        clock.select_victims(&mut sim, 1, &mut out).unwrap();
        assert_eq!(out, [1, 3, 0]);
    }

    #[test]
    fn clock_pass_costs_one_call_per_resident_page_and_ages() {
        let mut sim = SimBackend::new(64);
        let mut clock = ClockPerPage::new(64);
        for p in 0..10 {
            clock.inserted(p);
            sim.access(p, false).unwrap();
        }
        clock.age(&mut sim).unwrap();
        assert_eq!(sim.calls(), 10);
        sim.access(4, false).unwrap();
        clock.age(&mut sim).unwrap();
        clock.age(&mut sim).unwrap();
        let mut out = Vec::new();
        // Pages 0..10 except 4 were old in the last two passes; page 4 in one.
        clock.select_cold(&mut sim, 2, &mut out).unwrap();
        assert_eq!(out, [0, 1, 2, 3, 5, 6, 7, 8, 9]);
        assert_eq!(clock.resident(), 1);
    }
}
