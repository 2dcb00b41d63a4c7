//! End-to-end claims about the store, against the real binary: an append is acknowledged only
//! once fdatasync succeeded (a preloaded shim makes it fail, `tests/fixtures/fail_fdatasync.c`),
//! `ATELIER_DURABILITY=periodic` acknowledges before it and stops the store when its sync
//! fails, and `atelier replay --check` finds damage in each projection of a stopped data dir.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use atelier_engine::{Commission, Job};
use atelier_storage::codec;
use atelier_storage::layout::{Projection, META_COUNTS};
use atelier_tests::*;

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_atelier"))
}

/// A commission that stays queued (scheduled far ahead), so no executor appends behind the
/// test's back.
fn queued(title: &str) -> Value {
    json!({"context": {"title": title}, "pipeline": "noop", "scheduled_for": "2099-01-01T00:00:00Z"})
}

/// A server whose fdatasync fails with EIO while `trigger` exists, and counts each call in
/// `count` (one byte per call).
struct FailingDisk {
    _tools: TempDir,
    lib: PathBuf,
    trigger: PathBuf,
    count: PathBuf,
}

impl FailingDisk {
    fn new() -> FailingDisk {
        let tools = temp_dir("fail-fdatasync");
        let lib = build_preload("fail_fdatasync.c", tools.path());
        let trigger = tools.path().join("fail-now");
        let count = tools.path().join("calls");
        FailingDisk { _tools: tools, lib, trigger, count }
    }

    fn start(&self, data_dir: &Path, extra: &[(&str, &str)]) -> Server {
        let mut env = vec![
            ("LD_PRELOAD", self.lib.to_str().unwrap()),
            ("FAIL_FDATASYNC_TRIGGER", self.trigger.to_str().unwrap()),
            ("FAIL_FDATASYNC_COUNT", self.count.to_str().unwrap()),
        ];
        env.extend_from_slice(extra);
        Server::start(exe(), data_dir, &env)
    }

    fn calls(&self) -> u64 {
        std::fs::metadata(&self.count).map_or(0, |m| m.len())
    }

    fn fail(&self) {
        std::fs::write(&self.trigger, b"").unwrap();
    }

    fn heal(&self) {
        std::fs::remove_file(&self.trigger).unwrap();
    }
}

/// A Prometheus counter's value from `/metrics` (admin).
fn metric(s: &Server, name: &str) -> u64 {
    let text = s.get("/metrics", Some(&token("root", true))).text();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
}

fn titles(s: &Server, user: &str) -> Vec<String> {
    let list = s.get(&format!("/api/commissions/user/{user}"), Some(&token(user, false)));
    assert_eq!(list.status, 200, "{}", list.text());
    let mut t: Vec<String> = list.json()["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["context"]["title"].as_str().unwrap_or("?").to_string())
        .collect();
    t.sort();
    t
}

#[test]
fn an_append_whose_fdatasync_fails_is_not_acknowledged_and_the_store_stops() {
    let disk = FailingDisk::new();
    let dir = temp_dir("fdatasync-eio");
    let s = disk.start(dir.path(), &[]);
    let alice = token("alice", false);

    // Every acknowledged group commit had its own successful fdatasync.
    let (calls, groups) = (disk.calls(), metric(&s, "atelier_log_group_commits_total"));
    for i in 0..5 {
        s.create(&alice, queued(&format!("kept {i}")));
    }
    let groups = metric(&s, "atelier_log_group_commits_total") - groups;
    assert_eq!(groups, 5, "five sequential appends are five group commits");
    assert!(disk.calls() - calls >= groups, "{} fdatasyncs for {groups} group commits", disk.calls() - calls);
    assert_eq!(s.get("/readyz", None).status, 200);

    disk.fail();
    let r = s.post("/api/commissions", Some(&alice), &queued("lost"));
    assert_eq!(r.status, 503, "an append whose fdatasync failed must not be acknowledged: {}", r.text());
    assert_eq!(r.code(), "storage_unavailable");
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("fdatasync"), "{}", r.text());
    let ready = s.get("/readyz", None);
    assert_eq!(ready.status, 503, "{}", ready.text());
    assert!(
        ready.text().contains("refuses writes") && ready.text().contains("fdatasync"),
        "{}",
        ready.text()
    );

    // The store stopped: a disk that works again does not make it write without a restart,
    // and nothing of the failed append is visible.
    disk.heal();
    let again = s.post("/api/commissions", Some(&alice), &queued("after"));
    assert_eq!(again.status, 503, "{}", again.text());
    let kept: Vec<String> = (0..5).map(|i| format!("kept {i}")).collect();
    assert_eq!(titles(&s, "alice"), kept);
    s.kill();

    // After a restart every acknowledged event is there and the store writes again.
    let s = Server::start(exe(), dir.path(), &[]);
    let after = titles(&s, "alice");
    assert!(kept.iter().all(|t| after.contains(t)), "{after:?}");
    s.create(&alice, queued("after restart"));
    assert!(s.stop().success());
    let check = replay_check(dir.path());
    assert_eq!(check.status.code(), Some(0), "{}", String::from_utf8_lossy(&check.stdout));
}

