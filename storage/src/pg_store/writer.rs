//! This node's log writer: one thread takes every queued append (group commit) and writes
//! them in one transaction, events and projections together, then publishes and acknowledges.
//!
//! Global order: every group commit first locks the one row of `atelier.head` (`FOR UPDATE`),
//! takes the next seqs and commission ids from it, and writes it back at the end of the same
//! transaction. The lock is held until the commit, and PostgreSQL makes a commit visible
//! before it releases the transaction's locks, so a later group (of this node or any other)
//! can neither take seqs nor become visible before an earlier one: a reader that sees seq `n`
//! sees every seq below it, and the log stays gap-free (a rolled-back group gives its seqs
//! back with the row). The other way, readers filtering on transaction ids (`xid8` and
//! `pg_snapshot_xmin`), lets writers run in parallel but makes every reader hold back behind
//! the oldest open transaction of the whole database and leaves gaps in the seqs; one writer
//! per node with group commit already amortises the lock, so the simpler order wins.
//!
//! The appends are checked exactly as the sled writer checks them: the expected version
//! against the commission's current snapshot (read in the transaction, under the head lock,
//! so it is the newest), the idempotency key, then every event folded through
//! `engine::apply`. The database enforces the version as well: `UNIQUE (commission_id,
//! version)` refuses a second version `n` whatever wrote it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use atelier_engine::{apply, apply_job, Commission, Envelope, Job, State};
use crossbeam_channel::{Receiver, RecvTimeoutError};
use postgres::types::ToSql;
use postgres::{Client, Row, Statement, Transaction};

use super::config::{PG_HEALTH_CHECK_INTERVAL_MS, PG_RECONNECT_BACKOFF_MAX_MS, PG_RECONNECT_BACKOFF_MIN_MS};
use super::lease::Lease;
use super::pool::{connect, Statements};
use super::state::{decode_job, decode_snapshot, from_sql, sql, sql_own, state_code, Inner, StoredView};
use crate::append_rules::{fold_append, Folded};
use crate::codec;
use crate::error::{pg, StorageError};
use crate::event_store::{AppendOutcome, AppendRequest, AppendTarget, WRITER_BEAT_INTERVAL_MS};
use crate::reply::ReplyTx;
use crate::subscribe::{Delivery, ViewAfter};

/// Appends taken into one group commit at most.
pub const PG_BATCH_REQUESTS_MAX: usize = 1024;
/// Appends waiting for the writer before appenders block (backpressure).
pub const PG_WRITER_QUEUE_REQUESTS_MAX: usize = 16 * 1024;
/// Tries of a group commit that another writer beat to a commission's version (the database's
/// `UNIQUE` refused it): the next try reads the new version and answers `Conflict`.
const COMMIT_TRIES_MAX: u32 = 3;

pub(super) struct Request(pub(super) AppendRequest, pub(super) ReplyTx<AppendOutcome>);

/// What the writer is asked to do: an append (group-committed with the others queued), or an
/// import of exported events (`atelier import`, into an empty log), in a transaction of its own.
pub(super) enum Work {
    Append(Request),
    Import(Vec<Envelope>, ReplyTx<()>),
    /// Retention: terminal commissions last changed before this instant (ms since the epoch).
    Prune(atelier_engine::time::Millis, ReplyTx<u64>),
}

pub(super) struct Writer {
    inner: Arc<Inner>,
    client: Option<Client>,
    /// The prepared statements of `client` (emptied with a new connection).
    statements: Statements,
    /// No reconnect before this instant (backoff while the database is away).
    next_connect: Instant,
    backoff_ms: u64,
}

/// What one committed group hands on: each request's outcome, and the events to publish.
struct Committed {
    outcomes: Vec<AppendOutcome>,
    deliveries: Vec<Delivery>,
    first_seq: u64,
    last_seq: u64,
}

