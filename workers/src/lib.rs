//! Executors for commissions: the job controller (one isolated worker process per job) and
//! the in-process task runner, behind one router that picks between them.
//!
//! The server calls [`WorkersConfig::load`], then [`Controller::start`]; the `atelier`
//! binary dispatches its hidden `__trampoline` and `__worker` subcommands to
//! [`trampoline_main`] and [`worker_main`]. Everything else is internal.

mod config;
mod contain;
mod controller;
pub mod janitor;
mod metrics;
mod pipeline;
mod png;
mod process;
pub mod protocol;
mod session;
mod task_runner;
mod trampoline;
mod worker;

pub use config::{Builtin, ConfigError, JobLimits, PipelineConfig, StageSpec, WorkersConfig};
pub use controller::{job_log_paths, Controller, WorkersError};
pub use pipeline::{derive_ideas, JobInput};
pub use trampoline::trampoline_main;
pub use worker::worker_main;
