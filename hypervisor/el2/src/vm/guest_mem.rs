//! The hypervisor's own accesses to guest memory (the aging bitmap, pages
//! going into and out of the page store).
//!
//! Guest frames can be moved (migration) or released (`MEM_RELEASE`) by
//! other CPUs at any time, so a frame's address is only used while its
//! stage-2 leaf is *pinned*: locked with the same marker writers use, which
//! makes unmap, migration and faults on that page wait until the access is
//! over (see `Stage2::with_page_pinned`). A page the guest never touched
//! reads as zeros; writing to it first backs it with a zeroed frame, just
//! as a guest store would.
//!
//! Guest memory may change under the hypervisor's feet (other vCPUs run),
//! so it is only ever copied with raw-pointer copies into and out of the
//! hypervisor's own buffers, never borrowed as a Rust reference.

use core::ops::Range;

use hyp_core::addr::{Ipa, PhysAddr, PAGE_SIZE};
use stage2::PinError;

use super::Vm;

/// Why an access to guest memory failed.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(super) enum AccessError {
    /// No frame was free to back a page being written.
    NoMemory,
    /// The page is not guest RAM (the callers' checks prevent it).
    OutsideRam(Ipa),
}

/// What to do with a page that is not backed.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Unbacked {
    /// Reading: it is all zeros, leave it unbacked.
    ReadZeros,
    /// Writing: back it with a zeroed frame first.
    Back,
}

/// Runs `f` with the frame behind guest page `page` pinned; `None` when the
/// page is unbacked and `mode` is [`Unbacked::ReadZeros`].
fn with_frame<R>(
    vm: &Vm,
    page: Ipa,
    mode: Unbacked,
    mut f: impl FnMut(PhysAddr) -> R,
) -> Result<Option<R>, AccessError> {
    // The callers' argument checks keep every access inside guest RAM;
    // this is the last line of defence should one of them be wrong.
    if !vm.in_ram(page) {
        return Err(AccessError::OutsideRam(page));
    }
    loop {
        match vm.stage2.with_page_pinned(page, &mut f) {
            Ok(r) => return Ok(Some(r)),
            Err(PinError::NotMapped(_)) if mode == Unbacked::ReadZeros => return Ok(None),
            Err(PinError::NotMapped(_)) => {
                vm.install_zeroed(page).map_err(|_| AccessError::NoMemory)?;
            }
            // A writer (migration, release, another pin) holds the entry
            // for a bounded time: try again. Nothing is held between two
            // attempts, so a grace period another CPU waits for may end.
            Err(PinError::Busy { .. }) => {
                super::RCU.quiescent();
                core::hint::spin_loop();
            }
            // The callers check that the page is guest RAM.
            Err(PinError::OutOfRange(_)) => return Err(AccessError::OutsideRam(page)),
        }
    }
}

/// Runs `f` with the frame behind guest page `page` pinned, backing the
/// page with a zeroed frame first if the guest never touched it.
pub(super) fn with_backed_frame<R>(
    vm: &Vm,
    page: Ipa,
    mut f: impl FnMut(PhysAddr) -> R,
) -> Result<R, AccessError> {
    let r = with_frame(vm, page, Unbacked::Back, &mut f)?;
    // `Back` never leaves the page unbacked.
    r.ok_or(AccessError::NoMemory)
}

/// The pieces of `[ipa, ipa + len)` that lie in one page each: the page,
/// the offset in it, and the piece's range in a buffer of `len` bytes.
fn page_pieces(ipa: u64, len: usize) -> impl Iterator<Item = (Ipa, u64, Range<usize>)> {
    let mut done = 0;
    core::iter::from_fn(move || {
        if done == len {
            return None;
        }
        let at = ipa + done as u64;
        let offset = at % PAGE_SIZE;
        let n = ((PAGE_SIZE - offset) as usize).min(len - done);
        let piece = (Ipa(at - offset), offset, done..done + n);
        done += n;
        Some(piece)
    })
}

/// Copies `dst.len()` bytes of guest memory from `ipa` (any alignment; the
/// range lies inside guest RAM, checked by the caller).
pub(super) fn read(vm: &Vm, ipa: u64, dst: &mut [u8]) -> Result<(), AccessError> {
    for (page, offset, range) in page_pieces(ipa, dst.len()) {
        let n = range.len();
        let out = &mut dst[range];
        let copied = with_frame(vm, page, Unbacked::ReadZeros, |pa| {
            // SAFETY: the frame is pinned (it cannot be freed or moved
            // while `f` runs) and identity mapped; `offset + n` stays
            // inside it; `out` is our own buffer.
            unsafe {
                core::ptr::copy_nonoverlapping(
                    (pa.as_u64() + offset) as *const u8,
                    out.as_mut_ptr(),
                    n,
                )
            };
        })?;
        if copied.is_none() {
            out.fill(0);
        }
    }
    Ok(())
}

/// Copies `src` into guest memory at `ipa` (any alignment; the range lies
/// inside guest RAM, checked by the caller), backing untouched pages.
pub(super) fn write(vm: &Vm, ipa: u64, src: &[u8]) -> Result<(), AccessError> {
    for (page, offset, range) in page_pieces(ipa, src.len()) {
        let n = range.len();
        let from = &src[range];
        with_frame(vm, page, Unbacked::Back, |pa| {
            // SAFETY: as in `read`, with the copy going the other way.
            unsafe {
                core::ptr::copy_nonoverlapping(from.as_ptr(), (pa.as_u64() + offset) as *mut u8, n)
            };
        })?;
    }
    Ok(())
}

/// Reads `words.len()` little-endian u64 words from `ipa`.
pub(super) fn read_words(vm: &Vm, ipa: u64, words: &mut [u64]) -> Result<(), AccessError> {
    // SAFETY: a `[u64]` is also a valid `[u8]` of 8 times the length, and
    // every byte pattern is a valid u64.
    let bytes = unsafe {
        core::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), words.len() * 8)
    };
    read(vm, ipa, bytes)?;
    for w in words.iter_mut() {
        *w = u64::from_le(*w);
    }
    Ok(())
}

/// Writes `words` to `ipa` as little-endian u64 words (converted in place).
pub(super) fn write_words(vm: &Vm, ipa: u64, words: &mut [u64]) -> Result<(), AccessError> {
    for w in words.iter_mut() {
        *w = w.to_le();
    }
    // SAFETY: as in `read_words`.
    let bytes =
        unsafe { core::slice::from_raw_parts(words.as_ptr().cast::<u8>(), words.len() * 8) };
    write(vm, ipa, bytes)
}