impl Writer {
    pub(super) fn new(inner: Arc<Inner>, client: Client) -> Writer {
        Writer {
            inner,
            client: Some(client),
            statements: Statements::default(),
            next_connect: Instant::now(),
            backoff_ms: PG_RECONNECT_BACKOFF_MIN_MS,
        }
    }

    pub(super) fn run(mut self, rx: Receiver<Work>) {
        let check_every = Duration::from_millis(PG_HEALTH_CHECK_INTERVAL_MS);
        let beat_every = Duration::from_millis(WRITER_BEAT_INTERVAL_MS);
        let mut checked = Instant::now();
        loop {
            // Every turn, idle ones included: a watchdog tells a stuck writer by this stopping.
            self.inner.writer_beats.fetch_add(1, Ordering::Relaxed);
            let first = match rx.recv_timeout(beat_every.min(check_every)) {
                Ok(r) => r,
                Err(RecvTimeoutError::Timeout) => {
                    if checked.elapsed() >= check_every {
                        self.check_connection();
                        checked = Instant::now();
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let mut queued = vec![first];
            while queued.len() < PG_BATCH_REQUESTS_MAX {
                match rx.try_recv() {
                    Ok(r) => queued.push(r),
                    Err(_) => break,
                }
            }
            // Appends in arrival order, each run of them one group; an import on its own.
            let mut batch = Vec::new();
            for work in queued {
                match work {
                    Work::Append(r) => batch.push(r),
                    Work::Import(envs, ack) => {
                        if !batch.is_empty() {
                            self.commit_batch(std::mem::take(&mut batch));
                        }
                        let imported = self.commit_import(&envs);
                        ack.send(imported);
                    }
                    Work::Prune(before, ack) => {
                        if !batch.is_empty() {
                            self.commit_batch(std::mem::take(&mut batch));
                        }
                        let pruned = self.connection().and_then(|(c, s)| prune(c, s, before));
                        ack.send(pruned);
                    }
                }
            }
            if !batch.is_empty() {
                self.commit_batch(batch);
            }
        }
    }

    /// Imports exported events in one transaction: all of them or, on a refused line, none.
    fn commit_import(&mut self, envs: &[Envelope]) -> Result<(), StorageError> {
        let inner = self.inner.clone();
        let (client, statements) = self.connection()?;
        let mut group = Group::begin(client, statements)?;
        let seq = group.head;
        group.stage_import(envs)?;
        let last_seq = group.head;
        let deliveries = group.write()?;
        if last_seq > seq {
            publish(&inner, seq + 1, last_seq, &deliveries);
        }
        Ok(())
    }

    /// The writer's connection, made again (within the backoff) when it broke. Appends fail
    /// fast while the database is away; they never wait for it.
    fn connection(&mut self) -> Result<(&mut Client, &mut Statements), StorageError> {
        if self.client.as_ref().is_some_and(Client::is_closed) {
            self.client = None;
        }
        if self.client.is_none() {
            if Instant::now() < self.next_connect {
                return Err(self.unavailable_now());
            }
            match connect(&self.inner.config) {
                Ok(c) => {
                    tracing::info!("the database is reachable again");
                    self.client = Some(c);
                    self.statements = Statements::default();
                    self.backoff_ms = PG_RECONNECT_BACKOFF_MIN_MS;
                }
                Err(e) => {
                    self.next_connect = Instant::now() + Duration::from_millis(self.backoff_ms);
                    self.backoff_ms = (self.backoff_ms * 2).min(PG_RECONNECT_BACKOFF_MAX_MS);
                    self.set_unavailable(&e);
                    return Err(e);
                }
            }
        }
        Ok((self.client.as_mut().expect("invariant: connected above"), &mut self.statements))
    }

    fn unavailable_now(&self) -> StorageError {
        match &*self.inner.unavailable.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => e.for_each_refused(),
            None => StorageError::Unavailable { context: "reconnecting".into(), source: None },
        }
    }

    fn set_unavailable(&self, e: &StorageError) {
        let mut u = self.inner.unavailable.lock().unwrap_or_else(|p| p.into_inner());
        if u.is_none() {
            tracing::error!(error = %e, "the database is unavailable; appends fail until it is back");
        }
        *u = Some(e.for_each_refused());
    }

    fn set_available(&self) {
        self.inner.unavailable.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// While idle: reconnects (within the backoff) or checks the connection, so that
    /// `health` follows the database without waiting for an append.
    fn check_connection(&mut self) {
        let checked = self
            .connection()
            .and_then(|(c, _)| c.simple_query("SELECT 1").map(drop).map_err(pg("check the connection")));
        match checked {
            Ok(()) => self.set_available(),
            Err(e) => {
                if matches!(e, StorageError::Unavailable { .. }) {
                    self.set_unavailable(&e);
                }
            }
        }
    }

    fn commit_batch(&mut self, batch: Vec<Request>) {
        let started = Instant::now();
        let inner = self.inner.clone();
        // Another server took the database (`guard`): nothing more is written from here.
        if let Some(holder) = inner.fenced.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            for Request(_, ack) in batch {
                ack.send(Err(StorageError::DatabaseInUse { holder: holder.clone() }));
            }
            return;
        }
        // A node that lost its lease appends nothing (`nodes`).
        if let Some(Err(e)) = inner.lease.as_ref().map(super::lease::Lease::check) {
            for Request(_, ack) in batch {
                ack.send(Err(e.for_each_refused()));
            }
            return;
        }
        let lease = inner.lease.as_ref();
        let committed = self.connection().and_then(|(client, statements)| {
            let mut tries = 1;
            loop {
                match commit(client, statements, &batch, lease) {
                    Err(e) if is_version_race(&e) && tries < COMMIT_TRIES_MAX => tries += 1,
                    other => break other,
                }
            }
        });
        let committed = match committed {
            Ok(c) => c,
            Err(e) => {
                if matches!(e, StorageError::Unavailable { .. }) {
                    self.client = None;
                    self.set_unavailable(&e);
                }
                tracing::warn!(error = %e, appends = batch.len(), "group commit failed");
                for Request(_, ack) in batch {
                    ack.send(Err(e.for_each_refused()));
                }
                return;
            }
        };
        self.set_available();
        if committed.last_seq >= committed.first_seq {
            publish(&inner, committed.first_seq, committed.last_seq, &committed.deliveries);
            inner.group_commits.fetch_add(1, Ordering::Relaxed);
            inner.group_committed.fetch_add(batch.len() as u64, Ordering::Relaxed);
        }
        tracing::trace!(elapsed_us = started.elapsed().as_micros() as u64, "group commit");
        for (Request(_, ack), outcome) in batch.into_iter().zip(committed.outcomes) {
            ack.send_quiet(Ok(outcome));
        }
        // One wake for the whole group (see `reply`).
        inner.bell.ring();
    }
}

/// Publishes a committed group to this node's subscribers when it directly follows what they
/// have seen; otherwise another node's events came between, and the log follower publishes
/// them all in seq order (it reads the log from the database).
fn publish(inner: &Inner, first_seq: u64, last_seq: u64, deliveries: &[Delivery]) {
    let mut reg = inner.registry.lock().unwrap_or_else(|p| p.into_inner());
    if inner.durable_head.load(Ordering::Acquire) + 1 != first_seq {
        return;
    }
    inner.durable_head.store(last_seq, Ordering::Release);
    let dropped = reg.publish(deliveries);
    drop(reg);
    if dropped > 0 {
        inner.dropped_slow.fetch_add(dropped, Ordering::Relaxed);
    }
}

/// Whether a commit failed because another writer already wrote one of its versions.
fn is_version_race(e: &StorageError) -> bool {
    matches!(e, StorageError::Postgres { source, .. }
        if source.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION))
}

/// Retention, in one transaction under the head lock: each terminal commission last changed
/// before `before` leaves the projections, and its events become stubs that keep their seq
/// (an empty envelope), so that the log stays gap-free and `replay --check` counts them as
/// pruned, as the sled log's stubs. Returns how many commissions went.
fn prune(
    client: &mut Client,
    statements: &mut Statements,
    before: atelier_engine::time::Millis,
) -> Result<u64, StorageError> {
    let mut group = Group::begin(client, statements)?;
    let rows = group
        .query("SELECT id, snapshot FROM atelier.commissions WHERE NOT live", &[])
        .map_err(pg("read the ended commissions"))?;
    let mut victims = Vec::new();
    let mut moved: BTreeMap<i16, i64> = BTreeMap::new();
    for row in rows {
        let c = decode_snapshot(row.get(1))?;
        if c.state.is_terminal() && c.updated_at < before {
            victims.push(row.get::<_, i64>(0));
            *moved.entry(state_code(c.state)).or_default() -= 1;
        }
    }
    if !victims.is_empty() {
        let stub = "UPDATE atelier.events SET envelope = '', view = '' WHERE commission_id = ANY($1)";
        group.execute(stub, &[&victims]).map_err(pg("prune events"))?;
        for delete in [
            "DELETE FROM atelier.jobs WHERE commission_id = ANY($1)",
            "DELETE FROM atelier.idempotency WHERE commission_id = ANY($1)",
            "DELETE FROM atelier.claims WHERE commission_id = ANY($1)",
            "DELETE FROM atelier.commissions WHERE id = ANY($1)",
        ] {
            group.execute(delete, &[&victims]).map_err(pg("prune projections"))?;
        }
        let (states, deltas): (Vec<i16>, Vec<i64>) = moved.into_iter().unzip();
        group
            .execute(
                "UPDATE atelier.state_counts AS c SET n = c.n + d.delta
                 FROM unnest($1::smallint[], $2::bigint[]) AS d(state, delta) WHERE c.state = d.state",
                &[&states, &deltas],
            )
            .map_err(pg("move the state counts"))?;
    }
    group.tx.commit().map_err(pg("commit the pruning"))?;
    Ok(victims.len() as u64)
}

/// One group commit, in one transaction: lock the head, stage every append on the newest
/// state, write events and projections, move the head, notify, commit.
fn commit(
    client: &mut Client,
    statements: &mut Statements,
    batch: &[Request],
    lease: Option<&Lease>,
) -> Result<Committed, StorageError> {
    let mut group = Group::begin(client, statements)?;
    if let Some(lease) = lease {
        group.check_lease(lease)?;
    }
    let seq = group.head;
    group.prefetch(batch)?;
    // A failed read while staging fails the whole group (it rolls back), not one append.
    let outcomes =
        batch.iter().map(|Request(req, _)| group.stage_append(req)).collect::<Result<Vec<_>, _>>()?;
    let first_seq = seq + 1;
    let last_seq = group.head;
    let deliveries = group.write()?;
    Ok(Committed { outcomes, deliveries, first_seq, last_seq })
}

/// The state one group commit stages on top of the database.
struct Group<'t> {
    tx: Transaction<'t>,
    statements: &'t mut Statements,
    head: u64,
    next_commission: u64,
    /// Snapshots read or staged in this group (`None`: no such commission).
    snapshots: HashMap<u64, Option<Commission>>,
    /// The state each commission read from the database had there (`state_counts` moves by
    /// what the group changes).
    stored_states: HashMap<u64, State>,
    /// Commissions the group changed, in id order.
    changed: BTreeMap<u64, ()>,
    jobs: HashMap<u64, Option<Job>>,
    changed_jobs: BTreeMap<u64, u64>,
    idempotency: HashMap<(String, String), u64>,
    new_keys: Vec<(String, String, u64)>,
    events: Vec<(Envelope, ViewAfter)>,
    /// The node and run the jobs this group starts belong to (none outside a node).
    owner: Option<(String, i64)>,
}

