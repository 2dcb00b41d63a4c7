//! The two executors, side by side: the job controller (`process/`, one isolated worker
//! process per job) and the task runner (`task_runner.rs`, a pool of threads in the server).
//! Both run the same pipeline code and report through a `Session`; the scheduler reaches a
//! running job of either through its `JobSignal` (`signal.rs`).

pub(crate) mod process;
pub(crate) mod signal;
pub(crate) mod task_runner;
