//! The few questions the routes ask of the job executors, as a trait the binary implements:
//! http knows engine and storage, and nothing of the workers crate.

use std::path::PathBuf;

/// What the HTTP side needs from the executors, without depending on them.
pub trait Executors: Send + Sync {
    fn is_running(&self) -> bool;
    fn metrics_text(&self) -> String;
    fn job_log_paths(&self, job_id: u64) -> (PathBuf, PathBuf);
    /// Where the content-addressed artifacts are stored.
    fn artifacts_dir(&self) -> PathBuf;
    /// How long a finished job's dir (and its logs) is kept, in ms; `None`: for good.
    fn job_dirs_keep_ms(&self) -> Option<u64>;
    fn pipeline_exists(&self, name: &str) -> bool;
    /// The pipelines it runs, for the OpenAPI document.
    fn pipeline_names(&self) -> Vec<String>;
}
