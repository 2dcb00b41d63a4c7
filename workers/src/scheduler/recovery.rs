//! Recovery: a job no thread runs (a previous run's of this server, a lost node's, or one
//! whose job code panicked) is failed so that its commission retries, and its process group
//! is killed if it is still there and was started on this machine.

use std::path::PathBuf;

use atelier_engine::{Commission, Executor, JobStatus};

use crate::error::WorkersError;
use crate::session::{job_end, record_finish, Finish};
use crate::shared::Shared;

/// Fails the running jobs no live node runs (`EventStore::lost_jobs`), killing what is left
/// of those started on this machine: at start, a previous run's; then, on the maintainer,
/// those of nodes whose lease lapsed. Returns how many it failed.
pub(crate) fn rescue(shared: &Shared) -> Result<usize, WorkersError> {
    let lost = shared.store.lost_jobs()?;
    for job in &lost {
        let error = match (&job.node, job.here) {
            (_, true) => "server restarted".to_string(),
            (Some(node), false) => format!("node lost: {node} (its lease lapsed)"),
            (None, false) => "node lost".to_string(),
        };
        match shared.store.commission(job.commission_id) {
            // Read again: it may have moved on since it was listed.
            Ok(Some(c)) if c.active_job == Some(job.job_id) && c.state.is_running() => {
                fail_lost_job(shared, &c, &error, job.here)
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(commission = job.commission_id, error = %e, "cannot read a lost job's commission")
            }
        }
    }
    Ok(lost.len())
}

/// Fails the attempt of `c`'s active job, which no thread runs (a previous run's, a lost
/// node's, or one whose thread ended without recording it): its process group is killed
/// if it is still there and `here` (started on this machine; another node's pids mean
/// nothing here), and the attempt is retried.
pub(super) fn fail_lost_job(shared: &Shared, c: &Commission, error: &str, here: bool) {
    let Some(job_id) = c.active_job else { return };
    let executor = match shared.store.job(job_id) {
        Ok(Some(job)) => {
            if let (Executor::JobController, Some(pid), true) = (job.executor, job.process_id, here) {
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
            fail_lost_job(shared, &c, "the server lost track of the job (an internal error)", true);
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
