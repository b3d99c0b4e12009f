//! Loom model checks of the RCU core (`src/rcu.rs`): grace periods, the
//! deferred-free queue and the online race, explored over every
//! interleaving and over loom's model of weak memory; and a model of the
//! table-removal protocol (seal) against a racing fault, as the empty-table
//! scan runs it (see "The seal protocol" below). The two-thread models are
//! explored exhaustively; the three-thread ones with at most 3 preemptions
//! per execution. The whole file takes a few seconds.
//!
//! The file is compiled only with `--cfg loom` (it is gated by
//! `#![cfg(loom)]`), which also switches `src/sync.rs` to loom's atomics,
//! mutex and yield, so what loom explores is the crate's own `Rcu` and
//! `DeferQueue`:
//!
//! ```text
//! RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=/tmp/tgt-loom \
//!     cargo test -p stage2 --release --test loom
//! ```
//!
//! (`LOOM_LOG=1` / `LOOM_LOCATION=1` explain a failure; `--nocapture`
//! shows how many executions each model took.)
//!
//! # The model
//!
//! Threads play CPUs (a `loom::thread_local!` index). A shared `slot`
//! plays a table descriptor: it holds the index of one of a few objects,
//! is replaced with `swap(AcqRel)` and read with `load(Acquire)`, as
//! `Descriptor` does. Each object is a loom `UnsafeCell<u64>` that is
//! written when it is allocated and when it is freed (poisoned), and read
//! by readers. Loom panics ("Causality violation") when a read and a
//! write of a cell are not ordered by happens-before, so a free that is
//! not ordered after every read of the object fails the model even when
//! the read happened to see the old value; a read that sees the poison
//! fails the reader's assertion.
//!
//! Loom treats `SeqCst` loads and stores as `AcqRel` (only `SeqCst`
//! fences are modelled in full), so a protocol that relies on the single
//! total order of `SeqCst` *accesses* fails here. The first version of
//! `rcu.rs` did, and `online_race_reader_is_waited_for_or_sees_the_unlink`
//! caught it (the C11 model allows the failure too); `Rcu::online` and
//! `Rcu::start` now have the `SeqCst` fences it needs.

#![cfg(loom)]

use std::cell::Cell;

use loom::cell::UnsafeCell;
use loom::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::thread::{self, JoinHandle};
use stage2::desc::LOCKED;
use stage2::rcu::{DeferQueue, Rcu};

loom::thread_local! {
    /// The CPU index this loom thread plays.
    static CPU: Cell<usize> = Cell::new(0);
}

fn current_cpu() -> usize {
    CPU.with(Cell::get)
}

fn play_cpu(cpu: usize) {
    CPU.with(|c| c.set(cpu));
}

/// The model's main thread: the (first) writer.
const WRITER: usize = 0;
/// The reader thread.
const READER: usize = 1;
/// A second writer.
const WRITER2: usize = 2;
/// A second reader.
const READER2: usize = 3;

/// Objects: `A` is published at the start, `B` and `C` replace it.
const A: usize = 0;
const B: usize = 1;
const C: usize = 2;
/// A fourth object, for the second writer's slot.
const D: usize = 3;
const OBJECTS: usize = 4;

const UNALLOCATED: u64 = 0;
const POISON: u64 = 0xdead_dead_dead_dead;

/// The contents of a live object (distinct per object, so a reader that
/// followed a stale index is caught too).
fn live(obj: usize) -> u64 {
    0x1000 + obj as u64
}

/// One RCU domain, one published pointer and the objects it points to.
struct World {
    rcu: Rcu,
    /// The published object, like a descriptor: `swap(AcqRel)` to
    /// replace, `load(Acquire)` to follow.
    slot: AtomicUsize,
    /// A second published pointer (for models with two writers).
    slot2: AtomicUsize,
    heap: [UnsafeCell<u64>; OBJECTS],
}

// SAFETY: the only non-`Sync` fields are the object cells, and every access
// to them goes through loom's `with` / `with_mut`, which panics on any pair
// of accesses (one a write) not ordered by happens-before: a data race is a
// model failure, never undefined behaviour that goes unreported.
unsafe impl Sync for World {}

