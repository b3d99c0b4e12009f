//! The aging, release and store calls of the vendor service
//! (`AGING_FEATURES`, `AGING_TEST_CLEAR`, `MEM_RELEASE`, `STORE_PUT`,
//! `STORE_GET`, `STORE_DROP`, `STATS`); docs/ABI.md is their contract.
//!
//! Every argument goes through a `hyp_core::hypercall` validator before
//! the call has any effect; a rejected call is answered with its error
//! code and one log line naming the call, its arguments and the reason.
//! Work per call is bounded by `hyp_abi::limits`.

use super::guest_warn;
use alloc::vec;
use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

use hyp_abi::{age_flags, error, limits, stats_group};
use hyp_core::addr::{Ipa, PhysAddr, PhysFrame, PAGE_SIZE};
use hyp_core::hypercall::{self, ArgError, GuestRam};
use hyp_store::{PageStore, StoreError, PAGE_BYTES};
use stage2::{HarvestFlags, MapError};

use super::guest_mem::{self, AccessError};
use super::Vm;
use crate::memory;

/// Counters of the vendor calls (Relaxed: statistics).
#[derive(Debug, Default)]
pub(super) struct VendorStats {
    pub(super) aging_calls: AtomicU64,
    pub(super) aging_pages: AtomicU64,
    pub(super) released_pages: AtomicU64,
    pub(super) release_calls: AtomicU64,
    pub(super) tables_unlinked: AtomicU64,
    pub(super) rejected: AtomicU64,
}

/// The page store's host frames come from the frame allocator.
#[derive(Debug)]
pub(super) struct StoreFrames;

// SAFETY: frames come from the frame allocator, 4 KiB aligned, identity
// mapped read-write at EL2 and used for nothing else until the store gives
// them back.
unsafe impl hyp_store::FrameSource for StoreFrames {
    fn alloc_frame(&mut self) -> Option<core::ptr::NonNull<u8>> {
        let frame = memory::alloc_zeroed_frame(memory::Owner::Store).ok()?;
        core::ptr::NonNull::new(frame.start().as_u64() as *mut u8)
    }

    unsafe fn free_frame(&mut self, frame: core::ptr::NonNull<u8>) {
        if let Some(f) = PhysFrame::from_start(PhysAddr(frame.as_ptr() as u64)) {
            memory::free_frame(f, memory::Owner::Store);
        }
    }
}

/// The VM's page store.
pub(super) type Store = PageStore<StoreFrames>;

/// A call's answer: `x0..x3`.
pub(super) type Answer = [u64; 4];

/// Why a vendor call failed.
enum CallError {
    /// A bad argument: `INVALID_PARAMETER`.
    Arg(ArgError),
    /// No memory for it: `NO_MEMORY`.
    NoMemory(&'static str),
    /// No such key: `NOT_FOUND`.
    NotFound,
    /// The store is disabled (`store=0`): `NOT_SUPPORTED`.
    NoStore,
}

impl CallError {
    fn code(&self) -> i64 {
        match self {
            Self::Arg(_) => error::INVALID_PARAMETER,
            Self::NoMemory(_) => error::NO_MEMORY,
            Self::NotFound => error::NOT_FOUND,
            Self::NoStore => error::NOT_SUPPORTED,
        }
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Arg(e) => write!(f, "{e}: INVALID_PARAMETER"),
            Self::NoMemory(what) => write!(f, "{what}: NO_MEMORY"),
            Self::NotFound => f.write_str("no such key: NOT_FOUND"),
            Self::NoStore => f.write_str("the store is disabled (store=0): NOT_SUPPORTED"),
        }
    }
}

impl From<ArgError> for CallError {
    fn from(e: ArgError) -> Self {
        Self::Arg(e)
    }
}

impl From<AccessError> for CallError {
    fn from(e: AccessError) -> Self {
        match e {
            AccessError::NoMemory => Self::NoMemory("no free frame to back a guest page"),
            AccessError::OutsideRam(page) => Self::Arg(ArgError::OutsideRam {
                what: "guest page",
                start: page.as_u64(),
                len: PAGE_SIZE,
            }),
        }
    }
}

impl From<StoreError> for CallError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound { .. } => Self::NotFound,
            StoreError::Full { .. } => Self::NoMemory("the page store is full"),
            StoreError::NoFrames => Self::NoMemory("no free frame for the page store"),
            // The entry was dropped: report it gone, loudly.
            StoreError::Corrupt { key } => {
                log::error!("vm0: page store entry {key:#x} was corrupt and is dropped");
                Self::NotFound
            }
        }
    }
}

/// The vendor calls handled here.
#[derive(Copy, Clone, Debug)]
pub(super) enum Call {
    AgingFeatures,
    AgingTestClear,
    MemRelease,
    StorePut,
    StoreGet,
    StoreDrop,
    Stats,
}

