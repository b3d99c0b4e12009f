//! Host stress tests of the stage-2 table: threads play the CPUs of one RCU
//! domain and run the lockless and the locked operations at once, over a
//! table allocator that poisons and quarantines freed pages (a walk into a
//! freed table panics), with the checking mode on (a frame reused or
//! released before its flush, a table freed before its grace period:
//! panic).
//!
//! - `everything_at_once`: harvesters, hardware access-flag setters, fault
//!   installers, an unmapper (half of its whole-slot unmaps leaf-only), a
//!   block splitter, a migrator, a lockless empty-table scanner and a
//!   pinner (which checks that a pinned frame stays handed out) for a
//!   bounded time; then the frames mapped must be exactly the frames
//!   handed out, a scan of the window must leave exactly the tables the
//!   leaves need, and after unmapping everything no table, frame or
//!   pending item is left.
//! - `no_access_is_lost`: the setters record, against the harvester's
//!   epochs, when they set an access flag; after each harvest the harvester
//!   checks that every access made before the previous harvest completed
//!   was reported (the argument is at [`nothing_lost`]).
//!
//! Quick by default (CI, a few seconds in debug); `STRESS_FULL=1` runs five
//! minutes over bigger windows. `STRESS_SECS=n` sets the duration and
//! `STRESS_SEED=n` the seed (printed in the summary line).

#[path = "stage2/common.rs"]
mod common;

use std::collections::HashSet;
use std::io::Write;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread::{self, Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};
use std::vec::Vec;

use common::{hw_touch, play_cpu, HostAlloc, RecordingTlb, GIB1, MIB2};
use hyp_core::addr::{Ipa, PhysAddr, PAGE_SIZE};
use stage2::desc::{level_size, LEAF_LEVEL};
use stage2::MapError;
use stage2::{
    FaultOutcome, HarvestFlags, MapFlags, MemType, MigrateOutcome, Perms, PinError, Rcu, Stage2,
    VisitCtx, Visitor, WalkFlags,
};

type S2<'a> = Stage2<'static, &'a HostAlloc, &'a RecordingTlb<'a>>;

const PAGES_PER_BLOCK: u64 = MIB2 / PAGE_SIZE;

// ---- configuration, randomness, shared plumbing ----

#[derive(Copy, Clone, Debug)]
struct Config {
    secs: u64,
    full: bool,
    seed: u64,
}

fn config() -> Config {
    let var = |name| std::env::var(name).ok();
    let full = var("STRESS_FULL").is_some_and(|v| v != "0");
    let number = |name| var(name).and_then(|v| v.parse::<u64>().ok());
    let clock = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    };
    Config {
        secs: number("STRESS_SECS").unwrap_or(if full { 300 } else { 8 }),
        full,
        seed: number("STRESS_SEED").unwrap_or_else(clock),
    }
}

