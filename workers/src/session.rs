//! One job's conversation with the log: protocol messages in, engine commands out.
//!
//! Both executors feed their workers' messages through a [`Session`], so checking, progress
//! coalescing and the final outcome are the same whoever ran the job. Progress is the only
//! thing that is coalesced: at most one event per stage per interval, the latest one wins,
//! and a pending one is always written before the stage changes or the job reports its end.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use atelier_engine::limits::{self, truncate};
use atelier_engine::{Command, Ctx, Executor, JobEnd, JobStatus, Rejection, RetryPolicy, Stage};
use atelier_storage::{execute, EventStore};

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
    Complete { result: String, end: JobEnd },
    Fail { error: String, retryable: bool, end: JobEnd },
    Cancelled { end: JobEnd },
    /// The job is stale: there is nothing to record.
    Nothing,
}

impl Finish {
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

pub(crate) struct Session {
    store: Arc<dyn EventStore>,
    pub(crate) commission_id: u64,
    pub(crate) job_id: u64,
    retry: RetryPolicy,
    interval: Duration,
    checker: Checker,
    last_sent: [Option<Instant>; 4],
    pending: Option<(Stage, u32, Option<String>)>,
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
            metrics,
            result: None,
            worker_error: None,
        }
    }

    /// Checks one message and records what it says.
    pub(crate) fn handle(&mut self, msg: Message) -> Result<(), Halt> {
        self.checker.check(&msg).map_err(Halt::Protocol)?;
        let job_id = self.job_id;
        match msg {
            Message::Stage { stage } => {
                self.flush()?;
                self.exec(Command::EnterStage { job_id, stage })
            }
            Message::Progress { stage, percent, message } => {
                let now = Instant::now();
                let due = !matches!(self.last_sent[stage.index()], Some(t) if now.duration_since(t) < self.interval);
                if self.pending.take().is_some() {
                    self.metrics.progress_coalesced();
                }
                if due {
                    self.last_sent[stage.index()] = Some(now);
                    self.exec(Command::ReportProgress { job_id, stage, percent, message })
                } else {
                    self.pending = Some((stage, percent, message));
                    Ok(())
                }
            }
            Message::Artifact { stage, kind, uri } => self.exec(Command::RecordArtifact { job_id, stage, kind, uri }),
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

    /// Writes the pending progress if its interval has passed.
    pub(crate) fn flush_due(&mut self) -> Result<(), Halt> {
        match self.next_flush_at() {
            Some(at) if at <= Instant::now() => self.flush(),
            _ => Ok(()),
        }
    }

    /// Writes the pending progress now.
    pub(crate) fn flush(&mut self) -> Result<(), Halt> {
        let Some((stage, percent, message)) = self.pending.take() else {
            return Ok(());
        };
        self.last_sent[stage.index()] = Some(Instant::now());
        self.exec(Command::ReportProgress { job_id: self.job_id, stage, percent, message })
    }

    fn exec(&self, cmd: Command) -> Result<(), Halt> {
        match execute(&*self.store, self.commission_id, cmd, &ctx(self.retry)) {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(Rejection::CancelPending)) => Err(Halt::Cancelled),
            Ok(Err(r @ (Rejection::StaleJob { .. } | Rejection::Terminal { .. } | Rejection::NotFound))) => {
                Err(Halt::Stale(r.to_string()))
            }
            Ok(Err(r)) => Err(Halt::Protocol(format!("the engine refused it: {r}"))),
            Err(e) => Err(Halt::Storage(e.to_string())),
        }
    }
}

/// Times the end of a job is retried after a storage failure: a lost end would leave the
/// commission running with no process until the next restart.
const RECORD_TRIES_MAX: u32 = 5;
const RECORD_RETRY_MS: u64 = 200;

fn execute_persistently(
    store: &dyn EventStore,
    commission_id: u64,
    cmd: Command,
    retry: RetryPolicy,
) -> Result<Result<atelier_engine::Commission, Rejection>, atelier_storage::StorageError> {
    let mut tries = 1;
    loop {
        match execute(store, commission_id, cmd.clone(), &ctx(retry)) {
            Err(e) if tries < RECORD_TRIES_MAX && !matches!(e, atelier_storage::StorageError::Closed) => {
                tracing::warn!(commission = commission_id, error = %e, tries, "recording the job end failed; retrying");
                tries += 1;
                std::thread::sleep(Duration::from_millis(RECORD_RETRY_MS * u64::from(tries)));
            }
            other => return other,
        }
    }
}

/// Records how a job ended. A completed job whose commission was cancelled meanwhile is
/// recorded as cancelled; a report from a stale job is dropped (logged).
pub(crate) fn record_finish(store: &dyn EventStore, retry: RetryPolicy, commission_id: u64, executor: Executor, finish: Finish) {
    let (job_id, cmd) = match finish.clone() {
        Finish::Nothing => return,
        Finish::Complete { result, end } => (end.job_id, Command::Complete { job_id: end.job_id, result, job: Some(end) }),
        Finish::Fail { error, retryable, end } => {
            (end.job_id, Command::FailAttempt { job_id: end.job_id, error, retryable, job: Some(end) })
        }
        Finish::Cancelled { end } => (end.job_id, Command::ConfirmCancelled { job: Some(end) }),
    };
    let first = execute_persistently(store, commission_id, cmd, retry);
    let fallback = match (&first, finish) {
        // The commission was cancelled while the job finished: the job's end closes the cancel.
        (Ok(Err(Rejection::CancelPending)), Finish::Complete { end, .. }) => {
            Some(Command::ConfirmCancelled { job: Some(JobEnd { status: JobStatus::Killed, ..end }) })
        }
        // Asked to stop without a cancel (a shutdown racing a cancel, say): fail the attempt.
        (Ok(Err(Rejection::Invalid { .. })), Finish::Cancelled { end }) => Some(Command::FailAttempt {
            job_id,
            error: "stopped".into(),
            retryable: true,
            job: Some(end),
        }),
        _ => None,
    };
    let outcome = match fallback {
        Some(cmd) => execute_persistently(store, commission_id, cmd, retry),
        None => first,
    };
    match outcome {
        Ok(Ok(c)) => tracing::info!(commission = commission_id, job = job_id, executor = executor.as_str(), state = %c.state, "job recorded"),
        Ok(Err(r)) => tracing::warn!(commission = commission_id, job = job_id, rejection = %r, "job end not recorded"),
        Err(e) => tracing::error!(commission = commission_id, job = job_id, error = %e, "cannot record the job end"),
    }
}
