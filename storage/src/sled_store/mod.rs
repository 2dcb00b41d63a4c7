//! The embedded backend: an event log and its projections in sled, with group commit.
//!
//! Two trees (see [`crate::layout`]): `log`, seq → record (codec frame: crc, hash chain,
//! encoded [`Envelope`]), the truth; and `projections`, every cache of the log (snapshots,
//! indexes, jobs, meta) under one-byte key prefixes.
//!
//! One writer thread owns all writes. It takes every queued request (group commit), folds the
//! events through the engine (so nothing the table forbids is ever stored), writes the log
//! records, flushes sled and then fdatasyncs its file (sled's flush alone is not an fsync),
//! then updates the projections, publishes to subscribers and acknowledges.
//!
//! Projections are caches of the log, caught up from the log at open. What changes with
//! every event (snapshots, the by-commission index, counts) is written back: kept in memory,
//! where readers look first, and written to the tree with `projected_seq` in one atomic batch
//! every [`writer::PROJECTION_FLUSH_INTERVAL_MS`] (or sooner, see the other `PROJECTION_*`
//! limits).
//! Index entries that change rarely (by user, idempotency, live, jobs) are written at once
//! after each durable batch. Durability of the log is untouched: in `Durability::Sync` no
//! append is acknowledged before its records are flushed and fdatasynced.
//!
//! The files, each importing only those below it: this one is the [`SledStore`] handle and
//! its [`EventStore`] glue; `open` (lock, sled, schema migrations, catch-up) builds the
//! `writer` (group commit, write-back, retention) over the `state` that it shares with `read`
//! (snapshots, history, listings); `config` and `lock` sit at the bottom. How a seq becomes
//! a log key, and how a log value becomes records, is `crate::log`'s alone.

mod config;
mod disk;
mod open;
mod read;
mod state;
mod writer;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use atelier_engine::{Commission, Envelope, Job, State};
use crossbeam_channel::Sender;

use crate::error::{io, StorageError};
use crate::event_store::{AppendOutcome, AppendRequest, EventStore, ListQuery, Page};
use crate::reply::reply;
use crate::subscribe::{Filter, Subscription};
pub use config::{Durability, StoreConfig, CACHE_CAPACITY_BYTES_DEFAULT};
pub use disk::{DISK_FREE_BYTES_MIN, DISK_RESERVE_BYTES_DEFAULT, DISK_RESERVE_FILE};
pub use open::SCHEMA_VERSION;
pub use read::LIST_LIMIT_MAX;
pub(crate) use state::{Inner, Trees};
use writer::{Request, WRITER_QUEUE_REQUESTS_MAX};

pub struct SledStore {
    inner: Arc<Inner>,
    tx: Mutex<Option<Sender<Request>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    durability: Durability,
}

