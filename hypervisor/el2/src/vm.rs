//! The virtual machine (filled in by the VM work; for now: power off).

use crate::cpu::CpuFeatures;
use crate::platform::Platform;
use hyp_core::bootargs::BootConfig;
use log::info;

/// Runs the VM on the boot CPU, or powers off when there is no guest.
pub fn run_primary(_platform: &Platform, config: &BootConfig, _features: &CpuFeatures) -> ! {
    if config.guest_image.is_none() {
        info!("no guest image (bootarg guest=ADDR+SIZE): powering off");
    }
    crate::power::system_off()
}

/// What a secondary CPU does once it is up.
pub fn secondary_idle(_index: usize) -> ! {
    crate::power::park()
}
