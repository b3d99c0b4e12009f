//! The store's blob allocator: host frames cut into [`UNIT`]-byte units,
//! with alloc and free in bounded time.
//!
//! A blob takes a run of contiguous units in one frame; a frame holds blobs
//! of any sizes. Each held frame has a record with a 64-bit map of its used
//! units and the length of its longest run of free units. A frame with
//! free space sits on the list for that length (1 to 63); a full frame is
//! on none, and a frame whose last unit is freed goes back to the
//! [`FrameSource`] at once, so the count of held frames is exact.
//!
//! - **Alloc** of `k` units: the first frame of the first non-empty list at
//!   `k` or above (the frame with the shortest longest run that fits),
//!   the lowest run of `k` free units in it; only if no list has one, a
//!   fresh frame.
//! - **Free**: clear the bits, move the frame to its new list (or give it
//!   back).
//!
//! Either is at most 63 list heads and a few hundred word operations on the
//! frame's map: independent of the numbers of blobs, frames and free
//! holes. (`buddy_system_allocator`, used before, walks a free list to
//! find a block's buddy, which made dropping 150,000 entries take minutes.)
//! The lists are doubly linked through the records by index, so moving a
//! frame is O(1) and the free path never allocates.
//!
//! Records live in a `Vec` on the global heap, one per frame held at the
//! peak (32 bytes each), reused through a free chain; the frames themselves
//! hold nothing but blob bytes.

extern crate alloc;

use alloc::vec::Vec;
use core::ptr::NonNull;

use crate::{FrameSource, PAGE_BYTES};

/// Bytes per allocation unit: the smallest block and the rounding of every
/// blob.
pub(crate) const UNIT: usize = 64;

/// Units per frame: one bit each in a `u64`.
pub(crate) const UNITS: u32 = 64;
const _: () = assert!(UNIT * UNITS as usize == PAGE_BYTES);

/// End of a list, and "no record" in the free chain.
const NIL: u32 = u32::MAX;

const _: () = assert!(core::mem::size_of::<FrameRecord>() == 32);

/// Units a blob of `len` bytes takes (at least one).
pub(crate) const fn units_for(len: usize) -> u32 {
    let units = if len == 0 { 1 } else { len.div_ceil(UNIT) };
    assert!(units <= UNITS as usize, "a blob is at most a page");
    units as u32
}

/// Where a blob lives: a frame record and the first unit in that frame.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) struct Slot {
    /// Index of the frame's record.
    pub(crate) frame: u32,
    /// First unit of the blob in the frame.
    pub(crate) unit: u8,
}

/// Why an alloc failed. Either way nothing changed.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum AllocError {
    /// No held frame has room and the limit is reached.
    Full,
    /// Under the limit, but no new frame (or no heap for its record).
    NoFrames,
}

/// One frame slot of the allocator.
#[derive(Debug)]
struct FrameRecord {
    /// The frame, or `None` while the record is on the free chain.
    frame: Option<NonNull<u8>>,
    /// Bit `i` set: unit `i` belongs to a blob. Never 0 while held.
    used: u64,
    /// Neighbours on the list for `run`, or the next free record.
    prev: u32,
    next: u32,
    /// Longest run of free units (0 for a full frame, which is on no list).
    run: u8,
}

/// The allocator. It owns the frames it holds but does not give them back
/// on drop: the owner calls [`Slab::release_all`].
#[derive(Debug)]
pub(crate) struct Slab {
    records: Vec<FrameRecord>,
    /// `heads[r]`, `r` in `1..UNITS`: first frame whose longest free run
    /// is `r`. `heads[0]` is unused.
    heads: [u32; UNITS as usize],
    /// First record on the free chain (linked through `next`).
    free_records: u32,
    /// Frames held.
    held: usize,
}

/// `units` low bits set.
const fn mask(units: u32) -> u64 {
    if units >= 64 {
        u64::MAX
    } else {
        (1 << units) - 1
    }
}

/// The lowest `i` such that bits `i..i + k` of `free` are all set.
fn find_run(free: u64, k: u32) -> Option<u32> {
    // After each step bit `i` of `m` is set iff bits `i..i + have` of
    // `free` are; the shift brings in zeros, so no run passes bit 63.
    let (mut m, mut have) = (free, 1);
    while have < k && m != 0 {
        let step = have.min(k - have);
        m &= m >> step;
        have += step;
    }
    (m != 0).then(|| m.trailing_zeros())
}

/// Length of the longest run of set bits of `free`.
fn longest_run(free: u64) -> u8 {
    let (mut m, mut run) = (free, 0);
    while m != 0 {
        m &= m >> 1;
        run += 1;
    }
    run
}

