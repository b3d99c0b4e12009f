//! Entry points, stacks and the image layout.
//!
//! `_start` is the first byte of the image (see `linker/guest.ld`): the
//! hypervisor enters it at EL1h with the MMU and caches off and `x0` = IPA
//! of the DTB. It enables FP/SIMD (the target's code uses NEON registers),
//! takes the boot stack, zeroes BSS, installs the exception vectors and
//! calls [`crate::kernel_main`].
//!
//! `secondary_entry` is the PSCI `CPU_ON` entry point of the other vCPUs
//! (`x0` = context id = the CPU's index in the DTB). It turns the MMU on
//! with the boot CPU's translation registers *before* touching memory
//! through the stack, so no Rust code runs on a secondary with the MMU
//! off, then calls [`crate::smp::secondary_main`].
//!
//! The boot CPU runs a little Rust code with the MMU off (heap set-up, DTB
//! parsing, page-table construction): the target is built with
//! `+strict-align`, so that code does no unaligned access, which Device
//! memory would not allow.

use core::cell::UnsafeCell;
use core::mem::{offset_of, size_of};
use core::sync::atomic::{AtomicU64, Ordering};

use aarch64_cpu::registers::CPACR_EL1;

use crate::addr::{PhysAddr, PhysRange};
use crate::smp::MAX_CPUS;

/// Bytes of stack of the boot CPU.
pub const BOOT_STACK_SIZE: usize = 128 * 1024;
/// Bytes of stack of each secondary CPU (a power of two: the entry code
/// computes the stack top with a shift).
pub const SECONDARY_STACK_SIZE: usize = 32 * 1024;
const _: () = assert!(SECONDARY_STACK_SIZE.is_power_of_two());

/// A CPU stack. Only ever accessed through `sp`, never through Rust
/// references.
#[repr(C, align(16))]
pub struct Stack<const N: usize>(UnsafeCell<[u8; N]>);

// SAFETY: the stack memory is never accessed through Rust references; each
// stack is used by exactly one CPU (the boot CPU, or the secondary whose
// DTB index selects it), via its stack pointer.
unsafe impl<const N: usize> Sync for Stack<N> {}

impl<const N: usize> Stack<N> {
    const fn new() -> Self {
        Self(UnsafeCell::new([0; N]))
    }
}

static BOOT_STACK: Stack<BOOT_STACK_SIZE> = Stack::new();
/// Stacks of the secondary CPUs, indexed by DTB CPU index (the boot CPU's
/// slot is unused).
static SECONDARY_STACKS: [Stack<SECONDARY_STACK_SIZE>; MAX_CPUS] =
    [const { Stack::new() }; MAX_CPUS];

/// Translation-control state a secondary CPU loads before it turns its
/// MMU on: the boot CPU's values, so every CPU shares the same tables.
///
/// The secondary reads this with its MMU (and so its caches) off, so
/// [`publish_secondary_mmu_state`] cleans it to the point of coherency.
#[repr(C, align(64))]
pub struct SecondaryMmuState {
    mair: AtomicU64,
    tcr: AtomicU64,
    ttbr0: AtomicU64,
    sctlr: AtomicU64,
}

static SECONDARY_MMU_STATE: SecondaryMmuState = SecondaryMmuState {
    mair: AtomicU64::new(0),
    tcr: AtomicU64::new(0),
    ttbr0: AtomicU64::new(0),
    sctlr: AtomicU64::new(0),
};

/// Records the translation registers secondaries must load (called by the
/// boot CPU once its own MMU is on, before any `CPU_ON`).
pub fn publish_secondary_mmu_state(mair: u64, tcr: u64, ttbr0: u64, sctlr: u64) {
    let state = &SECONDARY_MMU_STATE;
    state.mair.store(mair, Ordering::Relaxed);
    state.tcr.store(tcr, Ordering::Relaxed);
    state.ttbr0.store(ttbr0, Ordering::Relaxed);
    state.sctlr.store(sctlr, Ordering::Relaxed);
    clean_to_poc(PhysAddr::from_ptr(state), size_of::<SecondaryMmuState>());
}

/// Cleans the data cache lines covering `[start, start + len)` to the
/// point of coherency, so a CPU with its caches off sees the data.
fn clean_to_poc(start: PhysAddr, len: usize) {
    // The architectural minimum line size; cleaning more often than needed
    // is harmless.
    const LINE: u64 = 64;
    let mut line = start.align_down(LINE).as_u64();
    let end = start.as_u64() + len as u64;
    while line < end {
        #[cfg(target_arch = "aarch64")]
        // SAFETY: cleaning a cache line only writes back data the program
        // already wrote; it changes no memory contents.
        unsafe {
            core::arch::asm!("dc cvac, {}", in(reg) line, options(nostack, preserves_flags));
        }
        line += LINE;
    }
    aarch64_cpu::asm::barrier::dsb(aarch64_cpu::asm::barrier::SY);
}

