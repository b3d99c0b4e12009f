//! Target `store`: the compressed page store (`hyp-store`) against a
//! `HashMap` of pages, with a frame source that can run dry, and the LZ4
//! block decoder the store relies on against arbitrary blobs.
//!
//! After every operation: the result is the model's (a put is refused only
//! with `Full` at the frame limit or `NoFrames` when the source is dry, and
//! then changes nothing), a take gives back exactly the page put, a
//! missing key leaves the output untouched, and the counters are exact:
//! entries, stored and allocated bytes, raw entries, frames held (the
//! source's live frames, at most the limit, none when empty). At the end
//! every page is taken back and every frame returned.
//!
//! The store's own decoder is private (entries can only be made by
//! `compress_page`); what it calls, `lz4_flex::block::decompress_into`
//! with `safe-decode`, is fed arbitrary blobs: an error or at most one
//! page, never a panic.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::ptr::NonNull;

use hyp_store::{
    compress_page, EntryKind, FrameSource, PageStore, PutInfo, Scratch, StoreError, StoreStats,
    PAGE_BYTES,
};

use crate::edge::{Result, Unstructured};

type Page = [u8; PAGE_BYTES];

const FRAME: std::alloc::Layout = match std::alloc::Layout::from_size_align(PAGE_BYTES, PAGE_BYTES)
{
    Ok(l) => l,
    Err(_) => panic!("bad layout"),
};

/// Frames from the host heap; `dry` makes it refuse. Freed frames are
/// poisoned before they go back to the heap.
#[derive(Debug, Default)]
struct HostFrames {
    live: RefCell<HashSet<usize>>,
    dry: Cell<bool>,
}

/// The store's handle on a [`HostFrames`] the harness reads too.
#[derive(Debug)]
struct Source<'a>(&'a HostFrames);

// SAFETY: frames are fresh, 4 KiB-aligned, 4 KiB heap allocations owned by
// the store until `free_frame`, which deallocates them exactly once.
unsafe impl FrameSource for Source<'_> {
    fn alloc_frame(&mut self) -> Option<NonNull<u8>> {
        if self.0.dry.get() {
            return None;
        }
        // SAFETY: `FRAME` has a non-zero size.
        let frame = NonNull::new(unsafe { std::alloc::alloc(FRAME) }).expect("host out of memory");
        self.0.live.borrow_mut().insert(frame.as_ptr() as usize);
        Some(frame)
    }

    unsafe fn free_frame(&mut self, frame: NonNull<u8>) {
        assert!(
            self.0.live.borrow_mut().remove(&(frame.as_ptr() as usize)),
            "free of a frame that is not live"
        );
        // SAFETY: the frame is ours (checked) and the store no longer uses
        // it (the caller's promise).
        unsafe {
            frame.as_ptr().write_bytes(0xa5, PAGE_BYTES);
            std::alloc::dealloc(frame.as_ptr(), FRAME);
        }
    }
}

/// A page from the input: zeros, one byte repeated, a short pattern
/// repeated, pseudo-random (incompressible) with or without runs, or bytes
/// of the input itself.
fn page(u: &mut Unstructured<'_>) -> Result<Page> {
    let mut p = [0u8; PAGE_BYTES];
    match u.int_in_range(0u8..=5)? {
        0 => {}
        1 => p.fill(u.arbitrary()?),
        2 => {
            let pattern: Vec<u8> = (0..u.int_in_range(1usize..=16)?)
                .map(|_| u.arbitrary())
                .collect::<Result<_>>()?;
            for (b, v) in p.iter_mut().zip(pattern.iter().cycle()) {
                *b = *v;
            }
        }
        3 | 4 => {
            let mut x = u.arbitrary::<u64>()? | 1;
            // Bytes kept as runs: the more, the better it compresses.
            let runs = u.int_in_range(0u8..=8)?;
            for (i, b) in p.iter_mut().enumerate() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = if (i / 64) % 9 < usize::from(runs) {
                    0
                } else {
                    x as u8
                };
            }
        }
        _ => {
            let n = u.int_in_range(0..=PAGE_BYTES)?;
            let bytes = u.bytes(n.min(u.len()))?;
            p[..bytes.len()].copy_from_slice(bytes);
        }
    }
    Ok(p)
}