/// xorshift64*: enough randomness for choosing operations.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, stream: u64) -> Self {
        Self((seed ^ stream.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// A counter for the summary line.
#[derive(Default)]
struct Count(AtomicU64);

impl Count {
    fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Makes the thread play `cpu`, online, until dropped; on a panic it also
/// stops the run, so that no thread waits for this CPU's quiescent state
/// or runs on until the deadline.
struct OnlineCpu<'a> {
    rcu: &'a Rcu,
    stop: &'a AtomicBool,
}

impl<'a> OnlineCpu<'a> {
    fn new(cpu: usize, rcu: &'a Rcu, stop: &'a AtomicBool) -> Self {
        play_cpu(cpu);
        rcu.online();
        Self { rcu, stop }
    }
}

impl Drop for OnlineCpu<'_> {
    fn drop(&mut self) {
        if thread::panicking() {
            self.stop.store(true, Ordering::Relaxed);
        }
        self.rcu.offline();
    }
}

/// Lets the `workers` run for `secs` (or until one of them stopped the
/// run by panicking), stops them, joins them and rethrows the first panic.
/// A watchdog aborts the process if they do not finish in time: a CPU that
/// never passes a quiescent state would otherwise hang the test.
fn supervise<'s>(
    scope: &'s Scope<'s, '_>,
    secs: u64,
    stop: &'s AtomicBool,
    done: &'s AtomicBool,
    workers: Vec<ScopedJoinHandle<'s, ()>>,
) {
    let start = Instant::now();
    scope.spawn(move || {
        let limit = Duration::from_secs(secs + 120);
        while !done.load(Ordering::Relaxed) {
            if start.elapsed() > limit {
                let _ = writeln!(
                    std::io::stderr(),
                    "stress: watchdog: workers still running {limit:?} after the start"
                );
                std::process::abort();
            }
            thread::sleep(Duration::from_millis(50));
        }
    });
    while start.elapsed() < Duration::from_secs(secs) && !stop.load(Ordering::Relaxed) {
        thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    let results: Vec<_> = workers.into_iter().map(|w| w.join()).collect();
    done.store(true, Ordering::Relaxed);
    for result in results {
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    }
}

/// Prints `line` on the test's stderr whether or not output is captured.
fn summary(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

// ---- the frames the threads map: fake physical addresses ----

#[derive(Default)]
struct Frames {
    /// 4 KiB frames ready for reuse.
    free: Vec<u64>,
    /// 4 KiB frames handed out (mapped, about to be, or pending a flush).
    out: HashSet<u64>,
    next_page: u64,
    next_chunk: u64,
}

/// Fake 4 KiB frames (fresh from a counter, or recycled after a release)
/// and fresh 2 MiB chunks for blocks, booked per 4 KiB so that a piece of
/// a split block comes back like any page. Panics on a release of a frame
/// not handed out (double release, or a frame nobody owned).
struct FramePool {
    frames: Mutex<Frames>,
    fresh: Count,
    recycled: Count,
    released: Count,
}

impl FramePool {
    const PAGES_FROM: u64 = 0x10_0000_0000;
    const CHUNKS_FROM: u64 = 0x80_0000_0000;

    fn new() -> Self {
        Self {
            frames: Mutex::new(Frames {
                next_page: Self::PAGES_FROM,
                next_chunk: Self::CHUNKS_FROM,
                ..Frames::default()
            }),
            fresh: Count::default(),
            recycled: Count::default(),
            released: Count::default(),
        }
    }

    fn take(&self) -> PhysAddr {
        let mut f = self.frames.lock().unwrap();
        let pa = match f.free.pop() {
            Some(pa) => {
                self.recycled.add(1);
                pa
            }
            None => {
                self.fresh.add(1);
                f.next_page += PAGE_SIZE;
                f.next_page - PAGE_SIZE
            }
        };
        assert!(f.out.insert(pa), "frame {pa:#x} handed out twice");
        PhysAddr(pa)
    }

    fn take_chunk(&self) -> PhysAddr {
        let mut f = self.frames.lock().unwrap();
        let pa = f.next_chunk;
        f.next_chunk += MIB2;
        for page in (pa..pa + MIB2).step_by(PAGE_SIZE as usize) {
            assert!(f.out.insert(page));
        }
        PhysAddr(pa)
    }

    /// `[pa, pa + size)` comes back (unused, or released after a flush).
    fn give_back(&self, pa: PhysAddr, size: u64) {
        let mut f = self.frames.lock().unwrap();
        for page in (pa.0..pa.0 + size).step_by(PAGE_SIZE as usize) {
            assert!(
                f.out.remove(&page),
                "frame {page:#x} (of {pa}+{size:#x}) released but not handed out"
            );
            f.free.push(page);
        }
    }

    /// The release callback of the batches.
    fn release(&self, pa: PhysAddr, size: u64) {
        self.released.add(size / PAGE_SIZE);
        self.give_back(pa, size);
    }

    fn out(&self) -> HashSet<u64> {
        self.frames.lock().unwrap().out.clone()
    }

    /// Whether the 4 KiB frame `pa` is handed out (not back in the pool).
    fn is_out(&self, pa: PhysAddr) -> bool {
        self.frames.lock().unwrap().out.contains(&pa.0)
    }
}

/// Every valid leaf: (ipa, size, pa).
#[derive(Default)]
struct Leaves(Vec<(u64, u64, u64)>);

impl Visitor for Leaves {
    type Error = core::convert::Infallible;

    fn visit(&mut self, ctx: &VisitCtx<'_>) -> Result<(), Self::Error> {
        if let Some((pa, _)) = ctx.view().leaf_parts() {
            self.0.push((ctx.ipa.0, ctx.size(), pa.0));
        }
        Ok(())
    }
}

// ---- everything at once ----

/// The IPA window: 2 MiB slots, every fourth one is the block splitter's
/// (the fault installers stay out of those, so that its `map` never
/// replaces a page it does not own). It straddles a 1 GiB boundary so that
/// level-2 tables come and go too.
struct Window {
    base: u64,
    pages: u64,
}

impl Window {
    fn new(mib: u64) -> Self {
        Self {
            base: 4 * GIB1 - mib * 0x10_0000 / 2,
            pages: mib * 0x10_0000 / PAGE_SIZE,
        }
    }

    fn ipa(&self, page: u64) -> Ipa {
        Ipa(self.base + page * PAGE_SIZE)
    }

    fn slots(&self) -> u64 {
        self.pages / PAGES_PER_BLOCK
    }

    fn is_block_slot(slot: u64) -> bool {
        slot % 4 == 3
    }

    fn block_slot(&self, rng: &mut Rng) -> u64 {
        rng.below(self.slots() / 4) * 4 + 3
    }

    /// A random page outside the block slots.
    fn fault_page(&self, rng: &mut Rng) -> u64 {
        loop {
            let page = rng.below(self.pages);
            if !Self::is_block_slot(page / PAGES_PER_BLOCK) {
                return page;
            }
        }
    }
}

#[derive(Default)]
struct Stats {
    harvests: Count,
    harvested_pages: Count,
    young: Count,
    count_mismatches: Count,
    touched: Count,
    touched_young: Count,
    touch_missed: Count,
    installed: Count,
    already: Count,
    retried: Count,
    unmaps: Count,
    leaf_unmaps: Count,
    unmapped_pages: Count,
    tables_removed: Count,
    tables_reclaimed: Count,
    scans: Count,
    tables_scanned_away: Count,
    pins: Count,
    pins_not_mapped: Count,
    pins_busy: Count,
    blocks: Count,
    splits: Count,
    moved: Count,
    not_moved: Count,
}

/// What every worker shares.
struct Ctx<'a> {
    s2: &'a S2<'a>,
    win: &'a Window,
    pool: &'a FramePool,
    stats: &'a Stats,
    stop: &'a AtomicBool,
    seed: u64,
}

impl Ctx<'_> {
    fn running(&self) -> bool {
        !self.stop.load(Ordering::Relaxed)
    }

    /// Runs `body` on a new thread playing `cpu`, online in the domain.
    fn spawn<'s>(
        &'s self,
        scope: &'s Scope<'s, '_>,
        cpu: usize,
        body: impl FnOnce(&Ctx<'_>, &mut Rng) + Send + 's,
    ) -> ScopedJoinHandle<'s, ()> {
        scope.spawn(move || {
            let _cpu = OnlineCpu::new(cpu, self.s2.rcu(), self.stop);
            body(self, &mut Rng::new(self.seed, cpu as u64));
        })
    }
}

