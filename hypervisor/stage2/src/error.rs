//! Errors of the stage-2 table: construction ([`Stage2Error`]) and
//! operations ([`MapError`]).

use core::fmt;

use hyp_core::addr::{Ipa, PhysAddr};

/// Why a [`crate::Stage2`] could not be created.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Stage2Error {
    /// The IPA size is outside the supported `40..=48` bits.
    UnsupportedIpaBits(u8),
    /// No page for the root table.
    NoMemory,
}

impl fmt::Display for Stage2Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnsupportedIpaBits(bits) => {
                write!(f, "unsupported IPA size of {bits} bits (40..=48)")
            }
            Self::NoMemory => f.write_str("no memory for the stage-2 root table"),
        }
    }
}

impl core::error::Error for Stage2Error {}

/// Why a map, unmap or protect failed.
///
/// A failure after the walk started leaves the part of the range before the
/// failing entry done (as with Linux `kvm_pgtable_stage2_map`); undo it with
/// `unmap` over the whole range if needed.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum MapError {
    /// The IPA is not 4 KiB aligned.
    Unaligned(Ipa),
    /// The output address is not 4 KiB aligned.
    UnalignedPhys(PhysAddr),
    /// The size is not a multiple of 4 KiB.
    UnalignedSize(u64),
    /// The size is zero.
    ZeroSize(Ipa),
    /// `[ipa, ipa + size)` overflows or reaches beyond the IPA size.
    OutOfRange {
        /// Start of the rejected range.
        ipa: Ipa,
        /// Its size in bytes.
        size: u64,
    },
    /// `[pa, pa + size)` overflows or reaches beyond the 48-bit output range.
    PhysOutOfRange {
        /// Start of the rejected output range.
        pa: PhysAddr,
        /// Its size in bytes.
        size: u64,
    },
    /// Device memory cannot be mapped executable.
    ExecutableDevice(Ipa),
    /// The table allocator is out of pages.
    NoMemory,
    /// The entry covering `ipa` at `level` is locked by another walker, or
    /// changed under a compare-exchange in a way only a concurrent writer
    /// could cause; retry the operation.
    Busy {
        /// Start of the range the entry covers.
        ipa: Ipa,
        /// The entry's level.
        level: u8,
    },
}

impl fmt::Display for MapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unaligned(ipa) => write!(f, "IPA {ipa} is not 4 KiB aligned"),
            Self::UnalignedPhys(pa) => write!(f, "physical address {pa} is not 4 KiB aligned"),
            Self::UnalignedSize(size) => write!(f, "size {size:#x} is not a multiple of 4 KiB"),
            Self::ZeroSize(ipa) => write!(f, "empty range at IPA {ipa}"),
            Self::OutOfRange { ipa, size } => {
                write!(f, "IPA range {ipa}+{size:#x} is outside the IPA space")
            }
            Self::PhysOutOfRange { pa, size } => {
                write!(
                    f,
                    "physical range {pa}+{size:#x} is outside the 48-bit output range"
                )
            }
            Self::ExecutableDevice(ipa) => {
                write!(f, "device memory at IPA {ipa} cannot be executable")
            }
            Self::NoMemory => f.write_str("out of stage-2 table pages"),
            Self::Busy { ipa, level } => {
                write!(
                    f,
                    "level-{level} entry at IPA {ipa} is busy (concurrent writer)"
                )
            }
        }
    }
}

impl core::error::Error for MapError {}
