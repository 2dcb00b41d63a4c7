//! The job controller: runs each job in its own worker process, isolated and limited (see
//! `inside/trampoline.rs`), from job id to recorded outcome.
//!
//! - `spawn.rs` gets the worker running (one spawner thread, so PDEATHSIG holds);
//! - `watch.rs` follows it to its end on one thread per job, in one `poll`;
//! - `classify.rs` turns however it ended into exactly one outcome.

mod classify;
mod spawn;
mod watch;

use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use atelier_engine::{Command, Commission, Executor};
use atelier_storage::{execute, EventStore};

use self::classify::{Applied, MEMORY_ERROR_PREFIX};
use self::spawn::{SpawnedWorker, Spawner};
use self::watch::Watched;
use crate::config::PipelineConfig;
use crate::executor::signal::JobSignal;
use crate::session::{ctx, record_finish, Finish};
use crate::shared::{commission_span, job_span, Shared};

/// The job controller's executor: its spawner, shared by the job threads.
pub(crate) struct ProcessExecutor {
    spawner: Spawner,
}

impl ProcessExecutor {
    /// Starts the spawner thread; workers run `exe`.
    pub(crate) fn start(
        exe: PathBuf,
        cgroups: Option<crate::cgroup::Cgroups>,
    ) -> std::io::Result<(ProcessExecutor, JoinHandle<()>)> {
        let (spawner, handle) = Spawner::start(exe, cgroups)?;
        Ok((ProcessExecutor { spawner }, handle))
    }

    /// Where each job's cgroup is made (one dir per hierarchy; none without cgroups).
    pub(crate) fn cgroup_parents(&self) -> Vec<PathBuf> {
        self.spawner.cgroup_parents()
    }

    /// No more workers are spawned (shutdown).
    pub(crate) fn close(&self) {
        self.spawner.close();
    }

    /// One job on the job controller, from job id to recorded outcome.
    pub(crate) fn run_job(&self, shared: &Shared, c: Commission, signal: &JobSignal, ready: Instant) {
        let executor = Executor::JobController;
        let _commission = commission_span(&c).entered();
        let Some((job_id, p)) = shared.begin_job(&c, executor) else { return };
        let _job = job_span(job_id, executor).entered();
        let prepared = shared
            .job_input(&c, job_id)
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
            own_program: p.command.is_some(),
        };
        let spawn_started = Instant::now();
        let spawned = self.spawner.spawn_worker(shared, &p, &dir, &input, &spec_file, &applied);
        // `_known` and `cgroup` live to the end of this function, past the reap (`watch::watch`
        // or the refused start's wait): until then a sweep leaves the worker alone
        // (`contain`), and the cgroup goes only once its job has ended.
        let SpawnedWorker { pid, known: _known, proto_r, out_r, err_r, cgroup } = match spawned {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(commission = c.id, job = job_id, error = %e, "cannot spawn a worker");
                shared.judge(|r, cfg| r.spawn_failed(cfg, Instant::now()));
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
        let start = Command::StartJob { job_id, executor, job_name: p.name.clone(), pid: Some(pid) };
        let rejected = match execute(&*shared.store, c.id, start, &ctx(shared.config.retry)) {
            Ok(Ok(_)) => None,
            Ok(Err(r)) => Some(r.to_string()),
            Err(e) => Some(e.to_string()),
        };
        if let Some(why) = rejected {
            // Cancelled (or started elsewhere) meanwhile: this process must not run.
            tracing::info!(commission = c.id, job = job_id, reason = %why, "start refused; killing the worker");
            let pid = i32::try_from(pid).expect("invariant: pids fit i32");
            watch::kill_job(pid, cgroup.as_ref(), nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
            let _ = crate::worker_user::take_back_job_dir(&dir, shared.worker_user);
            return;
        }
        tracing::info!(commission = c.id, job = job_id, pid, pipeline = %p.name, memory_mb, "job started");
        shared.metrics.job_started(executor);
        let started = Instant::now();
        let mut session = shared.session(c.id, job_id);
        let watched = Watched {
            pid,
            proto_r,
            out_r,
            err_r,
            logs: shared.data_dir.job_logs(job_id),
            log_bytes_max: shared.config.log_bytes_max_for(&p),
            kill_grace: Duration::from_millis(shared.config.kill_grace_ms),
            cgroup: cgroup.as_ref(),
        };
        let ended = watch::watch(watched, &mut session, signal, &applied);
        // The worker is gone (its group killed, itself reaped): no later job may enter its dir.
        if let Err(e) = crate::worker_user::take_back_job_dir(&dir, shared.worker_user) {
            tracing::warn!(commission = c.id, job = job_id, error = %e, "cannot take the job dir back from the worker user");
        }
        let took = started.elapsed();
        let succeeded = matches!(ended.finish, Finish::Complete { .. });
        shared.judge(|r, cfg| r.record(cfg, ended.infra_failure, succeeded.then_some(took), Instant::now()));
        shared.metrics.job_finished(executor, ended.finish.outcome(), took);
        if let Some(bytes) = ended.finish.max_rss_bytes() {
            shared.metrics.worker_max_rss(bytes);
        }
        record_finish(
            &*shared.store,
            shared.config.retry,
            c.id,
            executor,
            session.take_batch(),
            ended.finish,
        );
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

/// The pipeline's spec for workers, at `DataDir::pipeline_spec`: one file per
/// distinct spec, shared by its jobs (written once instead of once per job; files are a good
/// share of a short job's cost). Named by content, so a changed spec never reuses a stale file.
fn pipeline_file(shared: &Shared, p: &PipelineConfig, job_id: u64) -> Result<PathBuf, String> {
    use sha2::{Digest, Sha256};
    let spec = serde_json::to_vec(p).map_err(|e| format!("cannot encode the pipeline: {e}"))?;
    let hash: String = Sha256::digest(&spec).iter().take(8).map(|b| format!("{b:02x}")).collect();
    let dir = shared.data_dir.pipeline_specs();
    let path = shared.data_dir.pipeline_spec(&p.name, &hash);
    if path.exists() {
        return Ok(path);
    }
    crate::inside::private::create_dir_all(&dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    // Written aside and renamed, so a worker never reads half a file.
    let tmp = shared.data_dir.pipeline_spec_tmp(&p.name, &hash, job_id);
    crate::inside::private::create_file(&tmp)
        .and_then(|mut f| std::io::Write::write_all(&mut f, &spec))
        .and_then(|()| crate::worker_user::share_spec_file(&tmp, shared.worker_user))
        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &path).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(path)
}
