//! A node's lease as this process holds it (see `nodes` for what it guards): whether it is
//! lost, and whether this node runs the maintenance.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Mutex;

use super::config::NodeConfig;
use crate::error::StorageError;

/// This node's lease, as the writer, the keeper and the scheduler see it.
pub(crate) struct Lease {
    pub(super) config: NodeConfig,
    /// This run's incarnation (stays set after a loss, for the error messages).
    incarnation: AtomicI64,
    /// Why the lease is lost, while it is: nothing is appended.
    lost: Mutex<Option<String>>,
    /// The scheduler stopped this node's jobs after a loss: take a new lease.
    rejoin: AtomicBool,
    /// Whether this node runs the maintenance now.
    maintainer: AtomicBool,
}

impl Lease {
    pub(super) fn new(config: NodeConfig, incarnation: i64) -> Lease {
        Lease {
            config,
            incarnation: AtomicI64::new(incarnation),
            lost: Mutex::new(None),
            rejoin: AtomicBool::new(false),
            maintainer: AtomicBool::new(false),
        }
    }

    pub(super) fn incarnation(&self) -> i64 {
        self.incarnation.load(Ordering::Acquire)
    }

    /// `Err(LeaseLost)` while the lease is lost.
    pub(super) fn check(&self) -> Result<(), StorageError> {
        match &*self.lost.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(reason) => {
                Err(StorageError::LeaseLost { node: self.config.id.clone(), reason: reason.clone() })
            }
            None => Ok(()),
        }
    }

    pub(super) fn is_lost(&self) -> bool {
        self.lost.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// Counts the lease lost (the first reason stays).
    pub(super) fn lose(&self, reason: &str) {
        let mut lost = self.lost.lock().unwrap_or_else(|p| p.into_inner());
        if lost.is_none() {
            tracing::error!(node = %self.config.id, reason, "this node lost its lease; its jobs stop and it appends nothing until it rejoins");
            *lost = Some(reason.to_string());
        }
        self.set_maintainer(false);
    }

    pub(super) fn ask_rejoin(&self) {
        if self.is_lost() {
            self.rejoin.store(true, Ordering::Release);
        }
    }

    pub(super) fn rejoin_asked(&self) -> bool {
        self.rejoin.load(Ordering::Acquire)
    }

    /// A new lease was taken, as run `incarnation`.
    pub(super) fn rejoined(&self, incarnation: i64) {
        self.incarnation.store(incarnation, Ordering::Release);
        self.rejoin.store(false, Ordering::Release);
        *self.lost.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    pub(super) fn set_maintainer(&self, is: bool) {
        if is != self.maintainer.swap(is, Ordering::AcqRel) {
            tracing::info!(node = %self.config.id, maintainer = is, "maintenance moved");
        }
    }

    pub(super) fn is_maintainer(&self) -> bool {
        self.maintainer.load(Ordering::Acquire) && !self.is_lost()
    }
}
