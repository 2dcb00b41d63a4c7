//! Retention: terminal commissions older than the configured age are pruned from the store,
//! checked once an hour. It is a plain function the server's main loop calls on every tick,
//! so it needs no thread of its own and stops with the loop.

use std::time::{Duration, Instant};

use crate::sled_store::SledStore;

/// How often retention looks for commissions to prune.
pub const RETENTION_CHECK_INTERVAL: Duration = Duration::from_secs(3600);
const SECONDS_PER_DAY: u64 = 86_400;

/// Prunes terminal commissions older than `keep_days`, at most once per
/// [`RETENTION_CHECK_INTERVAL`]; the first call prunes at once.
pub struct Retention {
    keep: Duration,
    last_check: Option<Instant>,
}

impl Retention {
    pub fn days(keep_days: u64) -> Retention {
        Retention { keep: Duration::from_secs(keep_days.saturating_mul(SECONDS_PER_DAY)), last_check: None }
    }

    /// Prunes if a check is due; `now_ms`: the wall clock, in ms since the Unix epoch. A failure
    /// is logged and retried at the next check: retention must not stop the server.
    pub fn tick(&mut self, store: &SledStore, now_ms: i64) {
        if self.last_check.is_some_and(|at| at.elapsed() < RETENTION_CHECK_INTERVAL) {
            return;
        }
        self.last_check = Some(Instant::now());
        let keep_ms = i64::try_from(self.keep.as_millis()).unwrap_or(i64::MAX);
        match store.prune_terminal_before(now_ms.saturating_sub(keep_ms)) {
            Ok(n) if n > 0 => tracing::info!(pruned = n, "retention pruned terminal commissions"),
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "retention failed"),
        }
    }
}
