//! Removes the working directories of jobs that finished long ago, and artifacts that no
//! commission references any more.
//!
//! A job that puts something in its dir has `data_dir/jobs/{job_id}/` (its captured stdout
//! and stderr, and whatever the worker leaves there; see `RunEnv::make_job_dir`). Without a
//! sweep an edge box running thousands of jobs a day fills its disk, and its inode table,
//! with them. A directory goes once its job finished more than
//! `job_dirs_keep_days` ago, or once its job record is gone (retention pruned the commission)
//! and the directory has not changed for [`ORPHAN_DIR_GRACE`].
//!
//! Artifacts (`data_dir/artifacts/{sha256hex}.png`) are shared by content: one file may be
//! the image of many commissions. One goes once no commission left in the store refers to it
//! (in an artifact report, a result or a context: retention prunes old commissions, and with
//! them their references) and its file has not changed for `artifacts_keep_days`, and never
//! sooner than the longest a job may run: a running job stores its artifact (or touches the
//! one already there) before its report of it is in the log.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use atelier_engine::time::Millis;
use atelier_storage::EventStore;
use crossbeam_channel::{Receiver, RecvTimeoutError};

use crate::paths::{artifact_refs, DataDir};
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
    /// Due but could not be removed (logged, left for the next sweep).
    pub failed: u64,
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
    // One entry the sweep cannot read or remove (a file made immutable, a dir it may not
    // write) is logged and skipped: it must not keep every other due dir on disk.
    let skip = |what: &str, e: &std::io::Error| {
        tracing::warn!(dir = %jobs.display(), error = %e, "job dir sweep: cannot {what}; skipped");
    };
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                skip("read the jobs dir", &e);
                swept.failed += 1;
                continue;
            }
        };
        let Some(job_id) = DataDir::job_id_of(&entry.file_name()) else { continue };
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let due = match store.job(job_id) {
            Ok(Some(job)) => {
                job.status.is_finished() && job.completed_at.is_some_and(|t| t.saturating_add(keep_ms) < now)
            }
            Ok(None) => match entry.metadata().and_then(|m| m.modified()) {
                Ok(changed) => {
                    SystemTime::now().duration_since(changed).is_ok_and(|age| age > ORPHAN_DIR_GRACE)
                }
                Err(e) => {
                    skip("read a job dir's age", &e);
                    false
                }
            },
            Err(e) => {
                tracing::warn!(job = job_id, error = %e, "job dir sweep: cannot read the job record; keeping its dir");
                false
            }
        };
        if due {
            match std::fs::remove_dir_all(entry.path()) {
                Ok(()) => swept.removed += 1,
                Err(e) => {
                    tracing::warn!(job = job_id, dir = %entry.path().display(), error = %e, "job dir sweep: cannot remove a due dir; skipped");
                    swept.failed += 1;
                }
            }
        } else {
            swept.kept += 1;
        }
    }
    Ok(swept)
}

/// Events read from the log per batch while collecting the artifacts it references.
const LOG_BATCH_EVENTS: usize = 4096;

/// The hashes of every artifact a commission in the store refers to, anywhere in its events.
pub fn referenced_artifacts(
    store: &dyn EventStore,
) -> Result<HashSet<String>, atelier_storage::StorageError> {
    let mut refs = HashSet::new();
    let mut after = 0;
    loop {
        // A pruned commission's records are skipped by `read_log`: its references went with it.
        let batch = store.read_log(after, LOG_BATCH_EVENTS)?;
        let Some(last) = batch.last() else { return Ok(refs) };
        after = last.seq;
        for env in &batch {
            let text = serde_json::to_string(&env.event).unwrap_or_default();
            refs.extend(artifact_refs(&text).map(str::to_string));
        }
    }
}

