//! Writes the pinned test data of the storage tests: the codec fuzz corpus seeds and the
//! recorded history fixture. Run by hand, only when the on-disk format gets a new version:
//!
//!     cargo run -p atelier-storage --example write-test-data -- corpus|fixture

#[path = "../tests/common.rs"]
mod common;

use atelier_engine::{Envelope, Executor, JobEnd, JobStatus, Stage};
use atelier_storage::{check, codec, SledStore, StoreConfig};
use common::{one_of_each, temp_dir};

fn fixture_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/history-v1.jsonl")
}

fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("corpus") => write_corpus_seeds(),
        Some("fixture") => write_fixture(),
        _ => {
            eprintln!("usage: write-test-data corpus|fixture");
            std::process::exit(2);
        }
    }
}

/// Writes the codec fuzz corpus seeds (after a format change).
fn write_corpus_seeds() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/codec");
    let mut records = Vec::new();
    for (i, event) in one_of_each().into_iter().enumerate() {
        let env = Envelope { seq: i as u64 + 1, commission_id: 7, version: 1, at: 5, event };
        let payload = codec::encode(&env);
        std::fs::write(dir.join(format!("envelope-{i:02}")), &payload).unwrap();
        let (record, _) = codec::frame_record(env.seq, 0, &payload);
        std::fs::write(dir.join(format!("record-{i:02}")), &record).unwrap();
        records.push(record);
    }
    // A log block (schema 2) of three records, and one of all of them.
    std::fs::write(dir.join("block-03"), codec::frame_block(&records[..3])).unwrap();
    std::fs::write(dir.join("block-all"), codec::frame_block(&records)).unwrap();
}

/// Records tests/fixtures/history-v1.jsonl — only for a new format version, under a new name:
/// the existing fixture must never change.
fn write_fixture() {
    use atelier_engine::Command;
    use atelier_storage::{create, execute, Created};
    let dir = temp_dir("mkfixture");
    let store = SledStore::open(StoreConfig::new(dir.path())).unwrap();
    let ctx = |now: i64| atelier_engine::Ctx { now, jitter_seed: 99, retry: Default::default() };
    let mut ids = Vec::new();
    for (i, key) in [Some("first"), None, None].into_iter().enumerate() {
        let Created::New(c) =
            create(&*store, common::new_commission(&format!("user{i}"), key), &ctx(1_795_964_430_000))
                .unwrap()
                .unwrap()
        else {
            panic!()
        };
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
    run(
        ids[1],
        vec![
            Command::StartJob {
                job_id: 20,
                executor: Executor::JobController,
                job_name: "commission".into(),
                pid: Some(300),
            },
            Command::EnterStage { job_id: 20, stage: Stage::GeneratingIdeas },
            Command::FailAttempt {
                job_id: 20,
                error: "worker killed by SIGKILL".into(),
                retryable: true,
                job: Some(JobEnd {
                    job_id: 20,
                    status: JobStatus::Killed,
                    exit_code: None,
                    signal: Some(9),
                    error: Some("killed by SIGKILL".into()),
                    max_rss_bytes: 5 << 20,
                    cpu_ms: 12,
                }),
            },
        ],
    );
    now.set(now.get() + 600_000);
    run(ids[1], vec![Command::RetryDue]);
    run(ids[1], common::full_run(21));
    run(
        ids[2],
        vec![
            Command::StartJob {
                job_id: 30,
                executor: Executor::TaskRunner,
                job_name: "commission".into(),
                pid: None,
            },
            Command::RequestCancel,
            Command::ConfirmCancelled { job: None },
        ],
    );
    let mut out = Vec::new();
    check::export(&*store, &mut out).unwrap();
    std::fs::write(fixture_path(), out).unwrap();
    eprintln!("wrote {}", fixture_path().display());
}
