//! Executors for commissions: the job controller (one isolated worker process per job) and
//! the in-process task runner, behind one router that picks between them.
//!
//! The server calls [`WorkersConfig::load`], then [`Controller::start`]; the `atelier`
//! binary (and the small `atelier-worker`) dispatches its hidden `__trampoline` and `__worker`
//! subcommands to [`trampoline_main`] and [`worker_main`], and answers `__interface` with
//! [`INTERFACE`]; [`choose_worker_program`] picks which of the two a job runs. Everything else is internal.

mod config;
mod contain;
mod controller;
pub mod janitor;
mod metrics;
mod pipeline;
mod png;
mod process;
mod program;
pub mod protocol;
mod session;
mod task_runner;
mod trampoline;
mod worker;

pub use config::{Builtin, ConfigError, JobLimits, PipelineConfig, StageSpec, WorkersConfig};
pub use controller::{job_log_paths, Controller, WorkersError};
pub use pipeline::{derive_ideas, JobInput};
pub use program::{choose_worker_program, ProgramError, ProgramSource, WorkerProgram, INTERFACE};
pub use trampoline::trampoline_main;
pub use worker::worker_main;

/// Runs a hidden mode (`__trampoline`, `__worker`, `__interface`) if `args` (without the
/// program name) name one, and returns its exit code; `None` for anything else. Every binary
/// that can be a worker program dispatches through here, so they all answer the same.
pub fn run_hidden_mode(args: &[String]) -> Option<i32> {
    match args.first().map(String::as_str) {
        Some("__trampoline") => Some(trampoline_main(&args[1..])),
        Some("__worker") => Some(worker_main(&args[1..])),
        Some("__interface") => {
            println!("{INTERFACE}");
            Some(0)
        }
        _ => None,
    }
}
