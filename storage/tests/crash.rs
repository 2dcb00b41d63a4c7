//! Crash test: a child process appends under concurrent load and prints every acknowledged
//! seq; the parent SIGKILLs it at a random moment, reopens the store and checks that every
//! acknowledged event is there, the log is gap-free with its chain intact, and a full replay
//! matches the stored projections. The child is this same test binary, re-run in child mode.
//! Every round must crash a child that was appending: the kill waits for its first
//! acknowledgement, and the child must die of the SIGKILL with nothing on stderr.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command as Proc, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use atelier_engine::{Command, Executor, Stage};
use atelier_storage::{
    check, create, AppendOutcome, AppendRequest, AppendTarget, Created, EventStore, SledStore, StoreConfig,
};
use common::*;

const CHILD_ENV: &str = "ATELIER_CRASH_CHILD_DIR";
const ROUNDS: usize = 20;
const APPENDERS: usize = 16;

#[test]
fn crash_child() {
    // Only does something when re-run by `acknowledged_events_survive_sigkill`.
    let Ok(dir) = std::env::var(CHILD_ENV) else { return };
    let store = SledStore::open(StoreConfig::new(&dir)).expect("child opens the store");
    let out = Arc::new(Mutex::new(std::io::stdout()));
    let threads: Vec<_> = (0..APPENDERS)
        .map(|t| {
            let store = store.clone();
            let out = out.clone();
            std::thread::spawn(move || loop {
                let c = match create(&*store, new_commission(&format!("u{t}"), None), &ctx(1))
                    .unwrap()
                    .unwrap()
                {
                    Created::New(c) => c,
                    Created::Existing(c) => c,
                };
                print_acks(&out, c.last_seq, c.last_seq);
                let job = store.allocate_job_id().unwrap();
                let mut version = c.version;
                let mut cmds = vec![Command::StartJob {
                    job_id: job,
                    executor: Executor::TaskRunner,
                    job_name: "x".into(),
                    pid: None,
                }];
                cmds.extend(Stage::ALL.iter().map(|&stage| Command::EnterStage { job_id: job, stage }));
                let mut state = Some(c);
                for cmd in cmds {
                    let events = atelier_engine::decide(state.as_ref(), cmd, &ctx(2)).unwrap();
                    let req = AppendRequest {
                        target: AppendTarget::Existing(state.as_ref().unwrap().id),
                        expected_version: version,
                        events,
                        at: 2,
                    };
                    match store.append(req).unwrap() {
                        AppendOutcome::Appended { commission, first_seq, last_seq } => {
                            print_acks(&out, first_seq, last_seq);
                            version = commission.version;
                            state = Some(commission);
                        }
                        other => panic!("unexpected {other:?}"),
                    }
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

fn print_acks(out: &Mutex<std::io::Stdout>, first: u64, last: u64) {
    let mut o = out.lock().unwrap();
    for seq in first..=last {
        writeln!(o, "ACK {seq}").unwrap();
    }
    o.flush().unwrap();
}

/// How long a child may take to open the store and acknowledge its first append.
const FIRST_ACK_TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn acknowledged_events_survive_sigkill() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let dir = temp_dir("crash");
    let exe = std::env::current_exe().unwrap();
    let mut acked = BTreeSet::new();
    for round in 0..ROUNDS {
        let mut child = Proc::new(&exe)
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let errors = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        // Every acknowledged seq as it is printed: the kill waits for the first one, so that a
        // round always crashes a child that was appending (a child that cannot open the store
        // ends the channel without one and fails the round below).
        let (acks_tx, acks) = mpsc::channel::<u64>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(n) = line.strip_prefix("ACK ") {
                    if acks_tx.send(n.trim().parse::<u64>().unwrap()).is_err() {
                        break;
                    }
                }
            }
        });
        let first = acks.recv_timeout(FIRST_ACK_TIMEOUT);
        if let Ok(seq) = first {
            acked.insert(seq);
            let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos();
            std::thread::sleep(Duration::from_millis(u64::from(nanos % 400)));
        }
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        let status = child.wait().unwrap();
        let errors = errors.join().unwrap();
        let round_acks: Vec<u64> = first.into_iter().chain(acks.iter()).collect();
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "round {round}: the child ended before the kill ({status}); its stderr:\n{errors}"
        );
        assert!(errors.is_empty(), "round {round}: the child wrote to stderr:\n{errors}");
        assert!(!round_acks.is_empty(), "round {round}: the child acknowledged nothing before the kill");
        acked.extend(round_acks);

        let store = SledStore::open(StoreConfig::new(dir.path())).expect("reopen after SIGKILL");
        let head = store.head_seq();
        let missing: Vec<_> = acked.iter().filter(|s| **s > head).collect();
        assert!(missing.is_empty(), "round {round}: acknowledged beyond head {head}: {missing:?}");
        let report = check::replay_check(&store).expect("log intact");
        assert!(report.diff.is_empty(), "round {round}: {:?}", report.diff);
        assert_eq!(report.events, head, "round {round}: gap-free log");
        store.close();
    }
    assert!(
        acked.len() > ROUNDS * 10,
        "the child acknowledged too little to prove anything: {}",
        acked.len()
    );
}
