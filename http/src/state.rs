//! What every thread of a running server shares: the store, the keys, the settings, the
//! metrics, the counters the accept loop and the streams keep, and the handler pool's queue.

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;

use atelier_storage::EventStore;

use crate::auth::Keys;
use crate::config::HttpConfig;
use crate::executors::Executors;
use crate::metrics::Metrics;
use crate::pool::Job;
use crate::slot::Slots;

pub(crate) struct Shared {
    pub(crate) store: Arc<dyn EventStore>,
    pub(crate) keys: Keys,
    pub(crate) config: HttpConfig,
    pub(crate) executors: Option<Arc<dyn Executors>>,
    pub(crate) metrics: Metrics,
    pub(crate) shutting_down: AtomicBool,
    pub(crate) streams: AtomicU64,
    /// Open connections, in total and per client address, taken by the accept loop.
    pub(crate) slots: Arc<Slots>,
    /// Accept errors the accept loop recovered from (out of descriptors, say).
    pub(crate) accept_errors: AtomicU64,
    /// The handler pool's queue.
    pub(crate) jobs: crossbeam_channel::Sender<Job>,
}
