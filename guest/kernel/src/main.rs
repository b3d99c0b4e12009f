//! The guest kernel: an EL1 `no_std` kernel that runs under our hypervisor
//! (or directly on QEMU `virt`, which boots it the same way).
//!
//! Boot (`boot.rs`) → heap → DTB (`platform.rs`) → console and command line
//! → frame allocator → stage-1 MMU (`mmu.rs`) → secondary vCPUs
//! (`smp.rs`) → demo (`demo.rs`) or the on-target tests (`selftest.rs`,
//! with the all-vCPU memory stress in `stress.rs`).
//!
//! Built for `aarch64-unknown-none`. On the host only the portable parts
//! are compiled (the command-line parser and its unit tests, run with
//! `cargo test -p guest`), plus a tiny `main` that explains a command line.

#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]

extern crate alloc;

mod cmdline;

#[cfg(target_os = "none")]
mod abi_tests;
#[cfg(target_os = "none")]
mod addr;
#[cfg(target_os = "none")]
mod boot;
#[cfg(target_os = "none")]
mod console;
#[cfg(target_os = "none")]
mod demo;
#[cfg(target_os = "none")]
mod exceptions;
#[cfg(target_os = "none")]
mod frames;
#[cfg(target_os = "none")]
mod fuzz;
#[cfg(target_os = "none")]
mod heap;
#[cfg(target_os = "none")]
mod hostile;
#[cfg(target_os = "none")]
mod mmio;
#[cfg(target_os = "none")]
mod mmu;
#[cfg(target_os = "none")]
mod pageable;
#[cfg(target_os = "none")]
mod platform;
#[cfg(target_os = "none")]
mod power;
#[cfg(target_os = "none")]
mod reclaim_run;
#[cfg(target_os = "none")]
mod selftest;
#[cfg(target_os = "none")]
mod smccc_client;
#[cfg(target_os = "none")]
mod smp;
#[cfg(target_os = "none")]
mod stress;
#[cfg(target_os = "none")]
mod timer;

#[cfg(target_os = "none")]
pub use kernel::{kernel_main, System};

/// The boot CPU's path from `_start` to the chosen mode.
#[cfg(target_os = "none")]
mod kernel {
    use alloc::vec::Vec;
    use core::fmt;

    use hyp_abi::layout;

    use crate::addr::{PhysAddr, PhysRange, PAGE_SIZE};
    use crate::boot::{self, ImageLayout};
    use crate::cmdline::{self, Cmdline, Mode, Verbosity};
    use crate::platform::{self, Platform};
    use crate::power::{self, ExitCode};
    use crate::smp::{self, BringUp};
    use crate::{console, demo, frames, fuzz, heap, hostile, mmu, pageable, reclaim_run, selftest};

    /// What the boot found out, handed to the demo and the tests.
    /// Arena bytes whose bookkeeping fits the static heap.
    const ARENA_IN_STATIC_HEAP: u64 = 32 << 20;
    /// Heap added per arena page beyond that.
    const HEAP_BYTES_PER_ARENA_PAGE: usize = 96;

    #[derive(Debug)]
    pub struct System {
        /// The machine.
        pub platform: Platform,
        /// The command line.
        pub cmdline: Cmdline,
        /// The secondary CPUs' bring-up.
        pub bring_up: BringUp,
        /// Where the kernel lies.
        pub image: ImageLayout,
    }

    /// The image is not where the boot contract puts it.
    #[derive(Copy, Clone, Debug)]
    enum ImageError {
        /// Linked (and so running) elsewhere than `IMAGE_IPA`.
        WrongAddress { linked: PhysAddr },
        /// Not inside the RAM bank.
        OutsideRam { image: PhysRange, ram: PhysRange },
        /// The DTB overlaps the image (including its BSS).
        DtbOverlap { image: PhysRange, dtb: PhysRange },
    }

