//! The guest's device tree, written with `vm-fdt`: exactly what the guest
//! gets (its RAM, its vCPUs, PSCI over HVC, the emulated PL011, and its
//! command line), nothing of the host.

use alloc::string::String;
use alloc::vec::Vec;
use hyp_abi::layout;

/// What goes into the guest DTB.
#[derive(Debug)]
pub struct GuestDtbSpec<'a> {
    /// Guest RAM size in bytes (at [`layout::RAM_BASE`]).
    pub ram_size: u64,
    /// MPIDR affinity values of the vCPUs, in order.
    pub vcpu_mpidrs: &'a [u64],
    /// `/chosen/bootargs`.
    pub bootargs: &'a str,
}

/// Builds the blob.
pub fn build(spec: &GuestDtbSpec<'_>) -> Result<Vec<u8>, vm_fdt::Error> {
    let mut fdt = vm_fdt::FdtWriter::new()?;
    let root = fdt.begin_node("")?;
    fdt.property_string("compatible", "linux,dummy-virt")?;
    fdt.property_string("model", "hyp guest (virt-like)")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 2)?;

    let uart_name = alloc::format!("pl011@{:x}", layout::UART_IPA);
    let chosen = fdt.begin_node("chosen")?;
    fdt.property_string("bootargs", spec.bootargs)?;
    fdt.property_string("stdout-path", &alloc::format!("/{uart_name}"))?;
    fdt.end_node(chosen)?;

    let memory = fdt.begin_node(&alloc::format!("memory@{:x}", layout::RAM_BASE))?;
    fdt.property_string("device_type", "memory")?;
    fdt.property_array_u64("reg", &[layout::RAM_BASE, spec.ram_size])?;
    fdt.end_node(memory)?;

    let cpus = fdt.begin_node("cpus")?;
    fdt.property_u32("#address-cells", 1)?;
    fdt.property_u32("#size-cells", 0)?;
    for &mpidr in spec.vcpu_mpidrs {
        let aff = (mpidr & 0x00ff_ffff) as u32;
        let cpu = fdt.begin_node(&alloc::format!("cpu@{aff:x}"))?;
        fdt.property_string("device_type", "cpu")?;
        fdt.property_string("compatible", "arm,armv8")?;
        fdt.property_u32("reg", aff)?;
        fdt.property_string("enable-method", "psci")?;
        fdt.end_node(cpu)?;
    }
    fdt.end_node(cpus)?;

    let psci = fdt.begin_node("psci")?;
    fdt.property_string_list(
        "compatible",
        alloc::vec![String::from("arm,psci-1.0"), String::from("arm,psci-0.2")],
    )?;
    fdt.property_string("method", "hvc")?;
    fdt.end_node(psci)?;

    let uart = fdt.begin_node(&uart_name)?;
    fdt.property_string_list(
        "compatible",
        alloc::vec![String::from("arm,pl011"), String::from("arm,primecell")],
    )?;
    fdt.property_array_u64("reg", &[layout::UART_IPA, layout::UART_SIZE])?;
    fdt.end_node(uart)?;

    fdt.end_node(root)?;
    fdt.finish()
}
