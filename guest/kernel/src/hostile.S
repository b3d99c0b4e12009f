// Assembly of the hostile-guest suite (hostile.rs includes this file with
// `global_asm!`; the names in braces are its operands).
//
// Probes: the instruction under test is the first instruction of each
// probe, so the suite knows the pc of the exception it expects (a probe
// window in exceptions.rs absorbs an exception taken exactly there and
// skips the instruction). Loads get the address in x0 and a sentinel in
// x1 and return the loaded value, or the sentinel when the load was
// skipped; stores get the address in x0 and the value in x1.

    .pushsection .text.hostile, "ax"
    .balign 4

    .global hostile_ldr64
hostile_ldr64:
    ldr     x1, [x0]
    mov     x0, x1
    ret

    .global hostile_str64
hostile_str64:
    str     x1, [x0]
    ret

    .global hostile_ldrb
hostile_ldrb:
    ldrb    w1, [x0]
    mov     x0, x1
    ret

    .global hostile_strh
hostile_strh:
    strh    w1, [x0]
    ret

    .global hostile_ldr32
hostile_ldr32:
    ldr     w1, [x0]
    mov     x0, x1
    ret

    // Pairs have no instruction syndrome (ESR_EL2.ISV = 0).
    .global hostile_ldp
hostile_ldp:
    ldp     x1, x2, [x0]
    mov     x0, x1
    ret

    .global hostile_stp
hostile_stp:
    stp     x1, x1, [x0]
    ret

    // Writeback forms (no instruction syndrome either): they return the
    // base register, which must be unchanged when the access is skipped.
    .global hostile_ldr_post
hostile_ldr_post:
    ldr     x1, [x0], #16
    ret

    .global hostile_str_pre
