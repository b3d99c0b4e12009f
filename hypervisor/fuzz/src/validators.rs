//! Target `validators`: the hypercall argument checks of
//! `hyp_core::hypercall` and the bootargs parser of `hyp_core::bootargs`.
//!
//! The validators are compared with a reference written here from their
//! documentation, in `u128` arithmetic so that it cannot overflow: both
//! must give the same verdict and, on rejection, the same [`ArgError`]
//! (variant and payload). An accepted range must lie wholly inside guest
//! RAM without any 64-bit overflow. The `AGING_TEST_CLEAR` sequence of the
//! EL2 handler (flags, range, bitmap) is replayed, and whatever it accepts
//! must be accepted by `Stage2::harvest` too (the handler treats a harvest
//! error as unreachable). Every error must print.
//!
//! The bootargs parser must never panic on any string; its result must
//! keep the documented invariants; `parse_u64` and `parse_size` are
//! compared with a reference.

use std::fmt::Write as _;

use hyp_abi::{age_flags as abi_flags, layout, limits};
use hyp_core::addr::{Ipa, PAGE_SIZE};
use hyp_core::bootargs::{self, BootConfig, MAX_MIGRATE};
use hyp_core::hypercall::{self, ArgError, BitmapRange, GuestRam, PageRange};
use stage2::{HarvestFlags, Stage2};

use crate::edge::{edgy, near, pick, Result, Unstructured};
use crate::host::{HostAlloc, ShadowTlb, RCU};

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    // An input that runs out early just ends the case.
    let _ = if u.ratio(1, 4).unwrap_or(false) {
        fuzz_bootargs(&mut u)
    } else {
        fuzz_calls(&mut u)
    };
}

// ---- hypercall validators ----

/// Guest RAM: the real layout most of the time, else any range that does
/// not wrap (the hypervisor builds `GuestRam` itself, never from guest
/// input, so `base + size` never overflows).
fn guest_ram(u: &mut Unstructured<'_>) -> Result<GuestRam> {
    Ok(match u.int_in_range(0u8..=3)? {
        0 | 1 => GuestRam {
            base: layout::RAM_BASE,
            size: u64::from(u.int_in_range(1u16..=8192)?) << 21,
        },
        2 => {
            let top = u64::MAX - u64::from(u.arbitrary::<u32>()?);
            let size = u.int_in_range(0..=top)?;
            GuestRam {
                base: top - size,
                size,
            }
        }
        _ => {
            let base = u.arbitrary::<u64>()?;
            GuestRam {
                base,
                size: u.int_in_range(0..=u64::MAX - base)?,
            }
        }
    })
}

/// An address, mostly near an edge of `ram`.
fn address(u: &mut Unstructured<'_>, ram: &GuestRam) -> Result<u64> {
    let end = ram.base + ram.size;
    Ok(match u.int_in_range(0u8..=5)? {
        0 => near(u, ram.base)?,
        1 => near(u, end)?,
        2 => {
            let back = u64::from(u.int_in_range(0u16..=600)?) * PAGE_SIZE;
            near(u, end.wrapping_sub(back))?
        }
        3 => ram.base + u.int_in_range(0..=ram.size)?,
        _ => edgy(u)?,
    })
}

/// A page count, mostly near `limit` or near what is left of RAM after
/// `ipa`.
fn count(u: &mut Unstructured<'_>, ram: &GuestRam, ipa: u64, limit: u64) -> Result<u64> {
    let left = (ram.base + ram.size).saturating_sub(ipa) / PAGE_SIZE;
    Ok(match u.int_in_range(0u8..=4)? {
        0 => near_count(u, limit)?,
        1 => near_count(u, left)?,
        2 => u64::from(u.int_in_range(0u8..=130)?),
        _ => edgy(u)?,
    })
}

fn near_count(u: &mut Unstructured<'_>, n: u64) -> Result<u64> {
    Ok(n.wrapping_add_signed(i64::from(u.int_in_range(-2i8..=2)?)))
}

/// A per-call limit: the real ones, or any that keeps `max * 4 KiB` in
/// 64 bits (the validators' precondition: "npages <= max keeps the
/// multiplication small").
fn limit(u: &mut Unstructured<'_>) -> Result<u64> {
    Ok(match u.int_in_range(0u8..=3)? {
        0 => limits::AGING_MAX_PAGES,
        1 => limits::RELEASE_MAX_PAGES,
        2 => 1,
        _ => u.int_in_range(0..=u64::MAX / PAGE_SIZE)?,
    })
}

