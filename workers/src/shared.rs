//! What every thread of the workers shares (the store, the settings, the data dir's layout,
//! the metrics and the router), and the steps of a job that both executors take alike:
//! allocating its id, reading its input, failing an attempt that never started.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use atelier_engine::{Command, Commission, Executor, JobStatus};
use atelier_storage::{execute, EventStore};

use crate::config::{PipelineConfig, WorkersConfig};
use crate::inside::pipeline::JobInput;
use crate::metrics::Metrics;
use crate::paths::DataDir;
use crate::router::{RollbackReason, Router};
use crate::session::{ctx, job_end, record_finish, Finish, Session};
use crate::worker_user::WorkerUser;

/// What every thread of the workers shares.
pub(crate) struct Shared {
    pub(crate) store: Arc<dyn EventStore>,
    pub(crate) config: WorkersConfig,
    pub(crate) data_dir: DataDir,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) router: Mutex<Router>,
    pub(crate) stopping: AtomicBool,
    /// Who workers run as (`worker_user`), decided at start.
    pub(crate) worker_user: WorkerUser,
}

impl Shared {
    pub(crate) fn with_router<T>(&self, f: impl FnOnce(&mut Router, &WorkersConfig) -> T) -> T {
        let mut r = self.router.lock().unwrap_or_else(|p| p.into_inner());
        let out = f(&mut r, &self.config);
        let active = r.in_cooldown(Instant::now());
        self.metrics.set_rollback_active(active && self.config.auto_rollback);
        out
    }

    /// Tells the router how a job went; a rollback that this begins is counted.
    pub(crate) fn judge(&self, f: impl FnOnce(&mut Router, &WorkersConfig) -> Option<RollbackReason>) {
        if let Some(reason) = self.with_router(f) {
            self.metrics.rolled_back(reason);
        }
    }

    /// A job's conversation with the log, set up alike for both executors.
    pub(crate) fn session(&self, commission_id: u64, job_id: u64) -> Session {
        Session::new(
            self.store.clone(),
            commission_id,
            job_id,
            self.config.retry,
            Duration::from_millis(self.config.progress_update_interval_ms),
            self.metrics.clone(),
        )
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

    /// The job's dir (not created here: see `RunEnv::make_job_dir`) and what the job runs on.
    /// The input is not written to a file: workers get it on stdin (see `input_memfd`), since
    /// every file created costs an inode allocation, a visible share of a short job's cost.
    pub(crate) fn job_input(&self, c: &Commission, job_id: u64) -> Result<(PathBuf, JobInput), String> {
        let dir = self.data_dir.job(job_id);
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
}

/// The span every line about one commission's job is logged in (with the job's, below):
/// its ids are on every line, also on lines that do not name them.
pub(crate) fn commission_span(c: &Commission) -> tracing::Span {
    tracing::info_span!("commission", id = c.id, user = %c.user_id, pipeline = %c.pipeline)
}

pub(crate) fn job_span(job_id: u64, executor: Executor) -> tracing::Span {
    tracing::info_span!("job", id = job_id, executor = executor.as_str())
}
