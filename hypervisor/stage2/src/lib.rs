//! Stage-2 page tables for an AArch64 EL2 hypervisor: 4 KiB granule, four
//! levels (start level 0), 40..=48-bit IPA space.
//!
//! - [`desc`]: descriptor encodings, hardware attributes and the portable
//!   permissions kept apart from them;
//! - [`mm`]: the services the user injects (table pages, TLB invalidation);
//! - [`walk`]: the one walk engine, of which every operation is a visitor;
//! - [`Stage2`]: the table object with map / unmap / protect / translate /
//!   access-flag / dump, its writer lock and its concurrency rules.
//!
//! The crate is `no_std`, contains no inline assembly, and is tested on the
//! host (`cargo test -p stage2`).

#![no_std]
#![warn(missing_docs)]

#[cfg(test)]
extern crate std;

pub mod desc;
pub mod error;
pub mod mm;
mod ops;
pub mod table;
pub mod walk;

pub use desc::{DescView, Descriptor, MemType, Perms, S2Attrs};
pub use error::{MapError, Stage2Error};
pub use mm::{TableAlloc, TlbInvalidate};
pub use table::{MapFlags, Stage2, Translation, UnmapStats};
pub use walk::{VisitCtx, VisitKind, Visitor, WalkFlags};
