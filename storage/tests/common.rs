//! Helpers shared by the storage tests: temporary data dirs and command shortcuts.
#![allow(dead_code)]

use atelier_engine::{Command, Ctx, Executor, NewCommission, RetryPolicy, Stage};

pub use tempfile::TempDir;

/// A fresh, empty data dir under the system temp dir, removed when the guard drops.
pub fn temp_dir(name: &str) -> TempDir {
    tempfile::Builder::new().prefix(&format!("atelier-test-{name}-")).tempdir().expect("create temp dir")
}

pub fn ctx(now: i64) -> Ctx {
    Ctx { now, jitter_seed: 7, retry: RetryPolicy::default() }
}

pub fn new_commission(user: &str, key: Option<&str>) -> NewCommission {
    NewCommission {
        user_id: user.into(),
        pipeline: "noop".into(),
        priority: 0,
        scheduled_for: None,
        context: r#"{"title":"t"}"#.into(),
        idempotency_key: key.map(Into::into),
        max_attempts: 3,
    }
}

/// The commands that take a created commission through every stage to completed.
pub fn full_run(job_id: u64) -> Vec<Command> {
    let mut cmds = vec![Command::StartJob {
        job_id,
        executor: Executor::TaskRunner,
        job_name: "noop".into(),
        pid: None,
    }];
    for stage in Stage::ALL {
        cmds.push(Command::EnterStage { job_id, stage });
        cmds.push(Command::ReportProgress { job_id, stage, percent: 50, message: Some("half".into()) });
        cmds.push(Command::ReportProgress { job_id, stage, percent: 100, message: None });
    }
    cmds.push(Command::Complete { job_id, result: r#"{"ok":true}"#.into(), job: None });
    cmds
}

#[allow(unused_imports)] // not every test binary that includes this module uses it
pub use atelier_engine::fixtures::one_of_each;

/// sled on a stopped data dir. sled's own IO threads may hold its file lock a moment after
/// the store is closed and dropped, so a refused lock is tried again for a while.
pub fn open_raw(dir: &TempDir) -> sled::Db {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match sled::open(dir.path().join("sled")) {
            Ok(db) => return db,
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("open the stopped data dir's sled: {e}"),
        }
    }
}
