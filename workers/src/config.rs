//! Executor settings and pipeline definitions, validated once at start from the raw settings
//! layer (`atelier_config::Sources`: the `[workers]` and `[pipelines.NAME]` tables of
//! `atelier.toml` and the environment, which wins over the file).
//!
//! Every key is checked: an unknown key, a wrong type or a value out of range is a
//! [`ConfigError`] that names the key, so a typo fails the start instead of silently running
//! with a default.

use std::collections::BTreeMap;
use std::path::PathBuf;

pub use atelier_config::ConfigError;
use atelier_config::{Raw, Sources};
use atelier_engine::{RetryPolicy, Stage};
use serde::{Deserialize, Serialize};

pub use crate::cgroup::CgroupSetting;

/// Upper bounds for per-pipeline limits; a value above them is almost certainly a typo.
pub const MEMORY_MB_MAX: u64 = 64 * 1024;
pub const MEMORY_MB_MIN: u64 = 16;
pub const CPU_SECONDS_MAX: u64 = 24 * 3600;
pub const TIMEOUT_SECONDS_MAX: u64 = 7 * 24 * 3600;
pub const NOFILE_MAX: u64 = 65_536;
pub const NPROC_MAX: u64 = 65_536;
pub const FSIZE_MB_MAX: u64 = 64 * 1024;
pub const MAX_CONCURRENT_JOBS_MAX: usize = 1024;
/// Stage commands: at most this many arguments.
pub const COMMAND_ARGS_MAX: usize = 256;

/// A step a stage can run inside the worker (or the task runner) without a process of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Builtin {
    /// Reports 100 % and does nothing.
    Noop,
    /// Derives three product ideas from the context's title and text.
    Ideas,
    /// Renders a PNG for the first idea into the job dir.
    RenderImage,
    /// Stores the rendered image content-addressed under the artifacts dir.
    ArtifactStore,
    /// Builds the product record from the idea and the stored image.
    Product,
    /// Fails the attempt: retryable when the context says `"fail": "retryable"`, else for good.
    Fail,
}

impl Builtin {
    pub const ALL: [Builtin; 6] = [
        Builtin::Noop,
        Builtin::Ideas,
        Builtin::RenderImage,
        Builtin::ArtifactStore,
        Builtin::Product,
        Builtin::Fail,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Builtin::Noop => "noop",
            Builtin::Ideas => "ideas",
            Builtin::RenderImage => "render_image",
            Builtin::ArtifactStore => "artifact_store",
            Builtin::Product => "product",
            Builtin::Fail => "fail",
        }
    }

    pub fn parse(s: &str) -> Option<Builtin> {
        Builtin::ALL.into_iter().find(|b| b.as_str() == s)
    }

    /// What the `commission` pipeline runs in each stage.
    pub fn default_for(stage: Stage) -> Builtin {
        match stage {
            Stage::GeneratingIdeas => Builtin::Ideas,
            Stage::CreatingImages => Builtin::RenderImage,
            Stage::Uploading => Builtin::ArtifactStore,
            Stage::CreatingProducts => Builtin::Product,
        }
    }
}

/// What one stage runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageSpec {
    Builtin(Builtin),
    /// An external program: gets the stage input as JSON on stdin and speaks the protocol for
    /// its stage on stdout (progress, artifact, heartbeat lines, then one `result` whose JSON
    /// object is merged into the pipeline state, or an `error`); see `pipeline::run_command`.
    Command(Vec<String>),
}

/// Resource bounds of one job. Units last.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobLimits {
    /// Memory of the first attempt: the job cgroup's limit (resident memory), or without one
    /// the worker's address-space limit (RLIMIT_AS).
    pub memory_mb: u64,
    /// After a memory-limit failure the next attempt gets twice the memory, up to this.
    pub memory_max_mb: u64,
    pub cpu_seconds: u64,
    /// Wall-clock limit of one attempt.
    pub timeout_seconds: u64,
    pub nofile_max: u64,
    /// Processes (and threads) of the job: the job cgroup's `pids.max`, or without one
    /// RLIMIT_NPROC (which counts every process of the user).
    pub nproc_max: u64,
    /// Largest file the worker may write (RLIMIT_FSIZE).
    pub fsize_mb: u64,
}

impl Default for JobLimits {
    fn default() -> Self {
        JobLimits {
            memory_mb: 512,
            memory_max_mb: 4096,
            cpu_seconds: 120,
            timeout_seconds: 600,
            nofile_max: 256,
            nproc_max: 1024,
            fsize_mb: 256,
        }
    }
}

