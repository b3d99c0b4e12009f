//! The one question the reclaimer asks the hypervisor, as a trait.
//!
//! [`Backend::test_clear`] is `AGING_TEST_CLEAR(ipa, npages, bitmap_ipa,
//! flags)` with page numbers relative to the managed region: the guest
//! implements it with a hypercall, [`crate::sim::SimBackend`] over an array
//! of simulated access bits. The bitmap layout is the ABI's: bit `i` of the
//! range is bit `i % 64` of word `i / 64`.

use bitflags::bitflags;
use core::fmt::Debug;

bitflags! {
    /// Flags of `AGING_TEST_CLEAR` (the bits are the ABI's).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct AgeFlags: u64 {
        /// Clear the access flag of the young pages.
        const CLEAR = 1;
        /// With `CLEAR`: the bitmap is also an input and only pages whose bit
        /// is set on input are cleared (look-around: clear only what the
        /// reclaimer decided on). The output still reports every young page.
        const MASK = 2;
        /// With `CLEAR`: invalidate the TLB for the cleared pages, so that a
        /// cached translation cannot hide the next access.
        const FLUSH = 4;
    }
}

/// Access-flag harvesting over the managed region `0..pages`.
pub trait Backend {
    /// What a failed call reports (an SMCCC error on the target).
    type Error: Debug;

    /// Most pages one [`Backend::test_clear`] call may cover.
    fn max_pages_per_call(&self) -> u32;

    /// Reports which pages of `first..first + npages` were accessed since
    /// their flag was last cleared: on return bit `i` of `bitmap` is set iff
    /// page `first + i` is young, and bits past `npages` are zero. See
    /// [`AgeFlags`] for what is cleared. `bitmap` must hold at least
    /// [`words_for`]`(npages)` words and `npages` must not exceed
    /// [`Backend::max_pages_per_call`]. Returns the number of young pages.
    fn test_clear(
        &mut self,
        first: u32,
        npages: u32,
        bitmap: &mut [u64],
        flags: AgeFlags,
    ) -> Result<u64, Self::Error>;

    /// How many [`Backend::test_clear`] calls were made so far (the "aging
    /// hypercalls" of a run report).
    fn calls(&self) -> u64;
}

/// Words of a bitmap covering `npages` pages.
pub const fn words_for(npages: u32) -> usize {
    (npages as usize).div_ceil(64)
}

/// Bit `i` of a bitmap in the ABI layout.
#[inline]
pub fn bit(bitmap: &[u64], i: u32) -> bool {
    bitmap[(i / 64) as usize] >> (i % 64) & 1 != 0
}

/// Sets bit `i` of a bitmap in the ABI layout.
#[inline]
pub fn set_bit(bitmap: &mut [u64], i: u32) {
    bitmap[(i / 64) as usize] |= 1 << (i % 64);
}

/// Clears bit `i` of a bitmap in the ABI layout.
#[inline]
pub fn clear_bit(bitmap: &mut [u64], i: u32) {
    bitmap[(i / 64) as usize] &= !(1 << (i % 64));
}

/// Calls `f(i)` for each set bit `i < npages` of a bitmap, in ascending order.
#[inline]
pub fn for_each_set(bitmap: &[u64], npages: u32, mut f: impl FnMut(u32)) {
    for (w, &word) in bitmap.iter().enumerate().take(words_for(npages)) {
        let mut word = word;
        while word != 0 {
            let i = w as u32 * 64 + word.trailing_zeros();
            if i >= npages {
                return;
            }
            f(i);
            word &= word - 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    #[test]
    fn flags_are_the_abi_bits() {
        assert_eq!(AgeFlags::CLEAR.bits(), 1);
        assert_eq!(AgeFlags::MASK.bits(), 2);
        assert_eq!(AgeFlags::FLUSH.bits(), 4);
        assert_eq!(AgeFlags::all().bits(), 7);
    }

    #[test]
    fn bitmap_layout_is_word_i_over_64_bit_i_mod_64() {
        let mut map = [0u64; 3];
        set_bit(&mut map, 0);
        set_bit(&mut map, 65);
        set_bit(&mut map, 130);
        assert_eq!(map, [1, 2, 4]);
        assert!(bit(&map, 65) && !bit(&map, 64));
        clear_bit(&mut map, 65);
        assert_eq!(map, [1, 0, 4]);
        let mut seen = Vec::new();
        for_each_set(&map, 131, |i| seen.push(i));
        assert_eq!(seen, [0, 130]);
        // Bits at or past `npages` are not reported.
        seen.clear();
        for_each_set(&map, 130, |i| seen.push(i));
        assert_eq!(seen, [0]);
        assert_eq!(words_for(0), 0);
        assert_eq!(words_for(64), 1);
        assert_eq!(words_for(65), 2);
    }
}