fn harvester(c: &Ctx<'_>, rng: &mut Rng) {
    const SENTINEL: u64 = 0x5a5a_5a5a_5a5a_5a5a;
    let n = c.win.pages;
    let mut bm = vec![0u64; n.div_ceil(64) as usize + 1];
    while c.running() {
        let (first, npages) = if rng.chance(60) {
            (0, n)
        } else {
            let first = rng.below(n);
            (first, 1 + rng.below(n - first))
        };
        let clear = HarvestFlags::CLEAR;
        let flags = match rng.below(5) {
            0 => clear,
            1 => clear | HarvestFlags::FLUSH,
            2 => clear | HarvestFlags::MASK,
            3 => clear | HarvestFlags::MASK | HarvestFlags::FLUSH,
            _ => HarvestFlags::empty(),
        };
        let words = npages.div_ceil(64) as usize;
        for w in &mut bm[..words] {
            *w = if flags.contains(HarvestFlags::MASK) {
                rng.next()
            } else {
                u64::MAX
            };
        }
        bm[words] = SENTINEL;
        let young =
            c.s2.harvest(c.win.ipa(first), npages, &mut bm[..=words], flags)
                .expect("harvest");
        assert_eq!(bm[words], SENTINEL, "a word past the range was written");
        if npages % 64 != 0 {
            assert_eq!(bm[words - 1] >> (npages % 64), 0, "bits past the range");
        }
        let bits: u64 = bm[..words].iter().map(|w| u64::from(w.count_ones())).sum();
        if bits != young {
            c.stats.count_mismatches.add(1);
        }
        c.stats.harvests.add(1);
        c.stats.harvested_pages.add(npages);
        c.stats.young.add(bits);
        c.s2.rcu().quiescent();
    }
}

fn af_setter(c: &Ctx<'_>, rng: &mut Rng) {
    while c.running() {
        match hw_touch(c.s2, c.win.ipa(rng.below(c.win.pages))) {
            Some(t) if t.was_young => c.stats.touched_young.add(1),
            Some(_) => c.stats.touched.add(1),
            None => c.stats.touch_missed.add(1),
        }
        c.s2.rcu().quiescent();
    }
}

fn fault_installer(c: &Ctx<'_>, rng: &mut Rng) {
    while c.running() {
        let ipa = c.win.ipa(c.win.fault_page(rng));
        let frame = c.pool.take();
        let af = rng.chance(50);
        let outcome =
            c.s2.fault_install(ipa, frame, Perms::RW, MemType::Normal, af)
                .expect("fault_install");
        match outcome {
            FaultOutcome::Installed => c.stats.installed.add(1),
            FaultOutcome::AlreadyMapped => {
                c.pool.give_back(frame, PAGE_SIZE);
                c.stats.already.add(1);
            }
            FaultOutcome::Retry => {
                c.pool.give_back(frame, PAGE_SIZE);
                c.stats.retried.add(1);
            }
        }
        c.s2.rcu().quiescent();
    }
}

