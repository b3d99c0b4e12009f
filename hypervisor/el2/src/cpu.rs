//! What the CPU can do, from its ID registers.

use aarch64_cpu::registers::{CurrentEL, Readable, ID_AA64MMFR0_EL1, ID_AA64MMFR1_EL1};

/// Features the hypervisor cares about.
#[derive(Copy, Clone, Debug)]
pub struct CpuFeatures {
    /// Current exception level (2 when booted correctly).
    pub el: u64,
    /// `ID_AA64MMFR1_EL1.HAFDBS`: 0 none, 1 hardware AF, 2 AF + dirty state.
    pub hafdbs: u64,
    /// Physical address bits (`ID_AA64MMFR0_EL1.PARange`).
    pub pa_bits: u32,
    /// The raw PARange field, for VTCR_EL2.PS / TCR_EL2.PS.
    pub parange: u64,
}

impl CpuFeatures {
    /// Reads the running CPU's ID registers.
    pub fn read() -> Self {
        let parange = ID_AA64MMFR0_EL1.read(ID_AA64MMFR0_EL1::PARange);
        let pa_bits = match parange {
            0 => 32,
            1 => 36,
            2 => 40,
            3 => 42,
            4 => 44,
            5 => 48,
            _ => 52,
        };
        Self {
            el: CurrentEL.read(CurrentEL::EL),
            hafdbs: ID_AA64MMFR1_EL1.read(ID_AA64MMFR1_EL1::HAFDBS),
            pa_bits,
            parange,
        }
    }

    /// IPA size the VMs get: the PA size, capped at 48 bits (4-level
    /// stage 2 starting at level 0 with 4 KiB pages).
    pub fn ipa_bits(&self) -> u32 {
        self.pa_bits.min(48)
    }
}
