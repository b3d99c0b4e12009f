//! What the machine looks like, from the DTB the hypervisor (or QEMU) gave.
//!
//! Everything board-specific comes from here: RAM, the UART, the CPUs, the
//! PSCI conduit and the command line. The `fdt` crate panics on some
//! malformed trees when asked for "required" nodes, so required nodes are
//! looked up with `find_node` first and reported as [`PlatformError`]s.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use fdt::node::FdtNode;
use fdt::Fdt;

use crate::addr::{PhysAddr, PhysRange};
use crate::smp::Mpidr;

/// The machine, as described by the DTB.
#[derive(Clone, Debug)]
pub struct Platform {
    /// Where the DTB itself lies.
    pub dtb: PhysRange,
    /// The RAM bank the kernel runs from.
    pub ram: PhysRange,
    /// The PL011 console.
    pub uart: PhysRange,
    /// CPUs in DTB order; a CPU's index in this list is its CPU number.
    pub cpus: Vec<Mpidr>,
    /// `/chosen/bootargs` (empty if absent).
    pub bootargs: String,
    /// `/memreserve/` entries.
    pub reserved: Vec<PhysRange>,
    /// Every address range some node's `reg` claims (RAM, devices).
    pub claimed: Vec<PhysRange>,
}

/// A DTB the kernel cannot boot from.
#[derive(Clone, Debug, PartialEq)]
pub enum PlatformError {
    /// The blob is not a valid FDT.
    Fdt {
        /// Where it was looked for.
        at: PhysAddr,
        /// What is wrong.
        error: fdt::FdtError,
    },
    /// A required node is missing.
    MissingNode(&'static str),
    /// A node lacks a property or has a malformed one.
    BadProperty {
        /// Node path.
        node: String,
        /// Property name.
        property: &'static str,
    },
    /// No `/memory` bank contains the kernel image.
    NoRamAt(PhysAddr),
    /// `/psci` `method` is not `hvc`, the only conduit the kernel uses.
    UnsupportedPsciMethod(String),
}

impl fmt::Display for PlatformError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fdt { at, error } => write!(f, "no valid DTB at {at}: {error}"),
            Self::MissingNode(path) => write!(f, "DTB: no {path} node"),
            Self::BadProperty { node, property } => {
                write!(f, "DTB: {node}: missing or malformed `{property}`")
            }
            Self::NoRamAt(addr) => write!(f, "DTB: no /memory bank contains {addr}"),
            Self::UnsupportedPsciMethod(m) => {
                write!(f, "DTB: /psci method `{m}` is not supported (only `hvc`)")
            }
        }
    }
}

fn bad(node: &FdtNode<'_, '_>, property: &'static str) -> PlatformError {
    PlatformError::BadProperty {
        node: node.name.to_string(),
        property,
    }
}

/// Whether a node is enabled (no `status`, or `okay`/`ok`).
fn is_enabled(node: &FdtNode<'_, '_>) -> bool {
    node.property("status")
        .and_then(|p| p.as_str())
        .is_none_or(|s| s == "okay" || s == "ok")
}

/// The `reg` ranges of a node that have a size.
fn reg_ranges<'a>(node: &FdtNode<'_, 'a>) -> impl Iterator<Item = PhysRange> + 'a {
    node.reg().into_iter().flatten().filter_map(|r| {
        let size = r.size? as u64;
        PhysRange::from_start_size(PhysAddr::from_ptr(r.starting_address), size)
    })
}

