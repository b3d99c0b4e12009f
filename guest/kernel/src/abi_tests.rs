//! The on-target tests of the aging, release and store calls
//! (`AGING_FEATURES` .. `STORE_DROP` and the `STATS` groups), run by
//! [`crate::selftest`] before `hypervisor_still_alive`.
//!
//! Most are bad-input tests: each feeds a call the arguments docs/ABI.md
//! rejects, checks the exact error code in `x0` (raw `call64`, so no
//! wrapper can hide it), and ends with a good call that must succeed, since
//! a rejected call must leave the guest and the hypervisor working. The
//! hypervisor logs every rejection; `scripts/smoke` checks those lines.
//!
//! Pages handed to the hypervisor come from the frame allocator (identity
//! mapped, VA == IPA) and are accessed only through [`Page`], with volatile
//! word accesses: the hypervisor reads and writes them behind the
//! compiler's back.

use alloc::format;
use core::fmt;
use core::marker::PhantomData;

use hyp_abi::error::{INVALID_PARAMETER, NOT_FOUND, NOT_SUPPORTED, NO_MEMORY, SUCCESS};
use hyp_abi::layout::{RAM_BASE, UART_IPA, UNBACKED_IPA};
use hyp_abi::{age_flags, feature, func, limits, stats_group};

use crate::addr::{PhysAddr, PAGE_SIZE};
use crate::frames::{self, FrameRun};
use crate::mmu;
use crate::selftest::{hvc64_x0, require, require_answer, Failure};
use crate::smccc_client::{self, VendorCall};
use crate::System;

/// u64 words in a page.
const PAGE_WORDS: usize = (PAGE_SIZE / 8) as usize;

/// The highest page-aligned IPA: any range from it overflows.
const TOP_PAGE: u64 = !(PAGE_SIZE - 1);

/// A value the tests fill memory with to see whether anything wrote it.
const SENTINEL: u64 = 0x5e47_1e15_a5a5_5a5a;

/// Page `i` of a frame run the test holds; the borrow keeps the run
/// allocated for as long as the page is used.
#[derive(Copy, Clone, Debug)]
struct Page<'run> {
    pa: PhysAddr,
    _run: PhantomData<&'run FrameRun>,
}

impl<'run> Page<'run> {
    fn of(run: &'run FrameRun, i: usize) -> Self {
        Self {
            pa: run.frame(i),
            _run: PhantomData,
        }
    }

    fn ipa(self) -> u64 {
        self.pa.as_u64()
    }

    /// Word `i` of the page.
    fn word(self, i: usize) -> *mut u64 {
        assert!(i < PAGE_WORDS, "word {i} of a page");
        self.pa.as_ptr::<u64>().wrapping_add(i)
    }

    fn read(self, i: usize) -> u64 {
        // SAFETY: the page is a frame of a run the test holds (the borrow
        // in `Page` keeps it allocated), RAM identity mapped read-write;
        // `word` keeps the u64-aligned access inside the page. Volatile:
        // the hypervisor may have written it.
        unsafe { self.word(i).read_volatile() }
    }

    fn write(self, i: usize, value: u64) {
        // SAFETY: as in `read`.
        unsafe { self.word(i).write_volatile(value) }
    }

    fn fill(self, mut f: impl FnMut(usize) -> u64) {
        for i in 0..PAGE_WORDS {
            self.write(i, f(i));
        }
    }

    /// Fails unless every word `i` of the page is `f(i)`, naming the first
    /// that is not.
    fn require(self, what: &'static str, mut f: impl FnMut(usize) -> u64) -> Result<(), Failure> {
        for i in 0..PAGE_WORDS {
            let (want, got) = (f(i), self.read(i));
            require(
                want == got,
                what,
                format_args!("word {i} = {want:#x}"),
                format_args!("{got:#x} (page {})", self.pa),
            )?;
        }
        Ok(())
    }
}

/// Runs `body` with a run of `count` frames, then frees it whatever the
/// outcome.
fn with_frames<R>(
    count: usize,
    body: impl FnOnce(&FrameRun) -> Result<R, Failure>,
) -> Result<R, Failure> {
    let run = frames::alloc(count)?;
    let result = body(&run);
    frames::free(run);
    result
}

