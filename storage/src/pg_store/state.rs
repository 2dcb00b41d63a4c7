//! What the writer, the log follower and the readers share (the pool, the durable head, the
//! subscription registry, the health), and the reads: every read is one query on a pooled
//! connection, so a reader sees what the database has committed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use atelier_engine::{Commission, Envelope, Job, Stage, State};
use postgres::Row;
use serde::{Deserialize, Serialize};

use super::pool::Pool;
use crate::codec;
use crate::error::{pg, StorageError};
use crate::event_store::{ListQuery, Page};
use crate::reply::Bell;
use crate::subscribe::{Delivery, Filter, History, Registry, ViewAfter};

/// Commissions one listing returns at most (as the sled store).
pub const PG_LIST_LIMIT_MAX: usize = 200;

pub(crate) struct Inner {
    pub(super) pool: Pool,
    pub(super) config: super::pool::ConnectConfig,
    /// The highest seq published to this node's subscribers: every lower seq was published
    /// before it, in order.
    pub(super) durable_head: AtomicU64,
    pub(super) registry: Mutex<Registry>,
    pub(super) dropped_slow: AtomicU64,
    pub(super) bell: Arc<Bell>,
    pub(super) group_commits: AtomicU64,
    pub(super) group_committed: AtomicU64,
    /// The writer's turns round its loop (`EventStore::writer_beats`).
    pub(super) writer_beats: AtomicU64,
    /// Why the writer cannot reach the database, while it cannot.
    pub(super) unavailable: Mutex<Option<StorageError>>,
    /// Set at close: the log follower stops at its next wake-up.
    pub(super) closing: AtomicBool,
    /// Another server took the database (`guard`): who, and every append is refused.
    pub(super) fenced: Mutex<Option<String>>,
    /// This node's lease, when the store is a node's (`nodes`).
    pub(super) lease: Option<super::lease::Lease>,
}

/// What a subscriber sees of the commission right after an event, stored with the event so
/// that history needs no fold.
#[derive(Serialize, Deserialize)]
pub(super) struct StoredView {
    user_id: String,
    state: State,
    stage: Option<Stage>,
    progress_percent: u8,
    stage_progress_percent: Option<u8>,
    message: Option<String>,
}

impl StoredView {
    pub(super) fn encode(v: &ViewAfter) -> Vec<u8> {
        codec::encode(&StoredView {
            user_id: v.user_id.to_string(),
            state: v.state,
            stage: v.stage,
            progress_percent: v.progress_percent,
            stage_progress_percent: v.stage_progress_percent,
            message: v.message.clone(),
        })
    }

    fn into_view(self) -> ViewAfter {
        ViewAfter {
            user_id: Arc::from(self.user_id),
            state: self.state,
            stage: self.stage,
            progress_percent: self.progress_percent,
            stage_progress_percent: self.stage_progress_percent,
            message: self.message,
        }
    }
}

/// A seq or id as the database stores it; ours never pass `i64::MAX`, and one that does
/// (a client's made-up id) names nothing.
pub(super) fn sql(n: u64) -> Option<i64> {
    i64::try_from(n).ok()
}

/// The same, for values this store made itself.
pub(super) fn sql_own(n: u64) -> i64 {
    i64::try_from(n).expect("invariant: seqs and ids stay below i64::MAX")
}

pub(super) fn from_sql(n: i64, what: &'static str) -> Result<u64, StorageError> {
    u64::try_from(n).map_err(|_| StorageError::bad_projection(what, format!("negative value {n}")))
}

pub(super) fn state_code(s: State) -> i16 {
    s as i16
}

fn state_of(code: i16) -> Result<State, StorageError> {
    usize::try_from(code)
        .ok()
        .and_then(|i| State::ALL.get(i).copied())
        .ok_or_else(|| StorageError::bad_projection("commissions", format!("unknown state {code}")))
}

