//! Entry points, per-CPU stacks and per-CPU identity.
//!
//! `_start` (boot CPU) and `_secondary_start` (PSCI CPU_ON) are in
//! `boot.S`: they set a stack, zero BSS (boot CPU only) and call into Rust.
//! `TPIDR_EL2` holds the index of the running CPU from then on.

use aarch64_cpu::registers::{Readable, Writeable, TPIDR_EL2};

/// Most CPUs the hypervisor supports.
pub const MAX_CPUS: usize = 8;
/// Bytes of stack per CPU.
pub const STACK_SIZE: usize = 64 * 1024;

/// A CPU's stack, 16-byte aligned as AAPCS64 requires.
#[repr(C, align(16))]
pub struct Stack([u8; STACK_SIZE]);

/// The per-CPU stacks; CPU `i` uses `STACKS[i]`, only from `boot.S`.
#[no_mangle]
pub static mut STACKS: [Stack; MAX_CPUS] = [const { Stack([0; STACK_SIZE]) }; MAX_CPUS];

core::arch::global_asm!(
    include_str!("boot.S"),
    stacks = sym STACKS,
    stack_size = const STACK_SIZE,
    primary_main = sym crate::primary_main,
    secondary_main = sym crate::smp::secondary_main,
    halt = sym crate::power::halt_after_return,
);

extern "C" {
    /// Entry of secondary CPUs (in `boot.S`), given to PSCI CPU_ON.
    pub fn _secondary_start();
    /// First byte of the image (linker script).
    pub static __image_start: u8;
    /// End of the executable text, page aligned (linker script).
    pub static __text_end: u8;
    /// End of read-only data, page aligned (linker script).
    pub static __rodata_end: u8;
    /// End of the image including BSS, page aligned (linker script).
    pub static __image_end: u8;
}

/// Records the index of the running CPU.
pub fn set_cpu_index(index: usize) {
    TPIDR_EL2.set(index as u64);
}

/// Index (0-based, DTB order) of the running CPU.
pub fn cpu_index() -> usize {
    TPIDR_EL2.get() as usize
}

/// The image's section boundaries, from the linker script.
#[derive(Copy, Clone, Debug)]
pub struct ImageLayout {
    /// First byte of the image (start of text).
    pub start: u64,
    /// End of text = start of read-only data (page aligned).
    pub text_end: u64,
    /// End of read-only data = start of writable data (page aligned).
    pub rodata_end: u64,
    /// End of the image, BSS included (page aligned).
    pub end: u64,
}

/// Reads the section boundaries (taking the address of an extern static
/// is safe; only the addresses are used, never the bytes).
pub fn image_layout() -> ImageLayout {
    ImageLayout {
        start: &raw const __image_start as u64,
        text_end: &raw const __text_end as u64,
        rodata_end: &raw const __rodata_end as u64,
        end: &raw const __image_end as u64,
    }
}