/// A deterministic PRNG (xorshift64*): page contents that do not compress
/// and can be regenerated from the seed.
#[derive(Debug)]
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        // A zero state would stay zero.
        Self(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// The function ID of `call`.
fn function_id(call: VendorCall) -> u32 {
    match call {
        VendorCall::CallUid => func::CALL_UID,
        VendorCall::Revision => func::REVISION,
        VendorCall::Features => func::FEATURES,
        VendorCall::Stats => func::STATS,
        VendorCall::Exit => func::EXIT,
        VendorCall::AgingFeatures => func::AGING_FEATURES,
        VendorCall::AgingTestClear => func::AGING_TEST_CLEAR,
        VendorCall::MemRelease => func::MEM_RELEASE,
        VendorCall::StorePut => func::STORE_PUT,
        VendorCall::StoreGet => func::STORE_GET,
        VendorCall::StoreDrop => func::STORE_DROP,
    }
}

/// Arguments shown as `0x1, 0x2` in failure messages.
struct Hex<'a>(&'a [u64]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sep = "";
        for arg in self.0 {
            write!(f, "{sep}{arg:#x}")?;
            sep = ", ";
        }
        Ok(())
    }
}

/// Makes `call(args)` with a raw HVC and requires `expected` in `x0`;
/// `why` says what the arguments are.
fn answer(call: VendorCall, args: &[u64], why: &str, expected: i64) -> Result<(), Failure> {
    let x0 = hvc64_x0(function_id(call), args);
    require_answer(format_args!("{call}({}) [{why}]", Hex(args)), expected, x0)
}

/// Attempts an Access-Flag check gets (see [`with_af_retries`]).
const AF_ATTEMPTS: u32 = 8;

/// Runs the Access-Flag check `attempt` until it passes, at most
/// [`AF_ATTEMPTS`] times, logging `AF check retried` before each retry.
///
/// Why retry at all: with `aging_cpu=` (the smoke matrix's aging-stress
/// cases run this suite too) the hypervisor's aging worker clears Access
/// Flags concurrently, without TLB invalidation, and its migrations lock a
/// page for a moment (a locked page reads old). A page the test just
/// touched can then read old, or a cached translation can keep the next
/// touch from setting the flag again; a retry first drops this CPU's TLB
/// entries. Without the worker nothing else clears our pages' flags and
/// the first attempt must pass: the guest-tests smoke cases fail on the
/// retry line.
fn with_af_retries(
    test: &str,
    mut attempt: impl FnMut() -> Result<(), Failure>,
) -> Result<(), Failure> {
    let mut n = 1;
    loop {
        match attempt() {
            Ok(()) => return Ok(()),
            Err(failure) if n >= AF_ATTEMPTS => return Err(failure),
            Err(failure) => {
                log::warn!("{test}: AF check retried after attempt {n}: {failure}");
                mmu::invalidate_local_tlb();
                n += 1;
            }
        }
    }
}

/// `AGING_FEATURES` answers the documented flags and limits and the AF
/// mode `FEATURES` reports; `FEATURES` lists the aging, release and store
/// calls.
pub(crate) fn aging_features(_: &System) -> Result<(), Failure> {
    let aging = smccc_client::aging_features()?;
    require(
        aging.flags == age_flags::ALL,
        "AGING_FEATURES x0 (flags)",
        format_args!("{:#x}", age_flags::ALL),
        format_args!("{:#x}", aging.flags),
    )?;
    require(
        aging.max_pages == limits::AGING_MAX_PAGES,
        "AGING_FEATURES x1 (most pages per AGING_TEST_CLEAR)",
        limits::AGING_MAX_PAGES,
        aging.max_pages,
    )?;
    require(
        aging.max_release_pages == limits::RELEASE_MAX_PAGES,
        "AGING_FEATURES x2 (most pages per MEM_RELEASE)",
        limits::RELEASE_MAX_PAGES,
        aging.max_release_pages,
    )?;
    let features = smccc_client::features()?;
    require(
        aging.af_mode.is_some() && aging.af_mode == features.af_mode,
        "AGING_FEATURES x3 (AF mode)",
        format_args!("{:?}, as FEATURES x1", features.af_mode),
        format_args!("{:?}", aging.af_mode),
    )?;
    let wanted = feature::AGING | feature::MEM_RELEASE | feature::STORE;
    require(
        features.has(wanted),
        "FEATURES bitmap",
        format_args!("bits {wanted:#x} set"),
        format_args!("{:#x}", features.calls),
    )
}

