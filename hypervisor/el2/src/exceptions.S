// EL2 exception vectors and the guest entry/exit path.
//
// Exceptions taken from EL2 itself save a full TrapFrame on the current
// stack and call `el2_exception` (fatal: the hypervisor never expects one).
//
// Exceptions taken from a lower EL are guest exits. `vcpu_run` saved the
// hypervisor's callee-saved registers and the GuestContext pointer on the
// EL2 stack before `eret`; the exit path stores the guest's registers into
// that context, restores the hypervisor's, and returns from `vcpu_run`
// with the exit kind in x0.

.equ FRAME_SIZE, {frame_size}
.equ HOST_SAVE, 112             // x19..x30 (96 bytes), ctx pointer, padding

// x2..x29 to [base + 16 ..]: both TrapFrame and GuestContext start with
// x0..x30 at offset 0.
.macro STORE_X2_X29 base
    stp     x2, x3, [\base, #16]
    stp     x4, x5, [\base, #32]
    stp     x6, x7, [\base, #48]
    stp     x8, x9, [\base, #64]
    stp     x10, x11, [\base, #80]
    stp     x12, x13, [\base, #96]
    stp     x14, x15, [\base, #112]
    stp     x16, x17, [\base, #128]
    stp     x18, x19, [\base, #144]
    stp     x20, x21, [\base, #160]
    stp     x22, x23, [\base, #176]
    stp     x24, x25, [\base, #192]
    stp     x26, x27, [\base, #208]
    stp     x28, x29, [\base, #224]
.endm

.macro CURRENT_EL_ENTRY kind
    .balign 0x80
    sub     sp, sp, #FRAME_SIZE
    stp     x0, x1, [sp, #0]
    mov     x0, #\kind
    b       el2_trap_common
.endm

.macro LOWER_EL_ENTRY kind
    .balign 0x80
    stp     x0, x1, [sp, #-16]!
    mov     x0, #\kind
    b       guest_exit_common
.endm

.section .text.vectors, "ax"
.balign 0x800
.global el2_vectors
el2_vectors:
    CURRENT_EL_ENTRY 0      // current EL, SP_EL0: sync
    CURRENT_EL_ENTRY 1      //   irq
    CURRENT_EL_ENTRY 2      //   fiq
    CURRENT_EL_ENTRY 3      //   serror
    CURRENT_EL_ENTRY 4      // current EL, SP_ELx: sync
    CURRENT_EL_ENTRY 5      //   irq
    CURRENT_EL_ENTRY 6      //   fiq
    CURRENT_EL_ENTRY 7      //   serror
    LOWER_EL_ENTRY 0        // lower EL, AArch64: sync
    LOWER_EL_ENTRY 1        //   irq
    LOWER_EL_ENTRY 2        //   fiq
    LOWER_EL_ENTRY 3        //   serror
    LOWER_EL_ENTRY 4        // lower EL, AArch32 (never enabled): sync
    LOWER_EL_ENTRY 5        //   irq
    LOWER_EL_ENTRY 6        //   fiq
    LOWER_EL_ENTRY 7        //   serror

el2_trap_common:
    // x0 = kind; the frame holds x0/x1 already.
    STORE_X2_X29 sp
    mrs     x1, elr_el2
    stp     x30, x1, [sp, #240]
    mrs     x1, spsr_el2
    add     x2, sp, #FRAME_SIZE
    stp     x1, x2, [sp, #256]
    mov     x1, x0
    mov     x0, sp
    bl      {el2_exception}
    // el2_exception never returns.
    b       .

// fn vcpu_run(ctx: *mut GuestContext) -> u64
.section .text, "ax"
.global vcpu_run
vcpu_run:
    sub     sp, sp, #HOST_SAVE
    stp     x19, x20, [sp, #0]
    stp     x21, x22, [sp, #16]
    stp     x23, x24, [sp, #32]
    stp     x25, x26, [sp, #48]
    stp     x27, x28, [sp, #64]
    stp     x29, x30, [sp, #80]
    str     x0, [sp, #96]
    // Guest FP/SIMD state.
    add     x1, x0, #{ctx_fp}
    ldp     q0, q1, [x1, #0]
    ldp     q2, q3, [x1, #32]
    ldp     q4, q5, [x1, #64]
    ldp     q6, q7, [x1, #96]
    ldp     q8, q9, [x1, #128]
    ldp     q10, q11, [x1, #160]
    ldp     q12, q13, [x1, #192]
    ldp     q14, q15, [x1, #224]
    ldp     q16, q17, [x1, #256]
    ldp     q18, q19, [x1, #288]
    ldp     q20, q21, [x1, #320]
    ldp     q22, q23, [x1, #352]
    ldp     q24, q25, [x1, #384]
    ldp     q26, q27, [x1, #416]
    ldp     q28, q29, [x1, #448]
    ldp     q30, q31, [x1, #480]
    add     x1, x1, #512
    ldp     x2, x3, [x1]
    msr     fpcr, x2
    msr     fpsr, x3
    // Return state.
    ldp     x1, x2, [x0, #{ctx_elr}]
    msr     elr_el2, x1
    msr     spsr_el2, x2
    // General registers, x0/x1 last.
    ldp     x2, x3, [x0, #16]
    ldp     x4, x5, [x0, #32]
    ldp     x6, x7, [x0, #48]
    ldp     x8, x9, [x0, #64]
    ldp     x10, x11, [x0, #80]
    ldp     x12, x13, [x0, #96]
    ldp     x14, x15, [x0, #112]
    ldp     x16, x17, [x0, #128]
    ldp     x18, x19, [x0, #144]
    ldp     x20, x21, [x0, #160]
    ldp     x22, x23, [x0, #176]
    ldp     x24, x25, [x0, #192]
    ldp     x26, x27, [x0, #208]
    ldp     x28, x29, [x0, #224]
    ldr     x30, [x0, #240]
    ldp     x0, x1, [x0, #0]
    eret

guest_exit_common:
    // sp -> [guest x0, guest x1] then the HOST_SAVE block; x0 = kind.
    ldr     x1, [sp, #16 + 96]          // ctx
    STORE_X2_X29 x1
    str     x30, [x1, #240]
    ldp     x2, x3, [sp], #16           // guest x0, x1
    stp     x2, x3, [x1, #0]
    mrs     x2, elr_el2
    mrs     x3, spsr_el2
    stp     x2, x3, [x1, #{ctx_elr}]
    add     x2, x1, #{ctx_fp}
    stp     q0, q1, [x2, #0]
    stp     q2, q3, [x2, #32]
    stp     q4, q5, [x2, #64]
    stp     q6, q7, [x2, #96]
    stp     q8, q9, [x2, #128]
    stp     q10, q11, [x2, #160]
    stp     q12, q13, [x2, #192]
    stp     q14, q15, [x2, #224]
    stp     q16, q17, [x2, #256]
    stp     q18, q19, [x2, #288]
    stp     q20, q21, [x2, #320]
    stp     q22, q23, [x2, #352]
    stp     q24, q25, [x2, #384]
    stp     q26, q27, [x2, #416]
    stp     q28, q29, [x2, #448]
    stp     q30, q31, [x2, #480]
    mrs     x3, fpcr
    mrs     x4, fpsr
    add     x2, x2, #512
    stp     x3, x4, [x2]
    // Hypervisor registers back; return kind from vcpu_run.
    ldp     x19, x20, [sp, #0]
    ldp     x21, x22, [sp, #16]
    ldp     x23, x24, [sp, #32]
    ldp     x25, x26, [sp, #48]
    ldp     x27, x28, [sp, #64]
    ldp     x29, x30, [sp, #80]
    add     sp, sp, #HOST_SAVE
    ret