    impl fmt::Display for ImageError {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match self {
                Self::WrongAddress { linked } => write!(
                    f,
                    "image linked at {linked}, the boot contract loads it at {:#x}",
                    layout::IMAGE_IPA
                ),
                Self::OutsideRam { image, ram } => {
                    write!(f, "image {image} does not fit in RAM {ram}")
                }
                Self::DtbOverlap { image, dtb } => write!(f, "DTB {dtb} overlaps image {image}"),
            }
        }
    }

    fn check_image(image: &ImageLayout, platform: &Platform) -> Result<(), ImageError> {
        if image.whole.start != PhysAddr(layout::IMAGE_IPA) {
            return Err(ImageError::WrongAddress {
                linked: image.whole.start,
            });
        }
        if !platform.ram.covers(&image.whole) {
            return Err(ImageError::OutsideRam {
                image: image.whole,
                ram: platform.ram,
            });
        }
        if platform.dtb.overlaps(&image.whole) {
            return Err(ImageError::DtbOverlap {
                image: image.whole,
                dtb: platform.dtb,
            });
        }
        Ok(())
    }

    /// The pageable arena of `mode=reclaim`: `pages=` pages at the top of
    /// RAM, 2 MiB aligned; `None` in other modes.
    fn pageable_arena(cmdline: &cmdline::Cmdline, platform: &Platform) -> Option<PhysRange> {
        if cmdline.mode != Mode::Reclaim {
            return None;
        }
        let bytes = (u64::from(cmdline.reclaim.pages) * PAGE_SIZE).next_multiple_of(2 << 20);
        let end = platform.ram.end.align_down(2 << 20);
        let start = PhysAddr(end.as_u64().checked_sub(bytes)?);
        (start >= platform.ram.start).then_some(PhysRange { start, end })
    }

    /// The RAM after the image, minus the DTB and `/memreserve/` entries.
    fn free_ram(image: &ImageLayout, platform: &Platform) -> Vec<PhysRange> {
        let mut holes: Vec<PhysRange> = platform.reserved.clone();
        holes.push(platform.dtb);
        holes.sort_by_key(|r| r.start);
        let mut free = Vec::new();
        let mut cursor = image.whole.end;
        for hole in holes {
            if hole.end <= cursor {
                continue;
            }
            if hole.start > cursor {
                free.push(PhysRange {
                    start: cursor,
                    end: hole.start.min(platform.ram.end),
                });
            }
            cursor = hole.end;
        }
        if cursor < platform.ram.end {
            free.push(PhysRange {
                start: cursor,
                end: platform.ram.end,
            });
        }
        free.retain(|r| r.start < r.end);
        free
    }

    /// Rust entry of the boot CPU, called by `_start` with `x0` as the
    /// hypervisor (or QEMU) left it. Runs with the MMU off until
    /// [`mmu::init`].
    pub extern "C" fn kernel_main(x0: u64) -> ! {
        // QEMU leaves x0 = 0 when it boots an ELF; the DTB is then at the
        // start of RAM, where the hypervisor puts it too.
        let dtb = PhysAddr(if x0 == 0 { layout::DTB_IPA } else { x0 });
        // SAFETY: first thing on the boot CPU, before any allocation.
        unsafe { heap::init() };
        console::init_logger(log::LevelFilter::Info);

        let image = boot::image_layout();
        // SAFETY: the MMU is off, so the DTB is readable wherever it is,
        // and nothing writes it; it stays identity-mapped as RAM later.
        let platform = match unsafe { platform::parse(dtb, image.whole.start) } {
            Ok(platform) => platform,
            Err(error) => {
                // Without a DTB the only UART we know is the ABI's.
                console::init(PhysAddr(layout::UART_IPA));
                power::fatal(&error)
            }
        };
        console::init(platform.uart.start);

        let cmdline = cmdline::parse(&platform.bootargs).unwrap_or_else(|e| power::fatal(&e));
        console::init_logger(match cmdline.verbosity {
            Verbosity::Info => log::LevelFilter::Info,
            Verbosity::Debug => log::LevelFilter::Debug,
            Verbosity::Trace => log::LevelFilter::Trace,
        });
        for key in &cmdline.unknown {
            log::warn!("unknown command-line key `{key}` ignored");
        }
        // Separate lines: the hypervisor's console wraps at 200 bytes.
        log::debug!("bootargs `{}`", platform.bootargs);
        log::debug!(
            "dtb {} ram {} uart {} image {}",
            platform.dtb,
            platform.ram,
            platform.uart,
            image.whole
        );
        log::debug!("cpus {:?}", platform.cpus);

        if let Err(error) = check_image(&image, &platform) {
            power::fatal(&error);
        }
        // The pageable arena (reclaim mode) is the top of RAM, kept out of
        // the frame allocator and mapped with pages.
        let arena = pageable_arena(&cmdline, &platform);
        for mut range in free_ram(&image, &platform) {
            if let Some(a) = arena {
                range.end = range.end.min(a.start);
                if range.start >= range.end {
                    continue;
                }
            }
            log::debug!("free frames {range}");
            frames::add(range);
        }
        // The static heap holds the page tables and bookkeeping of a few
        // thousand arena pages; a large arena (an overcommitted guest)
        // gets 96 bytes per page more (stage-1 tables and reclaim state).
        if let Some(a) = arena.filter(|a| a.size() > ARENA_IN_STATIC_HEAP) {
            let bytes = (a.size() / PAGE_SIZE) as usize * HEAP_BYTES_PER_ARENA_PAGE;
            if let Err(error) = heap::grow(bytes) {
                power::fatal(&alloc::format!(
                    "cannot grow the heap by {bytes} bytes: {error}"
                ));
            }
        }
        if let Err(error) = mmu::init(&platform, &image, arena) {
            power::fatal(&error);
        }
        if let Some(a) = arena {
            pageable::init(a);
        }

        let bring_up = smp::start_secondaries(&platform.cpus);
        for error in &bring_up.errors {
            log::warn!("{error}");
        }
        if bring_up.up < bring_up.listed {
            log::warn!("{} of {} vCPUs came up", bring_up.up, bring_up.listed);
        }
        log::debug!("heap in use: {} bytes", heap::used());

        let system = System {
            platform,
            cmdline,
            bring_up,
            image,
        };
        match system.cmdline.mode {
            Mode::Demo => demo::run(&system),
            Mode::Test => selftest::run(&system),
            Mode::Reclaim => reclaim_run::run(&system),
            Mode::Hostile => hostile::run(&system),
            Mode::Fuzz => fuzz::run(&system),
        }
    }

    /// Set by the first panic: a panic while reporting one ends the machine
    /// without printing.
    static PANICKING: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

    #[panic_handler]
    fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
        if PANICKING.swap(true, core::sync::atomic::Ordering::SeqCst) {
            power::exit_quietly(ExitCode::Panic);
        }
        log::error!("panic on cpu {}: {info}", smp::Mpidr::current());
        power::exit(ExitCode::Panic)
    }
}

/// On the host the kernel cannot run; explain a command line instead
/// (`cargo run -p guest -- mode=test touch=64M`).
#[cfg(not(target_os = "none"))]
fn main() {
    let line = std::env::args().skip(1).collect::<Vec<_>>().join(" ");
    match cmdline::parse(&line) {
        Ok(parsed) => {
            println!("{parsed:#?}");
            println!("(the kernel itself only runs on aarch64-unknown-none)");
        }
        Err(error) => {
            eprintln!("bad command line: {error}");
            std::process::exit(2);
        }
    }
}
