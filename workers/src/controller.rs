//! The controller: learns what is runnable from the log, decides what runs next, routes each
//! job to an executor, and keeps the number of running jobs under `max_concurrent_jobs`.
//!
//! Threads, and why each exists:
//! - feed: follows the log subscription and forwards the few events that matter;
//! - scheduler: owns the queue, the timers (a heap of due instants: `scheduled_for`,
//!   `next_retry_at`) and the table of running jobs; it sleeps until the next message or the
//!   next due timer, never on a polling interval;
//! - spawner: the one thread that spawns worker processes (PDEATHSIG is tied to it);
//! - one thread per process job, watching it (see `process.rs`);
//! - the task runner's pool, running jobs in-process.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use atelier_engine::time::Millis;
use atelier_engine::{Command, Commission, Event, EventKind, Executor, JobStatus, Rejection, State};
use atelier_storage::{execute, EventStore, Filter, StorageError, Subscription, SubscriptionEnd};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::config::{PipelineConfig, WorkersConfig};
use crate::metrics::{idx, Metrics};
use crate::pipeline::JobInput;
use crate::process::{self, Applied, JobSignal, Request, SpawnRequest, Watched, MEMORY_ERROR_PREFIX};
use crate::session::{ctx, job_end, now_ms, record_finish, Finish, Session};
use crate::task_runner::{self, TaskJob};
use crate::trampoline::TrampolineArgs;
use crate::worker::WorkerArgs;

/// How often the feed thread looks up from the subscription to see whether it should stop.
const FEED_WAKE_MS: u64 = 200;
/// How long `shutdown` waits for jobs beyond the kill grace before giving up on them.
const SHUTDOWN_SLACK_MS: u64 = 5_000;
/// How long a spawn may take before the job counts it as failed.
const SPAWN_REPLY_TIMEOUT_MS: u64 = 30_000;
/// PATH given to workers when the server has none.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";
/// Hidden, for benchmarks: this many MiB of touched memory held by the controller, to show
/// that starting a worker does not get slower as the server grows (see BENCHMARKS.md).
const BALLAST_ENV: &str = "ATELIER_BALLAST_MB";
/// The ballast is cut to this.
const BALLAST_MB_MAX: usize = 64 * 1024;
/// Under `data_dir/jobs/`: the pipeline specs workers read (see `pipeline_file`).
const PIPELINES_DIR: &str = "pipelines";

#[derive(Debug)]
pub enum WorkersError {
    Storage(StorageError),
    Io { context: String, source: std::io::Error },
}

impl std::fmt::Display for WorkersError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WorkersError::Storage(e) => write!(f, "workers: {e}"),
            WorkersError::Io { context, source } => write!(f, "workers: {context}: {source}"),
        }
    }
}

impl std::error::Error for WorkersError {}

impl From<StorageError> for WorkersError {
    fn from(e: StorageError) -> Self {
        WorkersError::Storage(e)
    }
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> WorkersError {
    let context = context.into();
    move |source| WorkersError::Io { context, source }
}

/// Paths of a job's captured stdout and stderr.
pub fn job_log_paths(data_dir: &Path, job_id: u64) -> (PathBuf, PathBuf) {
    let dir = job_dir(data_dir, job_id);
    (dir.join("stdout.log"), dir.join("stderr.log"))
}

/// Where every job's working dir lives (and the pipeline specs, under [`PIPELINES_DIR`]).
pub(crate) fn jobs_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("jobs")
}

pub(crate) fn job_dir(data_dir: &Path, job_id: u64) -> PathBuf {
    jobs_dir(data_dir).join(job_id.to_string())
}

pub(crate) fn artifacts_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("artifacts")
}

/// Why the router rolled back to the task runner (the `reason` label of
/// `atelier_rollbacks_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RollbackReason {
    // The discriminants index the counters, in `ALL` order.
    FailureRate = 0,
    Slow = 1,
    SpawnFailed = 2,
}

impl RollbackReason {
    pub(crate) const ALL: [RollbackReason; 3] =
        [RollbackReason::FailureRate, RollbackReason::Slow, RollbackReason::SpawnFailed];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            RollbackReason::FailureRate => "failure_rate",
            RollbackReason::Slow => "slow",
            RollbackReason::SpawnFailed => "spawn_failed",
        }
    }
}

/// Decides which executor takes a job, and rolls back to the task runner when the job
/// controller fails too often, is much slower than the task runner, or cannot spawn.
pub(crate) struct Router {
    /// Recent controller jobs: true for a failure of the controller's own machinery.
    window: VecDeque<bool>,
    /// Wall times of recent succeeded jobs, per executor (`idx`).
    took: [VecDeque<Duration>; 2],
    rollback_until: Option<Instant>,
    /// Where each rollback is counted, by reason.
    metrics: Arc<Metrics>,
}

fn median(v: &VecDeque<Duration>) -> Option<Duration> {
    let mut sorted: Vec<Duration> = v.iter().copied().collect();
    sorted.sort_unstable();
    sorted.get(sorted.len() / 2).copied()
}

impl Router {
    fn new(metrics: Arc<Metrics>) -> Router {
        Router {
            window: VecDeque::new(),
            took: [VecDeque::new(), VecDeque::new()],
            rollback_until: None,
            metrics,
        }
    }

    fn rollback_active(&mut self, cfg: &WorkersConfig, now: Instant) -> bool {
        match self.rollback_until {
            Some(t) if now < t && cfg.auto_rollback => true,
            Some(_) => {
                // The cooldown is over: the controller gets traffic again, judged afresh.
                self.rollback_until = None;
                self.window.clear();
                self.took[idx(Executor::JobController)].clear();
                tracing::info!("the rollback is over; the job controller takes work again");
                false
            }
            None => false,
        }
    }

