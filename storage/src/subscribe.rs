//! Log subscriptions: replay from the log, then follow live, with no gap and no duplicate.
//!
//! The writer publishes each batch to the registry after it is durable, holding the registry
//! lock while it also advances the durable head. A subscription reads history up to a head it
//! saw, registers (reading the head again under the lock), reads the rest of history up to
//! that second head, and from then on takes only live events with a higher seq. So every event
//! comes exactly once, in order.
//!
//! A subscriber's queue is bounded ([`SUBSCRIBER_QUEUE_EVENTS_MAX`]). When it is full the
//! writer does not wait: it cuts the subscriber off, and the subscription ends with
//! [`SubscriptionEnd::Overflow`] carrying the last seq delivered, from which the client can
//! resume. sled's own `watch_prefix` would instead block the writer.
//!
//! What one publish holds for a subscriber goes to it as one message: a subscriber woken by
//! the first event of a batch would otherwise often run (on the other core) before the
//! writer sent the rest, and write them to its client in two or more writes, each one more
//! wake-up for the stream thread and for the client (a `noop` commission's end went out in
//! two writes).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use atelier_engine::{Commission, Envelope, Stage, State};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};

use crate::error::StorageError;

/// Live events queued per subscriber before it is cut off as too slow (a single batch
/// larger than this still reaches a subscriber whose queue is empty).
pub const SUBSCRIBER_QUEUE_EVENTS_MAX: usize = 256;
/// Events read from the log per chunk while replaying history.
pub const REPLAY_CHUNK_EVENTS: usize = 512;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Filter {
    Commission(u64),
    User(String),
    All,
}

/// The commission as it stood right after an event: what a progress stream shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ViewAfter {
    pub user_id: Arc<str>,
    pub state: State,
    pub stage: Option<Stage>,
    pub progress_percent: u8,
    pub stage_progress_percent: Option<u8>,
    pub message: Option<String>,
}

