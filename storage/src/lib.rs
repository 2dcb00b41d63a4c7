//! The durable event log and its projections.
//!
//! The rest of Atelier reaches storage only through [`EventStore`]: append events with
//! optimistic concurrency, read snapshots and job records, list a user's commissions, and
//! subscribe to the log. [`SledStore`] is the embedded implementation (sled 0.34, group
//! commit, fsync before acknowledging); [`PgStore`] keeps the log in PostgreSQL, which several
//! servers can share.

mod append_rules;
pub mod check;
pub mod codec;
mod error;
mod event_store;
pub mod layout;
mod lock;
mod log;
mod pg_store;
mod reply;
mod retention;
mod service;
mod sled_store;
mod subscribe;

pub use error::StorageError;
pub use event_store::{
    AppendOutcome, AppendRequest, AppendTarget, EventStore, ListQuery, LostJob, NodeInfo, Page,
    WRITER_BEAT_INTERVAL_MS,
};
pub use lock::DataDirLock;
pub use pg_store::{
    NodeConfig, PgConfig, PgStore, NODE_HEARTBEAT_MS_DEFAULT, NODE_LEASE_MS_DEFAULT, NODE_LEASE_MS_MAX,
    NODE_LEASE_MS_MIN, PG_BATCH_REQUESTS_MAX, PG_CONNECT_TIMEOUT_MS, PG_FOLLOWER_APPLICATION_NAME,
    PG_HEALTH_CHECK_INTERVAL_MS, PG_IDLE_IN_TRANSACTION_TIMEOUT_MS, PG_LIST_LIMIT_MAX,
    PG_POOL_CONNECTIONS_DEFAULT, PG_POOL_WAIT_MS, PG_RECONNECT_BACKOFF_MAX_MS, PG_RECONNECT_BACKOFF_MIN_MS,
    PG_SCHEMA_VERSION, PG_SERVER_LOCK_KEY, PG_SERVER_LOCK_WAIT_MS, PG_STATEMENT_TIMEOUT_MS,
    PG_TAIL_POLL_INTERVAL_MS, PG_WRITER_QUEUE_REQUESTS_MAX,
};
pub use retention::{Prune, Retention, RETENTION_CHECK_INTERVAL};
pub use service::{create, execute, Created};
pub use sled_store::{
    Durability, SledStore, StoreConfig, CACHE_CAPACITY_BYTES_DEFAULT, DISK_FREE_BYTES_MIN,
    DISK_RESERVE_BYTES_DEFAULT, DISK_RESERVE_FILE, LIST_LIMIT_MAX, SCHEMA_VERSION,
};
pub use subscribe::{
    Delivery, Filter, Subscription, SubscriptionEnd, ViewAfter, REPLAY_CHUNK_EVENTS,
    SUBSCRIBER_QUEUE_EVENTS_MAX,
};
