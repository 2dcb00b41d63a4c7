//! One job's conversation with the log: protocol messages in, engine commands out.
//!
//! Both executors feed their workers' messages through a [`Session`], so checking, progress
//! coalescing and the final outcome are the same whoever ran the job. Progress is the only
//! thing that is coalesced: at most one event per stage per interval, the latest one wins,
//! and a pending one is always written before the stage changes or the job reports its end.
//!
//! Commands are not appended one by one: a session collects what one batch of protocol lines
//! says (everything a poll wakeup read) and [`Session::commit`] decides the commands one after
//! the other against one snapshot and appends all their events in one atomic append, so a
//! worker that reports a burst costs one fsync, not one per line. The job's end can carry the
//! last batch along ([`record_finish`]), so a short job is two appends: start and end.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use atelier_engine::limits::{self, truncate};
use atelier_engine::{
    apply, decide, Command, Commission, Ctx, Envelope, Event, Executor, JobEnd, JobStatus, Rejection,
    RetryPolicy, Stage,
};
use atelier_storage::{AppendOutcome, AppendRequest, AppendTarget, EventStore, StorageError};

use crate::metrics::Metrics;
use crate::protocol::{Checker, Message};

/// Wall-clock now in milliseconds: the one place the workers read the clock for the engine.
pub(crate) fn now_ms() -> i64 {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

pub(crate) fn ctx(retry: RetryPolicy) -> Ctx {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();
    // Only the jitter of retry backoff depends on this; any varying value will do.
    let jitter_seed = u64::try_from(nanos & u128::from(u64::MAX)).expect("invariant: masked to 64 bits");
    Ctx { now: now_ms(), jitter_seed, retry }
}

/// Why a session stopped taking messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Halt {
    /// The worker broke the protocol (or the engine refused what it said).
    Protocol(String),
    /// A cancel is pending: the job must stop.
    Cancelled,
    /// The job is no longer the commission's active job; nothing more can be recorded.
    Stale(String),
    Storage(String),
}

/// How a job ended, ready to be recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Finish {
    Complete {
        result: String,
        end: JobEnd,
    },
    Fail {
        error: String,
        retryable: bool,
        end: JobEnd,
    },
    Cancelled {
        end: JobEnd,
    },
    /// The job is stale: there is nothing to record.
    Nothing,
}

impl Finish {
    /// The worker's peak RSS from the kernel's rusage, when the job had a process of its own
    /// that was reaped (not for the task runner, whose jobs share the server's).
    pub(crate) fn max_rss_bytes(&self) -> Option<u64> {
        match self {
            Finish::Complete { end, .. } | Finish::Fail { end, .. } | Finish::Cancelled { end } => {
                Some(end.max_rss_bytes).filter(|b| *b > 0)
            }
            Finish::Nothing => None,
        }
    }

    /// The `outcome` label of the finished-jobs metric.
    pub(crate) fn outcome(&self) -> &'static str {
        match self {
            Finish::Complete { .. } => "succeeded",
            Finish::Fail { end, .. } => end.status.as_str(),
            Finish::Cancelled { .. } => "cancelled",
            Finish::Nothing => "stale",
        }
    }
}

pub(crate) fn job_end(job_id: u64, status: JobStatus, error: Option<String>) -> JobEnd {
    JobEnd {
        job_id,
        status,
        exit_code: None,
        signal: None,
        error: error.map(|e| truncate(e, limits::ERROR_BYTES_MAX)),
        max_rss_bytes: 0,
        cpu_ms: 0,
    }
}

/// Commands a session holds before it commits them anyway: a batch is one append, and an
/// append should stay small (stages, coalesced progress and artifacts are few per job, so
/// only a pathological worker gets near this).
pub(crate) const BATCH_COMMANDS_MAX: usize = 256;
/// Times a batch is decided again after losing a version race (as `atelier_storage::execute`).
const CONFLICT_RETRIES_MAX: usize = 64;

pub(crate) struct Session {
    store: Arc<dyn EventStore>,
    pub(crate) commission_id: u64,
    pub(crate) job_id: u64,
    retry: RetryPolicy,
    interval: Duration,
    checker: Checker,
    last_sent: [Option<Instant>; 4],
    pending: Option<(Stage, u32, Option<String>)>,
    /// Decided by the protocol, not yet appended (see [`Session::commit`]).
    batch: Vec<Command>,
    metrics: Arc<Metrics>,
    /// The worker's result, as JSON text.
    pub(crate) result: Option<String>,
    /// The worker's own error line: (error, retryable).
    pub(crate) worker_error: Option<(String, bool)>,
}

