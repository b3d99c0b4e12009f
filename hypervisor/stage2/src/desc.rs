//! Stage-2 descriptors: the translation geometry (4 KiB granule, levels
//! 0..=3), the hardware attribute bits ([`S2Attrs`]), the portable
//! permissions kept apart from them ([`Perms`], [`MemType`]), the decoded
//! view of one entry ([`DescView`]) and the atomic entry itself
//! ([`Descriptor`]).
//!
//! Memory ordering of [`Descriptor`]: loads are `Acquire` (a walker that
//! sees a table descriptor also sees the child table's initialised
//! entries), stores are `Release` (publishing a table or a leaf after its
//! contents / after the TLB invalidation of break-before-make), and
//! compare-exchange is `AcqRel` on success, `Acquire` on failure. Only the
//! crate mutates descriptors: code outside it can read entries (for
//! example from a [`crate::walk::Visitor`]) but never write them.

use core::sync::atomic::{AtomicU64, Ordering};

use bitflags::bitflags;
use hyp_core::addr::PhysAddr;

/// Entries per table page (4 KiB / 8 bytes).
pub const ENTRIES: usize = 512;
/// The level the walk starts at (4 KiB granule, IPA > 39 bits).
pub const START_LEVEL: u8 = 0;
/// The last level: 4 KiB pages.
pub const LEAF_LEVEL: u8 = 3;
/// Output-address bits `[47:12]` of a descriptor.
pub const OA_MASK: u64 = 0x0000_ffff_ffff_f000;
/// First physical address a descriptor cannot express (48-bit output).
pub const PA_LIMIT: u64 = 1 << 48;
/// Software marker of an entry locked by a writer for break-before-make:
/// bit 55 (reserved for software use) with the valid bit clear, so the
/// hardware walker treats it as invalid (translation fault).
pub const LOCKED: u64 = 1 << 55;

/// log2 of the address range one entry at `level` covers (39, 30, 21, 12).
pub const fn level_shift(level: u8) -> u32 {
    12 + 9 * (LEAF_LEVEL.saturating_sub(level) as u32)
}

/// Bytes one entry at `level` covers: 512 GiB, 1 GiB, 2 MiB, 4 KiB.
pub const fn level_size(level: u8) -> u64 {
    1 << level_shift(level)
}

/// Output-address mask of a leaf at `level` (a block's low bits are RES0).
const fn leaf_oa_mask(level: u8) -> u64 {
    OA_MASK & !(level_size(level) - 1)
}

bitflags! {
    /// Hardware bits of a stage-2 descriptor (VMSAv8-64, 4 KiB granule).
    ///
    /// `MEMATTR_*` and `SH_*` are multi-bit fields: compare them through
    /// the field masks, never with `contains`.
    #[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
    pub struct S2Attrs: u64 {
        /// Bit 0: the entry is valid.
        const VALID = 1 << 0;
        /// Bit 1: table (levels 0..=2) or page (level 3); clear for a block.
        const TABLE_OR_PAGE = 1 << 1;
        /// `MemAttr[5:2]` field mask.
        const MEMATTR_MASK = 0b1111 << 2;
        /// MemAttr: Normal, outer and inner write-back cacheable.
        const MEMATTR_NORMAL_WB = 0b1111 << 2;
        /// MemAttr: Device-nGnRE.
        const MEMATTR_DEVICE_NGNRE = 0b0001 << 2;
        /// `S2AP[0]` (bit 6): the guest may read.
        const S2AP_R = 1 << 6;
        /// `S2AP[1]` (bit 7): the guest may write.
        const S2AP_W = 1 << 7;
        /// `SH[9:8]` field mask.
        const SH_MASK = 0b11 << 8;
        /// SH: inner shareable.
        const SH_INNER = 0b11 << 8;
        /// Bit 10: access flag.
        const AF = 1 << 10;
        /// Bit 54 (`XN[1]`): execute-never at EL1 and EL0.
        const XN = 1 << 54;
    }
}

bitflags! {
    /// Portable access permissions of a mapping, independent of the
    /// hardware encoding.
    #[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
    pub struct Perms: u8 {
        /// The guest may read.
        const READ = 1 << 0;
        /// The guest may write.
        const WRITE = 1 << 1;
        /// The guest may execute.
        const EXEC = 1 << 2;
    }
}

impl Perms {
    /// Read and write, no execute.
    pub const RW: Self = Self::READ.union(Self::WRITE);
    /// Read, write and execute.
    pub const RWX: Self = Self::RW.union(Self::EXEC);
}

