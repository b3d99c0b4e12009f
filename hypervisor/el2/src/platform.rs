//! The machine, as its device tree describes it.
//!
//! Everything the hypervisor knows about the board comes from here: RAM,
//! the console UART, the GIC, the CPUs and how to reach PSCI. Only the
//! DTB's own location is assumed (start of RAM for an ELF boot on `virt`).

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use fdt::Fdt;
use hyp_core::addr::{PhysAddr, PhysRange};

/// Where QEMU `virt` puts the DTB when it boots an ELF image (x0 is 0 then).
pub const VIRT_DTB_ADDR: u64 = 0x4000_0000;

/// How PSCI is called.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Conduit {
    /// `smc #0` (QEMU with `virtualization=on`: PSCI is emulated at EL3).
    Smc,
    /// `hvc #0`.
    Hvc,
}

impl Conduit {
    /// PSCI `CPU_ON` through this conduit.
    pub fn cpu_on(self, mpidr: u64, entry: u64, ctx: u64) -> Result<(), smccc::psci::Error> {
        match self {
            Self::Smc => smccc::psci::cpu_on::<smccc::Smc>(mpidr, entry, ctx),
            Self::Hvc => smccc::psci::cpu_on::<smccc::Hvc>(mpidr, entry, ctx),
        }
    }

    /// PSCI `SYSTEM_OFF` through this conduit (returns only on failure).
    pub fn system_off(self) -> Result<(), smccc::psci::Error> {
        match self {
            Self::Smc => smccc::psci::system_off::<smccc::Smc>(),
            Self::Hvc => smccc::psci::system_off::<smccc::Hvc>(),
        }
    }
}

/// A CPU from `/cpus`.
#[derive(Copy, Clone, Debug)]
pub struct Cpu {
    /// Its MPIDR affinity value (the `reg` property).
    pub mpidr: u64,
}

/// What the device tree says about the machine.
#[derive(Debug)]
pub struct Platform {
    /// The DTB itself (to reserve it).
    pub dtb: PhysRange,
    /// RAM ranges from `/memory`.
    pub ram: Vec<PhysRange>,
    /// The console PL011.
    pub uart: PhysRange,
    /// The GIC's first register frame (distributor).
    pub gic: PhysRange,
    /// CPUs in DTB order; index `i` is CPU `i` everywhere in the hypervisor.
    pub cpus: Vec<Cpu>,
    /// The PSCI conduit.
    pub psci: Conduit,
    /// `/chosen/bootargs`, empty if absent.
    pub bootargs: String,
}

/// What is wrong with the device tree.
#[derive(Debug)]
pub enum PlatformError {
    /// The blob's header is not valid.
    BadDtb(fdt::FdtError),
    /// A required node is missing.
    MissingNode(&'static str),
    /// A node lacks a required property or has a bad one.
    BadProperty {
        /// The node.
        node: &'static str,
        /// The property.
        property: &'static str,
    },
}

impl fmt::Display for PlatformError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadDtb(e) => write!(f, "dtb: invalid device tree: {e}"),
            Self::MissingNode(n) => write!(f, "dtb: required node missing: {n}"),
            Self::BadProperty { node, property } => {
                write!(f, "dtb: node {node}: missing or bad property `{property}`")
            }
        }
    }
}

fn first_reg(
    node: &fdt::node::FdtNode<'_, '_>,
    name: &'static str,
) -> Result<PhysRange, PlatformError> {
    let bad = PlatformError::BadProperty {
        node: name,
        property: "reg",
    };
    let region = node.reg().and_then(|mut r| r.next()).ok_or(bad)?;
    let size = region.size.ok_or(PlatformError::BadProperty {
        node: name,
        property: "reg",
    })?;
    Ok(PhysRange::new(
        PhysAddr(region.starting_address as u64),
        size as u64,
    ))
}

impl Platform {
    /// Reads the DTB at `addr`.
    ///
    /// # Safety
    /// `addr` must point to readable memory holding a DTB (or at least a
    /// header that the parser can reject) for the program's lifetime.
    pub unsafe fn from_dtb(addr: u64) -> Result<Self, PlatformError> {
        // SAFETY: the caller guarantees `addr` is readable; `from_ptr`
        // validates the header before reading further.
        let fdt = unsafe { Fdt::from_ptr(addr as *const u8) }.map_err(PlatformError::BadDtb)?;
        let dtb = PhysRange::new(PhysAddr(addr), fdt.total_size() as u64);

        let memory = fdt
            .find_node("/memory")
            .ok_or(PlatformError::MissingNode("/memory"))?;
        let ram: Vec<PhysRange> = memory
            .reg()
            .ok_or(PlatformError::BadProperty {
                node: "/memory",
                property: "reg",
            })?
            .filter_map(|r| {
                Some(PhysRange::new(
                    PhysAddr(r.starting_address as u64),
                    r.size? as u64,
                ))
            })
            .filter(|r| r.size > 0)
            .collect();
        if ram.is_empty() {
            return Err(PlatformError::BadProperty {
                node: "/memory",
                property: "reg",
            });
        }

        // `Fdt::chosen` and `Fdt::cpus` panic when the node is missing:
        // check first so that a bad DTB is an error, not a crash.
        let has_chosen = fdt.find_node("/chosen").is_some();
        let uart_node = has_chosen
            .then(|| fdt.chosen().stdout())
            .flatten()
            .filter(|n| {
                n.compatible()
                    .is_some_and(|c| c.all().any(|s| s == "arm,pl011"))
            })
            .or_else(|| fdt.find_compatible(&["arm,pl011"]))
            .ok_or(PlatformError::MissingNode(
                "pl011 uart (compatible \"arm,pl011\")",
            ))?;
        let uart = first_reg(&uart_node, "pl011")?;

        let gic_node = fdt
            .find_compatible(&["arm,gic-v3", "arm,cortex-a15-gic", "arm,gic-400"])
            .ok_or(PlatformError::MissingNode(
                "interrupt controller (arm,gic-v3/cortex-a15-gic)",
            ))?;
        let gic = first_reg(&gic_node, "gic")?;

        if fdt.find_node("/cpus").is_none() {
            return Err(PlatformError::MissingNode("/cpus"));
        }
        let cpus: Vec<Cpu> = fdt
            .cpus()
            .filter_map(|c| {
                c.property("reg")?;
                c.ids().all().next().map(|id| Cpu { mpidr: id as u64 })
            })
            .collect();
        if cpus.is_empty() {
            return Err(PlatformError::MissingNode("/cpus/cpu@*"));
        }

        let psci_node = fdt
            .find_compatible(&["arm,psci-1.0", "arm,psci-0.2", "arm,psci"])
            .ok_or(PlatformError::MissingNode("/psci"))?;
        let psci = match psci_node.property("method").and_then(|p| p.as_str()) {
            Some("smc") => Conduit::Smc,
            Some("hvc") => Conduit::Hvc,
            _ => {
                return Err(PlatformError::BadProperty {
                    node: "/psci",
                    property: "method",
                })
            }
        };

        let bootargs = has_chosen
            .then(|| fdt.chosen().bootargs())
            .flatten()
            .unwrap_or("")
            .into();
        Ok(Self {
            dtb,
            ram,
            uart,
            gic,
            cpus,
            psci,
            bootargs,
        })
    }
}
