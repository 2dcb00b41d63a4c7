//! Executors for commissions: the job controller (one isolated worker process per job) and
//! the in-process task runner, behind one router that picks between them.
//!
//! The server calls [`WorkersConfig::load`], then [`Workers::start`]; the `atelier` binary
//! (and the small `atelier-worker`) dispatches its hidden `__trampoline`, `__worker` and
//! `__interface` subcommands through [`run_hidden_mode`]; [`choose_worker_program`] picks
//! which of the two a job runs; [`DataDir`] says where everything lies under the data dir.
//!
//! Module map (each imports only modules further down, never one that imports it back):
//! - this file: the [`Workers`] facade, which starts and stops every thread;
//! - `scheduler/`: what runs next (messages, timers, the log feed, restart recovery);
//! - `executor/`: the job controller (`process/`: spawn, watch, classify) and the task runner;
//! - `shared.rs`, `session.rs`: what both executors share, and a job's talk with the log;
//! - `router.rs`: routing and rollback; `metrics.rs`: the Prometheus series;
//! - `error.rs`: the one error of starting and running the executors (wraps `worker_user`'s);
//! - `worker_user.rs`: who workers run as, and what of the data dir that user may reach;
//! - `inside/`: the code that runs inside a worker process (what the interface stamp covers);
//! - `paths.rs`, `config.rs`, `program.rs`, `contain.rs`, `janitor.rs`: leaves.

mod backup;
#[cfg(feature = "test-faults")]
mod ballast;
mod cgroup;
mod config;
mod contain;
mod error;
mod executor;
mod inside;
pub mod janitor;
mod metrics;
mod paths;
mod program;
mod router;
mod scheduler;
mod session;
mod shared;
mod worker_user;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use atelier_storage::{EventStore, Filter};
use crossbeam_channel::Sender;

pub use backup::{check_target, restore, BackupError, FetchArtifact, Restored};
pub use config::{Builtin, CgroupSetting, ConfigError, JobLimits, PipelineConfig, StageSpec, WorkersConfig};
pub use contain::become_undumpable;
pub use error::WorkersError;
pub use inside::pipeline::{derive_ideas, JobInput};
pub use inside::trampoline::trampoline_main;
pub use inside::worker::worker_main;
pub use inside::{protocol, run_hidden_mode};
pub use paths::DataDir;
pub use program::{choose_worker_program, ProgramError, ProgramSource, WorkerProgram, INTERFACE};
pub use scheduler::SCHEDULER_BEAT_INTERVAL_MS;
pub use worker_user::{Identity, UserSetting, WorkerUser, WorkerUserError, WORKER_USER_DEFAULT};

use error::io_err;
use executor::process::ProcessExecutor;
use executor::task_runner;
use metrics::Metrics;
use router::Router;
use scheduler::SchedulerThreads;
use shared::Shared;

/// A background loop that runs until its stop sender is dropped.
type StoppableThread = (Sender<()>, JoinHandle<()>);

/// The running workers: both executors, the scheduler that feeds them, the router and the
/// metrics, and the sweeps that clean up after jobs.
pub struct Workers {
    shared: Arc<Shared>,
    scheduler: Mutex<SchedulerThreads>,
    /// The scheduler's turns round its loop, read without its lock (a stop holds it).
    scheduler_beats: Arc<AtomicU64>,
    process: Arc<ProcessExecutor>,
    spawner: Mutex<Option<JoinHandle<()>>>,
    task_runner: Mutex<Option<task_runner::Pool>>,
    /// Dropping the sender stops the job-dir sweeper.
    janitor: Mutex<Option<StoppableThread>>,
    /// Dropping the sender stops the sweep for escaped processes (after one last sweep).
    reaper: Mutex<Option<StoppableThread>>,
    /// `ATELIER_BALLAST_MB` of resident memory, held only to be measured against.
    #[cfg(feature = "test-faults")]
    _ballast: Vec<u8>,
}

fn spawn_thread(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, WorkersError> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(f)
        .map_err(io_err(format!("start thread {name}")))
}

/// Who this server's workers run as (refused as the settings say), with the data dir laid out
/// for that user and the choice logged.
fn worker_user_for(config: &WorkersConfig, data_dir: &DataDir) -> Result<WorkerUser, WorkersError> {
    let worker_user = worker_user::resolve(
        &config.worker_user,
        config.allow_root_workers,
        nix::unistd::geteuid().as_raw(),
        &worker_user::system_lookup,
    )?;
    worker_user::prepare_data_dir(data_dir, worker_user)
        .map_err(io_err("lay out the data dir for the worker user"))?;
    match worker_user {
        WorkerUser::Dedicated(id) => tracing::info!(uid = id.uid, gid = id.gid, "workers run as their own user"),
        WorkerUser::RootAllowed => {
            tracing::warn!("workers run as root (allow_root_workers): a job can do anything root can")
        }
        WorkerUser::Server => tracing::info!(
            "workers run as the server's own user: a job can read and change everything the server can (see workers/README.md)"
        ),
    }
    Ok(worker_user)
}

