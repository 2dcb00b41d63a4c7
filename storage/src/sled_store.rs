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
//! every [`PROJECTION_FLUSH_INTERVAL_MS`] (or sooner, see the other `PROJECTION_*` limits).
//! Index entries that change rarely (by user, idempotency, live, jobs) are written at once
//! after each durable batch. Durability of the log is untouched: in `Durability::Sync` no
//! append is acknowledged before its records are flushed and fdatasynced.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write as _;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use atelier_engine::{apply, apply_job, Commission, Envelope, Event, Job, Rejection, State};
use crossbeam_channel::{Receiver, Sender};

use crate::codec::{self, CodecError};
use crate::error::io;
use crate::layout::{self, Projection, META_COUNTS, META_NEXT_CID, META_PROJECTED, META_SCHEMA};
use crate::reply::{reply, Bell, ReplyTx};
use crate::subscribe::{Delivery, Filter, History, Registry, Subscription, ViewAfter};
use crate::{AppendOutcome, AppendRequest, AppendTarget, EventStore, ListQuery, Page, StorageError};

/// The layout written by this build. Opening a newer one fails; older ones are migrated.
pub const SCHEMA_VERSION: u32 = 2;
/// Requests taken into one group commit at most.
pub const BATCH_REQUESTS_MAX: usize = 4096;
/// Requests waiting for the writer before appenders block (backpressure).
pub const WRITER_QUEUE_REQUESTS_MAX: usize = 16 * 1024;
/// Default sled page cache. sled's own default is 1 GiB, too much for an edge box.
pub const CACHE_CAPACITY_BYTES_DEFAULT: u64 = 64 * 1024 * 1024;
/// Projection write-back: snapshots and by-commission entries of acknowledged events are kept
/// in memory (readers look there first) and written to the projection tree at most this long
/// after they were acknowledged. A crash loses nothing: the catch-up at open replays the log
/// after `projected_seq`.
pub const PROJECTION_FLUSH_INTERVAL_MS: u64 = 100;
/// ... or once this many events are waiting, which also bounds the catch-up after a crash.
pub const PROJECTION_FLUSH_EVENTS_MAX: u64 = 16 * 1024;
/// ... or once the waiting snapshots hold about this many bytes (a snapshot can reach a few
/// hundred KiB: context, result and artifacts).
pub const PROJECTION_UNFLUSHED_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Index entries a filtered listing reads at most before it returns a cursor.
pub const LIST_SCAN_MAX: usize = 10_000;
pub const LIST_LIMIT_MAX: usize = 200;

type Migration = fn(&sled::Db) -> Result<(), StorageError>;
/// Ordered steps from one schema version to the next; step `n` produces version `n`.
const MIGRATIONS: &[(u32, &str, Migration)] = &[
    (1, "initial layout: the log, and one tree of prefixed projections", |_| Ok(())),
    // Schema-1 values (one record each) stay as they are and stay readable; the version
    // only tells an older build that it cannot read what this one writes.
    (2, "a log value may hold a block of consecutive records", |_| Ok(())),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// An append is acknowledged only once it is on disk (flush + fdatasync). The default.
    Sync,
    /// Appends are acknowledged once written to sled and made durable every `interval_ms`:
    /// a crash can lose the last interval of acknowledged events, and subscribers may see
    /// events that a crash then loses. Faster on slow disks; not for data you must keep.
    Periodic { interval_ms: u64 },
}

#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub dir: PathBuf,
    pub cache_capacity_bytes: u64,
    pub durability: Durability,
}

impl StoreConfig {
    pub fn new(dir: impl Into<PathBuf>) -> StoreConfig {
        StoreConfig {
            dir: dir.into(),
            cache_capacity_bytes: CACHE_CAPACITY_BYTES_DEFAULT,
            durability: Durability::Sync,
        }
    }
}

#[derive(Clone)]
pub(crate) struct Trees {
    pub(crate) log: sled::Tree,
    /// Every projection under its [`Projection::prefix`].
    pub(crate) proj: sled::Tree,
}

impl Trees {
    /// The entries of one projection, with the prefix byte stripped from the keys.
    pub(crate) fn scan(
        &self,
        p: Projection,
    ) -> impl DoubleEndedIterator<Item = Result<(sled::IVec, sled::IVec), StorageError>> {
        self.proj.scan_prefix([p.prefix()]).map(|item| {
            let (k, v) = item?;
            Ok((k.subslice(1, k.len() - 1), v))
        })
    }

    pub(crate) fn meta(&self, name: &[u8]) -> Result<Option<sled::IVec>, StorageError> {
        Ok(self.proj.get(Projection::Meta.key(name))?)
    }
}

pub(crate) struct Inner {
    pub(crate) db: sled::Db,
    pub(crate) trees: Trees,
    durable_head: AtomicU64,
    registry: Mutex<Registry>,
    /// sled's data file, for fdatasync.
    db_file: File,
    pub(crate) dropped_slow: AtomicU64,
    /// What every thread waiting for the writer sleeps on (see `reply`).
    bell: Arc<Bell>,
    /// Group commits that wrote to the log, and the appends they acknowledged.
    group_commits: AtomicU64,
    group_committed: AtomicU64,
    /// Acknowledged projection state not yet in the projection tree (write-back).
    unflushed: RwLock<Unflushed>,
    /// Commissions per state, as of the durable head.
    counts: Mutex<[u64; 10]>,
    _lock: LockFile,
}

/// A commission changed since the last projection flush.
struct Dirty {
    snapshot: Commission,
    /// The version of `seqs[0]`.
    first_version: u64,
    /// The seq of each version from `first_version` on, not yet in the by-commission index.
    seqs: Vec<u64>,
}

/// Snapshots and by-commission entries that the writer has acknowledged but not yet written
/// to the projection tree. Only the writer changes it; readers consult it before the tree.
#[derive(Default)]
struct Unflushed {
    commissions: HashMap<u64, Dirty>,
    /// Events since the last flush.
    events: u64,
    /// About how much memory the snapshots and seqs hold.
    bytes: usize,
}

