//! A one-shot reply from the log writer to the thread waiting on a request.
//!
//! A crossbeam `bounded(1)` channel per request did the same job, but its `recv` first spins,
//! calling `sched_yield` in a loop, before it parks. With 64 appenders on a 2-core machine
//! that spinning took a third of the CPU in the benchmark, away from the writer it waits for.
//! A condvar per reply then parked at once, but the writer woke a group commit's appenders one
//! syscall (and one mutex) at a time, ~300 µs for 57 of them, a third of the commit cycle.
//!
//! Now every waiter of a store sleeps on one futex word, the [`Bell`]: the writer fills a
//! whole group's replies quietly and rings once, one `FUTEX_WAKE` for all of them. A waiter
//! whose reply is not among them looks at its own slot and sleeps again.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::StorageError;

/// The futex word waiters sleep on; it changes with every ring.
#[derive(Default)]
pub(crate) struct Bell {
    epoch: AtomicU32,
    /// Threads between deciding to sleep and waking: a ring with none skips the syscall.
    sleepers: AtomicU32,
}

impl Bell {
    /// Wakes every waiter, to look at its own slot.
    pub(crate) fn ring(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            // SAFETY: FUTEX_WAKE only reads the address of a live atomic we own a reference to.
            unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    self.epoch.as_ptr(),
                    libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
                    i32::MAX,
                );
            }
        }
    }

    /// Sleeps until a ring after `seen` (or a spurious wakeup: callers re-check).
    fn sleep(&self, seen: u32) {
        // SAFETY: FUTEX_WAIT compares the atomic's current value with `seen` and sleeps only if
        // they are equal; the pointer is valid for the call.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                self.epoch.as_ptr(),
                libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                seen,
                std::ptr::null::<libc::timespec>(),
            );
        }
    }
}

struct Slot<T> {
    value: Mutex<Option<Result<T, StorageError>>>,
    ready: AtomicBool,
}

/// The writer's end. Dropping it unsent answers [`StorageError::Closed`], so a waiter never
/// hangs on a writer that went away.
pub(crate) struct ReplyTx<T>(Option<(Arc<Slot<T>>, Arc<Bell>)>);

/// The requester's end.
pub(crate) struct ReplyRx<T>(Arc<Slot<T>>, Arc<Bell>);

pub(crate) fn reply<T>(bell: &Arc<Bell>) -> (ReplyTx<T>, ReplyRx<T>) {
    let slot = Arc::new(Slot { value: Mutex::new(None), ready: AtomicBool::new(false) });
    (ReplyTx(Some((slot.clone(), bell.clone()))), ReplyRx(slot, bell.clone()))
}

fn put<T>(slot: &Slot<T>, value: Result<T, StorageError>) {
    *slot.value.lock().unwrap_or_else(|p| p.into_inner()) = Some(value);
    slot.ready.store(true, Ordering::SeqCst);
}

impl<T> ReplyTx<T> {
    /// Fills the slot and rings the bell.
    pub(crate) fn send(self, value: Result<T, StorageError>) {
        let bell = self.send_quiet(value);
        bell.ring();
    }

    /// Fills the slot without ringing; the caller rings the returned bell once for a group.
    pub(crate) fn send_quiet(mut self, value: Result<T, StorageError>) -> Arc<Bell> {
        let (slot, bell) = self.0.take().expect("invariant: a reply is sent at most once");
        put(&slot, value);
        bell
    }
}

impl<T> Drop for ReplyTx<T> {
    fn drop(&mut self) {
        if let Some((slot, bell)) = self.0.take() {
            put(&slot, Err(StorageError::Closed));
            bell.ring();
        }
    }
}

impl<T> ReplyRx<T> {
    /// Waits for the reply.
    pub(crate) fn recv(self) -> Result<T, StorageError> {
        let (slot, bell) = (&self.0, &self.1);
        loop {
            if slot.ready.load(Ordering::SeqCst) {
                let value = slot.value.lock().unwrap_or_else(|p| p.into_inner()).take();
                return value.expect("invariant: ready is set after the value");
            }
            bell.sleepers.fetch_add(1, Ordering::SeqCst);
            let seen = bell.epoch.load(Ordering::SeqCst);
            // A ring between our check and `seen` either set `ready` (checked again here) or
            // changed the epoch (the futex then returns at once).
            if !slot.ready.load(Ordering::SeqCst) {
                bell.sleep(seen);
            }
            bell.sleepers.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_is_woken_by_one_ring_and_a_dropped_sender_answers_closed() {
        let bell = Arc::new(Bell::default());
        let pairs: Vec<_> = (0..16).map(|_| reply::<u32>(&bell)).collect();
        let (txs, rxs): (Vec<_>, Vec<_>) = pairs.into_iter().unzip();
        let waiters: Vec<_> = rxs.into_iter().map(|rx| std::thread::spawn(move || rx.recv())).collect();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let mut txs = txs.into_iter();
        let dropped = txs.next().expect("16 senders");
        for (i, tx) in txs.enumerate() {
            let _ = tx.send_quiet(Ok(i as u32));
        }
        bell.ring();
        drop(dropped);
        let got: Vec<_> = waiters.into_iter().map(|w| w.join().expect("waiter")).collect();
        assert!(matches!(got[0], Err(StorageError::Closed)));
        assert_eq!(
            got[1..].iter().map(|r| *r.as_ref().expect("sent")).collect::<Vec<_>>(),
            (0..15).collect::<Vec<_>>()
        );
    }
}
