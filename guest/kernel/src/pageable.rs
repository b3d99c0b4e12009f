//! Pageable memory: the arena the reclaimer evicts pages from, and the
//! stage-1 fault handler that brings them back.
//!
//! The arena is a run of guest RAM mapped with 4 KiB pages in the kernel's
//! identity map (VA == IPA) and kept out of the frame allocator. Page `i`
//! is at `base + i * 4 KiB` and its key in the hypervisor's page store is
//! `i`.
//!
//! - **Evict** ([`evict`]): unmap the page in stage 1 and invalidate its
//!   TLB entries, `STORE_PUT` it (the hypervisor compresses it), then
//!   `MEM_RELEASE` it: the hypervisor unmaps it in stage 2 and frees the
//!   frame.
//! - **Refault** ([`handle_fault`], called from the exception vector): a
//!   level-3 translation fault inside the arena is an access to an evicted
//!   page; `STORE_GET` writes it back (the hypervisor backs the IPA with a
//!   fresh frame first), the stage-1 entry becomes valid again, and the
//!   access is retried. The page's checksum is verified on every refault;
//!   a mismatch is counted ([`mismatches`]) and logged.
//!
//! Page contents are generated ([`write_page`]): a header (page number,
//! version), 496 pseudo-random bytes, and a repeated word, so a page
//! compresses to roughly an eighth. The expected checksum of each page is
//! kept outside the arena.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use spin::Once;

use crate::addr::{PhysAddr, PhysRange, PAGE_SIZE};
use crate::exceptions::AbortRecord;
use crate::mmu;
use crate::smccc_client::{self, CallError};

/// The arena and the bookkeeping the fault handler needs.
struct Arena {
    range: PhysRange,
    /// Expected checksum of each page (set on every write).
    checksums: Vec<AtomicU32>,
}

static ARENA: Once<Arena> = Once::new();
static REFAULTS: AtomicU64 = AtomicU64::new(0);
static MISMATCHES: AtomicU64 = AtomicU64::new(0);

/// Words in a page.
const WORDS: usize = (PAGE_SIZE / 8) as usize;
/// Words of pseudo-random payload after the two header words.
const RANDOM_WORDS: usize = 62;

/// Makes `range` (page aligned, mapped with pages by [`mmu::init`]) the
/// arena. Once.
pub fn init(range: PhysRange) {
    let pages = ((range.end.as_u64() - range.start.as_u64()) / PAGE_SIZE) as usize;
    ARENA.call_once(|| Arena {
        range,
        checksums: (0..pages).map(|_| AtomicU32::new(0)).collect(),
    });
}

fn arena() -> &'static Arena {
    ARENA.get().expect("pageable::init was not called")
}

/// Pages in the arena.
pub fn pages() -> u32 {
    arena().checksums.len() as u32
}

/// IPA (and VA) of page `page`.
pub fn page_addr(page: u32) -> u64 {
    arena().range.start.as_u64() + u64::from(page) * PAGE_SIZE
}

/// Refaults served since boot.
pub fn refaults() -> u64 {
    REFAULTS.load(Ordering::Relaxed)
}

/// Checksum mismatches (refaults and reads) since boot.
pub fn mismatches() -> u64 {
    MISMATCHES.load(Ordering::Relaxed)
}

/// A 32-bit checksum of a page's words (multiply-rotate over u64 words).
fn checksum(words: &[u64; WORDS]) -> u32 {
    let mut h: u64 = 0x9e37_79b9_7f4a_7c15;
    for &w in words {
        h = (h ^ w).wrapping_mul(0xff51_afd7_ed55_8ccd).rotate_left(29);
    }
    (h ^ (h >> 32)) as u32
}

fn page_words(page: u32) -> *mut [u64; WORDS] {
    page_addr(page) as *mut [u64; WORDS]
}

