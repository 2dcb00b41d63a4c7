//! PATCH(atelier 4, deadlines): a deadline for the reads of a connection.
//!
//! A per-read timeout does not bound a request: a client that sends one byte just before
//! each read times out holds its connection's thread for as long as it likes. So each read
//! is given only the time left to a deadline that the connection sets at the start of a
//! head and again at the start of a body.

use std::io;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The instant by which the reads of the current head or body must be done, if any.
#[derive(Default)]
pub struct Deadline {
    at: Mutex<Option<Instant>>,
}

impl Deadline {
    /// Sets the deadline `timeout` from now, or clears it.
    pub fn set(&self, timeout: Option<Duration>) {
        *self.at.lock().unwrap_or_else(|p| p.into_inner()) = timeout.map(|t| Instant::now() + t);
    }

    /// The time a read may take now: `Ok(None)` without a deadline, `Err(TimedOut)` once it
    /// has passed.
    pub fn left(&self) -> io::Result<Option<Duration>> {
        match *self.at.lock().unwrap_or_else(|p| p.into_inner()) {
            None => Ok(None),
            Some(at) => {
                let left = at.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    Err(timed_out())
                } else {
                    Ok(Some(left))
                }
            }
        }
    }
}

/// A read that timed out reports `WouldBlock` on Unix; the connection answers 408 only for
/// `TimedOut`, so a deadline's expiry is always reported as that.
pub fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "the request's deadline passed")
}

/// Maps a socket timeout's `WouldBlock` to `TimedOut` (see [`timed_out`]).
pub fn map_timeout(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::WouldBlock {
        timed_out()
    } else {
        e
    }
}