impl Slab {
    /// An allocator holding no frame.
    pub(crate) const fn new() -> Self {
        Self {
            records: Vec::new(),
            heads: [NIL; UNITS as usize],
            free_records: NIL,
            held: 0,
        }
    }

    /// Frames held now.
    pub(crate) fn frames_held(&self) -> usize {
        self.held
    }

    /// A run of `units` units (1 to [`UNITS`]), in a held frame if one has
    /// room, else in a new frame from `source` if fewer than `limit` are
    /// held. On error nothing has changed.
    pub(crate) fn alloc<F: FrameSource>(
        &mut self,
        units: u32,
        source: &mut F,
        limit: usize,
    ) -> Result<Slot, AllocError> {
        debug_assert!((1..=UNITS).contains(&units));
        // Lists 1..UNITS; a request for a whole frame never fits a held one.
        for run in units..UNITS {
            let id = self.heads[run as usize];
            if id != NIL {
                return Ok(self.take_run(id, units));
            }
        }
        if self.held >= limit {
            return Err(AllocError::Full);
        }
        // The record first: failing after taking the frame would mean
        // giving it back, and the source's counters would show it.
        if self.free_records == NIL
            && (self.records.len() >= NIL as usize || self.records.try_reserve(1).is_err())
        {
            return Err(AllocError::NoFrames);
        }
        let frame = source.alloc_frame().ok_or(AllocError::NoFrames)?;
        debug_assert_eq!(
            frame.as_ptr() as usize % PAGE_BYTES,
            0,
            "frame source broke its contract"
        );
        let record = FrameRecord {
            frame: Some(frame),
            used: 0,
            prev: NIL,
            next: NIL,
            run: UNITS as u8,
        };
        let id = if self.free_records != NIL {
            let id = self.free_records;
            self.free_records = self.records[id as usize].next;
            self.records[id as usize] = record;
            id
        } else {
            // Cannot allocate: reserved above.
            self.records.push(record);
            (self.records.len() - 1) as u32
        };
        self.held += 1;
        Ok(self.take_run(id, units))
    }

    /// Frees a run allocated by [`alloc`](Self::alloc) with the same
    /// `units`, and gives its frame to `source` if that was the frame's
    /// last run.
    ///
    /// # Safety
    ///
    /// `slot` came from `alloc(units, ..)` of this allocator with this
    /// `source`, has not been freed since, and the caller no longer uses
    /// its bytes.
    pub(crate) unsafe fn free<F: FrameSource>(&mut self, slot: Slot, units: u32, source: &mut F) {
        let id = slot.frame;
        let bits = mask(units) << slot.unit;
        let record = &self.records[id as usize];
        debug_assert!(
            record.frame.is_some() && record.used & bits == bits,
            "free of a slot that is not allocated: {slot:?}, {units} units"
        );
        self.unlink(id);
        let record = &mut self.records[id as usize];
        record.used &= !bits;
        if record.used != 0 {
            record.run = longest_run(!record.used);
            self.link(id);
            return;
        }
        let frame = record.frame.take().expect("a held frame");
        record.next = self.free_records;
        self.free_records = id;
        self.held -= 1;
        // SAFETY: the frame came from `source` (the caller's promise), no
        // run in it is allocated any more and its record is on the free
        // chain, so nothing refers to it.
        unsafe { source.free_frame(frame) };
    }

    /// The first byte of a slot's run.
    pub(crate) fn ptr(&self, slot: Slot) -> NonNull<u8> {
        let frame = self.records[slot.frame as usize]
            .frame
            .expect("the slot's frame is held");
        // SAFETY: `unit < UNITS`, so the offset stays inside the frame.
        unsafe { frame.add(usize::from(slot.unit) * UNIT) }
    }

    /// Gives every held frame back to `source`, allocated runs and all, and
    /// forgets them.
    ///
    /// # Safety
    ///
    /// Every frame held came from `source`, and the caller uses no slot of
    /// this allocator afterwards.
    pub(crate) unsafe fn release_all<F: FrameSource>(&mut self, source: &mut F) {
        for record in &mut self.records {
            if let Some(frame) = record.frame.take() {
                // SAFETY: the frame came from `source` (the caller's
                // promise) and no slot in it is used again.
                unsafe { source.free_frame(frame) };
            }
        }
        *self = Self::new();
    }

