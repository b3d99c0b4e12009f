//! The contract between the hypervisor and its guests.
//!
//! Everything a guest may rely on lives here, shared verbatim by both sides:
//! the guest memory layout, the SMCCC function IDs of our vendor hypervisor
//! service (owner 6, "Vendor Specific Hypervisor Service"), and the error
//! codes. PSCI IDs and codes come from the `smccc` crate and are re-exported.
//! docs/ABI.md is the prose version of this file.

#![no_std]
#![warn(missing_docs)]

pub use smccc::psci;

/// Guest physical memory layout (IPA space), modelled on QEMU `virt`.
pub mod layout {
    /// First IPA of guest RAM.
    pub const RAM_BASE: u64 = 0x4000_0000;
    /// The guest DTB is written at the start of guest RAM (as QEMU does for
    /// an ELF kernel); `x0` also carries its IPA at entry.
    pub const DTB_IPA: u64 = RAM_BASE;
    /// Bytes reserved for the guest DTB at [`DTB_IPA`].
    pub const DTB_MAX_SIZE: u64 = 0x20_0000;
    /// The guest image is placed here and entered at its first byte, at EL1h
    /// with the MMU off, `x0` = DTB IPA.
    pub const IMAGE_IPA: u64 = RAM_BASE + DTB_MAX_SIZE;
    /// Emulated PL011 UART (MMIO, 4 KiB). Only UARTDR (offset 0x000) writes
    /// and UARTFR (offset 0x018) reads do anything; other registers read as
    /// zero and ignore writes. Use single 32-bit `ldr`/`str` accesses.
    pub const UART_IPA: u64 = 0x0900_0000;
    /// Size of the UART window.
    pub const UART_SIZE: u64 = 0x1000;
    /// An IPA that is guaranteed to be neither RAM nor a device: any access
    /// to it is answered with a synchronous external abort injected at EL1
    /// (tests use it to check exactly that).
    pub const UNBACKED_IPA: u64 = 0x2000_0000;
    /// Longest console line the emulated UART prints in one piece; a longer
    /// one is printed in pieces, each but the last ending in ` \`.
    pub const UART_MAX_LINE: usize = 200;
}

/// SMCCC conventions used by the vendor service.
pub mod smccc_ids {
    /// Bit 31: fast call.
    pub const FAST_CALL: u32 = 1 << 31;
    /// Bit 30: SMC64/HVC64 calling convention.
    pub const SMC64: u32 = 1 << 30;
    /// Owner number of the Vendor Specific Hypervisor Service.
    pub const OWNER_VENDOR_HYP: u32 = 6;
    /// Bits 29:24: owning entity.
    pub const OWNER_SHIFT: u32 = 24;

    /// Builds a fast SMC64 function ID in the vendor hypervisor range.
    pub const fn vendor_hyp_fast64(number: u16) -> u32 {
        FAST_CALL | SMC64 | (OWNER_VENDOR_HYP << OWNER_SHIFT) | number as u32
    }

    /// Builds a fast SMC32 function ID in the vendor hypervisor range.
    pub const fn vendor_hyp_fast32(number: u16) -> u32 {
        FAST_CALL | (OWNER_VENDOR_HYP << OWNER_SHIFT) | number as u32
    }
}

/// Function IDs of the vendor hypervisor service.
pub mod func {
    use super::smccc_ids::{vendor_hyp_fast32, vendor_hyp_fast64};

    /// Standard "Call UID" query for the service (0x8600_FF01): returns the
    /// service UUID in w0..w3 ([`super::HYP_UID`]).
    pub const CALL_UID: u32 = vendor_hyp_fast32(0xFF01);
    /// Standard "Revision" query (0x8600_FF03): returns major in w0, minor in w1.
    pub const REVISION: u32 = vendor_hyp_fast32(0xFF03);
    /// `FEATURES() -> x0 = bitmap of supported calls` (bit `n` set when the
    /// call numbered `n` exists, see [`super::feature`]), `x1` = AF mode
    /// ([`super::AfMode`]).
    pub const FEATURES: u32 = vendor_hyp_fast64(0x0000);
    /// `EXIT(code)`: test-only. Ends the whole machine; QEMU's exit status is
    /// `code` (0..=255). Never returns on success.
    pub const EXIT: u32 = vendor_hyp_fast64(0x0001);
    /// `STATS() -> x0 = SUCCESS, x1 = guest frames mapped in stage 2,
    /// x2 = stage-2 translation faults served, x3 = access-flag faults served`.
    pub const STATS: u32 = vendor_hyp_fast64(0x0002);

