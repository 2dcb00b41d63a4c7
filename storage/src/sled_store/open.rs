//! Opening a data dir: take its lock, open sled, bring the schema up to this build's version,
//! find the log's head and chain, and catch the projections up with the log before the
//! writer takes requests.

use std::collections::HashMap;
use std::fs::File;

use atelier_engine::Commission;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};

use super::config::{Durability, StoreConfig};
use super::disk::Disk;
use super::state::{bad, Inner, Trees, Unflushed};
use super::writer::Writer;
use crate::codec;
use crate::error::{io, StorageError};
use crate::layout::{self, Projection, META_PROJECTED, META_SCHEMA};
use crate::lock::DataDirLock;
use crate::reply::Bell;
use crate::subscribe::Registry;

/// The layout written by this build. Opening a newer one fails; older ones are migrated.
pub const SCHEMA_VERSION: u32 = 3;

/// Entries the user-seqs migration writes per sled batch.
const MIGRATION_BATCH_ENTRIES: usize = 10_000;

type Migration = fn(&sled::Db) -> Result<(), StorageError>;
/// Ordered steps from one schema version to the next; step `n` produces version `n`.
const MIGRATIONS: &[(u32, &str, Migration)] = &[
    (1, "initial layout: the log, and one tree of prefixed projections", |_| Ok(())),
    // Schema-1 values (one record each) stay as they are and stay readable; the version
    // only tells an older build that it cannot read what this one writes.
    (2, "a log value may hold a block of consecutive records", |_| Ok(())),
    (3, "a user-seqs index lists each user's events by seq", build_user_seqs),
];

/// Writes the user-seqs entries of every event the projection tree has seen (up to
/// `projected_seq`; the catch-up after the migration stages the rest like any event). The
/// user of each event is its commission's, from the snapshot. Not atomic, nor needs to be:
/// the entries are a set, and an interrupted migration runs again at the next open.
fn build_user_seqs(db: &sled::Db) -> Result<(), StorageError> {
    let trees = Trees { log: db.open_tree(layout::LOG_TREE)?, proj: db.open_tree(layout::PROJECTIONS_TREE)? };
    let projected = trees.meta(META_PROJECTED)?.and_then(|v| layout::decode_u64(&v)).unwrap_or(0);
    let mut users: HashMap<u64, Option<String>> = HashMap::new();
    let mut batch = sled::Batch::default();
    let mut staged = 0;
    for item in crate::log::records(&trees.log, 1, projected) {
        let (seq, record) = item?;
        let (Some(env), _) = crate::log::decode_record(seq, &record, None)? else { continue };
        let cid = env.commission_id;
        let user = match users.get(&cid) {
            Some(user) => user.clone(),
            None => {
                let user = match trees.proj.get(Projection::Commissions.key_u64(cid))? {
                    Some(v) => {
                        Some(codec::decode::<Commission>(&v).map_err(bad(Projection::Commissions))?.user_id)
                    }
                    None => None,
                };
                users.insert(cid, user.clone());
                user
            }
        };
        // A commission without a snapshot was pruned: its events have no entries.
        if let Some(user) = user {
            batch.insert(
                Projection::UserSeqs.key_user(&user, &layout::encode_u64(seq)),
                &layout::encode_u64(cid),
            );
            staged += 1;
        }
        if staged == MIGRATION_BATCH_ENTRIES {
            trees.proj.apply_batch(std::mem::take(&mut batch))?;
            staged = 0;
        }
    }
    trees.proj.apply_batch(batch)?;
    Ok(())
}

/// Opens the store's files and state, and a writer caught up with the log (not yet running).
pub(super) fn open(config: &StoreConfig) -> Result<(Arc<Inner>, Writer), StorageError> {
    std::fs::create_dir_all(&config.dir).map_err(io(format!("create {}", config.dir.display())))?;
    let lock = DataDirLock::acquire(&config.dir)?;
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
    let trees = Trees { log: db.open_tree(layout::LOG_TREE)?, proj: db.open_tree(layout::PROJECTIONS_TREE)? };
    migrate(&db, &trees)?;
    let db_path = sled_dir.join("db");
    let db_file = File::open(&db_path).map_err(io(format!("open {}", db_path.display())))?;

    let (head, chain) = crate::log::tail(&trees.log)?;
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
        writer_beats: AtomicU64::new(0),
        unflushed: RwLock::new(Unflushed::default()),
        counts: Mutex::new([0; 10]),
        poisoned: Mutex::new(None),
        disk_full: Mutex::new(None),
        rebuilt_at_open: std::sync::OnceLock::new(),
        _lock: lock,
    });
    let disk = Disk::open(&config.dir, config.disk_reserve_bytes);
    let mut writer = Writer::new(inner.clone(), head, chain, disk)?;
    writer.catch_up()?;
    Ok((inner, writer))
}

fn migrate(db: &sled::Db, trees: &Trees) -> Result<(), StorageError> {
    let found = match trees.meta(META_SCHEMA)? {
        None => 0,
        Some(v) => u32::try_from(layout::decode_u64(&v).unwrap_or(0)).unwrap_or(u32::MAX),
    };
    if found > SCHEMA_VERSION {
        return Err(StorageError::NewerSchema { found, supported: SCHEMA_VERSION });
    }
    for (version, what, step) in MIGRATIONS.iter().filter(|(v, _, _)| *v > found) {
        tracing::info!(version, what, "migrating the data dir");
        step(db)?;
        trees.proj.insert(Projection::Meta.key(META_SCHEMA), &layout::encode_u64(u64::from(*version)))?;
    }
    Ok(())
}
