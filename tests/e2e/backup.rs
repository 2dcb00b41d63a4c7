//! `atelier backup DIR` against a running server under load: 64 clients create commissions over
//! HTTP while the backup runs; every create acknowledged with a seq up to the backup's is in
//! the copy and nothing after it, the artifacts come along, `atelier replay --check` passes on
//! the copy and `atelier serve` starts on it. And its bad inputs: a non-empty DIR, a server
//! that cannot be reached, a token that is not an admin's.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use atelier_tests::*;

/// Clients creating commissions at once while the backup runs.
const APPENDERS: usize = 64;
/// How long the load runs before the backup starts, and on after it ended.
const LOAD_AROUND_MS: u64 = 500;

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_atelier"))
}

fn backup(dir: &Path, url: &str, token: &str) -> Output {
    Command::new(exe())
        .arg("backup")
        .arg(dir)
        .env("ATELIER_URL", url)
        .env("ATELIER_TOKEN", token)
        .output()
        .expect("run atelier backup")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A commission of the built-in pipeline, run to completion: its design is an artifact.
fn completed_with_artifact(s: &Server, user: &str) -> (u64, String) {
    let id = s.create(user, json!({"context": {"title": "a design"}, "pipeline": "commission"}))["task_id"]
        .as_u64()
        .unwrap();
    let snap = s.completed(id, user, Duration::from_secs(30)).expect("the commission completes");
    let text = snap.to_string();
    let at = text.find("/artifacts/").expect("the result names its artifact");
    (id, text[at..at + "/artifacts/".len() + 64 + ".png".len()].to_string())
}

/// One appender's loop: creates until `stop`, noting each create's seq and commission, and
/// the longest a create took.
fn append_until(addr: std::net::SocketAddr, i: usize, stop: &AtomicBool) -> (Vec<(u64, u64)>, Duration) {
    let user = token(&format!("load{i}"), false);
    let (mut acked, mut slowest) = (Vec::new(), Duration::ZERO);
    let body =
        json!({"context": {"title": "load"}, "pipeline": "noop", "scheduled_for": "2099-01-01T00:00:00Z"});
    while !stop.load(Ordering::SeqCst) {
        let started = Instant::now();
        let r = request(
            addr,
            "POST",
            "/api/commissions",
            Some(&user),
            &[("Content-Type", "application/json")],
            Some(body.to_string().as_bytes()),
        );
        slowest = slowest.max(started.elapsed());
        assert_eq!(r.status, 201, "a create under load: {}", r.text());
        let snap = r.json();
        acked.push((snap["last_event_id"].as_u64().unwrap(), snap["task_id"].as_u64().unwrap()));
    }
    (acked, slowest)
}

/// The copy's log, as `atelier export` reads it: `(seq, commission)` per event.
fn exported(data_dir: &Path) -> Vec<(u64, u64)> {
    let out = Command::new(exe()).arg("export").env("ATELIER_DATA_DIR", data_dir).output().unwrap();
    assert!(out.status.success(), "export of the copy: {}", text(&out.stderr));
    text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|e| (e["seq"].as_u64().unwrap(), e["commission_id"].as_u64().unwrap()))
        .collect()
}