/// Portable memory type of a mapping.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum MemType {
    /// Normal memory, inner and outer write-back cacheable (guest RAM).
    Normal,
    /// Device-nGnRE (MMIO). Never executable at stage 2.
    Device,
}

impl S2Attrs {
    /// The bits a leaf carries besides its type bits and output address.
    pub const LEAF_MASK: Self = Self::MEMATTR_MASK
        .union(Self::S2AP_R)
        .union(Self::S2AP_W)
        .union(Self::SH_MASK)
        .union(Self::AF)
        .union(Self::XN);

    /// Leaf attributes (no `VALID` / `TABLE_OR_PAGE`) for a mapping with
    /// `perms` of type `mem`, with the access flag set when `af`.
    ///
    /// Device memory is always execute-never: `EXEC` is ignored for it.
    /// Every leaf is inner shareable (Normal memory that several CPUs
    /// share; the field is ignored for Device memory).
    pub const fn leaf(perms: Perms, mem: MemType, af: bool) -> Self {
        let mut bits = Self::SH_INNER.bits();
        bits |= match mem {
            MemType::Normal => Self::MEMATTR_NORMAL_WB.bits(),
            MemType::Device => Self::MEMATTR_DEVICE_NGNRE.bits(),
        };
        if perms.contains(Perms::READ) {
            bits |= Self::S2AP_R.bits();
        }
        if perms.contains(Perms::WRITE) {
            bits |= Self::S2AP_W.bits();
        }
        let exec = perms.contains(Perms::EXEC) && matches!(mem, MemType::Normal);
        if !exec {
            bits |= Self::XN.bits();
        }
        if af {
            bits |= Self::AF.bits();
        }
        Self::from_bits_retain(bits)
    }

    /// The portable permissions these bits grant.
    pub const fn perms(self) -> Perms {
        let mut p = Perms::empty();
        if self.contains(Self::S2AP_R) {
            p = p.union(Perms::READ);
        }
        if self.contains(Self::S2AP_W) {
            p = p.union(Perms::WRITE);
        }
        if !self.contains(Self::XN) {
            p = p.union(Perms::EXEC);
        }
        p
    }

    /// The portable memory type: `MemAttr[3:2] == 0b00` is Device memory,
    /// anything else Normal.
    pub const fn mem_type(self) -> MemType {
        if self.bits() & (0b1100 << 2) == 0 {
            MemType::Device
        } else {
            MemType::Normal
        }
    }

    /// Whether the access flag is set.
    pub const fn af(self) -> bool {
        self.contains(Self::AF)
    }

    /// The same attributes with the permissions replaced by `perms`
    /// (memory type, shareability and access flag kept).
    pub const fn with_perms(self, perms: Perms) -> Self {
        let kept = self.difference(Self::S2AP_R.union(Self::S2AP_W).union(Self::XN));
        let fresh = Self::leaf(perms, self.mem_type(), false);
        kept.union(fresh.intersection(Self::S2AP_R.union(Self::S2AP_W).union(Self::XN)))
    }
}

/// The decoded meaning of one raw descriptor at a given level.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum DescView {
    /// Not valid: a translation fault if the hardware walks it.
    Invalid,
    /// Not valid, and locked by a writer in the middle of
    /// break-before-make: walkers must retry or skip it.
    Locked,
    /// A pointer to the next-level table.
    Table {
        /// Physical address of the next-level table page.
        pa: PhysAddr,
    },
    /// A 1 GiB (level 1) or 2 MiB (level 2) block.
    Block {
        /// Output address of the block (aligned to its size).
        pa: PhysAddr,
        /// Leaf attributes (see [`S2Attrs::LEAF_MASK`]).
        attrs: S2Attrs,
        /// 1 or 2.
        level: u8,
    },
    /// A 4 KiB page (level 3).
    Page {
        /// Output address of the page.
        pa: PhysAddr,
        /// Leaf attributes (see [`S2Attrs::LEAF_MASK`]).
        attrs: S2Attrs,
    },
}

impl DescView {
    /// Decodes `raw` read at `level`. Encodings the architecture treats as
    /// faults (a block at level 0, bit 1 clear at level 3) decode as
    /// [`DescView::Invalid`].
    #[inline]
    pub const fn decode(raw: u64, level: u8) -> Self {
        if raw & S2Attrs::VALID.bits() == 0 {
            return if raw & LOCKED != 0 {
                Self::Locked
            } else {
                Self::Invalid
            };
        }
        let table_or_page = raw & S2Attrs::TABLE_OR_PAGE.bits() != 0;
        let attrs = S2Attrs::from_bits_truncate(raw).intersection(S2Attrs::LEAF_MASK);
        match (level, table_or_page) {
            (0..=2, true) => Self::Table {
                pa: PhysAddr(raw & OA_MASK),
            },
            (1 | 2, false) => Self::Block {
                pa: PhysAddr(raw & leaf_oa_mask(level)),
                attrs,
                level,
            },
            (LEAF_LEVEL, true) => Self::Page {
                pa: PhysAddr(raw & OA_MASK),
                attrs,
            },
            _ => Self::Invalid,
        }
    }