/// `AGING_TEST_CLEAR` rejects every bad range, bitmap and flag word with
/// `INVALID_PARAMETER` and writes nothing; then a page the test touches is
/// reported young, and old after a `CLEAR`.
pub(crate) fn aging_bad_input(system: &System) -> Result<(), Failure> {
    let ram_end = system.platform.ram.end.as_u64();
    with_frames(128, |run| {
        // 65 pages from frame 0: two bitmap words. The page and the bitmap
        // lie after that range.
        let range = Page::of(run, 0).ipa();
        let page = Page::of(run, 126);
        let bitmap = Page::of(run, 127);
        let bm = bitmap.ipa();
        let p = page.ipa();
        let (clear, mask, flush) = (age_flags::CLEAR, age_flags::MASK, age_flags::FLUSH);
        let cases: [(&str, [u64; 4]); 32] = [
            ("ipa not page aligned", [p + 8, 1, bm, 0]),
            ("ipa one byte off", [p + 1, 1, bm, clear]),
            ("npages 0", [p, 0, bm, 0]),
            (
                "npages above AGING_MAX_PAGES",
                [range, limits::AGING_MAX_PAGES + 1, bm, 0],
            ),
            ("npages u64::MAX", [range, u64::MAX, bm, 0]),
            ("ipa the page below RAM", [RAM_BASE - PAGE_SIZE, 1, bm, 0]),
            (
                "range from below RAM into it",
                [RAM_BASE - PAGE_SIZE, 2, bm, 0],
            ),
            ("ipa 0", [0, 1, bm, 0]),
            ("ipa the UART (MMIO)", [UART_IPA, 1, bm, 0]),
            ("ipa the unbacked IPA", [UNBACKED_IPA, 1, bm, 0]),
            ("ipa the first page after RAM", [ram_end, 1, bm, 0]),
            (
                "range crossing the end of RAM",
                [ram_end - PAGE_SIZE, 2, bm, clear],
            ),
            ("ipa + npages overflows", [TOP_PAGE, 1, bm, 0]),
            ("ipa + npages wraps", [TOP_PAGE, 16, bm, 0]),
            ("bitmap not 8-byte aligned", [range, 65, bm + 4, 0]),
            ("bitmap one byte off", [range, 1, bm + 1, 0]),
            ("bitmap below RAM", [range, 1, RAM_BASE - 8, 0]),
            (
                "bitmap from below RAM into it",
                [range, 65, RAM_BASE - 8, 0],
            ),
            ("bitmap at 0", [range, 1, 0, 0]),
            ("bitmap on the UART (MMIO)", [range, 1, UART_IPA, 0]),
            ("bitmap at the unbacked IPA", [range, 1, UNBACKED_IPA, 0]),
            (
                "bitmap's last word past the end of RAM",
                [range, 65, ram_end - 8, 0],
            ),
            ("bitmap after RAM", [range, 1, ram_end, 0]),
            ("bitmap + 8 bytes overflows", [range, 1, !7, 0]),
            ("bitmap + 16 bytes wraps", [range, 65, !15, 0]),
            ("unknown flag bit 3", [p, 1, bm, 8]),
            ("CLEAR and unknown flag bit 3", [p, 1, bm, clear | 8]),
            ("unknown flag bit 63", [p, 1, bm, 1 << 63]),
            ("flags u64::MAX", [p, 1, bm, u64::MAX]),
            ("MASK without CLEAR", [p, 1, bm, mask]),
            ("FLUSH without CLEAR", [p, 1, bm, flush]),
            ("MASK|FLUSH without CLEAR", [p, 1, bm, mask | flush]),
        ];
        bitmap.fill(|_| SENTINEL);
        for (why, args) in cases {
            answer(VendorCall::AgingTestClear, &args, why, INVALID_PARAMETER)?;
        }
        bitmap.require("the bitmap page after rejected calls (unwritten)", |_| {
            SENTINEL
        })?;
        with_af_retries("aging_bad_input", || touched_page_ages(page, bitmap))
    })
}

