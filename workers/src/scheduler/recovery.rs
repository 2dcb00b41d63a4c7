//! Restart recovery: a job no thread of this server runs (a previous server's, or one whose
//! job code panicked) is failed so that its commission retries, and its process group is
//! killed if it is still there.

use std::path::PathBuf;

use atelier_engine::{Commission, Executor, JobStatus};

use crate::error::WorkersError;
use crate::session::{job_end, record_finish, Finish};
use crate::shared::Shared;

/// Kills what a previous server left running and fails those attempts so they retry.
pub(crate) fn reconcile(shared: &Shared) -> Result<(), WorkersError> {
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
pub(super) fn fail_lost_job(shared: &Shared, c: &Commission, error: &str) {
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

/// A job's code panicked (a bug), so its end may not be on record: fail the attempt now, not
/// at the next start, so no commission stays running without a job. `attempt_at_start` is
/// the commission's attempt count when the job was handed out.
pub(super) fn after_panic(shared: &Shared, commission_id: u64, attempt_at_start: Option<u32>) {
    match shared.store.commission(commission_id) {
        Ok(Some(c)) if c.state.is_running() && c.active_job.is_some() => {
            fail_lost_job(shared, &c, "the server lost track of the job (an internal error)");
        }
        // It panicked before the job started: an attempt that fails (with backoff, counted),
        // not an instant retry in a loop.
        Ok(Some(c)) if Some(c.attempt) == attempt_at_start && !c.state.is_terminal() => {
            let executor = Executor::JobController;
            if let Some((job_id, _)) = shared.begin_job(&c, executor) {
                let error = "the server failed to start the job (an internal error)".to_string();
                shared.fail_unstarted(&c, job_id, executor, error, true);
            }
        }
        Ok(_) => {}
        Err(e) => {
            tracing::error!(commission = commission_id, error = %e, "cannot check the finished job's commission")
        }
    }
}
