//! What every replacement policy offers the driver, and a runtime choice
//! among the three we have ([`AnyPolicy`]), so one binary can run them all
//! and report ratios.

use crate::backend::Backend;
use crate::baseline::{ClockPerPage, Fifo};
use crate::mglru::{Mglru, MglruConfig};
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::fmt;

/// Most generations [`GenSizes`] (and [`Mglru`]) can hold.
pub const MAX_GENS: usize = 16;

/// Sizes of the live generations, oldest first (for plots).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GenSizes {
    len: u8,
    sizes: [u32; MAX_GENS],
}

impl GenSizes {
    /// Builds from sizes listed oldest first; at most [`MAX_GENS`] are kept.
    pub fn new(oldest_first: impl IntoIterator<Item = u32>) -> Self {
        let mut out = GenSizes {
            len: 0,
            sizes: [0; MAX_GENS],
        };
        for (slot, size) in out.sizes.iter_mut().zip(oldest_first) {
            *slot = size;
            out.len += 1;
        }
        out
    }

    /// The sizes, oldest generation first.
    pub fn as_slice(&self) -> &[u32] {
        &self.sizes[..self.len as usize]
    }
}

impl fmt::Display for GenSizes {
    /// `a/b/c/d`, oldest first: one token, fit for a key=value line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, size) in self.as_slice().iter().enumerate() {
            if i > 0 {
                f.write_str("/")?;
            }
            write!(f, "{size}")?;
        }
        Ok(())
    }
}

/// A page replacement policy over the region `0..pages`.
///
/// The driver tells it which pages become resident, runs an aging pass every
/// so many accesses, and asks it for victims; a page the policy returns as a
/// victim is forgotten by it at once (the driver evicts it).
pub trait Policy {
    /// Short name for reports (`mglru`, `fifo`, `clock-perpage`).
    fn name(&self) -> &'static str;

    /// `page` became resident (first touch or refault). It must not be
    /// resident already.
    fn inserted(&mut self, page: u32);

    /// A periodic aging pass.
    fn age<B: Backend>(&mut self, backend: &mut B) -> Result<(), B::Error>;

    /// Picks up to `n` resident pages to evict now, appends them to `out`
    /// and forgets them. Fewer than `n` only when fewer are resident.
    fn select_victims<B: Backend>(
        &mut self,
        backend: &mut B,
        n: usize,
        out: &mut Vec<u32>,
    ) -> Result<(), B::Error>;

    /// Proactive reclaim without memory pressure: appends to `out` (and
    /// forgets) the resident pages that have not been seen young for at
    /// least `min_age` aging passes. A policy without aging information
    /// selects nothing.
    fn select_cold<B: Backend>(
        &mut self,
        backend: &mut B,
        min_age: u32,
        out: &mut Vec<u32>,
    ) -> Result<(), B::Error>;

    /// Pages the policy holds as resident.
    fn resident(&self) -> u32;

    /// Generation sizes, oldest first, or `None` for a policy without
    /// generations.
    fn generation_sizes(&self) -> Option<GenSizes>;
}

/// The policies by name, for command lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyKind {
    /// [`Mglru`].
    Mglru,
    /// [`Fifo`].
    Fifo,
    /// [`ClockPerPage`].
    ClockPerPage,
}

impl PolicyKind {
    /// All of them, in report order.
    pub const ALL: [PolicyKind; 3] = [
        PolicyKind::Mglru,
        PolicyKind::Fifo,
        PolicyKind::ClockPerPage,
    ];

    /// The report name.
    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Mglru => "mglru",
            PolicyKind::Fifo => "fifo",
            PolicyKind::ClockPerPage => "clock-perpage",
        }
    }

    /// Parses a report name.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// A policy of this kind over `pages` pages ([`MglruConfig::default`]
    /// for [`Mglru`]).
    pub fn build(self, pages: u32) -> AnyPolicy {
        self.build_with(pages, MglruConfig::default())
    }

    /// Same, with `mglru` as the configuration of [`Mglru`].
    pub fn build_with(self, pages: u32, mglru: MglruConfig) -> AnyPolicy {
        match self {
            PolicyKind::Mglru => AnyPolicy::Mglru(Box::new(Mglru::new(pages, mglru))),
            PolicyKind::Fifo => AnyPolicy::Fifo(Fifo::new(pages)),
            PolicyKind::ClockPerPage => AnyPolicy::ClockPerPage(ClockPerPage::new(pages)),
        }
    }
}

/// One of the policies, chosen at run time.
#[derive(Debug)]
pub enum AnyPolicy {
    /// [`Mglru`] (boxed: its inline generation tables dwarf the others).
    Mglru(Box<Mglru>),
    /// [`Fifo`].
    Fifo(Fifo),
    /// [`ClockPerPage`].
    ClockPerPage(ClockPerPage),
}

macro_rules! dispatch {
    ($self:ident, $p:ident => $e:expr) => {
        match $self {
            AnyPolicy::Mglru($p) => $e,
            AnyPolicy::Fifo($p) => $e,
            AnyPolicy::ClockPerPage($p) => $e,
        }
    };
}

impl Policy for AnyPolicy {
    fn name(&self) -> &'static str {
        dispatch!(self, p => p.name())
    }
    fn inserted(&mut self, page: u32) {
        dispatch!(self, p => p.inserted(page))
    }
    fn age<B: Backend>(&mut self, backend: &mut B) -> Result<(), B::Error> {
        dispatch!(self, p => p.age(backend))
    }
    fn select_victims<B: Backend>(
        &mut self,
        backend: &mut B,
        n: usize,
        out: &mut Vec<u32>,
    ) -> Result<(), B::Error> {
        dispatch!(self, p => p.select_victims(backend, n, out))
    }
    fn select_cold<B: Backend>(
        &mut self,
        backend: &mut B,
        min_age: u32,
        out: &mut Vec<u32>,
    ) -> Result<(), B::Error> {
        dispatch!(self, p => p.select_cold(backend, min_age, out))
    }
    fn resident(&self) -> u32 {
        dispatch!(self, p => p.resident())
    }
    fn generation_sizes(&self) -> Option<GenSizes> {
        dispatch!(self, p => p.generation_sizes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn names_round_trip() {
        for kind in PolicyKind::ALL {
            assert_eq!(PolicyKind::parse(kind.name()), Some(kind));
            assert_eq!(kind.build(64).name(), kind.name());
        }
        assert_eq!(PolicyKind::parse("lru"), None);
    }

    #[test]
    fn gen_sizes_print_oldest_first() {
        let g = GenSizes::new([5, 0, 7]);
        assert_eq!(g.as_slice(), [5, 0, 7]);
        assert_eq!(g.to_string(), "5/0/7");
        assert_eq!(GenSizes::new(0..100).as_slice().len(), MAX_GENS);
    }
}