/// One attempt of [`aging_bad_input`]'s good calls: a touched page reads
/// young (its bit set, the rest of the word cleared, the next word not
/// written); after a `CLEAR` it reads old.
fn touched_page_ages(page: Page<'_>, bitmap: Page<'_>) -> Result<(), Failure> {
    let (p, bm) = (page.ipa(), bitmap.ipa());
    // Start old, with no cached translation that could hide the touch.
    smccc_client::aging_test_clear(p, 1, bm, age_flags::CLEAR | age_flags::FLUSH)?;
    page.write(0, p);
    bitmap.write(0, u64::MAX);
    bitmap.write(1, SENTINEL);
    let young = smccc_client::aging_test_clear(p, 1, bm, 0)?;
    let (w0, w1) = (bitmap.read(0), bitmap.read(1));
    require(
        young == 1 && w0 == 1 && w1 == SENTINEL,
        "AGING_TEST_CLEAR(page, 1, bitmap, 0) after touching the page",
        format_args!("young 1, bitmap word 0 = 0x1, word 1 unwritten ({SENTINEL:#x})"),
        format_args!("young {young}, word 0 = {w0:#x}, word 1 = {w1:#x}"),
    )?;
    let young = smccc_client::aging_test_clear(p, 1, bm, age_flags::CLEAR)?;
    let w0 = bitmap.read(0);
    require(
        young == 1 && w0 == 1,
        "AGING_TEST_CLEAR(page, 1, bitmap, CLEAR) of the young page",
        "young 1, bitmap 0x1",
        format_args!("young {young}, bitmap {w0:#x}"),
    )?;
    let young = smccc_client::aging_test_clear(p, 1, bm, 0)?;
    let w0 = bitmap.read(0);
    require(
        young == 0 && w0 == 0,
        "AGING_TEST_CLEAR(page, 1, bitmap, 0) after CLEAR",
        "old: young 0, bitmap 0x0",
        format_args!("young {young}, bitmap {w0:#x}"),
    )
}

/// Pages of the look-around window, and the two the test touches.
const WINDOW: u64 = 64;
const PAGE_A: usize = 5;
const PAGE_B: usize = 40;

/// `CLEAR|MASK` reports every young page of the window but clears only
/// those set in the input bitmap: after touching A and B with only A's bit
/// set, both read young, and then A old and B still young.
pub(crate) fn aging_mask_look_around(_: &System) -> Result<(), Failure> {
    with_frames(2 * WINDOW as usize, |run| {
        let window = Page::of(run, 0).ipa();
        let (a, b) = (Page::of(run, PAGE_A), Page::of(run, PAGE_B));
        let bitmap = Page::of(run, WINDOW as usize);
        with_af_retries("aging_mask_look_around", || {
            look_around(window, a, b, bitmap)
        })
    })
}

/// One attempt of [`aging_mask_look_around`].
fn look_around(window: u64, a: Page<'_>, b: Page<'_>, bitmap: Page<'_>) -> Result<(), Failure> {
    let bm = bitmap.ipa();
    let (bit_a, bit_b) = (1u64 << PAGE_A, 1u64 << PAGE_B);
    smccc_client::aging_test_clear(window, WINDOW, bm, age_flags::CLEAR | age_flags::FLUSH)?;
    let young = smccc_client::aging_test_clear(window, WINDOW, bm, 0)?;
    let word = bitmap.read(0);
    require(
        young == 0 && word == 0,
        "the window after CLEAR|FLUSH",
        "all old: young 0, bitmap 0x0",
        format_args!("young {young}, bitmap {word:#x}"),
    )?;
    a.write(0, a.ipa());
    b.write(0, b.ipa());
    bitmap.write(0, bit_a);
    let young =
        smccc_client::aging_test_clear(window, WINDOW, bm, age_flags::CLEAR | age_flags::MASK)?;
    let word = bitmap.read(0);
    require(
        young == 2 && word == bit_a | bit_b,
        "CLEAR|MASK with only A set, after touching A and B",
        format_args!("young 2, bitmap {:#x}", bit_a | bit_b),
        format_args!("young {young}, bitmap {word:#x}"),
    )?;
    let young = smccc_client::aging_test_clear(window, WINDOW, bm, 0)?;
    let word = bitmap.read(0);
    require(
        young == 1 && word == bit_b,
        "the window after clearing A only",
        format_args!("A old, B young: young 1, bitmap {bit_b:#x}"),
        format_args!("young {young}, bitmap {word:#x}"),
    )
}