fn unmapper(c: &Ctx<'_>, rng: &mut Rng) {
    let mut release = |pa, size| c.pool.release(pa, size);
    let mut batch = c.s2.batch(&mut release);
    let slots = c.win.slots();
    let mut ops = 0u64;
    while c.running() {
        let (first, pages) = match rng.below(100) {
            // A few pages anywhere (splits blocks in the way).
            0..70 => {
                let first = rng.below(c.win.pages);
                (first, (1 + rng.below(64)).min(c.win.pages - first))
            }
            // Whole slots: their level-3 tables become empty and go.
            70..97 => {
                let slot = rng.below(slots);
                let n = (1 + rng.below(4)).min(slots - slot);
                (slot * PAGES_PER_BLOCK, n * PAGES_PER_BLOCK)
            }
            // Half the window or more: level-2 tables too.
            _ => {
                let slot = rng.below(slots / 2);
                (slot * PAGES_PER_BLOCK, c.win.pages / 2)
            }
        };
        // Half the unmaps leave their emptied tables to the scanner.
        let (ipa, size) = (c.win.ipa(first), pages * PAGE_SIZE);
        let leaves_only = rng.chance(50);
        if leaves_only {
            c.stats.leaf_unmaps.add(1);
        }
        let stats = loop {
            let result = if leaves_only {
                c.s2.unmap_leaves_batched(ipa, size, &mut batch)
            } else {
                c.s2.unmap_batched(ipa, size, &mut batch)
            };
            match result {
                Ok(stats) => break stats,
                // Locked by a pin, or by another writer's batch that has
                // not flushed yet: flush ours (so that nobody waits on our
                // locks) and go again, as the hypervisor's release does.
                Err(MapError::Busy { .. }) => {
                    batch.flush();
                    c.s2.rcu().quiescent();
                }
                Err(e) => panic!("unmap: {e:?}"),
            }
        };
        if leaves_only {
            // Like the hypervisor's release: flush the leaves (they stay
            // locked until then) so the scanner finds their tables empty.
            batch.flush();
        }
        c.stats.unmaps.add(1);
        c.stats.unmapped_pages.add(stats.pages_unmapped);
        c.stats.tables_removed.add(stats.tables_freed);
        ops += 1;
        if ops.is_multiple_of(4) {
            batch.flush();
            let freed = c.s2.reclaim_tables(ops.is_multiple_of(64));
            c.stats.tables_reclaimed.add(freed as u64);
        }
        c.s2.rcu().quiescent();
    }
}

/// Runs a writer operation until it is not `Busy`: an entry of its range
/// may be pinned, or locked by another thread's batch that has not flushed
/// yet (unmapped leaves and the parents of unlinked tables stay locked
/// until the flush). `on_busy` flushes the caller's own batch, if any, so
/// that nobody waits on its locks.
fn retry_busy<R>(
    c: &Ctx<'_>,
    mut op: impl FnMut() -> Result<R, MapError>,
    mut on_busy: impl FnMut(),
) -> Result<R, MapError> {
    loop {
        match op() {
            Err(MapError::Busy { .. }) => {
                on_busy();
                c.s2.rcu().quiescent();
                std::thread::yield_now();
            }
            other => return other,
        }
    }
}

fn block_splitter(c: &Ctx<'_>, rng: &mut Rng) {
    let mut release = |pa, size| c.pool.release(pa, size);
    let rcu = c.s2.rcu();
    while c.running() {
        let slot = c.win.block_slot(rng);
        let at = slot * PAGES_PER_BLOCK;
        let ipa = c.win.ipa(at);
        // Empty the slot (nobody else maps into it), then map a block.
        drop({
            let mut batch = c.s2.batch(&mut release);
            let batch_ref = core::cell::RefCell::new(&mut batch);
            retry_busy(
                c,
                || c.s2.unmap_batched(ipa, MIB2, &mut batch_ref.borrow_mut()),
                || batch_ref.borrow_mut().flush(),
            )
            .expect("unmap slot");
            batch
        });
        let chunk = c.pool.take_chunk();
        let flags = MapFlags {
            af: rng.chance(50),
            allow_blocks: true,
        };
        retry_busy(
            c,
            || {
                c.s2.map(ipa, chunk, MIB2, Perms::RW, MemType::Normal, flags)
            },
            || {},
        )
        .expect("map block");
        c.stats.blocks.add(1);
        rcu.quiescent();
        // Split it (or not) while the others run over it.
        let (off, n) = {
            let off = rng.below(PAGES_PER_BLOCK);
            (off, 1 + rng.below(PAGES_PER_BLOCK - off))
        };
        let part = c.win.ipa(at + off);
        match rng.below(4) {
            0 => {
                let mut batch = c.s2.batch(&mut release);
                let n = n.min(16) * PAGE_SIZE;
                let batch_ref = core::cell::RefCell::new(&mut batch);
                retry_busy(
                    c,
                    || c.s2.unmap_batched(part, n, &mut batch_ref.borrow_mut()),
                    || batch_ref.borrow_mut().flush(),
                )
                .expect("partial unmap");
                c.stats.splits.add(1);
            }
            1 => {
                let perms = [Perms::READ, Perms::RWX][rng.below(2) as usize];
                retry_busy(c, || c.s2.protect(part, n * PAGE_SIZE, perms), || {})
                    .expect("partial protect");
                c.stats.splits.add(u64::from(n < PAGES_PER_BLOCK));
            }
            2 => retry_busy(c, || c.s2.protect(ipa, MIB2, Perms::READ), || {}).expect("protect"),
            _ => {}
        }
        if rng.chance(5) {
            let freed = c.s2.reclaim_tables(true);
            c.stats.tables_reclaimed.add(freed as u64);
        }
        rcu.quiescent();
    }
}

