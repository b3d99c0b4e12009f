//! Stage-2 page tables for an AArch64 EL2 hypervisor: 4 KiB granule, four
//! levels (start level 0), 40..=48-bit IPA space.
//!
//! - [`desc`]: descriptor encodings, hardware attributes and the portable
//!   permissions kept apart from them;
//! - [`mm`]: the services the user injects (table pages, TLB invalidation);
//! - [`walk`]: the one walk engine, of which every operation is a visitor;
//! - [`rcu`]: the RCU domain (QSBR) and deferred-free queue that keep table
//!   pages alive for lockless walkers;
//! - [`Stage2`]: the table object with map / unmap / protect / translate /
//!   access-flag / dump, its writer lock and its concurrency rules;
//! - [`age`]: the lockless Access-Flag harvester (aging bitmaps);
//! - [`fault`]: the lockless fault path and page migration;
//! - [`pin`]: pinning a leaf while the hypervisor accesses guest memory;
//! - [`scan`]: the lockless scan for empty table pages;
//! - [`batch`]: TLB batching with pending frees.
//!
//! With the cargo feature `check` (on in the crate's tests), a checker
//! panics on the bug classes of deferred TLB maintenance (see `check.rs`).
//!
//! The crate is `no_std`, contains no inline assembly, and is tested on the
//! host (`cargo test -p stage2`).

#![no_std]
#![warn(missing_docs)]

#[cfg(feature = "check")]
extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod age;
pub mod batch;
#[cfg(feature = "check")]
mod check;
pub mod desc;
pub mod error;
pub mod fault;
pub mod mm;
mod ops;
pub mod pin;
pub mod rcu;
pub mod scan;
mod sync;
pub mod table;
pub mod walk;

pub use age::{Bitmap, HarvestError, HarvestFlags};
pub use batch::{BatchStats, TlbBatch};
pub use desc::{DescView, Descriptor, MemType, Perms, S2Attrs};
pub use error::{MapError, Stage2Error};
pub use fault::{FaultOutcome, MigrateOutcome};
pub use mm::{TableAlloc, TlbInvalidate};
pub use pin::PinError;
pub use rcu::{GpTicket, Rcu};
pub use table::{MapFlags, Stage2, Translation, UnmapStats};
pub use walk::{VisitCtx, VisitKind, Visitor, WalkFlags};