impl<'t> Group<'t> {
    /// The transaction's `query`, `query_opt` and `execute`, with `sql` prepared once per
    /// connection (`Statements`).
    fn query(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, postgres::Error> {
        let st = self.prepared(sql)?;
        self.tx.query(&st, params)
    }

    fn query_opt(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, postgres::Error> {
        let st = self.prepared(sql)?;
        self.tx.query_opt(&st, params)
    }

    fn execute(&mut self, sql: &'static str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, postgres::Error> {
        let st = self.prepared(sql)?;
        self.tx.execute(&st, params)
    }

    fn prepared(&mut self, sql: &'static str) -> Result<Statement, postgres::Error> {
        self.statements.get(&mut self.tx, sql)
    }

    /// Begins a group's transaction and takes the head row's lock (see the module docs).
    fn begin(client: &'t mut Client, statements: &'t mut Statements) -> Result<Group<'t>, StorageError> {
        let mut tx = client.transaction().map_err(pg("begin a group commit"))?;
        let lock = statements
            .get(&mut tx, "SELECT seq, next_commission FROM atelier.head FOR UPDATE")
            .map_err(pg("prepare the head lock"))?;
        let head = tx.query_one(&lock, &[]).map_err(pg("lock the log head"))?;
        let seq = from_sql(head.get(0), "head")?;
        let next_commission = from_sql(head.get(1), "head")?;
        Ok(Group::new(tx, statements, seq, next_commission))
    }

    fn new(
        tx: Transaction<'t>,
        statements: &'t mut Statements,
        head: u64,
        next_commission: u64,
    ) -> Group<'t> {
        Group {
            tx,
            statements,
            head,
            next_commission,
            snapshots: HashMap::new(),
            stored_states: HashMap::new(),
            changed: BTreeMap::new(),
            jobs: HashMap::new(),
            changed_jobs: BTreeMap::new(),
            idempotency: HashMap::new(),
            new_keys: Vec::new(),
            events: Vec::new(),
            owner: None,
        }
    }