/// What README promises for `periodic`: an append is acknowledged before its fsync, the log
/// is synced once per interval rather than once per append, and a failing sync stops the store
/// within about an interval.
#[test]
fn periodic_durability_acknowledges_before_fdatasync_and_stops_when_it_fails() {
    const INTERVAL_MS: u64 = 1000;
    let disk = FailingDisk::new();
    let dir = temp_dir("fdatasync-periodic");
    let interval = INTERVAL_MS.to_string();
    let s = disk.start(
        dir.path(),
        &[("ATELIER_DURABILITY", "periodic"), ("ATELIER_DURABILITY_INTERVAL_MS", &interval)],
    );
    let alice = token("alice", false);

    let (calls, started) = (disk.calls(), Instant::now());
    for i in 0..20 {
        s.create(&alice, queued(&format!("quick {i}")));
    }
    let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap();
    let synced = disk.calls() - calls;
    assert!(
        synced <= 1 + elapsed_ms / INTERVAL_MS,
        "{synced} fdatasyncs for 20 appends in {elapsed_ms} ms with a {INTERVAL_MS} ms interval"
    );

    disk.fail();
    let acked = s.post("/api/commissions", Some(&alice), &queued("before the sync"));
    assert_eq!(acked.status, 201, "periodic acknowledges before fdatasync: {}", acked.text());
    let failed_at = Instant::now();
    let stopped = wait_for(Duration::from_millis(INTERVAL_MS * 3), || {
        let r = s.get("/readyz", None);
        (r.status == 503).then_some(r)
    })
    .expect("the failed periodic sync stops the store");
    assert!(stopped.text().contains("fdatasync"), "{}", stopped.text());
    assert!(failed_at.elapsed() <= Duration::from_millis(INTERVAL_MS * 2), "{:?}", failed_at.elapsed());
    let refused = s.post("/api/commissions", Some(&alice), &queued("refused"));
    assert_eq!(refused.status, 503, "{}", refused.text());
}

fn replay_check(data_dir: &Path) -> Output {
    std::process::Command::new(exe())
        .args(["replay", "--check"])
        .env("ATELIER_DATA_DIR", data_dir)
        .env("ATELIER_SECRET", SECRET)
        .output()
        .unwrap()
}

/// One way to damage a projection: the projection's name as the diff spells it, and what to
/// write over the stored entry.
struct Damage {
    names: &'static str,
    key: Vec<u8>,
    /// The damaged value, or `None` to remove the entry.
    value: Option<Vec<u8>>,
}

/// Picks an entry of the projection tree and says how to damage it.
type Doctor = dyn Fn(&sled::Tree) -> Damage;

fn damaged_snapshot(tree: &sled::Tree, id: u64) -> Damage {
    let key = Projection::Commissions.key_u64(id).to_vec();
    let mut c: Commission = codec::decode(&tree.get(&key).unwrap().unwrap()).unwrap();
    c.priority += 1;
    Damage { names: "commissions", key, value: Some(codec::encode(&c)) }
}

