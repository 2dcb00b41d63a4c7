//! Rebuilding projections from the log, comparing them with the stored ones, and moving a
//! log in and out as JSON lines. These back `atelier replay --check`, `export` and `import`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, Write};
use std::time::{Duration, Instant};

use atelier_engine::{apply, apply_job, Commission, Envelope, Job};

use crate::codec;
use crate::error::StorageError;
use crate::event_store::EventStore;
use crate::layout::{self, Projection, META_COUNTS};
use crate::log::decode_record;
use crate::sled_store::{SledStore, Trees};

/// Mismatches listed per projection before the report says "and N more".
pub const DIFF_LINES_MAX: usize = 20;
/// Events read from the log per chunk while exporting.
pub const EXPORT_CHUNK_EVENTS: usize = 10_000;
/// Events handed to the writer per import request.
pub const IMPORT_CHUNK_EVENTS: usize = 10_000;

/// Projections rebuilt in memory from the log alone.
#[derive(Default)]
pub struct Rebuilt {
    pub events: u64,
    pub pruned: u64,
    pub head: u64,
    pub commissions: HashMap<u64, Commission>,
    pub jobs: HashMap<u64, Job>,
}

/// Walks the whole log: checks that it is gap-free and that every checksum and the hash chain
/// hold, and folds every event into snapshots and job records.
pub fn rebuild(store: &SledStore) -> Result<Rebuilt, StorageError> {
    rebuild_with(store, |_| {})
}

/// [`rebuild`], also showing every event to `each` (one pass over the log for the check).
fn rebuild_with(store: &SledStore, mut each: impl FnMut(&Envelope)) -> Result<Rebuilt, StorageError> {
    let t = &store.inner().trees;
    let mut out = Rebuilt::default();
    let mut chain = 0u32;
    for item in crate::log::records(&t.log, 1, u64::MAX) {
        let (seq, v) = item?;
        if seq != out.head + 1 {
            return Err(StorageError::corruption(out.head + 1, format!("missing: the next record is {seq}")));
        }
        let (env, next_chain) = decode_record(seq, &v, Some(chain))?;
        chain = next_chain;
        out.head = seq;
        let Some(env) = env else {
            out.pruned += 1;
            continue;
        };
        out.events += 1;
        each(&env);
        let before = out.commissions.remove(&env.commission_id);
        let after = apply(before, &env).map_err(|r| {
            StorageError::corruption_from(seq, format!("the state machine refuses it: {r}"), r)
        })?;
        out.commissions.insert(env.commission_id, after);
        let jobs = &out.jobs;
        if let Some((id, job)) = apply_job(|id| jobs.get(&id).cloned(), &env) {
            out.jobs.insert(id, job);
        }
    }
    Ok(out)
}

pub struct CheckReport {
    pub events: u64,
    pub pruned: u64,
    pub commissions: usize,
    pub jobs: usize,
    pub elapsed: Duration,
    /// Human-readable differences between the stored and the rebuilt projections.
    pub diff: Vec<String>,
}

/// Rebuilds every projection from the log and compares it with what is stored. The store's
/// write-back state is written out first, so that the tree alone is compared.
pub fn replay_check(store: &SledStore) -> Result<CheckReport, StorageError> {
    let started = Instant::now();
    store.flush_projections()?;
    // Index by commission, (commission, version, seq), gathered in the same pass over the log.
    let mut expected_idx = BTreeSet::new();
    let rebuilt = rebuild_with(store, |env| {
        expected_idx.insert((env.commission_id, env.version, env.seq));
    })?;
    let t = &store.inner().trees;
    let mut diff = Vec::new();

    diff_snapshots(t, &rebuilt, &mut diff)?;
    let expected = Expected::of(&rebuilt, expected_idx);
    diff_indexes(t, &expected, &mut diff)?;
    diff_jobs(t, &rebuilt, &mut diff)?;
    let stored_counts: [u64; 10] = match t.meta(META_COUNTS)? {
        Some(v) => codec::decode(&v).unwrap_or([u64::MAX; 10]),
        None => [0; 10],
    };
    if stored_counts != expected.counts && rebuilt.pruned == 0 {
        diff.push(format!("meta: state counts stored {stored_counts:?} != rebuilt {:?}", expected.counts));
    }
    Ok(CheckReport {
        events: rebuilt.events,
        pruned: rebuilt.pruned,
        commissions: rebuilt.commissions.len(),
        jobs: rebuilt.jobs.len(),
        elapsed: started.elapsed(),
        diff,
    })
}

