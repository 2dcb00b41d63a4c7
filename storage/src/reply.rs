//! A one-shot reply from the log writer to the thread waiting on a request.
//!
//! A crossbeam `bounded(1)` channel per request did the same job, but its `recv` first spins,
//! calling `sched_yield` in a loop, before it parks. With 64 appenders on a 2-core machine
//! that spinning took a third of the CPU in the benchmark, away from the writer it waits for.
//! This slot parks on a condvar at once: one futex wait, one futex wake.

use std::sync::{Arc, Condvar, Mutex};

use crate::StorageError;

struct Slot<T> {
    value: Mutex<Option<Result<T, StorageError>>>,
    ready: Condvar,
}

/// The writer's end. Dropping it unsent answers [`StorageError::Closed`], so a waiter never
/// hangs on a writer that went away.
pub(crate) struct ReplyTx<T>(Option<Arc<Slot<T>>>);

/// The requester's end.
pub(crate) struct ReplyRx<T>(Arc<Slot<T>>);

pub(crate) fn reply<T>() -> (ReplyTx<T>, ReplyRx<T>) {
    let slot = Arc::new(Slot { value: Mutex::new(None), ready: Condvar::new() });
    (ReplyTx(Some(slot.clone())), ReplyRx(slot))
}

fn put<T>(slot: &Slot<T>, value: Result<T, StorageError>) {
    let mut guard = slot.value.lock().unwrap_or_else(|p| p.into_inner());
    *guard = Some(value);
    drop(guard);
    slot.ready.notify_one();
}

impl<T> ReplyTx<T> {
    pub(crate) fn send(mut self, value: Result<T, StorageError>) {
        let slot = self.0.take().expect("invariant: a reply is sent at most once");
        put(&slot, value);
    }
}

impl<T> Drop for ReplyTx<T> {
    fn drop(&mut self) {
        if let Some(slot) = self.0.take() {
            put(&slot, Err(StorageError::Closed));
        }
    }
}

impl<T> ReplyRx<T> {
    /// Waits for the reply.
    pub(crate) fn recv(self) -> Result<T, StorageError> {
        let mut guard = self.0.value.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(value) = guard.take() {
                return value;
            }
            guard = self.0.ready.wait(guard).unwrap_or_else(|p| p.into_inner());
        }
    }
}