fn damaged_job(tree: &sled::Tree) -> Damage {
    let (key, v) = tree.scan_prefix([Projection::Jobs.prefix()]).next().expect("a job record").unwrap();
    let mut job: Job = codec::decode(&v).unwrap();
    job.exit_code = Some(99);
    Damage { names: "jobs", key: key.to_vec(), value: Some(codec::encode(&job)) }
}

fn damaged_counts(tree: &sled::Tree) -> Damage {
    let key = Projection::Meta.key(META_COUNTS);
    let mut counts: [u64; 10] = codec::decode(&tree.get(&key).unwrap().unwrap()).unwrap();
    counts[0] += 1;
    Damage { names: "meta", key, value: Some(codec::encode(&counts)) }
}

#[test]
fn replay_check_names_each_damaged_projection() {
    let dir = temp_dir("damage");
    let (done, queued_id) = {
        let s = Server::start(exe(), dir.path(), &[]);
        let alice = token("alice", false);
        let done = s.create(&alice, json!({"context": {"title": "ran"}, "pipeline": "noop"}))["task_id"]
            .as_u64()
            .unwrap();
        let mut body = queued("waits");
        body["idempotency_key"] = json!("k1");
        let queued_id = s.create(&alice, body)["task_id"].as_u64().unwrap();
        wait_for(Duration::from_secs(30), || {
            (s.get(&format!("/api/commissions/{done}"), Some(&alice)).json()["state"] == "completed")
                .then_some(())
        })
        .expect("the noop commission completes");
        assert!(s.stop().success());
        (done, queued_id)
    };
    let clean = replay_check(dir.path());
    assert_eq!(clean.status.code(), Some(0), "{}", String::from_utf8_lossy(&clean.stdout));

    let damages: Vec<Box<Doctor>> = vec![
        Box::new(move |t| damaged_snapshot(t, queued_id)),
        Box::new(move |_| Damage {
            names: "by_commission",
            key: Projection::ByCommission.key_pair(done, 1).to_vec(),
            value: None,
        }),
        Box::new(move |_| Damage {
            names: "by_user",
            key: Projection::ByUser.key_user("alice", &done.to_be_bytes()),
            value: None,
        }),
        Box::new(move |_| Damage {
            names: "idempotency",
            key: Projection::Idempotency.key_user("alice", b"k1"),
            value: Some(done.to_be_bytes().to_vec()),
        }),
        Box::new(move |_| Damage {
            names: "live",
            key: Projection::Live.key_u64(done).to_vec(),
            value: Some(Vec::new()),
        }),
        Box::new(damaged_job),
        Box::new(move |t| Damage {
            names: "jobs_by_commission",
            key: t
                .scan_prefix(Projection::JobsByCommission.key_u64(done))
                .next()
                .expect("the finished commission's job")
                .unwrap()
                .0
                .to_vec(),
            value: None,
        }),
        Box::new(damaged_counts),
    ];
    for damage in damages {
        let (names, key, original) = with_projections(dir.path(), |t| {
            let d = damage(t);
            let original = t.get(&d.key).unwrap();
            match d.value {
                Some(v) => drop(t.insert(&d.key, v).unwrap()),
                None => drop(t.remove(&d.key).unwrap().expect("the entry to remove exists")),
            }
            (d.names, d.key, original)
        });
        let out = replay_check(dir.path());
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "damaged {names}: {stdout}");
        let diff: Vec<&str> =
            stdout.lines().skip_while(|l| !l.starts_with("projections differ")).skip(1).collect();
        assert!(!diff.is_empty(), "damaged {names}, no diff: {stdout}");
        assert!(
            diff.iter().all(|l| l.trim_start().starts_with(&format!("{names}: "))),
            "damaged {names}, the diff names something else: {stdout}"
        );
        with_projections(dir.path(), |t| match original {
            Some(v) => t.insert(&key, v).map(drop).unwrap(),
            None => t.remove(&key).map(drop).unwrap(),
        });
        let repaired = replay_check(dir.path());
        assert_eq!(
            repaired.status.code(),
            Some(0),
            "{names} put back: {}",
            String::from_utf8_lossy(&repaired.stdout)
        );
    }
}
