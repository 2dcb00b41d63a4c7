//! The scheduler: learns what is runnable from the log, decides what runs next, routes each
//! job to an executor, and keeps the number of running jobs under `max_concurrent_jobs`.
//!
//! Threads, and why each exists:
//! - feed (`feed.rs`): follows the log subscription and forwards the few events that matter;
//! - scheduler: owns the queue, the timers (`timers.rs`) and the table of running jobs; it
//!   sleeps until the next message or the next due timer, but at most
//!   [`SCHEDULER_BEAT_INTERVAL_MS`]: each turn counts a beat, so that a watchdog can tell an
//!   idle scheduler from a stuck one (`Workers::scheduler_beats`), and looks again at a queue
//!   held back while the store refuses writes (nothing else says when it takes them again).
//!
//! Jobs whose thread is gone (a previous server's, or a panicked one) are failed by
//! `recovery.rs`, so they retry.
//!
//! On a store shared by several nodes: a commission is claimed before its job is spawned
//! (`EventStore::claim`), so one node alone spawns it; the maintainer fails the jobs of nodes
//! whose lease lapsed every [`RESCUE_INTERVAL_MS`] and looks again at every live commission
//! every [`RESCAN_INTERVAL_MS`] (a node that died holding a claim left it to no one); and a
//! node that lost its own lease ends its jobs at once and takes a new lease only once they
//! are all gone.

mod feed;
mod messages;
pub(crate) mod recovery;
#[cfg(feature = "test-faults")]
mod stall;
mod timers;

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use atelier_engine::time::Millis;
use atelier_engine::{Command, Commission, EventKind, Executor, Rejection, State};
use atelier_storage::{execute, Subscription};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use self::messages::SchedMsg;
use self::timers::{TimerKind, Timers};
use crate::error::{io_err, WorkersError};
use crate::executor::process::ProcessExecutor;
use crate::executor::signal::{JobSignal, Request};
use crate::executor::task_runner::{runs_programs, TaskJob};
use crate::session::{ctx, now_ms};
use crate::shared::Shared;

/// How long `shutdown` waits for jobs beyond the kill grace before giving up on them.
const SHUTDOWN_SLACK_MS: u64 = 5_000;
/// The longest the scheduler sleeps before it goes round its loop again, idle included, so
/// that its beat count keeps moving while it is alive. While the store refuses writes (a full
/// disk) no job starts (it could record neither its start nor its end), and this is also how
/// soon a held queue is looked at again. A wake-up with nothing due costs a look at the
/// store's health and the empty queue.
pub const SCHEDULER_BEAT_INTERVAL_MS: u64 = 100;

/// How often the maintainer of a shared store fails the jobs of lost nodes: a lost node's
/// jobs move on within its lease and this.
pub const RESCUE_INTERVAL_MS: u64 = 1_000;
/// How often the maintainer of a shared store looks again at every live commission, for
/// runnable ones no live node holds.
pub const RESCAN_INTERVAL_MS: u64 = 5_000;

/// Tells the scheduler a job is over when dropped, on every path out of the job thread.
struct DoneGuard(Sender<SchedMsg>, u64);

impl Drop for DoneGuard {
    fn drop(&mut self) {
        let panicked = std::thread::panicking();
        let _ = self.0.send(SchedMsg::JobDone { commission_id: self.1, panicked });
    }
}

struct Running {
    signal: Arc<JobSignal>,
    thread: Option<JoinHandle<()>>,
    /// The commission's attempt count when the job was handed out: unchanged after a panic
    /// means the job never started.
    attempt: u32,
}

struct Scheduler {
    shared: Arc<Shared>,
    rx: Receiver<SchedMsg>,
    done_tx: Sender<SchedMsg>,
    process: Arc<ProcessExecutor>,
    task_tx: Sender<TaskJob>,
    /// Runnable, not yet started: highest priority first, then lowest id.
    queue: BTreeSet<(Reverse<i32>, u64)>,
    queued: HashMap<u64, i32>,
    timers: Timers,
    running: HashMap<u64, Running>,
    /// Turns round the loop (`Workers::scheduler_beats`).
    beats: Arc<AtomicU64>,
    /// When the maintainer next rescues lost jobs and rescans (shared stores only).
    next_rescue: Instant,
    next_rescan: Instant,
    /// This node lost its lease and is ending its jobs (see the module docs).
    abandoning: bool,
    #[cfg(feature = "test-faults")]
    stall: Option<stall::Stall>,
}