/// About how many bytes a snapshot holds (the strings and artifacts dominate).
fn approx_bytes(c: &Commission) -> usize {
    let opt = |s: &Option<String>| s.as_ref().map_or(0, String::len);
    256 + c.user_id.len()
        + c.pipeline.len()
        + c.context.len()
        + opt(&c.idempotency_key)
        + opt(&c.message)
        + opt(&c.error)
        + opt(&c.result)
        + c.artifacts.iter().map(|a| 64 + a.kind.len() + a.uri.len()).sum::<usize>()
}

impl Unflushed {
    fn set_snapshot(&mut self, cid: u64, snapshot: Commission) {
        self.bytes += approx_bytes(&snapshot);
        match self.commissions.entry(cid) {
            std::collections::hash_map::Entry::Occupied(mut e) => {
                let old = std::mem::replace(&mut e.get_mut().snapshot, snapshot);
                self.bytes = self.bytes.saturating_sub(approx_bytes(&old));
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(Dirty { snapshot, first_version: 0, seqs: Vec::new() });
            }
        }
    }

    fn push_version(&mut self, cid: u64, version: u64, seq: u64) {
        let d =
            self.commissions.get_mut(&cid).expect("invariant: a changed commission has its snapshot staged");
        if d.seqs.is_empty() {
            d.first_version = version;
        }
        assert_eq!(d.first_version + d.seqs.len() as u64, version, "invariant: versions are contiguous");
        d.seqs.push(seq);
        self.events += 1;
        self.bytes += 8;
    }

    fn clear(&mut self) {
        self.commissions.clear();
        self.events = 0;
        self.bytes = 0;
    }
}

enum Request {
    Append(AppendRequest, ReplyTx<AppendOutcome>),
    Import(Vec<Envelope>, ReplyTx<()>),
    /// Retention: prune terminal commissions last updated before this instant.
    Prune(atelier_engine::time::Millis, ReplyTx<u64>),
    /// Write the write-back state to the projection tree now.
    FlushProjections(ReplyTx<()>),
}

// A staged result lives on the writer's stack for one commit; boxing the large variant would
// cost an allocation per append.
#[allow(clippy::large_enum_variant)]
enum Staging {
    Append(Result<AppendOutcome, StorageError>),
    Unit(Result<(), StorageError>),
}

pub struct SledStore {
    inner: Arc<Inner>,
    tx: Mutex<Option<Sender<Request>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    durability: Durability,
}

pub(crate) fn u64_key(v: u64) -> [u8; 8] {
    v.to_be_bytes()
}

pub(crate) fn read_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?))
}

fn bad(p: Projection) -> impl Fn(CodecError) -> StorageError {
    move |e| StorageError::BadProjection { tree: p.name(), detail: e.to_string() }
}

fn bad_run() -> StorageError {
    StorageError::BadProjection {
        tree: Projection::ByCommission.name(),
        detail: "a run of seqs is not a multiple of 8 bytes".into(),
    }
}

/// Decodes a log record, checking its checksum and, given the previous chain, the chain.
pub(crate) fn decode_record(
    seq: u64,
    record: &[u8],
    prev_chain: Option<u32>,
) -> Result<(Option<Envelope>, u32), StorageError> {
    let corrupt = |detail: String| StorageError::Corruption { seq, detail };
    let (header, payload) = codec::split_record(record).map_err(|e| corrupt(e.to_string()))?;
    if let Some(prev) = prev_chain {
        let expected = codec::chain_next(prev, seq, header.crc);
        if expected != header.chain {
            return Err(corrupt("hash chain broken: the record does not follow its predecessor".into()));
        }
    }
    if header.flags & codec::FLAG_PRUNED != 0 {
        return Ok((None, header.chain));
    }
    let env: Envelope = codec::decode(payload).map_err(|e| corrupt(e.to_string()))?;
    if env.seq != seq {
        return Err(corrupt(format!("record claims seq {}", env.seq)));
    }
    Ok((Some(env), header.chain))
}

/// An exclusive lock on the data dir, naming its holder in the lock file.
struct LockFile {
    _file: File,
}

impl LockFile {
    fn acquire(dir: &Path) -> Result<LockFile, StorageError> {
        let path = dir.join("LOCK");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io(format!("open {}", path.display())))?;
        // SAFETY: flock on a valid, owned fd; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            let holder = if holder.trim().is_empty() {
                "another process".to_string()
            } else {
                holder.trim().to_string()
            };
            return Err(StorageError::Locked { path: dir.to_path_buf(), holder });
        }
        let me = format!(
            "pid {} ({})",
            std::process::id(),
            std::env::args().next().unwrap_or_else(|| "atelier".into())
        );
        file.set_len(0).map_err(io("truncate LOCK"))?;
        file.write_all(me.as_bytes()).map_err(io("write LOCK"))?;
        Ok(LockFile { _file: file })
    }
}

