//! The synchronization primitives of the RCU core, switched to `loom`'s
//! model-checked versions under `--cfg loom` (see `tests/loom.rs`), so the
//! same source is what the model checker explores.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicU64, Ordering};

#[cfg(not(loom))]
pub(crate) use core::sync::atomic::{fence, AtomicU64, Ordering};

/// A busy-wait hint (under loom: a yield, so other threads make progress).
pub(crate) fn spin_loop() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    core::hint::spin_loop();
}

/// A spin lock (`spin::Mutex`; under loom, loom's mutex with the same
/// `lock()` shape).
#[cfg(not(loom))]
pub(crate) type Mutex<T> = spin::Mutex<T>;

#[cfg(loom)]
#[derive(Debug)]
pub(crate) struct Mutex<T>(loom::sync::Mutex<T>);

#[cfg(loom)]
impl<T> Mutex<T> {
    pub(crate) fn new(value: T) -> Self {
        Self(loom::sync::Mutex::new(value))
    }

    pub(crate) fn lock(&self) -> loom::sync::MutexGuard<'_, T> {
        self.0.lock().unwrap()
    }
}