    pub(crate) fn route(&mut self, cfg: &WorkersConfig, commission_id: u64, now: Instant) -> Executor {
        let rolled_back = self.rollback_active(cfg, now);
        let in_rollout = cfg.job_controller_rollout_percent >= 100
            || atelier_engine::retry::splitmix64(commission_id) % 100
                < u64::from(cfg.job_controller_rollout_percent);
        let controller = cfg.use_job_controller && !rolled_back && in_rollout;
        match (controller, cfg.keep_task_runner) {
            (true, true) if cfg.task_runner_priority > cfg.job_controller_priority => Executor::TaskRunner,
            (true, _) => Executor::JobController,
            (false, true) => Executor::TaskRunner,
            // Nowhere else to go: the controller takes it even while rolled back.
            (false, false) => Executor::JobController,
        }
    }

    fn trip(&mut self, cfg: &WorkersConfig, now: Instant, reason: RollbackReason, why: &str) {
        if !cfg.auto_rollback || !cfg.keep_task_runner {
            return;
        }
        if self.rollback_until.is_none() {
            tracing::warn!(
                reason = reason.as_str(),
                why,
                cooldown_ms = cfg.rollback_cooldown_ms,
                "rolling back to the task runner"
            );
            self.metrics.rolled_back(reason);
        }
        self.rollback_until = Some(now + Duration::from_millis(cfg.rollback_cooldown_ms));
        self.window.clear();
        self.took[idx(Executor::JobController)].clear();
    }

    /// A controller job ended: `infra_failure` if the controller's own machinery failed it,
    /// `took` its wall time if it succeeded.
    pub(crate) fn record(
        &mut self,
        cfg: &WorkersConfig,
        infra_failure: bool,
        took: Option<Duration>,
        now: Instant,
    ) {
        let window_max = usize::try_from(cfg.rollback_window_jobs).unwrap_or(usize::MAX);
        self.window.push_back(infra_failure);
        while self.window.len() > window_max {
            self.window.pop_front();
        }
        let n = self.window.len() as u64;
        let failed = self.window.iter().filter(|f| **f).count() as u64;
        if n >= u64::from(cfg.rollback_min_jobs)
            && failed * 100 > u64::from(cfg.rollback_failure_rate_percent) * n
        {
            self.trip(
                cfg,
                now,
                RollbackReason::FailureRate,
                &format!("{failed} of the last {n} controller jobs failed"),
            );
            return;
        }
        if let Some(took) = took {
            self.record_took(cfg, Executor::JobController, took, now);
        }
    }

    /// A job succeeded in `took`; judges the controller's speed against the task runner's.
    pub(crate) fn record_took(
        &mut self,
        cfg: &WorkersConfig,
        executor: Executor,
        took: Duration,
        now: Instant,
    ) {
        let window_max = usize::try_from(cfg.rollback_window_jobs).unwrap_or(usize::MAX);
        let times = &mut self.took[idx(executor)];
        times.push_back(took);
        while times.len() > window_max {
            times.pop_front();
        }
        let min = usize::try_from(cfg.rollback_min_jobs).unwrap_or(usize::MAX);
        let [controller, runner] = &self.took;
        if cfg.rollback_slowdown_percent == 0 || controller.len() < min || runner.len() < min {
            return;
        }
        let (Some(c), Some(r)) = (median(controller), median(runner)) else { return };
        if c.as_micros() * 100 > r.as_micros() * u128::from(cfg.rollback_slowdown_percent) {
            let why = format!(
                "the controller's median job time {} ms is over {}% of the task runner's {} ms",
                c.as_millis(),
                cfg.rollback_slowdown_percent,
                r.as_millis()
            );
            self.trip(cfg, now, RollbackReason::Slow, &why);
        }
    }

    pub(crate) fn spawn_failed(&mut self, cfg: &WorkersConfig, now: Instant) {
        self.trip(cfg, now, RollbackReason::SpawnFailed, "the job controller cannot spawn workers");
    }
}

/// What every thread of the workers shares.
pub(crate) struct Shared {
    pub(crate) store: Arc<dyn EventStore>,
    pub(crate) config: WorkersConfig,
    pub(crate) data_dir: PathBuf,
    pub(crate) exe: PathBuf,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) router: Mutex<Router>,
    pub(crate) stopping: AtomicBool,
    spawn_tx: Mutex<Option<Sender<SpawnRequest>>>,
    server_pid: u32,
}

impl Shared {
    pub(crate) fn with_router<T>(&self, f: impl FnOnce(&mut Router, &WorkersConfig) -> T) -> T {
        let mut r = self.router.lock().unwrap_or_else(|p| p.into_inner());
        let out = f(&mut r, &self.config);
        let active = r.rollback_until.is_some_and(|t| Instant::now() < t);
        self.metrics.rollback_active.store(active && self.config.auto_rollback, Ordering::Relaxed);
        out
    }

    pub(crate) fn progress_interval(&self) -> Duration {
        Duration::from_millis(self.config.progress_update_interval_ms)
    }

    /// The pipeline a commission names, if configured.
    pub(crate) fn pipeline(&self, name: &str) -> Option<&PipelineConfig> {
        self.config.pipelines.get(name)
    }

    /// A fresh job id and the commission's pipeline; `None` (with the reason logged, or the
    /// attempt failed for an unknown pipeline) when the job cannot begin.
    pub(crate) fn begin_job(&self, c: &Commission, executor: Executor) -> Option<(u64, PipelineConfig)> {
        let job_id = match self.store.allocate_job_id() {
            Ok(id) => id,
            Err(e) => {
                tracing::error!(commission = c.id, error = %e, "cannot allocate a job id");
                return None;
            }
        };
        let Some(p) = self.pipeline(&c.pipeline).cloned() else {
            self.fail_unstarted(c, job_id, executor, format!("unknown pipeline '{}'", c.pipeline), false);
            return None;
        };
        Some((job_id, p))
    }

