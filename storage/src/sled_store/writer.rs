//! The log writer: one thread owns every write. It takes every queued request (group
//! commit), folds the events through the engine (so nothing the table forbids is ever
//! stored), writes the log records, flushes sled and then fdatasyncs its file (sled's flush
//! alone is not an fsync), then updates the projections, publishes to subscribers and
//! acknowledges. It also writes the projections back and runs retention, between commits,
//! so that neither can race an append.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use atelier_engine::{apply, apply_job, Commission, Envelope, Event, Job, Rejection, State};
use crossbeam_channel::Receiver;

use super::config::Durability;
use super::disk::{is_disk_full, Disk};
use super::state::{bad, bad_run, fdatasync, Inner, Trees};
use crate::append_rules::{fold_append, Folded};
use crate::codec;
use crate::error::StorageError;
use crate::event_store::{AppendOutcome, AppendRequest, AppendTarget, WRITER_BEAT_INTERVAL_MS};
use crate::layout::{self, Projection, META_COUNTS, META_NEXT_CID, META_PROJECTED};
use crate::log::decode_record;
use crate::reply::ReplyTx;
use crate::subscribe::{Delivery, ViewAfter};

/// Requests taken into one group commit at most.
pub const BATCH_REQUESTS_MAX: usize = 4096;
/// Requests waiting for the writer before appenders block (backpressure).
pub const WRITER_QUEUE_REQUESTS_MAX: usize = 16 * 1024;
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
/// While appends are refused for want of disk space, how often the writer looks again on its
/// own (no append may come: `/readyz` sends traffic elsewhere and the executors wait).
pub const DISK_RECHECK_INTERVAL_MS: u64 = 500;

