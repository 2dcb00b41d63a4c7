//! Removes the working directories of jobs that finished long ago.
//!
//! A job that puts something in its dir has `data_dir/jobs/{job_id}/` (its captured stdout
//! and stderr, and whatever the worker leaves there; see `RunEnv::make_job_dir`). Without a
//! sweep an edge box running thousands of jobs a day fills its disk, and its inode table,
//! with them. A directory goes once its job finished more than
//! `job_dirs_keep_days` ago, or once its job record is gone (retention pruned the commission)
//! and the directory has not changed for [`ORPHAN_DIR_GRACE`].

use std::time::{Duration, SystemTime};

use atelier_engine::time::Millis;
use atelier_storage::EventStore;
use crossbeam_channel::{Receiver, RecvTimeoutError};

use crate::paths::DataDir;
use crate::session::now_ms;

/// How often the sweep runs.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(3600);
/// A directory without a job record is left alone this long after its last change: a job's
/// directory is made before its start is in the log, and a job may be refused at its start.
pub const ORPHAN_DIR_GRACE: Duration = Duration::from_secs(3600);

/// What one sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub removed: u64,
    pub kept: u64,
}

/// Removes the job directories under `data_dir.jobs()` that are due (see the module docs).
/// `keep` is how long a finished job's directory stays; `now` is wall-clock milliseconds.
/// Entries that are not job directories (named by a job id) are left alone.
pub fn sweep(
    store: &dyn EventStore,
    data_dir: &DataDir,
    keep: Duration,
    now: Millis,
) -> std::io::Result<Swept> {
    let mut swept = Swept::default();
    let jobs = data_dir.jobs();
    let entries = match std::fs::read_dir(&jobs) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(swept),
        Err(e) => return Err(e),
    };
    let keep_ms = Millis::try_from(keep.as_millis()).unwrap_or(Millis::MAX);
    for entry in entries {
        let entry = entry?;
        let Some(job_id) = DataDir::job_id_of(&entry.file_name()) else { continue };
        if !entry.file_type()?.is_dir() {
            continue;
        }
        let due = match store.job(job_id) {
            Ok(Some(job)) => {
                job.status.is_finished() && job.completed_at.is_some_and(|t| t.saturating_add(keep_ms) < now)
            }
            Ok(None) => {
                let changed = entry.metadata()?.modified()?;
                SystemTime::now().duration_since(changed).is_ok_and(|age| age > ORPHAN_DIR_GRACE)
            }
            Err(e) => {
                tracing::warn!(job = job_id, error = %e, "job dir sweep: cannot read the job record; keeping its dir");
                false
            }
        };
        if due {
            std::fs::remove_dir_all(entry.path())?;
            swept.removed += 1;
        } else {
            swept.kept += 1;
        }
    }
    Ok(swept)
}

/// Sweeps finished jobs' dirs now and then every [`SWEEP_INTERVAL`] until `stop` disconnects.
pub(crate) fn sweep_loop(store: &dyn EventStore, data_dir: &DataDir, keep: Duration, stop: &Receiver<()>) {
    loop {
        match sweep(store, data_dir, keep, now_ms()) {
            Ok(s) if s.removed > 0 => tracing::info!(
                removed = s.removed,
                kept = s.kept,
                "removed the dirs of jobs that ended long ago"
            ),
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "job dir sweep failed; trying again later"),
        }
        if let Err(RecvTimeoutError::Disconnected) = stop.recv_timeout(SWEEP_INTERVAL) {
            return;
        }
    }
}