    /// The raw descriptor. Address bits outside the output-address field of
    /// the entry's level are dropped; a `Block` must have level 1 or 2.
    #[inline]
    pub const fn encode(self) -> u64 {
        let valid = S2Attrs::VALID.bits();
        let tp = S2Attrs::TABLE_OR_PAGE.bits();
        match self {
            Self::Invalid => 0,
            Self::Locked => LOCKED,
            Self::Table { pa } => (pa.0 & OA_MASK) | valid | tp,
            Self::Block { pa, attrs, level } => {
                (pa.0 & leaf_oa_mask(level)) | attrs.intersection(S2Attrs::LEAF_MASK).bits() | valid
            }
            Self::Page { pa, attrs } => {
                (pa.0 & OA_MASK) | attrs.intersection(S2Attrs::LEAF_MASK).bits() | valid | tp
            }
        }
    }

    /// A leaf (block or page) at `level` mapping `pa` with `attrs`.
    pub const fn leaf(pa: PhysAddr, attrs: S2Attrs, level: u8) -> Self {
        if level == LEAF_LEVEL {
            Self::Page { pa, attrs }
        } else {
            Self::Block { pa, attrs, level }
        }
    }

    /// Output address and attributes of a valid leaf.
    #[inline]
    pub const fn leaf_parts(self) -> Option<(PhysAddr, S2Attrs)> {
        match self {
            Self::Block { pa, attrs, .. } | Self::Page { pa, attrs } => Some((pa, attrs)),
            _ => None,
        }
    }
}

/// One stage-2 translation table entry, shared with the hardware walker.
///
/// See the module documentation for the memory ordering of each access.
#[repr(transparent)]
#[derive(Debug)]
pub struct Descriptor(AtomicU64);

impl Descriptor {
    /// An entry holding `raw`.
    pub const fn new(raw: u64) -> Self {
        Self(AtomicU64::new(raw))
    }