/// Stored snapshots against rebuilt ones.
fn diff_snapshots(t: &Trees, rebuilt: &Rebuilt, diff: &mut Vec<String>) -> Result<(), StorageError> {
    let mut stored: BTreeMap<u64, Commission> = BTreeMap::new();
    for item in t.scan(Projection::Commissions) {
        let (k, v) = item?;
        let id = layout::decode_u64(&k).unwrap_or(0);
        match codec::decode::<Commission>(&v) {
            Ok(c) => {
                stored.insert(id, c);
            }
            Err(e) => diff.push(format!("commissions: {id}: undecodable: {e}")),
        }
    }
    let mut lines = Vec::new();
    for (id, c) in &rebuilt.commissions {
        match stored.get(id) {
            None => lines.push(format!("commissions: {id}: missing (log has version {})", c.version)),
            Some(s) if s != c => lines.push(format!(
                "commissions: {id}: stored version {} state {} != rebuilt version {} state {}{}",
                s.version,
                s.state,
                c.version,
                c.state,
                if s.version == c.version { " (same version, different fields)" } else { "" }
            )),
            _ => {}
        }
    }
    for id in stored.keys().filter(|id| !rebuilt.commissions.contains_key(id)) {
        lines.push(format!("commissions: {id}: stored but not in the log"));
    }
    push_limited(diff, lines);

    Ok(())
}

/// The index entries and counts the rebuilt snapshots imply.
struct Expected {
    /// `(commission, version, seq)` of every event in the log.
    by_commission: BTreeSet<(u64, u64, u64)>,
    users: BTreeSet<(String, u64)>,
    /// `(user, seq, commission)` of every event of a commission still in the log.
    user_seqs: BTreeSet<(String, u64, u64)>,
    idempotency: BTreeSet<((String, String), u64)>,
    live: BTreeSet<u64>,
    counts: [u64; 10],
}

impl Expected {
    fn of(rebuilt: &Rebuilt, by_commission: BTreeSet<(u64, u64, u64)>) -> Expected {
        let mut users = BTreeSet::new();
        let mut idempotency = BTreeMap::new();
        let mut live = BTreeSet::new();
        let mut counts = [0u64; 10];
        for c in rebuilt.commissions.values() {
            users.insert((c.user_id.clone(), c.id));
            if let Some(k) = &c.idempotency_key {
                idempotency.insert((c.user_id.clone(), k.clone()), c.id);
            }
            if !c.state.is_terminal() {
                live.insert(c.id);
            }
            counts[c.state as usize] += 1;
        }
        let user_seqs = by_commission
            .iter()
            .filter_map(|&(cid, _, seq)| rebuilt.commissions.get(&cid).map(|c| (c.user_id.clone(), seq, cid)))
            .collect();
        Expected {
            by_commission,
            users,
            user_seqs,
            idempotency: idempotency.into_iter().collect(),
            live,
            counts,
        }
    }
}

