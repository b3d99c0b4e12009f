//! Typed addresses: one type per address space.
//!
//! `PhysAddr` is a host physical address (what EL2 and the stage-2 output
//! see), `Ipa` an intermediate physical address (what the guest believes is
//! physical), `VirtAddr` an EL2 or EL1 virtual address. Conversions between
//! them are explicit and rare: nothing converts an `Ipa` into a `PhysAddr`
//! except a stage-2 translation.

use core::fmt;

/// Size of the translation granule and of a page frame: 4 KiB.
pub const PAGE_SIZE: u64 = 4096;
/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;

macro_rules! address_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[repr(transparent)]
        #[derive(Copy, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub u64);

        impl $name {
            /// The raw value.
            pub const fn as_u64(self) -> u64 {
                self.0
            }

            /// Whether the address is a multiple of `align` (a power of two).
            pub const fn is_aligned(self, align: u64) -> bool {
                self.0 & (align - 1) == 0
            }

            /// Whether the address is 4 KiB aligned.
            pub const fn is_page_aligned(self) -> bool {
                self.is_aligned(PAGE_SIZE)
            }

            /// Rounds down to a multiple of `align` (a power of two).
            pub const fn align_down(self, align: u64) -> Self {
                Self(self.0 & !(align - 1))
            }

            /// Rounds up to a multiple of `align` (a power of two), or `None`
            /// on overflow.
            pub const fn checked_align_up(self, align: u64) -> Option<Self> {
                match self.0.checked_add(align - 1) {
                    Some(v) => Some(Self(v & !(align - 1))),
                    None => None,
                }
            }

            /// `self + offset`, or `None` on overflow.
            pub const fn checked_add(self, offset: u64) -> Option<Self> {
                match self.0.checked_add(offset) {
                    Some(v) => Some(Self(v)),
                    None => None,
                }
            }

            /// `self + offset`; panics on overflow (use for addresses already
            /// known to be in range).
            #[must_use]
            pub const fn add(self, offset: u64) -> Self {
                match self.0.checked_add(offset) {
                    Some(v) => Self(v),
                    None => panic!("address overflow"),
                }
            }

            /// Offset of `self` from `base`; panics if `self < base`.
            pub const fn offset_from(self, base: Self) -> u64 {
                match self.0.checked_sub(base.0) {
                    Some(v) => v,
                    None => panic!("address below base"),
                }
            }

            /// Offset inside the 4 KiB page.
            pub const fn page_offset(self) -> u64 {
                self.0 & (PAGE_SIZE - 1)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:#018x})", stringify!($name), self.0)
            }
        }
    };
}

address_type!(
    /// A host physical address.
    PhysAddr
);
address_type!(
    /// An intermediate physical address: a guest's idea of physical memory.
    Ipa
);
address_type!(
    /// A virtual address (EL2 stage 1 is an identity map, so on the
    /// hypervisor side `VirtAddr(pa) == PhysAddr(pa)` for RAM).
    VirtAddr
);

/// A 4 KiB-aligned range `[start, start + size)` of host physical memory.
#[derive(Copy, Clone, PartialEq, Eq, Debug)]
pub struct PhysRange {
    /// First byte.
    pub start: PhysAddr,
    /// Size in bytes.
    pub size: u64,
}

impl PhysRange {
    /// A range from its start and size.
    pub const fn new(start: PhysAddr, size: u64) -> Self {
        Self { start, size }
    }

    /// One past the last byte (saturating at `u64::MAX`).
    pub const fn end(&self) -> PhysAddr {
        PhysAddr(self.start.0.saturating_add(self.size))
    }

    /// Whether `addr` lies inside the range.
    pub const fn contains(&self, addr: PhysAddr) -> bool {
        addr.0 >= self.start.0 && addr.0 < self.end().0
    }

    /// Whether the two ranges share at least one byte.
    pub const fn overlaps(&self, other: &PhysRange) -> bool {
        self.start.0 < other.end().0 && other.start.0 < self.end().0
    }
}

impl fmt::Display for PhysRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}+{:#x}", self.start, self.size)
    }
}

/// A 4 KiB physical page frame, identified by its frame number.
#[repr(transparent)]
#[derive(Copy, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct PhysFrame(u64);

impl PhysFrame {
    /// The frame that contains `addr`.
    pub const fn containing(addr: PhysAddr) -> Self {
        Self(addr.0 >> PAGE_SHIFT)
    }

    /// The frame starting at `addr`, or `None` if `addr` is not page aligned.
    pub const fn from_start(addr: PhysAddr) -> Option<Self> {
        if addr.is_page_aligned() {
            Some(Self(addr.0 >> PAGE_SHIFT))
        } else {
            None
        }
    }

    /// The frame with number `pfn`.
    pub const fn from_number(pfn: u64) -> Self {
        Self(pfn)
    }

    /// The frame number.
    pub const fn number(self) -> u64 {
        self.0
    }

    /// The first byte of the frame.
    pub const fn start(self) -> PhysAddr {
        PhysAddr(self.0 << PAGE_SHIFT)
    }
}

impl fmt::Display for PhysFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "frame@{}", self.start())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::format;

    #[test]
    fn alignment_helpers() {
        let a = PhysAddr(0x4000_1234);
        assert!(!a.is_page_aligned());
        assert_eq!(a.align_down(PAGE_SIZE), PhysAddr(0x4000_1000));
        assert_eq!(a.checked_align_up(PAGE_SIZE), Some(PhysAddr(0x4000_2000)));
        assert_eq!(PhysAddr(u64::MAX).checked_align_up(PAGE_SIZE), None);
        assert_eq!(a.page_offset(), 0x234);
    }

    #[test]
    fn ranges_and_frames() {
        let r = PhysRange::new(PhysAddr(0x4000_0000), 0x1000);
        assert!(r.contains(PhysAddr(0x4000_0fff)));
        assert!(!r.contains(PhysAddr(0x4000_1000)));
        assert!(r.overlaps(&PhysRange::new(PhysAddr(0x4000_0fff), 1)));
        assert!(!r.overlaps(&PhysRange::new(PhysAddr(0x4000_1000), 1)));
        assert_eq!(PhysFrame::from_start(PhysAddr(0x4000_0001)), None);
        let f = PhysFrame::containing(PhysAddr(0x4000_1fff));
        assert_eq!(f.start(), PhysAddr(0x4000_1000));
        assert_eq!(format!("{}", PhysAddr(0x900_0000)), "0x9000000");
    }
}