    /// Starts the attempt with no process (spawn failed or nothing to spawn) and fails it.
    pub(crate) fn fail_unstarted(
        &self,
        c: &Commission,
        job_id: u64,
        executor: Executor,
        error: String,
        retryable: bool,
    ) {
        let start = Command::StartJob { job_id, executor, job_name: c.pipeline.clone(), pid: None };
        match execute(&*self.store, c.id, start, &ctx(self.config.retry)) {
            Ok(Ok(_)) => {}
            Ok(Err(r)) => {
                tracing::info!(commission = c.id, job = job_id, rejection = %r, "not started");
                return;
            }
            Err(e) => {
                tracing::error!(commission = c.id, job = job_id, error = %e, "cannot start job");
                return;
            }
        }
        let end = job_end(job_id, JobStatus::Failed, Some(error.clone()));
        self.metrics.job_started(executor);
        self.metrics.job_finished(executor, "not_started", Duration::ZERO);
        record_finish(
            &*self.store,
            self.config.retry,
            c.id,
            executor,
            Vec::new(),
            Finish::Fail { error, retryable, end },
        );
    }
}

/// Messages to the scheduler thread.
enum SchedMsg {
    Event {
        commission_id: u64,
        kind: EventKind,
        next_retry_at: Option<Millis>,
    },
    /// Look at every live commission again (at start, and after the feed lost events).
    Rescan,
    /// A job's code is done; `panicked`: it ended in a panic (a bug), so its end may not be
    /// on record.
    JobDone {
        commission_id: u64,
        panicked: bool,
    },
    Shutdown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum TimerKind {
    /// `scheduled_for` is reached: the commission may run.
    Scheduled,
    /// `next_retry_at` is reached: append RetryDue.
    RetryDue,
}

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
    task_tx: Sender<TaskJob>,
    /// Runnable, not yet started: highest priority first, then lowest id.
    queue: BTreeSet<(Reverse<i32>, u64)>,
    queued: HashMap<u64, i32>,
    timers: BinaryHeap<Reverse<(Millis, u64, TimerKind)>>,
    /// The timers in the heap, so a rescan does not add the same one again.
    timer_set: HashSet<(Millis, u64, TimerKind)>,
    running: HashMap<u64, Running>,
}

impl Scheduler {
    fn run(mut self) {
        loop {
            let msg = match self.timers.peek() {
                None => self.rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                Some(Reverse((due, _, _))) => {
                    let wait_ms = u64::try_from(due.saturating_sub(now_ms())).unwrap_or(0);
                    self.rx.recv_timeout(Duration::from_millis(wait_ms))
                }
            };
            match msg {
                Ok(SchedMsg::Shutdown) | Err(RecvTimeoutError::Disconnected) => break,
                Ok(m) => self.handle(m),
                Err(RecvTimeoutError::Timeout) => {}
            }
            self.fire_timers();
            self.dispatch();
        }
        self.stop_all();
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
            SchedMsg::JobDone { commission_id, panicked } => {
                let mut attempt_at_start = None;
                if let Some(mut r) = self.running.remove(&commission_id) {
                    if let Some(t) = r.thread.take() {
                        let _ = t.join();
                    }
                    attempt_at_start = Some(r.attempt);
                }
                // A job whose code panicked may have left its end unrecorded: fail the attempt
                // now, not at the next start, so no commission stays running without a job.
                // (On shutdown the next start does it, as for every job the stop interrupted.)
                if panicked && !self.shared.stopping.load(Ordering::Acquire) {
                    match self.shared.store.commission(commission_id) {
                        Ok(Some(c)) if c.state.is_running() && c.active_job.is_some() => {
                            fail_lost_job(
                                &self.shared,
                                &c,
                                "the server lost track of the job (an internal error)",
                            );
                        }
                        // It panicked before the job started: an attempt that fails (with
                        // backoff, counted), not an instant retry in a loop.
                        Ok(Some(c)) if Some(c.attempt) == attempt_at_start && !c.state.is_terminal() => {
                            let executor = Executor::JobController;
                            if let Some((job_id, _)) = self.shared.begin_job(&c, executor) {
                                let error =
                                    "the server failed to start the job (an internal error)".to_string();
                                self.shared.fail_unstarted(&c, job_id, executor, error, true);
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::error!(commission = commission_id, error = %e, "cannot check the finished job's commission")
                        }
                    }
                }
                // A retry that became due while the job was still winding down.
                self.consider(commission_id);
            }
            SchedMsg::Shutdown => {}
        }
    }