    /// Fencing: under the head row's lock, so that no rescue of this node's jobs can come
    /// between, the node's lease must still hold by the database's clock. The jobs this
    /// group starts are recorded as this node's run.
    fn check_lease(&mut self, lease: &Lease) -> Result<(), StorageError> {
        let incarnation = lease.incarnation();
        let held = self
            .query_opt(
                "SELECT 1 FROM atelier.nodes WHERE id = $1 AND incarnation = $2 AND lease_until > clock_timestamp()",
                &[&lease.config.id, &incarnation],
            )
            .map_err(pg("check the node's lease"))?;
        if held.is_none() {
            lease.lose("its lease had lapsed at a group commit");
            return lease.check();
        }
        self.owner = Some((lease.config.id.clone(), incarnation));
        Ok(())
    }

    /// Reads the snapshots the group's appends name, in one query.
    fn prefetch(&mut self, batch: &[Request]) -> Result<(), StorageError> {
        let ids: Vec<i64> = batch
            .iter()
            .filter_map(|Request(r, _)| match r.target {
                AppendTarget::Existing(id) => sql(id),
                AppendTarget::New { .. } => None,
            })
            .collect();
        if ids.is_empty() {
            return Ok(());
        }
        for id in &ids {
            self.snapshots.insert(from_sql(*id, "commissions")?, None);
        }
        let rows = self
            .query("SELECT id, snapshot FROM atelier.commissions WHERE id = ANY($1)", &[&ids])
            .map_err(pg("read the appends' commissions"))?;
        for row in rows {
            let c = decode_snapshot(row.get(1))?;
            let id = from_sql(row.get(0), "commissions")?;
            self.stored_states.insert(id, c.state);
            self.snapshots.insert(id, Some(c));
        }
        Ok(())
    }

