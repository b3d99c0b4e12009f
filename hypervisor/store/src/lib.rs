//! The compressed page store (tmem/zswap-like).
//!
//! A guest evicts a 4 KiB page with `STORE_PUT(key, page)` and later gets it
//! back, exactly once, with `STORE_GET(key)`; in between the page is kept
//! LZ4-compressed so that it costs the host far less than a frame. This crate
//! owns the pages' bytes and the index of keys; the hypervisor owns the
//! guest-facing ABI, the lock and the frames ([`FrameSource`]).
//!
//! # Memory
//!
//! Compressed blobs live in host frames cut into [`MIN_BLOCK`]-byte units
//! (the `slab` module): a blob takes a run of contiguous units in one frame,
//! so a 557-byte blob takes 576 bytes and seven of them share a frame, and
//! blobs of different sizes share frames too. Alloc and free take bounded
//! time, independent of the number of entries (a bitmap and a length per
//! frame, frames listed by their longest free run). The store grows one
//! whole frame at a time from the [`FrameSource`], up to `limit_frames`; a
//! put that would need more is refused with [`StoreError::Full`] and changes
//! nothing. A frame goes back to the source as soon as its last blob is
//! freed, so an empty store holds no frames and `frames_used` in
//! [`StoreStats`] is exactly the number of frames held.
//!
//! A blob that would take more than half a frame (compressed size above
//! [`RAW_THRESHOLD`]) is stored raw, in a frame of its own, which saves the
//! decompression. Blobs never move, so a long mix of sizes can leave frames
//! partly used ([`StoreStats::allocated_bytes`] against `frames_used` shows
//! it).
//!
//! The index (`BTreeMap<u64, Entry>`, 16 bytes of payload per entry plus
//! B-tree node overhead), one 32-byte record per frame held at the peak,
//! and the store's compression scratch live in the hypervisor's global
//! heap, not in the frames. The index is bounded all the same: every entry
//! holds at least [`MIN_BLOCK`] bytes of a frame, so there are at most
//! `limit_frames * PAGE_BYTES / MIN_BLOCK` entries.
//!
//! # Concurrency
//!
//! [`PageStore`] is not synchronised: the hypervisor wraps it in a lock.
//! Compression is the expensive part and needs no store state, so it is split
//! out: [`compress_page`] runs outside the lock into a caller-owned
//! [`Scratch`], and [`PageStore::put_compressed`] only allocates and
//! copies. [`PageStore::put`] does both under whatever lock the caller holds.
//!
//! Keys are opaque `u64`s; keeping guests apart (one store per VM, or the VM
//! id in the key) is the caller's business.

#![cfg_attr(not(test), no_std)]
#![warn(missing_docs)]

extern crate alloc;

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use core::fmt;
use core::ptr::NonNull;

/// Size of a page, of a frame, and of everything the store hands back.
pub const PAGE_BYTES: usize = 4096;

/// A page whose LZ4 form is longer than this is stored raw: it would not
/// save even half a frame, and raw saves decompressing it.
pub const RAW_THRESHOLD: usize = PAGE_BYTES / 2;

/// The allocation unit: every blob takes a whole number of these, at least
/// one. It also bounds the number of entries (and therefore the index) per
/// frame, without resting on LZ4's internals.
pub const MIN_BLOCK: usize = slab::UNIT;

/// Bytes of output [`compress_page`] needs: LZ4's worst case for a page.
pub const SCRATCH_LEN: usize = lz4_flex::block::get_maximum_output_size(PAGE_BYTES);

/// Where the store gets its host frames.
///
/// # Safety
///
/// An implementation promises that every frame [`alloc_frame`] returns is
/// `PAGE_BYTES` bytes, `PAGE_BYTES`-aligned, readable and writable through the
/// returned pointer, and used by nothing else until it is handed back with
/// [`free_frame`]. Its contents need not be initialised to anything.
///
/// [`alloc_frame`]: FrameSource::alloc_frame
/// [`free_frame`]: FrameSource::free_frame
pub unsafe trait FrameSource {
    /// A fresh frame, or `None` if there is none to give.
    fn alloc_frame(&mut self) -> Option<NonNull<u8>>;

