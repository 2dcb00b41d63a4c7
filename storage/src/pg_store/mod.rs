//! The PostgreSQL backend: the log and its projections in a database that several servers
//! can share, chosen by `ATELIER_DATABASE_URL` (or `database_url` in the config file).
//!
//! Each node runs one writer thread (`writer`: group commit, one transaction per group, the
//! global order taken under the head row's lock) and one log follower (`tail`: publishes the
//! events of other nodes, woken by `NOTIFY`, polling besides). Readers (`state`) run one query
//! each on a small bounded pool (`pool`). The schema is Atelier's own, `atelier`, migrated at
//! open (`schema`); `check` is `replay --check`'s fold and comparison.
//!
//! Unlike the sled store, a failed commit does not stop the store: the database keeps what it
//! committed, so once it is reachable again appends simply resume. While it is not, appends
//! fail fast with `StorageError::Unavailable` and `health` says so.

mod check;
mod config;
mod guard;
mod lease;
mod nodes;
mod pool;
mod schema;
mod state;
mod tail;
mod tls;
mod writer;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use atelier_engine::{Commission, Envelope, Job, State};
use crossbeam_channel::Sender;

pub use config::{
    NodeConfig, PgConfig, NODE_HEARTBEAT_MS_DEFAULT, NODE_LEASE_MS_DEFAULT, NODE_LEASE_MS_MAX,
    NODE_LEASE_MS_MIN, PG_CONNECT_TIMEOUT_MS, PG_HEALTH_CHECK_INTERVAL_MS, PG_IDLE_IN_TRANSACTION_TIMEOUT_MS,
    PG_POOL_CONNECTIONS_DEFAULT, PG_POOL_WAIT_MS, PG_RECONNECT_BACKOFF_MAX_MS, PG_RECONNECT_BACKOFF_MIN_MS,
    PG_STATEMENT_TIMEOUT_MS, PG_TAIL_POLL_INTERVAL_MS,
};
pub use guard::{PG_SERVER_LOCK_KEY, PG_SERVER_LOCK_WAIT_MS};
pub use schema::PG_SCHEMA_VERSION;
pub use state::PG_LIST_LIMIT_MAX;
pub use tail::PG_FOLLOWER_APPLICATION_NAME;
pub use writer::{PG_BATCH_REQUESTS_MAX, PG_WRITER_QUEUE_REQUESTS_MAX};

use crate::error::{io, pg, StorageError};
use crate::event_store::{AppendOutcome, AppendRequest, EventStore, ListQuery, Page};
use crate::reply::{reply, Bell};
use crate::subscribe::{Filter, Registry, Subscription};
use state::{from_sql, Inner};
use writer::{Request, Work, Writer};