impl Call {
    /// The call with function ID `fid`, if it is one of these.
    pub(super) fn from_fid(fid: u32) -> Option<Self> {
        use hyp_abi::func;
        Some(match fid {
            func::AGING_FEATURES => Self::AgingFeatures,
            func::AGING_TEST_CLEAR => Self::AgingTestClear,
            func::MEM_RELEASE => Self::MemRelease,
            func::STORE_PUT => Self::StorePut,
            func::STORE_GET => Self::StoreGet,
            func::STORE_DROP => Self::StoreDrop,
            func::STATS => Self::Stats,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::AgingFeatures => "AGING_FEATURES",
            Self::AgingTestClear => "AGING_TEST_CLEAR",
            Self::MemRelease => "MEM_RELEASE",
            Self::StorePut => "STORE_PUT",
            Self::StoreGet => "STORE_GET",
            Self::StoreDrop => "STORE_DROP",
            Self::Stats => "STATS",
        }
    }

    /// How many of x1..x4 the call takes (for the log line).
    fn arity(self) -> usize {
        match self {
            Self::AgingFeatures => 0,
            Self::StoreDrop | Self::Stats => 1,
            Self::MemRelease | Self::StorePut | Self::StoreGet => 2,
            Self::AgingTestClear => 4,
        }
    }
}

/// Handles `call` with arguments `x1..x4` for vCPU `index`.
pub(super) fn handle(vm: &Vm, index: usize, call: Call, args: [u64; 4]) -> Answer {
    let result = match call {
        Call::AgingFeatures => Ok([
            age_flags::ALL,
            limits::AGING_MAX_PAGES,
            limits::RELEASE_MAX_PAGES,
            vm.regs.af as u64,
        ]),
        Call::AgingTestClear => test_clear(vm, args),
        Call::MemRelease => release(vm, args[0], args[1]),
        Call::StorePut => store_put(vm, args[0], args[1]),
        Call::StoreGet => store_get(vm, args[0], args[1]),
        Call::StoreDrop => store_drop(vm, args[0]),
        Call::Stats => stats(vm, args[0]),
    };
    result.unwrap_or_else(|e| {
        vm.vendor.rejected.fetch_add(1, Ordering::Relaxed);
        guest_warn!(
            Call,
            "vm0/vcpu{index}: {}({}) rejected: {e}",
            call.name(),
            HexArgs(&args[..call.arity()])
        );
        [e.code() as u64, 0, 0, 0]
    })
}

/// Arguments printed as `0x1, 0x2`.
struct HexArgs<'a>(&'a [u64]);

impl fmt::Display for HexArgs<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, a) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{a:#x}")?;
        }
        Ok(())
    }
}

fn ram(vm: &Vm) -> GuestRam {
    GuestRam {
        base: hyp_abi::layout::RAM_BASE,
        size: vm.ram_size,
    }
}

/// `AGING_TEST_CLEAR(ipa, npages, bitmap_ipa, flags)`: the lockless
/// harvester into a hypervisor buffer, copied out to the guest's bitmap
/// (and, with `MASK`, in from it first).
fn test_clear(vm: &Vm, [ipa, npages, bitmap_ipa, flags]: [u64; 4]) -> Result<Answer, CallError> {
    let ram = ram(vm);
    let flags = hypercall::age_flags(flags)?;
    let range = hypercall::page_range(&ram, "ipa", ipa, npages, limits::AGING_MAX_PAGES)?;
    let bitmap = hypercall::bitmap(&ram, bitmap_ipa, range.npages)?;
    let mut words = vec![0u64; bitmap.words as usize];
    if flags & age_flags::MASK != 0 {
        guest_mem::read_words(vm, bitmap.ipa, &mut words)?;
    }
    let flags = HarvestFlags::from_bits_truncate(flags as u32);
    let young = vm
        .stage2
        .harvest(Ipa(range.ipa), range.npages, &mut words[..], flags)
        .map_err(|_| {
            // Unreachable: the validators are stricter than the harvester.
            CallError::Arg(ArgError::OutsideRam {
                what: "ipa",
                start: ipa,
                len: range.len(),
            })
        })?;
    guest_mem::write_words(vm, bitmap.ipa, &mut words)?;
    vm.vendor.aging_calls.fetch_add(1, Ordering::Relaxed);
    vm.vendor
        .aging_pages
        .fetch_add(range.npages, Ordering::Relaxed);
    Ok([young, 0, 0, 0])
}

