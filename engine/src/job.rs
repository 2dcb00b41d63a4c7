//! Job records: one per attempt, built from `job_started` and `job_finished` events.

use serde::{Deserialize, Serialize};

use crate::event::{Envelope, Event, Executor, JobStatus};
use crate::time::Millis;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub job_id: u64,
    pub commission_id: u64,
    pub executor: Executor,
    pub job_name: String,
    pub attempt: u32,
    pub process_id: Option<u32>,
    pub status: JobStatus,
    pub created_at: Millis,
    pub started_at: Option<Millis>,
    pub completed_at: Option<Millis>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub error_message: Option<String>,
    pub max_rss_bytes: u64,
    pub cpu_ms: u64,
}

/// Folds one event into the job it concerns. Returns the job id and the new record, or `None`
/// when the event does not concern a job.
pub fn apply_job(current: impl FnOnce(u64) -> Option<Job>, env: &Envelope) -> Option<(u64, Job)> {
    match &env.event {
        Event::JobStarted { attempt, job_id, executor, job_name, pid } => Some((
            *job_id,
            Job {
                job_id: *job_id,
                commission_id: env.commission_id,
                executor: *executor,
                job_name: job_name.clone(),
                attempt: *attempt,
                process_id: *pid,
                status: JobStatus::Running,
                created_at: env.at,
                started_at: Some(env.at),
                completed_at: None,
                exit_code: None,
                signal: None,
                error_message: None,
                max_rss_bytes: 0,
                cpu_ms: 0,
            },
        )),
        Event::JobFinished(end) => {
            let mut job = current(end.job_id)?;
            job.status = end.status;
            job.completed_at = Some(env.at);
            job.exit_code = end.exit_code;
            job.signal = end.signal;
            job.error_message = end.error.clone();
            job.max_rss_bytes = end.max_rss_bytes;
            job.cpu_ms = end.cpu_ms;
            Some((end.job_id, job))
        }
        _ => None,
    }
}