    fn add_timer(&mut self, t: (Millis, u64, TimerKind)) {
        if self.timer_set.insert(t) {
            self.timers.push(Reverse(t));
        }
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
        while let Some(Reverse((due, id, kind))) = self.timers.peek().copied() {
            if due > now {
                break;
            }
            self.timers.pop();
            self.timer_set.remove(&(due, id, kind));
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
            debug_assert_eq!(p, c.priority);
            tracing::debug!(commission = id, "dispatching");
            let executor = self.shared.with_router(|r, cfg| r.route(cfg, id, Instant::now()));
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
                let thread = std::thread::Builder::new()
                    .name(format!("atelier-job-{id}"))
                    .spawn(move || {
                        // Even if the job code panics (a bug), the slot must be freed.
                        let _done = DoneGuard(done, id);
                        run_process_job(&shared, c, &sig, ready);
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

/// Follows the log and forwards what the scheduler needs.
fn feed_loop(shared: Arc<Shared>, mut sub: Subscription, tx: Sender<SchedMsg>) {
    loop {
        if shared.stopping.load(Ordering::Acquire) {
            return;
        }
        match sub.next_timeout(Duration::from_millis(FEED_WAKE_MS)) {
            Ok(Some(d)) => {
                let next_retry_at = match &d.env.event {
                    Event::AttemptFailed { next_retry_at, .. } => Some(*next_retry_at),
                    _ => None,
                };
                let kind = d.env.event.kind();
                let wanted = matches!(
                    kind,
                    EventKind::Created
                        | EventKind::RetryDue
                        | EventKind::RetryRequested
                        | EventKind::AttemptFailed
                        | EventKind::CancelRequested
                ) || kind.is_terminal();
                if wanted
                    && tx
                        .send(SchedMsg::Event { commission_id: d.env.commission_id, kind, next_retry_at })
                        .is_err()
                {
                    return;
                }
            }
            Ok(None) => {}
            Err(SubscriptionEnd::Closed) => return,
            Err(end) => {
                let after = match end {
                    SubscriptionEnd::Overflow { last_seq } => last_seq,
                    _ => sub.last_seq(),
                };
                tracing::warn!(?end, after, "log subscription ended; resubscribing");
                loop {
                    if shared.stopping.load(Ordering::Acquire) {
                        return;
                    }
                    match shared.store.subscribe(after, Filter::All) {
                        Ok(s) => {
                            sub = s;
                            break;
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "cannot resubscribe");
                            std::thread::sleep(Duration::from_millis(1000));
                        }
                    }
                }
                let _ = tx.send(SchedMsg::Rescan);
            }
        }
    }
}

/// Kills what a previous server left running and fails those attempts so they retry.
fn reconcile(shared: &Shared) -> Result<(), WorkersError> {
    for c in shared.store.live_commissions()? {
        if c.state.is_running() && c.active_job.is_some() {
            fail_lost_job(shared, &c, "server restarted");
        }
    }
    Ok(())
}

/// Fails the attempt of `c`'s active job, which no thread of this server runs (a previous
/// server's, or one whose thread ended without recording it): its process group is killed
/// if it is still there, and the attempt is retried.
fn fail_lost_job(shared: &Shared, c: &Commission, error: &str) {
    let Some(job_id) = c.active_job else { return };
    let executor = match shared.store.job(job_id) {
        Ok(Some(job)) => {
            if let (Executor::JobController, Some(pid)) = (job.executor, job.process_id) {
                kill_leftover_group(pid, job_id);
            }
            job.executor
        }
        _ => Executor::JobController,
    };
    let end = job_end(job_id, JobStatus::Killed, Some(error.to_string()));
    tracing::warn!(
        commission = c.id,
        job = job_id,
        reason = error,
        "a job without a thread; failing the attempt"
    );
    let fail = Finish::Fail { error: error.to_string(), retryable: true, end };
    record_finish(&*shared.store, shared.config.retry, c.id, executor, Vec::new(), fail);
}

/// Kills the process group `pid` led, but only if it is still ours: a live leader must carry
/// our job id in its environment (the pid may have been reused); with the leader gone, a
/// group of that id can only be the job's own leftovers (Linux reuses no pid still used as a
/// group id).
fn kill_leftover_group(pid: u32, job_id: u64) {
    let Ok(pgid) = i32::try_from(pid) else { return };
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    if proc_dir.exists() {
        let marker = format!("ATELIER_JOB_ID={job_id}");
        let ours = std::fs::read(proc_dir.join("environ"))
            .map(|env| env.split(|b| *b == 0).any(|v| v == marker.as_bytes()))
            .unwrap_or(false);
        if !ours {
            return;
        }
    }
    match nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), nix::sys::signal::Signal::SIGKILL) {
        Ok(()) => tracing::warn!(job = job_id, pgid, "killed the process group of a previous server's job"),
        Err(nix::errno::Errno::ESRCH) => {}
        Err(e) => tracing::warn!(job = job_id, pgid, error = %e, "cannot kill a previous server's job"),
    }
}

/// Memory for this attempt: the pipeline's, doubled once for each memory-limit failure in a
/// row just before it, up to the cap.
fn attempt_memory_mb(store: &dyn EventStore, commission_id: u64, p: &PipelineConfig) -> u64 {
    let jobs = store.jobs_of(commission_id).unwrap_or_default();
    let mut mb = p.limits.memory_mb;
    for job in jobs.iter().rev() {
        match &job.error_message {
            Some(e) if e.starts_with(MEMORY_ERROR_PREFIX) => mb = (mb * 2).min(p.limits.memory_max_mb),
            _ => break,
        }
    }
    mb
}

fn worker_env(
    shared: &Shared,
    p: &PipelineConfig,
    c: &Commission,
    job_id: u64,
    dir: &Path,
) -> Vec<(String, String)> {
    let mut env = vec![(
        "PATH".to_string(),
        std::env::var("PATH").ok().filter(|p| !p.is_empty()).unwrap_or_else(|| DEFAULT_PATH.to_string()),
    )];
    for name in &p.pass_env {
        if let Ok(v) = std::env::var(name) {
            env.push((name.clone(), v));
        }
    }
    env.extend(p.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.extend([
        ("ATELIER_JOB_ID".to_string(), job_id.to_string()),
        ("ATELIER_COMMISSION_ID".to_string(), c.id.to_string()),
        ("ATELIER_ATTEMPT".to_string(), (c.attempt + 1).to_string()),
        ("ATELIER_JOB_DIR".to_string(), dir.display().to_string()),
        ("ATELIER_ARTIFACTS_DIR".to_string(), artifacts_dir(&shared.data_dir).display().to_string()),
        ("ATELIER_PROTOCOL_FD".to_string(), "3".to_string()),
    ]);
    env
}

/// The job's dir (not created here: see `RunEnv::make_job_dir`) and what the job runs on. The
/// input is not written to a file: workers get it on stdin (see `input_memfd`); on this VM's
/// disk every file or directory created costs an inode allocation, ~0.2 ms of CPU.
pub(crate) fn job_input(shared: &Shared, c: &Commission, job_id: u64) -> Result<(PathBuf, JobInput), String> {
    let dir = job_dir(&shared.data_dir, job_id);
    let context = serde_json::from_str(&c.context).map_err(|e| format!("bad context: {e}"))?;
    let input = JobInput {
        commission_id: c.id,
        job_id,
        attempt: c.attempt + 1,
        pipeline: c.pipeline.clone(),
        context,
    };
    Ok((dir, input))
}

/// The job's input as an anonymous in-memory file, rewound: the worker's stdin. A regular,
/// seekable file like the `input.json` it replaces, but with nothing on disk.
fn input_memfd(input: &JobInput) -> std::io::Result<std::fs::File> {
    use std::io::{Seek, Write};
    use std::os::fd::FromRawFd;
    let text = serde_json::to_vec(input).map_err(std::io::Error::other)?;
    // SAFETY: memfd_create takes a NUL-terminated name and flags, and returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"atelier-input".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.write_all(&text)?;
    f.rewind()?;
    Ok(f)
}

/// The pipeline's spec for workers, `data_dir/jobs/pipelines/{name}-{hash}.json`: one file per
/// distinct spec, shared by its jobs (written once instead of once per job; files are a good
/// share of a short job's cost). Named by content, so a changed spec never reuses a stale file.
pub(crate) fn pipeline_file(shared: &Shared, p: &PipelineConfig, job_id: u64) -> Result<PathBuf, String> {
    use sha2::{Digest, Sha256};
    let spec = serde_json::to_vec(p).map_err(|e| format!("cannot encode the pipeline: {e}"))?;
    let hash: String = Sha256::digest(&spec).iter().take(8).map(|b| format!("{b:02x}")).collect();
    let dir = jobs_dir(&shared.data_dir).join(PIPELINES_DIR);
    let path = dir.join(format!("{}-{hash}.json", p.name));
    if path.exists() {
        return Ok(path);
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    // Written aside and renamed, so a worker never reads half a file.
    let tmp = dir.join(format!(".{}-{hash}.{job_id}.tmp", p.name));
    std::fs::write(&tmp, spec).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &path).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(path)
}

/// The span every line about one commission's job is logged in (with the job's, below):
/// its ids are on every line, also on lines that do not name them.
pub(crate) fn commission_span(c: &Commission) -> tracing::Span {
    tracing::info_span!("commission", id = c.id, user = %c.user_id, pipeline = %c.pipeline)
}

pub(crate) fn job_span(job_id: u64, executor: Executor) -> tracing::Span {
    tracing::info_span!("job", id = job_id, executor = executor.as_str())
}

/// One job on the job controller, from job id to recorded outcome.
fn run_process_job(shared: &Shared, c: Commission, signal: &JobSignal, ready: Instant) {
    let executor = Executor::JobController;
    let _commission = commission_span(&c).entered();
    let Some((job_id, p)) = shared.begin_job(&c, executor) else { return };
    let _job = job_span(job_id, executor).entered();
    let prepared = job_input(shared, &c, job_id)
        .and_then(|(dir, input)| Ok((dir, input, pipeline_file(shared, &p, job_id)?)));
    let (dir, input, spec_file) = match prepared {
        Ok(v) => v,
        Err(e) => {
            shared.fail_unstarted(&c, job_id, executor, format!("could not prepare the job: {e}"), true);
            return;
        }
    };
    tracing::debug!(commission = c.id, job = job_id, "job dir ready");
    let memory_mb = attempt_memory_mb(&*shared.store, c.id, &p);
    let applied = Applied {
        memory_mb,
        memory_max_mb: p.limits.memory_max_mb,
        cpu_seconds: p.limits.cpu_seconds,
        timeout_seconds: p.limits.timeout_seconds,
        heartbeat_ms: shared.config.heartbeat_timeout_ms_for(&p),
    };
    let spawn_started = Instant::now();
    let spawned = spawn_worker(shared, &c, &p, &dir, &input, &spec_file, &applied);
    // `_known` lives to the end of this function, past the reap (`process::watch` or the
    // refused start's wait): until then a sweep leaves the worker alone (`contain`).
    let (child, _known, proto_r, out_r, err_r) = match spawned {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(commission = c.id, job = job_id, error = %e, "cannot spawn a worker");
            shared.with_router(|r, cfg| r.spawn_failed(cfg, Instant::now()));
            shared.fail_unstarted(&c, job_id, executor, format!("could not spawn the worker: {e}"), true);
            return;
        }
    };
    shared.metrics.spawned(spawn_started.elapsed());
    shared.metrics.picked_up(ready.elapsed());
    tracing::debug!(
        commission = c.id,
        job = job_id,
        spawn_us = spawn_started.elapsed().as_micros(),
        "spawned"
    );
    let pid = child.id();
    let start = Command::StartJob { job_id, executor, job_name: p.name.clone(), pid: Some(pid) };
    let rejected = match execute(&*shared.store, c.id, start, &ctx(shared.config.retry)) {
        Ok(Ok(_)) => None,
        Ok(Err(r)) => Some(r.to_string()),
        Err(e) => Some(e.to_string()),
    };
    if let Some(why) = rejected {
        // Cancelled (or started elsewhere) meanwhile: this process must not run.
        tracing::info!(commission = c.id, job = job_id, reason = %why, "start refused; killing the worker");
        let pgid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("invariant: pids fit i32"));
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let mut child = child;
        let _ = child.wait();
        return;
    }
    tracing::info!(commission = c.id, job = job_id, pid, pipeline = %p.name, memory_mb, "job started");
    shared.metrics.job_started(executor);
    let started = Instant::now();
    let mut session = Session::new(
        shared.store.clone(),
        c.id,
        job_id,
        shared.config.retry,
        shared.progress_interval(),
        shared.metrics.clone(),
    );
    let watched = Watched {
        child,
        proto_r,
        out_r,
        err_r,
        job_dir: dir,
        log_bytes_max: shared.config.log_bytes_max_for(&p),
        kill_grace: Duration::from_millis(shared.config.kill_grace_ms),
    };
    let ended = process::watch(watched, &mut session, signal, &applied);
    let took = started.elapsed();
    let succeeded = matches!(ended.finish, Finish::Complete { .. });
    shared
        .with_router(|r, cfg| r.record(cfg, ended.infra_failure, succeeded.then_some(took), Instant::now()));
    shared.metrics.job_finished(executor, ended.finish.outcome(), took);
    if let Some(bytes) = ended.finish.max_rss_bytes() {
        shared.metrics.worker_max_rss(bytes);
    }
    record_finish(&*shared.store, shared.config.retry, c.id, executor, session.take_batch(), ended.finish);
}

type SpawnedWorker = (
    std::process::Child,
    crate::contain::Known,
    std::os::fd::OwnedFd,
    std::os::fd::OwnedFd,
    std::os::fd::OwnedFd,
);

/// Spawns the worker of `input.job_id` (through the spawner thread).
fn spawn_worker(
    shared: &Shared,
    c: &Commission,
    p: &PipelineConfig,
    dir: &Path,
    input: &JobInput,
    spec_file: &Path,
    applied: &Applied,
) -> std::io::Result<SpawnedWorker> {
    use std::os::fd::AsRawFd;
    let (proto_r, proto_w) = process::pipe()?;
    let (out_r, out_w) = process::pipe()?;
    let (err_r, err_w) = process::pipe()?;
    let stdin = input_memfd(input)?;
    // A worker program of the pipeline's own runs in its job's dir, made now. The built-in
    // worker is told where its dir is and makes it only if it puts something there
    // (`RunEnv::make_job_dir`); it runs in the jobs dir meanwhile.
    let (worker_argv, cwd) = match &p.command {
        Some(cmd) => {
            std::fs::create_dir_all(dir)?;
            (cmd.clone(), dir.to_path_buf())
        }
        None => {
            let args = WorkerArgs {
                input: PathBuf::from(crate::worker::INPUT_STDIN),
                pipeline_file: spec_file.to_path_buf(),
                artifacts_dir: artifacts_dir(&shared.data_dir),
                job_dir: Some(dir.to_path_buf()),
                tick_ms: (applied.heartbeat_ms / 4).clamp(10, 1000),
                behave: None,
            };
            let mut v = vec![shared.exe.display().to_string(), "__worker".to_string()];
            v.extend(args.to_args());
            v.extend(p.worker_args.iter().cloned());
            (v, jobs_dir(&shared.data_dir))
        }
    };
    let t = TrampolineArgs {
        server_pid: shared.server_pid,
        proto_fd: proto_w.as_raw_fd(),
        memory_bytes: applied.memory_mb * 1024 * 1024,
        cpu_seconds: p.limits.cpu_seconds,
        nofile_max: p.limits.nofile_max,
        nproc_max: p.limits.nproc_max,
        fsize_bytes: p.limits.fsize_mb * 1024 * 1024,
        interface: crate::INTERFACE.into(),
        argv: worker_argv,
    };
    let mut args = vec!["__trampoline".to_string()];
    args.extend(t.to_args());
    let (reply_tx, reply_rx) = crossbeam_channel::bounded(1);
    let req = SpawnRequest {
        args,
        env: worker_env(shared, p, c, input.job_id, dir),
        cwd,
        stdin,
        stdout: out_w,
        stderr: err_w,
        proto_w,
        reply: reply_tx,
    };
    let tx = shared.spawn_tx.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let tx = tx.ok_or_else(|| std::io::Error::other("the spawner is stopped"))?;
    tx.send(req).map_err(|_| std::io::Error::other("the spawner is gone"))?;
    let (child, known) = reply_rx
        .recv_timeout(Duration::from_millis(SPAWN_REPLY_TIMEOUT_MS))
        .map_err(|_| std::io::Error::other("the spawner did not answer"))??;
    Ok((child, known, proto_r, out_r, err_r))
}

/// The running workers: executors, router and metrics.
pub struct Controller {
    shared: Arc<Shared>,
    sched_tx: Sender<SchedMsg>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    task_runner: Mutex<Option<task_runner::Pool>>,
    /// Dropping the sender stops the job-dir sweeper.
    janitor: Mutex<Option<(Sender<()>, JoinHandle<()>)>>,
    /// Dropping the sender stops the sweep for escaped processes (after one last sweep).
    reaper: Mutex<Option<(Sender<()>, JoinHandle<()>)>>,
    /// `ATELIER_BALLAST_MB` of resident memory, held only to be measured against.
    _ballast: Vec<u8>,
}

/// `ATELIER_BALLAST_MB` MiB, every page written so it is resident.
fn ballast_from_env() -> Vec<u8> {
    let mb = std::env::var(BALLAST_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0)
        .min(BALLAST_MB_MAX);
    if mb > 0 {
        tracing::warn!(mb, "holding ballast memory ({BALLAST_ENV}); for benchmarks only");
    }
    vec![0xA5u8; mb * 1024 * 1024]
}

impl Controller {
    /// Starts the executors. `exe` is the path of the atelier binary (for the worker
    /// processes), `data_dir` the server's data dir (job working dirs go to
    /// `data_dir/jobs/{job_id}/`, artifacts to `data_dir/artifacts/{sha256hex}.png`).
    pub fn start(
        store: Arc<dyn EventStore>,
        config: WorkersConfig,
        data_dir: PathBuf,
        exe: PathBuf,
    ) -> Result<Controller, WorkersError> {
        // Workers run in their job dir: every path handed to them must not depend on our cwd.
        let data_dir = std::path::absolute(&data_dir).map_err(io_err("resolve the data dir"))?;
        let exe = std::path::absolute(&exe).map_err(io_err("resolve the executable path"))?;
        std::fs::create_dir_all(jobs_dir(&data_dir)).map_err(io_err("create the jobs dir"))?;
        std::fs::create_dir_all(artifacts_dir(&data_dir)).map_err(io_err("create the artifacts dir"))?;
        let (spawn_tx, spawn_rx) = crossbeam_channel::unbounded::<SpawnRequest>();
        let metrics = Arc::new(Metrics::default());
        let shared = Arc::new(Shared {
            store,
            config,
            data_dir,
            exe: exe.clone(),
            metrics: metrics.clone(),
            router: Mutex::new(Router::new(metrics)),
            stopping: AtomicBool::new(false),
            spawn_tx: Mutex::new(Some(spawn_tx)),
            server_pid: std::process::id(),
        });
        // Before any job starts: what a job leaves behind must be re-parented to us.
        let contained = shared.config.contain_descendants
            && match crate::contain::become_subreaper() {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot become a child subreaper; processes that leave their job's group are not ended");
                    false
                }
            };
        // Subscribe before reading the live set, so nothing falls between the two.
        let head = shared.store.head_seq();
        let sub = shared.store.subscribe(head, Filter::All)?;
        reconcile(&shared)?;
        let mut threads = Vec::new();
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.to_string())
                .spawn(f)
                .map_err(io_err(format!("start thread {name}")))
        };
        threads.push(spawn("atelier-spawner", Box::new(move || process::spawner_loop(exe, spawn_rx)))?);
        let (sched_tx, sched_rx) = crossbeam_channel::unbounded();
        let pool = task_runner::Pool::start(shared.clone(), shared.config.max_concurrent_jobs)
            .map_err(io_err("start the task runner"))?;
        let scheduler = Scheduler {
            shared: shared.clone(),
            rx: sched_rx,
            done_tx: sched_tx.clone(),
            task_tx: pool.sender(),
            queue: BTreeSet::new(),
            queued: HashMap::new(),
            timers: BinaryHeap::new(),
            timer_set: HashSet::new(),
            running: HashMap::new(),
        };
        let _ = sched_tx.send(SchedMsg::Rescan);
        threads.push(spawn("atelier-scheduler", Box::new(move || scheduler.run()))?);
        let (feed_shared, feed_tx) = (shared.clone(), sched_tx.clone());
        threads.push(spawn("atelier-feed", Box::new(move || feed_loop(feed_shared, sub, feed_tx)))?);
        let janitor = match shared.config.job_dirs_keep() {
            None => None,
            Some(keep) => {
                let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
                let (store, dir) = (shared.store.clone(), shared.data_dir.clone());
                let handle =
                    spawn("atelier-janitor", Box::new(move || janitor_loop(&*store, &dir, keep, &stop_rx)))?;
                Some((stop_tx, handle))
            }
        };
        let reaper = if contained {
            let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
            let metrics = shared.metrics.clone();
            let handle = spawn("atelier-reaper", Box::new(move || reaper_loop(&metrics, &stop_rx)))?;
            Some((stop_tx, handle))
        } else {
            None
        };
        tracing::info!(
            max_concurrent_jobs = shared.config.max_concurrent_jobs,
            use_job_controller = shared.config.use_job_controller,
            keep_task_runner = shared.config.keep_task_runner,
            "workers started"
        );
        Ok(Controller {
            shared,
            sched_tx,
            threads: Mutex::new(threads),
            task_runner: Mutex::new(Some(pool)),
            janitor: Mutex::new(janitor),
            reaper: Mutex::new(reaper),
            _ballast: ballast_from_env(),
        })
    }

    /// The pipelines commissions may name (the API can refuse others up front).
    pub fn pipeline_names(&self) -> Vec<String> {
        self.shared.config.pipelines.keys().cloned().collect()
    }

    pub fn is_running(&self) -> bool {
        !self.shared.stopping.load(Ordering::Acquire)
            && self.threads.lock().map(|t| t.iter().all(|h| !h.is_finished())).unwrap_or(false)
    }

    /// Prometheus text exposition of the workers' metrics.
    pub fn metrics_text(&self) -> String {
        self.shared.with_router(|r, cfg| r.rollback_active(cfg, Instant::now()));
        self.shared.metrics.render()
    }

    /// Stop taking work, kill running jobs' process groups (SIGTERM, then SIGKILL after a
    /// grace), join threads. Idempotent.
    pub fn shutdown(&self) {
        if self.shared.stopping.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::info!("workers shutting down");
        if let Some((stop, handle)) = self.janitor.lock().ok().and_then(|mut j| j.take()) {
            drop(stop);
            let _ = handle.join();
        }
        let _ = self.sched_tx.send(SchedMsg::Shutdown);
        // The scheduler stops its jobs before it returns; then nothing spawns any more.
        let threads: Vec<JoinHandle<()>> =
            self.threads.lock().map(|mut t| t.drain(..).collect()).unwrap_or_default();
        let mut rest = Vec::new();
        for t in threads {
            if t.thread().name() == Some("atelier-scheduler") {
                let _ = t.join();
            } else {
                rest.push(t);
            }
        }
        if let Ok(mut tx) = self.shared.spawn_tx.lock() {
            tx.take();
        }
        if let Some(pool) = self.task_runner.lock().ok().and_then(|mut p| p.take()) {
            pool.join();
        }
        for t in rest {
            let _ = t.join();
        }
        // Jobs are over: one last sweep ends what they left behind.
        if let Some((stop, handle)) = self.reaper.lock().ok().and_then(|mut r| r.take()) {
            drop(stop);
            let _ = handle.join();
        }
    }
}