impl Session {
    pub(crate) fn new(
        store: Arc<dyn EventStore>,
        commission_id: u64,
        job_id: u64,
        retry: RetryPolicy,
        interval: Duration,
        metrics: Arc<Metrics>,
    ) -> Session {
        Session {
            store,
            commission_id,
            job_id,
            retry,
            interval,
            checker: Checker::default(),
            last_sent: [None; 4],
            pending: None,
            batch: Vec::new(),
            metrics,
            result: None,
            worker_error: None,
        }
    }

    /// Checks one message and queues what it says; [`Session::commit`] records it.
    pub(crate) fn handle(&mut self, msg: Message) -> Result<(), Halt> {
        self.checker.check(&msg).map_err(Halt::Protocol)?;
        let job_id = self.job_id;
        match msg {
            Message::Stage { stage } => {
                self.flush()?;
                self.queue(Command::EnterStage { job_id, stage })
            }
            Message::Progress { stage, percent, message } => {
                let now = Instant::now();
                let due = !matches!(self.last_sent[stage.index()], Some(t) if now.duration_since(t) < self.interval);
                if self.pending.take().is_some() {
                    self.metrics.progress_coalesced();
                }
                if due {
                    self.last_sent[stage.index()] = Some(now);
                    self.queue(Command::ReportProgress { job_id, stage, percent, message })
                } else {
                    self.pending = Some((stage, percent, message));
                    Ok(())
                }
            }
            Message::Artifact { stage, kind, uri } => {
                self.queue(Command::RecordArtifact { job_id, stage, kind, uri })
            }
            Message::Heartbeat {} => Ok(()),
            Message::Result { result } => {
                self.flush()?;
                let text = result.to_string();
                if text.len() > limits::RESULT_BYTES_MAX {
                    return Err(Halt::Protocol(format!(
                        "result of {} bytes is over the {}-byte limit",
                        text.len(),
                        limits::RESULT_BYTES_MAX
                    )));
                }
                self.result = Some(text);
                Ok(())
            }
            Message::Error { error, retryable } => {
                self.flush()?;
                self.worker_error = Some((truncate(error, limits::ERROR_BYTES_MAX), retryable));
                Ok(())
            }
        }
    }

    /// When the pending progress (if any) may be written.
    pub(crate) fn next_flush_at(&self) -> Option<Instant> {
        let (stage, _, _) = self.pending.as_ref()?;
        Some(self.last_sent[stage.index()].map_or_else(Instant::now, |t| t + self.interval))
    }

    /// Queues the pending progress if its interval has passed.
    pub(crate) fn flush_due(&mut self) -> Result<(), Halt> {
        match self.next_flush_at() {
            Some(at) if at <= Instant::now() => self.flush(),
            _ => Ok(()),
        }
    }

    /// Queues the pending progress now.
    pub(crate) fn flush(&mut self) -> Result<(), Halt> {
        let Some((stage, percent, message)) = self.pending.take() else {
            return Ok(());
        };
        self.last_sent[stage.index()] = Some(Instant::now());
        self.queue(Command::ReportProgress { job_id: self.job_id, stage, percent, message })
    }

    fn queue(&mut self, cmd: Command) -> Result<(), Halt> {
        self.batch.push(cmd);
        if self.batch.len() >= BATCH_COMMANDS_MAX {
            return self.commit();
        }
        Ok(())
    }

    /// Whether commands wait for [`Session::commit`].
    pub(crate) fn has_batch(&self) -> bool {
        !self.batch.is_empty()
    }

    /// Appends the queued commands, all in one append. If one is refused, the ones before it
    /// are still recorded (as if each had been appended alone) and the refusal says why the
    /// job must stop.
    pub(crate) fn commit(&mut self) -> Result<(), Halt> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let cmds = std::mem::take(&mut self.batch);
        match execute_all(&*self.store, self.commission_id, &cmds, &ctx(self.retry)) {
            Ok(Batched { rejected: None, .. }) => Ok(()),
            Ok(Batched { rejected: Some(r), .. }) => Err(halt_for(r)),
            Err(e) => Err(Halt::Storage(e.to_string())),
        }
    }

    /// Decides the queued commands without appending them, to learn whether the engine takes
    /// them all. If not, the ones before the refused one are appended now and the refusal is
    /// returned; if so, the batch stays queued for the job's end to carry ([`record_finish`]).
    pub(crate) fn check_batch(&mut self) -> Result<(), Halt> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let current = match self.store.commission(self.commission_id) {
            Ok(Some(c)) => c,
            Ok(None) => return Err(halt_for(Rejection::NotFound)),
            Err(e) => return Err(Halt::Storage(e.to_string())),
        };
        match decide_all(&current, &self.batch, &ctx(self.retry)).rejected {
            None => Ok(()),
            Some(_) => self.commit(),
        }
    }

    /// The queued commands, for the job's end to append along with its own.
    pub(crate) fn take_batch(&mut self) -> Vec<Command> {
        std::mem::take(&mut self.batch)
    }
}

