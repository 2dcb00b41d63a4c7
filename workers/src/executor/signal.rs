//! How the scheduler reaches a running job of either executor: a request slot (cancel or
//! shutdown) plus, for process jobs, a pipe that wakes the job's poll. It lives apart from
//! both executors because the scheduler raises it and both executors read it.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;

use nix::fcntl::OFlag;

/// What a running job is asked to do from outside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Request {
    None = 0,
    Cancel = 1,
    Shutdown = 2,
    /// This node lost its lease: another node will take the job over, so it ends at once
    /// (no grace), and whatever it reports is refused.
    Abandon = 3,
}

/// A request slot plus a pipe that wakes the job's poll. The first request wins.
pub(crate) struct JobSignal {
    state: AtomicU8,
    wake_w: Mutex<Option<OwnedFd>>,
    pub(crate) wake_r: Option<OwnedFd>,
}

impl JobSignal {
    /// With a wake pipe (for process jobs).
    pub(crate) fn with_pipe() -> std::io::Result<JobSignal> {
        let (r, w) =
            nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).map_err(std::io::Error::from)?;
        Ok(JobSignal { state: AtomicU8::new(0), wake_w: Mutex::new(Some(w)), wake_r: Some(r) })
    }

    /// Without one (for in-process jobs, which check the slot themselves).
    pub(crate) fn plain() -> JobSignal {
        JobSignal { state: AtomicU8::new(0), wake_w: Mutex::new(None), wake_r: None }
    }

    pub(crate) fn raise(&self, r: Request) {
        let _ = self.state.compare_exchange(0, r as u8, Ordering::AcqRel, Ordering::Acquire);
        let guard = self.wake_w.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = guard.as_ref() {
            let _ = nix::unistd::write(w, &[1]);
        }
    }

    pub(crate) fn get(&self) -> Request {
        match self.state.load(Ordering::Acquire) {
            1 => Request::Cancel,
            2 => Request::Shutdown,
            3 => Request::Abandon,
            _ => Request::None,
        }
    }
}