/// Ends escaped processes every [`contain::SWEEP_INTERVAL`], and once more when stopped.
fn reaper_loop(metrics: &Metrics, stop: &Receiver<()>) {
    loop {
        let stopped =
            matches!(stop.recv_timeout(crate::contain::SWEEP_INTERVAL), Err(RecvTimeoutError::Disconnected));
        let ended = crate::contain::sweep();
        metrics.escapees_ended.fetch_add(ended.len() as u64, Ordering::Relaxed);
        if stopped {
            return;
        }
    }
}

/// Sweeps finished jobs' dirs now and then every [`janitor::SWEEP_INTERVAL`] until `stop`
/// disconnects.
fn janitor_loop(store: &dyn EventStore, data_dir: &Path, keep: Duration, stop: &Receiver<()>) {
    loop {
        match crate::janitor::sweep(store, data_dir, keep, now_ms()) {
            Ok(s) if s.removed > 0 => tracing::info!(
                removed = s.removed,
                kept = s.kept,
                "removed the dirs of jobs that ended long ago"
            ),
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "job dir sweep failed; trying again later"),
        }
        if let Err(RecvTimeoutError::Disconnected) = stop.recv_timeout(crate::janitor::SWEEP_INTERVAL) {
            return;
        }
    }
}

// The server shares the controller between its threads.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Controller>();
};