impl World {
    /// `A` is allocated and published in `slot`, `D` in `slot2`; the
    /// model's main thread plays [`WRITER`].
    fn new() -> Arc<Self> {
        play_cpu(WRITER);
        let heap = std::array::from_fn(|obj| {
            UnsafeCell::new(if obj == A || obj == D {
                live(obj)
            } else {
                UNALLOCATED
            })
        });
        Arc::new(Self {
            rcu: Rcu::new(current_cpu),
            slot: AtomicUsize::new(A),
            slot2: AtomicUsize::new(D),
            heap,
        })
    }

    /// Brings `cpu` online from the main thread before any thread is
    /// spawned: the reader is online before the writer unlinks anything.
    fn online_before_spawn(&self, cpu: usize) {
        play_cpu(cpu);
        self.rcu.online();
        play_cpu(WRITER);
    }

    /// Allocates `new`, publishes it in `slot` and returns the object it
    /// unlinked.
    fn replace(&self, slot: &AtomicUsize, new: usize) -> usize {
        self.heap[new].with_mut(|p| {
            // SAFETY: loom checks that this write is ordered with every
            // other access to the cell (it panics otherwise).
            unsafe {
                assert_eq!(*p, UNALLOCATED, "object {new} allocated twice");
                *p = live(new);
            }
        });
        slot.swap(new, Ordering::AcqRel)
    }

    /// Unlinks the object in `slot` (replacing it with `new`).
    fn unlink(&self, new: usize) -> usize {
        self.replace(&self.slot, new)
    }

    /// A read-side access: follows `slot` and reads the object, which
    /// must be live. Returns the object read.
    fn deref(&self, slot: &AtomicUsize) -> usize {
        let obj = slot.load(Ordering::Acquire);
        self.read(obj);
        obj
    }

    /// Reads `obj` again (a reference held since an earlier `deref`); it
    /// must be live.
    fn read(&self, obj: usize) {
        // SAFETY: loom checks that this read is ordered after the last
        // write of the cell (it panics otherwise).
        let value = self.heap[obj].with(|p| unsafe { *p });
        assert_ne!(value, POISON, "reader saw object {obj} freed");
        assert_eq!(value, live(obj), "reader saw object {obj} unallocated");
    }

    /// Frees (poisons) `obj`; it must be live (no double free).
    fn free(&self, obj: usize) {
        self.heap[obj].with_mut(|p| {
            // SAFETY: loom checks that this write is ordered after every
            // other access to the cell (it panics otherwise).
            unsafe {
                assert_eq!(*p, live(obj), "object {obj} freed twice or never allocated");
                *p = POISON;
            }
        });
    }

    /// Whether `obj` has been freed (read by the thread that freed it, or
    /// after joining it).
    fn is_freed(&self, obj: usize) -> bool {
        // SAFETY: as in `deref`.
        self.heap[obj].with(|p| unsafe { *p }) == POISON
    }
}

/// Spawns a loom thread that plays `cpu`.
fn spawn_cpu<T, F>(cpu: usize, f: F) -> JoinHandle<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    thread::spawn(move || {
        play_cpu(cpu);
        f()
    })
}

/// Spawns the reader most models use, playing `cpu` (already online): two
/// read-side sections on `slot` with a quiescent state between them, then
/// offline.
fn spawn_two_section_reader(w: &Arc<World>, cpu: usize) -> JoinHandle<()> {
    let w = w.clone();
    spawn_cpu(cpu, move || {
        w.deref(&w.slot);
        w.rcu.quiescent();
        w.deref(&w.slot);
        w.rcu.offline();
    })
}

/// Spawns the second writer of the concurrent-deferrer models, playing
/// [`WRITER2`]: unlinks `slot2`, defers the object on `q`, then reclaims
/// without waiting; returns how many it freed.
fn spawn_second_deferrer(w: &Arc<World>, q: &Arc<DeferQueue<usize, 2>>) -> JoinHandle<usize> {
    let (w, q) = (w.clone(), q.clone());
    spawn_cpu(WRITER2, move || {
        let d = w.replace(&w.slot2, C);
        q.defer(&w.rcu, d, |_| unreachable!("queue not full"));
        q.reclaim(&w.rcu, false, |obj| w.free(obj))
    })
}

