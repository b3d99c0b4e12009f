//! Coverage-guided host fuzzing of the hypervisor's portable code, driven
//! by libFuzzer (`libfuzzer-sys`, built by `scripts/fuzz` with the same
//! sanitizer-coverage flags `cargo fuzz` uses, on stable Rust).
//!
//! Each target in `fuzz_targets/` is a thin `fuzz_target!` around one
//! `run` function here, so the harnesses are ordinary library code:
//!
//! - [`validators`]: the hypercall argument validators of `hyp-core`
//!   against an independent reference in `u128` arithmetic (the same
//!   verdict, the same error, accepted ranges inside guest RAM, and what the
//!   validators accept never makes the harvester fail), plus the bootargs
//!   parser (no panic, its invariants, `parse_size`/`parse_u64` against a
//!   reference).
//! - [`stage2_model`]: the stage-2 engine in checking mode (feature
//!   `check`: it panics on TLB-maintenance bugs) driven by a sequence of
//!   operations decoded from the input, compared after each one with a
//!   simple model, with a shadow TLB that must never hold a stale
//!   translation once an operation returned.
//! - [`store`]: the compressed page store against a `HashMap`, and the
//!   decoder on arbitrary blobs (an error, never a panic).
//!
//! With the cargo feature `planted-bug` each harness's reference is
//! deliberately wrong in one small way ([`PLANTED`]); `scripts/fuzz
//! --self-test` checks that libFuzzer finds each of them, so a harness that
//! cannot fail is noticed.
//!
//! Every check is an `assert!`: a failure panics, and with `panic = "abort"`
//! libFuzzer records the input as a crash artifact.

#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

pub mod edge;
pub mod host;
pub mod stage2_model;
pub mod store;
pub mod validators;

/// Whether the harnesses carry their planted bug (cargo feature
/// `planted-bug`, for `scripts/fuzz --self-test` only).
pub const PLANTED: bool = cfg!(feature = "planted-bug");
