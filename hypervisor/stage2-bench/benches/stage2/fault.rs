//! Stage-2 fault installs from two vCPUs (threads) into a fresh table:
//! the lockless path (`fault_install`: compare-exchange into empty slots)
//! against a global lock around `map` of one page, and — to tell the cost
//! of the lock from that of the code path — against `fault_install` under
//! the same global lock.
//!
//! Two layouts of the faulting pages: **disjoint** (each thread faults its
//! own half of the range, as vCPUs touching their own memory do) and
//! **interleaved** (thread `t` takes pages `2i + t`), the hard case for
//! the lockless path: both threads race to install the same tables and
//! write to the same cache lines of each leaf table all the time.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hyp_core::addr::{Ipa, PhysAddr, PAGE_SIZE};
use stage2::{FaultOutcome, MapFlags, MemType, Perms};

use crate::host::{new_table, pin_to_cpu, play_cpu, unpin, FRAME_BASE, RCU, S2};

/// How each thread installs a page.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Install {
    /// `fault_install`, lockless.
    Cas,
    /// `map` of one page under a global `spin::Mutex`.
    LockedMap,
    /// `fault_install` under a global `spin::Mutex`.
    LockedCas,
}

fn install(s2: &S2, lock: &spin::Mutex<()>, how: Install, page: u64) {
    let (ipa, pa) = (
        Ipa(page * PAGE_SIZE),
        PhysAddr(FRAME_BASE + page * PAGE_SIZE),
    );
    let fault = || loop {
        match s2.fault_install(ipa, pa, Perms::RW, MemType::Normal, true) {
            Ok(FaultOutcome::Installed) => return,
            Ok(FaultOutcome::Retry) => std::hint::spin_loop(),
            other => panic!("fault_install of page {page}: {other:?}"),
        }
    };
    match how {
        Install::Cas => fault(),
        Install::LockedCas => {
            let _global = lock.lock();
            fault();
        }
        Install::LockedMap => {
            let _global = lock.lock();
            let flags = MapFlags {
                af: true,
                allow_blocks: false,
            };
            s2.map(ipa, pa, PAGE_SIZE, Perms::RW, MemType::Normal, flags)
                .expect("map one page");
        }
    }
}

/// Which pages each thread faults.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Pages {
    /// Thread `t` faults pages `[t * n, (t + 1) * n)`.
    Disjoint,
    /// Thread `t` faults pages `threads * i + t`.
    Interleaved,
}

/// One round: a fresh table, then `threads` (1 or 2) x `pages_per_thread`
/// installs, one thread each. Returns the time from the moment both threads are ready to the
/// moment the last one is done (table creation and teardown and the
/// thread start are not timed). The calling thread must be CPU 0, online;
/// the threads are pinned to different CPUs.
pub fn round(how: Install, layout: Pages, threads: u64, pages_per_thread: u64) -> Duration {
    assert!(threads == 1 || threads == 2);
    let s2 = new_table();
    let lock = spin::Mutex::new(());
    // A spinning barrier: a futex wake-up would start one thread tens of
    // microseconds after the other.
    let ready = AtomicUsize::new(0);
    let work = |t: u64| {
        ready.fetch_add(1, Ordering::AcqRel);
        while ready.load(Ordering::Acquire) < threads as usize {
            std::hint::spin_loop();
        }
        let start = Instant::now();
        for i in 0..pages_per_thread {
            let page = match layout {
                Pages::Disjoint => t * pages_per_thread + i,
                Pages::Interleaved => threads * i + t,
            };
            install(&s2, &lock, how, page);
        }
        (start, Instant::now())
    };
    pin_to_cpu(0);
    let ((s0, e0), (s1, e1)) = std::thread::scope(|s| {
        if threads == 1 {
            let mine = work(0);
            return (mine, mine);
        }
        let other = s.spawn(|| {
            pin_to_cpu(1);
            play_cpu(1);
            RCU.online();
            let span = work(1);
            RCU.offline();
            span
        });
        let mine = work(0);
        (mine, other.join().expect("fault thread"))
    });
    unpin();
    assert_eq!(s2.mapped_pages(), threads * pages_per_thread);
    drop(s2);
    RCU.quiescent();
    e0.max(e1) - s0.min(s1)
}
