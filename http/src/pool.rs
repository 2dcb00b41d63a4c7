//! The handler pool: a few threads with full-size stacks that run the work connection and
//! stream threads hand them (routing a request, reading a stream's history), so that those
//! threads, one per connection, can stay small.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crossbeam_channel::Receiver;

/// Threads running the routes for requests the connection threads parsed.
pub const HANDLER_THREADS: usize = 8;

/// Work for the handler pool: a request to route, or a stream's history read.
pub(crate) type Job = Box<dyn FnOnce() + Send>;

/// Handler threads: take jobs until shutdown.
pub(crate) fn handler_loop(jobs: &Receiver<Job>, shutting_down: &AtomicBool) {
    while !shutting_down.load(Ordering::SeqCst) {
        match jobs.recv_timeout(Duration::from_millis(500)) {
            Ok(job) => job(),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
        }
    }
}