/// One pipeline: what runs in each stage, with which limits and environment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineConfig {
    pub name: String,
    pub limits: JobLimits,
    /// Indexed by [`Stage::index`].
    pub stages: [StageSpec; 4],
    /// When set, the job process is this program instead of the built-in worker; it speaks the
    /// worker protocol itself (input JSON on stdin, protocol lines on fd 3).
    pub command: Option<Vec<String>>,
    /// Extra arguments for the built-in worker (hidden test modes such as `--behave oom`).
    pub worker_args: Vec<String>,
    /// Variables set in the worker's otherwise empty environment (PATH is always passed).
    pub env: BTreeMap<String, String>,
    /// Server variables passed through by name.
    pub pass_env: Vec<String>,
    /// A worker silent for longer than this is stalled; `None` uses the `[workers]` default.
    pub heartbeat_timeout_ms: Option<u64>,
    /// Each of a job's stdout and stderr logs is cut at this size; `None` uses the
    /// `[workers]` default (`log_bytes_max`).
    pub log_bytes_max: Option<u64>,
}

impl PipelineConfig {
    fn builtin(name: &str, stages: [StageSpec; 4]) -> PipelineConfig {
        PipelineConfig {
            name: name.to_string(),
            limits: JobLimits::default(),
            stages,
            command: None,
            worker_args: Vec::new(),
            env: BTreeMap::new(),
            pass_env: Vec::new(),
            heartbeat_timeout_ms: None,
            log_bytes_max: None,
        }
    }

    pub fn noop() -> PipelineConfig {
        PipelineConfig::builtin("noop", std::array::from_fn(|_| StageSpec::Builtin(Builtin::Noop)))
    }

    /// Fails in its first stage (for tests and demos of failure and retry).
    pub fn fail() -> PipelineConfig {
        let mut p = PipelineConfig::commission();
        p.name = "fail".into();
        p.stages[0] = StageSpec::Builtin(Builtin::Fail);
        p
    }

    pub fn commission() -> PipelineConfig {
        PipelineConfig::builtin("commission", Stage::ALL.map(|s| StageSpec::Builtin(Builtin::default_for(s))))
    }
}

/// The user a root server hands workers to when `[workers] user` is not set (see
/// `worker_user`, where the policy lives).
pub const WORKER_USER_DEFAULT: &str = "atelier-worker";

/// `[workers] user` as configured.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum UserSetting {
    /// Not set: [`WORKER_USER_DEFAULT`] under a root server, the server's own user otherwise.
    #[default]
    Default,
    Name(String),
    Uid(u32),
}

impl UserSetting {
    /// A name, or a uid when it is all digits.
    pub fn parse(text: &str) -> UserSetting {
        match text.trim().parse::<u32>() {
            Ok(uid) => UserSetting::Uid(uid),
            Err(_) => UserSetting::Name(text.trim().to_string()),
        }
    }
}

impl std::fmt::Display for UserSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UserSetting::Default => write!(f, "'{WORKER_USER_DEFAULT}'"),
            UserSetting::Name(name) => write!(f, "'{name}'"),
            UserSetting::Uid(uid) => write!(f, "uid {uid}"),
        }
    }
}

/// Days a finished job's working dir is kept (see `janitor`).
pub const JOB_DIRS_KEEP_DAYS_DEFAULT: u64 = 7;
/// Days an artifact no commission references is kept after its file last changed (see
/// `janitor`).
pub const ARTIFACTS_KEEP_DAYS_DEFAULT: u64 = 7;
const SECONDS_PER_DAY: u64 = 86_400;