    /// Takes back a frame.
    ///
    /// # Safety
    ///
    /// `frame` came from [`alloc_frame`](FrameSource::alloc_frame) of this
    /// source, has not been freed since, and the caller does not touch it
    /// afterwards.
    unsafe fn free_frame(&mut self, frame: NonNull<u8>);
}

// SAFETY: forwards both calls unchanged to a source that keeps the contract.
unsafe impl<F: FrameSource + ?Sized> FrameSource for &mut F {
    fn alloc_frame(&mut self) -> Option<NonNull<u8>> {
        (**self).alloc_frame()
    }

    unsafe fn free_frame(&mut self, frame: NonNull<u8>) {
        // SAFETY: the caller's promise about `frame` is passed on as is.
        unsafe { (**self).free_frame(frame) }
    }
}

/// Errors of the page store.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum StoreError {
    /// No entry under this key.
    NotFound {
        /// The key asked for.
        key: u64,
    },
    /// Storing the page would take the store past its frame limit. Nothing
    /// was changed.
    Full {
        /// The limit, in frames.
        frames_limit: usize,
    },
    /// The store is under its limit but the frame source had no frame to
    /// give. Nothing was changed.
    NoFrames,
    /// The entry did not decompress to exactly one page. It has been
    /// dropped; the output page was zeroed, never filled with partial data.
    Corrupt {
        /// The key of the damaged entry.
        key: u64,
    },
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotFound { key } => write!(f, "no page stored under key {key:#x}"),
            Self::Full { frames_limit } => {
                write!(f, "page store full (limit {frames_limit} frames)")
            }
            Self::NoFrames => f.write_str("no host frame left for the page store"),
            Self::Corrupt { key } => {
                write!(f, "page under key {key:#x} did not decompress to one page")
            }
        }
    }
}

impl core::error::Error for StoreError {}

/// How an entry holds its page.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// LZ4 block format, at most [`RAW_THRESHOLD`] bytes.
    Lz4,
    /// The page as is, `PAGE_BYTES` bytes (it did not compress well enough).
    Raw,
}

/// Output buffer for [`compress_page`], [`SCRATCH_LEN`] bytes.
///
/// Big (about 4.5 KiB): keep one per CPU or per caller, not on a small stack.
pub struct Scratch {
    buf: [u8; SCRATCH_LEN],
}

impl Scratch {
    /// A zeroed scratch buffer.
    pub const fn new() -> Self {
        Self {
            buf: [0; SCRATCH_LEN],
        }
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Scratch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scratch")
            .field("len", &SCRATCH_LEN)
            .finish()
    }
}

/// A page ready to go into a store: its LZ4 form (in the scratch buffer) or
/// the page itself. Made only by [`compress_page`], so an LZ4 payload always
/// decodes to exactly one page.
pub struct Compressed<'a> {
    bytes: &'a [u8],
    kind: EntryKind,
}

impl Compressed<'_> {
    /// Whether the payload is LZ4 or the raw page.
    pub fn kind(&self) -> EntryKind {
        self.kind
    }

    /// Bytes of payload: the LZ4 length, or `PAGE_BYTES` for a raw page.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Always `false`: even an all-zero page has a non-empty LZ4 form.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Bytes of frame this payload will take once stored: [`block_len`] of
    /// its length.
    pub fn block_bytes(&self) -> usize {
        block_len(self.bytes.len())
    }
}

impl fmt::Debug for Compressed<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Compressed")
            .field("kind", &self.kind)
            .field("len", &self.bytes.len())
            .finish()
    }
}