    fn snapshot(&mut self, id: u64) -> Result<Option<Commission>, StorageError> {
        if let Some(c) = self.snapshots.get(&id) {
            return Ok(c.clone());
        }
        let Some(key) = sql(id) else { return Ok(None) };
        let row = self
            .query_opt("SELECT snapshot FROM atelier.commissions WHERE id = $1", &[&key])
            .map_err(pg("read a commission"))?;
        let c = row.map(|r| decode_snapshot(r.get(0))).transpose()?;
        if let Some(c) = &c {
            self.stored_states.insert(id, c.state);
        }
        self.snapshots.insert(id, c.clone());
        Ok(c)
    }

    fn idempotent(&mut self, user: &str, key: &str) -> Result<Option<u64>, StorageError> {
        if let Some(id) = self.idempotency.get(&(user.to_string(), key.to_string())) {
            return Ok(Some(*id));
        }
        let row = self
            .query_opt(
                "SELECT commission_id FROM atelier.idempotency WHERE user_id = $1 AND key = $2",
                &[&user, &key],
            )
            .map_err(pg("read an idempotency key"))?;
        row.map(|r| from_sql(r.get(0), "idempotency")).transpose()
    }

    fn job(&mut self, id: u64) -> Result<Option<Job>, StorageError> {
        if let Some(j) = self.jobs.get(&id) {
            return Ok(j.clone());
        }
        let Some(key) = sql(id) else { return Ok(None) };
        let row = self
            .query_opt("SELECT record FROM atelier.jobs WHERE id = $1", &[&key])
            .map_err(pg("read a job"))?;
        let j = row.map(|r| decode_job(r.get(0))).transpose()?;
        self.jobs.insert(id, j.clone());
        Ok(j)
    }

