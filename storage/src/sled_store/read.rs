//! Reads: snapshots, a commission's events, the global log, listings and job records, and
//! the history a subscription replays. Readers look at the acknowledged write-back state in
//! memory before the projection tree, so they always see the latest acknowledged state.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use atelier_engine::{apply, Commission, Envelope, Job};

use super::state::{bad, bad_run, Inner};
use crate::codec;
use crate::error::StorageError;
use crate::event_store::{ListQuery, Page};
use crate::layout::{self, Projection};
use crate::log::decode_record;
use crate::subscribe::{Delivery, Filter, History, Registry, ViewAfter};

/// Index entries a filtered listing reads at most before it returns a cursor.
pub const LIST_SCAN_MAX: usize = 10_000;
pub const LIST_LIMIT_MAX: usize = 200;

impl Inner {
    /// The latest acknowledged snapshot: write-back state first, then the tree. (The writer
    /// writes the tree before it drops an entry from `unflushed`, so a miss here means the
    /// tree already has it.)
    pub(super) fn get_commission(&self, id: u64) -> Result<Option<Commission>, StorageError> {
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
            let first = layout::decode_u64(&k[9..]).ok_or_else(bad_run)?;
            let expected = seqs.len() as u64 + 1;
            if first != expected {
                return Err(StorageError::bad_projection(
                    Projection::ByCommission.name(),
                    format!("commission {id}: a run starts at version {first}, expected {expected}"),
                ));
            }
            seqs.extend(layout::decode_run(&v).ok_or_else(bad_run)?);
        }
        if let Some((first, pending)) = pending {
            let known = seqs.len() as u64;
            if first > known + 1 {
                return Err(StorageError::bad_projection(
                    Projection::ByCommission.name(),
                    format!("commission {id}: versions {} to {} are missing", known + 1, first - 1),
                ));
            }
            let skip = usize::try_from(known + 1 - first).unwrap_or(usize::MAX);
            seqs.extend(pending.into_iter().skip(skip));
        }
        Ok(seqs)
    }

    /// A user's first `limit` events in `(after, upto]` as `(seq, commission)`, in seq order:
    /// the write-back entries (taken first: a flush moves them to the tree before it clears
    /// them, so between the two reads each entry is in one or the other) and the tree's.
    fn user_seqs(
        &self,
        user: &str,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<(u64, u64)>, StorageError> {
        let pending =
            self.unflushed.read().unwrap_or_else(|p| p.into_inner()).user_seqs_of(user, after, upto);
        let from = Projection::UserSeqs.key_user(user, &layout::encode_u64(after.saturating_add(1)));
        let to = Projection::UserSeqs.key_user(user, &layout::encode_u64(upto));
        let mut picks = Vec::new();
        for item in self.trees.proj.range(from..=to).take(limit) {
            let (k, v) = item?;
            let seq = layout::decode_u64(&k[k.len() - 8..]).unwrap_or(0);
            let id = layout::decode_u64(&v).ok_or_else(|| {
                StorageError::bad_projection(
                    Projection::UserSeqs.name(),
                    format!("seq {seq}: no commission id"),
                )
            })?;
            picks.push((seq, id));
        }
        picks.extend(pending);
        picks.sort_unstable();
        picks.dedup();
        picks.truncate(limit);
        Ok(picks)
    }

    pub(super) fn events_of(&self, id: u64) -> Result<Vec<Envelope>, StorageError> {
        self.events_upto(id, u64::MAX)
    }

    /// A commission's events with seq at most `upto`, in order.
    fn events_upto(&self, id: u64, upto: u64) -> Result<Vec<Envelope>, StorageError> {
        let mut out = Vec::new();
        let mut cursor = crate::log::Cursor::new(&self.trees.log);
        for seq in self.seqs_of(id)?.into_iter().take_while(|&s| s <= upto) {
            let rec = cursor
                .get(seq)?
                .ok_or_else(|| StorageError::corruption(seq, "indexed record is missing from the log"))?;
            if let (Some(env), _) = decode_record(seq, &rec, None)? {
                out.push(env);
            }
        }
        Ok(out)
    }

    pub(super) fn read_log(
        &self,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<Envelope>, StorageError> {
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

    pub(super) fn list_user(&self, user_id: &str, q: &ListQuery) -> Result<Page, StorageError> {
        let limit = q.limit.clamp(1, LIST_LIMIT_MAX);
        let prefix = Projection::ByUser.key_user(user_id, &[]);
        let upper = Projection::ByUser.key_user(user_id, &layout::encode_u64(q.cursor.unwrap_or(u64::MAX)));
        let mut items = Vec::new();
        let mut scanned = 0;
        let mut last_id = None;
        for item in self.trees.proj.range(prefix.clone()..upper).rev() {
            let (k, _) = item?;
            let id = layout::decode_u64(&k[k.len() - 8..]).unwrap_or(0);
            last_id = Some(id);
            scanned += 1;
            if let Some(c) = self.get_commission(id)? {
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

    pub(super) fn live_commissions(&self) -> Result<Vec<Commission>, StorageError> {
        let mut out = Vec::new();
        for item in self.trees.scan(Projection::Live) {
            let (k, _) = item?;
            if let Some(c) = self.get_commission(layout::decode_u64(&k).unwrap_or(0))? {
                out.push(c);
            }
        }
        Ok(out)
    }

    pub(super) fn job(&self, job_id: u64) -> Result<Option<Job>, StorageError> {
        match self.trees.proj.get(Projection::Jobs.key_u64(job_id))? {
            None => Ok(None),
            Some(v) => codec::decode(&v).map(Some).map_err(bad(Projection::Jobs)),
        }
    }

    pub(super) fn jobs_of(&self, commission_id: u64) -> Result<Vec<Job>, StorageError> {
        let mut out = Vec::new();
        for item in self.trees.proj.scan_prefix(Projection::JobsByCommission.key_u64(commission_id)) {
            let (k, _) = item?;
            if let Some(j) = self.job(layout::decode_u64(&k[9..]).unwrap_or(0))? {
                out.push(j);
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
            .map_err(|r| StorageError::corruption_from(seq, format!("refused on replay: {r}"), r))?;
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
                // The chunk's seqs come from the user-seqs index (a range scan of this user's
                // events), then each commission with a pick is folded up to its last pick:
                // the cost follows the user's events in the chunk, not their commissions.
                let picks = self.user_seqs(user, after, upto, limit)?;
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
                                c =
                                    Some(apply(c, &e).map_err(|r| {
                                        StorageError::corruption_from(e.seq, r.to_string(), r)
                                    })?);
                            }
                            c
                        }
                    };
                    let next = apply(prev, &env)
                        .map_err(|r| StorageError::corruption_from(seq, r.to_string(), r))?;
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