impl Scheduler {
    fn run(mut self) {
        loop {
            // Every turn, idle ones included: a watchdog tells a stuck scheduler by this stopping.
            self.beats.fetch_add(1, Ordering::Relaxed);
            #[cfg(feature = "test-faults")]
            if self.stall.as_ref().is_some_and(stall::Stall::block_if_due) {
                self.stall = None;
            }
            let due =
                self.timers.next_due().map(|due| u64::try_from(due.saturating_sub(now_ms())).unwrap_or(0));
            let wait_ms = due.unwrap_or(u64::MAX);
            let msg = self.rx.recv_timeout(Duration::from_millis(wait_ms.min(SCHEDULER_BEAT_INTERVAL_MS)));
            match msg {
                Ok(SchedMsg::Shutdown) | Err(RecvTimeoutError::Disconnected) => break,
                Ok(m) => self.handle(m),
                Err(RecvTimeoutError::Timeout) => {}
            }
            self.mind_the_lease();
            self.fire_timers();
            self.maintain();
            self.dispatch();
        }
        self.stop_all();
    }

    /// A node that lost its lease ends every job at once (another node takes them over), and
    /// takes a new lease once none is left; back with one, it looks at every live commission
    /// again (its queue went with the jobs).
    fn mind_the_lease(&mut self) {
        if self.shared.store.lease_lost() {
            if !self.abandoning {
                self.abandoning = true;
                for r in self.running.values() {
                    r.signal.raise(Request::Abandon);
                }
                self.queue.clear();
                self.queued.clear();
            }
            if self.running.is_empty() {
                self.shared.store.rejoin();
            }
        } else if self.abandoning {
            self.abandoning = false;
            self.handle(SchedMsg::Rescan);
        }
    }

    /// The maintainer's rounds on a shared store (see the module docs).
    fn maintain(&mut self) {
        let store = &self.shared.store;
        if store.node_id().is_none() || !store.is_maintainer() || self.shared.stopping.load(Ordering::Acquire)
        {
            return;
        }
        let now = Instant::now();
        if now >= self.next_rescue {
            self.next_rescue = now + Duration::from_millis(RESCUE_INTERVAL_MS);
            if let Err(e) = recovery::rescue(&self.shared) {
                tracing::warn!(error = %e, "cannot look for lost jobs");
            }
        }
        if now >= self.next_rescan {
            self.next_rescan = now + Duration::from_millis(RESCAN_INTERVAL_MS);
            self.handle(SchedMsg::Rescan);
        }
    }

    fn handle(&mut self, msg: SchedMsg) {
        match msg {
            SchedMsg::Event { commission_id, kind, next_retry_at } => match kind {
                EventKind::Created | EventKind::RetryDue | EventKind::RetryRequested => {
                    self.consider(commission_id)
                }
                EventKind::AttemptFailed => {
                    if let Some(t) = next_retry_at {
                        self.add_timer((t, commission_id, TimerKind::RetryDue));
                    }
                }
                EventKind::CancelRequested => {
                    if let Some(r) = self.running.get(&commission_id) {
                        tracing::info!(commission = commission_id, "cancel requested; stopping its job");
                        r.signal.raise(Request::Cancel);
                    }
                }
                k if k.is_terminal() => self.unqueue(commission_id),
                _ => {}
            },
            SchedMsg::Rescan => match self.shared.store.live_commissions() {
                Ok(list) => {
                    for c in list {
                        self.consider_snapshot(&c);
                    }
                }
                Err(e) => tracing::error!(error = %e, "cannot list live commissions"),
            },
            SchedMsg::JobDone { commission_id, panicked } => self.job_done(commission_id, panicked),
            SchedMsg::Shutdown => {}
        }
    }

    fn add_timer(&mut self, t: (Millis, u64, TimerKind)) {
        self.timers.add(t);
    }

    fn job_done(&mut self, commission_id: u64, panicked: bool) {
        let mut attempt_at_start = None;
        if let Some(mut r) = self.running.remove(&commission_id) {
            if let Some(t) = r.thread.take() {
                let _ = t.join();
            }
            attempt_at_start = Some(r.attempt);
        }
        // On shutdown the next start fails it, as for every job the stop interrupted.
        if panicked && !self.shared.stopping.load(Ordering::Acquire) {
            recovery::after_panic(&self.shared, commission_id, attempt_at_start);
        }
        // A retry that became due while the job was still winding down.
        self.consider(commission_id);
    }