/// The stored indexes (by commission, by user, user seqs, idempotency, live) against the
/// expected ones.
fn diff_indexes(t: &Trees, expected: &Expected, diff: &mut Vec<String>) -> Result<(), StorageError> {
    let mut stored_idx = BTreeSet::new();
    for item in t.scan(Projection::ByCommission) {
        let (k, v) = item?;
        let (cid, first) = (layout::decode_u64(&k).unwrap_or(0), layout::decode_u64(&k[8..]).unwrap_or(0));
        let Some(seqs) = layout::decode_run(&v) else {
            diff.push(format!("by_commission: {cid}: the run at version {first} is undecodable"));
            continue;
        };
        stored_idx.extend(seqs.zip(first..).map(|(seq, version)| (cid, version, seq)));
    }
    compare_sets(diff, "by_commission", &expected.by_commission, &stored_idx);

    let mut stored_users = BTreeSet::new();
    for item in t.scan(Projection::ByUser) {
        let (k, _) = item?;
        let split = k.len().saturating_sub(9);
        let user = String::from_utf8_lossy(&k[..split]).into_owned();
        stored_users.insert((user, layout::decode_u64(&k[split + 1..]).unwrap_or(0)));
    }
    compare_sets(diff, "by_user", &expected.users, &stored_users);

    let mut stored_user_seqs = BTreeSet::new();
    for item in t.scan(Projection::UserSeqs) {
        let (k, v) = item?;
        let split = k.len().saturating_sub(9);
        let user = String::from_utf8_lossy(&k[..split]).into_owned();
        let seq = layout::decode_u64(&k[split + 1..]).unwrap_or(0);
        stored_user_seqs.insert((user, seq, layout::decode_u64(&v).unwrap_or(0)));
    }
    compare_sets(diff, "user_seqs", &expected.user_seqs, &stored_user_seqs);

    let mut stored_idem = BTreeMap::new();
    for item in t.scan(Projection::Idempotency) {
        let (k, v) = item?;
        let nul = k.iter().position(|b| *b == 0).unwrap_or(k.len());
        let user = String::from_utf8_lossy(&k[..nul]).into_owned();
        let key = String::from_utf8_lossy(k.get(nul + 1..).unwrap_or_default()).into_owned();
        stored_idem.insert((user, key), layout::decode_u64(&v).unwrap_or(0));
    }
    let stored_idem: BTreeSet<_> = stored_idem.into_iter().collect();
    compare_sets(diff, "idempotency", &expected.idempotency, &stored_idem);

    let mut stored_live = BTreeSet::new();
    for item in t.scan(Projection::Live) {
        stored_live.insert(layout::decode_u64(&item?.0).unwrap_or(0));
    }
    compare_sets(diff, "live", &expected.live, &stored_live);

    Ok(())
}

/// Stored job records, and the jobs-by-commission index, against rebuilt ones.
fn diff_jobs(t: &Trees, rebuilt: &Rebuilt, diff: &mut Vec<String>) -> Result<(), StorageError> {
    let mut lines = Vec::new();
    let mut stored_jobs = 0usize;
    for item in t.scan(Projection::Jobs) {
        let (k, v) = item?;
        stored_jobs += 1;
        let id = layout::decode_u64(&k).unwrap_or(0);
        match (codec::decode::<Job>(&v), rebuilt.jobs.get(&id)) {
            (Ok(j), Some(r)) if &j == r => {}
            (Ok(_), Some(_)) => lines.push(format!("jobs: {id}: stored record differs from the log")),
            (Ok(_), None) => lines.push(format!("jobs: {id}: stored but not in the log")),
            (Err(e), _) => lines.push(format!("jobs: {id}: undecodable: {e}")),
        }
    }
    if stored_jobs < rebuilt.jobs.len() {
        lines.push(format!("jobs: {} records missing", rebuilt.jobs.len() - stored_jobs));
    }
    push_limited(diff, lines);

    let expected: BTreeSet<(u64, u64)> = rebuilt.jobs.values().map(|j| (j.commission_id, j.job_id)).collect();
    let mut stored = BTreeSet::new();
    for item in t.scan(Projection::JobsByCommission) {
        let (k, _) = item?;
        stored.insert((layout::decode_u64(&k).unwrap_or(0), layout::decode_u64(&k[8..]).unwrap_or(0)));
    }
    compare_sets(diff, Projection::JobsByCommission.name(), &expected, &stored);

    Ok(())
}

fn compare_sets<T: Ord + std::fmt::Debug>(
    diff: &mut Vec<String>,
    tree: &str,
    expected: &BTreeSet<T>,
    stored: &BTreeSet<T>,
) {
    let mut lines: Vec<String> =
        expected.difference(stored).map(|x| format!("{tree}: missing {x:?}")).collect();
    lines.extend(stored.difference(expected).map(|x| format!("{tree}: unexpected {x:?}")));
    push_limited(diff, lines);
}

fn push_limited(diff: &mut Vec<String>, lines: Vec<String>) {
    let n = lines.len();
    diff.extend(lines.into_iter().take(DIFF_LINES_MAX));
    if n > DIFF_LINES_MAX {
        diff.push(format!("... and {} more", n - DIFF_LINES_MAX));
    }
}