impl ViewAfter {
    pub fn of(c: &Commission) -> ViewAfter {
        ViewAfter {
            user_id: Arc::from(c.user_id.as_str()),
            state: c.state,
            stage: c.stage,
            progress_percent: c.progress_percent(),
            stage_progress_percent: c.stage.map(|s| c.stage_progress[s.index()]),
            message: c.message.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Delivery {
    pub env: Arc<Envelope>,
    pub view: Arc<ViewAfter>,
}

/// Why a subscription stopped delivering.
#[derive(Debug)]
pub enum SubscriptionEnd {
    /// Too slow: its queue overflowed. Resume after `last_seq`.
    Overflow {
        last_seq: u64,
    },
    /// The store shut down.
    Closed,
    Failed(StorageError),
}

/// The events of one publish that match one subscriber, in seq order.
type Batch = Arc<[Delivery]>;

pub(crate) struct Subscriber {
    id: u64,
    tx: Sender<Batch>,
    /// Events sent and not yet taken by the subscription (the channel counts batches).
    queued: Arc<AtomicUsize>,
}

#[derive(Default)]
pub(crate) struct Registry {
    next_id: u64,
    by_commission: HashMap<u64, Vec<Subscriber>>,
    by_user: HashMap<Arc<str>, Vec<Subscriber>>,
    all: Vec<Subscriber>,
    pub(crate) closed: bool,
}

impl Registry {
    fn add(&mut self, filter: Filter, tx: Sender<Batch>, queued: Arc<AtomicUsize>) -> u64 {
        self.next_id += 1;
        let sub = Subscriber { id: self.next_id, tx, queued };
        match filter {
            Filter::Commission(id) => self.by_commission.entry(id).or_default().push(sub),
            Filter::User(u) => self.by_user.entry(Arc::from(u.as_str())).or_default().push(sub),
            Filter::All => self.all.push(sub),
        }
        self.next_id
    }

    fn remove(&mut self, id: u64, filter: &Filter) {
        match filter {
            Filter::Commission(c) => {
                if let Some(v) = self.by_commission.get_mut(c) {
                    v.retain(|s| s.id != id);
                    if v.is_empty() {
                        self.by_commission.remove(c);
                    }
                }
            }
            Filter::User(u) => {
                if let Some(v) = self.by_user.get_mut(u.as_str()) {
                    v.retain(|s| s.id != id);
                    if v.is_empty() {
                        self.by_user.remove(u.as_str());
                    }
                }
            }
            Filter::All => self.all.retain(|s| s.id != id),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.by_commission.values().map(Vec::len).sum::<usize>()
            + self.by_user.values().map(Vec::len).sum::<usize>()
            + self.all.len()
    }

    /// Sends the deliveries (in seq order) to the matching subscribers, each subscriber's
    /// share as one batch; never blocks. Returns how many subscribers were cut off for being
    /// too slow.
    pub(crate) fn publish(&mut self, deliveries: &[Delivery]) -> u64 {
        let mut dropped = 0;
        // A commission belongs to one user: a run of one commission's events is also one
        // user's. A user with events of several commissions in one publish gets one batch per
        // run, still in seq order.
        for run in deliveries.chunk_by(|a, b| a.env.commission_id == b.env.commission_id) {
            let commission_subs = self.by_commission.get_mut(&run[0].env.commission_id);
            let user_subs = self.by_user.get_mut(&run[0].view.user_id);
            if commission_subs.is_none() && user_subs.is_none() {
                continue;
            }
            let batch: Batch = run.into();
            if let Some(v) = commission_subs {
                dropped += send_all(v, &batch);
            }
            if let Some(v) = user_subs {
                dropped += send_all(v, &batch);
            }
        }
        if !self.all.is_empty() && !deliveries.is_empty() {
            dropped += send_all(&mut self.all, &deliveries.into());
        }
        if dropped > 0 {
            self.by_commission.retain(|_, v| !v.is_empty());
            self.by_user.retain(|_, v| !v.is_empty());
        }
        dropped
    }

    pub(crate) fn close(&mut self) {
        self.closed = true;
        self.by_commission.clear();
        self.by_user.clear();
        self.all.clear();
    }
}

fn send_all(subs: &mut Vec<Subscriber>, batch: &Batch) -> u64 {
    let mut dropped = 0;
    subs.retain(|s| {
        // Counted before the send, so the subscription never takes more than was counted.
        let before = s.queued.fetch_add(batch.len(), Ordering::AcqRel);
        if before > 0 && before + batch.len() > SUBSCRIBER_QUEUE_EVENTS_MAX {
            dropped += 1;
            return false;
        }
        match s.tx.try_send(batch.clone()) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                dropped += 1;
                false
            }
            Err(TrySendError::Disconnected(_)) => false,
        }
    });
    dropped
}

/// What a subscription needs from the store: history reads and the registry.
pub(crate) trait History: Send + Sync {
    /// Deliveries with `after < seq <= upto` matching `filter`, at most `limit`, in seq order.
    fn history(
        &self,
        filter: &Filter,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<Delivery>, StorageError>;
    fn registry(&self) -> &Mutex<Registry>;
    fn durable_head(&self) -> &AtomicU64;
}

/// A registered subscription's end of its queue.
struct Live {
    id: u64,
    rx: Receiver<Batch>,
    queued: Arc<AtomicUsize>,
}

impl Live {
    /// Moves a received batch into `ready`, skipping what was already handed out.
    fn take(&self, batch: &Batch, last_seq: u64, ready: &mut VecDeque<Delivery>) {
        self.queued.fetch_sub(batch.len(), Ordering::AcqRel);
        ready.extend(batch.iter().filter(|d| d.env.seq > last_seq).cloned());
    }
}

pub struct Subscription {
    source: Arc<dyn History>,
    filter: Filter,
    last_seq: u64,
    /// History and received live events not yet handed out, in order.
    backlog: VecDeque<Delivery>,
    /// History is known up to here; beyond it events come live (once registered).
    history_upto: u64,
    live: Option<Live>,
    ended: bool,
}

impl Subscription {
    pub(crate) fn new(source: Arc<dyn History>, after: u64, filter: Filter) -> Subscription {
        Subscription {
            source,
            filter,
            last_seq: after,
            backlog: VecDeque::new(),
            history_upto: after,
            live: None,
            ended: false,
        }
    }

    pub fn filter(&self) -> &Filter {
        &self.filter
    }

    /// The seq of the last event handed out (or the starting point).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Whether the next [`Subscription::next_timeout`] would read history from the store:
    /// nothing is buffered and the subscription is not yet live. A caller with many
    /// subscriptions on their own threads can run [`Subscription::read_history`] on a few
    /// threads instead: every thread that touches sled joins its epoch GC, whose every
    /// advance walks all such threads (with 10,000 stream threads reading their own history, a
    /// burst of 5,000 appends took 11–17 s instead of 2.5 s).
    pub fn wants_history(&self) -> bool {
        !self.ended && self.backlog.is_empty() && self.live.is_none()
    }

    /// Reads the next chunk of history, or registers for live events once history is
    /// exhausted (what `next_timeout` would do first). A chunk that reaches the durable head
    /// registers in the same call: the caller that reads history for others (a pool thread)
    /// then leaves nothing to the subscriber's own thread but draining its queues, and the
    /// subscriber needs no second trip to that caller (a commission's short history).
    pub fn read_history(&mut self) -> Result<(), SubscriptionEnd> {
        if self.wants_history() && self.fill_backlog()? && self.live.is_none() {
            self.register()?;
        }
        Ok(())
    }

    /// The next event if one is ready now: buffered history or a queued live event. Never
    /// reads the store and never waits, so a caller can gather everything ready into one
    /// write; how the subscription ends is left to [`Subscription::next_timeout`].
    pub fn try_next(&mut self) -> Option<Delivery> {
        if self.ended {
            return None;
        }
        if self.backlog.is_empty() {
            let live = self.live.as_ref()?;
            while let Ok(batch) = live.rx.try_recv() {
                live.take(&batch, self.last_seq, &mut self.backlog);
                if !self.backlog.is_empty() {
                    break;
                }
            }
        }
        let d = self.backlog.pop_front()?;
        Some(self.hand_out(d))
    }

    /// Records `d` as the last event handed out (a resume starts after it).
    fn hand_out(&mut self, d: Delivery) -> Delivery {
        self.last_seq = d.env.seq;
        d
    }

    /// The next event, waiting up to `timeout` for a live one. `Ok(None)` on timeout.
    pub fn next_timeout(&mut self, timeout: Duration) -> Result<Option<Delivery>, SubscriptionEnd> {
        if self.ended {
            return Err(SubscriptionEnd::Closed);
        }
        loop {
            if let Some(d) = self.backlog.pop_front() {
                return Ok(Some(self.hand_out(d)));
            }
            if self.live.is_none() {
                self.fill_backlog()?;
                if !self.backlog.is_empty() {
                    continue;
                }
                continue; // fill_backlog registered us once history was exhausted
            }
            let live = self.live.as_ref().expect("invariant: registered above");
            match live.rx.recv_timeout(timeout) {
                Ok(batch) => live.take(&batch, self.last_seq, &mut self.backlog),
                Err(RecvTimeoutError::Timeout) => return Ok(None),
                Err(RecvTimeoutError::Disconnected) => {
                    self.ended = true;
                    let closed = self.source.registry().lock().map(|r| r.closed).unwrap_or(true);
                    return Err(if closed {
                        SubscriptionEnd::Closed
                    } else {
                        SubscriptionEnd::Overflow { last_seq: self.last_seq }
                    });
                }
            }
        }
    }

    /// Reads the next chunk of history; when history up to the durable head is exhausted,
    /// registers for live events and reads the remainder up to the head seen under the lock.
    /// True when history is now read up to the durable head (nothing left but to register,
    /// if that was not this call).
    fn fill_backlog(&mut self) -> Result<bool, SubscriptionEnd> {
        let head = self.source.durable_head().load(Ordering::Acquire);
        if self.history_upto < head {
            let chunk = self
                .source
                .history(&self.filter, self.history_upto, head, REPLAY_CHUNK_EVENTS)
                .map_err(SubscriptionEnd::Failed)?;
            self.history_upto = match chunk.last() {
                Some(d) if chunk.len() == REPLAY_CHUNK_EVENTS => d.env.seq,
                _ => head,
            };
            self.backlog.extend(chunk);
            return Ok(self.history_upto == head);
        }
        self.register()?;
        Ok(true)
    }

    /// Registers for live events, and reads the history that became durable between the
    /// last history read and the registration (queued behind the backlog: seqs stay in order).
    fn register(&mut self) -> Result<(), SubscriptionEnd> {
        let (tx, rx) = crossbeam_channel::bounded(SUBSCRIBER_QUEUE_EVENTS_MAX);
        let queued = Arc::new(AtomicUsize::new(0));
        let (id, head_at_register) = {
            let mut reg = self.source.registry().lock().map_err(|_| SubscriptionEnd::Closed)?;
            if reg.closed {
                return Err(SubscriptionEnd::Closed);
            }
            let head = self.source.durable_head().load(Ordering::Acquire);
            (reg.add(self.filter.clone(), tx, queued.clone()), head)
        };
        self.live = Some(Live { id, rx, queued });
        // Events that became durable between our history read and registering.
        let mut after = self.history_upto;
        while after < head_at_register {
            let chunk = self
                .source
                .history(&self.filter, after, head_at_register, REPLAY_CHUNK_EVENTS)
                .map_err(SubscriptionEnd::Failed)?;
            after = match chunk.last() {
                Some(d) if chunk.len() == REPLAY_CHUNK_EVENTS => d.env.seq,
                _ => head_at_register,
            };
            self.backlog.extend(chunk);
        }
        self.history_upto = head_at_register;
        Ok(())
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(live) = self.live.take() {
            if let Ok(mut reg) = self.source.registry().lock() {
                reg.remove(live.id, &self.filter);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use atelier_engine::Event;

    fn delivery(seq: u64, commission_id: u64, user: &str) -> Delivery {
        let event = Event::RetryDue;
        let env = Envelope { seq, commission_id, version: seq, at: 0, event };
        let view = ViewAfter {
            user_id: Arc::from(user),
            state: State::Processing,
            stage: None,
            progress_percent: 0,
            stage_progress_percent: None,
            message: None,
        };
        Delivery { env: Arc::new(env), view: Arc::new(view) }
    }

    fn subscribe(reg: &mut Registry, filter: Filter) -> (Receiver<Batch>, Arc<AtomicUsize>) {
        let (tx, rx) = crossbeam_channel::bounded(SUBSCRIBER_QUEUE_EVENTS_MAX);
        let queued = Arc::new(AtomicUsize::new(0));
        reg.add(filter, tx, queued.clone());
        (rx, queued)
    }

    fn seqs(batch: &Batch) -> Vec<u64> {
        batch.iter().map(|d| d.env.seq).collect()
    }

    #[test]
    fn a_publish_reaches_each_subscriber_as_one_batch_per_commission_run() {
        let mut reg = Registry::default();
        let (one, one_queued) = subscribe(&mut reg, Filter::Commission(1));
        let (alice, _) = subscribe(&mut reg, Filter::User("alice".into()));
        let (all, _) = subscribe(&mut reg, Filter::All);
        let (bob, _) = subscribe(&mut reg, Filter::User("bob".into()));
        // Commission 1 (alice) twice, 2 (alice) once, 1 again, 3 (carol) once.
        let group = [
            delivery(10, 1, "alice"),
            delivery(11, 1, "alice"),
            delivery(12, 2, "alice"),
            delivery(13, 1, "alice"),
            delivery(14, 3, "carol"),
        ];
        assert_eq!(reg.publish(&group), 0);
        let got: Vec<Vec<u64>> = one.try_iter().map(|b| seqs(&b)).collect();
        assert_eq!(got, vec![vec![10, 11], vec![13]]);
        assert_eq!(one_queued.load(Ordering::Acquire), 3, "events, not batches, are counted");
        let got: Vec<Vec<u64>> = alice.try_iter().map(|b| seqs(&b)).collect();
        assert_eq!(got, vec![vec![10, 11], vec![12], vec![13]]);
        let got: Vec<Vec<u64>> = all.try_iter().map(|b| seqs(&b)).collect();
        assert_eq!(got, vec![vec![10, 11, 12, 13, 14]]);
        assert!(bob.try_recv().is_err(), "nothing for a user without events");
    }

    #[test]
    fn a_subscriber_is_cut_off_by_events_queued_not_by_batches() {
        let mut reg = Registry::default();
        let (rx, queued) = subscribe(&mut reg, Filter::Commission(1));
        // One batch larger than the queue still reaches an idle subscriber.
        let big: Vec<Delivery> =
            (1..=SUBSCRIBER_QUEUE_EVENTS_MAX as u64 + 1).map(|s| delivery(s, 1, "alice")).collect();
        assert_eq!(reg.publish(&big), 0);
        assert_eq!(queued.load(Ordering::Acquire), big.len());
        // Anything more while it is still queued: cut off.
        let next = SUBSCRIBER_QUEUE_EVENTS_MAX as u64 + 2;
        assert_eq!(reg.publish(&[delivery(next, 1, "alice")]), 1);
        assert_eq!(reg.len(), 0);
        assert_eq!(
            rx.try_iter().map(|b| b.len()).sum::<usize>(),
            big.len(),
            "what was sent stays deliverable"
        );
    }
}