#[cfg(target_arch = "aarch64")]
core::arch::global_asm!(
    r#"
    .section .text.boot, "ax"
    .global _start
_start:
    // x0 = DTB IPA; keep it in x19 (untouched below) for kernel_main.
    mov     x19, x0

    // FP/SIMD on before any compiler-generated code can use it.
    mrs     x1, cpacr_el1
    orr     x1, x1, #{cpacr_fpen}
    msr     cpacr_el1, x1
    isb

    adrp    x1, {boot_stack}
    add     x1, x1, :lo12:{boot_stack}
    mov     x2, #{boot_stack_size}
    add     sp, x1, x2

    // Zero BSS (it contains the boot stack: nothing is on it yet).
    adrp    x1, __bss_start
    add     x1, x1, :lo12:__bss_start
    adrp    x2, __bss_end
    add     x2, x2, :lo12:__bss_end
1:  cmp     x1, x2
    b.hs    2f
    stp     xzr, xzr, [x1], #16
    b       1b
2:
    adrp    x1, guest_exception_vectors
    add     x1, x1, :lo12:guest_exception_vectors
    msr     vbar_el1, x1
    isb

    mov     x0, x19
    bl      {kernel_main}
    // kernel_main never returns; trap into the vectors if it ever does.
    udf     #0

    .section .text, "ax"
    .global secondary_entry
secondary_entry:
    // x0 = context id = CPU index (< MAX_CPUS, chosen by the boot CPU).
    mov     x19, x0

    mrs     x1, cpacr_el1
    orr     x1, x1, #{cpacr_fpen}
    msr     cpacr_el1, x1
    isb

    // MMU on with the boot CPU's registers before using any memory
    // through the stack or the caches.
    adrp    x1, {mmu_state}
    add     x1, x1, :lo12:{mmu_state}
    ldr     x2, [x1, #{off_mair}]
    msr     mair_el1, x2
    ldr     x2, [x1, #{off_tcr}]
    msr     tcr_el1, x2
    ldr     x2, [x1, #{off_ttbr0}]
    msr     ttbr0_el1, x2
    isb
    tlbi    vmalle1
    dsb     nsh
    isb
    ldr     x2, [x1, #{off_sctlr}]
    msr     sctlr_el1, x2
    isb

    // sp = top of SECONDARY_STACKS[index].
    adrp    x1, {secondary_stacks}
    add     x1, x1, :lo12:{secondary_stacks}
    add     x2, x19, #1
    lsl     x2, x2, #{secondary_stack_shift}
    add     sp, x1, x2

    adrp    x1, guest_exception_vectors
    add     x1, x1, :lo12:guest_exception_vectors
    msr     vbar_el1, x1
    isb

    mov     x0, x19
    bl      {secondary_main}
    udf     #0
    "#,
    cpacr_fpen = const CPACR_EL1::FPEN::TrapNothing.value,
    boot_stack = sym BOOT_STACK,
    boot_stack_size = const BOOT_STACK_SIZE,
    kernel_main = sym crate::kernel_main,
    mmu_state = sym SECONDARY_MMU_STATE,
    off_mair = const offset_of!(SecondaryMmuState, mair),
    off_tcr = const offset_of!(SecondaryMmuState, tcr),
    off_ttbr0 = const offset_of!(SecondaryMmuState, ttbr0),
    off_sctlr = const offset_of!(SecondaryMmuState, sctlr),
    secondary_stacks = sym SECONDARY_STACKS,
    secondary_stack_shift = const SECONDARY_STACK_SIZE.trailing_zeros(),
    secondary_main = sym crate::smp::secondary_main,
);

unsafe extern "C" {
    /// The PSCI `CPU_ON` entry point of secondary CPUs (defined above).
    fn secondary_entry();
    static __image_start: u8;
    static __text_end: u8;
    static __rodata_end: u8;
    static __image_end: u8;
}

/// Guest-physical address of [`secondary_entry`], for `CPU_ON`.
pub fn secondary_entry_point() -> PhysAddr {
    PhysAddr(secondary_entry as *const () as usize as u64)
}

/// Where the kernel image lies in guest-physical memory.
#[derive(Copy, Clone, Debug)]
pub struct ImageLayout {
    /// Code: `[__image_start, __text_end)`.
    pub text: PhysRange,
    /// Read-only data: `[__text_end, __rodata_end)`.
    pub rodata: PhysRange,
    /// Everything the image owns: code, data, BSS (heap and stacks).
    pub whole: PhysRange,
}

/// The image layout, from the linker script's symbols.
pub fn image_layout() -> ImageLayout {
    // Only the addresses of the linker symbols are used, never their
    // contents.
    let start = PhysAddr::from_ptr(&raw const __image_start);
    let text_end = PhysAddr::from_ptr(&raw const __text_end);
    let rodata_end = PhysAddr::from_ptr(&raw const __rodata_end);
    let end = PhysAddr::from_ptr(&raw const __image_end);
    ImageLayout {
        text: PhysRange {
            start,
            end: text_end,
        },
        rodata: PhysRange {
            start: text_end,
            end: rodata_end,
        },
        whole: PhysRange { start, end },
    }
}
