//! Client of our vendor hypervisor service (SMCCC owner 6, over HVC).
//!
//! Typed wrappers of the calls `hyp_abi` defines; every answer is decoded
//! with [`hyp_abi::HypError::check`], so a negative `x0` becomes a
//! [`CallError`] naming the call.

use core::fmt;

use hyp_abi::{func, AfMode, HypError};
use smccc::{Call, Hvc};

/// The vendor calls, for error messages.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum VendorCall {
    /// `CALL_UID`.
    CallUid,
    /// `REVISION`.
    Revision,
    /// `FEATURES`.
    Features,
    /// `STATS`.
    Stats,
    /// `EXIT`.
    Exit,
    /// `AGING_FEATURES`.
    AgingFeatures,
    /// `AGING_TEST_CLEAR`.
    AgingTestClear,
    /// `MEM_RELEASE`.
    MemRelease,
    /// `STORE_PUT`.
    StorePut,
    /// `STORE_GET`.
    StoreGet,
    /// `STORE_DROP`.
    StoreDrop,
}

impl fmt::Display for VendorCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::CallUid => "CALL_UID",
            Self::Revision => "REVISION",
            Self::Features => "FEATURES",
            Self::Stats => "STATS",
            Self::Exit => "EXIT",
            Self::AgingFeatures => "AGING_FEATURES",
            Self::AgingTestClear => "AGING_TEST_CLEAR",
            Self::MemRelease => "MEM_RELEASE",
            Self::StorePut => "STORE_PUT",
            Self::StoreGet => "STORE_GET",
            Self::StoreDrop => "STORE_DROP",
        })
    }
}

/// A vendor call that failed.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum CallError {
    /// The hypervisor answered with an error code.
    Hyp {
        /// The call.
        call: VendorCall,
        /// Its answer.
        error: HypError,
    },
    /// `EXIT` returned (it never does when it works).
    ExitReturned {
        /// What it returned in `x0`.
        x0: u64,
    },
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Hyp { call, error } => write!(f, "{call}: {error}"),
            Self::ExitReturned { x0 } => write!(f, "EXIT returned x0={:#x}", x0),
        }
    }
}

/// Makes an HVC64 call with up to 17 arguments; returns `x0..x3`.
pub fn call64(function: u32, args: &[u64]) -> [u64; 4] {
    let mut all = [0u64; 17];
    all[..args.len()].copy_from_slice(args);
    let r = Hvc::call64(function, all);
    [r[0], r[1], r[2], r[3]]
}

/// Makes an HVC32 call without arguments; returns `w0..w3`.
pub fn call32(function: u32) -> [u32; 4] {
    let r = Hvc::call32(function, [0; 7]);
    [r[0], r[1], r[2], r[3]]
}

fn check(call: VendorCall, x0: u64) -> Result<u64, CallError> {
    HypError::check(x0).map_err(|error| CallError::Hyp { call, error })
}

/// `CALL_UID`: the service UUID as four words (`w0..w3`).
pub fn call_uid() -> Result<[u32; 4], CallError> {
    let w = call32(func::CALL_UID);
    // An SMC32 error code is a negative 32-bit value in w0.
    check(VendorCall::CallUid, i64::from(w[0] as i32) as u64)?;
    Ok(w)
}

/// `REVISION`: (major, minor).
pub fn revision() -> Result<(u32, u32), CallError> {
    let w = call32(func::REVISION);
    check(VendorCall::Revision, i64::from(w[0] as i32) as u64)?;
    Ok((w[0], w[1]))
}

/// The answer of `FEATURES`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Features {
    /// Bitmap of supported calls ([`hyp_abi::feature`]).
    pub calls: u64,
    /// How the stage-2 Access Flag is maintained, if `x1` is a known mode.
    pub af_mode: Option<AfMode>,
}

impl Features {
    /// Whether every call in the `hyp_abi::feature` mask `bits` exists.
    pub fn has(&self, bits: u64) -> bool {
        self.calls & bits == bits
    }
}

/// `FEATURES`.
pub fn features() -> Result<Features, CallError> {
    let r = call64(func::FEATURES, &[]);
    let calls = check(VendorCall::Features, r[0])?;
    Ok(Features {
        calls,
        af_mode: AfMode::from_u64(r[1]),
    })
}

/// The answer of `STATS(FAULTS)`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Stats {
    /// Guest frames currently mapped in stage 2.
    pub frames_mapped: u64,
    /// Stage-2 translation faults served.
    pub translation_faults: u64,
    /// Access-flag faults served.
    pub access_flag_faults: u64,
}

/// `STATS(group)`: the group's three counters (see `hyp_abi::stats_group`).
pub fn stats_group(group: u64) -> Result<[u64; 3], CallError> {
    let r = call64(func::STATS, &[group]);
    check(VendorCall::Stats, r[0])?;
    Ok([r[1], r[2], r[3]])
}

/// `STATS(FAULTS)`.
pub fn stats() -> Result<Stats, CallError> {
    let [frames_mapped, translation_faults, access_flag_faults] =
        stats_group(hyp_abi::stats_group::FAULTS)?;
    Ok(Stats {
        frames_mapped,
        translation_faults,
        access_flag_faults,
    })
}

