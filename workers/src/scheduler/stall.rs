//! Test scaffolding (`test-faults` builds only): `ATELIER_TEST_SCHEDULER_STALL=AFTER_MS:FOR_MS`
//! blocks the scheduler thread once, `AFTER_MS` after it starts, for `FOR_MS`, as a scheduler
//! stuck in one step would be. The end-to-end watchdog test (`tests/e2e/systemd.rs`) checks
//! that the service manager's pings stop while it is stuck and come back after.

use std::time::{Duration, Instant};

/// The environment variable that asks for a stall.
const STALL_ENV: &str = "ATELIER_TEST_SCHEDULER_STALL";

/// A stall still to come.
pub(super) struct Stall {
    at: Instant,
    length: Duration,
}

impl Stall {
    /// The stall the environment asks for, counted from now; none when unset or unparsable.
    pub(super) fn from_env() -> Option<Stall> {
        let v = std::env::var(STALL_ENV).ok()?;
        let (after, length) = v.split_once(':')?;
        let (after, length) = (after.trim().parse::<u64>().ok()?, length.trim().parse::<u64>().ok()?);
        tracing::warn!(
            after_ms = after,
            for_ms = length,
            "the scheduler will stall ({STALL_ENV}); for tests only"
        );
        Some(Stall {
            at: Instant::now() + Duration::from_millis(after),
            length: Duration::from_millis(length),
        })
    }

    /// Blocks the calling thread once the stall is due; `true` once it has stalled.
    pub(super) fn block_if_due(&self) -> bool {
        if Instant::now() < self.at {
            return false;
        }
        std::thread::sleep(self.length);
        true
    }
}