fn halt_for(r: Rejection) -> Halt {
    match r {
        Rejection::CancelPending => Halt::Cancelled,
        r @ (Rejection::StaleJob { .. } | Rejection::Terminal { .. } | Rejection::NotFound) => {
            Halt::Stale(r.to_string())
        }
        r => Halt::Protocol(format!("the engine refused it: {r}")),
    }
}

/// What [`execute_all`] did: how many commands (a prefix) were appended, the refusal of the
/// next one if any, and the commission afterwards.
#[derive(Clone, Debug)]
pub(crate) struct Batched {
    pub(crate) accepted: usize,
    pub(crate) rejected: Option<Rejection>,
    pub(crate) commission: Option<Commission>,
}

/// Decides `cmds` one after the other, each on the state the ones before it leave. Stops at
/// the first refusal: the events of the commands before it, and that refusal.
fn decide_all(current: &Commission, cmds: &[Command], ctx: &Ctx) -> Decided {
    let mut probe = current.clone();
    let mut events = Vec::new();
    for (i, cmd) in cmds.iter().enumerate() {
        match decide(Some(&probe), cmd.clone(), ctx) {
            Ok(decided) => {
                for event in decided {
                    let env = Envelope {
                        seq: 0,
                        commission_id: probe.id,
                        version: probe.version + 1,
                        at: ctx.now,
                        event,
                    };
                    probe = apply(Some(probe), &env)
                        .expect("invariant: decide() checked these events on this very state");
                    events.push(env.event);
                }
            }
            Err(r) => return Decided { events, accepted: i, rejected: Some(r) },
        }
    }
    Decided { events, accepted: cmds.len(), rejected: None }
}

struct Decided {
    events: Vec<Event>,
    accepted: usize,
    rejected: Option<Rejection>,
}

/// `atelier_storage::execute` for several commands: decided in a row on one snapshot (see
/// [`decide_all`]) and appended as one atomic append at that snapshot's version, decided
/// again if another writer got there first. The commands before a refused one are appended.
pub(crate) fn execute_all(
    store: &dyn EventStore,
    id: u64,
    cmds: &[Command],
    ctx: &Ctx,
) -> Result<Batched, StorageError> {
    for _ in 0..CONFLICT_RETRIES_MAX {
        let Some(current) = store.commission(id)? else {
            return Ok(Batched { accepted: 0, rejected: Some(Rejection::NotFound), commission: None });
        };
        let Decided { events, accepted, rejected } = decide_all(&current, cmds, ctx);
        if events.is_empty() {
            return Ok(Batched { accepted, rejected, commission: Some(current) });
        }
        let req = AppendRequest {
            target: AppendTarget::Existing(id),
            expected_version: current.version,
            events,
            at: ctx.now,
        };
        match store.append(req)? {
            AppendOutcome::Appended { commission, .. } | AppendOutcome::Duplicate { commission } => {
                return Ok(Batched { accepted, rejected, commission: Some(commission) })
            }
            AppendOutcome::Conflict { .. } => continue,
            // The store's fold refused what the engine decided: nothing was appended.
            AppendOutcome::Rejected(r) => {
                return Ok(Batched { accepted: 0, rejected: Some(r), commission: None })
            }
        }
    }
    Err(StorageError::Contention { commission: id })
}

/// Times the end of a job is retried after a storage failure: a lost end would leave the
/// commission running with no process until the next restart.
const RECORD_TRIES_MAX: u32 = 5;
const RECORD_RETRY_MS: u64 = 200;
/// A full disk is waited out, not counted as a try: the store takes appends again by itself
/// once there is room (a stop ends the wait: the closed store answers `Closed`).
const RECORD_DISK_FULL_RETRY_MS: u64 = 500;