/// How `page` will be stored: its kind and payload length.
fn shape(page: &Page, scratch: &mut Scratch) -> (EntryKind, usize) {
    let c = compress_page(page, scratch);
    (c.kind(), c.len())
}

fn block_len(len: usize) -> usize {
    hyp_store::block_len(len)
}

struct Harness<'a> {
    store: PageStore<Source<'a>>,
    frames: &'a HostFrames,
    /// Each stored page, with how the store holds it.
    model: HashMap<u64, (Page, EntryKind, usize)>,
    scratch: Box<Scratch>,
    limit: usize,
    /// Successful puts, takes, removes; refusals (full, no frames).
    counts: (u64, u64, u64, u64, u64),
    history: Vec<String>,
}

impl Harness<'_> {
    fn fail(&self, what: String) -> ! {
        panic!(
            "{what}\n--- operations so far ---\n{}",
            self.history.join("\n")
        );
    }

    /// The counters against the model.
    fn check_stats(&mut self) {
        let (mut stored, mut allocated, mut raw) = (0u64, 0u64, 0u64);
        for &(_, kind, len) in self.model.values() {
            stored += len as u64;
            allocated += block_len(len) as u64;
            raw += u64::from(kind == EntryKind::Raw);
        }
        let s = self.store.stats();
        let (puts, takes, removes, full, dry) = self.counts;
        let want = StoreStats {
            entries: self.model.len() as u64,
            raw_entries: raw,
            stored_bytes: stored,
            allocated_bytes: allocated,
            frames_used: self.frames.live.borrow().len() as u64,
            frames_limit: self.limit as u64,
            puts,
            takes,
            removes,
            rejected_full: full,
            rejected_no_frames: dry,
            corrupt: 0,
        };
        if s != want {
            self.fail(format!("stats {s:?}, want {want:?}"));
        }
        if s.frames_used > self.limit as u64
            || s.allocated_bytes > s.frames_used * PAGE_BYTES as u64
            || (s.entries == 0 && s.frames_used != 0)
        {
            self.fail(format!("frames {s:?}: over the limit, or held while empty"));
        }
        if self.store.len() != self.model.len() || self.store.is_empty() != self.model.is_empty() {
            self.fail("len".into());
        }
    }

    fn put(&mut self, key: u64, page: &Page) {
        let (kind, len) = shape(page, &mut self.scratch);
        let before = self.store.stats();
        let got = self.store.put(key, page);
        show(&got);
        match got {
            Ok(info) => {
                let want = PutInfo {
                    replaced: self.model.contains_key(&key),
                    kind,
                    stored_bytes: len,
                    block_bytes: block_len(len),
                };
                if info != want {
                    self.fail(format!("put: {info:?}, want {want:?}"));
                }
                self.model.insert(key, (*page, kind, len));
                self.counts.0 += 1;
            }
            Err(StoreError::Full { frames_limit }) if frames_limit == self.limit => {
                if before.frames_used != self.limit as u64 {
                    self.fail(format!("Full below the limit: {before:?}"));
                }
                self.counts.3 += 1;
            }
            Err(StoreError::NoFrames) if self.frames.dry.get() => {
                if before.frames_used >= self.limit as u64 {
                    self.fail(format!("NoFrames at the limit: {before:?}"));
                }
                self.counts.4 += 1;
            }
            Err(e) => self.fail(format!("put: {e:?}")),
        }
    }

    fn take(&mut self, key: u64) {
        let mut out = [0x3c; PAGE_BYTES];
        let got = self.store.take(key, &mut out);
        show(&got);
        let want = if crate::PLANTED {
            // Planted bug: the model forgets that a take removes the entry.
            self.model.get(&key).map(|e| e.0)
        } else {
            self.model.remove(&key).map(|e| e.0)
        };
        match (got, want) {
            (Ok(()), Some(page)) if out == page => self.counts.1 += 1,
            (Ok(()), Some(_)) => self.fail(format!("take({key:#x}): not the page put")),
            (Err(StoreError::NotFound { key: k }), None) if k == key => {
                if out.iter().any(|&b| b != 0x3c) {
                    self.fail(format!("take({key:#x}) of a missing key wrote the output"));
                }
            }
            (got, want) => self.fail(format!(
                "take({key:#x}): {got:?}, model has a page: {}",
                want.is_some()
            )),
        }
    }

    fn remove(&mut self, key: u64) {
        let got = self.store.remove(key);
        show(&got);
        let want = match self.model.remove(&key) {
            Some(_) => Ok(()),
            None => Err(StoreError::NotFound { key }),
        };
        if got != want {
            self.fail(format!("remove({key:#x}): {got:?}, want {want:?}"));
        }
        if got.is_ok() {
            self.counts.2 += 1;
        }
    }
}