/// Writes version `version` of page `page` (faulting it in if evicted) and
/// records its checksum.
pub fn write_page(page: u32, version: u32) {
    let mut rng = u64::from(page) << 32 | u64::from(version);
    let mut next = || {
        // SplitMix64 step.
        rng = rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let fill = next();
    let ptr = page_words(page);
    // SAFETY: the page is in the arena, identity mapped (a stage-1 fault
    // on an evicted page is served by `handle_fault` and the access
    // retried), and only the single workload thread touches arena pages.
    let words = unsafe { &mut *ptr };
    words[0] = u64::from(page);
    words[1] = u64::from(version);
    for w in &mut words[2..2 + RANDOM_WORDS] {
        *w = next();
    }
    for w in &mut words[2 + RANDOM_WORDS..] {
        *w = fill;
    }
    arena().checksums[page as usize].store(checksum(words), Ordering::Relaxed);
}

/// Reads page `page` (faulting it in if evicted); a header that names
/// another page counts as a mismatch.
pub fn read_page(page: u32) -> u64 {
    // SAFETY: as in `write_page`; a volatile read so the access happens.
    let first = unsafe { core::ptr::read_volatile(page_words(page).cast::<u64>()) };
    if first != u64::from(page) {
        MISMATCHES.fetch_add(1, Ordering::Relaxed);
        log::error!("pageable: page {page} reads header {first:#x}");
    }
    first
}

/// Why a page could not be evicted.
#[derive(Copy, Clone, Debug)]
pub enum EvictError {
    /// `STORE_PUT` refused (the store is full): the page stays resident.
    Store(CallError),
    /// `MEM_RELEASE` failed (the page is stored but still backed).
    Release(CallError),
}

impl core::fmt::Display for EvictError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Store(e) => write!(f, "store: {e}"),
            Self::Release(e) => write!(f, "release: {e}"),
        }
    }
}

/// Evicts page `page`: stage-1 unmap + TLB invalidate, `STORE_PUT`,
/// `MEM_RELEASE`. Returns the bytes it takes in the store.
pub fn evict(page: u32) -> Result<u64, EvictError> {
    let addr = page_addr(page);
    mmu::set_page_valid(PhysAddr(addr), false);
    let bytes = match smccc_client::store_put(u64::from(page), addr) {
        Ok(b) => b,
        Err(e) => {
            mmu::set_page_valid(PhysAddr(addr), true);
            return Err(EvictError::Store(e));
        }
    };
    smccc_client::mem_release(addr, 1).map_err(EvictError::Release)?;
    Ok(bytes)
}

/// Brings back page `page` if it is evicted; used by [`handle_fault`] and
/// to reset the arena. Returns whether the page came from the store.
fn restore(page: u32) -> Result<bool, CallError> {
    let addr = page_addr(page);
    if mmu::page_is_valid(PhysAddr(addr)) {
        return Ok(false);
    }
    smccc_client::store_get(u64::from(page), addr)?;
    mmu::set_page_valid(PhysAddr(addr), true);
    Ok(true)
}

/// The stage-1 fault handler: serves a translation fault on an evicted
/// arena page. Returns `false` when `abort` is not one.
pub fn handle_fault(abort: &AbortRecord) -> bool {
    let Some(arena) = ARENA.get() else {
        return false;
    };
    if !abort.is_translation_fault_at_current_el() {
        return false;
    }
    let Some(far) = abort.fault_address() else {
        return false;
    };
    if !arena.range.contains(far) {
        return false;
    }
    let page = ((far.as_u64() - arena.range.start.as_u64()) / PAGE_SIZE) as u32;
    match restore(page) {
        Ok(_) => {}
        Err(e) => {
            log::error!("pageable: refault of page {page} failed: {e}");
            return false;
        }
    }
    REFAULTS.fetch_add(1, Ordering::Relaxed);
    // SAFETY: the page was just mapped again; nothing else writes it.
    let words = unsafe { &*page_words(page) };
    let expected = arena.checksums[page as usize].load(Ordering::Relaxed);
    if checksum(words) != expected {
        MISMATCHES.fetch_add(1, Ordering::Relaxed);
        log::error!("pageable: page {page} checksum mismatch after refault");
    }
    true
}

/// Puts every page back to "never touched": evicted pages are dropped
/// from the store and mapped again in stage 1, and every frame is released
/// to the hypervisor. Between runs.
pub fn reset() -> Result<(), CallError> {
    let n = pages();
    for page in 0..n {
        let addr = PhysAddr(page_addr(page));
        if !mmu::page_is_valid(addr) {
            smccc_client::store_drop(u64::from(page))?;
            mmu::set_page_valid(addr, true);
        }
        arena().checksums[page as usize].store(0, Ordering::Relaxed);
    }
    let max = smccc_client::aging_features()?.max_release_pages.max(1);
    let mut page = 0u64;
    while page < u64::from(n) {
        let count = (u64::from(n) - page).min(max);
        smccc_client::mem_release(page_addr(page as u32), count)?;
        page += count;
    }
    Ok(())
}