hostile_str_pre:
    str     x1, [x0, #-16]!
    ret

    .global hostile_ldxr
hostile_ldxr:
    ldxr    x1, [x0]
    mov     x0, x1
    ret

    .global hostile_ldar
hostile_ldar:
    ldar    x1, [x0]
    mov     x0, x1
    ret

    .global hostile_stlr
hostile_stlr:
    stlr    x1, [x0]
    ret

    .global hostile_ldr_q
hostile_ldr_q:
    ldr     q0, [x0]
    mov     x0, x1
    ret

    .global hostile_dc_zva
hostile_dc_zva:
    dc      zva, x0
    ret

    // SMC with x0 = function ID, x1..x3 = arguments; returns x0.
    .global hostile_smc
hostile_smc:
    smc     #0
    ret

    .global hostile_smc_imm
hostile_smc_imm:
    smc     #0x1234
    ret

    // Calls the code at x0 with x0 = x1 (the sentinel) and returns its x0.
    // When fetching the target aborts, the probe window resumes at the
    // return address in x30, with x0 still the sentinel.
    .global hostile_exec
hostile_exec:
    stp     x29, x30, [sp, #-16]!
    mov     x29, sp
    mov     x2, x0
    mov     x0, x1
    blr     x2
    ldp     x29, x30, [sp], #16
    ret

    // Position-independent code the suite copies into pages and executes.
    .global hostile_exec_payload
hostile_exec_payload:
    movz    x0, #{payload_value}
    ret
    .global hostile_exec_payload_end
hostile_exec_payload_end:

    // An exception return with SPSR_EL1 = x0 to hostile_eret_landing. From
    // EL1 to a higher EL (or a reserved mode) it is an illegal exception
    // return: the PE stays at EL1 with PSTATE.IL set, and the landing
    // instruction takes an Illegal Execution state exception.
    .global hostile_eret
hostile_eret:
    adr     x1, hostile_eret_landing
    msr     elr_el1, x1
    msr     spsr_el1, x0
    eret
    .global hostile_eret_landing
hostile_eret_landing:
    nop
    ret

    // PSCI CPU_ON entry point of the CPU_ON race, x0 = context id = the
    // address of the round's release word: waits until it is non-zero
    // (read with the MMU off, so uncached: the racers clean it to the
    // point of coherency), then powers the vCPU off again.
    .global hostile_race_entry
hostile_race_entry:
    ldr     x1, [x0]
    cbz     x1, hostile_race_entry
    .global hostile_off_entry
hostile_off_entry:
    movz    x0, #{cpu_off_lo}
    movk    x0, #{cpu_off_hi}, lsl #16
    hvc     #0
1:  wfi
    b       1b

    // PSCI CPU_ON entry point that parks the vCPU for good (MMU off, WFI
    // loop): a vCPU wrongly started there stays ON, which the SMC test sees.
    .global hostile_park_entry
hostile_park_entry:
    wfi
    b       hostile_park_entry

// Self-harm (see `self_harm` in hostile.rs). x0 = the Sacrifice block: the
// callee-saved registers x19..x30 are saved at offsets 0..96.
    .global hostile_sacrifice
hostile_sacrifice:
    stp     x19, x20, [x0, #0]
    stp     x21, x22, [x0, #16]
    stp     x23, x24, [x0, #32]
    stp     x25, x26, [x0, #48]
    stp     x27, x28, [x0, #64]
    stp     x29, x30, [x0, #80]
    mov     x1, sp
    str     x1, [x0, #{off_sp}]
    mrs     x1, vbar_el1
    str     x1, [x0, #{off_vbar}]
    mov     x19, x0
    // From here on: the private vectors and the private stack.
    ldr     x1, [x19, #{off_vectors_va}]
    msr     vbar_el1, x1
    ldr     x1, [x19, #{off_stack_ipa}]
    add     sp, x1, #4096
    isb
    ldr     x2, [x19, #{off_marker}]
    stp     x19, x2, [sp, #-16]!
    // Release the stack page under our feet, and read the marker back.
    ldr     x0, [x19, #{off_release_fid}]
    ldr     x1, [x19, #{off_stack_ipa}]
    mov     x2, #1
    hvc     #0
    str     x0, [x19, #{off_stack_release}]
    ldr     x2, [sp, #8]
    str     x2, [x19, #{off_stack_after}]
    // Release the page of the vectors in use.
    ldr     x0, [x19, #{off_release_fid}]
    ldr     x1, [x19, #{off_vectors_ipa}]
    mov     x2, #1
    hvc     #0
    str     x0, [x19, #{off_vectors_release}]
    add     x1, x19, #{off_stage}
    mov     x2, #1
    stlr    x2, [x1]
    // Take an exception: with the vectors page gone, the vector is zeros
    // (UDF), which raises the same exception at the vector, forever.
    .global hostile_sacrifice_udf
hostile_sacrifice_udf:
    udf     #0
    b       hostile_sacrifice_udf

    // Reached from a private vector (x9 clobbered, x19 = the block): the
    // vector page still had (or has again, after the rescue) its content.
    // Records the exception, restores the kernel's vectors, stack and
    // callee-saved registers, and returns from hostile_sacrifice.
    .global hostile_sacrifice_resume
hostile_sacrifice_resume:
    mrs     x1, esr_el1
    str     x1, [x19, #{off_esr}]
    mrs     x1, elr_el1
    str     x1, [x19, #{off_elr}]
    ldr     x1, [x19, #{off_vbar}]
    msr     vbar_el1, x1
    ldr     x1, [x19, #{off_sp}]
    mov     sp, x1
    isb
    mov     x0, x19
    ldp     x19, x20, [x0, #0]
    ldp     x21, x22, [x0, #16]
    ldp     x23, x24, [x0, #32]
    ldp     x25, x26, [x0, #48]
    ldp     x27, x28, [x0, #64]
    ldp     x29, x30, [x0, #80]
    ret

    // The sacrificial vCPU's vectors, copied into a page of its own: every
    // entry jumps (position-independently) to hostile_sacrifice_resume.
    .balign 2048
    .global hostile_private_vectors
hostile_private_vectors:
    .rept 16
    ldr     x9, 1f
    br      x9
1:  .quad   hostile_sacrifice_resume
    .balign 128
    .endr
    .global hostile_private_vectors_end
hostile_private_vectors_end:

    .popsection