/// The lockless empty-table scan over the whole window or a few slots,
/// with its own batch.
fn empty_table_scanner(c: &Ctx<'_>, rng: &mut Rng) {
    let mut release = |pa, size| c.pool.release(pa, size);
    let mut batch = c.s2.batch(&mut release);
    let slots = c.win.slots();
    let mut scans = 0u64;
    while c.running() {
        let (first, n) = if rng.chance(30) {
            (0, slots)
        } else {
            let slot = rng.below(slots);
            (slot, (1 + rng.below(8)).min(slots - slot))
        };
        let removed =
            c.s2.reclaim_empty_tables(c.win.ipa(first * PAGES_PER_BLOCK), n * MIB2, &mut batch)
                .expect("scan");
        c.stats.scans.add(1);
        c.stats.tables_scanned_away.add(removed);
        scans += 1;
        if scans.is_multiple_of(8) {
            batch.flush();
            let freed = c.s2.reclaim_tables(false);
            c.stats.tables_reclaimed.add(freed as u64);
        }
        c.s2.rcu().quiescent();
    }
}

/// Pins random pages as a hypervisor access would, and checks inside the
/// pin that the frame is still handed out: a pinned frame is never
/// released (unmap and migration wait or back off).
fn pinner(c: &Ctx<'_>, rng: &mut Rng) {
    while c.running() {
        let ipa = c.win.ipa(rng.below(c.win.pages));
        let offset = rng.below(PAGE_SIZE);
        let result = c.s2.with_page_pinned(Ipa(ipa.0 + offset), |pa| {
            assert!(pa.is_page_aligned());
            for _ in 0..1 + rng.below(4) {
                assert!(c.pool.is_out(pa), "pinned frame {pa} was released");
                std::hint::spin_loop();
            }
        });
        match result {
            Ok(()) => c.stats.pins.add(1),
            Err(PinError::NotMapped(_)) => c.stats.pins_not_mapped.add(1),
            Err(PinError::Busy { .. }) => c.stats.pins_busy.add(1),
            Err(e @ PinError::OutOfRange(_)) => panic!("pin: {e}"),
        }
        c.s2.rcu().quiescent();
    }
}

fn migrator(c: &Ctx<'_>, rng: &mut Rng) {
    let mut release = |pa, size| c.pool.release(pa, size);
    let mut batch = c.s2.batch(&mut release);
    let mut moves = 0u64;
    while c.running() {
        let ipa = c.win.ipa(rng.below(c.win.pages));
        let new = c.pool.take();
        let outcome =
            c.s2.migrate_page(ipa, new, &mut batch, |_, _| {})
                .expect("migrate");
        match outcome {
            MigrateOutcome::Moved { .. } => {
                c.stats.moved.add(1);
                moves += 1;
                if moves.is_multiple_of(4) {
                    batch.flush();
                }
            }
            MigrateOutcome::NotMoved => {
                c.pool.give_back(new, PAGE_SIZE);
                c.stats.not_moved.add(1);
            }
        }
        c.s2.rcu().quiescent();
    }
}