/// The answer of `AGING_FEATURES`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct AgingFeatures {
    /// Supported `hyp_abi::age_flags`.
    pub flags: u64,
    /// Most pages per `AGING_TEST_CLEAR`.
    pub max_pages: u64,
    /// Most pages per `MEM_RELEASE`.
    pub max_release_pages: u64,
    /// How the Access Flag is maintained.
    pub af_mode: Option<AfMode>,
}

/// `AGING_FEATURES`.
pub fn aging_features() -> Result<AgingFeatures, CallError> {
    let r = call64(func::AGING_FEATURES, &[]);
    let flags = check(VendorCall::AgingFeatures, r[0])?;
    Ok(AgingFeatures {
        flags,
        max_pages: r[1],
        max_release_pages: r[2],
        af_mode: AfMode::from_u64(r[3]),
    })
}

/// `AGING_TEST_CLEAR(ipa, npages, bitmap_ipa, flags)`: the number of young
/// pages; the hypervisor writes the bitmap at `bitmap_ipa`.
pub fn aging_test_clear(
    ipa: u64,
    npages: u64,
    bitmap_ipa: u64,
    flags: u64,
) -> Result<u64, CallError> {
    let r = call64(func::AGING_TEST_CLEAR, &[ipa, npages, bitmap_ipa, flags]);
    check(VendorCall::AgingTestClear, r[0])
}

/// What `MEM_RELEASE` did.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Released {
    /// Pages that were backed and are not any more.
    pub pages: u64,
    /// Stage-2 table pages unlinked.
    pub tables: u64,
}

/// `MEM_RELEASE(ipa, npages)`.
pub fn mem_release(ipa: u64, npages: u64) -> Result<Released, CallError> {
    let r = call64(func::MEM_RELEASE, &[ipa, npages]);
    let pages = check(VendorCall::MemRelease, r[0])?;
    Ok(Released {
        pages,
        tables: r[1],
    })
}

/// `STORE_PUT(key, ipa)`: the bytes the page takes in the store.
pub fn store_put(key: u64, ipa: u64) -> Result<u64, CallError> {
    let r = call64(func::STORE_PUT, &[key, ipa]);
    check(VendorCall::StorePut, r[0])?;
    Ok(r[1])
}

/// `STORE_GET(key, ipa)` (exclusive: the entry is gone afterwards).
pub fn store_get(key: u64, ipa: u64) -> Result<(), CallError> {
    let r = call64(func::STORE_GET, &[key, ipa]);
    check(VendorCall::StoreGet, r[0]).map(drop)
}

/// `STORE_DROP(key)`.
pub fn store_drop(key: u64) -> Result<(), CallError> {
    let r = call64(func::STORE_DROP, &[key]);
    check(VendorCall::StoreDrop, r[0]).map(drop)
}

/// `EXIT(code)`: ends the machine. Returns only when it failed.
pub fn exit(code: u8) -> CallError {
    let r = call64(func::EXIT, &[u64::from(code)]);
    match check(VendorCall::Exit, r[0]) {
        Ok(x0) => CallError::ExitReturned { x0 },
        Err(error) => error,
    }
}

/// The instruction a raw call is made with.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Conduit {
    /// `hvc #0`: the hypervisor's SMCCC conduit.
    Hvc,
    /// `smc #0`: trapped by the hypervisor (`HCR_EL2.TSC`).
    Smc,
}

/// Makes a call with `x0..x4` exactly as given (the function ID in `x0`
/// may carry bits 63:32, which no typed wrapper can) and returns
/// `x0..x3`. `x5..x17` are treated as clobbered (SMCCC 1.0 leaves them
/// unpredictable).
///
/// # Safety
///
/// The call must not end or stop the calling CPU, and every guest
/// memory the hypervisor may write for it (a `MEM_RELEASE` range, an
/// `AGING_TEST_CLEAR` bitmap, a `STORE_GET` target, ...) must be memory
/// nothing else in the program relies on, accessed by the caller only
/// with volatile accesses.
pub unsafe fn raw_call(conduit: Conduit, regs: [u64; 5]) -> [u64; 4] {
    let [mut x0, mut x1, mut x2, mut x3, x4] = regs;
    match conduit {
        // SAFETY: the caller guarantees the call neither ends this CPU
        // nor makes the hypervisor write memory the program uses; the
        // asm touches only the registers named here (no stack).
        Conduit::Hvc => unsafe {
            core::arch::asm!(
                "hvc #0",
                inout("x0") x0, inout("x1") x1, inout("x2") x2, inout("x3") x3,
                inout("x4") x4 => _,
                lateout("x5") _, lateout("x6") _, lateout("x7") _, lateout("x8") _,
                lateout("x9") _, lateout("x10") _, lateout("x11") _, lateout("x12") _,
                lateout("x13") _, lateout("x14") _, lateout("x15") _, lateout("x16") _,
                lateout("x17") _,
                options(nostack)
            );
        },
        // SAFETY: as for HVC; the hypervisor traps SMC from EL1.
        Conduit::Smc => unsafe {
            core::arch::asm!(
                "smc #0",
                inout("x0") x0, inout("x1") x1, inout("x2") x2, inout("x3") x3,
                inout("x4") x4 => _,
                lateout("x5") _, lateout("x6") _, lateout("x7") _, lateout("x8") _,
                lateout("x9") _, lateout("x10") _, lateout("x11") _, lateout("x12") _,
                lateout("x13") _, lateout("x14") _, lateout("x15") _, lateout("x16") _,
                lateout("x17") _,
                options(nostack)
            );
        },
    }
    [x0, x1, x2, x3]
}