impl Workers {
    /// Starts the executors. `exe` is the program worker processes run (the atelier binary
    /// or `atelier-worker`), `data_dir` the server's data dir (laid out as [`DataDir`] says).
    pub fn start(
        store: Arc<dyn EventStore>,
        config: WorkersConfig,
        data_dir: PathBuf,
        exe: PathBuf,
    ) -> Result<Workers, WorkersError> {
        // Workers run in their job dir: every path handed to them must not depend on our cwd.
        let data_dir = DataDir::absolute(&data_dir)
            .map_err(io_err("resolve the data dir"))?
            .with_artifacts(config.artifacts_dir.clone());
        let exe = std::path::absolute(&exe).map_err(io_err("resolve the executable path"))?;
        inside::private::create_dir_all(&data_dir.jobs()).map_err(io_err("create the jobs dir"))?;
        inside::private::create_dir_all(&data_dir.artifacts()).map_err(io_err("create the artifacts dir"))?;
        let worker_user = worker_user_for(&config, &data_dir)?;
        let metrics = Arc::new(Metrics::default());
        let shared = Arc::new(Shared {
            store,
            config,
            data_dir,
            metrics,
            router: Mutex::new(Router::new()),
            stopping: AtomicBool::new(false),
            worker_user,
        });
        // Before any job starts: what a job leaves behind must be re-parented to us.
        let contained = shared.config.contain_descendants
            && match contain::become_subreaper() {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot become a child subreaper; processes that leave their job's group are not ended");
                    false
                }
            };
        // Subscribe before reading the live set, so nothing falls between the two.
        let head = shared.store.head_seq();
        let sub = shared.store.subscribe(head, Filter::All)?;
        scheduler::recovery::rescue(&shared)?;
        let cgroups = if shared.config.use_job_controller {
            cgroup::Cgroups::start(&shared.config.cgroup, shared.data_dir.root())?
        } else {
            None
        };
        let (process, spawner) =
            ProcessExecutor::start(exe, cgroups).map_err(io_err("start thread atelier-spawner"))?;
        let process = Arc::new(process);
        let pool = task_runner::Pool::start(shared.clone(), shared.config.max_concurrent_jobs)
            .map_err(io_err("start the task runner"))?;
        let scheduler = SchedulerThreads::start(shared.clone(), process.clone(), pool.sender(), sub)?;
        let keep = janitor::Keep {
            job_dirs: shared.config.job_dirs_keep(),
            artifacts: shared.config.artifacts_keep(),
        };
        let janitor = match (keep.job_dirs, keep.artifacts) {
            (None, None) => None,
            _ => {
                let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
                let (store, dir) = (shared.store.clone(), shared.data_dir.clone());
                let handle = spawn_thread("atelier-janitor", move || {
                    janitor::sweep_loop(&*store, &dir, keep, &stop_rx)
                })?;
                Some((stop_tx, handle))
            }
        };
        let reaper = if contained {
            let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
            let metrics = shared.metrics.clone();
            let handle = spawn_thread("atelier-reaper", move || {
                contain::sweep_loop(&stop_rx, &|n| metrics.escapees_ended(n))
            })?;
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
        Ok(Workers {
            shared,
            scheduler_beats: scheduler.beats.clone(),
            scheduler: Mutex::new(scheduler),
            process,
            spawner: Mutex::new(Some(spawner)),
            task_runner: Mutex::new(Some(pool)),
            janitor: Mutex::new(janitor),
            reaper: Mutex::new(reaper),
            #[cfg(feature = "test-faults")]
            _ballast: ballast::from_env(),
        })
    }

    /// The pipelines commissions may name (the API can refuse others up front).
    pub fn pipeline_names(&self) -> Vec<String> {
        self.shared.config.pipelines.keys().cloned().collect()
    }

    pub fn has_pipeline(&self, name: &str) -> bool {
        self.shared.config.pipelines.contains_key(name)
    }

    /// How long a finished job's dir (and its logs) is kept; `None`: for good.
    pub fn job_dirs_keep(&self) -> Option<std::time::Duration> {
        self.shared.config.job_dirs_keep()
    }

    /// Where everything lies under the data dir.
    /// Where the job controller makes each job's cgroup, `job-{job_id}` in each of these
    /// dirs (one per hierarchy); empty when jobs get none (`[workers] cgroup`), and their
    /// limits are rlimits only.
    pub fn job_cgroup_parents(&self) -> Vec<PathBuf> {
        self.process.cgroup_parents()
    }

    pub fn data_dir(&self) -> &DataDir {
        &self.shared.data_dir
    }

    pub fn is_running(&self) -> bool {
        !self.shared.stopping.load(Ordering::Acquire)
            && self.scheduler.lock().map(|s| s.is_running()).unwrap_or(false)
            && self.spawner.lock().map(|s| s.as_ref().is_some_and(|h| !h.is_finished())).unwrap_or(false)
    }

    /// How many times the scheduler thread has gone round its loop: at least once every
    /// [`SCHEDULER_BEAT_INTERVAL_MS`] while it is alive and not stuck in one step (a watchdog
    /// reads it).
    pub fn scheduler_beats(&self) -> u64 {
        self.scheduler_beats.load(Ordering::Relaxed)
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
        stop_thread(&self.janitor);
        // The scheduler stops its jobs before it returns; then nothing spawns any more.
        let mut scheduler = self.scheduler.lock().unwrap_or_else(|p| p.into_inner());
        scheduler.stop();
        self.process.close();
        if let Some(pool) = self.task_runner.lock().ok().and_then(|mut p| p.take()) {
            pool.join();
        }
        if let Some(spawner) = self.spawner.lock().ok().and_then(|mut s| s.take()) {
            let _ = spawner.join();
        }
        scheduler.join_feed();
        // Jobs are over: one last sweep ends what they left behind.
        stop_thread(&self.reaper);
    }
}

/// Stops a background loop: drops its sender, then waits for it.
fn stop_thread(slot: &Mutex<Option<StoppableThread>>) {
    if let Some((stop, handle)) = slot.lock().ok().and_then(|mut s| s.take()) {
        drop(stop);
        let _ = handle.join();
    }
}

// The server shares the workers between its threads.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Workers>();
};

impl Drop for Workers {
    fn drop(&mut self) {
        self.shutdown();
    }
}
