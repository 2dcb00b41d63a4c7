//! The scheduler's timers: a heap of due instants (`scheduled_for`, `next_retry_at`), so the
//! scheduler sleeps until the next one instead of polling, with a set beside it so a rescan
//! does not add the same timer twice.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};

use atelier_engine::time::Millis;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) enum TimerKind {
    /// `scheduled_for` is reached: the commission may run.
    Scheduled,
    /// `next_retry_at` is reached: append RetryDue.
    RetryDue,
}

/// When a commission needs looking at again, and why.
pub(super) type Timer = (Millis, u64, TimerKind);

#[derive(Default)]
pub(super) struct Timers {
    heap: BinaryHeap<Reverse<Timer>>,
    /// The timers in the heap.
    set: HashSet<Timer>,
}

impl Timers {
    pub(super) fn add(&mut self, t: Timer) {
        if self.set.insert(t) {
            self.heap.push(Reverse(t));
        }
    }

    /// When the earliest timer is due.
    pub(super) fn next_due(&self) -> Option<Millis> {
        self.heap.peek().map(|Reverse((due, _, _))| *due)
    }

    /// Takes the earliest timer if it is due at `now`.
    pub(super) fn pop_due(&mut self, now: Millis) -> Option<Timer> {
        let Reverse(t) = *self.heap.peek()?;
        if t.0 > now {
            return None;
        }
        self.heap.pop();
        self.set.remove(&t);
        Some(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timers_come_due_in_order_and_once() {
        let mut t = Timers::default();
        t.add((20, 1, TimerKind::RetryDue));
        t.add((10, 2, TimerKind::Scheduled));
        t.add((10, 2, TimerKind::Scheduled));
        assert_eq!(t.next_due(), Some(10));
        assert_eq!(t.pop_due(9), None);
        assert_eq!(t.pop_due(15), Some((10, 2, TimerKind::Scheduled)));
        assert_eq!(t.pop_due(15), None, "the duplicate was never added");
        assert_eq!(t.pop_due(20), Some((20, 1, TimerKind::RetryDue)));
        assert_eq!(t.next_due(), None);
    }
}