    fn unqueue(&mut self, id: u64) {
        if let Some(p) = self.queued.remove(&id) {
            self.queue.remove(&(Reverse(p), id));
        }
    }

    fn consider(&mut self, id: u64) {
        match self.shared.store.commission(id) {
            Ok(Some(c)) => self.consider_snapshot(&c),
            Ok(None) => {}
            Err(e) => tracing::error!(commission = id, error = %e, "cannot read commission"),
        }
    }

    fn consider_snapshot(&mut self, c: &Commission) {
        if self.running.contains_key(&c.id) {
            return;
        }
        match c.state {
            State::Created => match c.scheduled_for {
                Some(t) if t > now_ms() => self.add_timer((t, c.id, TimerKind::Scheduled)),
                _ => {
                    if self.queued.insert(c.id, c.priority).is_none() {
                        self.queue.insert((Reverse(c.priority), c.id));
                    }
                }
            },
            State::Retrying => {
                let t = c.next_retry_at.unwrap_or_else(now_ms);
                self.add_timer((t, c.id, TimerKind::RetryDue));
            }
            _ => self.unqueue(c.id),
        }
    }

    fn fire_timers(&mut self) {
        let now = now_ms();
        while let Some((_, id, kind)) = self.timers.pop_due(now) {
            match kind {
                TimerKind::Scheduled => self.consider(id),
                TimerKind::RetryDue => {
                    match execute(&*self.shared.store, id, Command::RetryDue, &ctx(self.shared.config.retry))
                    {
                        // The RetryDue event comes back through the feed and queues it.
                        Ok(Ok(_)) => {}
                        Ok(Err(Rejection::RetryNotDue { next_retry_at })) => {
                            self.add_timer((next_retry_at, id, TimerKind::RetryDue));
                        }
                        Ok(Err(_)) => {} // cancelled or retried by hand meanwhile
                        Err(e) => tracing::error!(commission = id, error = %e, "cannot append retry_due"),
                    }
                }
            }
        }
    }

    fn dispatch(&mut self) {
        if let Err(why) = self.shared.store.health() {
            if !self.queue.is_empty() {
                tracing::debug!(error = %why, "the store refuses writes; no job starts");
            }
            return;
        }
        while self.running.len() < self.shared.config.max_concurrent_jobs
            && !self.shared.stopping.load(Ordering::Acquire)
        {
            let Some((Reverse(p), id)) = self.queue.pop_first() else { break };
            let ready = Instant::now();
            self.queued.remove(&id);
            let c = match self.shared.store.commission(id) {
                Ok(Some(c)) => c,
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!(commission = id, error = %e, "cannot read commission");
                    continue;
                }
            };
            if !c.is_runnable(now_ms()) || c.active_job.is_some() || c.cancel_requested {
                continue;
            }
            // On a shared store, one node spawns each attempt: the others let it go.
            match self.shared.store.claim(id, c.version) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    tracing::warn!(commission = id, error = %e, "cannot claim a commission");
                    continue;
                }
            }
            debug_assert_eq!(p, c.priority);
            tracing::debug!(commission = id, "dispatching");
            let routed = self.shared.with_router(|r, cfg| r.route(cfg, id, Instant::now()));
            // The task runner runs no programs: a pipeline that does goes to the job controller
            // whenever it is enabled, through a rollback or outside the rollout too.
            let executor = match routed {
                Executor::TaskRunner
                    if self.shared.config.use_job_controller
                        && self.shared.pipeline(&c.pipeline).and_then(runs_programs).is_some() =>
                {
                    Executor::JobController
                }
                other => other,
            };
            self.shared.metrics.routed(executor);
            let started = self.start(c, executor, ready);
            match started {
                Ok(r) => {
                    self.running.insert(id, r);
                }
                Err(e) => tracing::error!(commission = id, error = %e, "cannot start a job"),
            }
        }
    }

    /// Starts `c`'s job; `ready` is when it got its slot (for the pickup metric).
    fn start(&self, c: Commission, executor: Executor, ready: Instant) -> Result<Running, WorkersError> {
        let (id, attempt) = (c.id, c.attempt);
        match executor {
            Executor::JobController => {
                let signal = Arc::new(JobSignal::with_pipe().map_err(io_err("wake pipe"))?);
                let (shared, sig, done) = (self.shared.clone(), signal.clone(), self.done_tx.clone());
                let process = self.process.clone();
                let thread = std::thread::Builder::new()
                    .name(format!("atelier-job-{id}"))
                    .spawn(move || {
                        // Even if the job code panics (a bug), the slot must be freed.
                        let _done = DoneGuard(done, id);
                        process.run_job(&shared, c, &sig, ready);
                    })
                    .map_err(io_err("job thread"))?;
                Ok(Running { signal, thread: Some(thread), attempt })
            }
            Executor::TaskRunner => {
                let signal = Arc::new(JobSignal::plain());
                let done = self.done_tx.clone();
                let job = TaskJob {
                    commission: c,
                    signal: signal.clone(),
                    done: Box::new(move |panicked| {
                        let _ = done.send(SchedMsg::JobDone { commission_id: id, panicked });
                    }),
                };
                self.task_tx.send(job).map_err(|_| WorkersError::Io {
                    context: "task runner".into(),
                    source: std::io::Error::other("the task runner is gone"),
                })?;
                Ok(Running { signal, thread: None, attempt })
            }
        }
    }

    /// Asks every running job to stop and waits for them (bounded).
    fn stop_all(&mut self) {
        for r in self.running.values() {
            r.signal.raise(Request::Shutdown);
        }
        let deadline =
            Instant::now() + Duration::from_millis(self.shared.config.kill_grace_ms + SHUTDOWN_SLACK_MS);
        while !self.running.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(SchedMsg::JobDone { commission_id, .. }) => {
                    if let Some(mut r) = self.running.remove(&commission_id) {
                        if let Some(t) = r.thread.take() {
                            let _ = t.join();
                        }
                    }
                }
                Ok(_) => {}
                Err(_) => {
                    tracing::warn!(left = self.running.len(), "jobs did not stop in time");
                    break;
                }
            }
        }
    }
}