impl Drop for Controller {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> WorkersConfig {
        WorkersConfig {
            rollback_min_jobs: 4,
            rollback_window_jobs: 10,
            rollback_cooldown_ms: 1_000,
            ..WorkersConfig::default()
        }
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn failures_of_the_controller_roll_back_until_the_cooldown_ends() {
        let (cfg, t0) = (cfg(), Instant::now());
        let mut r = Router::new(Arc::default());
        assert_eq!(r.route(&cfg, 1, t0), Executor::JobController);
        // 1 failure in 4 is 25% > 5%, but only counted from rollback_min_jobs on.
        r.record(&cfg, true, None, t0);
        assert_eq!(r.route(&cfg, 1, t0), Executor::JobController, "one failure is not a trend");
        for _ in 0..3 {
            r.record(&cfg, false, Some(10 * MS), t0);
        }
        assert_eq!(r.route(&cfg, 1, t0), Executor::TaskRunner);
        assert_eq!(r.metrics.rollbacks(), [1, 0, 0]);
        assert_eq!(r.route(&cfg, 1, t0 + 999 * MS), Executor::TaskRunner);
        // Healthy again after the cooldown, judged afresh.
        assert_eq!(r.route(&cfg, 1, t0 + 1_000 * MS), Executor::JobController);
        r.record(&cfg, false, Some(10 * MS), t0 + 1_000 * MS);
        assert_eq!(r.route(&cfg, 1, t0 + 1_000 * MS), Executor::JobController);
    }