    /// Decides one append's outcome exactly as the sled writer does, staging its events when
    /// it is appended.
    fn stage_append(&mut self, req: &AppendRequest) -> Result<AppendOutcome, StorageError> {
        let (cid, current, key) = match &req.target {
            AppendTarget::Existing(id) => (*id, self.snapshot(*id)?, None),
            AppendTarget::New { idempotency } => {
                if let Some((user, key)) = idempotency {
                    if let Some(id) = self.idempotent(user, key)? {
                        let commission = self.snapshot(id)?.ok_or_else(|| {
                            StorageError::bad_projection(
                                "idempotency",
                                format!("points at missing commission {id}"),
                            )
                        })?;
                        return Ok(AppendOutcome::Duplicate { commission });
                    }
                }
                (self.next_commission, None, idempotency.clone())
            }
        };
        // Fold first, so that a refused event leaves nothing staged (all or nothing).
        let (commission, folded) = match fold_append(current, cid, req, self.head + 1) {
            Ok(folded) => folded,
            Err(refused) => return Ok(refused.into()),
        };
        if matches!(req.target, AppendTarget::New { .. }) {
            self.next_commission += 1;
        }
        if let Some((user, key)) = key {
            self.idempotency.insert((user.clone(), key.clone()), cid);
            self.new_keys.push((user, key, cid));
        }
        let first_seq = self.head + 1;
        for Folded { env, view, .. } in folded {
            self.head = env.seq;
            self.stage_job(&env)?;
            self.events.push((env, view));
        }
        self.snapshots.insert(cid, Some(commission.clone()));
        self.changed.insert(cid, ());
        Ok(AppendOutcome::Appended { commission, first_seq, last_seq: self.head })
    }

