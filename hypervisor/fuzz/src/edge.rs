//! Input decoding biased towards edges: values near powers of two, near
//! the ends of ranges and near block and table boundaries, where
//! off-by-one and overflow bugs live. Built on `arbitrary::Unstructured`
//! (re-exported by `libfuzzer-sys`); an exhausted input decodes as zeros,
//! so every decoder is total.

pub use libfuzzer_sys::arbitrary::{Result, Unstructured};

/// 4 KiB.
pub const PAGE: u64 = 0x1000;

/// One of `values`.
pub fn pick<T: Copy>(u: &mut Unstructured<'_>, values: &[T]) -> Result<T> {
    u.choose(values).copied()
}

/// A small signed step: `-3..=3` units of 1 byte, 8 bytes or a page.
pub fn step(u: &mut Unstructured<'_>) -> Result<i64> {
    let n = i64::from(u.int_in_range(-3i8..=3)?);
    let unit = pick(u, &[1i64, 8, PAGE as i64])?;
    Ok(n * unit)
}

/// `anchor` moved by a small [`step`] (wrapping).
pub fn near(u: &mut Unstructured<'_>, anchor: u64) -> Result<u64> {
    Ok(anchor.wrapping_add_signed(step(u)?))
}

/// Any `u64`, most often an interesting one: a power of two or its
/// neighbours (by a byte or a page), the top of the address space, a small
/// count or a small page multiple.
pub fn edgy(u: &mut Unstructured<'_>) -> Result<u64> {
    Ok(match u.int_in_range(0u8..=5)? {
        0 => u.arbitrary()?,
        1 | 2 => {
            let bit = u.int_in_range(0u32..=63)?;
            near(u, 1u64 << bit)?
        }
        3 => u64::MAX - u64::from(u.arbitrary::<u16>()?),
        4 => u64::from(u.int_in_range(0u8..=130)?),
        _ => u64::from(u.int_in_range(0u16..=1100)?) * PAGE,
    })
}