pub(super) enum Request {
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

fn load_counts(trees: &Trees) -> Result<[u64; 10], StorageError> {
    match trees.meta(META_COUNTS)? {
        None => Ok([0; 10]),
        Some(v) => codec::decode(&v).map_err(bad(Projection::Meta)),
    }
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
    /// `(user, seq, commission)` of every event, for the user-seqs index (write-back).
    user_seqs: Vec<(Arc<str>, u64, u64)>,
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

pub(super) struct Writer {
    inner: Arc<Inner>,
    head: u64,
    chain: u32,
    next_cid: u64,
    /// The seq up to which the projection tree is written; `(projected, head]` is in
    /// `inner.unflushed`.
    projected: u64,
    counts: [u64; 10],
    last_projection_flush: Instant,
    disk: Disk,
}

impl Writer {
    pub(super) fn new(inner: Arc<Inner>, head: u64, chain: u32, disk: Disk) -> Result<Writer, StorageError> {
        let t = &inner.trees;
        let projected = t.meta(META_PROJECTED)?.and_then(|v| layout::decode_u64(&v)).unwrap_or(0);
        let mut next_cid = t.meta(META_NEXT_CID)?.and_then(|v| layout::decode_u64(&v)).unwrap_or(1);
        if let Some(item) = t.scan(Projection::ByCommission).next_back() {
            next_cid = next_cid.max(layout::decode_u64(&item?.0).unwrap_or(0) + 1);
        }
        let counts = load_counts(t)?;
        Ok(Writer {
            inner,
            head,
            chain,
            next_cid,
            projected,
            counts,
            last_projection_flush: Instant::now(),
            disk,
        })
    }

    /// Brings the projections up to the log's head before the writer takes requests: applies
    /// the log records after `projected_seq` (those acknowledged since the last projection
    /// flush before a crash, at most [`PROJECTION_FLUSH_EVENTS_MAX`] of them).
    ///
    /// Projections are caches: when they disagree with the log (they claim events the log does
    /// not hold, or a logged event does not follow the stored snapshot, or a value does not
    /// decode), they are rebuilt from the log with a warning. Only the log failing its own
    /// checks (checksum, chain, a gap) stops the open.
    pub(super) fn catch_up(&mut self) -> Result<(), StorageError> {
        let caught_up = if self.projected > self.head {
            Err(StorageError::bad_projection(
                Projection::Meta.name(),
                format!("projected up to seq {} but the log ends at {}", self.projected, self.head),
            ))
        } else {
            self.catch_up_from_projected()
        };
        match caught_up {
            Ok(()) => {}
            Err(e @ StorageError::BadProjection { .. }) => {
                tracing::warn!(error = %e, "the projections disagree with the log; rebuilding them from the log");
                self.rebuild_projections()?;
                let _ = self.inner.rebuilt_at_open.set(e.to_string());
            }
            Err(e) => return Err(e),
        }
        *self.inner.counts.lock().unwrap_or_else(|p| p.into_inner()) = self.counts;
        self.flush_projections()?;
        self.inner.db.flush()?;
        fdatasync(&self.inner.db_file)?;
        Ok(())
    }

    fn catch_up_from_projected(&mut self) -> Result<(), StorageError> {
        if self.projected == self.head {
            return Ok(());
        }
        tracing::info!(from = self.projected + 1, to = self.head, "catching projections up with the log");
        let mut staged = Staged::default();
        for item in crate::log::records(&self.inner.trees.log, self.projected + 1, u64::MAX) {
            let (seq, record) = item?;
            let (env, _) = decode_record(seq, &record, None)?;
            let Some(env) = env else { continue };
            self.fold_logged(&mut staged, env).map_err(|r| {
                StorageError::bad_projection(
                    Projection::Commissions.name(),
                    format!("logged seq {seq} does not follow the stored snapshot: {r}"),
                )
            })??;
        }
        staged.deliveries.clear();
        self.publish_projections(staged)
    }

    /// Folds one logged event into the staged projections. `Err(rejection)` when the state
    /// machine refuses it on top of what the projections hold.
    fn fold_logged(
        &mut self,
        staged: &mut Staged,
        env: Envelope,
    ) -> Result<Result<(), StorageError>, Rejection> {
        if env.commission_id >= self.next_cid {
            self.next_cid = env.commission_id + 1;
        }
        let before = match self.snapshot(staged, env.commission_id) {
            Ok(before) => before,
            Err(e) => return Ok(Err(e)),
        };
        let before_state = before.as_ref().map(|c| c.state);
        let after = apply(before, &env)?;
        let step = Step { before: before_state, after: after.state, view: ViewAfter::of(&after) };
        if let Err(e) = self.project(staged, env, step) {
            return Ok(Err(e));
        }
        staged.snapshots.insert(after.id, after);
        Ok(Ok(()))
    }

    /// Throws every projection away and folds the whole log again, checking it as
    /// `replay --check` does (gap-free, checksums, hash chain). Written back every
    /// [`PROJECTION_FLUSH_EVENTS_MAX`] events with the seq reached, so that a crash midway
    /// resumes from there. A record the state machine refuses on an empty start is the log's
    /// own fault: that stops the open.
    fn rebuild_projections(&mut self) -> Result<(), StorageError> {
        let started = Instant::now();
        let proj = &self.inner.trees.proj;
        let mut clear = sled::Batch::default();
        for p in Projection::ALL.into_iter().filter(|p| *p != Projection::Meta) {
            for key in proj.scan_prefix([p.prefix()]).keys() {
                clear.remove(key?);
            }
        }
        for name in [META_PROJECTED, META_NEXT_CID, META_COUNTS] {
            clear.remove(Projection::Meta.key(name));
        }
        proj.apply_batch(clear)?;
        self.inner.unflushed.write().unwrap_or_else(|p| p.into_inner()).clear();
        let head = self.head;
        self.projected = 0;
        self.counts = [0; 10];
        // `next_cid` is kept, not reset: a pruned commission's records no longer name it, so
        // the log alone could hand its id out again. The fold only raises it.
        let mut chain = 0u32;
        let mut staged = Staged::default();
        let mut expected = 1u64;
        for item in crate::log::records(&self.inner.trees.log, 1, head) {
            let (seq, record) = item?;
            if seq != expected {
                return Err(StorageError::corruption(expected, "the record is missing from the log"));
            }
            let (env, next_chain) = decode_record(seq, &record, Some(chain))?;
            chain = next_chain;
            expected = seq + 1;
            if let Some(env) = env {
                self.fold_logged(&mut staged, env).map_err(|r| {
                    StorageError::corruption_from(seq, format!("the state machine refuses it: {r}"), r)
                })??;
            }
            if staged.versions.len() as u64 >= PROJECTION_FLUSH_EVENTS_MAX {
                self.write_back_rebuilt(std::mem::take(&mut staged), seq)?;
            }
        }
        if expected != head + 1 {
            return Err(StorageError::corruption(expected, "the record is missing from the log"));
        }
        self.write_back_rebuilt(staged, head)?;
        tracing::warn!(
            events = head,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "the projections are rebuilt from the log"
        );
        Ok(())
    }

    /// Writes what a rebuild has folded up to `seq` to the projection tree.
    fn write_back_rebuilt(&mut self, mut staged: Staged, seq: u64) -> Result<(), StorageError> {
        staged.deliveries.clear();
        self.publish_projections(staged)?;
        let head = std::mem::replace(&mut self.head, seq);
        let flushed = self.flush_projections();
        self.head = head;
        flushed
    }

    /// Publishes why the writer stopped writing, for `EventStore::health`, and returns it.
    /// When the disk filled under sled, the reserve is given back for the shutdown and the
    /// next open.
    fn poison(&mut self, why: Arc<StorageError>) -> Arc<StorageError> {
        if is_disk_full(&*why) {
            self.disk.release();
        }
        *self.inner.poisoned.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.clone());
        why
    }

    pub(super) fn run(mut self, rx: Receiver<Request>, durability: Durability) {
        let mut poisoned: Option<Arc<StorageError>> = None;
        let sync_every = match durability {
            Durability::Sync => Duration::from_secs(3600),
            Durability::Periodic { interval_ms } => Duration::from_millis(interval_ms.max(1)),
        };
        let flush_every = Duration::from_millis(PROJECTION_FLUSH_INTERVAL_MS);
        let mut last_sync = Instant::now();
        let mut dirty = false;
        let recheck_every = Duration::from_millis(DISK_RECHECK_INTERVAL_MS);
        let mut disk_full = false;
        let beat_every = Duration::from_millis(WRITER_BEAT_INTERVAL_MS);
        loop {
            // Every turn, idle ones included: a watchdog tells a stuck writer by this stopping.
            self.inner.writer_beats.fetch_add(1, Ordering::Relaxed);
            let mut timeout =
                if self.projected < self.head { flush_every.min(sync_every) } else { sync_every };
            if disk_full {
                timeout = timeout.min(recheck_every);
            }
            timeout = timeout.min(beat_every);
            let first = match rx.recv_timeout(timeout) {
                Ok(r) => r,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    if disk_full && poisoned.is_none() {
                        disk_full = self.disk_gate().is_err();
                    }
                    if poisoned.is_none() {
                        if let Err(e) = self.flush_projections() {
                            tracing::error!(error = %e, "projection flush failed; the store refuses further writes");
                            poisoned = Some(self.poison(Arc::new(e)));
                        }
                    }
                    if dirty && poisoned.is_none() && last_sync.elapsed() >= sync_every {
                        if let Err(e) = self.sync() {
                            tracing::error!(error = %e, "periodic sync failed; the store refuses further writes");
                            poisoned = Some(self.poison(Arc::new(e)));
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
            if batch.iter().any(Request::writes_log) {
                if let Err((free, needed)) = self.disk_gate() {
                    disk_full = true;
                    for r in batch {
                        fail(r, || StorageError::DiskFull { free, needed });
                    }
                    continue;
                }
                disk_full = false;
            }
            if let Err(e) = self.commit(batch, durability) {
                let cause = cause_of(e);
                tracing::error!(error = %cause, "log commit failed; the store refuses further writes");
                poisoned = Some(self.poison(cause));
            } else if self.projection_flush_due() {
                if let Err(e) = self.flush_projections() {
                    tracing::error!(error = %e, "projection flush failed; the store refuses further writes");
                    poisoned = Some(self.poison(Arc::new(e)));
                }
            }
            if let Durability::Periodic { .. } = durability {
                dirty = true;
                if last_sync.elapsed() >= sync_every {
                    if let Err(e) = self.sync() {
                        tracing::error!(error = %e, "periodic sync failed; the store refuses further writes");
                        poisoned = Some(self.poison(Arc::new(e)));
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

    /// Asks the disk whether a group commit may write, and publishes the answer for
    /// `EventStore::health`: `Err((free, needed))` while it may not. A file system that
    /// cannot say how full it is does not stop writes (sled's own error still would).
    fn disk_gate(&mut self) -> Result<(), (u64, u64)> {
        let full = match self.disk.check() {
            Ok(()) => None,
            Err(StorageError::DiskFull { free, needed }) => Some((free, needed)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot tell how full the disk is");
                None
            }
        };
        let mut published = self.inner.disk_full.lock().unwrap_or_else(|p| p.into_inner());
        match (published.is_some(), full) {
            (false, Some((free, needed))) => {
                tracing::error!(free, needed, "the disk is full: appends are refused until space returns")
            }
            (true, None) => tracing::warn!("the disk has room again: appends resume"),
            _ => {}
        }
        *published = full;
        full.map_or(Ok(()), Err)
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
                crate::log::append(&self.inner.trees.log, head_before + 1, records)?;
                if durability == Durability::Sync {
                    self.inner.db.flush()?;
                    fdatasync(&self.inner.db_file)?;
                }
                Ok(())
            })();
            if let Err(e) = written {
                // Poisoned before any appender hears of the failure, so that whoever saw an
                // append refused also sees the store refuse (`health`, `/readyz`).
                let cause = self.poison(Arc::new(e));
                for (req, _) in acks {
                    fail(req, || StorageError::Poisoned(cause.clone()));
                }
                return Err(StorageError::Poisoned(cause));
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
            let mut seqs = Vec::new();
            for item in t.proj.scan_prefix(Projection::ByCommission.key_u64(c.id)) {
                let (k, v) = item?;
                seqs.extend(layout::decode_run(&v).ok_or_else(bad_run)?);
                proj.remove(k);
            }
            for seq in &seqs {
                proj.remove(Projection::UserSeqs.key_user(&c.user_id, &layout::encode_u64(*seq)));
            }
            crate::log::prune(&t.log, seqs)?;
            for item in t.proj.scan_prefix(Projection::JobsByCommission.key_u64(c.id)) {
                let (k, _) = item?;
                if let Some(job) = layout::decode_u64(&k[9..]) {
                    proj.remove(&Projection::Jobs.key_u64(job));
                }
                proj.remove(k);
            }
            proj.remove(Projection::ByUser.key_user(&c.user_id, &layout::encode_u64(c.id)));
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
                        None => self.inner.trees.proj.get(key)?.and_then(|v| layout::decode_u64(&v)),
                    };
                    if let Some(id) = existing {
                        let commission = self.snapshot(staged, id)?.ok_or_else(|| {
                            StorageError::bad_projection(
                                Projection::Idempotency.name(),
                                format!("points at missing commission {id}"),
                            )
                        })?;
                        return Ok(AppendOutcome::Duplicate { commission });
                    }
                }
                (self.next_cid, None, key)
            }
        };
        // Fold first, so that a refused event leaves nothing staged (all or nothing).
        let (commission, folded) = match fold_append(current, cid, req, self.head + 1) {
            Ok(folded) => folded,
            Err(refused) => return Ok(refused.into()),
        };
        if matches!(req.target, AppendTarget::New { .. }) {
            self.next_cid += 1;
        }
        if let Some(key) = idem_key {
            staged.idempotency.insert(key, cid);
        }
        let first_seq = self.head + 1;
        for Folded { env, before, view } in folded {
            self.write_record(&env, log);
            self.project(staged, env, Step { before, after: view.state, view })?;
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
            if env.seq <= self.head {
                return Err(StorageError::import(
                    line,
                    format!("seq {} does not follow {}", env.seq, self.head),
                ));
            }
            // The seqs an export skipped were pruned by retention in the log it came from.
            while self.head + 1 < env.seq {
                let (stub, chain) = codec::frame_pruned(self.head + 1, self.chain);
                log.push(stub);
                self.chain = chain;
                self.head += 1;
            }
            let before = self.snapshot(staged, env.commission_id)?;
            let before_state = before.as_ref().map(|c| c.state);
            let after = apply(before, env).map_err(|r| {
                StorageError::import_from(line, format!("refused by the state machine: {r}"), r)
            })?;
            if before_state.is_none() {
                if env.commission_id < self.next_cid {
                    return Err(StorageError::import(
                        line,
                        format!("commission id {} reused", env.commission_id),
                    ));
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

    /// Frames the next record; `log::append` turns a batch's records into log values.
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
        staged.user_seqs.push((step.view.user_id.clone(), env.seq, cid));
        if let Event::Created { user_id, idempotency_key, .. } = &env.event {
            staged
                .index
                .push((Projection::ByUser.key_user(user_id, &layout::encode_u64(cid)), Some(Vec::new())));
            if let Some(k) = idempotency_key {
                staged.index.push((
                    Projection::Idempotency.key_user(user_id, k.as_bytes()),
                    Some(layout::encode_u64(cid).to_vec()),
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
        for (user, seq, cid) in staged.user_seqs {
            u.push_user_seq(user, seq, cid);
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

    /// Writes the write-back state (snapshots, by-commission runs, user-seqs entries) with the projected seq,
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
            for (user, seq, cid) in &u.user_seqs {
                batch.insert(
                    Projection::UserSeqs.key_user(user, &layout::encode_u64(*seq)),
                    &layout::encode_u64(*cid),
                );
            }
            batch.insert(Projection::Meta.key(META_PROJECTED), &layout::encode_u64(self.head));
            batch.insert(Projection::Meta.key(META_NEXT_CID), &layout::encode_u64(self.next_cid));
            batch.insert(Projection::Meta.key(META_COUNTS), codec::encode(&self.counts));
            batch
        };
        self.inner.trees.proj.apply_batch(batch)?;
        self.inner.unflushed.write().unwrap_or_else(|p| p.into_inner()).clear();
        self.projected = self.head;
        Ok(())
    }
}

impl Request {
    /// Whether the request may write to the log (and so needs room on the disk): appends,
    /// and retention's rewrite of log blocks.
    fn writes_log(&self) -> bool {
        matches!(self, Request::Append(..) | Request::Import(..) | Request::Prune(..))
    }
}

fn fail(req: Request, err: impl Fn() -> StorageError) {
    match req {
        Request::Append(_, ack) => ack.send(Err(err())),
        Request::Import(_, ack) => ack.send(Err(err())),
        Request::Prune(_, ack) => ack.send(Err(err())),
        Request::FlushProjections(ack) => ack.send(Err(err())),
    }
}

/// The failure that poisons the store: a commit that failed its acknowledgements already
/// wrapped its cause (shared by them), which is what later refusals carry too.
fn cause_of(e: StorageError) -> Arc<StorageError> {
    match e {
        StorageError::Poisoned(cause) => cause,
        e => Arc::new(e),
    }
}