    /// Stages exported events as the sled writer's import does: each must follow the head,
    /// be taken by the state machine, and a new commission must not reuse an id.
    fn stage_import(&mut self, envs: &[Envelope]) -> Result<(), StorageError> {
        for (line, env) in (1..).zip(envs) {
            if env.seq <= self.head {
                return Err(StorageError::import(
                    line,
                    format!("seq {} does not follow {}", env.seq, self.head),
                ));
            }
            if env.seq > self.head + 1 {
                self.stub_seqs(self.head + 1, env.seq - 1)?;
            }
            let before = self.snapshot(env.commission_id)?;
            let is_new = before.is_none();
            let after = apply(before, env).map_err(|r| {
                StorageError::import_from(line, format!("refused by the state machine: {r}"), r)
            })?;
            if is_new {
                if env.commission_id < self.next_commission {
                    return Err(StorageError::import(
                        line,
                        format!("commission id {} reused", env.commission_id),
                    ));
                }
                self.next_commission = env.commission_id + 1;
                if let Some(key) = &after.idempotency_key {
                    self.idempotency.insert((after.user_id.clone(), key.clone()), env.commission_id);
                    self.new_keys.push((after.user_id.clone(), key.clone(), env.commission_id));
                }
            }
            self.head = env.seq;
            self.stage_job(env)?;
            self.events.push((env.clone(), ViewAfter::of(&after)));
            self.snapshots.insert(env.commission_id, Some(after));
            self.changed.insert(env.commission_id, ());
        }
        Ok(())
    }

    /// Pruned stubs for the seqs `from..=to`, which an export of a pruned log leaves out: the
    /// log stays gap-free as in the log it came from. Their commission is unknown: they name
    /// commission 0 (no commission has it) and version `-seq`, unique by construction.
    fn stub_seqs(&mut self, from: u64, to: u64) -> Result<(), StorageError> {
        self.execute(
            "INSERT INTO atelier.events (seq, commission_id, version, user_id, envelope, view)
             SELECT s, 0, -s, '', '', '' FROM generate_series($1::bigint, $2::bigint) AS s",
            &[&sql_own(from), &sql_own(to)],
        )
        .map_err(pg("write pruned stubs"))?;
        self.head = to;
        Ok(())
    }

    fn stage_job(&mut self, env: &Envelope) -> Result<(), StorageError> {
        // `apply_job` asks for the current record of the job the event names, if any: read it
        // first (a failed read must fail the group, not pass for "no such job").
        let mut asked = None;
        let _ = apply_job(
            |id| {
                asked = Some(id);
                None
            },
            env,
        );
        let current = match asked {
            Some(id) => self.job(id)?,
            None => None,
        };
        if let Some((id, job)) = apply_job(|_| current, env) {
            self.changed_jobs.insert(id, job.commission_id);
            self.jobs.insert(id, Some(job));
        }
        Ok(())
    }