/// An error must print.
fn show<T>(r: &std::result::Result<T, StoreError>) {
    if let Err(e) = r {
        assert!(!e.to_string().is_empty(), "{e:?} prints nothing");
    }
}

/// Feeds `blob` to the LZ4 block decoder the store uses.
fn decode(blob: &[u8]) {
    let mut out = [0u8; PAGE_BYTES];
    if let Ok(n) = lz4_flex::block::decompress_into(blob, &mut out) {
        assert!(n <= PAGE_BYTES, "decoded {n} bytes into one page");
    }
}

fn ops(u: &mut Unstructured<'_>, h: &mut Harness<'_>) -> Result<()> {
    for _ in 0..64 {
        if u.is_empty() {
            break;
        }
        // Few keys, so puts replace and takes find; sometimes any key.
        let key = if u.ratio(7, 8)? {
            u64::from(u.int_in_range(0u8..=11)?)
        } else {
            u.arbitrary()?
        };
        match u.int_in_range(0u8..=9)? {
            0..=3 => {
                let p = page(u)?;
                h.history
                    .push(format!("put {key:#x} ({:?})", shape(&p, &mut h.scratch)));
                h.put(key, &p);
            }
            4..=5 => {
                h.history.push(format!("take {key:#x}"));
                h.take(key);
            }
            6 => {
                h.history.push(format!("remove {key:#x}"));
                h.remove(key);
            }
            7 => {
                if h.store.contains(key) != h.model.contains_key(&key) {
                    h.fail(format!("contains({key:#x})"));
                }
            }
            8 => {
                let dry = u.arbitrary()?;
                h.history.push(format!("source dry: {dry}"));
                h.frames.dry.set(dry);
            }
            _ => {
                let n = u.int_in_range(0usize..=64)?;
                decode(u.bytes(n.min(u.len()))?);
            }
        }
        h.check_stats();
    }
    Ok(())
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok((limit, keep)) =
        (|| -> Result<_> { Ok((u.int_in_range(0usize..=12)?, u.ratio(1, 4)?)) })()
    else {
        return;
    };
    if u.ratio(1, 8).unwrap_or(false) {
        let len = u.len();
        return decode(u.bytes(len).unwrap_or_default());
    }
    let frames = HostFrames::default();
    let mut h = Harness {
        store: PageStore::new(Source(&frames), limit),
        frames: &frames,
        model: HashMap::new(),
        scratch: Box::default(),
        limit,
        counts: (0, 0, 0, 0, 0),
        history: vec![format!("limit {limit} frames")],
    };
    let _ = ops(&mut u, &mut h);
    if keep {
        // Dropped with its entries: every frame goes back all the same.
        drop(h);
        assert!(frames.live.borrow().is_empty(), "frames not returned");
        return;
    }
    // Everything comes back, and then no frame is held.
    frames.dry.set(false);
    let keys: Vec<u64> = h.model.keys().copied().collect();
    for key in keys {
        h.history.push(format!("final take {key:#x}"));
        h.take(key);
    }
    h.check_stats();
    if h.store.stats().frames_used != 0 {
        h.fail("frames held by an empty store".into());
    }
    drop(h);
    assert!(frames.live.borrow().is_empty(), "frames not returned");
}