#[test]
fn a_backup_under_load_holds_exactly_the_log_through_its_seq_and_serves() {
    let dir = temp_dir("backup-load");
    let s = Server::start(exe(), &dir.path().join("live"), &NO_SHARE_LIMITS);
    let alice = token("alice", false);
    let (designed, artifact) = completed_with_artifact(&s, &alice);
    let url = format!("http://{}", s.addr);
    let stop = Arc::new(AtomicBool::new(false));
    let results = Arc::new(Mutex::new(Vec::new()));
    let appenders: Vec<_> = (0..APPENDERS)
        .map(|i| {
            let (stop, results, addr) = (stop.clone(), results.clone(), s.addr);
            std::thread::spawn(move || {
                let r = append_until(addr, i, &stop);
                results.lock().unwrap().push(r);
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(LOAD_AROUND_MS));
    // Every create acknowledged before the backup was asked for is in it.
    let head_before = s.head_seq();
    let copy = dir.path().join("copy");
    let started = Instant::now();
    let out = backup(&copy, &url, &token("root", true));
    let took = started.elapsed();
    std::thread::sleep(Duration::from_millis(LOAD_AROUND_MS));
    stop.store(true, Ordering::SeqCst);
    appenders.into_iter().for_each(|a| a.join().expect("an appender"));
    assert!(out.status.success(), "backup: {}{}", text(&out.stdout), text(&out.stderr));
    let said = text(&out.stdout);
    let through: u64 = said
        .split("through seq ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the backup names its seq: {said}"));
    assert!(text(&out.stderr).contains("secret is not in the backup"), "{}", text(&out.stderr));
    let results = results.lock().unwrap();
    let acked: Vec<(u64, u64)> = results.iter().flat_map(|r| r.0.iter().copied()).collect();
    let slowest = results.iter().map(|r| r.1).max().unwrap();
    let after = acked.iter().filter(|(seq, _)| *seq > through).count();
    eprintln!(
        "backup through seq {through} took {took:.2?} under {APPENDERS} appenders; {} creates acknowledged, {after} after its seq; slowest create {slowest:.2?}",
        acked.len()
    );
    assert!(
        through >= head_before,
        "the backup's seq {through} is at least the head {head_before} before it"
    );
    assert!(after > 0, "the load went on past the backup's seq (else this test shows nothing)");

    let log = exported(&copy);
    let seqs: Vec<u64> = log.iter().map(|e| e.0).collect();
    assert_eq!(seqs, (1..=through).collect::<Vec<_>>(), "the copy is the log through seq {through}, no gap");
    let in_copy: std::collections::HashMap<u64, u64> = log.into_iter().collect();
    for (seq, commission) in &acked {
        if *seq <= through {
            assert_eq!(in_copy.get(seq), Some(commission), "acknowledged seq {seq} is in the copy");
        } else {
            assert!(
                !in_copy.values().any(|c| c == commission),
                "commission {commission} (seq {seq}) is after the backup"
            );
        }
    }
    let check =
        Command::new(exe()).args(["replay", "--check"]).env("ATELIER_DATA_DIR", &copy).output().unwrap();
    assert!(
        check.status.success(),
        "replay --check on the copy: {}{}",
        text(&check.stdout),
        text(&check.stderr)
    );
    assert!(
        copy.join("artifacts").join(artifact.trim_start_matches("/artifacts/")).is_file(),
        "the artifact came along"
    );
    drop(s);
    let served = Server::start(exe(), &copy, &[SLED]);
    assert_eq!(served.get(&format!("/api/commissions/{designed}"), Some(&alice)).status, 200);
    assert_eq!(served.get(&artifact, None).status, 200, "the copy serves the artifact");
    assert_eq!(served.head_seq(), through);
}

#[test]
fn bad_inputs_get_a_clear_error_and_leave_no_copy() {
    let dir = temp_dir("backup-bad");
    let s = Server::start(exe(), &dir.path().join("live"), &[]);
    let url = format!("http://{}", s.addr);
    let admin = token("root", true);

    let full = dir.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("keep.txt"), "mine").unwrap();
    let out = backup(&full, &url, &admin);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("exists and is not empty"), "{}", text(&out.stderr));
    assert_eq!(std::fs::read_to_string(full.join("keep.txt")).unwrap(), "mine", "left as it was");

    let copy = dir.path().join("copy");
    let out = backup(&copy, &url, &token("alice", false));
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("403"), "a user's token: {}", text(&out.stderr));
    assert!(!copy.exists(), "nothing written for a refused backup");

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let out = backup(&copy, &format!("http://{closed}"), &admin);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("cannot reach the server"), "{}", text(&out.stderr));
    assert!(!copy.exists());

    // An empty dir is fine, and an empty log backs up to an empty copy.
    std::fs::create_dir(&copy).unwrap();
    let out = backup(&copy, &url, &admin);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("backed up 0 events"), "{}", text(&out.stdout));
}