    /// The current raw value (`Acquire`).
    #[inline]
    pub fn load(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    /// The current value decoded as an entry at `level`.
    #[inline]
    pub fn view(&self, level: u8) -> DescView {
        DescView::decode(self.load(), level)
    }

    /// Publishes `raw` (`Release`).
    #[inline]
    pub(crate) fn store(&self, raw: u64) {
        #[cfg(feature = "check")]
        crate::check::transition(self.0.swap(raw, Ordering::AcqRel), raw);
        #[cfg(not(feature = "check"))]
        self.0.store(raw, Ordering::Release);
    }

    /// Replaces `current` by `new` if the entry still holds `current`;
    /// otherwise returns the value found. `AcqRel` on success, `Acquire`
    /// on failure.
    #[inline]
    pub(crate) fn compare_exchange(&self, current: u64, new: u64) -> Result<u64, u64> {
        let result = self
            .0
            .compare_exchange(current, new, Ordering::AcqRel, Ordering::Acquire);
        #[cfg(feature = "check")]
        if result.is_ok() {
            crate::check::transition(current, new);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RW_NORMAL_AF: S2Attrs = S2Attrs::leaf(Perms::RW, MemType::Normal, true);

    #[test]
    fn geometry() {
        assert_eq!(
            [0, 1, 2, 3].map(level_size),
            [1 << 39, 1 << 30, 1 << 21, 1 << 12]
        );
    }

    #[test]
    fn page_encodings() {
        let page = |pa, attrs| {
            DescView::Page {
                pa: PhysAddr(pa),
                attrs,
            }
            .encode()
        };
        assert_eq!(page(0x4000_1000, RW_NORMAL_AF), 0x0040_0000_4000_17ff);
        let rwx = S2Attrs::leaf(Perms::RWX, MemType::Normal, true);
        assert_eq!(page(0x4000_1000, rwx), 0x0000_0000_4000_17ff);
        let ro_dev = S2Attrs::leaf(Perms::READ, MemType::Device, false);
        assert_eq!(page(0x0900_0000, ro_dev), 0x0040_0000_0900_0347);
        let none = S2Attrs::leaf(Perms::empty(), MemType::Normal, true);
        assert_eq!(page(0x4000_1000, none), 0x0040_0000_4000_173f);
        // Highest expressible output address.
        assert_eq!(page(0xffff_ffff_f000, rwx), 0x0000_ffff_ffff_f7ff);
    }

    #[test]
    fn block_encodings() {
        let l2 = DescView::Block {
            pa: PhysAddr(0x4020_0000),
            attrs: RW_NORMAL_AF,
            level: 2,
        };
        assert_eq!(l2.encode(), 0x0040_0000_4020_07fd);
        let rwx = S2Attrs::leaf(Perms::RWX, MemType::Normal, true);
        let l1 = DescView::Block {
            pa: PhysAddr(0x8000_0000),
            attrs: rwx,
            level: 1,
        };
        assert_eq!(l1.encode(), 0x0000_0000_8000_07fd);
        // Address bits below the block size are RES0 and dropped.
        let l1_unaligned = DescView::Block {
            pa: PhysAddr(0x8020_0000),
            attrs: rwx,
            level: 1,
        };
        assert_eq!(l1_unaligned.encode(), 0x0000_0000_8000_07fd);
    }

    #[test]
    fn table_invalid_locked_encodings() {
        for level in 0..=2 {
            let t = DescView::Table {
                pa: PhysAddr(0x1234_5000),
            };
            assert_eq!(t.encode(), 0x0000_0000_1234_5003);
            assert_eq!(DescView::decode(0x1234_5003, level), t);
        }
        assert_eq!(DescView::Invalid.encode(), 0);
        assert_eq!(DescView::Locked.encode(), 0x0080_0000_0000_0000);
        for level in 0..=3 {
            assert_eq!(DescView::decode(0, level), DescView::Invalid);
            assert_eq!(DescView::decode(LOCKED, level), DescView::Locked);
            // Any value with bit 0 clear is invalid, whatever else is set.
            assert_eq!(
                DescView::decode(0x0040_0000_4000_17fe, level),
                DescView::Invalid
            );
        }
    }

    #[test]
    fn decode_roundtrip_and_faulting_encodings() {
        let page = DescView::decode(0x0040_0000_4000_17ff, 3);
        assert_eq!(
            page,
            DescView::Page {
                pa: PhysAddr(0x4000_1000),
                attrs: RW_NORMAL_AF
            }
        );
        assert_eq!(page.encode(), 0x0040_0000_4000_17ff);
        let block = DescView::decode(0x0040_0000_4020_07fd, 2);
        assert_eq!(block.encode(), 0x0040_0000_4020_07fd);
        // A block at level 0 and bit 1 clear at level 3 are faults.
        assert_eq!(
            DescView::decode(0x0000_0080_0000_07fd, 0),
            DescView::Invalid
        );
        assert_eq!(
            DescView::decode(0x0040_0000_4000_17fd, 3),
            DescView::Invalid
        );
        // The same bits at level 1/2 are a block, at 0..=2 with bit 1 a table.
        assert!(matches!(
            DescView::decode(0x0040_0000_4000_17fd, 1),
            DescView::Block { level: 1, .. }
        ));
        assert!(matches!(
            DescView::decode(0x0040_0000_4000_17ff, 2),
            DescView::Table { .. }
        ));
    }

    #[test]
    fn perms_roundtrip() {
        for bits in 0..8 {
            let p = Perms::from_bits_truncate(bits);
            for af in [false, true] {
                let n = S2Attrs::leaf(p, MemType::Normal, af);
                assert_eq!(n.perms(), p);
                assert_eq!(n.mem_type(), MemType::Normal);
                assert_eq!(n.af(), af);
                let d = S2Attrs::leaf(p, MemType::Device, af);
                assert_eq!(d.perms(), p - Perms::EXEC);
                assert_eq!(d.mem_type(), MemType::Device);
                for q in 0..8 {
                    let q = Perms::from_bits_truncate(q);
                    let changed = n.with_perms(q);
                    assert_eq!(changed, S2Attrs::leaf(q, MemType::Normal, af));
                    assert_eq!(d.with_perms(q).perms(), q - Perms::EXEC);
                }
            }
        }
    }

    #[test]
    fn descriptor_atomics() {
        let d = Descriptor::new(0);
        assert_eq!(d.compare_exchange(0, LOCKED), Ok(0));
        assert_eq!(d.compare_exchange(0, 1), Err(LOCKED));
        d.store(0x0040_0000_4000_17ff);
        assert_eq!(
            d.view(3).leaf_parts().map(|(pa, _)| pa),
            Some(PhysAddr(0x4000_1000))
        );
    }
}
