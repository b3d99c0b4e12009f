//! Single 32-bit MMIO accesses.
//!
//! Under the hypervisor the guest's devices are emulated: an access traps
//! to EL2, which decodes it from the syndrome. The syndrome is only valid
//! (`ESR_EL2.ISS.ISV` = 1) for single loads and stores without writeback,
//! so these helpers pin the instruction with inline assembly instead of
//! trusting the compiler's choice for a volatile access.

use crate::addr::PhysAddr;

/// Reads the 32-bit register at `addr` with a single `ldr w`.
///
/// # Safety
///
/// `addr` must be 4-byte aligned and mapped as device memory, and reading
/// it must have no side effect the caller is not prepared for; or the
/// caller has armed an expected abort for it
/// ([`crate::exceptions::with_expected_abort`]).
pub unsafe fn read32(addr: PhysAddr) -> u32 {
    let value: u32;
    // SAFETY: the caller guarantees the address is a readable register (or
    // an expected abort); a single aligned load touches nothing else.
    unsafe {
        core::arch::asm!(
            "ldr {value:w}, [{addr}]",
            addr = in(reg) addr.as_u64(),
            value = out(reg) value,
            options(nostack, preserves_flags),
        );
    }
    value
}

/// Writes the 32-bit register at `addr` with a single `str w`.
///
/// # Safety
///
/// `addr` must be 4-byte aligned and mapped as device memory, and writing
/// `value` to it must be harmless to the program's memory.
pub unsafe fn write32(addr: PhysAddr, value: u32) {
    // SAFETY: the caller guarantees the address is a writable register; a
    // single aligned store touches nothing else.
    unsafe {
        core::arch::asm!(
            "str {value:w}, [{addr}]",
            addr = in(reg) addr.as_u64(),
            value = in(reg) value,
            options(nostack, preserves_flags),
        );
    }
}