    /// Call number (the low 16 bits) of a vendor function ID.
    pub const fn number(id: u32) -> u16 {
        (id & 0xFFFF) as u16
    }
}

/// Bits of the `FEATURES` bitmap.
pub mod feature {
    use super::func;

    /// `FEATURES` itself.
    pub const FEATURES: u64 = 1 << func::number(func::FEATURES);
    /// `EXIT`.
    pub const EXIT: u64 = 1 << func::number(func::EXIT);
    /// `STATS`.
    pub const STATS: u64 = 1 << func::number(func::STATS);
}

/// How the stage-2 Access Flag is maintained for this VM.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum AfMode {
    /// The hypervisor sets AF on Access-flag faults.
    Software = 0,
    /// The CPU's table walker sets AF (`VTCR_EL2.HA`).
    Hardware = 1,
}

impl AfMode {
    /// Decodes the `x1` value of `FEATURES`.
    pub const fn from_u64(v: u64) -> Option<Self> {
        match v {
            0 => Some(Self::Software),
            1 => Some(Self::Hardware),
            _ => None,
        }
    }
}

/// The service UUID returned by [`func::CALL_UID`], as four 32-bit words
/// (w0..w3). Randomly generated for this project:
/// `5d9a1e4c-7a2b-4f0e-9c61-3b8d2e7f4a10`.
pub const HYP_UID: [u32; 4] = [0x4c1e_9a5d, 0x0e4f_2b7a, 0x8d3b_619c, 0x104a_7f2e];

/// Major and minor revision of the vendor service ABI.
pub const REVISION: (u32, u32) = (0, 1);

/// SMCCC return codes (signed, in x0).
pub mod error {
    /// Success.
    pub const SUCCESS: i64 = 0;
    /// The function is not implemented (unknown function ID).
    pub const NOT_SUPPORTED: i64 = -1;
    /// The call is not required.
    pub const NOT_REQUIRED: i64 = -2;
    /// An argument is invalid (alignment, range, flags).
    pub const INVALID_PARAMETER: i64 = -3;
}

/// An error answer of the vendor service, decoded from x0.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum HypError {
    /// [`error::NOT_SUPPORTED`].
    NotSupported,
    /// [`error::NOT_REQUIRED`].
    NotRequired,
    /// [`error::INVALID_PARAMETER`].
    InvalidParameter,
    /// Any other negative value.
    Unknown(i64),
}

impl HypError {
    /// The x0 value for this error.
    pub const fn code(self) -> i64 {
        match self {
            Self::NotSupported => error::NOT_SUPPORTED,
            Self::NotRequired => error::NOT_REQUIRED,
            Self::InvalidParameter => error::INVALID_PARAMETER,
            Self::Unknown(v) => v,
        }
    }

    /// Decodes x0: `Ok(value)` when non-negative.
    pub const fn check(x0: u64) -> Result<u64, Self> {
        let v = x0 as i64;
        match v {
            0.. => Ok(x0),
            error::NOT_SUPPORTED => Err(Self::NotSupported),
            error::NOT_REQUIRED => Err(Self::NotRequired),
            error::INVALID_PARAMETER => Err(Self::InvalidParameter),
            other => Err(Self::Unknown(other)),
        }
    }
}

impl core::fmt::Display for HypError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NotSupported => f.write_str("not supported"),
            Self::NotRequired => f.write_str("not required"),
            Self::InvalidParameter => f.write_str("invalid parameter"),
            Self::Unknown(v) => write!(f, "unknown error {v}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_ids_are_in_the_vendor_hyp_range() {
        assert_eq!(func::CALL_UID, 0x8600_FF01);
        assert_eq!(func::REVISION, 0x8600_FF03);
        assert_eq!(func::FEATURES, 0xC600_0000);
        assert_eq!(func::EXIT, 0xC600_0001);
        assert_eq!(feature::STATS, 1 << 2);
    }

    #[test]
    fn error_codes_round_trip() {
        for e in [
            HypError::NotSupported,
            HypError::NotRequired,
            HypError::InvalidParameter,
        ] {
            assert_eq!(HypError::check(e.code() as u64), Err(e));
        }
        assert_eq!(HypError::check(7), Ok(7));
        assert_eq!(HypError::check(-9i64 as u64), Err(HypError::Unknown(-9)));
    }
}