/// Removes the artifacts under `data_dir.artifacts()` that no commission in the store refers
/// to and whose file is older than `keep` at `now`. Files that are not artifacts (a writer's
/// temporary file) are left alone.
pub fn sweep_artifacts(
    store: &dyn EventStore,
    data_dir: &DataDir,
    keep: Duration,
    now: SystemTime,
) -> std::io::Result<Swept> {
    let mut swept = Swept::default();
    let dir = data_dir.artifacts();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(swept),
        Err(e) => return Err(e),
    };
    // Read before the files' ages: a reference that lands after this was made by a job that
    // wrote or touched its file since, so that file is too young to go.
    let refs = referenced_artifacts(store).map_err(std::io::Error::other)?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(hash) = DataDir::artifact_of(&name) else { continue };
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|changed| now.duration_since(changed).is_ok_and(|age| age > keep));
        if refs.contains(hash) || !old {
            swept.kept += 1;
            continue;
        }
        match std::fs::remove_file(entry.path()) {
            Ok(()) => swept.removed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(file = %entry.path().display(), error = %e, "artifact sweep: cannot remove an unreferenced artifact; skipped");
                swept.failed += 1;
            }
        }
    }
    Ok(swept)
}

/// What the janitor sweeps, and how long each thing is kept (`None`: for good).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Keep {
    pub(crate) job_dirs: Option<Duration>,
    pub(crate) artifacts: Option<Duration>,
}

/// Sweeps now and then every [`SWEEP_INTERVAL`] until `stop` disconnects.
pub(crate) fn sweep_loop(store: &dyn EventStore, data_dir: &DataDir, keep: Keep, stop: &Receiver<()>) {
    let report = |what: &str, result: std::io::Result<Swept>| match result {
        Ok(s) if s.removed > 0 || s.failed > 0 => {
            tracing::info!(removed = s.removed, kept = s.kept, failed = s.failed, "removed {what}")
        }
        Ok(_) => {}
        Err(e) => tracing::error!(error = %e, "sweep of {what} failed; trying again later"),
    };
    loop {
        if let Some(k) = keep.job_dirs {
            report("the dirs of jobs that ended long ago", sweep(store, data_dir, k, now_ms()));
        }
        if let Some(k) = keep.artifacts {
            report(
                "artifacts no commission references",
                sweep_artifacts(store, data_dir, k, SystemTime::now()),
            );
        }
        if let Err(RecvTimeoutError::Disconnected) = stop.recv_timeout(SWEEP_INTERVAL) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use atelier_storage::{SledStore, StoreConfig};

    /// Makes `file` impossible to remove: immutable as root (which permissions do not stop),
    /// its dir read-only otherwise. False when this machine offers neither.
    fn make_undeletable(file: &std::path::Path, make: bool) -> bool {
        use std::os::unix::fs::PermissionsExt;
        let dir = file.parent().expect("has a dir");
        // SAFETY: geteuid only returns this process's effective user id.
        if unsafe { libc::geteuid() } == 0 {
            let flag = if make { "+i" } else { "-i" };
            std::process::Command::new("chattr").arg(flag).arg(file).status().is_ok_and(|s| s.success())
        } else {
            let mode = if make { 0o500 } else { 0o700 };
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).is_ok()
        }
    }

    /// A due dir that cannot be removed is logged and skipped; the sweep goes on to the others.
    #[test]
    fn a_dir_that_cannot_be_removed_does_not_stop_the_sweep() {
        let tmp = tempfile::tempdir().unwrap();
        let store = SledStore::open(StoreConfig::new(tmp.path().join("store"))).unwrap();
        let data = DataDir::new(tmp.path().join("data"));
        // Orphans (no job record) older than the grace: all due. The first one sorts first
        // in most directory orders, but the sweep must not depend on that.
        let stuck = data.jobs().join("900001");
        let file = stuck.join("held").join("log");
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, b"x").unwrap();
        let others = ["900002", "900003"].map(|n| data.jobs().join(n));
        for d in &others {
            std::fs::create_dir_all(d).unwrap();
        }
        let long_ago = SystemTime::now() - ORPHAN_DIR_GRACE - Duration::from_secs(60);
        for d in others.iter().chain([&stuck]) {
            std::fs::File::open(d).unwrap().set_modified(long_ago).unwrap();
        }
        if !make_undeletable(&file, true) {
            eprintln!("skipped: cannot make a file undeletable here (chattr +i as root, or chmod)");
            return;
        }
        let swept = sweep(&*store, &data, Duration::from_secs(1), now_ms());
        make_undeletable(&file, false);
        let swept = swept.expect("the sweep goes on past a dir it cannot remove");
        assert_eq!(swept, Swept { removed: 2, kept: 0, failed: 1 });
        assert!(others.iter().all(|d| !d.exists()), "the other due dirs are gone");
        assert!(file.exists(), "the one it could not remove is left for the next sweep");
    }
}
