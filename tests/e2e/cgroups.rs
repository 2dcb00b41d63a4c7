//! End-to-end: what a job's cgroup holds, behind the real binary. These tests need to make
//! cgroups (root, with a cgroup v1 pids hierarchy or a v2 one with the memory, pids and cpu
//! controllers); elsewhere they say so and skip.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use atelier_tests::*;
use serde_json::json;

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_atelier"))
}

/// How long a test waits for a commission to end.
const PATIENCE: Duration = Duration::from_secs(60);
/// SSE streams the server holds while its jobs fork: each is a thread of the server's user,
/// well past the 1,024 that RLIMIT_NPROC allows a worker by default.
const STREAMS: usize = 2_000;
const NOBODY: u32 = 65_534;

/// A cgroup parent delegated to `nobody`, as an administrator would give one to the server's
/// user: made in each hierarchy a job uses, with the server itself moved into its `server`
/// child before it runs (so that a worker moving into a job's cgroup stays inside the
/// delegated tree, as cgroup v2 requires). Removed on drop, once the server is gone.
struct Delegated {
    /// What `[workers] cgroup` names: the parent in the pids hierarchy, or the v2 one.
    setting: PathBuf,
    /// Every dir made, parents first.
    dirs: Vec<PathBuf>,
    /// The `cgroup.procs` files the server's process writes itself into before it runs.
    server_procs: Vec<PathBuf>,
}

impl Delegated {
    /// `None` (having said why) where this process cannot delegate a cgroup.
    fn make(name: &str) -> Option<Delegated> {
        // SAFETY: geteuid only returns this process's effective user id.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: making and delegating cgroups needs root");
            return None;
        }
        let v2_root = Path::new("/sys/fs/cgroup");
        let v2 = std::fs::read_to_string(v2_root.join("cgroup.controllers"))
            .is_ok_and(|c| ["memory", "pids", "cpu"].iter().all(|w| c.split_whitespace().any(|x| x == *w)));
        let roots: Vec<PathBuf> = if v2 {
            vec![v2_root.to_path_buf()]
        } else {
            ["pids", "memory", "freezer"]
                .iter()
                .map(|c| v2_root.join(c))
                .filter(|r| r.join("cgroup.procs").exists())
                .collect()
        };
        if roots.first().is_none_or(|r| !v2 && !r.ends_with("pids")) {
            eprintln!("skipped: neither a cgroup v2 hierarchy with memory, pids and cpu nor a v1 pids one");
            return None;
        }
        let name = format!("atelier-test-{name}-{}", std::process::id());
        let mut d = Delegated { setting: roots[0].join(&name), dirs: Vec::new(), server_procs: Vec::new() };
        for root in &roots {
            if v2 {
                let control = root.join("cgroup.subtree_control");
                let _ = std::fs::write(&control, "+memory +pids +cpu");
            }
            let parent = root.join(&name);
            std::fs::create_dir(&parent).expect("make the delegated cgroup");
            d.dirs.push(parent.clone());
            // Delegation: the dir and the files a user writes to manage it (cgroup v2's
            // "Delegation Containment"; v1 needs only the dir and cgroup.procs).
            for f in ["", "cgroup.procs", "tasks", "cgroup.subtree_control", "cgroup.threads"] {
                let path = if f.is_empty() { parent.clone() } else { parent.join(f) };
                if path.exists() {
                    std::os::unix::fs::chown(&path, Some(NOBODY), Some(NOBODY)).expect("delegate");
                }
            }
            let server = parent.join("server");
            std::fs::create_dir(&server).expect("make the server's cgroup");
            d.dirs.push(server.clone());
            d.server_procs.push(server.join("cgroup.procs"));
        }
        Some(d)
    }
}

impl Drop for Delegated {
    fn drop(&mut self) {
        // Children first; a job cgroup the server left (it is killed if a test fails) too.
        for dir in self.dirs.iter().rev() {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for e in entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())) {
                    if let Ok(jobs) = std::fs::read_dir(e.path()) {
                        for j in jobs.flatten().filter(|j| j.file_type().is_ok_and(|t| t.is_dir())) {
                            let _ = std::fs::remove_dir(j.path());
                        }
                    }
                    let _ = std::fs::remove_dir(e.path());
                }
            }
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// A worker that forks until it cannot (at most 200 children, each sleeping).
const FORKER: &str = "import os, sys, time\nn = 0\ntry:\n    for _ in range(200):\n        if os.fork() == 0:\n            time.sleep(30)\n            os._exit(0)\n        n += 1\nexcept OSError as e:\n    sys.stderr.write('fork failed after %d: %s\\n' % (n, e))\n    sys.exit(3)\nsys.stderr.write('forked %d\\n' % n)\nsys.exit(4)";