fn flags(u: &mut Unstructured<'_>) -> Result<u64> {
    Ok(if u.ratio(3, 4)? {
        u64::from(u.int_in_range(0u8..=15)?)
    } else {
        edgy(u)?
    })
}

/// Reference: whether `[start, start + len)` (exact, `u128`) lies wholly
/// inside RAM and is not empty.
fn ref_inside(ram: &GuestRam, start: u128, len: u128) -> bool {
    let end = u128::from(ram.base) + u128::from(ram.size);
    if crate::PLANTED {
        // Planted bug: a range that ends exactly at the end of RAM is
        // rejected.
        return len > 0 && start >= u128::from(ram.base) && start + len < end;
    }
    len > 0 && start >= u128::from(ram.base) && start + len <= end
}

/// Reference of `hypercall::page_range`, from its documentation: page
/// aligned, `1..=max` pages, no wrap-around, wholly inside RAM, checked in
/// that order.
fn ref_page_range(
    ram: &GuestRam,
    what: &'static str,
    ipa: u64,
    npages: u64,
    max: u64,
) -> std::result::Result<PageRange, ArgError> {
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
    let len = u128::from(npages) * u128::from(PAGE_SIZE);
    let len64 = u64::try_from(len).expect("max keeps npages * 4 KiB in 64 bits");
    if u128::from(ipa) + len > u128::from(u64::MAX) {
        return Err(ArgError::Overflow {
            what,
            start: ipa,
            len: len64,
        });
    }
    if !ref_inside(ram, ipa.into(), len) {
        return Err(ArgError::OutsideRam {
            what,
            start: ipa,
            len: len64,
        });
    }
    Ok(PageRange { ipa, npages })
}

/// Reference of `hypercall::bitmap`: 8-byte aligned, `ceil(npages / 64)`
/// words, no wrap-around, wholly inside RAM.
fn ref_bitmap(ram: &GuestRam, ipa: u64, npages: u64) -> std::result::Result<BitmapRange, ArgError> {
    const WHAT: &str = "bitmap_ipa";
    if !ipa.is_multiple_of(8) {
        return Err(ArgError::Unaligned {
            what: WHAT,
            value: ipa,
            align: 8,
        });
    }
    let words = u128::from(npages).div_ceil(64);
    let len = words * 8;
    let len64 = u64::try_from(len).unwrap_or(u64::MAX);
    if u128::from(ipa) + len > u128::from(u64::MAX) {
        return Err(ArgError::Overflow {
            what: WHAT,
            start: ipa,
            len: len64,
        });
    }
    if !ref_inside(ram, ipa.into(), len) {
        return Err(ArgError::OutsideRam {
            what: WHAT,
            start: ipa,
            len: len64,
        });
    }
    Ok(BitmapRange {
        ipa,
        words: words as u64,
    })
}

/// Reference of `hypercall::age_flags`.
fn ref_age_flags(flags: u64) -> std::result::Result<u64, ArgError> {
    let all = abi_flags::CLEAR | abi_flags::MASK | abi_flags::FLUSH;
    if flags & !all != 0 {
        Err(ArgError::UnknownFlags(flags))
    } else if flags & (abi_flags::MASK | abi_flags::FLUSH) != 0 && flags & abi_flags::CLEAR == 0 {
        Err(ArgError::FlagsWithoutClear(flags))
    } else {
        Ok(flags)
    }
}

/// An error must print, and name its argument.
fn check_display(e: &ArgError) {
    let mut s = String::new();
    write!(s, "{e}").expect("ArgError prints");
    let what = match *e {
        ArgError::Unaligned { what, .. }
        | ArgError::Empty { what }
        | ArgError::TooLarge { what, .. }
        | ArgError::Overflow { what, .. }
        | ArgError::OutsideRam { what, .. } => what,
        ArgError::UnknownFlags(_) | ArgError::FlagsWithoutClear(_) => "flags",
    };
    assert!(s.contains(what), "`{s}` does not name `{what}`");
}

fn check_range(ram: &GuestRam, got: &std::result::Result<PageRange, ArgError>) {
    match got {
        Ok(r) => {
            let len = u128::from(r.npages) * u128::from(PAGE_SIZE);
            assert_eq!(u128::from(r.len()), len);
            assert!(r.ipa % PAGE_SIZE == 0 && r.npages > 0);
            assert!(ref_inside(ram, r.ipa.into(), len), "{r:?} outside {ram:?}");
        }
        Err(e) => check_display(e),
    }
}

