//! The job routes: queue a job for a commission now (admin), a job's record, its logs.

use atelier_engine::{time, Command, Job, State};
use atelier_storage::{execute, StorageError};
use serde_json::Value;

use super::call::{tri, Call};
use super::commissions::{ctx, rejection, visible};
use super::input::{json_body, json_uint, parse_id};
use crate::clock::now_ms;
use crate::render;
use crate::reply::{error, Reply};

/// Makes a commission runnable now: a queued one is already, a failed one is retried by hand,
/// one waiting on its backoff is run now rather than at `next_retry_at`.
pub(super) fn create(call: &Call<'_>) -> Result<Reply, StorageError> {
    let body: Value = tri!(json_body(call.req));
    let Some(id) = body.get("task_id").and_then(json_uint) else {
        return Ok(error(400, "invalid_field", "task_id: required, a positive integer"));
    };
    let shared = call.shared;
    let c = tri!(visible(shared, call.me(), id)?);
    let pending = || Reply::Json(201, render::job_queued(id));
    Ok(match c.state {
        State::Created => pending(),
        State::Failed | State::Retrying => {
            let cmd = if c.state == State::Failed { Command::ManualRetry } else { Command::RetryNow };
            match execute(&*shared.store, id, cmd, &ctx())? {
                Ok(_) => pending(),
                Err(r) => rejection(r),
            }
        }
        s => match c.active_job.map(|j| shared.store.job(j)).transpose()?.flatten() {
            Some(job) => error(409, "job_active", format!("job {} is already running it ({s})", job.job_id)),
            None => error(409, "not_runnable", format!("the commission is {s}; it is not waiting for a job")),
        },
    })
}

pub(super) fn status(call: &Call<'_>) -> Result<Reply, StorageError> {
    let (_, job) = tri!(visible_job(call)?);
    Ok(Reply::Json(200, render::job(&job)))
}

pub(super) fn logs(call: &Call<'_>) -> Result<Reply, StorageError> {
    let (id, job) = tri!(visible_job(call)?);
    let Some(ex) = &call.shared.executors else {
        return Ok(error(404, "not_found", "no executor keeps logs here"));
    };
    let (out, err) = ex.job_log_paths(id);
    if logs_swept(job.completed_at, ex.job_dirs_keep_ms(), now_ms()) {
        return Ok(error(410, "gone", format!("no logs are kept for job {id}: its working dir is gone (a finished job's dir is removed ATELIER_JOB_DIRS_KEEP_DAYS after it ended)")));
    }
    Ok(Reply::Json(200, render::job_logs(id, read_log(&out), read_log(&err))))
}

/// The most of each of a job's logs (stdout, stderr) one answer carries: a log is read up to
/// this, never whole (a pipeline's `log_bytes_max` may be far larger).
const JOB_LOG_SERVED_BYTES_MAX: u64 = 1024 * 1024;

/// At most [`JOB_LOG_SERVED_BYTES_MAX`] of a job's log, from its start. The job's dir is the
/// worker's to fill (`worker_files`): anything but a regular file, like a missing one, reads
/// as empty.
fn read_log(path: &std::path::Path) -> String {
    let bytes = super::worker_files::read_capped(path, JOB_LOG_SERVED_BYTES_MAX).unwrap_or_default();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The job named by the path and its id, if its commission is one the caller may see (404
/// otherwise, as for a job that does not exist).
fn visible_job(call: &Call<'_>) -> Result<Result<(u64, Job), Reply>, StorageError> {
    let id = match parse_id(call.params[0], "job id") {
        Ok(id) => id,
        Err(reply) => return Ok(Err(reply)),
    };
    let Some(job) = call.shared.store.job(id)? else {
        return Ok(Err(error(404, "not_found", format!("no job {id}"))));
    };
    Ok(visible(call.shared, call.me(), job.commission_id)?.map(|_| (id, job)))
}

/// Whether a job's logs are past the keep time, so the job-dir sweep has removed them.
/// Decided by time, not by the dir: a job that never wrote anything never had a dir (it is
/// made on first use), and its logs are empty, not gone.
fn logs_swept(completed_at: Option<time::Millis>, keep_ms: Option<u64>, now: time::Millis) -> bool {
    match (completed_at, keep_ms) {
        (Some(ended), Some(keep)) => ended.saturating_add(i64::try_from(keep).unwrap_or(i64::MAX)) <= now,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jobs_logs_are_gone_only_past_the_keep_time() {
        let day: u64 = 86_400_000;
        let later = |ms: u64| 1_000 + i64::try_from(ms).unwrap();
        assert!(!logs_swept(None, Some(day), i64::MAX), "a running job's logs are never gone");
        assert!(!logs_swept(Some(1_000), None, i64::MAX), "keep for good");
        assert!(!logs_swept(Some(1_000), Some(day), later(day) - 1));
        assert!(logs_swept(Some(1_000), Some(day), later(day)));
        assert!(!logs_swept(Some(1_000), Some(u64::MAX), i64::MAX - 1), "no overflow");
    }
}