/// Explores `model` over every interleaving, or with at most
/// `preemptions` preemptions per execution when given (for the models
/// with three threads), and prints the number of executions explored
/// (seen with `--nocapture`).
fn check(preemptions: Option<usize>, model: impl Fn() + Send + Sync + 'static) {
    let executions = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = executions.clone();
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = preemptions;
    builder.check(move || {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        model();
    });
    std::println!(
        "{}: {} executions",
        thread_name(),
        executions.load(std::sync::atomic::Ordering::Relaxed)
    );
}

/// The test's name (libtest names the thread after it).
fn thread_name() -> std::string::String {
    std::thread::current().name().unwrap_or("?").into()
}

// Property 1, no use-after-free: a reader that is online (since before
// the unlink) and inside a read-side section never sees the object it
// loaded freed, across a quiescent state and into a second section,
// when the writer frees after `synchronize`.
#[test]
fn synchronize_keeps_a_read_object_alive() {
    check(None, || {
        let w = World::new();
        w.online_before_spawn(READER);
        let reader = spawn_two_section_reader(&w, READER);
        let old = w.unlink(B);
        w.rcu.synchronize();
        w.free(old);
        reader.join().unwrap();
    });
}

// Property 1 with two readers on two CPUs, both online since before the
// unlink: `synchronize` waits for each of them (three threads, so the
// exploration is bounded to 3 preemptions per execution).
#[test]
fn synchronize_waits_for_every_online_reader() {
    check(Some(3), || {
        let w = World::new();
        w.online_before_spawn(READER);
        w.online_before_spawn(READER2);
        let readers = [READER, READER2].map(|cpu| spawn_two_section_reader(&w, cpu));
        let old = w.unlink(B);
        w.rcu.synchronize();
        w.free(old);
        for reader in readers {
            reader.join().unwrap();
        }
    });
}

// Property 1 with split tickets: two unlinks, each with its own
// `start`; waiting for the first ticket is enough to free the first
// object, even while the second grace period is still running.
#[test]
fn each_ticket_protects_what_was_unlinked_before_it() {
    check(None, || {
        let w = World::new();
        w.online_before_spawn(READER);
        let reader = spawn_two_section_reader(&w, READER);
        let a = w.unlink(B);
        let t1 = w.rcu.start();
        let b = w.unlink(C);
        let t2 = w.rcu.start();
        assert!(t1 < t2);
        w.rcu.wait(t1);
        w.free(a);
        w.rcu.wait(t2);
        w.free(b);
        reader.join().unwrap();
    });
}

// Property 2, grace periods end: an online reader that keeps reading
// but passes quiescent states between its sections lets `synchronize`
// return while it is still online (it goes offline only after the
// writer is done). A stall would exceed loom's branch limit and fail.
#[test]
fn quiescent_states_end_a_grace_period() {
    check(None, || {
        let w = World::new();
        let done = Arc::new(AtomicBool::new(false));
        w.online_before_spawn(READER);
        let reader = {
            let (w, done) = (w.clone(), done.clone());
            spawn_cpu(READER, move || {
                loop {
                    w.deref(&w.slot);
                    if done.load(Ordering::Acquire) {
                        break;
                    }
                    w.rcu.quiescent();
                    thread::yield_now();
                }
                w.rcu.offline();
            })
        };
        let old = w.unlink(B);
        w.rcu.synchronize();
        w.free(old);
        done.store(true, Ordering::Release);
        reader.join().unwrap();
    });
}

// Negative control for property 2: a reader that stays online without
// ever passing a quiescent state stalls the grace period, and loom
// reports the livelock (branch limit), so the previous model can fail.
#[test]
#[should_panic(expected = "maximum number of branches")]
fn negative_control_a_reader_that_never_quiesces_stalls_synchronize() {
    check(None, || {
        let w = World::new();
        let done = Arc::new(AtomicBool::new(false));
        w.online_before_spawn(READER);
        let reader = {
            let (w, done) = (w.clone(), done.clone());
            spawn_cpu(READER, move || {
                while !done.load(Ordering::Acquire) {
                    thread::yield_now();
                }
                w.rcu.offline();
            })
        };
        w.unlink(B);
        w.rcu.synchronize();
        done.store(true, Ordering::Release);
        reader.join().unwrap();
    });
}