    #[test]
    fn a_controller_much_slower_than_the_task_runner_rolls_back() {
        let (cfg, t0) = (cfg(), Instant::now());
        let mut r = Router::new(Arc::default());
        // Slow controller jobs alone are no reason: the task runner has no times to compare.
        for _ in 0..4 {
            r.record(&cfg, false, Some(100 * MS), t0);
        }
        assert_eq!(r.route(&cfg, 1, t0), Executor::JobController);
        // 1.5× of 66 ms is 99 ms: 100 ms is over it once the task runner has its four times.
        for _ in 0..3 {
            r.record_took(&cfg, Executor::TaskRunner, 66 * MS, t0);
            assert_eq!(r.route(&cfg, 1, t0), Executor::JobController);
        }
        r.record_took(&cfg, Executor::TaskRunner, 66 * MS, t0);
        assert_eq!(r.route(&cfg, 1, t0), Executor::TaskRunner);
        assert_eq!(r.metrics.rollbacks(), [0, 1, 0]);

        // Exactly 1.5× is not over it; 0 turns the check off.
        for (percent, controller_ms, rolled_back) in [(150, 99, false), (150, 100, true), (0, 1_000, false)] {
            let cfg = WorkersConfig { rollback_slowdown_percent: percent, ..cfg.clone() };
            let mut r = Router::new(Arc::default());
            for _ in 0..4 {
                r.record_took(&cfg, Executor::TaskRunner, 66 * MS, t0);
                r.record(&cfg, false, Some(controller_ms * MS), t0);
            }
            assert_eq!(
                r.route(&cfg, 1, t0) == Executor::TaskRunner,
                rolled_back,
                "{percent}% with {controller_ms} ms"
            );
        }
    }