/// `MEM_RELEASE` rejects every bad range with `INVALID_PARAMETER` and
/// releases nothing; a release of exactly `RELEASE_MAX_PAGES` works and
/// the released page reads zero.
pub(crate) fn release_bad_input(system: &System) -> Result<(), Failure> {
    const MAX: u64 = limits::RELEASE_MAX_PAGES;
    const MARK: u64 = 0x7e1e_a5ed_0000_0001;
    let ram_end = system.platform.ram.end.as_u64();
    with_frames(MAX as usize, |run| {
        let page = Page::of(run, 0);
        let p = page.ipa();
        let cases: [(&str, [u64; 2]); 15] = [
            ("ipa not page aligned", [p + 8, 1]),
            ("ipa half a page off", [p + PAGE_SIZE / 2, 1]),
            ("npages 0", [p, 0]),
            ("npages above RELEASE_MAX_PAGES", [p, MAX + 1]),
            ("npages u64::MAX", [p, u64::MAX]),
            ("ipa the page below RAM", [RAM_BASE - PAGE_SIZE, 1]),
            ("range from below RAM into it", [RAM_BASE - PAGE_SIZE, 2]),
            ("ipa 0", [0, 1]),
            ("ipa the UART (MMIO)", [UART_IPA, 1]),
            ("ipa the unbacked IPA", [UNBACKED_IPA, 1]),
            ("ipa the first page after RAM", [ram_end, 1]),
            ("range crossing the end of RAM", [ram_end - PAGE_SIZE, 2]),
            (
                "the last MAX pages of RAM and one more",
                [ram_end - MAX * PAGE_SIZE, MAX + 1],
            ),
            ("ipa + npages overflows", [TOP_PAGE, 1]),
            ("ipa + npages wraps", [TOP_PAGE - PAGE_SIZE, MAX]),
        ];
        page.write(0, MARK);
        let before = smccc_client::stats_group(stats_group::MEMORY)?;
        for (why, args) in cases {
            answer(VendorCall::MemRelease, &args, why, INVALID_PARAMETER)?;
        }
        let after = smccc_client::stats_group(stats_group::MEMORY)?;
        require(
            after[2] == before[2],
            "STATS(MEMORY) pages released since boot, across rejected calls",
            before[2],
            after[2],
        )?;
        let word = page.read(0);
        require(
            word == MARK,
            "a written page after rejected releases",
            format_args!("{MARK:#x}"),
            format_args!("{word:#x}"),
        )?;
        let released = smccc_client::mem_release(p, MAX)?;
        require(
            (1..=MAX).contains(&released.pages),
            "MEM_RELEASE(ipa, RELEASE_MAX_PAGES) x0 (pages released), one written",
            format_args!("1..={MAX}"),
            released.pages,
        )?;
        let word = page.read(0);
        require(
            word == 0,
            "the written page after its release",
            "0 (a fresh zeroed frame)",
            format_args!("{word:#x}"),
        )
    })
}

/// A released page comes back zeroed on the next access; `STATS(FAULTS)`
/// counts one frame fewer after the release and one more after the
/// access.
pub(crate) fn release_gives_zeroed_page(_: &System) -> Result<(), Failure> {
    with_frames(1, |run| {
        let page = Page::of(run, 0);
        let mut rng = XorShift::new(page.ipa());
        page.fill(|_| rng.next());
        let memory_before = smccc_client::stats_group(stats_group::MEMORY)?;
        // Nothing between these calls may touch a fresh page (no
        // allocation, no logging): the counts must move by exactly one.
        let before = smccc_client::stats()?;
        let released = smccc_client::mem_release(page.ipa(), 1)?;
        let after_release = smccc_client::stats()?;
        let first = page.read(0);
        let after_access = smccc_client::stats()?;
        require(
            released.pages == 1,
            "MEM_RELEASE(page, 1) x0 (pages released) of a written page",
            1,
            released.pages,
        )?;
        require(
            after_release.frames_mapped == before.frames_mapped.wrapping_sub(1),
            "STATS frames mapped after the release",
            before.frames_mapped.wrapping_sub(1),
            after_release.frames_mapped,
        )?;
        require(
            after_access.frames_mapped == after_release.frames_mapped + 1,
            "STATS frames mapped after the next access",
            after_release.frames_mapped + 1,
            after_access.frames_mapped,
        )?;
        require(
            first == 0,
            "first word of the released page",
            0,
            format_args!("{first:#x}"),
        )?;
        page.require("the released page after the next access", |_| 0)?;
        let memory_after = smccc_client::stats_group(stats_group::MEMORY)?;
        require(
            memory_after[2] == memory_before[2] + 1,
            "STATS(MEMORY) pages released since boot",
            memory_before[2] + 1,
            memory_after[2],
        )
    })
}

/// How many times `release_frees_leaf_table` reads `STATS(MEMORY)` while
/// the emptied table waits for its grace period.
const TABLE_POLLS: u32 = 64;

