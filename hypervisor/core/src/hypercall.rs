//! Validation of guest-supplied hypercall arguments.
//!
//! Guest input is hostile: every address, length and flag word of a vendor
//! call passes through one of these checks before the call has any effect.
//! They are pure functions of the argument and the guest's RAM, so the
//! host tests below cover every rejection, and the EL2 handlers log the
//! [`ArgError`] they get (it names the argument and the limit).

use core::fmt;

use hyp_abi::age_flags;

use crate::addr::PAGE_SIZE;

/// The guest's RAM in IPA space: `[base, base + size)`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct GuestRam {
    /// First IPA.
    pub base: u64,
    /// Bytes.
    pub size: u64,
}

impl GuestRam {
    /// Whether `[start, start + len)` lies wholly inside RAM (`len > 0`,
    /// no overflow).
    pub fn contains(&self, start: u64, len: u64) -> bool {
        len > 0
            && start >= self.base
            && start
                .checked_add(len)
                .is_some_and(|end| end <= self.base + self.size)
    }
}

/// A checked range of whole guest pages inside RAM.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PageRange {
    /// First IPA (page aligned).
    pub ipa: u64,
    /// Pages (at least one).
    pub npages: u64,
}

impl PageRange {
    /// Bytes covered.
    pub fn len(&self) -> u64 {
        self.npages * PAGE_SIZE
    }

    /// Always false: a checked range has at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// A checked bitmap: `words` little-endian u64 words at `ipa`, 8-byte
/// aligned, wholly inside RAM.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct BitmapRange {
    /// IPA of word 0.
    pub ipa: u64,
    /// Number of words.
    pub words: u64,
}

/// Why an argument was rejected; each is answered `INVALID_PARAMETER`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ArgError {
    /// An address is not aligned as required.
    Unaligned {
        /// The argument.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The alignment required.
        align: u64,
    },
    /// A page count of zero.
    Empty {
        /// The argument.
        what: &'static str,
    },
    /// A count above the per-call limit.
    TooLarge {
        /// The argument.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The limit.
        max: u64,
    },
    /// A range that wraps around the 64-bit address space.
    Overflow {
        /// The argument.
        what: &'static str,
        /// Start of the range.
        start: u64,
        /// Its length in bytes (saturated).
        len: u64,
    },
    /// A range that is not wholly inside guest RAM.
    OutsideRam {
        /// The argument.
        what: &'static str,
        /// Start of the range.
        start: u64,
        /// Its length in bytes.
        len: u64,
    },
    /// Flag bits that are not defined.
    UnknownFlags(u64),
    /// `MASK` or `FLUSH` without `CLEAR`.
    FlagsWithoutClear(u64),
}

impl fmt::Display for ArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Unaligned { what, value, align } => {
                write!(f, "{what} {value:#x} is not {align}-byte aligned")
            }
            Self::Empty { what } => write!(f, "{what} is zero"),
            Self::TooLarge { what, value, max } => {
                write!(f, "{what} {value} is above the limit of {max}")
            }
            Self::Overflow { what, start, len } => {
                write!(f, "{what} {start:#x}+{len:#x} overflows")
            }
            Self::OutsideRam { what, start, len } => {
                write!(
                    f,
                    "{what} {start:#x}+{len:#x} is not wholly inside guest RAM"
                )
            }
            Self::UnknownFlags(flags) => write!(
                f,
                "flags {flags:#x} have undefined bits {:#x}",
                flags & !age_flags::ALL
            ),
            Self::FlagsWithoutClear(flags) => {
                write!(f, "flags {flags:#x}: MASK and FLUSH need CLEAR")
            }
        }
    }
}

/// Checks `npages` pages from `ipa` (`what` names the argument in
/// errors): page aligned, `1..=max` pages, no overflow, wholly inside RAM.
pub fn page_range(
    ram: &GuestRam,
    what: &'static str,
    ipa: u64,
    npages: u64,
    max: u64,
) -> Result<PageRange, ArgError> {
    if !ipa.is_multiple_of(PAGE_SIZE) {
        return Err(ArgError::Unaligned {
            what,
            value: ipa,
            align: PAGE_SIZE,
        });
    }
    if npages == 0 {
        return Err(ArgError::Empty { what: "npages" });
    }
    if npages > max {
        return Err(ArgError::TooLarge {
            what: "npages",
            value: npages,
            max,
        });
    }
    // npages <= max keeps the multiplication small; the addition may wrap.
    let len = npages * PAGE_SIZE;
    if ipa.checked_add(len).is_none() {
        return Err(ArgError::Overflow {
            what,
            start: ipa,
            len,
        });
    }
    if !ram.contains(ipa, len) {
        return Err(ArgError::OutsideRam {
            what,
            start: ipa,
            len,
        });
    }
    Ok(PageRange { ipa, npages })
}

/// Checks one page at `ipa`.
pub fn page(ram: &GuestRam, what: &'static str, ipa: u64) -> Result<PageRange, ArgError> {
    page_range(ram, what, ipa, 1, 1)
}

/// Checks the bitmap of `npages` bits (a checked count) at `ipa`: 8-byte
/// aligned and wholly inside RAM.
pub fn bitmap(ram: &GuestRam, ipa: u64, npages: u64) -> Result<BitmapRange, ArgError> {
    const WHAT: &str = "bitmap_ipa";
    if !ipa.is_multiple_of(8) {
        return Err(ArgError::Unaligned {
            what: WHAT,
            value: ipa,
            align: 8,
        });
    }
    let words = npages.div_ceil(64);
    let len = words.saturating_mul(8);
    if ipa.checked_add(len).is_none() {
        return Err(ArgError::Overflow {
            what: WHAT,
            start: ipa,
            len,
        });
    }
    if !ram.contains(ipa, len) {
        return Err(ArgError::OutsideRam {
            what: WHAT,
            start: ipa,
            len,
        });
    }
    Ok(BitmapRange { ipa, words })
}

