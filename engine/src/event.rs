//! Events: the facts appended to the log. All state is a fold of these.
//!
//! The declaration order of variants and fields is the on-disk encoding (see storage's codec):
//! add new variants at the end and never reorder. Free-form JSON (context, result) is stored as
//! its text so the binary codec does not need a self-describing format.

use serde::{Deserialize, Serialize};

use crate::state::Stage;
use crate::time::Millis;

/// Which executor ran a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Executor {
    /// A worker process per job, started by the job controller.
    JobController,
    /// The in-process thread pool (no isolation).
    TaskRunner,
}

impl Executor {
    pub fn as_str(self) -> &'static str {
        match self {
            Executor::JobController => "job_controller",
            Executor::TaskRunner => "task_runner",
        }
    }
}

/// How a job ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Pending,
    Running,
    Succeeded,
    Failed,
    Killed,
    TimedOut,
}

impl JobStatus {
    /// The job has ended, one way or another.
    pub fn is_finished(self) -> bool {
        !matches!(self, JobStatus::Pending | JobStatus::Running)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Pending => "pending",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Killed => "killed",
            JobStatus::TimedOut => "timed_out",
        }
    }
}

/// What the kernel and the controller know about a job that has ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobEnd {
    pub job_id: u64,
    pub status: JobStatus,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub error: Option<String>,
    pub max_rss_bytes: u64,
    pub cpu_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    Created {
        user_id: String,
        pipeline: String,
        priority: i32,
        scheduled_for: Option<Millis>,
        /// A JSON object, as text.
        context: String,
        idempotency_key: Option<String>,
        max_attempts: u32,
    },
    JobStarted {
        attempt: u32,
        job_id: u64,
        executor: Executor,
        job_name: String,
        pid: Option<u32>,
    },
    StageEntered {
        stage: Stage,
    },
    Progress {
        stage: Stage,
        percent: u8,
        message: Option<String>,
    },
    Artifact {
        stage: Stage,
        kind: String,
        uri: String,
    },
    /// A retryable failure; the commission waits in `retrying` until `next_retry_at`.
    AttemptFailed {
        attempt: u32,
        error: String,
        retryable: bool,
        next_retry_at: Millis,
    },
    /// The backoff of a `retrying` commission ran out; it is queued again.
    RetryDue,
    Completed {
        /// A JSON value, as text.
        result: String,
    },
    /// Failed for good: a permanent error, or the last attempt failed.
    Failed {
        attempt: u32,
        error: String,
        retryable: bool,
    },
    CancelRequested,
    Cancelled,
    /// A person asked to run a failed commission again; it is queued with a fresh attempt budget.
    RetryRequested,
    /// A job's record closes: how it ended and what it used.
    JobFinished(JobEnd),
}

/// The kind of an event without its fields: the key of the transition table and the SSE
/// `event:` name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Created,
    JobStarted,
    StageEntered,
    Progress,
    Artifact,
    AttemptFailed,
    RetryDue,
    Completed,
    Failed,
    CancelRequested,
    Cancelled,
    RetryRequested,
    JobFinished,
}

impl EventKind {
    pub const ALL: [EventKind; 13] = [
        EventKind::Created,
        EventKind::JobStarted,
        EventKind::StageEntered,
        EventKind::Progress,
        EventKind::Artifact,
        EventKind::AttemptFailed,
        EventKind::RetryDue,
        EventKind::Completed,
        EventKind::Failed,
        EventKind::CancelRequested,
        EventKind::Cancelled,
        EventKind::RetryRequested,
        EventKind::JobFinished,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Created => "created",
            EventKind::JobStarted => "job_started",
            EventKind::StageEntered => "stage_entered",
            EventKind::Progress => "progress",
            EventKind::Artifact => "artifact",
            EventKind::AttemptFailed => "attempt_failed",
            EventKind::RetryDue => "retry_due",
            EventKind::Completed => "completed",
            EventKind::Failed => "failed",
            EventKind::CancelRequested => "cancel_requested",
            EventKind::Cancelled => "cancelled",
            EventKind::RetryRequested => "retry_requested",
            EventKind::JobFinished => "job_finished",
        }
    }

    /// Terminal events end a per-commission stream.
    pub fn is_terminal(self) -> bool {
        matches!(self, EventKind::Completed | EventKind::Failed | EventKind::Cancelled)
    }
}

impl Event {
    pub fn kind(&self) -> EventKind {
        match self {
            Event::Created { .. } => EventKind::Created,
            Event::JobStarted { .. } => EventKind::JobStarted,
            Event::StageEntered { .. } => EventKind::StageEntered,
            Event::Progress { .. } => EventKind::Progress,
            Event::Artifact { .. } => EventKind::Artifact,
            Event::AttemptFailed { .. } => EventKind::AttemptFailed,
            Event::RetryDue => EventKind::RetryDue,
            Event::Completed { .. } => EventKind::Completed,
            Event::Failed { .. } => EventKind::Failed,
            Event::CancelRequested => EventKind::CancelRequested,
            Event::Cancelled => EventKind::Cancelled,
            Event::RetryRequested => EventKind::RetryRequested,
            Event::JobFinished(_) => EventKind::JobFinished,
        }
    }
}

/// An event as stored: where it sits in the global log and in its commission's history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Global, gap-free sequence number, starting at 1.
    pub seq: u64,
    pub commission_id: u64,
    /// The commission's version after this event; its first event has version 1.
    pub version: u64,
    pub at: Millis,
    pub event: Event,
}