/// Releasing a whole touched 2 MiB block empties its stage-2 leaf table:
/// the answer counts it, `STATS(MEMORY)` table pages go down (after a
/// grace period), and every page reads zero afterwards.
pub(crate) fn release_frees_leaf_table(_: &System) -> Result<(), Failure> {
    const PAGES: usize = 512;
    const BLOCK: u64 = PAGES as u64 * PAGE_SIZE;
    const MARK: u64 = 0x1eaf_7ab1_e000_0000;
    // The buddy allocator aligns a run to its size rounded up to a power
    // of two: 512 frames are one 2 MiB block, one leaf table.
    with_frames(PAGES, |run| {
        let base = run.frame(0).as_u64();
        require(
            base.is_multiple_of(BLOCK),
            "start of a 512-frame run",
            "2 MiB aligned",
            format_args!("{base:#x}"),
        )?;
        for i in 0..PAGES {
            Page::of(run, i).write(i % PAGE_WORDS, MARK ^ i as u64);
        }
        let before = smccc_client::stats_group(stats_group::MEMORY)?;
        let released = smccc_client::mem_release(base, PAGES as u64)?;
        require(
            released.pages == PAGES as u64,
            "MEM_RELEASE(2 MiB) x0 (pages released), all touched",
            PAGES,
            released.pages,
        )?;
        require(
            released.tables >= 1,
            "MEM_RELEASE(2 MiB) x1 (table pages unlinked)",
            ">= 1",
            released.tables,
        )?;
        let mut now = smccc_client::stats_group(stats_group::MEMORY)?;
        let mut polls = 1;
        while now[0] >= before[0] && polls < TABLE_POLLS {
            now = smccc_client::stats_group(stats_group::MEMORY)?;
            polls += 1;
        }
        require(
            now[0] < before[0],
            "STATS(MEMORY) table pages after releasing 2 MiB",
            format_args!("< {} within {TABLE_POLLS} reads", before[0]),
            now[0],
        )?;
        require(
            now[1] >= before[1] + released.tables,
            "STATS(MEMORY) table pages unlinked since boot",
            format_args!(">= {}", before[1] + released.tables),
            now[1],
        )?;
        for i in 0..PAGES {
            let word = Page::of(run, i).read(i % PAGE_WORDS);
            require(
                word == 0,
                "a word of the released 2 MiB, read again",
                "0",
                format_args!("{word:#x} (page {i})"),
            )?;
        }
        Page::of(run, PAGES - 1).require("the last released page", |_| 0)
    })
}

/// Store keys of this suite: `KEY_TAG | test << 24 | n`.
const KEY_TAG: u64 = 0xab1e_57e5 << 32;

fn key(test: u64, n: u64) -> u64 {
    KEY_TAG | test << 24 | n
}

/// The words [`fill_checked`] writes for `seed`: a PRNG stream, then a
/// checksum of it in the last word.
fn checked_words(seed: u64) -> impl FnMut(usize) -> u64 {
    let mut rng = XorShift::new(seed);
    let mut sum = 0u64;
    move |i| {
        if i + 1 < PAGE_WORDS {
            let w = rng.next();
            sum = sum.rotate_left(7) ^ w;
            w
        } else {
            sum
        }
    }
}

/// `STORE_PUT` and `STORE_GET` reject bad page addresses with
/// `INVALID_PARAMETER` (a rejected `PUT` stores nothing, a rejected `GET`
/// takes nothing); a key never put is `NOT_FOUND` for `GET` (the target
/// page untouched) and `DROP`; `STATS` rejects an unknown group.
pub(crate) fn store_bad_input(system: &System) -> Result<(), Failure> {
    let ram_end = system.platform.ram.end.as_u64();
    let (stored, never) = (key(1, 0), key(1, 1));
    with_frames(2, |run| {
        let (src, dst) = (Page::of(run, 0), Page::of(run, 1));
        src.fill(checked_words(stored));
        smccc_client::store_put(stored, src.ipa())?;
        let result = store_rejections(ram_end, src, dst, stored, never);
        if result.is_err() {
            // Leave the store as found; the entry may be gone already.
            let _ = smccc_client::store_drop(stored);
        }
        result
    })
}