#[test]
fn everything_at_once() {
    let cfg = config();
    let win = Window::new(if cfg.full { 256 } else { 64 });
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, false);
    let s2: S2<'_> = Stage2::new(40, &alloc, &tlb, common::rcu()).expect("root");
    let pool = FramePool::new();
    let stats = Stats::default();
    let (stop, done) = (AtomicBool::new(false), AtomicBool::new(false));
    let c = Ctx {
        s2: &s2,
        win: &win,
        pool: &pool,
        stats: &stats,
        stop: &stop,
        seed: cfg.seed,
    };
    let start = Instant::now();
    thread::scope(|scope| {
        let workers = vec![
            c.spawn(scope, 1, harvester),
            c.spawn(scope, 2, harvester),
            c.spawn(scope, 3, af_setter),
            c.spawn(scope, 4, af_setter),
            c.spawn(scope, 5, fault_installer),
            c.spawn(scope, 6, fault_installer),
            c.spawn(scope, 7, unmapper),
            c.spawn(scope, 8, block_splitter),
            c.spawn(scope, 9, migrator),
            c.spawn(scope, 10, empty_table_scanner),
            c.spawn(scope, 11, pinner),
        ];
        supervise(scope, cfg.secs, &stop, &done, workers);
    });
    let elapsed = start.elapsed();
    // Quiet: the frames the table maps are exactly the frames handed out
    // (every batch was flushed), each mapped once.
    let mut leaves = Leaves::default();
    let Ok(()) = s2.walk(
        win.ipa(0),
        win.pages * PAGE_SIZE,
        WalkFlags::LEAF,
        &mut leaves,
    );
    let mut mapped = HashSet::new();
    for &(ipa, size, pa) in &leaves.0 {
        for page in (pa..pa + size).step_by(PAGE_SIZE as usize) {
            assert!(
                mapped.insert(page),
                "frame {page:#x} mapped twice (at {ipa:#x})"
            );
        }
    }
    let out = pool.out();
    assert_eq!(mapped.len() as u64, s2.mapped_pages());
    let leaked: Vec<_> = out.difference(&mapped).take(8).collect();
    assert!(
        leaked.is_empty(),
        "frames handed out, not mapped: {leaked:x?}"
    );
    let foreign: Vec<_> = mapped.difference(&out).take(8).collect();
    assert!(
        foreign.is_empty(),
        "frames mapped, not handed out: {foreign:x?}"
    );
    // A scan of the window leaves exactly the tables the leaves need: the
    // root, and one table per level on the path of each leaf.
    let mut release = |pa, size| pool.release(pa, size);
    let mut batch = s2.batch(&mut release);
    s2.reclaim_empty_tables(win.ipa(0), win.pages * PAGE_SIZE, &mut batch)
        .expect("final scan");
    drop(batch);
    s2.reclaim_tables(true);
    let mut needed = HashSet::new();
    for &(ipa, size, _) in &leaves.0 {
        let level = (1..=LEAF_LEVEL).find(|&l| level_size(l) == size).unwrap();
        for l in 1..=level {
            needed.insert((l, ipa & !(level_size(l - 1) - 1)));
        }
    }
    assert_eq!(
        s2.table_pages(),
        1 + needed.len() as u64,
        "empty tables left"
    );
    assert_eq!(s2.table_pages(), alloc.live() as u64);
    // Unmap everything: no page, table, frame or pending item is left.
    let mut release = |pa, size| pool.release(pa, size);
    let mut batch = s2.batch(&mut release);
    s2.unmap_batched(win.ipa(0), win.pages * PAGE_SIZE, &mut batch)
        .expect("final unmap");
    drop(batch);
    s2.reclaim_tables(true);
    assert_eq!(s2.mapped_pages(), 0);
    assert_eq!(s2.table_pages(), 1);
    assert_eq!(s2.deferred_tables(), 0);
    assert_eq!(alloc.live(), 1);
    assert!(pool.out().is_empty(), "frames not back in the pool");
    assert!(s2.check_idle(), "the checker still holds pending items");
    let (allocs, frees) = alloc.counts();
    assert_eq!(allocs, frees + 1);
    let s = &stats;
    summary(&format!(
        "stress everything_at_once: {:.1}s window {}MiB seed {}: \
         harvests {} ({} pages, {} young, {} count mismatches); \
         hw-af {} set/{} already young/{} unmapped; \
         faults {} installed/{} already mapped/{} retry; \
         unmaps {} ({} leaf-only, {} pages, {} tables removed, {} reclaimed); \
         scans {} ({} tables removed); pins {} ok/{} not mapped/{} busy; \
         blocks {} mapped/{} split; migrations {} moved/{} not; \
         frames {} fresh/{} recycled/{} released; tables {} allocated; \
         tlbi {} by ipa/{} vmid",
        elapsed.as_secs_f64(),
        (win.pages * PAGE_SIZE) >> 20,
        cfg.seed,
        s.harvests.get(),
        s.harvested_pages.get(),
        s.young.get(),
        s.count_mismatches.get(),
        s.touched.get(),
        s.touched_young.get(),
        s.touch_missed.get(),
        s.installed.get(),
        s.already.get(),
        s.retried.get(),
        s.unmaps.get(),
        s.leaf_unmaps.get(),
        s.unmapped_pages.get(),
        s.tables_removed.get(),
        s.tables_reclaimed.get(),
        s.scans.get(),
        s.tables_scanned_away.get(),
        s.pins.get(),
        s.pins_not_mapped.get(),
        s.pins_busy.get(),
        s.blocks.get(),
        s.splits.get(),
        s.moved.get(),
        s.not_moved.get(),
        pool.fresh.get(),
        pool.recycled.get(),
        pool.released.get(),
        allocs,
        tlb.counts().0,
        tlb.counts().1,
    ));
    // Each kind of operation ran (a stuck thread would show here).
    for (name, n) in [
        ("harvests", s.harvests.get()),
        ("hw-af", s.touched.get()),
        ("faults", s.installed.get()),
        ("unmaps", s.unmaps.get()),
        ("tables removed", s.tables_removed.get()),
        ("leaf-only unmaps", s.leaf_unmaps.get()),
        ("tables scanned away", s.tables_scanned_away.get()),
        ("pins", s.pins.get()),
        ("blocks", s.blocks.get()),
        ("migrations", s.moved.get()),
        ("recycled frames", pool.recycled.get()),
    ] {
        assert!(n > 0, "no {name} in {elapsed:?}");
    }
}

// ---- nothing lost ----

/// One access by a setter: page `page` (index in the harvested range),
/// the epoch read before setting the flag (`e0`) and after (`e1`).
#[derive(Copy, Clone, Debug)]
struct Access {
    page: u64,
    e0: u64,
    e1: u64,
}

