//! The interface stamp, apart from everything it stamps so that the trampoline and the
//! server's program check can both read it without importing each other.

/// The interface stamp (`build.rs`): equal stamps, same trampoline arguments, job input,
/// pipeline file and line protocol.
pub const INTERFACE: &str = env!("ATELIER_WORKER_INTERFACE");
