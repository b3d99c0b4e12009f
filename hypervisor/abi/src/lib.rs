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
    /// `STATS(group) -> x0 = SUCCESS, x1..x3` = three counters of `group`
    /// ([`super::stats_group`]); an unknown group is `INVALID_PARAMETER`.
    pub const STATS: u32 = vendor_hyp_fast64(0x0002);
    /// `AGING_FEATURES()`: `x0` = the supported [`super::age_flags`]
    /// bits, `x1` = most pages per `AGING_TEST_CLEAR`, `x2` = most pages
    /// per `MEM_RELEASE`, `x3` = the AF mode ([`super::AfMode`]).
    pub const AGING_FEATURES: u32 = vendor_hyp_fast64(0x0003);
    /// `AGING_TEST_CLEAR(ipa, npages, bitmap_ipa, flags) -> x0 = young
    /// pages`: bit `i` of the bitmap at `bitmap_ipa` (word `i / 64`, bit
    /// `i % 64`, little-endian u64 words) is set when page `ipa + i * 4 KiB`
    /// was accessed since its Access Flag was last cleared; `flags` are
    /// [`super::age_flags`]. See docs/ABI.md for every limit and error.
    pub const AGING_TEST_CLEAR: u32 = vendor_hyp_fast64(0x0004);
    /// `MEM_RELEASE(ipa, npages) -> x0 = pages that were backed and are
    /// not any more, x1 = stage-2 table pages unlinked`: the guest gives
    /// the frames behind the range back; the next access to a released
    /// page gets a zeroed frame.
    pub const MEM_RELEASE: u32 = vendor_hyp_fast64(0x0005);
    /// `STORE_PUT(key, ipa) -> x0 = SUCCESS, x1 = bytes the page takes in
    /// the store`: compresses the guest page at `ipa` into the store under
    /// `key`, replacing an entry of the same key.
    pub const STORE_PUT: u32 = vendor_hyp_fast64(0x0006);
    /// `STORE_GET(key, ipa) -> x0 = SUCCESS`: writes the page stored under
    /// `key` to the guest page at `ipa` and removes it from the store (an
    /// exclusive get). A missing key is `NOT_FOUND`; the page is untouched.
    pub const STORE_GET: u32 = vendor_hyp_fast64(0x0007);
    /// `STORE_DROP(key) -> x0 = SUCCESS`: forgets the page under `key`
    /// (`NOT_FOUND` if there is none).
    pub const STORE_DROP: u32 = vendor_hyp_fast64(0x0008);

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
    /// `AGING_FEATURES` and `AGING_TEST_CLEAR`.
    pub const AGING: u64 =
        (1 << func::number(func::AGING_FEATURES)) | (1 << func::number(func::AGING_TEST_CLEAR));
    /// `MEM_RELEASE`.
    pub const MEM_RELEASE: u64 = 1 << func::number(func::MEM_RELEASE);
    /// `STORE_PUT`, `STORE_GET` and `STORE_DROP`.
    pub const STORE: u64 = (1 << func::number(func::STORE_PUT))
        | (1 << func::number(func::STORE_GET))
        | (1 << func::number(func::STORE_DROP));
    /// Every call of this revision.
    pub const ALL: u64 = FEATURES | EXIT | STATS | AGING | MEM_RELEASE | STORE;
}

/// The `flags` of `AGING_TEST_CLEAR`.
pub mod age_flags {
    /// Clear the Access Flag of the young pages.
    pub const CLEAR: u64 = 1 << 0;
    /// With `CLEAR`: the bitmap is also an input; only the pages whose bit
    /// is set in it are cleared (every young page is still reported).
    pub const MASK: u64 = 1 << 1;
    /// With `CLEAR`: invalidate the TLB entries of the cleared pages, so a
    /// cached translation cannot hide the next access.
    pub const FLUSH: u64 = 1 << 2;
    /// Every defined bit.
    pub const ALL: u64 = CLEAR | MASK | FLUSH;
}

/// Limits of the vendor calls (also returned by `AGING_FEATURES`).
pub mod limits {
    /// Most pages one `AGING_TEST_CLEAR` covers (1 GiB; a 32 KiB bitmap).
    pub const AGING_MAX_PAGES: u64 = 1 << 18;
    /// Most pages one `MEM_RELEASE` covers (16 MiB).
    pub const RELEASE_MAX_PAGES: u64 = 1 << 12;
}

/// Groups of `STATS` counters (`x1` of the call), each answering three
/// counters in `x1..x3`.
pub mod stats_group {
    /// Stage-2 faults: guest frames mapped, translation faults served,
    /// Access-flag faults served.
    pub const FAULTS: u64 = 0;
    /// Stage-2 memory: table pages in use, table pages freed since boot,
    /// pages released by `MEM_RELEASE` since boot.
    pub const MEMORY: u64 = 1;
    /// The page store: entries, bytes stored (compressed), host frames used.
    pub const STORE: u64 = 2;
    /// Aging calls: `AGING_TEST_CLEAR` calls, pages they covered, calls
    /// rejected (any vendor call answered with an error).
    pub const AGING: u64 = 3;
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
    /// The hypervisor has no memory for this (the page store is full, or
    /// no frame is free).
    pub const NO_MEMORY: i64 = -4;
    /// The key is not in the page store.
    pub const NOT_FOUND: i64 = -5;
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
    /// [`error::NO_MEMORY`].
    NoMemory,
    /// [`error::NOT_FOUND`].
    NotFound,
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
            Self::NoMemory => error::NO_MEMORY,
            Self::NotFound => error::NOT_FOUND,
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
            error::NO_MEMORY => Err(Self::NoMemory),
            error::NOT_FOUND => Err(Self::NotFound),
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
            Self::NoMemory => f.write_str("no memory"),
            Self::NotFound => f.write_str("not found"),
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
        assert_eq!(func::AGING_TEST_CLEAR, 0xC600_0004);
        assert_eq!(func::STORE_DROP, 0xC600_0008);
        assert_eq!(feature::ALL, 0x1ff);
    }

    #[test]
    fn error_codes_round_trip() {
        for e in [
            HypError::NotSupported,
            HypError::NotRequired,
            HypError::InvalidParameter,
            HypError::NoMemory,
            HypError::NotFound,
        ] {
            assert_eq!(HypError::check(e.code() as u64), Err(e));
        }
        assert_eq!(HypError::check(7), Ok(7));
        assert_eq!(HypError::check(-9i64 as u64), Err(HypError::Unknown(-9)));
    }
}
