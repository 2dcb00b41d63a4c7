//! Retention: terminal commissions older than the configured age are pruned from the store,
//! checked once an hour. It is a plain function the server's main loop calls on every tick,
//! so it needs no thread of its own and stops with the loop.

use std::time::{Duration, Instant};

use crate::error::StorageError;
use crate::pg_store::PgStore;
use crate::sled_store::SledStore;

/// A store retention can prune: both backends, each on its writer thread.
pub trait Prune: Send + Sync {
    /// Prunes the terminal commissions last changed before `before` (ms since the epoch); how
    /// many went.
    fn prune_terminal_before(&self, before: atelier_engine::time::Millis) -> Result<u64, StorageError>;
}

impl Prune for SledStore {
    fn prune_terminal_before(&self, before: atelier_engine::time::Millis) -> Result<u64, StorageError> {
        SledStore::prune_terminal_before(self, before)
    }
}

impl Prune for PgStore {
    fn prune_terminal_before(&self, before: atelier_engine::time::Millis) -> Result<u64, StorageError> {
        PgStore::prune_terminal_before(self, before)
    }
}

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
    pub fn tick(&mut self, store: &dyn Prune, now_ms: i64) {
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