    #[test]
    fn a_spawn_failure_rolls_back_at_once_unless_there_is_no_fallback() {
        let (cfg, t0) = (cfg(), Instant::now());
        let mut r = Router::new(Arc::default());
        r.spawn_failed(&cfg, t0);
        assert_eq!(r.route(&cfg, 1, t0), Executor::TaskRunner);
        assert_eq!(r.metrics.rollbacks(), [0, 0, 1]);
        // Without a task runner, or with rollback off, the controller keeps the work.
        for cfg in [
            WorkersConfig { keep_task_runner: false, ..cfg.clone() },
            WorkersConfig { auto_rollback: false, ..cfg.clone() },
        ] {
            let mut r = Router::new(Arc::default());
            r.spawn_failed(&cfg, t0);
            assert_eq!(r.route(&cfg, 1, t0), Executor::JobController);
            assert_eq!(r.metrics.rollbacks(), [0, 0, 0]);
        }
    }

    #[test]
    fn rollout_sends_a_stable_share_and_priority_picks_the_executor() {
        let t0 = Instant::now();
        let cfg = WorkersConfig { job_controller_rollout_percent: 30, ..cfg() };
        let mut r = Router::new(Arc::default());
        let to_controller: Vec<u64> =
            (1..=10_000).filter(|id| r.route(&cfg, *id, t0) == Executor::JobController).collect();
        assert!((2_700..=3_300).contains(&to_controller.len()), "{} of 10,000", to_controller.len());
        let again: Vec<u64> =
            (1..=10_000).filter(|id| r.route(&cfg, *id, t0) == Executor::JobController).collect();
        assert_eq!(to_controller, again, "the same commissions every time");

        let runner_first = WorkersConfig { task_runner_priority: 20, ..self::cfg() };
        assert_eq!(
            r.route(&runner_first, 1, t0),
            Executor::TaskRunner,
            "the higher priority takes work first"
        );
        let no_controller = WorkersConfig { use_job_controller: false, ..self::cfg() };
        assert_eq!(r.route(&no_controller, 1, t0), Executor::TaskRunner);
    }
}
