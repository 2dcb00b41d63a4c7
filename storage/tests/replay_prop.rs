//! Property: for random command sequences over several commissions, with restarts (close and
//! reopen the store) in between, the live state always equals a fresh replay of the log, and
//! `replay_check` finds no difference. A failing case prints its seed; proptest also keeps it
//! in storage/proptest-regressions/ and replays it first next time. More cases:
//! ATELIER_PROPTEST_CASES=2000.

mod common;

use std::sync::Arc;

use atelier_engine::{apply, Command, Executor, Stage};
use atelier_storage::{check, create, execute, EventStore, SledStore, StoreConfig};
use common::*;
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Create { user: u8, key: Option<u8> },
    Start { c: u8 },
    Stage { c: u8, stage: u8 },
    Progress { c: u8, stage: u8, percent: u8 },
    Complete { c: u8 },
    Fail { c: u8, retryable: bool },
    RetryDue { c: u8 },
    Cancel { c: u8 },
    ConfirmCancel { c: u8 },
    ManualRetry { c: u8 },
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0u8..3, proptest::option::of(0u8..3)).prop_map(|(user, key)| Op::Create { user, key }),
        3 => any::<u8>().prop_map(|c| Op::Start { c }),
        4 => (any::<u8>(), 0u8..4).prop_map(|(c, stage)| Op::Stage { c, stage }),
        4 => (any::<u8>(), 0u8..4, 0u8..=110).prop_map(|(c, stage, percent)| Op::Progress { c, stage, percent }),
        2 => any::<u8>().prop_map(|c| Op::Complete { c }),
        2 => (any::<u8>(), any::<bool>()).prop_map(|(c, retryable)| Op::Fail { c, retryable }),
        1 => any::<u8>().prop_map(|c| Op::RetryDue { c }),
        1 => any::<u8>().prop_map(|c| Op::Cancel { c }),
        1 => any::<u8>().prop_map(|c| Op::ConfirmCancel { c }),
        1 => any::<u8>().prop_map(|c| Op::ManualRetry { c }),
        1 => Just(Op::Restart),
    ]
}

fn cases() -> u32 {
    std::env::var("ATELIER_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48)
}

/// Live snapshots equal a fold of each commission's events, and the full check is clean.
fn assert_replays(store: &SledStore, ids: &[u64]) -> Result<(), TestCaseError> {
    for &id in ids {
        let live = store.commission(id).unwrap();
        let mut folded = None;
        for env in store.events_of(id).unwrap() {
            folded = Some(apply(folded, &env).expect("stored events replay"));
        }
        prop_assert_eq!(live, folded, "commission {}", id);
    }
    let report = check::replay_check(store).unwrap();
    prop_assert!(report.diff.is_empty(), "{:?}", report.diff);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn live_state_equals_replay_across_restarts(ops in proptest::collection::vec(op(), 1..60)) {
        let dir = temp_dir("prop");
        let mut store: Arc<SledStore> = SledStore::open(StoreConfig::new(dir.path())).unwrap();
        let mut ids: Vec<u64> = Vec::new();
        let mut now = 1_000i64;
        let mut job_of: std::collections::HashMap<u64, u64> = Default::default();
        for op in ops {
            now += 1_000;
            if matches!(op, Op::RetryDue { .. }) {
                now += 400_000; // past any backoff
            }
            let pick = |c: u8| -> Option<u64> { (!ids.is_empty()).then(|| ids[usize::from(c) % ids.len()]) };
            let job = |id: u64| job_of.get(&id).copied().unwrap_or(0);
            let run = |store: &SledStore, id: u64, cmd: Command| {
                // Accepted or refused, both are fine; a storage error is not.
                execute(store, id, cmd, &ctx(now)).expect("no storage failure").ok()
            };
            match op {
                Op::Create { user, key } => {
                    let mut new = new_commission(&format!("u{user}"), None);
                    new.idempotency_key = key.map(|k| format!("k{k}"));
                    let c = match create(&*store, new, &ctx(now)).unwrap().unwrap() {
                        atelier_storage::Created::New(c) | atelier_storage::Created::Existing(c) => c,
                    };
                    if !ids.contains(&c.id) {
                        ids.push(c.id);
                    }
                }
                Op::Start { c } => if let Some(id) = pick(c) {
                    let job_id = store.allocate_job_id().unwrap();
                    if run(&store, id, Command::StartJob { job_id, executor: Executor::JobController, job_name: "p".into(), pid: Some(1) }).is_some() {
                        job_of.insert(id, job_id);
                    }
                },
                Op::Stage { c, stage } => if let Some(id) = pick(c) {
                    run(&store, id, Command::EnterStage { job_id: job(id), stage: Stage::ALL[usize::from(stage)] });
                },
                Op::Progress { c, stage, percent } => if let Some(id) = pick(c) {
                    run(&store, id, Command::ReportProgress { job_id: job(id), stage: Stage::ALL[usize::from(stage)], percent: u32::from(percent), message: None });
                },
                Op::Complete { c } => if let Some(id) = pick(c) {
                    run(&store, id, Command::Complete { job_id: job(id), result: "{}".into(), job: None });
                },
                Op::Fail { c, retryable } => if let Some(id) = pick(c) {
                    run(&store, id, Command::FailAttempt { job_id: job(id), error: "x".into(), retryable, job: None });
                },
                Op::RetryDue { c } => if let Some(id) = pick(c) {
                    run(&store, id, Command::RetryDue);
                },
                Op::Cancel { c } => if let Some(id) = pick(c) { run(&store, id, Command::RequestCancel); },
                Op::ConfirmCancel { c } => if let Some(id) = pick(c) { run(&store, id, Command::ConfirmCancelled { job: None }); },
                Op::ManualRetry { c } => if let Some(id) = pick(c) { run(&store, id, Command::ManualRetry); },
                Op::Restart => {
                    store.close();
                    drop(store);
                    store = SledStore::open(StoreConfig::new(dir.path())).unwrap();
                    assert_replays(&store, &ids)?;
                }
            }
        }
        assert_replays(&store, &ids)?;
        // Every seq from 1 to the head is present, in order.
        let log = store.read_log(0, usize::MAX).unwrap();
        prop_assert!(log.iter().enumerate().all(|(i, e)| e.seq == i as u64 + 1));
        prop_assert_eq!(log.len() as u64, store.head_seq());
    }
}