/// The body of [`store_bad_input`], with `stored` in the store.
fn store_rejections(
    ram_end: u64,
    src: Page<'_>,
    dst: Page<'_>,
    stored: u64,
    never: u64,
) -> Result<(), Failure> {
    let bad: [(&str, u64); 9] = [
        ("ipa not page aligned", src.ipa() + 8),
        ("ipa one byte off", src.ipa() + 1),
        ("ipa the page below RAM", RAM_BASE - PAGE_SIZE),
        ("ipa 0", 0),
        ("ipa the first page after RAM", ram_end),
        ("ipa the UART (MMIO)", UART_IPA),
        ("ipa the unbacked IPA", UNBACKED_IPA),
        ("ipa + 4 KiB overflows", TOP_PAGE),
        ("ipa u64::MAX", u64::MAX),
    ];
    for (why, ipa) in bad {
        answer(VendorCall::StorePut, &[never, ipa], why, INVALID_PARAMETER)?;
        answer(VendorCall::StoreGet, &[stored, ipa], why, INVALID_PARAMETER)?;
    }
    answer(
        VendorCall::StoreDrop,
        &[never],
        "a key whose every PUT was rejected",
        NOT_FOUND,
    )?;
    dst.fill(|i| SENTINEL ^ i as u64);
    answer(
        VendorCall::StoreGet,
        &[never, dst.ipa()],
        "a key never put",
        NOT_FOUND,
    )?;
    dst.require("the GET target page after NOT_FOUND (untouched)", |i| {
        SENTINEL ^ i as u64
    })?;
    answer(
        VendorCall::StoreDrop,
        &[never],
        "a key never put",
        NOT_FOUND,
    )?;
    for group in [4, 5, 1 << 32, u64::MAX] {
        answer(
            VendorCall::Stats,
            &[group],
            "unknown group",
            INVALID_PARAMETER,
        )?;
    }
    // The entry survived the rejected GETs.
    smccc_client::store_get(stored, dst.ipa())?;
    dst.require(
        "the page got back after the rejected calls",
        checked_words(stored),
    )
}

/// `STATS(STORE)` entries.
fn store_entries() -> Result<u64, Failure> {
    Ok(smccc_client::stats_group(stats_group::STORE)?[0])
}

/// Fails unless `STATS(STORE)` counts `expected` entries.
fn require_entries(what: &'static str, expected: u64) -> Result<(), Failure> {
    let entries = store_entries()?;
    require(entries == expected, what, expected, entries)
}

/// A page put and overwritten comes back from `GET` as it was put (the
/// last `PUT` of a key wins); `GET` is exclusive; a dropped key is gone;
/// `STATS(STORE)` entries follow.
pub(crate) fn store_round_trip(_: &System) -> Result<(), Failure> {
    let k = key(2, 0);
    with_frames(1, |run| {
        let page = Page::of(run, 0);
        let result = round_trip(page, k);
        if result.is_err() {
            let _ = smccc_client::store_drop(k);
        }
        result
    })
}

/// The body of [`store_round_trip`].
fn round_trip(page: Page<'_>, k: u64) -> Result<(), Failure> {
    let (first, second) = (0x0001_5eed, 0x0002_5eed);
    let entries = store_entries()?;
    page.fill(checked_words(first));
    smccc_client::store_put(k, page.ipa())?;
    require_entries("STATS(STORE) entries after a PUT", entries + 1)?;
    // The same key again replaces the entry.
    page.fill(checked_words(second));
    let bytes = smccc_client::store_put(k, page.ipa())?;
    require(bytes > 0, "STORE_PUT x1 (bytes stored)", "> 0", bytes)?;
    require_entries(
        "STATS(STORE) entries after a second PUT of the key",
        entries + 1,
    )?;
    page.fill(|i| !(i as u64));
    smccc_client::store_get(k, page.ipa())?;
    page.require("the page got back (the second PUT)", checked_words(second))?;
    require_entries("STATS(STORE) entries after the GET", entries)?;
    page.fill(|i| SENTINEL ^ i as u64);
    answer(
        VendorCall::StoreGet,
        &[k, page.ipa()],
        "a key got already (GET is exclusive)",
        NOT_FOUND,
    )?;
    page.require("the GET target after NOT_FOUND (untouched)", |i| {
        SENTINEL ^ i as u64
    })?;
    smccc_client::store_put(k, page.ipa())?;
    require_entries("STATS(STORE) entries after a PUT", entries + 1)?;
    smccc_client::store_drop(k)?;
    require_entries("STATS(STORE) entries after the DROP", entries)?;
    answer(
        VendorCall::StoreGet,
        &[k, page.ipa()],
        "a dropped key",
        NOT_FOUND,
    )?;
    answer(VendorCall::StoreDrop, &[k], "a dropped key", NOT_FOUND)
}