/// Settings of both executors and the pipelines they run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkersConfig {
    /// USE_JOB_CONTROLLER: run jobs as isolated worker processes.
    pub use_job_controller: bool,
    /// KEEP_TASK_RUNNER: keep the in-process thread pool as a fallback (and for rollback).
    pub keep_task_runner: bool,
    /// JOB_CONTROLLER_PRIORITY: the router takes the enabled executor with the highest
    /// priority; the task runner has `task_runner_priority`.
    pub job_controller_priority: i32,
    pub task_runner_priority: i32,
    /// MAX_CONCURRENT_JOBS: jobs running at once, both executors together.
    pub max_concurrent_jobs: usize,
    /// PROGRESS_UPDATE_INTERVAL: at most one progress event per stage per interval.
    pub progress_update_interval_ms: u64,
    /// Share of commissions (by id) routed to the job controller while it is healthy.
    pub job_controller_rollout_percent: u8,
    /// Roll back to the task runner when the controller's recent failure rate exceeds this.
    pub rollback_failure_rate_percent: u8,
    /// Recent controller jobs the failure rate is computed over.
    pub rollback_window_jobs: u32,
    /// No rollback on fewer finished jobs than this (one failure of two is not a trend).
    pub rollback_min_jobs: u32,
    /// How long a rollback lasts before the controller gets traffic again.
    pub rollback_cooldown_ms: u64,
    /// Roll back when the controller's median time of recent succeeded jobs exceeds the task
    /// runner's by this much (150: 1.5×), once both have `rollback_min_jobs` of them; 0: never.
    pub rollback_slowdown_percent: u32,
    pub auto_rollback: bool,
    /// Between SIGTERM and SIGKILL on cancel and shutdown.
    pub kill_grace_ms: u64,
    pub heartbeat_timeout_ms: u64,
    /// Each of a job's stdout and stderr files is cut at this size.
    pub log_bytes_max: u64,
    /// A finished job's working dir (and its logs) is removed this many days after the job
    /// ended; 0 keeps them forever.
    pub job_dirs_keep_days: u64,
    /// An artifact that no commission in the store references is removed once its file is
    /// this many days old (and older than the longest job may run); 0 keeps them forever.
    pub artifacts_keep_days: u64,
    /// ARTIFACTS_DIR: where artifacts are stored and served from instead of the data dir's
    /// `artifacts/` (absolute); servers sharing one PostgreSQL log share one such dir.
    pub artifacts_dir: Option<PathBuf>,
    /// CGROUP: a cgroup per job (`auto`, `off`, or a delegated parent's path); see `cgroup`.
    pub cgroup: CgroupSetting,
    pub retry: RetryPolicy,
    pub pipelines: BTreeMap<String, PipelineConfig>,
    /// Make the process a child subreaper and end whatever a job leaves behind outside its
    /// process group (`contain`). Off in the library: it kills every child of the process that
    /// the controller did not start, which only the server may do to itself. `atelier serve`
    /// turns it on.
    pub contain_descendants: bool,
    /// `user`: who workers run as under a root server (`worker_user`).
    pub worker_user: UserSetting,
    /// Lets a root server run workers as root when no worker user can be had.
    pub allow_root_workers: bool,
}

impl Default for WorkersConfig {
    fn default() -> Self {
        let mut pipelines = BTreeMap::new();
        for p in [PipelineConfig::noop(), PipelineConfig::commission(), PipelineConfig::fail()] {
            pipelines.insert(p.name.clone(), p);
        }
        WorkersConfig {
            use_job_controller: true,
            keep_task_runner: true,
            job_controller_priority: 10,
            task_runner_priority: 0,
            max_concurrent_jobs: 3,
            progress_update_interval_ms: 1000,
            job_controller_rollout_percent: 100,
            rollback_failure_rate_percent: 5,
            rollback_window_jobs: 100,
            rollback_min_jobs: 20,
            rollback_cooldown_ms: 60_000,
            rollback_slowdown_percent: 150,
            auto_rollback: true,
            kill_grace_ms: 5_000,
            heartbeat_timeout_ms: 30_000,
            log_bytes_max: 1024 * 1024,
            job_dirs_keep_days: JOB_DIRS_KEEP_DAYS_DEFAULT,
            artifacts_keep_days: ARTIFACTS_KEEP_DAYS_DEFAULT,
            artifacts_dir: None,
            cgroup: CgroupSetting::Auto,
            retry: RetryPolicy::default(),
            pipelines,
            contain_descendants: false,
            worker_user: UserSetting::Default,
            allow_root_workers: false,
        }
    }
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::invalid(key, reason)
}

