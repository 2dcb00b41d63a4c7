//! `atelier replay --check` on PostgreSQL: folds the whole log again (checking that its seqs
//! are gap-free and that the state machine takes every event) and compares the result with
//! the projection tables, all in one snapshot of the database, so that a server appending
//! meanwhile causes no false difference.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

use atelier_engine::{apply, apply_job, Commission, Job};
use postgres::{IsolationLevel, Transaction};

use super::state::{decode_job, decode_snapshot, envelope_of, from_sql, sql_own, state_code, Inner};
use crate::check::{CheckReport, DIFF_LINES_MAX};
use crate::error::{pg, StorageError};

/// Events read per query while folding the log.
const CHECK_CHUNK_EVENTS: i64 = 10_000;

/// The whole log, folded: snapshots and job records by id, and the head.
struct Folded {
    events: u64,
    /// Stubs retention left (an empty envelope): their seqs count, their content is gone.
    pruned: u64,
    commissions: BTreeMap<u64, Commission>,
    jobs: HashMap<u64, Job>,
}

impl Inner {
    pub(super) fn replay_check(&self) -> Result<CheckReport, StorageError> {
        let started = Instant::now();
        let mut conn = self.pool.get()?;
        let mut tx = conn
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .map_err(pg("begin the check"))?;
        let folded = fold_log(&mut tx)?;
        let mut diff = Vec::new();
        diff_commissions(&mut tx, &folded, &mut diff)?;
        diff_jobs(&mut tx, &folded, &mut diff)?;
        diff_idempotency(&mut tx, &folded, &mut diff)?;
        diff_counts(&mut tx, &folded, &mut diff)?;
        let n = diff.len();
        diff.truncate(DIFF_LINES_MAX);
        if n > DIFF_LINES_MAX {
            diff.push(format!("... and {} more", n - DIFF_LINES_MAX));
        }
        Ok(CheckReport {
            events: folded.events,
            pruned: folded.pruned,
            commissions: folded.commissions.len(),
            jobs: folded.jobs.len(),
            elapsed: started.elapsed(),
            diff,
        })
    }
}

fn fold_log(tx: &mut Transaction<'_>) -> Result<Folded, StorageError> {
    let head =
        tx.query_one("SELECT seq, next_commission FROM atelier.head", &[]).map_err(pg("read the head"))?;
    let (head, next_commission) = (from_sql(head.get(0), "head")?, from_sql(head.get(1), "head")?);
    let mut out = Folded { events: 0, pruned: 0, commissions: BTreeMap::new(), jobs: HashMap::new() };
    loop {
        let rows = tx
            .query(
                "SELECT seq, envelope FROM atelier.events WHERE seq > $1 ORDER BY seq LIMIT $2",
                &[&sql_own(out.events), &CHECK_CHUNK_EVENTS],
            )
            .map_err(pg("read the log"))?;
        if rows.is_empty() {
            break;
        }
        for row in &rows {
            let expected = out.events + 1;
            if row.get::<_, &[u8]>(1).is_empty() {
                let seq = from_sql(row.get(0), "events")?;
                if seq != expected {
                    return Err(StorageError::corruption(expected, "the event is missing from the log"));
                }
                out.pruned += 1;
                out.events = seq;
                continue;
            }
            let env = envelope_of(row)?;
            if env.seq != expected {
                return Err(StorageError::corruption(expected, "the event is missing from the log"));
            }
            let before = out.commissions.remove(&env.commission_id);
            let after = apply(before, &env).map_err(|r| {
                StorageError::corruption_from(env.seq, format!("the state machine refuses it: {r}"), r)
            })?;
            out.commissions.insert(env.commission_id, after);
            let jobs = &out.jobs;
            if let Some((id, job)) = apply_job(|id| jobs.get(&id).cloned(), &env) {
                out.jobs.insert(id, job);
            }
            out.events = env.seq;
        }
    }
    if out.events != head {
        return Err(StorageError::corruption(
            out.events + 1,
            format!("the head says the log ends at {head}"),
        ));
    }
    if out.commissions.keys().next_back().is_some_and(|id| *id >= next_commission) {
        return Err(StorageError::bad_projection(
            "head",
            format!("next commission {next_commission} is in use"),
        ));
    }
    Ok(out)
}

