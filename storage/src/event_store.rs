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

/// A running commission's job that no live node runs: its node's lease lapsed, or it is an
/// earlier run of this node's (a crash or a restart), or no node is on record for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LostJob {
    pub commission_id: u64,
    pub job_id: u64,
    /// Started by this node (an earlier run of it, on this machine): what is left of its
    /// processes may be killed here. A job of another node's never is.
    pub here: bool,
    /// The node that started it, when one is on record.
    pub node: Option<String>,
}

/// One node of the servers sharing a database, as `GET /api/cluster` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub id: String,
    /// Which run of the node holds the lease: one more at each start.
    pub incarnation: u64,
    pub host: String,
    pub pid: u32,
    /// RFC 3339, by the database's clock.
    pub started_at: String,
    pub heartbeat_at: String,
    pub lease_until: String,
    /// Whether its lease holds now.
    pub alive: bool,
    /// Whether it runs the maintenance (rescue of lost jobs, retention) now.
    pub maintainer: bool,
    /// The commissions whose running jobs it started: (commission, job).
    pub running: Vec<(u64, u64)>,
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
    /// Takes commission `commission_id` at `version` for this node to start, so that one
    /// node alone spawns its job (the append of `job_started` at that version decides in the
    /// end; this keeps the others from spawning at all). `false`: another live node has it.
    /// A store that is never shared has every commission to itself.
    fn claim(&self, commission_id: u64, version: u64) -> Result<bool, StorageError> {
        let _ = (commission_id, version);
        Ok(true)
    }
    /// Running commissions whose jobs no live node runs (see [`LostJob`]). A store that is
    /// never shared calls every running job lost: no thread of this server runs it yet when
    /// the server asks, at start.
    fn lost_jobs(&self) -> Result<Vec<LostJob>, StorageError> {
        Ok(self
            .live_commissions()?
            .into_iter()
            .filter(|c| c.state.is_running())
            .filter_map(|c| {
                c.active_job.map(|job_id| LostJob { commission_id: c.id, job_id, here: true, node: None })
            })
            .collect())
    }
    /// Whether this node runs the maintenance now (one node of those sharing a database at a
    /// time; a store that is never shared always does).
    fn is_maintainer(&self) -> bool {
        true
    }
    /// Whether this node lost its lease (it could not renew it in time): it must stop its
    /// jobs, whose appends are refused, and then [`EventStore::rejoin`].
    fn lease_lost(&self) -> bool {
        false
    }
    /// Takes a new lease once this node's jobs are stopped (after [`EventStore::lease_lost`]).
    fn rejoin(&self) {}
    /// This node's id, when the store is shared by nodes.
    fn node_id(&self) -> Option<String> {
        None
    }
    /// The nodes sharing the database; empty for a store that is never shared.
    fn cluster(&self) -> Result<Vec<NodeInfo>, StorageError> {
        Ok(Vec::new())
    }
}
