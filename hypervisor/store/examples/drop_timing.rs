//! Host timing of the page store's frees: fills a store with N guest-like
//! pages (as `mode=reclaim` writes them: a header, 496 random bytes, a
//! repeated word), then drops every entry one `remove` at a time in a
//! shuffled order, and prints the time per N. Linear frees give a flat
//! time per entry; frees that walk a free list grow with N.
//!
//! `cargo run --release -p hyp-store --example drop_timing [N...]`
//! (default N = 10000 50000 150000).

use std::ptr::NonNull;
use std::time::Instant;

use hyp_store::{FrameSource, PageStore, PAGE_BYTES};

const FRAME: std::alloc::Layout = match std::alloc::Layout::from_size_align(PAGE_BYTES, PAGE_BYTES)
{
    Ok(l) => l,
    Err(_) => panic!("bad layout"),
};

/// Frames from the host heap, recycled through a pool so that the timing
/// is the store's and not the host allocator's; counts the frames out.
#[derive(Default)]
struct HostFrames {
    pool: Vec<NonNull<u8>>,
    live: usize,
}

// SAFETY: frames are page-sized, page-aligned heap allocations, each owned
// by the store from `alloc_frame` until it comes back through `free_frame`.
unsafe impl FrameSource for HostFrames {
    fn alloc_frame(&mut self) -> Option<NonNull<u8>> {
        self.live += 1;
        // SAFETY: `FRAME` has a non-zero size.
        self.pool
            .pop()
            .or_else(|| NonNull::new(unsafe { std::alloc::alloc(FRAME) }))
    }

    unsafe fn free_frame(&mut self, frame: NonNull<u8>) {
        self.live -= 1;
        self.pool.push(frame);
    }
}

impl Drop for HostFrames {
    fn drop(&mut self) {
        for frame in self.pool.drain(..) {
            // SAFETY: allocated in `alloc_frame` with `FRAME`, now unused.
            unsafe { std::alloc::dealloc(frame.as_ptr(), FRAME) };
        }
    }
}

/// splitmix64.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A page like the guest's: 16-byte header, 496 random bytes, a word.
fn guest_page(n: u64, page: &mut [u8; PAGE_BYTES]) {
    page[..8].copy_from_slice(&n.to_le_bytes());
    page[8..16].copy_from_slice(&1u64.to_le_bytes());
    for (i, chunk) in page[16..512].chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&mix(n << 8 | i as u64).to_le_bytes());
    }
    let word = mix(!n).to_le_bytes();
    for chunk in page[512..].chunks_mut(8) {
        chunk.copy_from_slice(&word);
    }
}

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("N is a number"))
        .collect();
    let ns = if args.is_empty() {
        vec![10_000, 50_000, 150_000]
    } else {
        args
    };
    let mut page = [0; PAGE_BYTES];
    for n in ns {
        let mut frames = HostFrames::default();
        let mut store = PageStore::new(&mut frames, usize::MAX);
        let t = Instant::now();
        for key in 0..n {
            guest_page(key, &mut page);
            store.put(key, &page).expect("no limit");
        }
        let put = t.elapsed();
        let st = store.stats();
        // A fixed pseudo-random order of the keys.
        let mut keys: Vec<u64> = (0..n).collect();
        keys.sort_by_key(|&k| mix(k));
        let t = Instant::now();
        for key in keys {
            store.remove(key).expect("stored");
        }
        let dropped = t.elapsed();
        assert_eq!(store.stats().frames_used, 0);
        drop(store);
        assert_eq!(frames.live, 0);
        println!(
            "N={n:>7}: put {:>8.1} ms, drop {:>9.1} ms ({:>6.0} ns/entry); \
             {} frames, {} B/entry host, {} B/entry payload, {} B/entry blocks",
            put.as_secs_f64() * 1e3,
            dropped.as_secs_f64() * 1e3,
            dropped.as_secs_f64() * 1e9 / n as f64,
            st.frames_used,
            st.frames_used * PAGE_BYTES as u64 / n,
            st.stored_bytes / n,
            st.allocated_bytes / n,
        );
    }
}
