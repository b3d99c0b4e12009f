//! Host tests of the stage-2 table through its public API: behaviour of
//! each operation (`ops`), a property test against a model (`model`), the
//! harvester (`age`), the lockless fault path and migration (`fault`),
//! TLB batching with the checking mode (`batch`), pins (`pin`) and the
//! empty-table scan with the leaf-only unmap (`scan`).

mod age;
mod batch;
mod common;
mod fault;
mod model;
mod ops;
mod pin;
mod scan;

use common::{HostAlloc, RecordingTlb};
use stage2::Stage2;

/// The table type every test uses.
type S2<'a> = Stage2<'static, &'a HostAlloc, &'a RecordingTlb<'a>>;

/// A 40-bit table over `alloc`, with `tlb` attached to its root.
fn new_s2<'a>(alloc: &'a HostAlloc, tlb: &'a RecordingTlb<'a>) -> S2<'a> {
    let s2 = Stage2::new(40, alloc, tlb, common::rcu()).expect("root table");
    tlb.attach(s2.root());
    s2
}