/// The `[workers]` settings: TOML key, environment name (also looked up with an `ATELIER_`
/// prefix, which wins).
const SETTINGS: &[(&str, &str)] = &[
    ("use_job_controller", "USE_JOB_CONTROLLER"),
    ("keep_task_runner", "KEEP_TASK_RUNNER"),
    ("job_controller_priority", "JOB_CONTROLLER_PRIORITY"),
    ("task_runner_priority", "TASK_RUNNER_PRIORITY"),
    ("max_concurrent_jobs", "MAX_CONCURRENT_JOBS"),
    ("progress_update_interval_seconds", "PROGRESS_UPDATE_INTERVAL"),
    ("job_controller_rollout_percent", "JOB_CONTROLLER_ROLLOUT_PERCENT"),
    ("rollback_failure_rate_percent", "ROLLBACK_FAILURE_RATE_PERCENT"),
    ("rollback_window_jobs", "ROLLBACK_WINDOW_JOBS"),
    ("rollback_min_jobs", "ROLLBACK_MIN_JOBS"),
    ("rollback_cooldown_ms", "ROLLBACK_COOLDOWN_MS"),
    ("rollback_slowdown_percent", "ROLLBACK_SLOWDOWN_PERCENT"),
    ("auto_rollback", "AUTO_ROLLBACK"),
    ("kill_grace_ms", "KILL_GRACE_MS"),
    ("heartbeat_timeout_ms", "HEARTBEAT_TIMEOUT_MS"),
    ("log_bytes_max", "JOB_LOG_BYTES_MAX"),
    ("job_dirs_keep_days", "JOB_DIRS_KEEP_DAYS"),
    ("artifacts_keep_days", "ARTIFACTS_KEEP_DAYS"),
    ("artifacts_dir", "ARTIFACTS_DIR"),
    ("cgroup", "CGROUP"),
    ("retry_base_ms", "RETRY_BASE_MS"),
    ("retry_cap_ms", "RETRY_CAP_MS"),
    ("user", "WORKER_USER"),
    ("allow_root_workers", "ALLOW_ROOT_WORKERS"),
];

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).expect("invariant: range-checked to be non-negative")
}

impl WorkersConfig {
    /// How long a finished job's dir (and its logs) is kept; `None` (0 days): for good, and
    /// no sweep runs. The one reading of `job_dirs_keep_days`, for the sweep and for the API.
    pub fn job_dirs_keep(&self) -> Option<std::time::Duration> {
        (self.job_dirs_keep_days > 0)
            .then(|| std::time::Duration::from_secs(self.job_dirs_keep_days.saturating_mul(SECONDS_PER_DAY)))
    }

    /// How old an artifact no commission references must be before the janitor removes it;
    /// `None` (0 days): never. Never less than the longest a job may run (the pipelines'
    /// `timeout_seconds`): a running job may store an artifact long before it reports it.
    pub fn artifacts_keep(&self) -> Option<std::time::Duration> {
        let longest_job_s = self.pipelines.values().map(|p| p.limits.timeout_seconds).max().unwrap_or(0);
        (self.artifacts_keep_days > 0).then(|| {
            std::time::Duration::from_secs(
                self.artifacts_keep_days.saturating_mul(SECONDS_PER_DAY).max(longest_job_s),
            )
        })
    }