fn diff_commissions(
    tx: &mut Transaction<'_>,
    f: &Folded,
    diff: &mut Vec<String>,
) -> Result<(), StorageError> {
    let rows = tx
        .query("SELECT id, user_id, state, live, version, snapshot FROM atelier.commissions", &[])
        .map_err(pg("read the commissions"))?;
    let mut seen = BTreeSet::new();
    for row in rows {
        let id = from_sql(row.get(0), "commissions")?;
        seen.insert(id);
        let Some(want) = f.commissions.get(&id) else {
            diff.push(format!("commissions: {id} is stored but not in the log"));
            continue;
        };
        match decode_snapshot(row.get(5)) {
            Ok(c) if &c == want => {}
            Ok(c) => diff.push(format!(
                "commissions: {id} stored at version {} != rebuilt {}",
                c.version, want.version
            )),
            Err(e) => diff.push(format!("commissions: {id}: {e}")),
        }
        let columns =
            (row.get::<_, &str>(1), row.get::<_, i16>(2), row.get::<_, bool>(3), row.get::<_, i64>(4));
        let expected =
            (want.user_id.as_str(), state_code(want.state), !want.state.is_terminal(), sql_own(want.version));
        if columns != expected {
            diff.push(format!(
                "commissions: {id} columns (user, state, live, version) {columns:?} != rebuilt {expected:?}"
            ));
        }
    }
    for id in f.commissions.keys().filter(|id| !seen.contains(id)) {
        diff.push(format!("commissions: {id} is in the log but not stored"));
    }
    Ok(())
}

/// `state_counts` against the rebuilt commissions' states (a state with none may have a 0 row).
fn diff_counts(tx: &mut Transaction<'_>, f: &Folded, diff: &mut Vec<String>) -> Result<(), StorageError> {
    let mut want: BTreeMap<i16, i64> = BTreeMap::new();
    for c in f.commissions.values() {
        *want.entry(state_code(c.state)).or_default() += 1;
    }
    let mut stored: BTreeMap<i16, i64> = BTreeMap::new();
    for row in
        tx.query("SELECT state, n FROM atelier.state_counts", &[]).map_err(pg("read the state counts"))?
    {
        stored.insert(row.get(0), row.get(1));
    }
    stored.retain(|_, n| *n != 0);
    if stored != want {
        diff.push(format!("state_counts: stored {stored:?} != rebuilt {want:?} (state code: count)"));
    }
    Ok(())
}

fn diff_jobs(tx: &mut Transaction<'_>, f: &Folded, diff: &mut Vec<String>) -> Result<(), StorageError> {
    let rows =
        tx.query("SELECT id, commission_id, record FROM atelier.jobs", &[]).map_err(pg("read the jobs"))?;
    let mut seen = BTreeSet::new();
    for row in rows {
        let id = from_sql(row.get(0), "jobs")?;
        seen.insert(id);
        match (f.jobs.get(&id), decode_job(row.get(2))) {
            (None, _) => diff.push(format!("jobs: {id} is stored but not in the log")),
            (Some(want), Ok(job)) if &job == want && sql_own(want.commission_id) == row.get::<_, i64>(1) => {}
            (Some(_), Ok(_)) => diff.push(format!("jobs: {id} differs from the rebuilt record")),
            (Some(_), Err(e)) => diff.push(format!("jobs: {id}: {e}")),
        }
    }
    let mut missing: Vec<_> = f.jobs.keys().filter(|id| !seen.contains(id)).collect();
    missing.sort();
    for id in missing {
        diff.push(format!("jobs: {id} is in the log but not stored"));
    }
    Ok(())
}

fn diff_idempotency(
    tx: &mut Transaction<'_>,
    f: &Folded,
    diff: &mut Vec<String>,
) -> Result<(), StorageError> {
    let expected: BTreeSet<(String, String, u64)> = f
        .commissions
        .values()
        .filter_map(|c| c.idempotency_key.clone().map(|k| (c.user_id.clone(), k, c.id)))
        .collect();
    let rows = tx
        .query("SELECT user_id, key, commission_id FROM atelier.idempotency", &[])
        .map_err(pg("read the idempotency keys"))?;
    let mut stored = BTreeSet::new();
    for row in rows {
        stored.insert((
            row.get::<_, String>(0),
            row.get::<_, String>(1),
            from_sql(row.get(2), "idempotency")?,
        ));
    }
    for (user, key, id) in stored.difference(&expected) {
        diff.push(format!("idempotency: ({user}, {key}) -> {id} is stored but not in the log"));
    }
    for (user, key, id) in expected.difference(&stored) {
        diff.push(format!("idempotency: ({user}, {key}) -> {id} is in the log but not stored"));
    }
    Ok(())
}