// Property 3, deferred frees: with a reader in its sections, items
// deferred on a queue are freed only after their grace period (no
// use-after-free), each exactly once (`free` panics on a double free),
// in the order they were queued; `reclaim(wait = false)` frees a prefix
// and `reclaim(wait = true)` frees everything queued before it.
#[test]
fn defer_queue_frees_after_the_grace_period_once_and_in_order() {
    check(None, || {
        let w = World::new();
        let q: DeferQueue<usize, 2> = DeferQueue::new();
        w.online_before_spawn(READER);
        let reader = spawn_two_section_reader(&w, READER);
        let mut freed = Vec::new();
        let mut free = |obj| {
            w.free(obj);
            freed.push(obj);
        };
        let a = w.unlink(B);
        q.defer(&w.rcu, a, &mut free);
        let b = w.unlink(C);
        q.defer(&w.rcu, b, &mut free);
        let early = q.reclaim(&w.rcu, false, &mut free);
        let rest = q.reclaim(&w.rcu, true, &mut free);
        assert_eq!(early + rest, 2);
        assert!(q.is_empty());
        assert_eq!(freed, [A, B], "freed out of order");
        reader.join().unwrap();
    });
}

// Property 3, the full-queue path: `defer` on a full queue waits for the
// oldest item's grace period and frees it (never an item whose grace
// period is still running), while a reader is in its sections.
#[test]
fn defer_on_a_full_queue_waits_for_the_oldest_grace_period() {
    check(None, || {
        let w = World::new();
        let q: DeferQueue<usize, 1> = DeferQueue::new();
        w.online_before_spawn(READER);
        let reader = spawn_two_section_reader(&w, READER);
        let mut freed = Vec::new();
        let mut free = |obj| {
            w.free(obj);
            freed.push(obj);
        };
        let a = w.unlink(B);
        q.defer(&w.rcu, a, &mut free);
        let b = w.unlink(C);
        q.defer(&w.rcu, b, &mut free);
        assert_eq!(q.len(), 1);
        assert_eq!(q.reclaim(&w.rcu, true, &mut free), 1);
        assert_eq!(freed, [A, B]);
        reader.join().unwrap();
    });
}

// Property 3, blocking: a reader that is online and has not passed a
// quiescent state since `defer` blocks `reclaim(wait = false)`: the item
// is freed only if the reader had announced its quiescent state (the
// flag is set just before `quiescent`, so a free without it is a
// protocol violation even where loom could not see a racing read).
#[test]
fn an_online_reader_blocks_reclaim_without_wait() {
    check(None, || {
        let w = World::new();
        let q: DeferQueue<usize, 2> = DeferQueue::new();
        let quiesced = Arc::new(AtomicBool::new(false));
        // The main thread is the reader; it holds `A` from before the
        // unlink.
        play_cpu(READER);
        w.rcu.online();
        let held = w.deref(&w.slot);
        let writer = {
            let (w, quiesced) = (w.clone(), quiesced.clone());
            spawn_cpu(WRITER, move || {
                let a = w.unlink(B);
                q.defer(&w.rcu, a, |_| unreachable!("queue not full"));
                let freed = q.reclaim(&w.rcu, false, |obj| w.free(obj));
                if freed == 1 {
                    // Relaxed is enough: a free means `poll` read the
                    // reader's quiescent slot store, which is ordered
                    // after the flag store.
                    assert!(
                        quiesced.load(Ordering::Relaxed),
                        "freed while the reader was in its section"
                    );
                }
                freed
            })
        };
        w.read(held);
        quiesced.store(true, Ordering::Relaxed);
        w.rcu.quiescent();
        w.deref(&w.slot);
        w.rcu.offline();
        let freed = writer.join().unwrap();
        assert_eq!(w.is_freed(A), freed == 1);
    });
}

// Property 3 with two writers deferring into one queue and reclaiming
// concurrently (one with `wait`, one without) while nobody reads: every
// item is freed exactly once, and once both are done plus a final
// `reclaim(wait = true)`, the queue is empty and both items are freed.
#[test]
fn concurrent_deferrers_free_each_item_exactly_once() {
    check(None, || {
        let w = World::new();
        let q = Arc::new(DeferQueue::<usize, 2>::new());
        let second = spawn_second_deferrer(&w, &q);
        let a = w.unlink(B);
        q.defer(&w.rcu, a, |_| unreachable!("queue not full"));
        // Not `mine >= 1`: the other writer's `reclaim` may have taken `A`
        // (its grace period elapses at once, nobody is online).
        let mine = q.reclaim(&w.rcu, true, |obj| w.free(obj));
        let theirs = second.join().unwrap();
        let last = q.reclaim(&w.rcu, true, |obj| w.free(obj));
        assert_eq!(mine + theirs + last, 2);
        assert!(q.is_empty());
        assert!(w.is_freed(A) && w.is_freed(D));
    });
}

