//! Demo mode (`mode=demo`, the default).
//!
//! Prints one line that summarises the boot, e.g.
//! `guest: hello from EL1 vcpus=4 mmu=on ram=0x40000000+0x40000000`,
//! touches `touch=` bytes of fresh RAM (one word per 4 KiB page, so the
//! hypervisor maps that many frames), prints `guest: touched N pages`,
//! optionally reads an unbacked IPA (`fault=outside`) and reports the
//! abort, then powers off.

use aarch64_cpu::registers::{CurrentEL, Readable};

use crate::addr::PAGE_SIZE;
use crate::cmdline::Fault;
use crate::exceptions;
use crate::frames::{self, FrameError, FrameRun};
use crate::mmio;
use crate::mmu::{self, UNBACKED_PROBE};
use crate::power;
use crate::timer;
use crate::System;
use alloc::vec::Vec;

/// Largest run the demo allocates at once: 2 MiB.
const MAX_RUN: usize = 512;

/// Runs the demo and powers off.
pub fn run(system: &System) -> ! {
    let ram = system.platform.ram;
    log::info!(
        "hello from EL{} vcpus={} mmu={} ram={:#x}+{:#x}",
        CurrentEL.read(CurrentEL::EL),
        system.bring_up.up,
        if mmu::is_enabled() { "on" } else { "off" },
        ram.start.as_u64(),
        ram.size()
    );

    let wanted = system.cmdline.touch_bytes.div_ceil(PAGE_SIZE) as usize;
    let start = timer::ticks();
    let (runs, error) = touch_fresh_pages(wanted);
    let first = timer::ticks() - start;
    let touched: usize = runs.iter().map(FrameRun::count).sum();
    if let Some(error) = error {
        log::warn!(
            "touch={}: stopped after {touched} of {wanted} pages: {error}",
            system.cmdline.touch_bytes
        );
    }
    log::info!("touched {touched} pages");
    if touched > 0 {
        report_touch_cost(&runs, touched, first);
    }

    match system.cmdline.fault {
        Some(Fault::Outside) => fault_outside(system),
        Some(Fault::AbortLoop) => abort_loop(),
        None => {}
    }
    power::system_off()
}

/// Writes one word into every page of `run`, returns how many.
pub fn touch_run(run: &FrameRun, pattern: u64) -> usize {
    for i in 0..run.count() {
        let frame = run.frame(i);
        // SAFETY: the run was allocated to the caller, so nothing else uses
        // its frames; they are RAM, identity-mapped read-write, and the
        // frame address is page- (so u64-) aligned.
        unsafe { core::ptr::write_volatile(frame.as_ptr::<u64>(), pattern ^ frame.as_u64()) };
    }
    run.count()
}

/// Measurement: the first touch of fresh pages costs a stage-2 fault each
/// (two with software AF); touching them again costs none. Both passes run
/// here, so the ratio is measured in one run on one machine:
/// `guest: touch cost first=... second=... ratio=...`.
fn report_touch_cost(runs: &[FrameRun], touched: usize, first: u64) {
    let start = timer::ticks();
    for run in runs {
        touch_run(run, 0xa5a5_a5a5_0000_0000);
    }
    let second = (timer::ticks() - start).max(1);
    let ns = |ticks: u64| ticks * 1_000_000_000 / timer::frequency().max(1) / touched as u64;
    log::info!(
        "touch cost pages={touched} first_ns_per_page={} second_ns_per_page={} ratio={}.{:02}",
        ns(first),
        ns(second),
        first / second,
        first % second * 100 / second
    );
}

/// Allocates and touches `pages` fresh pages, in runs of at most
/// [`MAX_RUN`]; the frames stay allocated. Returns the runs touched and,
/// if it stopped early, why.
fn touch_fresh_pages(pages: usize) -> (Vec<FrameRun>, Option<FrameError>) {
    let mut runs = Vec::new();
    let mut touched = 0;
    while touched < pages {
        let mut chunk = (pages - touched).min(MAX_RUN);
        // Whole buddy blocks only: a run of n frames takes n rounded up to
        // a power of two.
        chunk = 1 << chunk.ilog2();
        let run = loop {
            match frames::alloc(chunk) {
                Ok(run) => break run,
                Err(_) if chunk > 1 => chunk /= 2,
                Err(error) => return (runs, Some(error)),
            }
        };
        touched += touch_run(&run, 0x5a5a_5a5a_0000_0000);
        runs.push(run);
    }
    (runs, None)
}

/// `fault=outside`: read [`UNBACKED_PROBE`] and report what happened.
fn fault_outside(system: &System) {
    let ipa = UNBACKED_PROBE;
    if !system.platform.is_unclaimed(ipa) {
        log::warn!("fault=outside: {ipa} is claimed by a DTB node; reading it anyway");
    }
    // SAFETY: the probe page is mapped as device memory; reading it either
    // returns a value or takes the abort armed here.
    let (value, abort) = exceptions::with_expected_abort(ipa, || unsafe { mmio::read32(ipa) });
    match abort {
        Some(abort) => log::info!(
            "fault=outside: {:#x} -> synchronous external abort ({abort})",
            ipa.as_u64()
        ),
        None => log::warn!(
            "fault=outside: read of {:#x} returned {value:#x} without an abort",
            ipa.as_u64()
        ),
    }
}

/// `fault=abortloop`: a guest that cannot handle its aborts. With the MMU
/// off (identity, so execution continues) it points its vectors at
/// [`UNBACKED_PROBE`] and reads there: the hypervisor injects an abort,
/// whose vector fetch aborts again, forever. The hypervisor must detect
/// the loop and stop the VM (exit status 105); returning is a failure.
fn abort_loop() {
    let ipa = UNBACKED_PROBE.as_u64();
    log::info!("fault=abortloop: vectors at {ipa:#x}, then a read there");
    // SAFETY: deliberately breaks this vCPU (the test's purpose): the MMU
    // goes off (the kernel runs identity mapped, so the next instruction
    // is the same), the vectors move outside RAM and the read aborts. No
    // Rust state is relied on afterwards.
    unsafe {
        core::arch::asm!(
            "mrs {t}, sctlr_el1",
            "bic {t}, {t}, #1",
            "msr sctlr_el1, {t}",
            "isb",
            "msr vbar_el1, {v}",
            "isb",
            "msr daifclr, #4",
            "ldr {t}, [{v}]",
            t = out(reg) _,
            v = in(reg) ipa,
            options(nostack),
        );
    }
    log::error!("fault=abortloop: the abort loop returned");
    power::exit(power::ExitCode::Fatal)
}
