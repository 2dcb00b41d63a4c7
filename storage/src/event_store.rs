//! The one interface the rest of Atelier uses to reach the log ([`EventStore`]), and the
//! requests and outcomes that cross it. Backends implement it; nothing here knows sled.

use atelier_engine::time::Millis;
use atelier_engine::{Commission, Envelope, Event, Job, Rejection, State};

use crate::error::StorageError;
use crate::subscribe::{Filter, Subscription};

/// The longest the log writer waits for work before it goes round its loop again, idle
/// included, so that [`EventStore::writer_beats`] keeps moving while the writer is alive and
/// stops only when it is stuck (a watchdog reads it; see `src/systemd.rs`). A wake-up with
/// nothing to do costs a few atomic loads.
pub const WRITER_BEAT_INTERVAL_MS: u64 = 100;

/// Which commission an append is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AppendTarget {
    Existing(u64),
    /// A new commission: the store assigns its id. With an idempotency key (scoped by user), a
    /// second create with the same key returns the first commission instead.
    New {
        idempotency: Option<(String, String)>,
    },
}

#[derive(Clone, Debug)]
pub struct AppendRequest {
    pub target: AppendTarget,
    /// The commission's version the events were decided on (0 for a new commission).
    pub expected_version: u64,
    pub events: Vec<Event>,
    pub at: Millis,
}

/// The expected outcomes of an append. Failures (I/O, corruption) are `Err(StorageError)`.
#[derive(Clone, Debug)]
pub enum AppendOutcome {
    Appended {
        commission: Commission,
        first_seq: u64,
        last_seq: u64,
    },
    /// Someone else appended first; decide again on the fresh state.
    Conflict {
        current_version: u64,
    },
    /// The idempotency key was used before: this is the first commission.
    Duplicate {
        commission: Commission,
    },
    /// The events do not fit the state they would follow (the table or a rule refused them).
    Rejected(Rejection),
}

/// A page of a user's commissions, newest first.
#[derive(Clone, Debug)]
pub struct Page {
    pub items: Vec<Commission>,
    /// Pass back as `ListQuery::cursor` to get the next page.
    pub next_cursor: Option<u64>,
}

#[derive(Clone, Debug, Default)]
pub struct ListQuery {
    pub limit: usize,
    /// Commissions with an id below this (ids grow, so this pages backwards in time).
    pub cursor: Option<u64>,
    pub state: Option<State>,
}

/// The one interface to the log. Object safe so that servers hold an `Arc<dyn EventStore>`.
pub trait EventStore: Send + Sync + 'static {
    fn append(&self, req: AppendRequest) -> Result<AppendOutcome, StorageError>;
    fn commission(&self, id: u64) -> Result<Option<Commission>, StorageError>;
    /// One commission's events in version order.
    fn events_of(&self, id: u64) -> Result<Vec<Envelope>, StorageError>;
    /// Up to `limit` events of the global log with `seq > after`, in order.
    fn read_log(&self, after: u64, limit: usize) -> Result<Vec<Envelope>, StorageError>;
    fn list_user(&self, user_id: &str, query: &ListQuery) -> Result<Page, StorageError>;
    /// Every commission not in a terminal state (for executors at start-up).
    fn live_commissions(&self) -> Result<Vec<Commission>, StorageError>;
    fn job(&self, job_id: u64) -> Result<Option<Job>, StorageError>;
    fn jobs_of(&self, commission_id: u64) -> Result<Vec<Job>, StorageError>;
    /// A fresh, never reused job id.
    fn allocate_job_id(&self) -> Result<u64, StorageError>;
    /// Replays events after `after` that match `filter`, then follows the log live.
    fn subscribe(&self, after: u64, filter: Filter) -> Result<Subscription, StorageError>;
    /// The highest durable (acknowledged) sequence number.
    fn head_seq(&self) -> u64;
    /// Number of commissions in each state.
    fn state_counts(&self) -> Result<Vec<(State, u64)>, StorageError>;
    /// Whether the store takes writes: `Err` says why not (a failed commit poisoned it, or it
    /// was closed). A backend that cannot fail this way is always healthy.
    fn health(&self) -> Result<(), StorageError> {
        Ok(())
    }
    /// Subscribers cut off for being too slow, since the store opened.
    fn dropped_slow_total(&self) -> u64 {
        0
    }
    /// Group commits (durable writes of the log) since the store opened, and the append
    /// requests they carried; a backend without group commit reports `(0, 0)`.
    fn group_commit_totals(&self) -> (u64, u64) {
        (0, 0)
    }
    /// How many times the log writer thread has gone round its loop since the store opened:
    /// at least once every [`WRITER_BEAT_INTERVAL_MS`] while it is alive and not stuck in one
    /// step. `None` for a backend without a writer thread.
    fn writer_beats(&self) -> Option<u64> {
        None
    }
}