pub struct PgStore {
    inner: Arc<Inner>,
    tx: Mutex<Option<Sender<Work>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl PgStore {
    /// Connects, migrates the schema, and starts the writer and the log follower. Fails when
    /// the database cannot be reached now: a server that starts must start on a database.
    pub fn open(config: PgConfig) -> Result<Arc<PgStore>, StorageError> {
        let client_config = pool::client_config(&config.url, config.ca_file.as_deref())?;
        let shared = config.node.is_some();
        let guard = (config.one_server || shared).then(|| guard::take(&client_config, shared)).transpose()?;
        let mut client = pool::connect(&client_config)?;
        schema::migrate(&mut client)?;
        let lease = match config.node {
            Some(node) => {
                let incarnation = nodes::register(&mut client, &node)?;
                Some(lease::Lease::new(node, incarnation))
            }
            None => None,
        };
        let head: i64 =
            client.query_one("SELECT seq FROM atelier.head", &[]).map_err(pg("read the log head"))?.get(0);
        let inner = Arc::new(Inner {
            pool: pool::Pool::new(client_config.clone(), config.pool_connections),
            config: client_config,
            durable_head: AtomicU64::new(from_sql(head, "head")?),
            registry: Mutex::new(Registry::default()),
            dropped_slow: AtomicU64::new(0),
            bell: Arc::new(Bell::default()),
            group_commits: AtomicU64::new(0),
            group_committed: AtomicU64::new(0),
            writer_beats: AtomicU64::new(0),
            unavailable: Mutex::new(None),
            closing: AtomicBool::new(false),
            fenced: Mutex::new(None),
            lease,
        });
        let (tx, rx) = crossbeam_channel::bounded(PG_WRITER_QUEUE_REQUESTS_MAX);
        let writer = Writer::new(inner.clone(), client);
        let handle = std::thread::Builder::new()
            .name("atelier-pg-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(io("spawn the log writer"))?;
        let follower = inner.clone();
        std::thread::Builder::new()
            .name("atelier-pg-follower".into())
            .spawn(move || tail::run(follower))
            .map_err(io("spawn the log follower"))?;
        if guard.is_some() {
            let (keeper, config) = (inner.clone(), inner.config.clone());
            std::thread::Builder::new()
                .name("atelier-pg-guard".into())
                .spawn(move || guard::keep(keeper, guard, config, shared))
                .map_err(io("spawn the server lock's keeper"))?;
        }
        if shared {
            let (keeper, config) = (inner.clone(), inner.config.clone());
            std::thread::Builder::new()
                .name("atelier-pg-lease".into())
                .spawn(move || nodes::keep(keeper, config))
                .map_err(io("spawn the node lease's keeper"))?;
        }
        Ok(Arc::new(PgStore { inner, tx: Mutex::new(Some(tx)), writer: Mutex::new(Some(handle)) }))
    }

    /// Stops the writer after it has finished every queued append, ends subscriptions, and
    /// lets the log follower stop (it holds no state the database does not).
    pub fn close(&self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        if let Some(h) = self.writer.lock().ok().and_then(|mut w| w.take()) {
            let _ = h.join();
        }
        self.inner.closing.store(true, Ordering::Release);
        if let Ok(mut reg) = self.inner.registry.lock() {
            reg.close();
        }
    }

    fn send(&self, req: Work) -> Result<(), StorageError> {
        let tx = self.tx.lock().map_err(|_| StorageError::Closed)?.clone().ok_or(StorageError::Closed)?;
        tx.send(req).map_err(|_| StorageError::Closed)
    }

    /// Folds the whole log again and compares it with the projection tables (`atelier replay
    /// --check`), in one snapshot of the database.
    pub fn replay_check(&self) -> Result<crate::check::CheckReport, StorageError> {
        self.inner.replay_check()
    }

    /// Loads events (from `atelier export`) into an empty log, checking each against the
    /// state machine exactly as live appends are; one call is one transaction.
    pub fn import(&self, events: Vec<Envelope>) -> Result<(), StorageError> {
        let (ack, rx) = reply(&self.inner.bell);
        self.send(Work::Import(events, ack))?;
        rx.recv()
    }

    /// Retention: prunes the terminal commissions last changed before `before` (ms since the
    /// epoch) on the writer thread, between group commits; how many went.
    pub fn prune_terminal_before(&self, before: atelier_engine::time::Millis) -> Result<u64, StorageError> {
        let (ack, rx) = reply(&self.inner.bell);
        self.send(Work::Prune(before, ack))?;
        rx.recv()
    }

    pub fn subscriber_count(&self) -> usize {
        self.inner.registry.lock().map(|r| r.len()).unwrap_or(0)
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.close();
    }
}

impl EventStore for PgStore {
    fn health(&self) -> Result<(), StorageError> {
        if let Some(holder) = &*self.inner.fenced.lock().unwrap_or_else(|p| p.into_inner()) {
            return Err(StorageError::DatabaseInUse { holder: holder.clone() });
        }
        if let Some(lease) = &self.inner.lease {
            lease.check()?;
        }
        if let Some(e) = &*self.inner.unavailable.lock().unwrap_or_else(|p| p.into_inner()) {
            return Err(e.for_each_refused());
        }
        match self.tx.lock() {
            Ok(tx) if tx.is_some() => Ok(()),
            _ => Err(StorageError::Closed),
        }
    }

    fn append(&self, req: AppendRequest) -> Result<AppendOutcome, StorageError> {
        let (ack, rx) = reply(&self.inner.bell);
        self.send(Work::Append(Request(req, ack)))?;
        rx.recv()
    }

    fn commission(&self, id: u64) -> Result<Option<Commission>, StorageError> {
        self.inner.commission(id)
    }

    fn events_of(&self, id: u64) -> Result<Vec<Envelope>, StorageError> {
        self.inner.events_of(id)
    }

    fn read_log(&self, after: u64, limit: usize) -> Result<Vec<Envelope>, StorageError> {
        self.inner.read_log(after, limit)
    }

    fn list_user(&self, user_id: &str, query: &ListQuery) -> Result<Page, StorageError> {
        self.inner.list_user(user_id, query)
    }

    fn live_commissions(&self) -> Result<Vec<Commission>, StorageError> {
        self.inner.live_commissions()
    }

    fn job(&self, job_id: u64) -> Result<Option<Job>, StorageError> {
        self.inner.job(job_id)
    }

    fn jobs_of(&self, commission_id: u64) -> Result<Vec<Job>, StorageError> {
        self.inner.jobs_of(commission_id)
    }

    fn allocate_job_id(&self) -> Result<u64, StorageError> {
        self.inner.allocate_job_id()
    }

    fn subscribe(&self, after: u64, filter: Filter) -> Result<Subscription, StorageError> {
        Ok(Subscription::new(self.inner.clone(), after, filter))
    }

    fn head_seq(&self) -> u64 {
        self.inner.durable_head.load(Ordering::Acquire)
    }

    fn state_counts(&self) -> Result<Vec<(State, u64)>, StorageError> {
        self.inner.state_counts()
    }

    fn dropped_slow_total(&self) -> u64 {
        self.inner.dropped_slow.load(Ordering::Relaxed)
    }

    fn group_commit_totals(&self) -> (u64, u64) {
        (self.inner.group_commits.load(Ordering::Relaxed), self.inner.group_committed.load(Ordering::Relaxed))
    }

    fn writer_beats(&self) -> Option<u64> {
        Some(self.inner.writer_beats.load(Ordering::Relaxed))
    }

    fn claim(&self, commission_id: u64, version: u64) -> Result<bool, StorageError> {
        self.inner.claim(commission_id, version)
    }

    fn lost_jobs(&self) -> Result<Vec<crate::event_store::LostJob>, StorageError> {
        self.inner.lost_jobs()
    }

    fn is_maintainer(&self) -> bool {
        self.inner.lease.as_ref().is_none_or(lease::Lease::is_maintainer)
    }

    fn lease_lost(&self) -> bool {
        self.inner.lease.as_ref().is_some_and(lease::Lease::is_lost)
    }

    fn rejoin(&self) {
        if let Some(lease) = &self.inner.lease {
            lease.ask_rejoin();
        }
    }

    fn node_id(&self) -> Option<String> {
        self.inner.lease.as_ref().map(|l| l.config.id.clone())
    }

    fn cluster(&self) -> Result<Vec<crate::event_store::NodeInfo>, StorageError> {
        self.inner.cluster()
    }
}

/// `atelier import` into a PostgreSQL log (the backend implements the check's trait, so the
/// check need not know the backend).
impl crate::check::Importer for PgStore {
    fn is_empty(&self) -> Result<bool, StorageError> {
        Ok(self.read_log(0, 1)?.is_empty())
    }

    fn import(&self, events: Vec<Envelope>) -> Result<(), StorageError> {
        PgStore::import(self, events)
    }
}