pub(super) fn decode_snapshot(bytes: &[u8]) -> Result<Commission, StorageError> {
    codec::decode(bytes).map_err(|e| StorageError::undecodable_projection("commissions", e))
}

pub(super) fn decode_job(bytes: &[u8]) -> Result<Job, StorageError> {
    codec::decode(bytes).map_err(|e| StorageError::undecodable_projection("jobs", e))
}

/// An event row (`seq, envelope`) as its envelope, checked against its seq.
pub(super) fn envelope_of(row: &Row) -> Result<Envelope, StorageError> {
    let seq: i64 = row.try_get(0).map_err(pg("read an event's seq"))?;
    let seq = u64::try_from(seq).map_err(|_| StorageError::corruption(0, format!("negative seq {seq}")))?;
    let bytes: &[u8] = row.try_get(1).map_err(pg("read an event"))?;
    let env: Envelope = codec::decode(bytes).map_err(|e| StorageError::undecodable(seq, e))?;
    if env.seq != seq {
        return Err(StorageError::corruption(seq, format!("the row holds the event of seq {}", env.seq)));
    }
    Ok(env)
}

/// An event row (`seq, envelope, view`) as a delivery.
pub(super) fn delivery_of(row: &Row) -> Result<Delivery, StorageError> {
    let env = envelope_of(row)?;
    let bytes: &[u8] = row.try_get(2).map_err(pg("read an event's view"))?;
    let view: StoredView = codec::decode(bytes).map_err(|e| StorageError::undecodable(env.seq, e))?;
    Ok(Delivery { env: Arc::new(env), view: Arc::new(view.into_view()) })
}

impl Inner {
    pub(super) fn commission(&self, id: u64) -> Result<Option<Commission>, StorageError> {
        let Some(id) = sql(id) else { return Ok(None) };
        let row = self
            .pool
            .get()?
            .query_opt("SELECT snapshot FROM atelier.commissions WHERE id = $1", &[&id])
            .map_err(pg("read a commission"))?;
        row.map(|r| decode_snapshot(r.get(0))).transpose()
    }

    pub(super) fn events_of(&self, id: u64) -> Result<Vec<Envelope>, StorageError> {
        let Some(id) = sql(id) else { return Ok(Vec::new()) };
        let rows = self
            .pool
            .get()?
            .query(
                "SELECT seq, envelope FROM atelier.events WHERE commission_id = $1 AND envelope <> '' ORDER BY version",
                &[&id],
            )
            .map_err(pg("read a commission's events"))?;
        rows.iter().map(envelope_of).collect()
    }

    pub(super) fn read_log(&self, after: u64, limit: usize) -> Result<Vec<Envelope>, StorageError> {
        let upto = self.durable_head.load(Ordering::Acquire);
        if after >= upto {
            return Ok(Vec::new());
        }
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .pool
            .get()?
            .query(
                "SELECT seq, envelope FROM atelier.events WHERE seq > $1 AND seq <= $2 AND envelope <> '' ORDER BY seq LIMIT $3",
                &[&sql_own(after), &sql_own(upto), &limit],
            )
            .map_err(pg("read the log"))?;
        rows.iter().map(envelope_of).collect()
    }

    pub(super) fn list_user(&self, user_id: &str, q: &ListQuery) -> Result<Page, StorageError> {
        let limit = q.limit.clamp(1, PG_LIST_LIMIT_MAX);
        let below = q.cursor.map_or(i64::MAX, |c| sql(c).unwrap_or(i64::MAX));
        let state = q.state.map(state_code);
        let rows = self
            .pool
            .get()?
            .query(
                "SELECT snapshot FROM atelier.commissions
                 WHERE user_id = $1 AND id < $2 AND ($3::smallint IS NULL OR state = $3)
                 ORDER BY id DESC LIMIT $4",
                &[&user_id, &below, &state, &sql_own(limit as u64 + 1)],
            )
            .map_err(pg("list a user's commissions"))?;
        let mut items = rows.iter().map(|r| decode_snapshot(r.get(0))).collect::<Result<Vec<_>, _>>()?;
        let next_cursor = if items.len() > limit {
            items.truncate(limit);
            items.last().map(|c| c.id)
        } else {
            None
        };
        Ok(Page { items, next_cursor })
    }