/// Most `PUT`s `store_full` makes before it gives up.
const MAX_PUTS: u64 = 4096;
/// Host frames of the store with the `store=2M` the smoke boots give.
const STORE_FRAMES: u64 = (2 << 20) / PAGE_SIZE;

/// The store fills up: incompressible pages under distinct keys are put
/// until `PUT` answers `NO_MEMORY` (needs the hypervisor's `store=2M`,
/// found within [`MAX_PUTS`]), the store stays within its frames, the
/// refused key is not stored, every key drops (the first and the last are
/// got back instead, and must be intact), and a `PUT` works again.
pub(crate) fn store_full(_: &System) -> Result<(), Failure> {
    with_frames(1, |run| {
        let page = Page::of(run, 0);
        let entries = store_entries()?;
        let (puts, x0) = fill_store(page);
        let full = check_full(puts, x0);
        // Empty the store whatever the checks found.
        let mut emptied = Ok(());
        for n in 1..puts.saturating_sub(1) {
            let dropped = answer(
                VendorCall::StoreDrop,
                &[key(3, n)],
                "a key this test put",
                SUCCESS,
            );
            emptied = emptied.and(dropped);
        }
        if puts > 0 {
            emptied = emptied.and(get_back(page, key(3, 0)));
        }
        if puts > 1 {
            emptied = emptied.and(get_back(page, key(3, puts - 1)));
        }
        full?;
        emptied?;
        require_entries("STATS(STORE) entries after emptying it", entries)?;
        let k = key(3, MAX_PUTS);
        page.fill(checked_words(k));
        smccc_client::store_put(k, page.ipa())?;
        smccc_client::store_drop(k)?;
        Ok(())
    })
}

/// Puts incompressible pages under `key(3, 0..)` until a `PUT` fails or
/// [`MAX_PUTS`] succeeded; returns how many succeeded and the last `x0`.
fn fill_store(page: Page<'_>) -> (u64, i64) {
    for n in 0..MAX_PUTS {
        page.fill(checked_words(key(3, n)));
        let x0 = hvc64_x0(func::STORE_PUT, &[key(3, n), page.ipa()]);
        if x0 != SUCCESS {
            return (n, x0);
        }
    }
    (MAX_PUTS, SUCCESS)
}

/// The checks of [`store_full`] once [`fill_store`] stopped after `puts`
/// puts with `x0`.
fn check_full(puts: u64, x0: i64) -> Result<(), Failure> {
    let [_, _, frames_used] = smccc_client::stats_group(stats_group::STORE)?;
    if x0 == SUCCESS {
        return Err(Failure::Value {
            what: "STORE_PUT of incompressible pages",
            expected: format!(
                "NO_MEMORY ({NO_MEMORY}) within {MAX_PUTS} puts (is the hypervisor booted with store=2M?)"
            ),
            actual: format!("{puts} puts succeeded, the store uses {frames_used} frames"),
        });
    }
    require_answer(
        format_args!("STORE_PUT(key {:#x}) after {puts} puts", key(3, puts)),
        NO_MEMORY,
        x0,
    )?;
    require(
        puts > 0,
        "STORE_PUTs that succeeded before NO_MEMORY",
        "> 0",
        puts,
    )?;
    require(
        frames_used <= STORE_FRAMES,
        "STATS(STORE) frames used when full",
        format_args!("<= {STORE_FRAMES} (store=2M)"),
        frames_used,
    )?;
    answer(
        VendorCall::StoreDrop,
        &[key(3, puts)],
        "the key whose PUT was refused",
        NOT_FOUND,
    )
}

/// Gets the page under `k` (put by [`fill_store`]) back and checks it.
fn get_back(page: Page<'_>, k: u64) -> Result<(), Failure> {
    page.fill(|_| SENTINEL);
    smccc_client::store_get(k, page.ipa())?;
    page.require("a page got back from the full store", checked_words(k))
}

/// Vendor function IDs this revision does not define answer
/// `NOT_SUPPORTED`, and the service keeps answering.
pub(crate) fn unknown_vendor_calls(_: &System) -> Result<(), Failure> {
    for id in (0xC600_0009u32..=0xC600_000F).chain([0xC600_FFFF]) {
        let x0 = hvc64_x0(id, &[1, 2, 3, 4]);
        require_answer(
            format_args!("vendor function {id:#x}(0x1, 0x2, 0x3, 0x4)"),
            NOT_SUPPORTED,
            x0,
        )?;
    }
    smccc_client::features()?;
    Ok(())
}