// Property 3 with the two deferring writers of the previous model and a
// reader online since before both unlinks, reading both pointers in two
// sections: neither writer's `reclaim` frees an object under the reader,
// and each object is freed exactly once (bounded to 3 preemptions).
#[test]
fn concurrent_deferrers_never_free_under_a_reader() {
    check(Some(3), || {
        let w = World::new();
        let q = Arc::new(DeferQueue::<usize, 2>::new());
        w.online_before_spawn(READER);
        let reader = {
            let w = w.clone();
            spawn_cpu(READER, move || {
                w.deref(&w.slot);
                w.deref(&w.slot2);
                w.rcu.quiescent();
                w.deref(&w.slot);
                w.deref(&w.slot2);
                w.rcu.offline();
            })
        };
        let second = spawn_second_deferrer(&w, &q);
        let a = w.unlink(B);
        q.defer(&w.rcu, a, |_| unreachable!("queue not full"));
        let mine = q.reclaim(&w.rcu, true, |obj| w.free(obj));
        let theirs = second.join().unwrap();
        reader.join().unwrap();
        let last = q.reclaim(&w.rcu, true, |obj| w.free(obj));
        assert_eq!(mine + theirs + last, 2);
        assert!(w.is_freed(A) && w.is_freed(D));
    });
}

// Property 4, the online race: a CPU comes online and starts reading
// while a writer unlinks and waits. Either the writer's slot scan sees
// the CPU online and waits for it, or the CPU's read sees the unlink;
// it must never follow the old pointer after the writer freed it.
//
// The total order of `SeqCst` slot/`gp` accesses alone does not order
// the reader's `Acquire` descriptor load and the writer's `AcqRel`
// unlink (the C11 model allows the store-buffering outcome), and loom,
// which treats `SeqCst` accesses as `AcqRel`, found it against the first
// version of `rcu.rs`. The fix is a `SeqCst` fence after the slot store
// in `Rcu::online` *and* after the `gp` bump in `Rcu::start`; removing
// either makes this test fail.
#[test]
fn online_race_reader_is_waited_for_or_sees_the_unlink() {
    check(None, || {
        let w = World::new();
        let reader = {
            let w = w.clone();
            spawn_cpu(READER, move || {
                w.rcu.online();
                w.deref(&w.slot);
                w.rcu.offline();
            })
        };
        let old = w.unlink(B);
        w.rcu.synchronize();
        w.free(old);
        reader.join().unwrap();
    });
}

// Negative control: the same reader as in the first model, but the
// writer frees right after the unlink, without a grace period. Loom
// must find the use-after-free, so the models above can fail.
#[test]
#[should_panic(expected = "Causality violation")]
fn negative_control_free_without_grace_period_is_caught() {
    check(None, || {
        let w = World::new();
        w.online_before_spawn(READER);
        let reader = {
            let w = w.clone();
            spawn_cpu(READER, move || {
                w.deref(&w.slot);
                w.rcu.offline();
            })
        };
        let old = w.unlink(B);
        w.free(old);
        reader.join().unwrap();
    });
}

// ---- The seal protocol ----
//
// The stage-2 tables themselves cannot run under loom (`Descriptor` wraps a
// `core` atomic, and a table has 512 of them: far too many scheduling
// points), so this part restates the table-removal protocol of
// `Stage2::remove_table` over a parent entry and a two-entry child table,
// with loom atomics and the same orderings (`Acquire` loads, `AcqRel`
// compare-exchange, `Release` stores), and runs it against a fault that
// installs a page into the child. The remover is the empty-table scan: it
// nominates the child with plain loads (lockless), then locks the parent,
// seals, unlinks, waits for a grace period (the crate's `Rcu`) and frees
// the child page. The fault is an RCU reader. Properties: a fault that
// reports `Installed` is never lost (its page is still linked at the end),
// and the child page is never freed under the fault (loom's causality
// check on the page's cell). The negative control re-checks emptiness
// under the parent lock without sealing, and loom finds the lost fault.