impl SledStore {
    pub fn open(config: StoreConfig) -> Result<Arc<SledStore>, StorageError> {
        let (inner, writer) = open::open(&config)?;
        let (tx, rx) = crossbeam_channel::bounded(WRITER_QUEUE_REQUESTS_MAX);
        let durability = config.durability;
        let handle = std::thread::Builder::new()
            .name("atelier-log-writer".into())
            .spawn(move || writer.run(rx, durability))
            .map_err(io("spawn the log writer"))?;
        Ok(Arc::new(SledStore {
            inner,
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(handle)),
            durability,
        }))
    }

    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// Stops the writer after it has finished every queued append, and ends subscriptions.
    pub fn close(&self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        if let Some(h) = self.writer.lock().ok().and_then(|mut w| w.take()) {
            let _ = h.join();
        }
        if let Ok(mut reg) = self.inner.registry.lock() {
            reg.close();
        }
        let _ = self.inner.db.flush();
        let _ = state::fdatasync(&self.inner.db_file);
    }

    fn send(&self, req: Request) -> Result<(), StorageError> {
        let tx = self.tx.lock().map_err(|_| StorageError::Closed)?.clone().ok_or(StorageError::Closed)?;
        tx.send(req).map_err(|_| StorageError::Closed)
    }

    /// Loads events (from `atelier export`) into an empty store, checking each against the
    /// state machine exactly as live appends are.
    pub fn import(&self, events: Vec<Envelope>) -> Result<(), StorageError> {
        let (ack, rx) = reply(&self.inner.bell);
        self.send(Request::Import(events, ack))?;
        rx.recv()
    }

    /// Writes the projections held in memory (write-back) to the projection tree, so that the
    /// tree alone matches the log up to the head (what `replay --check` compares).
    pub fn flush_projections(&self) -> Result<(), StorageError> {
        let (ack, rx) = reply(&self.inner.bell);
        self.send(Request::FlushProjections(ack))?;
        rx.recv()
    }

    /// Why the open found the projections disagreeing with the log and rebuilt them from it,
    /// if it did (the log was whole; only the caches were not).
    pub fn rebuilt_at_open(&self) -> Option<&str> {
        self.inner.rebuilt_at_open.get().map(String::as_str)
    }

    /// Subscribers cut off for being too slow, since open.
    pub fn dropped_slow_total(&self) -> u64 {
        self.inner.dropped_slow.load(Ordering::Relaxed)
    }

    /// Group commits that wrote to the log since open, and the append requests they carried:
    /// their ratio is the mean batch, the figure that says how well fsyncs are shared.
    pub fn group_commit_totals(&self) -> (u64, u64) {
        (self.inner.group_commits.load(Ordering::Relaxed), self.inner.group_committed.load(Ordering::Relaxed))
    }

    pub fn subscriber_count(&self) -> usize {
        self.inner.registry.lock().map(|r| r.len()).unwrap_or(0)
    }

    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    /// Deletes terminal commissions last updated before `before`: projections go, and their
    /// log records keep only checksum and chain (the sequence stays gap-free and verifiable).
    /// Runs on the writer thread, between group commits. Returns how many were pruned.
    pub fn prune_terminal_before(&self, before: atelier_engine::time::Millis) -> Result<u64, StorageError> {
        let (ack, rx) = reply(&self.inner.bell);
        self.send(Request::Prune(before, ack))?;
        rx.recv()
    }
}

impl Drop for SledStore {
    fn drop(&mut self) {
        self.close();
    }
}

impl EventStore for SledStore {
    fn health(&self) -> Result<(), StorageError> {
        if let Some(why) = self.inner.poisoned.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Err(StorageError::Poisoned(why));
        }
        if let Some((free, needed)) = *self.inner.disk_full.lock().unwrap_or_else(|p| p.into_inner()) {
            return Err(StorageError::DiskFull { free, needed });
        }
        match self.tx.lock() {
            Ok(tx) if tx.is_some() => Ok(()),
            _ => Err(StorageError::Closed),
        }
    }

    fn append(&self, req: AppendRequest) -> Result<AppendOutcome, StorageError> {
        let (ack, rx) = reply(&self.inner.bell);
        self.send(Request::Append(req, ack))?;
        rx.recv()
    }

    fn commission(&self, id: u64) -> Result<Option<Commission>, StorageError> {
        self.inner.get_commission(id)
    }

    fn events_of(&self, id: u64) -> Result<Vec<Envelope>, StorageError> {
        self.inner.events_of(id)
    }

    fn read_log(&self, after: u64, limit: usize) -> Result<Vec<Envelope>, StorageError> {
        self.inner.read_log(after, self.head_seq(), limit)
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
        // sled's id generator is persistent and never repeats, even after a crash.
        Ok(self.inner.db.generate_id()? + 1)
    }

    fn subscribe(&self, after: u64, filter: Filter) -> Result<Subscription, StorageError> {
        Ok(Subscription::new(self.inner.clone(), after, filter))
    }

    fn head_seq(&self) -> u64 {
        self.inner.durable_head.load(Ordering::Acquire)
    }

    fn group_commit_totals(&self) -> (u64, u64) {
        SledStore::group_commit_totals(self)
    }

    fn dropped_slow_total(&self) -> u64 {
        self.inner.dropped_slow.load(Ordering::Relaxed)
    }

    fn writer_beats(&self) -> Option<u64> {
        Some(self.inner.writer_beats.load(Ordering::Relaxed))
    }

    fn state_counts(&self) -> Result<Vec<(State, u64)>, StorageError> {
        let counts = *self.inner.counts.lock().unwrap_or_else(|p| p.into_inner());
        Ok(State::ALL.iter().map(|s| (*s, counts[*s as usize])).collect())
    }
}
