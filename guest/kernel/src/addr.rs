//! Guest-physical addresses and ranges.
//!
//! The guest's "physical" address space is the hypervisor's IPA space; the
//! kernel identity-maps it, so a [`PhysAddr`] is also the virtual address
//! the kernel uses for it. Conversions to pointers are explicit
//! ([`PhysAddr::as_ptr`]) and only valid once the address is known to be
//! mapped.

use core::fmt;

/// Size of a page frame and of the stage-1 translation granule: 4 KiB.
pub const PAGE_SIZE: u64 = 4096;

/// A guest-physical address (an IPA from the hypervisor's point of view).
#[repr(transparent)]
#[derive(Copy, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct PhysAddr(pub u64);

impl PhysAddr {
    /// The raw value.
    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// The identity-mapped virtual address of `self`, as a pointer.
    pub const fn as_ptr<T>(self) -> *mut T {
        self.0 as usize as *mut T
    }

    /// The address of `ptr` under the kernel's identity map.
    pub fn from_ptr<T>(ptr: *const T) -> Self {
        Self(ptr as usize as u64)
    }

    /// Rounds up to a multiple of `align` (a power of two), `None` on overflow.
    pub const fn checked_align_up(self, align: u64) -> Option<Self> {
        match self.0.checked_add(align - 1) {
            Some(v) => Some(Self(v & !(align - 1))),
            None => None,
        }
    }

    /// Rounds down to a multiple of `align` (a power of two).
    pub const fn align_down(self, align: u64) -> Self {
        Self(self.0 & !(align - 1))
    }

    /// `self + offset`, `None` on overflow.
    pub const fn checked_add(self, offset: u64) -> Option<Self> {
        match self.0.checked_add(offset) {
            Some(v) => Some(Self(v)),
            None => None,
        }
    }
}

impl fmt::Display for PhysAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#018x}", self.0)
    }
}

impl fmt::Debug for PhysAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PhysAddr({:#x})", self.0)
    }
}

/// A half-open range `[start, end)` of guest-physical addresses.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PhysRange {
    /// First address in the range.
    pub start: PhysAddr,
    /// First address after the range.
    pub end: PhysAddr,
}

impl PhysRange {
    /// `[start, start + size)`, `None` if it overflows.
    pub const fn from_start_size(start: PhysAddr, size: u64) -> Option<Self> {
        match start.checked_add(size) {
            Some(end) => Some(Self { start, end }),
            None => None,
        }
    }

    /// Size in bytes.
    pub const fn size(&self) -> u64 {
        self.end.0 - self.start.0
    }

    /// Whether `addr` lies in the range.
    pub fn contains(&self, addr: PhysAddr) -> bool {
        self.start <= addr && addr < self.end
    }

    /// Whether the two ranges share at least one byte.
    pub fn overlaps(&self, other: &Self) -> bool {
        self.start < other.end && other.start < self.end
    }

    /// Whether `other` lies entirely inside `self`.
    pub fn covers(&self, other: &Self) -> bool {
        self.start <= other.start && other.end <= self.end
    }
}

impl fmt::Display for PhysRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.start.0, self.end.0)
    }
}