fn fuzz_calls(u: &mut Unstructured<'_>) -> Result<()> {
    let ram = guest_ram(u)?;
    for _ in 0..32 {
        if u.is_empty() {
            break;
        }
        match u.int_in_range(0u8..=4)? {
            0 => {
                let ipa = address(u, &ram)?;
                let max = limit(u)?;
                let npages = count(u, &ram, ipa, max)?;
                let what = pick(u, &["ipa", "bitmap_ipa"])?;
                let got = hypercall::page_range(&ram, what, ipa, npages, max);
                assert_eq!(
                    got,
                    ref_page_range(&ram, what, ipa, npages, max),
                    "page_range({ram:?}, {ipa:#x}, {npages}, max {max})"
                );
                check_range(&ram, &got);
            }
            1 => {
                let ipa = address(u, &ram)?;
                let got = hypercall::page(&ram, "ipa", ipa);
                assert_eq!(
                    got,
                    ref_page_range(&ram, "ipa", ipa, 1, 1),
                    "page({ipa:#x})"
                );
                check_range(&ram, &got);
            }
            2 => {
                let ipa = address(u, &ram)?;
                let npages = count(u, &ram, ipa, limits::AGING_MAX_PAGES)?;
                let got = hypercall::bitmap(&ram, ipa, npages);
                assert_eq!(
                    got,
                    ref_bitmap(&ram, ipa, npages),
                    "bitmap({ram:?}, {ipa:#x}, {npages})"
                );
                match got {
                    Ok(b) => {
                        assert!(u128::from(b.words) * 64 >= u128::from(npages));
                        assert!(ref_inside(&ram, b.ipa.into(), u128::from(b.words) * 8));
                    }
                    Err(e) => check_display(&e),
                }
            }
            3 => {
                let f = flags(u)?;
                let got = hypercall::age_flags(f);
                assert_eq!(got, ref_age_flags(f), "age_flags({f:#x})");
                if let Err(e) = got {
                    check_display(&e);
                }
            }
            _ => test_clear_sequence(u, &ram)?,
        }
    }
    Ok(())
}

/// The argument checks of `AGING_TEST_CLEAR` as the EL2 handler runs them
/// (flags, range, bitmap); when all pass, the harvester must accept the
/// same call on a table whose IPA space holds RAM (40 bits here).
fn test_clear_sequence(u: &mut Unstructured<'_>, ram: &GuestRam) -> Result<()> {
    let flags = flags(u)?;
    let ipa = address(u, ram)?;
    let npages = count(u, ram, ipa, limits::AGING_MAX_PAGES)?;
    let bitmap_ipa = address(u, ram)?;
    let checked = hypercall::age_flags(flags).and_then(|f| {
        let range = hypercall::page_range(ram, "ipa", ipa, npages, limits::AGING_MAX_PAGES)?;
        let bitmap = hypercall::bitmap(ram, bitmap_ipa, range.npages)?;
        Ok((f, range, bitmap))
    });
    let Ok((f, range, bitmap)) = checked else {
        return Ok(());
    };
    if ram.base + ram.size > 1 << 40 {
        return Ok(());
    }
    let alloc = HostAlloc::default();
    let tlb = ShadowTlb::default();
    let s2 = Stage2::new(40, &alloc, &tlb, &RCU).expect("root table");
    let mut words = vec![0u64; bitmap.words as usize];
    let hflags = HarvestFlags::from_bits_truncate(f as u32);
    assert_eq!(u64::from(hflags.bits()), f, "flags survive the conversion");
    let got = s2.harvest(Ipa(range.ipa), range.npages, &mut words[..], hflags);
    assert_eq!(
        got,
        Ok(0),
        "validators accepted {range:?} {bitmap:?} flags {f:#x}, the harvester did not"
    );
    Ok(())
}

// ---- bootargs ----

/// Keys of the command line, for structured inputs.
const KEYS: &[&str] = &[
    "log",
    "guest",
    "guest_mem",
    "guest_cpus",
    "af",
    "fault",
    "aging_cpu",
    "migrate",
    "store",
    "guest.",
    "guest.mode",
    "",
];

/// Pieces of values, for structured inputs.
const PIECES: &[&str] = &[
    "0",
    "1",
    "0x",
    "0X",
    "+",
    "-",
    "k",
    "K",
    "m",
    "M",
    "g",
    "G",
    "4096",
    "2",
    "=",
    "ffff",
    "18446744073709551615",
    "18446744073709551616",
    "4294967295",
    "4294967296",
    "64",
    "65",
    "auto",
    "hw",
    "sw",
    "el2",
    "panic",
    "info",
    "off",
    "trace",
    "é",
    " ",
    "\t",
    "\n",
];

