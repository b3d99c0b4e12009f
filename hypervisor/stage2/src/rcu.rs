//! An RCU domain with quiescent-state-based reclamation (QSBR), and the
//! deferred-free queue that sits on it.
//!
//! # Why QSBR
//!
//! The readers here are lockless page-table walkers (harvesters and fault
//! paths) that run with the walk engine's references into table pages. QSBR
//! makes a read-side section cost **nothing**: no counter, no fence, no
//! store. Instead each CPU announces, at points where it holds no reference
//! into any table, that it is *quiescent*:
//!
//! - at every guest entry (a CPU that runs guest code is in an **extended
//!   quiescent state**, [`Rcu::offline`], until the next exit
//!   [`Rcu::online`]);
//! - in the idle loop (offline);
//! - between harvest batches ([`Rcu::quiescent`]).
//!
//! The cost moves to those points (one load and one store, both `SeqCst`:
//! `ldar`/`stlr` on AArch64) and to the writer, which waits for a grace
//! period before it frees a table page. Writers are rare (unmap, table
//! reclaim); readers are the hot path. The price of QSBR is that a CPU
//! which stays online without ever passing a quiescent state stalls grace
//! periods (never correctness): every loop that can spin while online calls
//! [`Rcu::quiescent`].
//!
//! # The protocol
//!
//! A global counter `gp` numbers grace periods. Each CPU's slot holds `0`
//! while it is offline, else the value of `gp` it saw at its last quiescent
//! state. A writer that unlinked something calls [`Rcu::start`]: it bumps
//! `gp` to `g` and gets the ticket `g`. The grace period of `g` has elapsed
//! once every slot is `0` or `>= g` ([`Rcu::poll`]): every CPU that was
//! online has since passed a quiescent state after the bump, so it can no
//! longer hold a reference it took before the unlink.
//!
//! Memory ordering: all accesses to `gp` and the slots are `SeqCst`. The
//! writer's unlink happens before its `gp` bump; a reader whose quiescent
//! state loads the bumped `gp` synchronizes with it, so its later walks see
//! the unlink. Going online is the store-buffering case: the CPU stores its
//! slot and then loads descriptors (`Acquire`), while the writer stores
//! (unlinks), bumps `gp` and then loads the slots. `SeqCst` on the slot
//! and `gp` accesses alone does not order them against the descriptor
//! accesses, so both sides have a `SeqCst` fence: after the slot store in
//! [`Rcu::online`] and after the bump in [`Rcu::start`]. Then either the
//! writer sees the CPU online (and waits for it) or the CPU's walk sees the
//! unlink. The loom model `online_race_reader_is_waited_for_or_sees_the_unlink`
//! fails without either fence. Cost: one `dmb ish` per guest exit and per
//! grace period started; [`Rcu::quiescent`] needs none (the reader was
//! already online, so the writer waits for its next quiescent state).
//!
//! Per-CPU state is injected: the domain is told how to find the current
//! CPU's index (`fn() -> usize`: `TPIDR_EL2` on the target, a thread-local
//! on the host, where threads play CPUs).

use crate::sync::{fence, spin_loop, AtomicU64, Mutex, Ordering};

/// Largest number of CPUs (or host threads playing CPUs) a domain tracks.
pub const MAX_CPUS: usize = 16;

/// A grace period, identified by the value [`Rcu::start`] bumped `gp` to.
/// Tickets of one domain are ordered: a later ticket elapses after an
/// earlier one.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GpTicket(u64);

impl GpTicket {
    /// The grace-period number.
    pub const fn number(self) -> u64 {
        self.0
    }
}

/// One RCU domain (QSBR): grace periods over up to [`MAX_CPUS`] CPUs.
pub struct Rcu {
    /// The latest grace period started (starts at 1: slot value 0 means
    /// offline).
    gp: AtomicU64,
    /// Per CPU: 0 when offline, else the `gp` seen at its last quiescent
    /// state.
    slots: [AtomicU64; MAX_CPUS],
    /// The current CPU's index (< `MAX_CPUS`).
    current_cpu: fn() -> usize,
}

