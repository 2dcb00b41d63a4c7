//! The worker process's end of its contract with the server: the protocol pipe's descriptor,
//! the reporter that writes protocol lines to it, and the exit codes the controller reads
//! (`executor/process/classify.rs`). Shared by the worker and its fault modes.

use std::fs::File;
use std::io::Write;

use super::pipeline::{Reporter, Stop};
use super::protocol::Message;

/// The protocol pipe's descriptor in a worker.
pub const PROTOCOL_FD: i32 = 3;
pub const EXIT_OK: i32 = 0;
pub const EXIT_USAGE: i32 = 2;
/// The protocol pipe is missing or closed.
pub const EXIT_PIPE: i32 = 3;

/// Writes protocol lines to the pipe: whole lines per `write`, so lines never interleave.
pub(crate) struct PipeReporter {
    pub(crate) pipe: File,
}

impl Reporter for PipeReporter {
    fn send(&mut self, msg: Message) -> Result<(), Stop> {
        self.pipe.write_all(msg.to_line().as_bytes()).map_err(|e| Stop(format!("protocol pipe: {e}")))
    }

    /// One write for all of them: the controller's job thread wakes once, not once per line.
    fn send_all(&mut self, msgs: Vec<Message>) -> Result<(), Stop> {
        let lines: String = msgs.iter().map(Message::to_line).collect();
        self.pipe.write_all(lines.as_bytes()).map_err(|e| Stop(format!("protocol pipe: {e}")))
    }
}
