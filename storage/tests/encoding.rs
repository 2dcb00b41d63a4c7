//! The on-disk format, pinned: the encoded bytes of one event of every kind, a snapshot's
//! encoding, and a recorded history (tests/fixtures) that must keep replaying to the same
//! snapshot. Any format change shows up here as a snapshot diff. Also replays the fuzz corpus.

mod common;

use atelier_engine::{Envelope, Event, EventKind, Executor, JobEnd, JobStatus, Stage};
use atelier_storage::{check, codec, EventStore, SledStore, StoreConfig};
use common::TempDir;

fn one_of_each() -> Vec<Event> {
    vec![
        Event::Created {
            user_id: "alice".into(),
            pipeline: "commission".into(),
            priority: 5,
            scheduled_for: Some(1_795_964_430_123),
            context: r#"{"title":"Hello"}"#.into(),
            idempotency_key: Some("k-1".into()),
            max_attempts: 3,
        },
        Event::JobStarted { attempt: 1, job_id: 42, executor: Executor::JobController, job_name: "commission".into(), pid: Some(4242) },
        Event::StageEntered { stage: Stage::GeneratingIdeas },
        Event::Progress { stage: Stage::GeneratingIdeas, percent: 50, message: Some("half way".into()) },
        Event::Artifact { stage: Stage::CreatingImages, kind: "image".into(), uri: "/artifacts/ab.png".into() },
        Event::AttemptFailed { attempt: 1, error: "boom".into(), retryable: true, next_retry_at: 1_795_964_432_123 },
        Event::RetryDue,
        Event::Completed { result: r#"{"ok":true}"#.into() },
        Event::Failed { attempt: 3, error: "gave up".into(), retryable: false },
        Event::CancelRequested,
        Event::Cancelled,
        Event::RetryRequested,
        Event::JobFinished(JobEnd { job_id: 42, status: JobStatus::Succeeded, exit_code: Some(0), signal: None, error: None, max_rss_bytes: 1 << 20, cpu_ms: 17 }),
    ]
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn encoded_bytes_of_every_event_kind() {
    let events = one_of_each();
    let kinds: Vec<EventKind> = events.iter().map(Event::kind).collect();
    assert_eq!(kinds, EventKind::ALL.to_vec(), "one event of every kind, in order");
    let mut out = String::new();
    for (i, event) in events.into_iter().enumerate() {
        let env = Envelope { seq: i as u64 + 1, commission_id: 7, version: i as u64 + 1, at: 1_795_964_430_123, event };
        let bytes = codec::encode(&env);
        let back: Envelope = codec::decode(&bytes).unwrap();
        assert_eq!(back, env);
        out.push_str(&format!("{}: {}\n", env.event.kind().as_str(), hex(&bytes)));
    }
    insta::assert_snapshot!(out);
}

#[test]
fn framed_record_layout() {
    let env = Envelope { seq: 1, commission_id: 1, version: 1, at: 0, event: Event::RetryDue };
    let (record, chain) = codec::frame_record(1, 0, &codec::encode(&env));
    insta::assert_snapshot!(format!("{} chain={chain:08x}", hex(&record)));
}

fn fixture_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/history-v1.jsonl")
}

/// The fixture was recorded by an earlier build; it must replay to the same snapshots forever.
#[test]
fn recorded_history_replays_to_the_same_snapshots() {
    let text = std::fs::read_to_string(fixture_path()).expect("tests/fixtures/history-v1.jsonl");
    let dir = TempDir::new("fixture");
    let store = SledStore::open(StoreConfig::new(&dir.0)).unwrap();
    let n = check::import(&store, &mut text.as_bytes()).unwrap();
    assert!(n >= 20, "the fixture covers a full run, a retry and a cancel");
    let report = check::replay_check(&store).unwrap();
    assert!(report.diff.is_empty(), "{:?}", report.diff);
    let snapshots: Vec<_> = (1..=3).map(|id| store.commission(id).unwrap().expect("fixture commission")).collect();
    insta::assert_json_snapshot!(snapshots);
    let snap = &snapshots[0];
    let bytes = codec::encode(snap);
    insta::assert_snapshot!("snapshot_encoding", hex(&bytes));
}

#[test]
fn fuzz_corpus_replays() {
    for target in ["codec"] {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target);
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("fuzz corpus dir") {
            let data = std::fs::read(entry.unwrap().path()).unwrap();
            codec::fuzz_one(&data);
            n += 1;
        }
        assert!(n > 0, "empty corpus for {target}");
    }
}

/// Writes the codec corpus seeds (run with ATELIER_WRITE_CORPUS=1 after a format change).
#[test]
fn write_corpus_seeds() {
    if std::env::var("ATELIER_WRITE_CORPUS").is_err() {
        return;
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/codec");
    for (i, event) in one_of_each().into_iter().enumerate() {
        let env = Envelope { seq: i as u64 + 1, commission_id: 7, version: 1, at: 5, event };
        let payload = codec::encode(&env);
        std::fs::write(dir.join(format!("envelope-{i:02}")), &payload).unwrap();
        let (record, _) = codec::frame_record(env.seq, 0, &payload);
        std::fs::write(dir.join(format!("record-{i:02}")), record).unwrap();
    }
}

/// Records tests/fixtures/history-v1.jsonl (run with ATELIER_WRITE_FIXTURE=1, only for a new
/// format version: the existing fixture must never change).
#[test]
fn write_fixture() {
    use atelier_engine::Command;
    use atelier_storage::{create, execute, Created};
    if std::env::var("ATELIER_WRITE_FIXTURE").is_err() {
        return;
    }
    let dir = TempDir::new("mkfixture");
    let store = SledStore::open(StoreConfig::new(&dir.0)).unwrap();
    let ctx = |now: i64| atelier_engine::Ctx { now, jitter_seed: 99, retry: Default::default() };
    let mut ids = Vec::new();
    for (i, key) in [Some("first"), None, None].into_iter().enumerate() {
        let Created::New(c) = create(&*store, common::new_commission(&format!("user{i}"), key), &ctx(1_795_964_430_000)).unwrap().unwrap() else { panic!() };
        ids.push(c.id);
    }
    let now = std::cell::Cell::new(1_795_964_431_000);
    let run = |id: u64, cmds: Vec<Command>| {
        for cmd in cmds {
            now.set(now.get() + 137);
            execute(&*store, id, cmd, &ctx(now.get())).unwrap().unwrap();
        }
    };
    run(ids[0], common::full_run(10));
    run(ids[1], vec![
        Command::StartJob { job_id: 20, executor: Executor::JobController, job_name: "commission".into(), pid: Some(300) },
        Command::EnterStage { job_id: 20, stage: Stage::GeneratingIdeas },
        Command::FailAttempt { job_id: 20, error: "worker killed by SIGKILL".into(), retryable: true, job: Some(JobEnd { job_id: 20, status: JobStatus::Killed, exit_code: None, signal: Some(9), error: Some("killed by SIGKILL".into()), max_rss_bytes: 5 << 20, cpu_ms: 12 }) },
    ]);
    now.set(now.get() + 600_000);
    run(ids[1], vec![Command::RetryDue]);
    run(ids[1], common::full_run(21));
    run(ids[2], vec![
        Command::StartJob { job_id: 30, executor: Executor::TaskRunner, job_name: "commission".into(), pid: None },
        Command::RequestCancel,
        Command::ConfirmCancelled { job: None },
    ]);
    let mut out = Vec::new();
    check::export(&store, &mut out).unwrap();
    std::fs::write(fixture_path(), out).unwrap();
}