std::thread_local! {
    /// Whether this thread is preempted at each quiescent state.
    static PREEMPTED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The RCU domain's `current_cpu` of `nothing_lost`: the harvester sleeps
/// there, as if interrupted between two harvest batches (where it may be:
/// that is what the quiescent state between them is for), so that the
/// guest's accesses meet harvests paused in the middle.
fn preemptible_cpu() -> usize {
    if PREEMPTED.with(std::cell::Cell::get) {
        thread::sleep(Duration::from_micros(100));
    }
    common::current_cpu()
}

/// Counts a finished thread when dropped.
struct Finished<'a>(&'a AtomicU64);

impl Drop for Finished<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn no_access_is_lost() {
    nothing_lost(0);
}

/// The same with a harvest range that starts one page into the window, so
/// that a 2 MiB block straddles the boundary between two harvest batches:
/// a block first seen old, then accessed before the next batch, is cleared
/// and reported only for the second batch's part.
#[test]
fn no_access_is_lost_with_blocks_across_batches() {
    nothing_lost(1);
}

/// Setters set access flags the way the hardware does, a protect thread
/// changes permissions under them (a compare-exchange that must keep the
/// flag), and one harvester harvests the whole range again and again, with
/// every flag combination. Nothing unmaps, migrates or splits, so a flag is
/// only ever cleared by a harvest.
///
/// Epochs: harvest `k` runs while `epoch == k`; the harvester stores
/// `k + 1` after it (and after draining the setters' logs). A setter reads
/// `e0`, sets the flag (or finds it set) at `S`, then, after a `SeqCst`
/// fence, reads `e1` and logs the access under its log's lock. Then:
///
/// - harvests before `e0` completed before `S` (their clears precede it);
/// - harvest `e1 + 1` starts after `S`: the harvester stores `e1 + 1` and
///   fences before it walks, the setter fences after `S` and read `e1`, so
///   by the store-buffering rule of `SeqCst` fences the walk sees `S` or a
///   later value of the entry;
/// - a harvest clears only a flag it read set, and reports the page; so
///   the first clear after `S` (or harvest `e1 + 1`, if none before it)
///   means that some harvest in `[e0, e1 + 1]` reported the page.
///
/// The harvester checks exactly that after harvest `e1 + 1`, when it
/// drains the logs. The access is in its log by then: the drain after
/// harvest `k` comes after the store of `k`, so a setter that logs after
/// that drain (the log's lock orders the two) reads an epoch `>= k`.
fn nothing_lost(offset: u64) {
    const SETTERS: usize = 2;
    let cfg = config();
    let (page_mib, blocks) = if cfg.full { (64, 64) } else { (32, 16) };
    let base = 8 * GIB1;
    let page_area = page_mib * 0x10_0000;
    let total = page_area / PAGE_SIZE + blocks * PAGES_PER_BLOCK;
    let alloc = HostAlloc::new();
    let tlb = RecordingTlb::new(&alloc, false);
    let rcu: &'static Rcu = Box::leak(Box::new(Rcu::new(preemptible_cpu)));
    let s2: S2<'_> = Stage2::new(40, &alloc, &tlb, rcu).expect("root");
    let (rw, normal) = (Perms::RW, MemType::Normal);
    let old = |allow_blocks| MapFlags {
        af: false,
        allow_blocks,
    };
    s2.map(Ipa(base), PhysAddr(GIB1), page_area, rw, normal, old(false))
        .unwrap();
    let block_area = blocks * MIB2;
    s2.map(
        Ipa(base + page_area),
        PhysAddr(2 * GIB1),
        block_area,
        rw,
        normal,
        old(true),
    )
    .unwrap();
    let first = Ipa(base + offset * PAGE_SIZE);
    let npages = total - offset;
    let epoch = AtomicU64::new(0);
    let logs: [Mutex<Vec<Access>>; SETTERS] = Default::default();
    let (stop, done) = (AtomicBool::new(false), AtomicBool::new(false));
    let setters_done = AtomicU64::new(0);
    let (harvests, young, checked, protects) = (
        Count::default(),
        Count::default(),
        Count::default(),
        Count::default(),
    );
    let start = Instant::now();
    thread::scope(|scope| {
        let mut workers = Vec::new();
        workers.push(scope.spawn(|| {
            let _cpu = OnlineCpu::new(1, rcu, &stop);
            PREEMPTED.with(|p| p.set(true));
            let mut rng = Rng::new(cfg.seed, 101);
            let words = npages.div_ceil(64) as usize;
            let mut bm = vec![0u64; words];
            // Per page: the last harvest that reported it, and the
            // largest `e0 + 1` of the accesses due now / at the next check.
            let mut last: Vec<Option<u64>> = vec![None; npages as usize];
            let mut due_now = vec![0u64; npages as usize];
            let mut due_next = vec![0u64; npages as usize];
            let mut lost = Vec::new();
            let mut tail = None;
            for k in 0.. {
                fence(Ordering::SeqCst);
                let clear = HarvestFlags::CLEAR;
                let flags = match rng.below(5) {
                    0 => clear,
                    1 => clear | HarvestFlags::FLUSH,
                    2 => clear | HarvestFlags::MASK,
                    3 => clear | HarvestFlags::MASK | HarvestFlags::FLUSH,
                    _ => HarvestFlags::empty(),
                };
                bm.iter_mut().for_each(|w| *w = rng.next());
                let n = s2.harvest(first, npages, &mut bm[..], flags).unwrap();
                harvests.add(1);
                young.add(n);
                for (w, &word) in bm.iter().enumerate() {
                    let mut bits = word;
                    while bits != 0 {
                        let page = w * 64 + bits.trailing_zeros() as usize;
                        last[page] = Some(k);
                        bits &= bits - 1;
                    }
                }
                for log in &logs {
                    for a in std::mem::take(&mut *log.lock().unwrap()) {
                        let due = if a.e1 == k {
                            &mut due_next
                        } else if a.e1 + 1 == k {
                            &mut due_now
                        } else {
                            panic!("access {a:?} logged late, at harvest {k}");
                        };
                        let p = a.page as usize;
                        due[p] = due[p].max(a.e0 + 1);
                    }
                }
                for (p, due) in due_now.iter_mut().enumerate() {
                    if *due != 0 {
                        checked.add(1);
                        let e0 = *due - 1;
                        if last[p].is_none_or(|j| j < e0) && lost.len() < 8 {
                            lost.push((p, e0, k, last[p]));
                        }
                        *due = 0;
                    }
                }
                assert!(
                    lost.is_empty(),
                    "accesses never reported (page, e0, deadline harvest, last report): {lost:?}"
                );
                std::mem::swap(&mut due_now, &mut due_next);
                epoch.store(k + 1, Ordering::SeqCst);
                rcu.quiescent();
                // Once the setters are gone (their last accesses read an
                // epoch of at most k + 1), two more harvests check them.
                match tail {
                    None if setters_done.load(Ordering::SeqCst) == SETTERS as u64 => {
                        tail = Some(k + 2);
                    }
                    Some(end) if k == end => break,
                    _ => {}
                }
            }
            assert!(due_now.iter().all(|&d| d == 0), "accesses left unchecked");
        }));
        for (i, log) in logs.iter().enumerate() {
            let (s2, epoch, stop, setters_done) = (&s2, &epoch, &stop, &setters_done);
            workers.push(scope.spawn(move || {
                let _cpu = OnlineCpu::new(2 + i, rcu, stop);
                // Counted on the way out even if it panics, so that the
                // harvester stops.
                let _done = Finished(setters_done);
                let mut rng = Rng::new(cfg.seed, 102 + i as u64);
                while !stop.load(Ordering::Relaxed) {
                    // A burst of accesses, then idle (offline) for a while.
                    for _ in 0..1 + rng.below(200) {
                        // A quarter on the first page of a block.
                        let page = if rng.chance(25) {
                            page_area / PAGE_SIZE + rng.below(blocks) * PAGES_PER_BLOCK
                        } else {
                            rng.below(total)
                        };
                        let Some(page) = page.checked_sub(offset) else {
                            continue;
                        };
                        let e0 = epoch.load(Ordering::SeqCst);
                        let ipa = Ipa(first.0 + page * PAGE_SIZE);
                        hw_touch(s2, ipa).expect("every page is mapped");
                        fence(Ordering::SeqCst);
                        {
                            let mut log = log.lock().unwrap();
                            let e1 = epoch.load(Ordering::SeqCst);
                            log.push(Access { page, e0, e1 });
                        }
                        rcu.quiescent();
                    }
                    rcu.offline();
                    thread::sleep(Duration::from_micros(rng.below(2000)));
                    rcu.online();
                }
            }));
        }
        workers.push(scope.spawn(|| {
            let _cpu = OnlineCpu::new(2 + SETTERS, rcu, &stop);
            let mut rng = Rng::new(cfg.seed, 201);
            let pages = page_area / PAGE_SIZE;
            while !stop.load(Ordering::Relaxed) {
                // Whole leaves only: permissions change in place (no
                // break-before-make, no split).
                let (ipa, size) = if rng.chance(50) {
                    let page = rng.below(pages);
                    let n = (1 + rng.below(64)).min(pages - page);
                    (Ipa(base + page * PAGE_SIZE), n * PAGE_SIZE)
                } else {
                    (Ipa(base + page_area + rng.below(blocks) * MIB2), MIB2)
                };
                let perms = [Perms::READ, Perms::RW, Perms::RWX][rng.below(3) as usize];
                s2.protect(ipa, size, perms).expect("protect");
                protects.add(1);
                rcu.quiescent();
            }
        }));
        supervise(scope, cfg.secs, &stop, &done, workers);
    });
    assert!(checked.get() > 0 && harvests.get() > 2);
    assert!(s2.check_idle());
    summary(&format!(
        "stress no_access_is_lost (offset {offset}): {:.1}s {} pages seed {}: \
         {} harvests, {} young reported, {} accesses checked, {} protects",
        start.elapsed().as_secs_f64(),
        npages,
        cfg.seed,
        harvests.get(),
        young.get(),
        checked.get(),
        protects.get(),
    ));
}
