// EL2 entry points: the boot CPU (`_start`) and the secondaries started
// through PSCI CPU_ON (`_secondary_start`). Both run with the MMU off.

.equ CPTR_EL2_RES1, 0x33ff      // RES1 bits; TFP (bit 10) clear: FP/SIMD not trapped

.section .text.boot, "ax"
.global _start
_start:
    // x0: DTB address (0 for an ELF boot on QEMU virt). Keep it in x19.
    mov     x19, x0
    mov     x0, #CPTR_EL2_RES1
    msr     cptr_el2, x0
    isb
    // Stack of CPU 0: top of the first per-CPU stack.
    adrp    x0, {stacks}
    add     x0, x0, :lo12:{stacks}
    mov     x1, #{stack_size}
    add     sp, x0, x1
    // Zero BSS (the stacks are in it, but nothing is on the stack yet).
    adrp    x0, __bss_start
    add     x0, x0, :lo12:__bss_start
    adrp    x1, __bss_end
    add     x1, x1, :lo12:__bss_end
1:  cmp     x0, x1
    b.hs    2f
    stp     xzr, xzr, [x0], #16
    b       1b
2:  mov     x0, x19
    mov     x29, xzr            // end of the frame chain for debuggers
    mov     x30, xzr
    bl      {primary_main}
    b       {halt}

.global _secondary_start
_secondary_start:
    // x0: CPU index (the CPU_ON context id), checked by the caller.
    mov     x1, #CPTR_EL2_RES1
    msr     cptr_el2, x1
    isb
    adrp    x1, {stacks}
    add     x1, x1, :lo12:{stacks}
    mov     x2, #{stack_size}
    madd    x1, x0, x2, x1
    add     sp, x1, x2
    mov     x29, xzr
    mov     x30, xzr
    bl      {secondary_main}
    b       {halt}
