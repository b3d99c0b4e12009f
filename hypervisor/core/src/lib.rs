//! Portable core of the hypervisor.
//!
//! Everything here is `no_std`, free of inline assembly and system registers,
//! and tested on the host with `cargo test`. The EL2 binary (`hypervisor/el2`)
//! is a thin shell that feeds it what the hardware says.

#![no_std]
#![warn(missing_docs)]

extern crate alloc;
#[cfg(test)]
#[macro_use]
extern crate std;

pub mod addr;
pub mod bootargs;
pub mod frames;
pub mod hypercall;
