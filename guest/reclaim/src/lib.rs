//! The guest-side memory reclaimer.
//!
//! Our EL1 guest asks the hypervisor which of its pages were accessed
//! (stage-2 Access Flags) as a bitmap (`AGING_TEST_CLEAR`, modelled by
//! [`Backend`]), ages its pages in multiple generations like Linux MGLRU
//! ([`Mglru`]), evicts the cold ones (on the target: compressed into the
//! hypervisor's store, frame released) and refaults them on access.
//!
//! Everything here is portable `no_std` + `alloc`: the policies, the
//! baselines ([`Fifo`], [`ClockPerPage`]), the seeded workloads
//! ([`workload`]), the trace driver ([`driver`], generic over the backend
//! and the memory so the guest reuses it with hypercalls and real pages)
//! and the simulator with the offline references ([`sim`]). `cargo test -p
//! reclaim` runs it all on the host; `examples/simulate.rs` prints the same
//! report lines the guest prints on the target.
//!
//! # Defaults and why
//!
//! Tuned on the host simulator (4096 pages, 200 000 accesses, memory target
//! 40%); the must-pass numbers of the tests hold with margin at these
//! values. Memory cost: one byte per page in [`Mglru`] and one in the
//! [`Driver`], plus one bitmap buffer of `max(harvest_chunk, lookaround)`
//! bits (512 bytes).
//!
//! | setting | default | why |
//! |---|---|---|
//! | [`MglruConfig::gens`] | 4 | the minimum asked for; more generations did not lower refaults on these workloads (the age resolution that matters is "young in the last pass or two") |
//! | [`MglruConfig::insert_distance`] | 2 | new pages enter `max_seq - 2`, the second-oldest generation when all four are alive: below the hot set (youngest, or one below after a pass that missed it), so a scan never displaces it, yet not the very oldest, so a page faulted in is not the next victim before it had a chance to be seen young |
//! | [`MglruConfig::harvest_chunk`] | 4096 pages | one call per 16 MiB; a 512-byte bitmap; a 16384-page region costs 4 calls per pass |
//! | [`MglruConfig::lookaround`] | 256 pages | large enough that one call usually settles a whole eviction batch (the oldest generation is dense), small enough that the bitmap is 4 cache lines |
//! | [`DriverConfig::interval`] | 4096 accesses | about 5 reuse periods of a hot page at 20% hot / 95% share, so a hot page is young in almost every pass (a miss there would let it age); shorter intervals cost calls without lowering refaults |
//! | [`DriverConfig::batch`] | 32 pages | amortises one look-around call over many victims; costs at most 31 pages of capacity |
//! | [`DriverConfig::cold_age`] | 4 passes | a working-set page is evicted only if idle for 3-4 intervals (12-16k accesses): at a 30% working set of 4096 pages that is ~10 reuse periods, `e^-10` of them |
//!
//! # Left out
//!
//! The TLB is not simulated (`FLUSH` has no effect in [`sim::SimBackend`]),
//! so the cost of not flushing shows only on the target. There are no
//! refault tiers or PID feedback as in Linux: scan resistance is the
//! probation rule of [`Mglru`].

#![cfg_attr(not(test), no_std)]
#![warn(missing_docs)]

extern crate alloc;

pub mod backend;
pub mod baseline;
pub mod driver;
pub mod mglru;
pub mod policy;
pub mod sim;
pub mod workload;

pub use backend::{AgeFlags, Backend};
pub use baseline::{ClockPerPage, Fifo};
pub use driver::{run, Driver, DriverConfig, Memory, Report, RunError};
pub use mglru::{Mglru, MglruConfig, MglruStats};
pub use policy::{AnyPolicy, GenSizes, Policy, PolicyKind};
pub use workload::{Access, Workload, WorkloadConfig, WorkloadKind};