/// Compresses `page` into `scratch`, or settles for the raw page if its LZ4
/// form is longer than [`RAW_THRESHOLD`]. Needs no store, so it can run
/// outside the store's lock.
///
/// `page` must be a stable snapshot: guest memory that another vCPU may
/// write at the same time is copied first (or unmapped) by the caller.
///
/// LZ4 allocates its 8 KiB hash table from the global heap for each call.
pub fn compress_page<'a>(page: &'a [u8; PAGE_BYTES], scratch: &'a mut Scratch) -> Compressed<'a> {
    match lz4_flex::block::compress_into(page, &mut scratch.buf) {
        Ok(n) if n <= RAW_THRESHOLD => Compressed {
            bytes: &scratch.buf[..n],
            kind: EntryKind::Lz4,
        },
        // `Err` cannot happen (the scratch is LZ4's worst case); raw is the
        // safe answer all the same.
        _ => Compressed {
            bytes: page,
            kind: EntryKind::Raw,
        },
    }
}

/// Decodes an LZ4 payload into `out`; `Err` unless it is exactly one page.
fn decompress_page(blob: &[u8], out: &mut [u8; PAGE_BYTES]) -> Result<(), ()> {
    match lz4_flex::block::decompress_into(blob, out) {
        Ok(PAGE_BYTES) => Ok(()),
        _ => Err(()),
    }
}

/// Bytes of frame a payload of `len` bytes (at most `PAGE_BYTES`) takes:
/// `len` rounded up to a multiple of [`MIN_BLOCK`], at least one.
pub const fn block_len(len: usize) -> usize {
    slab::units_for(len) as usize * MIN_BLOCK
}

/// What [`PageStore::put`] did.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PutInfo {
    /// An entry with the same key was replaced (and freed).
    pub replaced: bool,
    /// How the page is held.
    pub kind: EntryKind,
    /// Bytes of payload stored (as in [`StoreStats::stored_bytes`]).
    pub stored_bytes: usize,
    /// Bytes of frame the entry takes (as in [`StoreStats::allocated_bytes`]).
    pub block_bytes: usize,
}

/// Counters of a [`PageStore`].
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Entries stored.
    pub entries: u64,
    /// Of those, entries stored raw.
    pub raw_entries: u64,
    /// Bytes of payload: LZ4 lengths, plus `PAGE_BYTES` per raw entry.
    pub stored_bytes: u64,
    /// Bytes of frames held by entries (payloads rounded up by
    /// [`block_len`]); `frames_used * PAGE_BYTES` minus this is free space.
    pub allocated_bytes: u64,
    /// Host frames the store holds now.
    pub frames_used: u64,
    /// Most host frames the store may hold.
    pub frames_limit: u64,
    /// Successful puts (replacements included).
    pub puts: u64,
    /// Successful takes.
    pub takes: u64,
    /// Successful removes.
    pub removes: u64,
    /// Puts refused with [`StoreError::Full`].
    pub rejected_full: u64,
    /// Puts refused with [`StoreError::NoFrames`].
    pub rejected_no_frames: u64,
    /// Takes that found a corrupt entry ([`StoreError::Corrupt`]).
    pub corrupt: u64,
}

/// One stored page: where its payload is. The slot is kept as its two
/// fields so that an entry is 8 bytes.
#[derive(Copy, Clone, Debug)]
struct Entry {
    /// `slab::Slot::frame`.
    frame: u32,
    /// `slab::Slot::unit`.
    unit: u8,
    kind: EntryKind,
    /// Payload bytes (≤ `PAGE_BYTES`, so a `u16` is enough).
    len: u16,
}
const _: () = assert!(core::mem::size_of::<Entry>() == 8);

impl Entry {
    fn new(slot: slab::Slot, len: usize, kind: EntryKind) -> Self {
        Self {
            frame: slot.frame,
            unit: slot.unit,
            kind,
            len: u16::try_from(len).expect("payloads are at most a page"),
        }
    }

    fn slot(&self) -> slab::Slot {
        slab::Slot {
            frame: self.frame,
            unit: self.unit,
        }
    }

    fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// Allocation units the payload takes.
    fn units(&self) -> u32 {
        slab::units_for(self.len())
    }
}

/// The compressed page store. See the [crate documentation](crate).
pub struct PageStore<F: FrameSource> {
    source: F,
    /// The frames and which of their bytes hold blobs.
    slab: slab::Slab,
    limit_frames: usize,
    index: BTreeMap<u64, Entry>,
    /// For [`PageStore::put`]; boxed to keep the store small. `None` only
    /// during a `put`.
    scratch: Option<Box<Scratch>>,
    stats: StoreStats,
}

// SAFETY: the store owns its frames and blobs exclusively (the `FrameSource`
// contract) and reaches them only through `&self`/`&mut self`, so moving it
// to another thread moves that ownership too; the frame pointers in the
// slab are what stops the auto trait.
unsafe impl<F: FrameSource + Send> Send for PageStore<F> {}

impl<F: FrameSource> fmt::Debug for PageStore<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageStore")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl<F: FrameSource> PageStore<F> {
    /// An empty store that takes frames from `source`, at most
    /// `limit_frames` of them at a time. It holds none until the first put.
    pub fn new(source: F, limit_frames: usize) -> Self {
        Self {
            source,
            slab: slab::Slab::new(),
            limit_frames,
            index: BTreeMap::new(),
            scratch: Some(Box::new(Scratch::new())),
            stats: StoreStats {
                frames_limit: limit_frames as u64,
                ..StoreStats::default()
            },
        }
    }

    /// Compresses `page` and stores it under `key`, replacing any entry
    /// with that key. See [`put_compressed`](Self::put_compressed).
    pub fn put(&mut self, key: u64, page: &[u8; PAGE_BYTES]) -> Result<PutInfo, StoreError> {
        // Taken out for the call so that `put_compressed` can borrow `self`.
        let mut scratch = self.scratch.take().unwrap_or_default();
        let result = self.put_compressed(key, &compress_page(page, &mut scratch));
        self.scratch = Some(scratch);
        result
    }

    /// Stores a page compressed by [`compress_page`] under `key`.
    ///
    /// An existing entry with the same key is replaced, and freed only once
    /// the new one is stored: on [`StoreError::Full`] or
    /// [`StoreError::NoFrames`] the store, old entry included, is unchanged
    /// (except for the rejection counters). So replacing an entry at the
    /// limit can fail even when freeing the old one first would have made
    /// room.
    pub fn put_compressed(
        &mut self,
        key: u64,
        page: &Compressed<'_>,
    ) -> Result<PutInfo, StoreError> {
        let len = page.len();
        let entry = Entry::new(self.alloc_blob(len)?, len, page.kind);
        // SAFETY: the slot is a fresh run of at least `len` bytes in a frame
        // only this store uses, so it overlaps neither `page.bytes` nor any
        // other entry.
        unsafe {
            core::ptr::copy_nonoverlapping(page.bytes.as_ptr(), self.blob_ptr(&entry).as_ptr(), len)
        };
        self.account(&entry, true);
        let old = self.index.insert(key, entry);
        if let Some(old) = old {
            self.account(&old, false);
            self.free_blob(old);
        }
        self.stats.puts += 1;
        Ok(PutInfo {
            replaced: old.is_some(),
            kind: entry.kind,
            stored_bytes: len,
            block_bytes: block_len(len),
        })
    }

    /// Copies the page stored under `key` into `out` and removes the entry
    /// (an exclusive get).
    ///
    /// A missing key is [`StoreError::NotFound`] and leaves `out`
    /// untouched. An entry that does not decompress to exactly one page is
    /// dropped and reported as [`StoreError::Corrupt`], with `out` zeroed.
    pub fn take(&mut self, key: u64, out: &mut [u8; PAGE_BYTES]) -> Result<(), StoreError> {
        let entry = self
            .index
            .remove(&key)
            .ok_or(StoreError::NotFound { key })?;
        // SAFETY: the slot was filled with `entry.len` bytes when the entry
        // was stored and stays untouched until it is freed below; `&mut self`
        // keeps everyone else out.
        let blob =
            unsafe { core::slice::from_raw_parts(self.blob_ptr(&entry).as_ptr(), entry.len()) };
        let result = match entry.kind {
            EntryKind::Raw => {
                out.copy_from_slice(blob);
                Ok(())
            }
            EntryKind::Lz4 => decompress_page(blob, out).map_err(|()| {
                out.fill(0);
                StoreError::Corrupt { key }
            }),
        };
        self.account(&entry, false);
        self.free_blob(entry);
        match result {
            Ok(()) => self.stats.takes += 1,
            Err(_) => self.stats.corrupt += 1,
        }
        result
    }

    /// Drops the entry under `key` (`STORE_DROP`); [`StoreError::NotFound`]
    /// if there is none.
    pub fn remove(&mut self, key: u64) -> Result<(), StoreError> {
        let entry = self
            .index
            .remove(&key)
            .ok_or(StoreError::NotFound { key })?;
        self.account(&entry, false);
        self.free_blob(entry);
        self.stats.removes += 1;
        Ok(())
    }

    /// Whether an entry is stored under `key`.
    pub fn contains(&self, key: u64) -> bool {
        self.index.contains_key(&key)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether the store holds no entry (and so, no frame).
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> StoreStats {
        StoreStats {
            entries: self.index.len() as u64,
            frames_used: self.slab.frames_held() as u64,
            ..self.stats
        }
    }

    /// Adds (`add`) or subtracts an entry's share of the byte counters.
    fn account(&mut self, entry: &Entry, add: bool) {
        let s = &mut self.stats;
        let (stored, block) = (entry.len() as u64, block_len(entry.len()) as u64);
        let raw = u64::from(entry.kind == EntryKind::Raw);
        if add {
            s.stored_bytes += stored;
            s.allocated_bytes += block;
            s.raw_entries += raw;
        } else {
            s.stored_bytes -= stored;
            s.allocated_bytes -= block;
            s.raw_entries -= raw;
        }
    }

    /// Where an entry's payload is.
    fn blob_ptr(&self, entry: &Entry) -> NonNull<u8> {
        self.slab.ptr(entry.slot())
    }

    /// A slot for `len` payload bytes, in a new frame if no held one has
    /// room and the limit allows. On error nothing has changed.
    fn alloc_blob(&mut self, len: usize) -> Result<slab::Slot, StoreError> {
        match self
            .slab
            .alloc(slab::units_for(len), &mut self.source, self.limit_frames)
        {
            Ok(slot) => Ok(slot),
            Err(slab::AllocError::Full) => {
                self.stats.rejected_full += 1;
                Err(StoreError::Full {
                    frames_limit: self.limit_frames,
                })
            }
            Err(slab::AllocError::NoFrames) => {
                self.stats.rejected_no_frames += 1;
                Err(StoreError::NoFrames)
            }
        }
    }

    /// Frees an entry's slot; its frame goes back to the source if that was
    /// the frame's last entry.
    fn free_blob(&mut self, entry: Entry) {
        // SAFETY: the slot was allocated by `alloc_blob` for the same length
        // and is freed once, as its entry has just left the index (or was
        // replaced in it) and nothing else refers to it.
        unsafe {
            self.slab
                .free(entry.slot(), entry.units(), &mut self.source)
        };
    }
}

impl<F: FrameSource> Drop for PageStore<F> {
    /// Returns every frame, entries and all, to the source.
    fn drop(&mut self) {
        self.index.clear();
        // SAFETY: every frame of the slab came from this source; with the
        // index cleared no slot is used again.
        unsafe { self.slab.release_all(&mut self.source) };
    }
}

mod slab;

#[cfg(test)]
mod tests;