/// Writes the log as JSON lines, one envelope each, in seq order, from either backend, up to
/// its head when called. Pruned records are skipped.
pub fn export(store: &dyn EventStore, out: &mut dyn Write) -> Result<u64, StorageError> {
    export_through(store, store.head_seq(), out)
}

/// Writes the log's events with seq up to `through` as [`export`] does: a copy as of one seq,
/// whatever is appended while it is written.
pub fn export_through(
    store: &dyn EventStore,
    through: u64,
    out: &mut dyn Write,
) -> Result<u64, StorageError> {
    let mut n = 0;
    let mut after = 0;
    while let ExportChunk { events, next: Some(next) } = export_chunk(store, after, through, out)? {
        n += events;
        after = next;
    }
    out.flush().map_err(crate::error::io("write the export"))?;
    Ok(n)
}

/// What one [`export_chunk`] wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportChunk {
    pub events: u64,
    /// Where the next chunk starts (its `after`); `None` once `through` is reached.
    pub next: Option<u64>,
}

/// Writes one chunk of the events after `after` with seq up to `through` (at most
/// [`EXPORT_CHUNK_EVENTS`]) as JSON lines. One read of the log beside the writer, which it
/// never holds up: a backup of a serving store exports chunk by chunk.
pub fn export_chunk(
    store: &dyn EventStore,
    after: u64,
    through: u64,
    out: &mut dyn Write,
) -> Result<ExportChunk, StorageError> {
    if after >= through {
        return Ok(ExportChunk { events: 0, next: None });
    }
    let chunk = store.read_log(after, EXPORT_CHUNK_EVENTS)?;
    let Some(last) = chunk.last() else { return Ok(ExportChunk { events: 0, next: None }) };
    let mut events = 0;
    for env in chunk.iter().take_while(|env| env.seq <= through) {
        let line = serde_json::to_string(env).expect("invariant: envelopes serialize");
        writeln!(out, "{line}").map_err(crate::error::io("write the export"))?;
        events += 1;
    }
    Ok(ExportChunk { events, next: Some(last.seq) })
}

/// A store that [`import`] loads into: a data dir's sled store, or a PostgreSQL log.
pub trait Importer {
    /// Whether the log holds no event yet.
    fn is_empty(&self) -> Result<bool, StorageError>;
    /// Appends exported events, checked against the state machine as live appends are.
    fn import(&self, events: Vec<Envelope>) -> Result<(), StorageError>;
}

impl Importer for SledStore {
    fn is_empty(&self) -> Result<bool, StorageError> {
        Ok(self.inner().trees.log.first()?.is_none())
    }

    fn import(&self, events: Vec<Envelope>) -> Result<(), StorageError> {
        SledStore::import(self, events)
    }
}

/// Loads JSON lines from [`export`] into an empty store.
pub fn import(store: &dyn Importer, input: &mut dyn BufRead) -> Result<u64, StorageError> {
    if !store.is_empty()? {
        return Err(StorageError::import(0, "the log is not empty"));
    }
    let mut chunk = Vec::with_capacity(IMPORT_CHUNK_EVENTS);
    let mut n = 0u64;
    for (i, line) in input.lines().enumerate() {
        let line = line.map_err(crate::error::io("read the import"))?;
        if line.trim().is_empty() {
            continue;
        }
        let env: Envelope = serde_json::from_str(&line)
            .map_err(|e| StorageError::import_from(i + 1, format!("not an event: {e}"), e))?;
        chunk.push(env);
        n += 1;
        if chunk.len() == IMPORT_CHUNK_EVENTS {
            import_chunk(store, std::mem::take(&mut chunk), i + 1 - IMPORT_CHUNK_EVENTS)?;
        }
    }
    let base = usize::try_from(n).unwrap_or(usize::MAX) - chunk.len();
    if !chunk.is_empty() {
        import_chunk(store, chunk, base)?;
    }
    Ok(n)
}

/// Imports one chunk; the writer counts lines within the chunk, so shift them by `base`.
fn import_chunk(store: &dyn Importer, chunk: Vec<Envelope>, base: usize) -> Result<(), StorageError> {
    store.import(chunk).map_err(|e| match e {
        StorageError::Import { line, detail, source } => {
            StorageError::Import { line: line + base, detail, source }
        }
        e => e,
    })
}
