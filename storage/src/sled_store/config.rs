//! How a store is opened: where, with how much cache, and when an append counts as durable.
//! Both the open and the writer read it, so it sits below them.

use std::path::PathBuf;

/// Default sled page cache. sled's own default is 1 GiB, too much for an edge box.
pub const CACHE_CAPACITY_BYTES_DEFAULT: u64 = 64 * 1024 * 1024;

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
    /// The disk reserve's size (0: none); see [`super::disk`].
    pub disk_reserve_bytes: u64,
}

impl StoreConfig {
    pub fn new(dir: impl Into<PathBuf>) -> StoreConfig {
        StoreConfig {
            dir: dir.into(),
            cache_capacity_bytes: CACHE_CAPACITY_BYTES_DEFAULT,
            durability: Durability::Sync,
            disk_reserve_bytes: super::disk::DISK_RESERVE_BYTES_DEFAULT,
        }
    }
}