/// Checks the `flags` of `AGING_TEST_CLEAR`: only defined bits, and
/// `MASK`/`FLUSH` only with `CLEAR`.
pub fn age_flags(flags: u64) -> Result<u64, ArgError> {
    if flags & !age_flags::ALL != 0 {
        return Err(ArgError::UnknownFlags(flags));
    }
    if flags & (age_flags::MASK | age_flags::FLUSH) != 0 && flags & age_flags::CLEAR == 0 {
        return Err(ArgError::FlagsWithoutClear(flags));
    }
    Ok(flags)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const RAM: GuestRam = GuestRam {
        base: 0x4000_0000,
        size: 256 << 20,
    };
    const END: u64 = 0x4000_0000 + (256 << 20);

    #[test]
    fn page_ranges_inside_ram_pass() {
        assert_eq!(
            page_range(&RAM, "ipa", RAM.base, 1, 8),
            Ok(PageRange {
                ipa: RAM.base,
                npages: 1
            })
        );
        assert!(page_range(&RAM, "ipa", END - 8 * PAGE_SIZE, 8, 8).is_ok());
    }

    #[test]
    fn every_bad_page_range_is_named() {
        let r = |ipa, n| page_range(&RAM, "ipa", ipa, n, 16);
        assert!(matches!(
            r(RAM.base + 1, 1),
            Err(ArgError::Unaligned { .. })
        ));
        assert_eq!(r(RAM.base, 0), Err(ArgError::Empty { what: "npages" }));
        assert!(matches!(
            r(RAM.base, 17),
            Err(ArgError::TooLarge { max: 16, .. })
        ));
        assert!(matches!(
            r(!(PAGE_SIZE - 1), 16),
            Err(ArgError::Overflow { .. })
        ));
        assert!(matches!(
            r(RAM.base - PAGE_SIZE, 1),
            Err(ArgError::OutsideRam { .. })
        ));
        assert!(matches!(
            r(END - PAGE_SIZE, 2),
            Err(ArgError::OutsideRam { .. })
        ));
        assert!(matches!(r(0, 1), Err(ArgError::OutsideRam { .. })));
        assert!(matches!(
            r(0x0900_0000, 1),
            Err(ArgError::OutsideRam { .. })
        ));
    }

    #[test]
    fn bitmaps_must_be_aligned_and_inside_ram() {
        assert_eq!(
            bitmap(&RAM, RAM.base, 65),
            Ok(BitmapRange {
                ipa: RAM.base,
                words: 2
            })
        );
        assert!(matches!(
            bitmap(&RAM, RAM.base + 4, 1),
            Err(ArgError::Unaligned { align: 8, .. })
        ));
        // The last word crosses the end of RAM.
        assert!(matches!(
            bitmap(&RAM, END - 8, 65),
            Err(ArgError::OutsideRam { .. })
        ));
        assert!(bitmap(&RAM, END - 16, 65).is_ok());
        // Over the UART (MMIO).
        assert!(matches!(
            bitmap(&RAM, 0x0900_0000, 64),
            Err(ArgError::OutsideRam { .. })
        ));
        assert!(matches!(
            bitmap(&RAM, u64::MAX - 15, 64),
            Err(ArgError::OutsideRam { .. })
        ));
        assert!(matches!(
            bitmap(&RAM, !7, 128),
            Err(ArgError::Overflow { .. })
        ));
    }

    #[test]
    fn flags_are_checked() {
        use hyp_abi::age_flags::{CLEAR, FLUSH, MASK};
        for ok in [0, CLEAR, CLEAR | MASK, CLEAR | FLUSH, CLEAR | MASK | FLUSH] {
            assert_eq!(age_flags(ok), Ok(ok));
        }
        assert_eq!(age_flags(8), Err(ArgError::UnknownFlags(8)));
        assert_eq!(age_flags(u64::MAX), Err(ArgError::UnknownFlags(u64::MAX)));
        assert_eq!(age_flags(MASK), Err(ArgError::FlagsWithoutClear(MASK)));
        assert_eq!(age_flags(FLUSH), Err(ArgError::FlagsWithoutClear(FLUSH)));
    }

    #[test]
    fn errors_print_the_argument() {
        let e = page_range(&RAM, "ipa", 3, 1, 1).unwrap_err();
        assert_eq!(std::format!("{e}"), "ipa 0x3 is not 4096-byte aligned");
    }

    proptest! {
        /// Whatever the guest passes, an accepted range is page aligned,
        /// non-empty, within the limit and wholly inside RAM.
        #[test]
        fn accepted_ranges_are_inside_ram(ipa in prop_oneof![any::<u64>(), RAM.base..END + 0x10_0000], npages in prop_oneof![any::<u64>(), 0u64..64]) {
            if let Ok(r) = page_range(&RAM, "ipa", ipa, npages, 32) {
                prop_assert_eq!(r.ipa % PAGE_SIZE, 0);
                prop_assert!((1..=32).contains(&r.npages));
                prop_assert!(r.ipa >= RAM.base && r.ipa + r.len() <= END);
            }
        }

        #[test]
        fn accepted_bitmaps_are_inside_ram(ipa in prop_oneof![any::<u64>(), RAM.base..END + 64], npages in 1u64..(1 << 18)) {
            if let Ok(b) = bitmap(&RAM, ipa, npages) {
                prop_assert_eq!(b.ipa % 8, 0);
                prop_assert!(b.words * 64 >= npages);
                prop_assert!(b.ipa >= RAM.base && b.ipa + b.words * 8 <= END);
            }
        }
    }
}