    pub(super) fn live_commissions(&self) -> Result<Vec<Commission>, StorageError> {
        let rows = self
            .pool
            .get()?
            .query("SELECT snapshot FROM atelier.commissions WHERE live ORDER BY id", &[])
            .map_err(pg("read the live commissions"))?;
        rows.iter().map(|r| decode_snapshot(r.get(0))).collect()
    }

    pub(super) fn job(&self, job_id: u64) -> Result<Option<Job>, StorageError> {
        let Some(id) = sql(job_id) else { return Ok(None) };
        let row = self
            .pool
            .get()?
            .query_opt("SELECT record FROM atelier.jobs WHERE id = $1", &[&id])
            .map_err(pg("read a job"))?;
        row.map(|r| decode_job(r.get(0))).transpose()
    }

    pub(super) fn jobs_of(&self, commission_id: u64) -> Result<Vec<Job>, StorageError> {
        let Some(id) = sql(commission_id) else { return Ok(Vec::new()) };
        let rows = self
            .pool
            .get()?
            .query("SELECT record FROM atelier.jobs WHERE commission_id = $1 ORDER BY id", &[&id])
            .map_err(pg("read a commission's jobs"))?;
        rows.iter().map(|r| decode_job(r.get(0))).collect()
    }

    pub(super) fn allocate_job_id(&self) -> Result<u64, StorageError> {
        let id: i64 = self
            .pool
            .get()?
            .query_one("SELECT nextval('atelier.job_ids')", &[])
            .map_err(pg("allocate a job id"))?
            .get(0);
        from_sql(id, "job_ids")
    }

    pub(super) fn state_counts(&self) -> Result<Vec<(State, u64)>, StorageError> {
        let rows = self
            .pool
            .get()?
            .query("SELECT state, n FROM atelier.state_counts", &[])
            .map_err(pg("count commissions by state"))?;
        let mut counts = [0u64; 10];
        for r in rows {
            let state = state_of(r.get(0))?;
            counts[state as usize] = from_sql(r.get(1), "commissions")?;
        }
        Ok(State::ALL.iter().map(|s| (*s, counts[*s as usize])).collect())
    }
}

impl History for Inner {
    fn history(
        &self,
        filter: &Filter,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<Delivery>, StorageError> {
        let (after, upto) = (sql_own(after), sql_own(upto));
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut conn = self.pool.get()?;
        let rows = match filter {
            Filter::Commission(id) => {
                let Some(id) = sql(*id) else { return Ok(Vec::new()) };
                conn.query(
                    "SELECT seq, envelope, view FROM atelier.events
                     WHERE commission_id = $1 AND seq > $2 AND seq <= $3 AND envelope <> '' ORDER BY seq LIMIT $4",
                    &[&id, &after, &upto, &limit],
                )
            }
            Filter::User(user) => conn.query(
                "SELECT seq, envelope, view FROM atelier.events
                 WHERE user_id = $1 AND seq > $2 AND seq <= $3 AND envelope <> '' ORDER BY seq LIMIT $4",
                &[user, &after, &upto, &limit],
            ),
            Filter::All => conn.query(
                "SELECT seq, envelope, view FROM atelier.events
                 WHERE seq > $1 AND seq <= $2 AND envelope <> '' ORDER BY seq LIMIT $3",
                &[&after, &upto, &limit],
            ),
        }
        .map_err(pg("read history"))?;
        rows.iter().map(delivery_of).collect()
    }

    fn registry(&self) -> &Mutex<Registry> {
        &self.registry
    }

    fn durable_head(&self) -> &AtomicU64 {
        &self.durable_head
    }
}
