//! The EL2 hypervisor for QEMU `virt` (`virtualization=on`).
//!
//! Boot order on the boot CPU: vectors, DTB, console, heap, bootargs, frame
//! allocator, EL2 MMU, secondary CPUs, boot report; then the VM if a guest
//! image was named on the command line, else a clean power-off.
//! See docs/ARCHITECTURE.md.

#![no_std]
#![no_main]

extern crate alloc;

mod boot;
mod console;
mod cpu;
mod exceptions;
mod memory;
mod platform;
mod power;
mod smp;
mod time;
mod vm;

use core::fmt::Write as _;
use hyp_core::bootargs::{BootConfig, FaultInjection};
use log::{info, warn};
use platform::Platform;
use power::{fatal, EXIT_BOOT_ERROR};

/// Milliseconds the boot CPU waits for secondaries to report in.
const SMP_TIMEOUT_MS: u64 = 5_000;
/// Frames the hypervisor wants free after boot before it accepts a config.
const MIN_FREE_FRAMES: u64 = 1024;

/// Rust entry of the boot CPU (from `boot.S`), MMU off, BSS zeroed.
pub extern "C" fn primary_main(dtb_arg: u64) -> ! {
    boot::set_cpu_index(0);
    exceptions::install_vectors();

    let dtb = if dtb_arg == 0 {
        platform::VIRT_DTB_ADDR
    } else {
        dtb_arg
    };
    memory::init_heap();
    // SAFETY: on `virt` the DTB is at the start of RAM (or where x0 says);
    // RAM is readable with the MMU off.
    let platform = match unsafe { Platform::from_dtb(dtb) } {
        Ok(p) => p,
        Err(e) => fatal(EXIT_BOOT_ERROR, format_args!("hyp: error: {e}")),
    };
    power::set_conduit(platform.psci);
    // SAFETY: the DTB says a PL011 is at this address; it is identity mapped
    // as device memory once the MMU is on, and accessible before.
    unsafe { console::use_pl011(platform.uart.start) };

    let (config, problems) = BootConfig::parse(&platform.bootargs);
    console::init_log(config.log_level);
    for p in &problems {
        warn!("{p}");
    }

    let features = cpu::CpuFeatures::read();
    let modules: alloc::vec::Vec<_> = config.guest_image.into_iter().collect();
    let free_frames = memory::init_frames(&platform, &modules);
    if free_frames < MIN_FREE_FRAMES {
        fatal(
            EXIT_BOOT_ERROR,
            format_args!(
                "hyp: error: RAM too small: {free_frames} free frames after reserving the image, DTB and modules (need at least {MIN_FREE_FRAMES})"
            ),
        );
    }
    if let Err(e) = memory::init_mmu(&platform, features.parange) {
        fatal(EXIT_BOOT_ERROR, format_args!("hyp: error: {e}"));
    }
    memory::publish_mmu_params();
    info!("EL2 MMU on, {} MiB heap", memory::HEAP_SIZE >> 20);

    let cpus = smp::start_secondaries(&platform, SMP_TIMEOUT_MS);
    let (free, _) = memory::frame_counts();
    println!("{}", boot_report(&platform, &features, cpus, free));

    match config.fault {
        Some(FaultInjection::El2DataAbort) => trigger_el2_fault(),
        Some(FaultInjection::Panic) => {
            panic!("fault injection requested by bootargs (fault=panic)")
        }
        // Done by the VM once stage 2 exists.
        Some(FaultInjection::S2Alias) | None => {}
    }

    vm::run_primary(&platform, &config, &features)
}

/// The stable one-line boot report that scripts parse.
fn boot_report(
    platform: &Platform,
    features: &cpu::CpuFeatures,
    cpus: usize,
    free_frames: u64,
) -> alloc::string::String {
    let mut s = alloc::string::String::new();
    let _ = write!(s, "hyp: boot el={} cpus={} ram=", features.el, cpus);
    for (i, r) in platform.ram.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        let _ = write!(s, "{sep}{:#x}+{:#x}", r.start.as_u64(), r.size);
    }
    let _ = write!(
        s,
        " uart={:#x} gic={:#x} hafdbs={} pa_bits={} ipa_bits={} free_frames={}",
        platform.uart.start.as_u64(),
        platform.gic.start.as_u64(),
        features.hafdbs,
        features.pa_bits,
        features.ipa_bits(),
        free_frames
    );
    s
}

/// Test-only (`fault=el2`): a load from an address the EL2 map leaves
/// unmapped, which must produce the fatal exception report.
#[inline(never)]
#[no_mangle]
pub extern "C" fn trigger_el2_fault() {
    const UNMAPPED: u64 = 0x7f_ffff_f000;
    warn!("fault injection: reading {UNMAPPED:#x} at EL2");
    // SAFETY: deliberately invalid: the access faults and the exception
    // handler stops the machine; the value is never used.
    let v = unsafe { core::ptr::read_volatile(UNMAPPED as *const u64) };
    warn!("fault injection: read {v:#x} without a fault");
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    let (file, line) = info
        .location()
        .map(|l| (l.file(), l.line()))
        .unwrap_or(("?", 0));
    fatal(
        power::EXIT_PANIC,
        format_args!(
            "hyp: PANIC on cpu{} at {file}:{line}: {}",
            boot::cpu_index(),
            info.message()
        ),
    )
}