/// Parses the DTB at `dtb`; `image` is an address inside the kernel image,
/// used to pick the RAM bank.
///
/// # Safety
///
/// `dtb` must be readable (identity-mapped or MMU off) for the size its
/// header announces, and stay unchanged while the kernel runs.
pub unsafe fn parse(dtb: PhysAddr, image: PhysAddr) -> Result<Platform, PlatformError> {
    // SAFETY: the caller guarantees the blob is readable; `from_ptr` reads
    // the header and then at most `totalsize` bytes.
    let fdt = unsafe { Fdt::from_ptr(dtb.as_ptr::<u8>()) }
        .map_err(|error| PlatformError::Fdt { at: dtb, error })?;
    let dtb_range =
        PhysRange::from_start_size(dtb, fdt.total_size() as u64).ok_or(PlatformError::Fdt {
            at: dtb,
            error: fdt::FdtError::BufferTooSmall,
        })?;

    let ram = find_ram(&fdt, image)?;
    let uart = find_uart(&fdt)?;
    let cpus = find_cpus(&fdt)?;
    check_psci(&fdt)?;

    let bootargs = match fdt.find_node("/chosen") {
        Some(chosen) => chosen
            .property("bootargs")
            .and_then(|p| p.as_str())
            .unwrap_or("")
            .to_string(),
        None => String::new(),
    };

    let reserved = fdt
        .memory_reservations()
        .filter_map(|r| {
            PhysRange::from_start_size(PhysAddr::from_ptr(r.address()), r.size() as u64)
        })
        .collect();

    let claimed = fdt
        .all_nodes()
        .filter(|n| is_enabled(n))
        .flat_map(|n| reg_ranges(&n).collect::<Vec<_>>())
        .collect();

    Ok(Platform {
        dtb: dtb_range,
        ram,
        uart,
        cpus,
        bootargs,
        reserved,
        claimed,
    })
}

fn find_ram(fdt: &Fdt<'_>, image: PhysAddr) -> Result<PhysRange, PlatformError> {
    let mut any = false;
    for node in fdt.all_nodes() {
        let is_memory = node.name.split('@').next() == Some("memory")
            || node.property("device_type").and_then(|p| p.as_str()) == Some("memory");
        if !is_memory || !is_enabled(&node) {
            continue;
        }
        any = true;
        if let Some(bank) = reg_ranges(&node).find(|bank| bank.contains(image)) {
            return Ok(bank);
        }
    }
    Err(if any {
        PlatformError::NoRamAt(image)
    } else {
        PlatformError::MissingNode("/memory")
    })
}

fn find_uart(fdt: &Fdt<'_>) -> Result<PhysRange, PlatformError> {
    let node = fdt
        .all_nodes()
        .find(|n| {
            is_enabled(n)
                && n.compatible()
                    .is_some_and(|c| c.all().any(|s| s == "arm,pl011"))
        })
        .ok_or(PlatformError::MissingNode("arm,pl011 UART"))?;
    reg_ranges(&node).next().ok_or_else(|| bad(&node, "reg"))
}

fn find_cpus(fdt: &Fdt<'_>) -> Result<Vec<Mpidr>, PlatformError> {
    let cpus = fdt
        .find_node("/cpus")
        .ok_or(PlatformError::MissingNode("/cpus"))?;
    let mut list = Vec::new();
    for cpu in cpus.children() {
        if cpu.name.split('@').next() != Some("cpu") || !is_enabled(&cpu) {
            continue;
        }
        let reg = cpu
            .reg()
            .and_then(|mut r| r.next())
            .ok_or_else(|| bad(&cpu, "reg"))?;
        list.push(Mpidr::from_raw(reg.starting_address as usize as u64));
    }
    if list.is_empty() {
        return Err(PlatformError::MissingNode("/cpus/cpu@N"));
    }
    Ok(list)
}

fn check_psci(fdt: &Fdt<'_>) -> Result<(), PlatformError> {
    let psci = fdt
        .find_node("/psci")
        .ok_or(PlatformError::MissingNode("/psci"))?;
    let method = psci
        .property("method")
        .and_then(|p| p.as_str())
        .ok_or_else(|| bad(&psci, "method"))?;
    if method != "hvc" {
        return Err(PlatformError::UnsupportedPsciMethod(method.to_string()));
    }
    Ok(())
}

impl Platform {
    /// Whether no node of the DTB claims `addr` (it is neither RAM nor a
    /// device), so an access there must be answered by an abort.
    pub fn is_unclaimed(&self, addr: PhysAddr) -> bool {
        !self.claimed.iter().any(|r| r.contains(addr))
    }
}