    /// Takes the lowest run of `units` free units in a held frame that
    /// has one, and moves the frame to its new list.
    fn take_run(&mut self, id: u32, units: u32) -> Slot {
        self.unlink(id);
        let record = &mut self.records[id as usize];
        let unit = find_run(!record.used, units).expect("the frame has a long enough run");
        record.used |= mask(units) << unit;
        record.run = longest_run(!record.used);
        self.link(id);
        Slot {
            frame: id,
            unit: unit as u8,
        }
    }

    /// Puts a held frame at the head of the list for its `run`, if any.
    fn link(&mut self, id: u32) {
        let run = usize::from(self.records[id as usize].run);
        if !(1..UNITS as usize).contains(&run) {
            return;
        }
        let head = self.heads[run];
        if head != NIL {
            self.records[head as usize].prev = id;
        }
        let record = &mut self.records[id as usize];
        record.prev = NIL;
        record.next = head;
        self.heads[run] = id;
    }

    /// Takes a held frame off the list for its `run`, if it is on one.
    fn unlink(&mut self, id: u32) {
        let record = &self.records[id as usize];
        let (run, prev, next) = (usize::from(record.run), record.prev, record.next);
        if !(1..UNITS as usize).contains(&run) {
            return;
        }
        if prev == NIL {
            debug_assert_eq!(self.heads[run], id);
            self.heads[run] = next;
        } else {
            self.records[prev as usize].next = next;
        }
        if next != NIL {
            self.records[next as usize].prev = prev;
        }
    }

    /// Checks the allocator's own invariants (for tests): every held frame
    /// is on the list for its longest run (or on none when full), never
    /// empty, and counted; free records are exactly the frameless ones.
    #[cfg(test)]
    pub(crate) fn check(&self) {
        let mut on_lists = 0;
        for run in 1..UNITS as usize {
            let (mut id, mut prev) = (self.heads[run], NIL);
            while id != NIL {
                let r = &self.records[id as usize];
                assert!(r.frame.is_some(), "free record {id} on list {run}");
                assert_eq!(usize::from(r.run), run, "record {id} on the wrong list");
                assert_eq!(r.prev, prev, "record {id}: broken back link");
                (prev, id) = (id, r.next);
                on_lists += 1;
                assert!(on_lists <= self.records.len(), "list {run} has a cycle");
            }
        }
        let mut held = 0;
        let mut not_full = 0;
        for r in &self.records {
            if r.frame.is_some() {
                held += 1;
                assert_ne!(r.used, 0, "an empty frame is held");
                assert_eq!(r.run, longest_run(!r.used));
                not_full += usize::from(r.run != 0);
            }
        }
        assert_eq!(held, self.held);
        assert_eq!(not_full, on_lists, "a frame with room is on no list");
        let (mut id, mut free) = (self.free_records, 0);
        while id != NIL {
            assert!(self.records[id as usize].frame.is_none());
            id = self.records[id as usize].next;
            free += 1;
        }
        assert_eq!(held + free, self.records.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn runs_and_masks() {
        assert_eq!(find_run(u64::MAX, 64), Some(0));
        assert_eq!(find_run(u64::MAX - 1, 64), None);
        assert_eq!(find_run(u64::MAX - 1, 63), Some(1));
        assert_eq!(find_run(0b1110_1101, 3), Some(5));
        assert_eq!(find_run(0b1110_1101, 4), None);
        assert_eq!(find_run(1 << 63, 1), Some(63));
        assert_eq!(find_run(1 << 63, 2), None);
        assert_eq!(find_run(0, 1), None);
        assert_eq!(longest_run(0), 0);
        assert_eq!(longest_run(u64::MAX), 64);
        assert_eq!(longest_run(0b1110_1101), 3);
        assert_eq!((mask(1), mask(63), mask(64)), (1, u64::MAX >> 1, u64::MAX));
        assert_eq!(
            (units_for(0), units_for(1), units_for(64), units_for(65)),
            (1, 1, 1, 2)
        );
        assert_eq!(units_for(PAGE_BYTES), UNITS);
    }

    proptest! {
        /// Brute force against the bit tricks.
        #[test]
        fn find_run_and_longest_run_match_a_scan(free in any::<u64>(), k in 1u32..=64) {
            let bit = |i: u32| free >> i & 1 == 1;
            let scan = (0..=64 - k).find(|&i| (i..i + k).all(bit));
            prop_assert_eq!(find_run(free, k), scan);
            let mut best = 0;
            let mut cur = 0;
            for i in 0..64 {
                cur = if bit(i) { cur + 1 } else { 0 };
                best = best.max(cur);
            }
            prop_assert_eq!(u32::from(longest_run(free)), best);
        }
    }
}