impl core::fmt::Debug for Rcu {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Rcu")
            .field("gp", &self.gp.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Rcu {
    /// A domain in which every CPU starts offline; `current_cpu` returns
    /// the index (below [`MAX_CPUS`]) of the CPU it is called on.
    #[cfg(not(loom))]
    pub const fn new(current_cpu: fn() -> usize) -> Self {
        Self {
            gp: AtomicU64::new(1),
            slots: [const { AtomicU64::new(0) }; MAX_CPUS],
            current_cpu,
        }
    }

    /// See the `const` version (loom's atomics are not `const`).
    #[cfg(loom)]
    pub fn new(current_cpu: fn() -> usize) -> Self {
        Self {
            gp: AtomicU64::new(1),
            slots: core::array::from_fn(|_| AtomicU64::new(0)),
            current_cpu,
        }
    }

    fn slot(&self) -> &AtomicU64 {
        let cpu = (self.current_cpu)();
        assert!(cpu < MAX_CPUS, "rcu: cpu index {cpu} >= {MAX_CPUS}");
        &self.slots[cpu]
    }

    /// The current CPU leaves its extended quiescent state: from now on it
    /// may walk tables, and grace periods wait for it.
    pub fn online(&self) {
        self.slot()
            .store(self.gp.load(Ordering::SeqCst), Ordering::SeqCst);
        // Orders the slot store before this CPU's descriptor loads (see
        // the module documentation: the store-buffering case).
        fence(Ordering::SeqCst);
    }

    /// The current CPU enters an extended quiescent state (guest code,
    /// idle): it holds no references until [`Rcu::online`].
    pub fn offline(&self) {
        self.slot().store(0, Ordering::SeqCst);
    }

    /// Whether the current CPU is online.
    pub fn is_online(&self) -> bool {
        self.slot().load(Ordering::SeqCst) != 0
    }

    /// The current CPU holds no reference taken before this call. A no-op
    /// for an offline CPU.
    pub fn quiescent(&self) {
        let slot = self.slot();
        if slot.load(Ordering::Relaxed) != 0 {
            slot.store(self.gp.load(Ordering::SeqCst), Ordering::SeqCst);
        }
    }

    /// Starts a grace period, after something was unlinked: it has elapsed
    /// when every CPU online now has passed a quiescent state.
    pub fn start(&self) -> GpTicket {
        let ticket = GpTicket(self.gp.fetch_add(1, Ordering::SeqCst) + 1);
        // Orders the caller's unlink (before the bump) before the slot
        // loads of `poll` (the other half of the store-buffering case).
        fence(Ordering::SeqCst);
        ticket
    }

    /// Whether the grace period `ticket` has elapsed. Reports a quiescent
    /// state for the calling CPU first, so it must not be called from
    /// inside a read-side section.
    pub fn poll(&self, ticket: GpTicket) -> bool {
        self.quiescent();
        self.elapsed(ticket)
    }

    /// Whether the grace period `ticket` has elapsed, without reporting a
    /// quiescent state (the calling CPU counts like any other).
    pub fn elapsed(&self, ticket: GpTicket) -> bool {
        self.slots.iter().all(|s| {
            let seen = s.load(Ordering::SeqCst);
            seen == 0 || seen >= ticket.0
        })
    }

    /// Waits until `ticket` has elapsed, reporting quiescent states for the
    /// calling CPU meanwhile. Not from inside a read-side section.
    pub fn wait(&self, ticket: GpTicket) {
        while !self.poll(ticket) {
            spin_loop();
        }
    }

    /// Starts a grace period and waits for it (`synchronize_rcu`).
    pub fn synchronize(&self) {
        let ticket = self.start();
        self.wait(ticket);
    }
}

/// A bounded queue of items waiting for a grace period (`call_rcu`): each
/// item is tagged with the ticket of the grace period that must elapse
/// before it may be freed. Pushes are in ticket order (the ticket is taken
/// under the queue's lock), so the elapsed items are always a prefix.
pub struct DeferQueue<T: Copy, const N: usize> {
    inner: Mutex<Ring<T, N>>,
}

struct Ring<T: Copy, const N: usize> {
    items: [Option<(T, GpTicket)>; N],
    head: usize,
    len: usize,
}

impl<T: Copy, const N: usize> core::fmt::Debug for DeferQueue<T, N> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DeferQueue")
            .field("capacity", &N)
            .finish_non_exhaustive()
    }
}

impl<T: Copy, const N: usize> Default for DeferQueue<T, N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Copy, const N: usize> DeferQueue<T, N> {
    /// An empty queue.
    pub fn new() -> Self {
        Self {
            inner: Mutex::new(Ring {
                items: [None; N],
                head: 0,
                len: 0,
            }),
        }
    }