    /// `toml_text`: the whole atelier.toml if present (its `[workers]` and `[pipelines.NAME]`
    /// tables are read, other tables are left to their owners); `env`: looks up environment
    /// variables, which win over the file.
    pub fn load(
        toml_text: Option<&str>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<WorkersConfig, ConfigError> {
        WorkersConfig::from_sources(&Sources::from_text(toml_text, env)?)
    }

    /// The executors' settings from the raw settings layer; an error names the key and, for a
    /// key of the file, its line.
    pub fn from_sources(sources: &Sources<'_>) -> Result<WorkersConfig, ConfigError> {
        WorkersConfig::from_sources_unlocated(sources).map_err(|e| sources.locate(e))
    }

    fn from_sources_unlocated(sources: &Sources<'_>) -> Result<WorkersConfig, ConfigError> {
        let doc = sources.top_level();
        let empty = toml::Table::new();
        let workers = match doc.get("workers") {
            None => &empty,
            Some(toml::Value::Table(t)) => t,
            Some(_) => return Err(invalid("workers", "must be a table")),
        };
        for key in workers.keys() {
            if !SETTINGS.iter().any(|(k, _)| k == key) {
                return Err(ConfigError::unknown(format!("workers.{key}")));
            }
        }
        let mut cfg = WorkersConfig::default();
        for (key, env_name) in SETTINGS {
            let prefixed = format!("ATELIER_{env_name}");
            let Some(found) = sources.get(&format!("workers.{key}"), &[&prefixed, env_name]) else {
                continue;
            };
            cfg.set(key, &found.raw, found.origin.name())?;
        }
        if !cfg.use_job_controller && !cfg.keep_task_runner {
            return Err(invalid(
                "workers.keep_task_runner",
                "with use_job_controller = false the task runner is the only executor and must be kept",
            ));
        }
        if cfg.retry.cap_ms < cfg.retry.base_ms {
            return Err(invalid("workers.retry_cap_ms", "must be at least retry_base_ms"));
        }
        match doc.get("pipelines") {
            None => {}
            Some(toml::Value::Table(pipes)) => {
                for (name, value) in pipes {
                    let p = parse_pipeline(name, value)?;
                    cfg.pipelines.insert(name.clone(), p);
                }
            }
            Some(_) => return Err(invalid("pipelines", "must be a table of [pipelines.NAME] tables")),
        }
        Ok(cfg)
    }

    fn set(&mut self, key: &str, raw: &Raw<'_>, name: &str) -> Result<(), ConfigError> {
        match key {
            "use_job_controller" => self.use_job_controller = raw.bool(name)?,
            "keep_task_runner" => self.keep_task_runner = raw.bool(name)?,
            "auto_rollback" => self.auto_rollback = raw.bool(name)?,
            "job_controller_priority" => {
                self.job_controller_priority =
                    i32::try_from(raw.int(name, -1000, 1000)?).expect("invariant: in range")
            }
            "task_runner_priority" => {
                self.task_runner_priority =
                    i32::try_from(raw.int(name, -1000, 1000)?).expect("invariant: in range")
            }
            "max_concurrent_jobs" => {
                let max = i64::try_from(MAX_CONCURRENT_JOBS_MAX).expect("invariant: small");
                self.max_concurrent_jobs =
                    usize::try_from(raw.int(name, 1, max)?).expect("invariant: in range")
            }
            "progress_update_interval_seconds" => {
                self.progress_update_interval_ms = raw.seconds_ms(name, 3600)?
            }
            "job_controller_rollout_percent" => {
                self.job_controller_rollout_percent =
                    u8::try_from(raw.int(name, 0, 100)?).expect("invariant: in range")
            }
            "rollback_failure_rate_percent" => {
                self.rollback_failure_rate_percent =
                    u8::try_from(raw.int(name, 0, 100)?).expect("invariant: in range")
            }
            "rollback_window_jobs" => {
                self.rollback_window_jobs =
                    u32::try_from(raw.int(name, 1, 100_000)?).expect("invariant: in range")
            }
            "rollback_min_jobs" => {
                self.rollback_min_jobs =
                    u32::try_from(raw.int(name, 1, 100_000)?).expect("invariant: in range")
            }
            "rollback_cooldown_ms" => self.rollback_cooldown_ms = to_u64(raw.int(name, 0, 86_400_000)?),
            "rollback_slowdown_percent" => {
                let v = u32::try_from(raw.int(name, 0, 10_000)?).expect("invariant: in range");
                if v != 0 && v < 100 {
                    return Err(invalid(
                        name,
                        format!("{v} is below 100 (the task runner's own speed); 0 turns it off"),
                    ));
                }
                self.rollback_slowdown_percent = v;
            }
            "kill_grace_ms" => self.kill_grace_ms = to_u64(raw.int(name, 0, 600_000)?),
            "heartbeat_timeout_ms" => self.heartbeat_timeout_ms = to_u64(raw.int(name, 50, 86_400_000)?),
            "log_bytes_max" => self.log_bytes_max = to_u64(raw.int(name, 0, 1 << 40)?),
            "job_dirs_keep_days" => self.job_dirs_keep_days = to_u64(raw.int(name, 0, 36_500)?),
            "artifacts_keep_days" => self.artifacts_keep_days = to_u64(raw.int(name, 0, 36_500)?),
            "artifacts_dir" => {
                let dir = PathBuf::from(raw.text().trim());
                if !dir.is_absolute() {
                    return Err(invalid(name, format!("{} is not an absolute path", dir.display())));
                }
                self.artifacts_dir = Some(dir);
            }
            "cgroup" => {
                self.cgroup = CgroupSetting::parse(raw.text().trim()).map_err(|e| invalid(name, e))?
            }
            "retry_base_ms" => self.retry.base_ms = to_u64(raw.int(name, 0, 86_400_000)?),
            "retry_cap_ms" => self.retry.cap_ms = to_u64(raw.int(name, 0, 86_400_000)?),
            "user" => {
                self.worker_user = match raw {
                    Raw::Toml(toml::Value::Integer(_)) => UserSetting::Uid(
                        u32::try_from(raw.int(name, 0, i64::from(u32::MAX))?).expect("invariant: in range"),
                    ),
                    Raw::Toml(toml::Value::String(_)) | Raw::Env(_) => UserSetting::parse(&raw.text()),
                    Raw::Toml(v) => {
                        return Err(invalid(
                            name,
                            format!("expected a user name or uid, got {}", v.type_str()),
                        ))
                    }
                }
            }
            "allow_root_workers" => self.allow_root_workers = raw.bool(name)?,
            _ => unreachable!("invariant: SETTINGS lists every key set() handles"),
        }
        Ok(())
    }

    /// The heartbeat timeout for `pipeline`.
    pub fn heartbeat_timeout_ms_for(&self, pipeline: &PipelineConfig) -> u64 {
        pipeline.heartbeat_timeout_ms.unwrap_or(self.heartbeat_timeout_ms)
    }

    /// Where each of `pipeline`'s job logs is cut.
    pub fn log_bytes_max_for(&self, pipeline: &PipelineConfig) -> u64 {
        pipeline.log_bytes_max.unwrap_or(self.log_bytes_max)
    }
}

const PIPELINE_KEYS: &[&str] = &[
    "memory_mb",
    "memory_max_mb",
    "cpu_seconds",
    "timeout_seconds",
    "nofile_max",
    "nproc_max",
    "fsize_mb",
    "stages",
    "command",
    "worker_args",
    "env",
    "pass_env",
    "heartbeat_timeout_ms",
    "log_bytes_max",
];

fn parse_pipeline(name: &str, value: &toml::Value) -> Result<PipelineConfig, ConfigError> {
    let prefix = format!("pipelines.{name}");
    if name.is_empty()
        || name.len() > atelier_engine::limits::PIPELINE_NAME_BYTES_MAX
        || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    {
        return Err(invalid(&prefix, "pipeline names use only a-z, 0-9, '_' and '-'"));
    }
    let toml::Value::Table(t) = value else {
        return Err(invalid(&prefix, "must be a table"));
    };
    for key in t.keys() {
        if !PIPELINE_KEYS.contains(&key.as_str()) {
            return Err(ConfigError::unknown(format!("{prefix}.{key}")));
        }
    }
    // A configured pipeline starts from the built-in one of the same name, if any, else from
    // the `commission` stages: a table that only overrides one stage keeps the others.
    let mut p = match name {
        "noop" => PipelineConfig::noop(),
        "fail" => PipelineConfig::fail(),
        _ => PipelineConfig::commission(),
    };
    p.name = name.to_string();
    let int = |key: &str, min: u64, max: u64| -> Result<Option<u64>, ConfigError> {
        let full = format!("{prefix}.{key}");
        match t.get(key) {
            None => Ok(None),
            Some(v) => {
                let min_i = i64::try_from(min).expect("invariant: small");
                let max_i = i64::try_from(max).expect("invariant: small");
                Raw::Toml(v).int(&full, min_i, max_i).map(|v| Some(to_u64(v)))
            }
        }
    };
    if let Some(v) = int("memory_mb", MEMORY_MB_MIN, MEMORY_MB_MAX)? {
        p.limits.memory_mb = v;
        p.limits.memory_max_mb = p.limits.memory_max_mb.max(v);
    }
    if let Some(v) = int("memory_max_mb", MEMORY_MB_MIN, MEMORY_MB_MAX)? {
        p.limits.memory_max_mb = v;
    }
    if p.limits.memory_max_mb < p.limits.memory_mb {
        return Err(invalid(&format!("{prefix}.memory_max_mb"), "must be at least memory_mb"));
    }
    if let Some(v) = int("cpu_seconds", 1, CPU_SECONDS_MAX)? {
        p.limits.cpu_seconds = v;
    }
    if let Some(v) = int("timeout_seconds", 1, TIMEOUT_SECONDS_MAX)? {
        p.limits.timeout_seconds = v;
    }
    if let Some(v) = int("nofile_max", 16, NOFILE_MAX)? {
        p.limits.nofile_max = v;
    }
    if let Some(v) = int("nproc_max", 1, NPROC_MAX)? {
        p.limits.nproc_max = v;
    }
    if let Some(v) = int("fsize_mb", 1, FSIZE_MB_MAX)? {
        p.limits.fsize_mb = v;
    }
    p.heartbeat_timeout_ms = int("heartbeat_timeout_ms", 50, 86_400_000)?;
    p.log_bytes_max = int("log_bytes_max", 0, 1 << 40)?;
    if let Some(v) = t.get("command") {
        p.command = Some(parse_command(&format!("{prefix}.command"), v)?);
    }
    if let Some(v) = t.get("worker_args") {
        p.worker_args = string_list(&format!("{prefix}.worker_args"), v)?;
    }
    if let Some(v) = t.get("pass_env") {
        p.pass_env = string_list(&format!("{prefix}.pass_env"), v)?;
    }
    if let Some(v) = t.get("env") {
        let key = format!("{prefix}.env");
        let toml::Value::Table(env) = v else {
            return Err(invalid(&key, "must be a table of strings"));
        };
        for (k, v) in env {
            let toml::Value::String(s) = v else {
                return Err(invalid(&format!("{key}.{k}"), "must be a string"));
            };
            if k.is_empty() || k.contains('=') || k.contains('\0') || s.contains('\0') {
                return Err(invalid(&format!("{key}.{k}"), "not a valid environment variable"));
            }
            p.env.insert(k.clone(), s.clone());
        }
    }
    if let Some(v) = t.get("stages") {
        let key = format!("{prefix}.stages");
        let toml::Value::Table(stages) = v else {
            return Err(invalid(&key, "must be a table"));
        };
        for (stage_name, spec) in stages {
            let skey = format!("{key}.{stage_name}");
            let stage = Stage::parse(stage_name).ok_or_else(|| ConfigError::unknown(skey.clone()))?;
            p.stages[stage.index()] = parse_stage(&skey, spec)?;
        }
    }
    Ok(p)
}

fn parse_stage(key: &str, v: &toml::Value) -> Result<StageSpec, ConfigError> {
    let toml::Value::Table(t) = v else {
        return Err(invalid(key, "must be a table with `command` or `builtin`"));
    };
    for k in t.keys() {
        if k != "command" && k != "builtin" {
            return Err(ConfigError::unknown(format!("{key}.{k}")));
        }
    }
    match (t.get("command"), t.get("builtin")) {
        (Some(c), None) => Ok(StageSpec::Command(parse_command(&format!("{key}.command"), c)?)),
        (None, Some(toml::Value::String(b))) => Builtin::parse(b).map(StageSpec::Builtin).ok_or_else(|| {
            let known: Vec<&str> = Builtin::ALL.iter().map(|b| b.as_str()).collect();
            invalid(&format!("{key}.builtin"), format!("unknown builtin '{b}' (known: {})", known.join(", ")))
        }),
        (None, Some(_)) => Err(invalid(&format!("{key}.builtin"), "must be a string")),
        (Some(_), Some(_)) => Err(invalid(key, "give either `command` or `builtin`, not both")),
        (None, None) => Err(invalid(&format!("{key}.command"), "missing: give `command` or `builtin`")),
    }
}

fn parse_command(key: &str, v: &toml::Value) -> Result<Vec<String>, ConfigError> {
    let args = string_list(key, v)?;
    if args.is_empty() || args[0].is_empty() {
        return Err(invalid(key, "must name a program"));
    }
    if args.len() > COMMAND_ARGS_MAX {
        return Err(invalid(key, format!("more than {COMMAND_ARGS_MAX} arguments")));
    }
    Ok(args)
}

fn string_list(key: &str, v: &toml::Value) -> Result<Vec<String>, ConfigError> {
    let toml::Value::Array(items) = v else {
        return Err(invalid(key, "must be an array of strings"));
    };
    items
        .iter()
        .map(|i| match i {
            toml::Value::String(s) if !s.contains('\0') => Ok(s.clone()),
            _ => Err(invalid(key, "must be an array of strings")),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<WorkersConfig, ConfigError> {
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        WorkersConfig::load(Some(text), &|k| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
    }

    #[test]
    fn job_dirs_are_kept_for_the_days_configured_and_zero_keeps_them_for_good() {
        assert_eq!(
            WorkersConfig::default().job_dirs_keep(),
            Some(std::time::Duration::from_secs(7 * 86_400))
        );
        assert_eq!(load("[workers]\njob_dirs_keep_days = 0\n", &[]).unwrap().job_dirs_keep(), None);
        assert_eq!(
            load("", &[("JOB_DIRS_KEEP_DAYS", "2")]).unwrap().job_dirs_keep(),
            Some(std::time::Duration::from_secs(2 * 86_400))
        );
    }

    /// Unreferenced artifacts are kept for the days configured, never less than the longest a
    /// job may run, and for good with 0.
    #[test]
    fn artifacts_are_kept_at_least_as_long_as_a_job_may_run() {
        let day = std::time::Duration::from_secs(86_400);
        assert_eq!(WorkersConfig::default().artifacts_keep(), Some(7 * day));
        assert_eq!(load("[workers]\nartifacts_keep_days = 0\n", &[]).unwrap().artifacts_keep(), None);
        let slow = "[workers]\nartifacts_keep_days = 1\n[pipelines.slow]\ntimeout_seconds = 172800\n";
        assert_eq!(load(slow, &[]).unwrap().artifacts_keep(), Some(2 * day));
    }

    #[test]
    fn defaults_without_file() {
        let cfg = WorkersConfig::load(None, &|_| None).expect("defaults load");
        assert_eq!(cfg.max_concurrent_jobs, 3);
        assert_eq!(cfg.job_controller_priority, 10);
        assert_eq!(cfg.progress_update_interval_ms, 1000);
        assert!(cfg.use_job_controller && cfg.keep_task_runner);
        assert!(cfg.pipelines.contains_key("noop") && cfg.pipelines.contains_key("commission"));
    }

    #[test]
    fn file_then_env() {
        let text = "[server]\nport = 1\n[workers]\nmax_concurrent_jobs = 5\nprogress_update_interval_seconds = 0.25\n";
        let cfg = load(text, &[]).expect("loads");
        assert_eq!((cfg.max_concurrent_jobs, cfg.progress_update_interval_ms), (5, 250));
        let cfg = load(text, &[("MAX_CONCURRENT_JOBS", "7"), ("ATELIER_PROGRESS_UPDATE_INTERVAL", "0")])
            .expect("loads");
        assert_eq!((cfg.max_concurrent_jobs, cfg.progress_update_interval_ms), (7, 0));
    }

    #[test]
    fn pipeline_table() {
        let text = r#"
[pipelines.shop]
memory_mb = 512
cpu_seconds = 120
timeout_seconds = 600
stages.generating_ideas = { command = ["python3", "ideas.py"] }
stages.uploading = { builtin = "artifact_store" }
"#;
        let cfg = load(text, &[]).expect("loads");
        let shop = &cfg.pipelines["shop"];
        assert_eq!(shop.stages[0], StageSpec::Command(vec!["python3".into(), "ideas.py".into()]));
        assert_eq!(shop.stages[1], StageSpec::Builtin(Builtin::RenderImage));
        assert_eq!(shop.stages[2], StageSpec::Builtin(Builtin::ArtifactStore));
        assert_eq!(shop.limits.cpu_seconds, 120);
    }

    #[test]
    fn errors_name_the_key() {
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
        let cases: &[Case] = &[
            ("[workers]\nmax_concurent_jobs = 2", &[], "workers.max_concurent_jobs"),
            ("[workers]\nmax_concurrent_jobs = 0", &[], "workers.max_concurrent_jobs"),
            ("", &[("MAX_CONCURRENT_JOBS", "lots")], "MAX_CONCURRENT_JOBS"),
            ("[pipelines.a]\nstages.painting = { builtin = \"noop\" }", &[], "pipelines.a.stages.painting"),
            (
                "[pipelines.a]\nstages.uploading = { builtin = \"ftp\" }",
                &[],
                "pipelines.a.stages.uploading.builtin",
            ),
            ("[pipelines.a]\nstages.uploading = { }", &[], "pipelines.a.stages.uploading.command"),
            (
                "[pipelines.a]\nstages.uploading = { command = [] }",
                &[],
                "pipelines.a.stages.uploading.command",
            ),
            ("[pipelines.a]\nmemory_mb = 1", &[], "pipelines.a.memory_mb"),
            ("[pipelines.a]\ncpu_seconds = 999999999", &[], "pipelines.a.cpu_seconds"),
            ("[pipelines.a]\ncolour = 1", &[], "pipelines.a.colour"),
            (
                "[workers]\nuse_job_controller = false\nkeep_task_runner = false",
                &[],
                "workers.keep_task_runner",
            ),
            ("[workers]\nrollback_slowdown_percent = 50", &[], "workers.rollback_slowdown_percent"),
            ("", &[("ROLLBACK_SLOWDOWN_PERCENT", "99")], "ROLLBACK_SLOWDOWN_PERCENT"),
        ];
        for (text, env, key) in cases {
            let err = load(text, env).expect_err(text);
            assert!(err.to_string().contains(key), "{text}: {err} should name {key}");
        }
        // And the line, for a key of the file.
        let text = "[workers]\nmax_concurrent_jobs = 2\n\n[pipelines.a]\nmemory_mb = 256\nstages.uploading = { builtin = \"ftp\" }\n";
        let err = load(text, &[]).expect_err(text);
        assert_eq!(err.to_string(), "config file line 6: setting 'pipelines.a.stages.uploading.builtin': unknown builtin 'ftp' (known: noop, ideas, render_image, artifact_store, product, fail)");
        let err = load("[workers]\n# a comment\nmax_concurent_jobs = 2\n", &[]).expect_err("typo");
        assert_eq!(err.to_string(), "config file line 3: unknown setting 'workers.max_concurent_jobs'");
        let err = load("", &[("MAX_CONCURRENT_JOBS", "lots")]).expect_err("env");
        assert!(!err.to_string().contains("line"), "{err}");
    }
}