/// A table entry (valid, table) pointing to the child, and a page.
const TABLE: u64 = 0x1003;
const PAGE: u64 = 0x2003;

struct Tables {
    rcu: Rcu,
    parent: AtomicU64,
    child: [AtomicU64; 2],
    /// The child table page itself: written when freed (poisoned), read by
    /// the fault when it walks into it.
    child_page: UnsafeCell<u64>,
}

// SAFETY: as for `World`: the cell is only accessed through loom's `with`
// / `with_mut`, which report every unordered pair of accesses.
unsafe impl Sync for Tables {}

impl Tables {
    fn new() -> Arc<Self> {
        play_cpu(WRITER);
        Arc::new(Self {
            rcu: Rcu::new(current_cpu),
            parent: AtomicU64::new(TABLE),
            child: [AtomicU64::new(0), AtomicU64::new(0)],
            child_page: UnsafeCell::new(live(0)),
        })
    }

    /// The lockless fault path: walk to the child, install into slot 0.
    fn fault(&self) -> bool {
        if self.parent.load(Ordering::Acquire) != TABLE {
            return false; // retry (or install a new table: not modelled)
        }
        // SAFETY: loom checks the read is ordered after the last write.
        let page = self.child_page.with(|p| unsafe { *p });
        assert_eq!(page, live(0), "fault walked into a freed table");
        self.child[0]
            .compare_exchange(0, PAGE, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// The scan: lockless nomination, then the removal (the writer lock is
    /// implicit: there is one remover). With `seal`, the crate's protocol;
    /// without, a re-check under the parent lock only.
    fn remove_if_empty(&self, seal: bool) -> bool {
        let empty = |t: &Self| t.child.iter().all(|e| e.load(Ordering::Acquire) == 0);
        if self.parent.load(Ordering::Acquire) != TABLE || !empty(self) {
            return false;
        }
        let locked =
            self.parent
                .compare_exchange(TABLE, LOCKED, Ordering::AcqRel, Ordering::Acquire);
        assert!(locked.is_ok(), "only the remover changes the parent");
        if seal {
            for (i, e) in self.child.iter().enumerate() {
                let sealed = e.compare_exchange(0, LOCKED, Ordering::AcqRel, Ordering::Acquire);
                if sealed.is_err() {
                    for undo in &self.child[..i] {
                        undo.store(0, Ordering::Release);
                    }
                    self.parent.store(TABLE, Ordering::Release);
                    return false;
                }
            }
        } else if !empty(self) {
            self.parent.store(TABLE, Ordering::Release);
            return false;
        }
        self.parent.store(0, Ordering::Release);
        self.rcu.synchronize();
        self.child_page.with_mut(|p| {
            // SAFETY: loom checks this write is ordered after every read.
            unsafe { *p = POISON }
        });
        true
    }
}

fn scan_vs_fault(seal: bool) {
    let t = Tables::new();
    play_cpu(READER);
    t.rcu.online();
    play_cpu(WRITER);
    let fault = {
        let t = t.clone();
        spawn_cpu(READER, move || {
            let installed = t.fault();
            t.rcu.offline();
            installed
        })
    };
    let removed = t.remove_if_empty(seal);
    let installed = fault.join().unwrap();
    if installed {
        assert!(!removed, "installed page lost with its table");
        assert_eq!(t.parent.load(Ordering::Acquire), TABLE);
        assert_eq!(t.child[0].load(Ordering::Acquire), PAGE);
    }
    if !removed {
        assert_eq!(t.parent.load(Ordering::Acquire), TABLE, "seal not undone");
        assert!(t.child.iter().all(|e| e.load(Ordering::Acquire) != LOCKED));
    }
}

// The empty-table scan against a fault installing into the table it
// nominated: either the fault wins (the seal fails and is undone, the
// table stays with the page) or the seal wins (the fault's compare-
// exchange fails and it retries); never both, and the page is freed only
// after the fault left its read-side section.
#[test]
fn scan_never_loses_a_racing_fault() {
    check(None, || scan_vs_fault(true));
}

// Negative control: without the seal, a fault that installs between the
// re-check and the unlink is lost with its table, and loom finds it.
#[test]
#[should_panic(expected = "installed page lost")]
fn negative_control_removal_without_seal_loses_a_fault() {
    check(None, || scan_vs_fault(false));
}
