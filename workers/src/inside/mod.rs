//! The code that runs inside a worker process: the trampoline that limits and isolates it,
//! the worker that runs a pipeline, the pipeline's stages (and the PNG they draw), and the
//! line protocol it speaks to the server. This is what the interface stamp covers
//! (`build.rs`): a server refuses a worker program built from other sources of it.
//!
//! Nothing here imports the server's side of the crate (the scheduler, the executors);
//! the server's side imports what it hands to workers from here.

#[cfg(feature = "test-faults")]
mod faults;
pub(crate) mod interface;
pub(crate) mod pipe;
pub(crate) mod pipeline;
mod png;
pub(crate) mod private;
pub mod protocol;
pub(crate) mod trampoline;
pub(crate) mod worker;

pub use interface::INTERFACE;

/// Runs a hidden mode (`__trampoline`, `__worker`, `__interface`) if `args` (without the
/// program name) name one, and returns its exit code; `None` for anything else. Every binary
/// that can be a worker program dispatches through here, so they all answer the same.
pub fn run_hidden_mode(args: &[String]) -> Option<i32> {
    match args.first().map(String::as_str) {
        Some("__trampoline") => Some(trampoline::trampoline_main(&args[1..])),
        Some("__worker") => Some(worker::worker_main(&args[1..])),
        Some("__interface") => {
            println!("{INTERFACE}");
            Some(0)
        }
        _ => None,
    }
}