/// The server's threads do not count against a job's process limit: a server (as `nobody`,
/// whom RLIMIT_NPROC binds) holding 2,000 open SSE streams still runs a job whose command
/// stage forks (`sh -c` with children), while a worker forking past its `nproc_max` is
/// stopped. Under RLIMIT_NPROC, which counts every process and thread of the user, the first
/// job's forks would fail.
#[test]
fn a_server_holding_thousands_of_streams_still_runs_forking_jobs() {
    let Some(cg) = Delegated::make("streams") else { return };
    let dir = temp_dir("cg-streams");
    std::os::unix::fs::chown(dir.path(), Some(NOBODY), Some(NOBODY)).unwrap();
    let forker = serde_json::to_string(&["python3", "-c", FORKER]).unwrap();
    let config = dir.path().join("atelier.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[pipelines.forks]
env = {{ PATH = "/usr/bin:/bin" }}
stages.generating_ideas = {{ command = ["sh", "-c", '''cat >/dev/null; for i in 1 2 3 4; do sh -c 'sleep 0.05' & done; wait; echo '{{"type":"result","result":{{"forked":4}}}}' '''] }}
stages.creating_images = {{ builtin = "noop" }}
stages.uploading = {{ builtin = "noop" }}
stages.creating_products = {{ builtin = "noop" }}

[pipelines.forker]
nproc_max = 16
env = {{ PATH = "/usr/bin:/bin" }}
command = {forker}
"#
        ),
    )
    .unwrap();
    std::os::unix::fs::chown(&config, Some(NOBODY), Some(NOBODY)).unwrap();
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"]).arg(exe());
    let procs = cg.server_procs.clone();
    // SAFETY: between fork and exec this writes to files and reads the pid only.
    unsafe {
        cmd.pre_exec(move || {
            for p in &procs {
                std::fs::write(p, std::process::id().to_string())?;
            }
            Ok(())
        });
    }
    let setting = cg.setting.display().to_string();
    let limits = [
        ("ATELIER_CONFIG", config.to_str().unwrap()),
        ("ATELIER_CGROUP", setting.as_str()),
        // Workers run as the server's own user (nobody): the case where RLIMIT_NPROC would
        // count the server's stream threads.
        ("ATELIER_WORKER_USER", "65534"),
        ("ATELIER_MAX_CONNECTIONS", "5000"),
        ("ATELIER_MAX_CONNECTIONS_PER_IP", "5000"),
    ];
    let env: Vec<(&str, &str)> = limits.iter().chain(NO_SHARE_LIMITS.iter()).copied().collect();
    let s = Server::start_command(cmd, exe(), dir.path(), &env);
    let alice = token("alice", false);
    let streams: Vec<Sse> =
        (0..STREAMS).map(|_| Sse::open(s.addr, "/api/commissions/user/alice/stream", &alice, None)).collect();
    assert!(streams.iter().all(|st| st.status == 200), "every stream opened");
    let threads = std::fs::read_to_string(format!("/proc/{}/status", s.pid()))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:")?.trim().parse::<usize>().ok())
        .unwrap();
    assert!(threads > STREAMS, "the server holds a thread per stream: {threads}");

    let ended = |id: u64| {
        wait_for(PATIENCE, || {
            let c = s.get(&format!("/api/commissions/{id}"), Some(&alice)).json();
            ["completed", "failed"].contains(&c["state"].as_str()?).then_some(c)
        })
        .unwrap_or_else(|| panic!("commission {id} did not end"))
    };
    let forks = s.create(&alice, json!({"context": {}, "pipeline": "forks", "max_attempts": 1}))["task_id"]
        .as_u64()
        .unwrap();
    let c = ended(forks);
    assert_eq!(c["state"], "completed", "{c}");
    let forker = s.create(&alice, json!({"context": {}, "pipeline": "forker", "max_attempts": 1}))["task_id"]
        .as_u64()
        .unwrap();
    let c = ended(forker);
    let jobs = s.get(&format!("/api/commissions/{forker}/jobs"), Some(&alice)).json();
    let msg = jobs["items"][0]["error_message"].as_str().unwrap_or_default().to_string();
    let forked: u32 = msg
        .strip_prefix("the worker exited with code 3; stderr: fork failed after ")
        .and_then(|rest| rest.split(':').next()?.parse().ok())
        .unwrap_or_else(|| panic!("the forker was not stopped: {msg} ({c})"));
    assert!(forked < 16, "{forked} children under nproc_max = 16: {msg}");
    drop(streams);
    assert!(s.stop().success());
}