    /// Writes the staged events and projections, moves the head, notifies the followers and
    /// commits. Returns the deliveries of the committed events.
    fn write(mut self) -> Result<Vec<Delivery>, StorageError> {
        if self.events.is_empty() {
            self.tx.commit().map_err(pg("commit a group"))?;
            return Ok(Vec::new());
        }
        let n = self.events.len();
        let (mut seqs, mut cids, mut versions) =
            (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        let (mut users, mut envs, mut views) =
            (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        for (env, view) in &self.events {
            seqs.push(sql_own(env.seq));
            cids.push(sql_own(env.commission_id));
            versions.push(sql_own(env.version));
            users.push(view.user_id.to_string());
            envs.push(codec::encode(env));
            views.push(StoredView::encode(view));
        }
        self.execute("INSERT INTO atelier.events (seq, commission_id, version, user_id, envelope, view)
                 SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::text[], $5::bytea[], $6::bytea[])",
                &[&seqs, &cids, &versions, &users, &envs, &views],
            )
            .map_err(pg("write events"))?;
        self.write_projections()?;
        // The notification is a wake-up hint only, delivered at commit; followers read the
        // log from their cursor. One statement with the head's move: one round trip less.
        self.execute(
            "WITH moved AS (UPDATE atelier.head SET seq = $1, next_commission = $2 RETURNING 1)
             SELECT pg_notify('atelier_log', '') FROM moved",
            &[&sql_own(self.head), &sql_own(self.next_commission)],
        )
        .map_err(pg("move the log head"))?;
        self.tx.commit().map_err(pg("commit a group"))?;
        Ok(self
            .events
            .into_iter()
            .map(|(env, view)| Delivery { env: Arc::new(env), view: Arc::new(view) })
            .collect())
    }

    fn write_projections(&mut self) -> Result<(), StorageError> {
        let (mut ids, mut users, mut states, mut live, mut versions, mut snaps) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut moved: BTreeMap<i16, i64> = BTreeMap::new();
        for id in self.changed.keys() {
            let Some(Some(c)) = self.snapshots.get(id) else { continue };
            if let Some(before) = self.stored_states.get(id) {
                *moved.entry(state_code(*before)).or_default() -= 1;
            }
            *moved.entry(state_code(c.state)).or_default() += 1;
            ids.push(sql_own(*id));
            users.push(c.user_id.clone());
            states.push(state_code(c.state));
            live.push(!c.state.is_terminal());
            versions.push(sql_own(c.version));
            snaps.push(codec::encode(c));
        }
        self.execute("INSERT INTO atelier.commissions (id, user_id, state, live, version, snapshot)
                 SELECT * FROM unnest($1::bigint[], $2::text[], $3::smallint[], $4::boolean[], $5::bigint[], $6::bytea[])
                 ON CONFLICT (id) DO UPDATE SET state = EXCLUDED.state, live = EXCLUDED.live,
                     version = EXCLUDED.version, snapshot = EXCLUDED.snapshot",
                &[&ids, &users, &states, &live, &versions, &snaps],
            )
            .map_err(pg("write commissions"))?;
        moved.retain(|_, n| *n != 0);
        if !moved.is_empty() {
            let (states, deltas): (Vec<i16>, Vec<i64>) = moved.into_iter().unzip();
            self.execute(
                "INSERT INTO atelier.state_counts (state, n) SELECT * FROM unnest($1::smallint[], $2::bigint[])
                 ON CONFLICT (state) DO UPDATE SET n = atelier.state_counts.n + EXCLUDED.n",
                &[&states, &deltas],
            )
            .map_err(pg("move the state counts"))?;
        }
        if !self.new_keys.is_empty() {
            let users: Vec<String> = self.new_keys.iter().map(|(u, _, _)| u.clone()).collect();
            let keys: Vec<String> = self.new_keys.iter().map(|(_, k, _)| k.clone()).collect();
            let cids: Vec<i64> = self.new_keys.iter().map(|(_, _, c)| sql_own(*c)).collect();
            self.execute(
                "INSERT INTO atelier.idempotency (user_id, key, commission_id)
                     SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[])",
                &[&users, &keys, &cids],
            )
            .map_err(pg("write idempotency keys"))?;
        }
        if !self.changed_jobs.is_empty() {
            let (mut ids, mut cids, mut records) = (Vec::new(), Vec::new(), Vec::new());
            for (id, cid) in &self.changed_jobs {
                let Some(Some(job)) = self.jobs.get(id) else { continue };
                ids.push(sql_own(*id));
                cids.push(sql_own(*cid));
                records.push(codec::encode(job));
            }
            // The node of a job is the one that started it: a later record (another node
            // failing it as lost) leaves it.
            let (node, incarnation) =
                (self.owner.as_ref().map(|o| o.0.clone()), self.owner.as_ref().map(|o| o.1));
            self.execute(
                "INSERT INTO atelier.jobs (id, commission_id, record, node, incarnation)
                     SELECT j.*, $4::text, $5::bigint FROM unnest($1::bigint[], $2::bigint[], $3::bytea[]) AS j
                     ON CONFLICT (id) DO UPDATE SET record = EXCLUDED.record",
                &[&ids, &cids, &records, &node, &incarnation],
            )
            .map_err(pg("write jobs"))?;
        }
        Ok(())
    }
}