/// The scheduler and its feed, running.
pub(crate) struct SchedulerThreads {
    tx: Sender<SchedMsg>,
    scheduler: Option<JoinHandle<()>>,
    feed: Option<JoinHandle<()>>,
    /// The scheduler's turns round its loop.
    pub(crate) beats: Arc<AtomicU64>,
}

impl SchedulerThreads {
    /// Starts the scheduler (which rescans every live commission first) and its feed on
    /// `sub`, a subscription taken before the live set was read.
    pub(crate) fn start(
        shared: Arc<Shared>,
        process: Arc<ProcessExecutor>,
        task_tx: Sender<TaskJob>,
        sub: Subscription,
    ) -> Result<SchedulerThreads, WorkersError> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let beats = Arc::new(AtomicU64::new(0));
        let scheduler = Scheduler {
            shared: shared.clone(),
            rx,
            done_tx: tx.clone(),
            process,
            task_tx,
            queue: BTreeSet::new(),
            queued: HashMap::new(),
            timers: Timers::default(),
            running: HashMap::new(),
            beats: beats.clone(),
            next_rescue: Instant::now(),
            next_rescan: Instant::now() + Duration::from_millis(RESCAN_INTERVAL_MS),
            abandoning: false,
            #[cfg(feature = "test-faults")]
            stall: stall::Stall::from_env(),
        };
        let _ = tx.send(SchedMsg::Rescan);
        let scheduler = std::thread::Builder::new()
            .name("atelier-scheduler".into())
            .spawn(move || scheduler.run())
            .map_err(io_err("start thread atelier-scheduler"))?;
        let feed_tx = tx.clone();
        let feed = std::thread::Builder::new()
            .name("atelier-feed".into())
            .spawn(move || feed::feed_loop(shared, sub, feed_tx))
            .map_err(io_err("start thread atelier-feed"))?;
        Ok(SchedulerThreads { tx, scheduler: Some(scheduler), feed: Some(feed), beats })
    }

    pub(crate) fn is_running(&self) -> bool {
        [&self.scheduler, &self.feed].iter().all(|h| h.as_ref().is_some_and(|h| !h.is_finished()))
    }

    /// Stops the scheduler, which stops its jobs before it returns; then nothing is
    /// dispatched any more. The feed is joined by [`SchedulerThreads::join_feed`], after the
    /// executors (it ends once it sees `stopping`).
    pub(crate) fn stop(&mut self) {
        let _ = self.tx.send(SchedMsg::Shutdown);
        if let Some(t) = self.scheduler.take() {
            let _ = t.join();
        }
    }

    pub(crate) fn join_feed(&mut self) {
        if let Some(t) = self.feed.take() {
            let _ = t.join();
        }
    }
}
