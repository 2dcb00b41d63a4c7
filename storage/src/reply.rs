//! A one-shot reply from the log writer to the thread waiting on a request.
//!
//! Every waiter of a store sleeps on one condition variable, the [`Bell`]: the writer fills a
//! whole group commit's replies quietly and rings once, one wake-up call for all of them,
//! rather than one call (and one lock) per appender, which would add up to a large share of
//! a commit cycle with dozens of appenders. A waiter whose reply is not among them looks at
//! its own slot and sleeps again. Waiters park at once instead of spinning first (as a
//! channel's `recv` does), so that on a small machine they leave the CPU to the writer they
//! wait for.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::error::StorageError;

/// What waiters sleep on; its epoch changes with every ring.
#[derive(Default)]
pub(crate) struct Bell {
    state: Mutex<BellState>,
    rung: Condvar,
}

#[derive(Default)]
struct BellState {
    epoch: u64,
    /// Threads asleep on `rung`: a ring with none skips the wake-up call.
    sleepers: u32,
}

impl Bell {
    fn lock(&self) -> MutexGuard<'_, BellState> {
        // The state is two counters that no panic can leave half-changed.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes every waiter, to look at its own slot.
    pub(crate) fn ring(&self) {
        let mut state = self.lock();
        state.epoch = state.epoch.wrapping_add(1);
        let sleepers = state.sleepers;
        drop(state);
        if sleepers > 0 {
            self.rung.notify_all();
        }
    }

    /// Sleeps until `ready` holds or the bell rings (callers re-check their slot either way).
    ///
    /// `ready` is read under the bell's lock, and a ring takes that lock after its sender
    /// filled the slot: so either the reply is seen here, or the ring comes after this thread
    /// is counted asleep and wakes it. No wake-up is lost.
    fn sleep_unless(&self, ready: &AtomicBool) {
        let mut state = self.lock();
        if ready.load(Ordering::SeqCst) {
            return;
        }
        let seen = state.epoch;
        state.sleepers += 1;
        while state.epoch == seen {
            state = self.rung.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        state.sleepers -= 1;
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
            bell.sleep_unless(&slot.ready);
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

    #[test]
    fn no_wake_up_is_lost_when_replies_race_the_waiters() {
        // Replies sent while their waiters are between checking the slot and sleeping: a lost
        // wake-up would hang this test.
        let bell = Arc::new(Bell::default());
        let (tx, rx) = crossbeam_channel::unbounded::<ReplyTx<u32>>();
        let writer = std::thread::spawn(move || {
            let mut group = Vec::new();
            while let Ok(ack) = rx.recv() {
                group.push(ack);
                group.extend(rx.try_iter());
                let mut bell = None;
                for (i, ack) in group.drain(..).enumerate() {
                    bell = Some(ack.send_quiet(Ok(i as u32)));
                }
                bell.expect("a group of at least one").ring();
            }
        });
        let waiters: Vec<_> = (0..8)
            .map(|_| {
                let (bell, tx) = (bell.clone(), tx.clone());
                std::thread::spawn(move || {
                    for _ in 0..2_000 {
                        let (ack, rx) = reply::<u32>(&bell);
                        tx.send(ack).expect("the writer runs");
                        rx.recv().expect("a reply");
                    }
                })
            })
            .collect();
        for w in waiters {
            w.join().expect("waiter");
        }
        drop(tx);
        writer.join().expect("writer");
    }
}