    /// Items waiting.
    pub fn len(&self) -> usize {
        self.inner.lock().len
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The ticket of the most recently queued item.
    pub fn newest_ticket(&self) -> Option<GpTicket> {
        let ring = self.inner.lock();
        match ring.len {
            0 => None,
            n => ring.items[(ring.head + n - 1) % N].map(|(_, t)| t),
        }
    }

    /// Hands every queued item to `free` without waiting: only for the
    /// owner of the queue when no reader can be left (teardown).
    pub fn drain(&self, mut free: impl FnMut(T)) {
        let mut ring = self.inner.lock();
        while ring.len > 0 {
            let head = ring.head;
            if let Some((item, _)) = ring.items[head].take() {
                free(item);
            }
            ring.head = (head + 1) % N;
            ring.len -= 1;
        }
    }

    /// Queues `item` behind a new grace period of `rcu` (started now, so
    /// `item` must already be unreachable). When the queue is full, first
    /// waits for the oldest items' grace period and hands them to `free`.
    ///
    /// Blocks only when full, and then reports quiescent states for the
    /// calling CPU: call it where that is allowed (outside read-side
    /// sections, or as the only CPU that unlinks, see `Stage2`).
    pub fn defer(&self, rcu: &Rcu, item: T, mut free: impl FnMut(T)) {
        loop {
            {
                let mut ring = self.inner.lock();
                if ring.len < N {
                    let ticket = rcu.start();
                    let tail = (ring.head + ring.len) % N;
                    ring.items[tail] = Some((item, ticket));
                    ring.len += 1;
                    return;
                }
            }
            self.reclaim(rcu, true, &mut free);
        }
    }

    /// Hands every item whose grace period has elapsed to `free`; with
    /// `wait`, first waits for the grace period of the newest item queued
    /// at the time of the call, so that all of those are freed. Returns
    /// how many were freed. Never holds the queue's lock while waiting.
    pub fn reclaim(&self, rcu: &Rcu, wait: bool, mut free: impl FnMut(T)) -> usize {
        if wait {
            if let Some(ticket) = self.newest_ticket() {
                rcu.wait(ticket);
            }
        }
        let mut freed = 0;
        loop {
            let item = {
                let mut ring = self.inner.lock();
                let head = ring.head;
                match ring.items[head] {
                    Some((item, ticket)) if ring.len > 0 && rcu.poll(ticket) => {
                        ring.items[head] = None;
                        ring.head = (head + 1) % N;
                        ring.len -= 1;
                        item
                    }
                    _ => return freed,
                }
            };
            free(item);
            freed += 1;
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use core::cell::Cell;
    use std::vec::Vec;

    std::thread_local! {
        static CPU: Cell<usize> = const { Cell::new(0) };
    }

    fn cpu() -> usize {
        CPU.with(Cell::get)
    }

    #[test]
    fn offline_cpus_do_not_hold_grace_periods() {
        let rcu = Rcu::new(cpu);
        let t = rcu.start();
        assert!(rcu.poll(t), "nobody online: elapsed at once");
    }

    #[test]
    fn an_online_cpu_holds_the_grace_period_until_quiescent() {
        let rcu = Rcu::new(cpu);
        // This thread plays CPU 1 and is online; the poller is CPU 0.
        CPU.with(|c| c.set(1));
        rcu.online();
        CPU.with(|c| c.set(0));
        let t = rcu.start();
        assert!(!rcu.poll(t), "CPU 1 has not been quiescent since");
        CPU.with(|c| c.set(1));
        rcu.quiescent();
        CPU.with(|c| c.set(0));
        assert!(rcu.poll(t));
        // A later grace period needs a later quiescent state.
        let t2 = rcu.start();
        assert!(t2 > t);
        assert!(!rcu.poll(t2));
        CPU.with(|c| c.set(1));
        rcu.offline();
        CPU.with(|c| c.set(0));
        assert!(rcu.poll(t2), "offline is an extended quiescent state");
    }

    #[test]
    fn quiescent_while_offline_stays_offline() {
        let rcu = Rcu::new(cpu);
        rcu.quiescent();
        assert!(!rcu.is_online());
    }

    #[test]
    fn defer_queue_frees_in_order_after_grace() {
        let rcu = Rcu::new(cpu);
        let q: DeferQueue<u32, 4> = DeferQueue::new();
        CPU.with(|c| c.set(1));
        rcu.online();
        CPU.with(|c| c.set(0));
        let mut freed = Vec::new();
        for i in 0..3 {
            q.defer(&rcu, i, |x| freed.push(x));
        }
        assert_eq!(q.reclaim(&rcu, false, |x| freed.push(x)), 0);
        assert!(freed.is_empty(), "CPU 1 is online and not quiescent");
        CPU.with(|c| c.set(1));
        rcu.quiescent();
        CPU.with(|c| c.set(0));
        assert_eq!(q.reclaim(&rcu, false, |x| freed.push(x)), 3);
        assert_eq!(freed, [0, 1, 2]);
        assert!(q.is_empty());
    }

    #[test]
    fn full_defer_queue_waits_then_frees_the_oldest() {
        let rcu = Rcu::new(cpu);
        let q: DeferQueue<u32, 2> = DeferQueue::new();
        let mut freed = Vec::new();
        for i in 0..5 {
            q.defer(&rcu, i, |x| freed.push(x));
        }
        assert_eq!(q.len(), 1);
        assert_eq!(freed, [0, 1, 2, 3]);
    }
}