fn value_string(u: &mut Unstructured<'_>) -> Result<String> {
    let mut s = String::new();
    for _ in 0..u.int_in_range(0u8..=4)? {
        if u.ratio(2, 3)? {
            s.push_str(pick(u, PIECES)?);
        } else {
            write!(s, "{:x}", edgy(u)?).expect("write to String");
        }
    }
    Ok(s)
}

fn cmdline(u: &mut Unstructured<'_>) -> Result<String> {
    if u.ratio(1, 2)? {
        let len = u.arbitrary_len::<u8>()?;
        return Ok(String::from_utf8_lossy(u.bytes(len)?).into_owned());
    }
    let mut s = String::new();
    for _ in 0..u.int_in_range(0u8..=8)? {
        s.push_str(pick(u, KEYS)?);
        if u.ratio(7, 8)? {
            s.push('=');
        }
        s.push_str(&value_string(u)?);
        s.push(pick(u, &[' ', ' ', '\t', '\n'])?);
    }
    Ok(s)
}

/// Reference of `bootargs::parse_u64`: decimal, or hex after `0x`/`0X`;
/// like Rust's integer parsing, one leading `+` is allowed.
fn ref_parse_u64(s: &str) -> Option<u64> {
    let (digits, radix) = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => (hex, 16),
        None => (s, 10),
    };
    let digits = digits.strip_prefix('+').unwrap_or(digits);
    if digits.is_empty() {
        return None;
    }
    let mut n: u128 = 0;
    for c in digits.chars() {
        n = n * radix + u128::from(c.to_digit(radix as u32)?);
        if n > u128::from(u64::MAX) {
            return None;
        }
    }
    u64::try_from(n).ok()
}

/// Reference of `bootargs::parse_size`: a number with an optional binary
/// `K`/`M`/`G` suffix (either case), rejecting overflow.
fn ref_parse_size(s: &str) -> Option<u64> {
    let (digits, shift) = match s.chars().last()? {
        'k' | 'K' => (&s[..s.len() - 1], 10),
        'm' | 'M' => (&s[..s.len() - 1], 20),
        'g' | 'G' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n = u128::from(ref_parse_u64(digits)?) << shift;
    u64::try_from(n).ok()
}

fn fuzz_bootargs(u: &mut Unstructured<'_>) -> Result<()> {
    let line = cmdline(u)?;
    let (cfg, errors) = BootConfig::parse(&line);
    let tokens: Vec<&str> = line.split_ascii_whitespace().collect();
    assert!(errors.len() <= tokens.len(), "more errors than options");
    for e in &errors {
        let mut s = String::new();
        write!(s, "{e}").expect("BootargError prints");
    }
    assert!(
        cfg.guest_mem > 0 && cfg.guest_mem % (2 << 20) == 0,
        "{cfg:?}"
    );
    assert!(cfg.guest_cpus <= 64, "{cfg:?}");
    assert!(cfg.migrate <= MAX_MIGRATE, "{cfg:?}");
    assert!(cfg.store_size % 4096 == 0, "{cfg:?}");
    if let Some(image) = cfg.guest_image {
        assert!(image.size > 0, "{cfg:?}");
        assert!(image.start.0.checked_add(image.size).is_some(), "{cfg:?}");
    }
    // The guest's command line: every `guest.KEY...` option, in order.
    let guest: Vec<&str> = tokens
        .iter()
        .filter_map(|t| {
            let key = t.split_once('=').map_or(*t, |(k, _)| k);
            key.strip_prefix("guest.")
                .filter(|k| !k.is_empty())
                .map(|_| &t["guest.".len()..])
        })
        .collect();
    assert_eq!(
        cfg.guest_bootargs,
        guest.join(" "),
        "guest bootargs of {line:?}"
    );
    // Each value alone, through the number parsers.
    for t in &tokens {
        let value = t.split_once('=').map_or(*t, |(_, v)| v);
        assert_eq!(
            bootargs::parse_u64(value),
            ref_parse_u64(value),
            "parse_u64({value:?})"
        );
        assert_eq!(
            bootargs::parse_size(value),
            ref_parse_size(value),
            "parse_size({value:?})"
        );
    }
    // A size alone, so that every suffix and digit string is reached.
    let size = value_string(u)?;
    assert_eq!(
        bootargs::parse_size(&size),
        ref_parse_size(&size),
        "parse_size({size:?})"
    );
    Ok(())
}