fn execute_persistently(
    store: &dyn EventStore,
    commission_id: u64,
    cmds: &[Command],
    retry: RetryPolicy,
) -> Result<Batched, StorageError> {
    let mut tries = 1;
    let mut waiting_for_space = false;
    loop {
        match execute_all(store, commission_id, cmds, &ctx(retry)) {
            Err(e @ StorageError::DiskFull { .. }) => {
                if !waiting_for_space {
                    tracing::warn!(commission = commission_id, error = %e, "the disk is full; the job end waits for space");
                    waiting_for_space = true;
                }
                std::thread::sleep(Duration::from_millis(RECORD_DISK_FULL_RETRY_MS));
            }
            Err(e) if tries < RECORD_TRIES_MAX && !matches!(e, StorageError::Closed) => {
                tracing::warn!(commission = commission_id, error = %e, tries, "recording the job end failed; retrying");
                tries += 1;
                std::thread::sleep(Duration::from_millis(RECORD_RETRY_MS * u64::from(tries)));
            }
            other => return other,
        }
    }
}

/// The single-command form of [`execute_persistently`], shaped like `execute`'s answer.
fn execute_one_persistently(
    store: &dyn EventStore,
    commission_id: u64,
    cmd: Command,
    retry: RetryPolicy,
) -> Result<Result<Commission, Rejection>, StorageError> {
    let b = execute_persistently(store, commission_id, std::slice::from_ref(&cmd), retry)?;
    Ok(match (b.rejected, b.commission) {
        (Some(r), _) => Err(r),
        (None, Some(c)) => Ok(c),
        (None, None) => Err(Rejection::NotFound),
    })
}

/// Records how a job ended, after `before` (the session's last queued commands, appended in
/// the same append when the engine takes them all). A completed job whose commission was
/// cancelled meanwhile is recorded as cancelled; a report from a stale job is dropped (logged).
pub(crate) fn record_finish(
    store: &dyn EventStore,
    retry: RetryPolicy,
    commission_id: u64,
    executor: Executor,
    before: Vec<Command>,
    finish: Finish,
) {
    let (job_id, cmd) = match finish.clone() {
        Finish::Nothing => return,
        Finish::Complete { result, end } => {
            (end.job_id, Command::Complete { job_id: end.job_id, result, job: Some(end) })
        }
        Finish::Fail { error, retryable, end } => {
            (end.job_id, Command::FailAttempt { job_id: end.job_id, error, retryable, job: Some(end) })
        }
        Finish::Cancelled { end } => (end.job_id, Command::ConfirmCancelled { job: Some(end) }),
    };
    let first = if before.is_empty() {
        execute_one_persistently(store, commission_id, cmd, retry)
    } else {
        let mut cmds = before;
        cmds.push(cmd.clone());
        match execute_persistently(store, commission_id, &cmds, retry) {
            Ok(Batched { rejected: None, commission: Some(c), .. }) => Ok(Ok(c)),
            Ok(Batched { rejected: Some(r), accepted, .. }) if accepted + 1 == cmds.len() => Ok(Err(r)),
            // A report before the end was refused (a cancel or a takeover raced the end): the
            // reports before it are recorded; the end goes alone, as it would have.
            Ok(_) => execute_one_persistently(store, commission_id, cmd, retry),
            Err(e) => Err(e),
        }
    };
    let fallback = match (&first, finish) {
        // The commission was cancelled while the job finished: the job's end closes the cancel.
        (Ok(Err(Rejection::CancelPending)), Finish::Complete { end, .. }) => {
            Some(Command::ConfirmCancelled { job: Some(JobEnd { status: JobStatus::Killed, ..end }) })
        }
        // Asked to stop without a cancel (a shutdown racing a cancel, say): fail the attempt.
        (Ok(Err(Rejection::Invalid { .. })), Finish::Cancelled { end }) => {
            Some(Command::FailAttempt { job_id, error: "stopped".into(), retryable: true, job: Some(end) })
        }
        _ => None,
    };
    let outcome = match fallback {
        Some(cmd) => execute_one_persistently(store, commission_id, cmd, retry),
        None => first,
    };
    match outcome {
        Ok(Ok(c)) => {
            tracing::info!(commission = commission_id, job = job_id, executor = executor.as_str(), state = %c.state, "job recorded")
        }
        Ok(Err(r)) => {
            tracing::warn!(commission = commission_id, job = job_id, rejection = %r, "job end not recorded")
        }
        Err(e) => {
            tracing::error!(commission = commission_id, job = job_id, error = %e, "cannot record the job end")
        }
    }
}
