//! What the writer thread and the readers share: the trees, the durable head, the
//! subscription registry, and the acknowledged projection state not yet written back to the
//! projection tree. The writer changes it; readers (`read`) only look.

use std::collections::HashMap;
use std::fs::File;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};

use atelier_engine::Commission;

use crate::codec::CodecError;
use crate::error::{io, StorageError};
use crate::layout::Projection;
use crate::lock::DataDirLock;
use crate::reply::Bell;
use crate::subscribe::Registry;

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
    pub(super) durable_head: AtomicU64,
    pub(super) registry: Mutex<Registry>,
    /// sled's data file, for fdatasync.
    pub(super) db_file: File,
    pub(crate) dropped_slow: AtomicU64,
    /// What every thread waiting for the writer sleeps on (see `reply`).
    pub(super) bell: Arc<Bell>,
    /// Group commits that wrote to the log, and the appends they acknowledged.
    pub(super) group_commits: AtomicU64,
    pub(super) group_committed: AtomicU64,
    /// The writer's turns round its loop (`EventStore::writer_beats`).
    pub(super) writer_beats: AtomicU64,
    /// Acknowledged projection state not yet in the projection tree (write-back).
    pub(super) unflushed: RwLock<Unflushed>,
    /// Commissions per state, as of the durable head.
    pub(super) counts: Mutex<[u64; 10]>,
    /// Why the writer refuses every write since a failed commit, once it does.
    pub(super) poisoned: Mutex<Option<Arc<StorageError>>>,
    /// Why the open rebuilt the projections from the log, if it did.
    pub(super) rebuilt_at_open: std::sync::OnceLock<String>,
    /// `(free, needed)` bytes while the writer refuses appends for want of disk space.
    pub(super) disk_full: Mutex<Option<(u64, u64)>>,
    pub(super) _lock: DataDirLock,
}

/// A commission changed since the last projection flush.
pub(super) struct Dirty {
    pub(super) snapshot: Commission,
    /// The version of `seqs[0]`.
    pub(super) first_version: u64,
    /// The seq of each version from `first_version` on, not yet in the by-commission index.
    pub(super) seqs: Vec<u64>,
}

/// Snapshots and by-commission entries that the writer has acknowledged but not yet written
/// to the projection tree. Only the writer changes it; readers consult it before the tree.
#[derive(Default)]
pub(super) struct Unflushed {
    pub(super) commissions: HashMap<u64, Dirty>,
    /// `(user, seq, commission)` of every event since the last flush, in seq order: the
    /// user-seqs entries not yet in the tree.
    pub(super) user_seqs: Vec<(Arc<str>, u64, u64)>,
    /// Events since the last flush.
    pub(super) events: u64,
    /// About how much memory the snapshots and seqs hold.
    pub(super) bytes: usize,
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
    pub(super) fn set_snapshot(&mut self, cid: u64, snapshot: Commission) {
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

    pub(super) fn push_version(&mut self, cid: u64, version: u64, seq: u64) {
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

    pub(super) fn push_user_seq(&mut self, user: Arc<str>, seq: u64, cid: u64) {
        // The user's string is shared with the delivery's view; its entry costs about this.
        self.bytes += 32;
        self.user_seqs.push((user, seq, cid));
    }

    /// A user's events in `(after, upto]` not yet in the tree, as `(seq, commission)`.
    pub(super) fn user_seqs_of(&self, user: &str, after: u64, upto: u64) -> Vec<(u64, u64)> {
        let start = self.user_seqs.partition_point(|(_, seq, _)| *seq <= after);
        self.user_seqs[start..]
            .iter()
            .take_while(|(_, seq, _)| *seq <= upto)
            .filter(|(u, _, _)| &**u == user)
            .map(|(_, seq, cid)| (*seq, *cid))
            .collect()
    }

    pub(super) fn clear(&mut self) {
        self.commissions.clear();
        self.user_seqs.clear();
        self.events = 0;
        self.bytes = 0;
    }
}

pub(super) fn bad(p: Projection) -> impl Fn(CodecError) -> StorageError {
    move |e| StorageError::undecodable_projection(p.name(), e)
}

pub(super) fn bad_run() -> StorageError {
    StorageError::bad_projection(
        Projection::ByCommission.name(),
        "a run of seqs is not a multiple of 8 bytes",
    )
}

pub(super) fn fdatasync(f: &File) -> Result<(), StorageError> {
    f.sync_data().map_err(io("fdatasync the sled data file"))
}