impl SledStore {
    pub fn open(config: StoreConfig) -> Result<Arc<SledStore>, StorageError> {
        std::fs::create_dir_all(&config.dir).map_err(io(format!("create {}", config.dir.display())))?;
        let lock = LockFile::acquire(&config.dir)?;
        let sled_dir = config.dir.join("sled");
        let flush_every = match config.durability {
            Durability::Sync => None,
            Durability::Periodic { interval_ms } => Some(interval_ms.max(1)),
        };
        let db = sled::Config::new()
            .path(&sled_dir)
            .cache_capacity(config.cache_capacity_bytes)
            .flush_every_ms(flush_every)
            .open()?;
        let trees =
            Trees { log: db.open_tree(layout::LOG_TREE)?, proj: db.open_tree(layout::PROJECTIONS_TREE)? };
        migrate(&db, &trees)?;
        let db_path = sled_dir.join("db");
        let db_file = File::open(&db_path).map_err(io(format!("open {}", db_path.display())))?;

        // The tail of the log: head seq and hash chain, checked.
        let (head, chain) = match crate::log::last_block(&trees.log)? {
            None => (0, 0),
            Some(block) => {
                let seq = block.last();
                let record = block.record(seq).expect("invariant: a block holds its last record");
                let (_, chain) = decode_record(seq, &record, None)?;
                (seq, chain)
            }
        };
        let inner = Arc::new(Inner {
            db,
            trees,
            durable_head: AtomicU64::new(head),
            registry: Mutex::new(Registry::default()),
            db_file,
            dropped_slow: AtomicU64::new(0),
            bell: Arc::new(Bell::default()),
            group_commits: AtomicU64::new(0),
            group_committed: AtomicU64::new(0),
            unflushed: RwLock::new(Unflushed::default()),
            counts: Mutex::new([0; 10]),
            _lock: lock,
        });
        let mut writer = Writer::new(inner.clone(), head, chain)?;
        writer.catch_up()?;
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
        let _ = fdatasync(&self.inner.db_file);
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

fn load_counts(trees: &Trees) -> Result<[u64; 10], StorageError> {
    match trees.meta(META_COUNTS)? {
        None => Ok([0; 10]),
        Some(v) => codec::decode(&v).map_err(bad(Projection::Meta)),
    }
}

fn migrate(db: &sled::Db, trees: &Trees) -> Result<(), StorageError> {
    let found = match trees.meta(META_SCHEMA)? {
        None => 0,
        Some(v) => u32::try_from(read_u64(&v).unwrap_or(0)).unwrap_or(u32::MAX),
    };
    if found > SCHEMA_VERSION {
        return Err(StorageError::NewerSchema { found, supported: SCHEMA_VERSION });
    }
    for (version, what, step) in MIGRATIONS.iter().filter(|(v, _, _)| *v > found) {
        tracing::info!(version, what, "migrating the data dir");
        step(db)?;
        trees.proj.insert(Projection::Meta.key(META_SCHEMA), &u64_key(u64::from(*version)))?;
    }
    Ok(())
}

pub(crate) fn fdatasync(f: &File) -> Result<(), StorageError> {
    f.sync_data().map_err(io("fdatasync the sled data file"))
}

/// Projection writes staged during one batch, applied after the log is durable.
#[derive(Default)]
struct Staged {
    /// The newest snapshot of each commission the batch changed.
    snapshots: HashMap<u64, Commission>,
    jobs: HashMap<u64, Job>,
    idempotency: HashMap<Vec<u8>, u64>,
    /// `(commission, version, seq)` of every event, for the by-commission index (write-back).
    versions: Vec<(u64, u64, u64)>,
    /// Index entries that change rarely (by user, idempotency, live, jobs by commission), in
    /// the order they were staged; written at once after the log is durable.
    /// `(key, Some(value))` sets, `(key, None)` removes. Written entry by entry, not as one
    /// sled batch: an `apply_batch` makes sled write out its IO buffer twice (before and after
    /// the batch's manifest), each a pwrite plus sync_file_range, and these entries need no
    /// atomicity of their own (see [`Writer::publish_projections`]).
    index: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    deliveries: Vec<Delivery>,
}

/// How one event moved a commission, as far as the projections care.
struct Step {
    before: Option<State>,
    after: State,
    view: ViewAfter,
}

struct Writer {
    inner: Arc<Inner>,
    head: u64,
    chain: u32,
    next_cid: u64,
    /// The seq up to which the projection tree is written; `(projected, head]` is in
    /// `inner.unflushed`.
    projected: u64,
    counts: [u64; 10],
    last_projection_flush: Instant,
}

impl Writer {
    fn new(inner: Arc<Inner>, head: u64, chain: u32) -> Result<Writer, StorageError> {
        let t = &inner.trees;
        let projected = t.meta(META_PROJECTED)?.and_then(|v| read_u64(&v)).unwrap_or(0);
        let mut next_cid = t.meta(META_NEXT_CID)?.and_then(|v| read_u64(&v)).unwrap_or(1);
        if let Some(item) = t.scan(Projection::ByCommission).next_back() {
            next_cid = next_cid.max(read_u64(&item?.0).unwrap_or(0) + 1);
        }
        let counts = load_counts(t)?;
        Ok(Writer { inner, head, chain, next_cid, projected, counts, last_projection_flush: Instant::now() })
    }

    /// Applies log records that the projections have not seen: those acknowledged since the
    /// last projection flush before a crash (write-back), at most
    /// [`PROJECTION_FLUSH_EVENTS_MAX`] of them.
    fn catch_up(&mut self) -> Result<(), StorageError> {
        if self.projected < self.head {
            tracing::info!(from = self.projected + 1, to = self.head, "catching projections up with the log");
            let mut staged = Staged::default();
            for item in crate::log::records(&self.inner.trees.log, self.projected + 1, u64::MAX) {
                let (seq, record) = item?;
                let (env, _) = decode_record(seq, &record, None)?;
                let Some(env) = env else { continue };
                if env.commission_id >= self.next_cid {
                    self.next_cid = env.commission_id + 1;
                }
                let before = self.snapshot(&staged, env.commission_id)?;
                let before_state = before.as_ref().map(|c| c.state);
                let after = apply(before, &env).map_err(|r| StorageError::Corruption {
                    seq,
                    detail: format!("the state machine refuses it: {r}"),
                })?;
                let step = Step { before: before_state, after: after.state, view: ViewAfter::of(&after) };
                self.project(&mut staged, env, step)?;
                staged.snapshots.insert(after.id, after);
            }
            staged.deliveries.clear();
            self.publish_projections(staged)?;
        }
        *self.inner.counts.lock().unwrap_or_else(|p| p.into_inner()) = self.counts;
        self.flush_projections()?;
        self.inner.db.flush()?;
        fdatasync(&self.inner.db_file)?;
        Ok(())
    }

    fn run(mut self, rx: Receiver<Request>, durability: Durability) {
        let mut poisoned: Option<String> = None;
        let sync_every = match durability {
            Durability::Sync => Duration::from_secs(3600),
            Durability::Periodic { interval_ms } => Duration::from_millis(interval_ms.max(1)),
        };
        let flush_every = Duration::from_millis(PROJECTION_FLUSH_INTERVAL_MS);
        let mut last_sync = Instant::now();
        let mut dirty = false;
        loop {
            let timeout = if self.projected < self.head { flush_every.min(sync_every) } else { sync_every };
            let first = match rx.recv_timeout(timeout) {
                Ok(r) => r,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    if poisoned.is_none() {
                        if let Err(e) = self.flush_projections() {
                            tracing::error!(error = %e, "projection flush failed; the store refuses further writes");
                            poisoned = Some(e.to_string());
                        }
                    }
                    if dirty && poisoned.is_none() && last_sync.elapsed() >= sync_every {
                        if let Err(e) = self.sync() {
                            tracing::error!(error = %e, "periodic sync failed; the store refuses further writes");
                            poisoned = Some(e.to_string());
                        }
                        dirty = false;
                        last_sync = Instant::now();
                    }
                    continue;
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            };
            let mut batch = vec![first];
            while batch.len() < BATCH_REQUESTS_MAX {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            if let Some(why) = &poisoned {
                for r in batch {
                    fail(r, || StorageError::Poisoned(why.clone()));
                }
                continue;
            }
            if let Err(e) = self.commit(batch, durability) {
                tracing::error!(error = %e, "log commit failed; the store refuses further writes");
                poisoned = Some(e.to_string());
            } else if self.projection_flush_due() {
                if let Err(e) = self.flush_projections() {
                    tracing::error!(error = %e, "projection flush failed; the store refuses further writes");
                    poisoned = Some(e.to_string());
                }
            }
            if let Durability::Periodic { .. } = durability {
                dirty = true;
                if last_sync.elapsed() >= sync_every {
                    if let Err(e) = self.sync() {
                        tracing::error!(error = %e, "periodic sync failed; the store refuses further writes");
                        poisoned = Some(e.to_string());
                    }
                    dirty = false;
                    last_sync = Instant::now();
                }
            }
        }
        if poisoned.is_none() {
            if let Err(e) = self.flush_projections() {
                tracing::error!(error = %e, "projection flush at shutdown failed; the next open catches up from the log");
            }
        }
    }

    fn sync(&self) -> Result<(), StorageError> {
        self.inner.db.flush()?;
        fdatasync(&self.inner.db_file)
    }

    fn snapshot(&self, staged: &Staged, id: u64) -> Result<Option<Commission>, StorageError> {
        if let Some(c) = staged.snapshots.get(&id) {
            return Ok(Some(c.clone()));
        }
        self.inner.get_commission(id)
    }

    fn commit(&mut self, batch: Vec<Request>, durability: Durability) -> Result<(), StorageError> {
        let started = Instant::now();
        let mut staged = Staged::default();
        let mut records: Vec<Vec<u8>> = Vec::new();
        let mut acks: Vec<(Request, Staging)> = Vec::with_capacity(batch.len());
        let head_before = self.head;
        for req in batch {
            let result = match &req {
                Request::Append(r, _) => Staging::Append(self.stage_append(r, &mut staged, &mut records)),
                Request::Import(envs, _) => Staging::Unit(self.stage_import(envs, &mut staged, &mut records)),
                Request::Prune(..) | Request::FlushProjections(_) => Staging::Unit(Ok(())),
            };
            acks.push((req, result));
        }
        if self.head > head_before {
            let written = (|| -> Result<(), StorageError> {
                let mut blocks = blocks(head_before + 1, records);
                match blocks.len() {
                    // One value is atomic by itself, and a plain insert spares sled's two
                    // IO-buffer writes around a batch manifest (see `Staged::index`).
                    1 => {
                        let (k, v) = blocks.pop().expect("invariant: one block");
                        self.inner.trees.log.insert(k, v)?;
                    }
                    // An append that spans blocks must still land whole or not at all.
                    _ => {
                        let mut batch = sled::Batch::default();
                        for (k, v) in blocks {
                            batch.insert(&k, v);
                        }
                        self.inner.trees.log.apply_batch(batch)?;
                    }
                }
                if durability == Durability::Sync {
                    self.inner.db.flush()?;
                    fdatasync(&self.inner.db_file)?;
                }
                Ok(())
            })();
            if let Err(e) = written {
                for (req, _) in acks {
                    fail(req, || StorageError::Poisoned(e.to_string()));
                }
                return Err(e);
            }
            let deliveries = std::mem::take(&mut staged.deliveries);
            self.publish_projections(staged)?;
            let mut reg = self.inner.registry.lock().unwrap_or_else(|p| p.into_inner());
            self.inner.durable_head.store(self.head, Ordering::Release);
            let dropped = reg.publish(&deliveries);
            drop(reg);
            if dropped > 0 {
                self.inner.dropped_slow.fetch_add(dropped, Ordering::Relaxed);
            }
        }
        if self.head > head_before {
            self.inner.group_commits.fetch_add(1, Ordering::Relaxed);
            let appends =
                acks.iter().filter(|(r, _)| matches!(r, Request::Append(..) | Request::Import(..))).count();
            self.inner.group_committed.fetch_add(appends as u64, Ordering::Relaxed);
        }
        tracing::trace!(elapsed_us = started.elapsed().as_micros() as u64, "group commit");
        let mut quiet = false;
        for (req, result) in acks {
            match (req, result) {
                (Request::Append(_, ack), Staging::Append(r)) => {
                    ack.send_quiet(r);
                    quiet = true;
                }
                (Request::Import(_, ack), Staging::Unit(r)) => ack.send(r),
                (Request::Prune(before, ack), _) => ack.send(self.prune(before)),
                (Request::FlushProjections(ack), _) => ack.send(self.flush_projections()),
                _ => unreachable!("invariant: staging results match their requests"),
            }
        }
        if quiet {
            // One wake for the whole group (see `reply`).
            self.inner.bell.ring();
        }
        Ok(())
    }

    /// Retention, on the writer thread so that it cannot race an append.
    fn prune(&mut self, before: atelier_engine::time::Millis) -> Result<u64, StorageError> {
        // Everything pending goes to the tree first, so that the tree alone is the whole picture.
        self.flush_projections()?;
        let t = self.inner.trees.clone();
        let mut victims = Vec::new();
        for item in t.scan(Projection::Commissions) {
            let (_, v) = item?;
            let c: Commission = codec::decode(&v).map_err(bad(Projection::Commissions))?;
            if c.state.is_terminal() && c.updated_at < before {
                victims.push(c);
            }
        }
        // Log stubs first (each keeps its crc and chain), then the projections in one batch.
        let mut proj = sled::Batch::default();
        for c in &victims {
            // Each block that holds one of its records is rewritten once, with stubs.
            let mut rewritten: std::collections::BTreeMap<u64, Vec<Vec<u8>>> = Default::default();
            for item in t.proj.scan_prefix(Projection::ByCommission.key_u64(c.id)) {
                let (k, v) = item?;
                for seq in layout::decode_run(&v).ok_or_else(bad_run)? {
                    let Some(block) = crate::log::block_of(&t.log, seq)? else { continue };
                    let records = rewritten.entry(block.first).or_insert_with(|| block.records());
                    let i = (seq - block.first) as usize;
                    records[i] = codec::prune_record(&records[i])
                        .map_err(|e| StorageError::Corruption { seq, detail: e.to_string() })?;
                }
                proj.remove(k);
            }
            for (first, records) in rewritten {
                t.log.insert(u64_key(first), codec::frame_block(&records))?;
            }
            for item in t.proj.scan_prefix(Projection::JobsByCommission.key_u64(c.id)) {
                let (k, _) = item?;
                if let Some(job) = read_u64(&k[9..]) {
                    proj.remove(&Projection::Jobs.key_u64(job));
                }
                proj.remove(k);
            }
            proj.remove(Projection::ByUser.key_user(&c.user_id, &u64_key(c.id)));
            if let Some(key) = &c.idempotency_key {
                proj.remove(Projection::Idempotency.key_user(&c.user_id, key.as_bytes()));
            }
            proj.remove(&Projection::Commissions.key_u64(c.id));
            let i = c.state as usize;
            self.counts[i] = self.counts[i].saturating_sub(1);
        }
        proj.insert(Projection::Meta.key(META_COUNTS), codec::encode(&self.counts));
        t.proj.apply_batch(proj)?;
        *self.inner.counts.lock().unwrap_or_else(|p| p.into_inner()) = self.counts;
        self.sync()?;
        Ok(victims.len() as u64)
    }

    fn stage_append(
        &mut self,
        req: &AppendRequest,
        staged: &mut Staged,
        log: &mut Vec<Vec<u8>>,
    ) -> Result<AppendOutcome, StorageError> {
        let (cid, current, idem_key) = match &req.target {
            AppendTarget::Existing(id) => (*id, self.snapshot(staged, *id)?, None),
            AppendTarget::New { idempotency } => {
                let key =
                    idempotency.as_ref().map(|(u, k)| Projection::Idempotency.key_user(u, k.as_bytes()));
                if let Some(key) = &key {
                    let existing = match staged.idempotency.get(key) {
                        Some(id) => Some(*id),
                        None => self.inner.trees.proj.get(key)?.and_then(|v| read_u64(&v)),
                    };
                    if let Some(id) = existing {
                        let commission = self.snapshot(staged, id)?.ok_or(StorageError::BadProjection {
                            tree: Projection::Idempotency.name(),
                            detail: format!("points at missing commission {id}"),
                        })?;
                        return Ok(AppendOutcome::Duplicate { commission });
                    }
                }
                (self.next_cid, None, key)
            }
        };
        let current_version = current.as_ref().map_or(0, |c| c.version);
        if current_version != req.expected_version {
            return Ok(AppendOutcome::Conflict { current_version });
        }
        if req.events.is_empty() {
            return Ok(AppendOutcome::Rejected(Rejection::Invalid {
                field: "events",
                reason: "nothing to append".into(),
            }));
        }
        // Fold first, so that a refused event leaves nothing staged (all or nothing). The
        // commission moves through `apply`; each step keeps only what the projections need.
        let mut folded = Vec::with_capacity(req.events.len());
        let mut c = current;
        for (i, event) in req.events.iter().enumerate() {
            let i = i as u64;
            let env = Envelope {
                seq: self.head + 1 + i,
                commission_id: cid,
                version: current_version + 1 + i,
                at: req.at,
                event: event.clone(),
            };
            let before = c.as_ref().map(|c| c.state);
            match apply(c.take(), &env) {
                Ok(next) => {
                    folded.push((env, Step { before, after: next.state, view: ViewAfter::of(&next) }));
                    c = Some(next);
                }
                Err(r) => return Ok(AppendOutcome::Rejected(r)),
            }
        }
        let commission = c.expect("invariant: at least one event was folded");
        if matches!(req.target, AppendTarget::New { .. }) {
            self.next_cid += 1;
        }
        if let Some(key) = idem_key {
            staged.idempotency.insert(key, cid);
        }
        let first_seq = self.head + 1;
        for (env, step) in folded {
            self.write_record(&env, log);
            self.project(staged, env, step)?;
        }
        staged.snapshots.insert(cid, commission.clone());
        Ok(AppendOutcome::Appended { commission, first_seq, last_seq: self.head })
    }

    fn stage_import(
        &mut self,
        envs: &[Envelope],
        staged: &mut Staged,
        log: &mut Vec<Vec<u8>>,
    ) -> Result<(), StorageError> {
        for (i, env) in envs.iter().enumerate() {
            let line = i + 1;
            if env.seq != self.head + 1 {
                return Err(StorageError::Import {
                    line,
                    detail: format!("seq {} does not follow {}", env.seq, self.head),
                });
            }
            let before = self.snapshot(staged, env.commission_id)?;
            let before_state = before.as_ref().map(|c| c.state);
            let after = apply(before, env).map_err(|r| StorageError::Import {
                line,
                detail: format!("refused by the state machine: {r}"),
            })?;
            if before_state.is_none() {
                if env.commission_id < self.next_cid {
                    return Err(StorageError::Import {
                        line,
                        detail: format!("commission id {} reused", env.commission_id),
                    });
                }
                self.next_cid = env.commission_id + 1;
                if let Some(k) = &after.idempotency_key {
                    staged.idempotency.insert(
                        Projection::Idempotency.key_user(&after.user_id, k.as_bytes()),
                        env.commission_id,
                    );
                }
            }
            self.write_record(env, log);
            let step = Step { before: before_state, after: after.state, view: ViewAfter::of(&after) };
            self.project(staged, env.clone(), step)?;
            staged.snapshots.insert(after.id, after);
        }
        Ok(())
    }

    /// Frames the next record; [`blocks`] turns a batch's records into log values.
    fn write_record(&mut self, env: &Envelope, log: &mut Vec<Vec<u8>>) {
        debug_assert_eq!(env.seq, self.head + 1, "the log is gap-free");
        let payload = codec::encode(env);
        let (record, chain) = codec::frame_record(env.seq, self.chain, &payload);
        log.push(record);
        self.chain = chain;
        self.head = env.seq;
    }

    /// Stages what one event changes in the projections (the snapshot itself is the caller's).
    fn project(&mut self, staged: &mut Staged, env: Envelope, step: Step) -> Result<(), StorageError> {
        let cid = env.commission_id;
        staged.versions.push((cid, env.version, env.seq));
        if let Event::Created { user_id, idempotency_key, .. } = &env.event {
            staged.index.push((Projection::ByUser.key_user(user_id, &u64_key(cid)), Some(Vec::new())));
            if let Some(k) = idempotency_key {
                staged.index.push((
                    Projection::Idempotency.key_user(user_id, k.as_bytes()),
                    Some(u64_key(cid).to_vec()),
                ));
            }
        }
        if step.before != Some(step.after) {
            if let Some(s) = step.before {
                self.counts[s as usize] = self.counts[s as usize].saturating_sub(1);
            }
            self.counts[step.after as usize] += 1;
            let was_live = step.before.is_some_and(|s| !s.is_terminal());
            match (was_live, step.after.is_terminal()) {
                (false, false) => {
                    staged.index.push((Projection::Live.key_u64(cid).to_vec(), Some(Vec::new())))
                }
                (true, true) => staged.index.push((Projection::Live.key_u64(cid).to_vec(), None)),
                _ => {}
            }
        }
        let proj = &self.inner.trees.proj;
        let lookup = |id: u64| -> Option<Job> {
            staged.jobs.get(&id).cloned().or_else(|| {
                proj.get(Projection::Jobs.key_u64(id)).ok().flatten().and_then(|v| codec::decode(&v).ok())
            })
        };
        if let Some((job_id, job)) = apply_job(lookup, &env) {
            if matches!(env.event, Event::JobStarted { .. }) {
                staged
                    .index
                    .push((Projection::JobsByCommission.key_pair(cid, job_id).to_vec(), Some(Vec::new())));
            }
            staged.jobs.insert(job_id, job);
        }
        staged.deliveries.push(Delivery { env: Arc::new(env), view: Arc::new(step.view) });
        Ok(())
    }

    /// Makes one durable batch's projection changes visible: the rare index entries (and job
    /// records) go to the tree at once, one by one; snapshots, by-commission entries and counts
    /// join the write-back state that readers consult before the tree.
    ///
    /// Writing the rare entries ahead of `projected_seq`, and without atomicity among them, is
    /// safe because re-applying their events at catch-up writes the same entries again (they
    /// are sets, and job records are rebuilt from the events), so a crash between two of them
    /// is repaired at the next open; everything that a fold reads back (snapshots, counts, the
    /// next commission id) is written only with `projected_seq`, in one atomic batch.
    fn publish_projections(&mut self, staged: Staged) -> Result<(), StorageError> {
        let proj = &self.inner.trees.proj;
        for (k, v) in staged.index {
            match v {
                Some(v) => proj.insert(k, v)?,
                None => proj.remove(k)?,
            };
        }
        for (id, j) in &staged.jobs {
            proj.insert(Projection::Jobs.key_u64(*id), codec::encode(j))?;
        }
        let mut u = self.inner.unflushed.write().unwrap_or_else(|p| p.into_inner());
        for (cid, c) in staged.snapshots {
            u.set_snapshot(cid, c);
        }
        for (cid, version, seq) in staged.versions {
            u.push_version(cid, version, seq);
        }
        drop(u);
        *self.inner.counts.lock().unwrap_or_else(|p| p.into_inner()) = self.counts;
        Ok(())
    }

    fn projection_flush_due(&self) -> bool {
        let u = self.inner.unflushed.read().unwrap_or_else(|p| p.into_inner());
        u.events >= PROJECTION_FLUSH_EVENTS_MAX
            || u.bytes >= PROJECTION_UNFLUSHED_BYTES_MAX
            || self.last_projection_flush.elapsed() >= Duration::from_millis(PROJECTION_FLUSH_INTERVAL_MS)
    }

    /// Writes the write-back state (snapshots, by-commission runs) with the projected seq,
    /// next commission id and counts in one sled batch (atomic, also across a crash), so that
    /// after a crash the projections are exactly those of some log prefix and the catch-up at
    /// open can start right after `projected_seq`. No fsync: the events are durable already,
    /// and a lost projection write is caught up from the log.
    fn flush_projections(&mut self) -> Result<(), StorageError> {
        self.last_projection_flush = Instant::now();
        if self.projected == self.head {
            return Ok(());
        }
        let batch = {
            // Only this thread changes `unflushed`; readers keep using it until it is cleared.
            let u = self.inner.unflushed.read().unwrap_or_else(|p| p.into_inner());
            let mut batch = sled::Batch::default();
            for (cid, d) in &u.commissions {
                batch.insert(&Projection::Commissions.key_u64(*cid), codec::encode(&d.snapshot));
                let mut first = d.first_version;
                for run in d.seqs.chunks(layout::INDEX_RUN_SEQS_MAX) {
                    batch.insert(&Projection::ByCommission.key_pair(*cid, first), layout::encode_run(run));
                    first += run.len() as u64;
                }
            }
            batch.insert(Projection::Meta.key(META_PROJECTED), &u64_key(self.head));
            batch.insert(Projection::Meta.key(META_NEXT_CID), &u64_key(self.next_cid));
            batch.insert(Projection::Meta.key(META_COUNTS), codec::encode(&self.counts));
            batch
        };
        self.inner.trees.proj.apply_batch(batch)?;
        self.inner.unflushed.write().unwrap_or_else(|p| p.into_inner()).clear();
        self.projected = self.head;
        Ok(())
    }
}

/// One group commit's records as log values: blocks of consecutive records keyed by the seq
/// of their first, each closed at [`codec::BLOCK_RECORDS_MAX`] records or once it reaches
/// [`codec::BLOCK_BYTES_TARGET`] bytes.
fn blocks(first_seq: u64, records: Vec<Vec<u8>>) -> Vec<([u8; 8], Vec<u8>)> {
    let mut batch = Vec::new();
    let mut first = first_seq;
    let mut chunk: Vec<Vec<u8>> = Vec::new();
    let mut bytes = 0;
    for r in records {
        bytes += r.len();
        chunk.push(r);
        if chunk.len() == codec::BLOCK_RECORDS_MAX || bytes >= codec::BLOCK_BYTES_TARGET {
            batch.push((u64_key(first), codec::frame_block(&chunk)));
            first += chunk.len() as u64;
            chunk.clear();
            bytes = 0;
        }
    }
    if !chunk.is_empty() {
        batch.push((u64_key(first), codec::frame_block(&chunk)));
    }
    batch
}

fn fail(req: Request, err: impl Fn() -> StorageError) {
    match req {
        Request::Append(_, ack) => ack.send(Err(err())),
        Request::Import(_, ack) => ack.send(Err(err())),
        Request::Prune(_, ack) => ack.send(Err(err())),
        Request::FlushProjections(ack) => ack.send(Err(err())),
    }
}

impl Inner {
    /// The latest acknowledged snapshot: write-back state first, then the tree. (The writer
    /// writes the tree before it drops an entry from `unflushed`, so a miss here means the
    /// tree already has it.)
    fn get_commission(&self, id: u64) -> Result<Option<Commission>, StorageError> {
        if let Some(d) = self.unflushed.read().unwrap_or_else(|p| p.into_inner()).commissions.get(&id) {
            return Ok(Some(d.snapshot.clone()));
        }
        match self.trees.proj.get(Projection::Commissions.key_u64(id))? {
            None => Ok(None),
            Some(v) => codec::decode(&v).map(Some).map_err(bad(Projection::Commissions)),
        }
    }

    /// The seqs of a commission's events in version order: the index in the tree, then the
    /// write-back entries past it. Read in that order (memory first), the two overlap or
    /// meet, never leave a gap.
    fn seqs_of(&self, id: u64) -> Result<Vec<u64>, StorageError> {
        let pending = self
            .unflushed
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .commissions
            .get(&id)
            .map(|d| (d.first_version, d.seqs.clone()));
        let mut seqs = Vec::new();
        for item in self.trees.proj.scan_prefix(Projection::ByCommission.key_u64(id)) {
            let (k, v) = item?;
            let first = read_u64(&k[9..]).ok_or_else(bad_run)?;
            let expected = seqs.len() as u64 + 1;
            if first != expected {
                return Err(StorageError::BadProjection {
                    tree: Projection::ByCommission.name(),
                    detail: format!("commission {id}: a run starts at version {first}, expected {expected}"),
                });
            }
            seqs.extend(layout::decode_run(&v).ok_or_else(bad_run)?);
        }
        if let Some((first, pending)) = pending {
            let known = seqs.len() as u64;
            if first > known + 1 {
                return Err(StorageError::BadProjection {
                    tree: Projection::ByCommission.name(),
                    detail: format!("commission {id}: versions {} to {} are missing", known + 1, first - 1),
                });
            }
            let skip = usize::try_from(known + 1 - first).unwrap_or(usize::MAX);
            seqs.extend(pending.into_iter().skip(skip));
        }
        Ok(seqs)
    }

    fn events_of(&self, id: u64) -> Result<Vec<Envelope>, StorageError> {
        self.events_upto(id, u64::MAX)
    }

    /// A commission's events with seq at most `upto`, in order.
    fn events_upto(&self, id: u64, upto: u64) -> Result<Vec<Envelope>, StorageError> {
        let mut out = Vec::new();
        let mut cursor = crate::log::Cursor::new(&self.trees.log);
        for seq in self.seqs_of(id)?.into_iter().take_while(|&s| s <= upto) {
            let rec = cursor.get(seq)?.ok_or(StorageError::Corruption {
                seq,
                detail: "indexed record is missing from the log".into(),
            })?;
            if let (Some(env), _) = decode_record(seq, &rec, None)? {
                out.push(env);
            }
        }
        Ok(out)
    }

    fn read_log(&self, after: u64, upto: u64, limit: usize) -> Result<Vec<Envelope>, StorageError> {
        let mut out = Vec::new();
        if after >= upto {
            return Ok(out);
        }
        for item in crate::log::records(&self.trees.log, after + 1, upto) {
            let (seq, record) = item?;
            if let (Some(env), _) = decode_record(seq, &record, None)? {
                out.push(env);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }
}

/// Folds a commission's events from its first, keeping deliveries in `(after, upto]`.
fn fold_deliveries(
    events: Vec<Envelope>,
    after: u64,
    upto: u64,
    out: &mut Vec<Delivery>,
) -> Result<(), StorageError> {
    let mut c: Option<Commission> = None;
    for env in events {
        let seq = env.seq;
        let next = apply(c, &env)
            .map_err(|r| StorageError::Corruption { seq, detail: format!("refused on replay: {r}") })?;
        if seq > after && seq <= upto {
            out.push(Delivery { view: Arc::new(ViewAfter::of(&next)), env: Arc::new(env) });
        }
        c = Some(next);
    }
    Ok(())
}

impl History for Inner {
    fn history(
        &self,
        filter: &Filter,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<Delivery>, StorageError> {
        let mut out = Vec::new();
        match filter {
            Filter::Commission(id) => {
                let c = self.get_commission(*id)?;
                if c.is_some_and(|c| c.last_seq > after) {
                    fold_deliveries(self.events_of(*id)?, after, upto, &mut out)?;
                }
            }
            Filter::User(user) => {
                // Pick the chunk from the by-commission index alone (the user's first `limit`
                // seqs in range), then fold only the commissions that have a pick, each only up
                // to its last pick. Folding every commission with anything newer, for every
                // chunk, made a from-scratch replay of a big user quadratic.
                let mut picks: Vec<(u64, u64)> = Vec::new();
                for item in self.trees.proj.scan_prefix(Projection::ByUser.key_user(user, &[])) {
                    let (k, _) = item?;
                    let id = read_u64(&k[k.len() - 8..]).unwrap_or(0);
                    let seqs = self.seqs_of(id)?;
                    let newer = &seqs[seqs.partition_point(|&s| s <= after)..];
                    picks.extend(newer.iter().take_while(|&&s| s <= upto).map(|&s| (s, id)));
                }
                picks.sort_unstable();
                picks.truncate(limit);
                // A commission's picks are all its seqs in (after, its last pick]: any smaller
                // seq of the same commission is smaller than that pick, so it was picked too.
                let mut last_pick: HashMap<u64, u64> = HashMap::new();
                for &(seq, id) in &picks {
                    last_pick.insert(id, seq);
                }
                for (id, last) in last_pick {
                    fold_deliveries(self.events_upto(id, last)?, after, last, &mut out)?;
                }
                out.sort_by_key(|d| d.env.seq);
            }
            Filter::All => {
                let envs = self.read_log(after, upto, limit)?;
                let mut cache: HashMap<u64, Commission> = HashMap::new();
                for env in envs {
                    let seq = env.seq;
                    let prev = match cache.remove(&env.commission_id) {
                        Some(c) if c.version + 1 == env.version => Some(c),
                        _ => {
                            let mut c = None;
                            for e in self.events_of(env.commission_id)? {
                                if e.version >= env.version {
                                    break;
                                }
                                c = Some(apply(c, &e).map_err(|r| StorageError::Corruption {
                                    seq: e.seq,
                                    detail: r.to_string(),
                                })?);
                            }
                            c
                        }
                    };
                    let next = apply(prev, &env)
                        .map_err(|r| StorageError::Corruption { seq, detail: r.to_string() })?;
                    out.push(Delivery { view: Arc::new(ViewAfter::of(&next)), env: Arc::new(env) });
                    cache.insert(next.id, next);
                }
            }
        }
        out.truncate(limit);
        Ok(out)
    }

    fn registry(&self) -> &Mutex<Registry> {
        &self.registry
    }

    fn durable_head(&self) -> &AtomicU64 {
        &self.durable_head
    }
}

impl EventStore for SledStore {
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

    fn list_user(&self, user_id: &str, q: &ListQuery) -> Result<Page, StorageError> {
        let limit = q.limit.clamp(1, LIST_LIMIT_MAX);
        let prefix = Projection::ByUser.key_user(user_id, &[]);
        let upper = Projection::ByUser.key_user(user_id, &u64_key(q.cursor.unwrap_or(u64::MAX)));
        let mut items = Vec::new();
        let mut scanned = 0;
        let mut last_id = None;
        for item in self.inner.trees.proj.range(prefix.clone()..upper).rev() {
            let (k, _) = item?;
            let id = read_u64(&k[k.len() - 8..]).unwrap_or(0);
            last_id = Some(id);
            scanned += 1;
            if let Some(c) = self.inner.get_commission(id)? {
                if q.state.is_none_or(|s| s == c.state) {
                    items.push(c);
                }
            }
            if items.len() > limit || scanned >= LIST_SCAN_MAX {
                break;
            }
        }
        let next_cursor = if items.len() > limit {
            items.truncate(limit);
            items.last().map(|c| c.id)
        } else if scanned >= LIST_SCAN_MAX {
            last_id
        } else {
            None
        };
        Ok(Page { items, next_cursor })
    }

    fn live_commissions(&self) -> Result<Vec<Commission>, StorageError> {
        let mut out = Vec::new();
        for item in self.inner.trees.scan(Projection::Live) {
            let (k, _) = item?;
            if let Some(c) = self.inner.get_commission(read_u64(&k).unwrap_or(0))? {
                out.push(c);
            }
        }
        Ok(out)
    }

    fn job(&self, job_id: u64) -> Result<Option<Job>, StorageError> {
        match self.inner.trees.proj.get(Projection::Jobs.key_u64(job_id))? {
            None => Ok(None),
            Some(v) => codec::decode(&v).map(Some).map_err(bad(Projection::Jobs)),
        }
    }

    fn jobs_of(&self, commission_id: u64) -> Result<Vec<Job>, StorageError> {
        let mut out = Vec::new();
        for item in self.inner.trees.proj.scan_prefix(Projection::JobsByCommission.key_u64(commission_id)) {
            let (k, _) = item?;
            if let Some(j) = self.job(read_u64(&k[9..]).unwrap_or(0))? {
                out.push(j);
            }
        }
        Ok(out)
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

    fn state_counts(&self) -> Result<Vec<(State, u64)>, StorageError> {
        let counts = *self.inner.counts.lock().unwrap_or_else(|p| p.into_inner());
        Ok(State::ALL.iter().map(|s| (*s, counts[*s as usize])).collect())
    }
}
