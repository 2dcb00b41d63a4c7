//! The one error type of starting and running the executors. Each variant keeps its cause as
//! `source()`, so the binary can print the whole chain and nothing is flattened to text.

use atelier_storage::StorageError;

use crate::cgroup::CgroupError;
use crate::worker_user::WorkerUserError;

#[derive(Debug)]
pub enum WorkersError {
    Storage(StorageError),
    Io {
        context: String,
        source: std::io::Error,
    },
    /// No user to run workers as that the settings allow.
    WorkerUser(WorkerUserError),
    /// The configured cgroup parent cannot be used (`[workers] cgroup`).
    Cgroup(CgroupError),
}

impl std::fmt::Display for WorkersError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The cause is part of the message too: callers that print only `Display` (the
        // binary's one-line error) must still say what went wrong.
        match self {
            WorkersError::Storage(e) => write!(f, "workers: {e}"),
            WorkersError::Io { context, source } => write!(f, "workers: {context}: {source}"),
            WorkersError::WorkerUser(e) => write!(f, "workers: {e}"),
            WorkersError::Cgroup(e) => write!(f, "workers: a cgroup per job ([workers] cgroup): {e}"),
        }
    }
}

impl std::error::Error for WorkersError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            WorkersError::Storage(e) => Some(e),
            WorkersError::Io { source, .. } => Some(source),
            // The message is the error itself, already in `Display`: only its own cause follows.
            WorkersError::WorkerUser(e) => e.source(),
            WorkersError::Cgroup(e) => Some(e),
        }
    }
}

impl From<WorkerUserError> for WorkersError {
    fn from(e: WorkerUserError) -> Self {
        WorkersError::WorkerUser(e)
    }
}

impl From<CgroupError> for WorkersError {
    fn from(e: CgroupError) -> Self {
        WorkersError::Cgroup(e)
    }
}

impl From<StorageError> for WorkersError {
    fn from(e: StorageError) -> Self {
        WorkersError::Storage(e)
    }
}

/// Wraps an I/O error with what was being done, for `map_err`.
pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> WorkersError {
    let context = context.into();
    move |source| WorkersError::Io { context, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cause_is_kept_as_the_source() {
        let e = io_err("create the jobs dir")(std::io::Error::other("disk full"));
        assert_eq!(e.to_string(), "workers: create the jobs dir: disk full");
        let source = std::error::Error::source(&e).expect("an I/O error has its cause");
        assert_eq!(source.to_string(), "disk full");
    }
}