/// `MEM_RELEASE(ipa, npages)`: unmaps the leaves (batched flush; frames
/// freed after it), then frees the table pages the release emptied (found
/// by the lockless scan, removed with the seal protocol, freed after a
/// flush and a grace period).
fn release(vm: &Vm, ipa: u64, npages: u64) -> Result<Answer, CallError> {
    let range = hypercall::page_range(&ram(vm), "ipa", ipa, npages, limits::RELEASE_MAX_PAGES)?;
    // Pages whose frames went back: what the release unmapped, counted as
    // the frames are freed (after the flushes), attempts included.
    let mut freed = 0u64;
    let mut free = |pa: PhysAddr, size: u64| {
        freed += size / PAGE_SIZE;
        memory::free_guest_frames(pa, size);
    };
    let mut batch = vm.stage2.batch(&mut free);
    loop {
        match vm
            .stage2
            .unmap_leaves_batched(Ipa(range.ipa), range.len(), &mut batch)
        {
            Ok(_) => break,
            // A page of the range is pinned by another vCPU's store or
            // aging call for the length of one page copy: what was
            // unmapped so far stays unmapped; go again.
            Err(MapError::Busy { .. }) => {
                batch.flush();
                super::RCU.quiescent();
            }
            // Splitting a block needs a table page.
            Err(_) => return Err(CallError::NoMemory("no frame for a stage-2 table")),
        }
    }
    // Leaves first, so the scan below sees their tables empty.
    batch.flush();
    let tables = vm
        .stage2
        .reclaim_empty_tables(Ipa(range.ipa), range.len(), &mut batch)
        .unwrap_or(0);
    batch.flush();
    drop(batch);
    // Wait for the grace period of the tables unlinked here: nothing else
    // reclaims them later (only the next release would), and it is short
    // (vCPUs in the guest are offline, the aging worker passes quiescent
    // states between chunks). We hold no lock and are in no walk.
    vm.stage2.reclaim_tables(tables > 0);
    vm.vendor.release_calls.fetch_add(1, Ordering::Relaxed);
    vm.vendor.released_pages.fetch_add(freed, Ordering::Relaxed);
    vm.vendor
        .tables_unlinked
        .fetch_add(tables, Ordering::Relaxed);
    Ok([freed, tables, 0, 0])
}

fn store(vm: &Vm) -> Result<&spin::Mutex<Store>, CallError> {
    vm.store.as_ref().ok_or(CallError::NoStore)
}

/// `STORE_PUT(key, ipa)`: copies the page out, compresses it outside the
/// store lock, then inserts it.
fn store_put(vm: &Vm, key: u64, ipa: u64) -> Result<Answer, CallError> {
    let store = store(vm)?;
    let page = hypercall::page(&ram(vm), "ipa", ipa)?;
    let mut buf = [0u8; PAGE_BYTES];
    guest_mem::read(vm, page.ipa, &mut buf)?;
    let mut scratch = hyp_store::Scratch::new();
    let compressed = hyp_store::compress_page(&buf, &mut scratch);
    let info = store.lock().put_compressed(key, &compressed)?;
    Ok([error::SUCCESS as u64, info.block_bytes as u64, 0, 0])
}

/// `STORE_GET(key, ipa)`: the guest page is pinned (backed first if
/// needed) before the entry is taken, so a taken page always lands.
fn store_get(vm: &Vm, key: u64, ipa: u64) -> Result<Answer, CallError> {
    let store = store(vm)?;
    let page = hypercall::page(&ram(vm), "ipa", ipa)?;
    let mut buf = [0u8; PAGE_BYTES];
    guest_mem::with_backed_frame(vm, Ipa(page.ipa), |pa| {
        store.lock().take(key, &mut buf)?;
        // SAFETY: the frame is pinned (see guest_mem) and identity mapped;
        // `buf` is our own page-sized buffer.
        unsafe { core::ptr::copy_nonoverlapping(buf.as_ptr(), pa.as_u64() as *mut u8, PAGE_BYTES) };
        Ok::<(), CallError>(())
    })??;
    Ok([error::SUCCESS as u64, 0, 0, 0])
}

/// `STORE_DROP(key)`.
fn store_drop(vm: &Vm, key: u64) -> Result<Answer, CallError> {
    store(vm)?.lock().remove(key)?;
    Ok([error::SUCCESS as u64, 0, 0, 0])
}

/// `STATS(group)`.
fn stats(vm: &Vm, group: u64) -> Result<Answer, CallError> {
    let ok = error::SUCCESS as u64;
    let v = &vm.vendor;
    Ok(match group {
        stats_group::FAULTS => [
            ok,
            vm.stage2.mapped_pages(),
            vm.stats.stage2_faults.load(Ordering::Relaxed),
            vm.stats.af_faults.load(Ordering::Relaxed),
        ],
        stats_group::MEMORY => [
            ok,
            vm.stage2.table_pages(),
            v.tables_unlinked.load(Ordering::Relaxed),
            v.released_pages.load(Ordering::Relaxed),
        ],
        stats_group::STORE => {
            let s = vm.store.as_ref().map(|s| s.lock().stats());
            [
                ok,
                s.map_or(0, |s| s.entries),
                s.map_or(0, |s| s.stored_bytes),
                s.map_or(0, |s| s.frames_used),
            ]
        }
        stats_group::AGING => [
            ok,
            v.aging_calls.load(Ordering::Relaxed),
            v.aging_pages.load(Ordering::Relaxed),
            v.rejected.load(Ordering::Relaxed),
        ],
        _ => {
            return Err(CallError::Arg(ArgError::TooLarge {
                what: "group",
                value: group,
                max: stats_group::AGING,
            }))
        }
    })
}
