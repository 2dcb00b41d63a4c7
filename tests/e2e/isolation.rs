//! End-to-end: what a commission's own code (or a user's context) can do to the job
//! controller and the server, with real worker processes behind the real binary.

use std::path::Path;
use std::time::Duration;

use atelier_tests::*;

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_atelier"))
}

/// How long a test waits for a commission or a process to get where it should.
const PATIENCE: Duration = Duration::from_secs(30);

/// Writes `toml` as the server's config file and returns its path.
fn config_file(dir: &Path, toml: &str) -> String {
    let path = dir.join("atelier.toml");
    std::fs::write(&path, toml).unwrap();
    path.display().to_string()
}

/// The commission's first job, once it has ended.
fn ended_job(s: &Server, token: &str, id: u64) -> serde_json::Value {
    wait_for(PATIENCE, || {
        let jobs = s.get(&format!("/api/commissions/{id}/jobs"), Some(token)).json();
        let j = jobs["items"].as_array()?.first()?.clone();
        (j["completed_at"].is_string()).then_some(j)
    })
    .unwrap_or_else(|| panic!("commission {id}'s job did not end"))
}

/// Floods of protocol lines are the flooding job's own failure: twenty of them (a pipeline's
/// own program writing heartbeats as fast as it can, and the built-in worker's flood mode)
/// trip no rollback, and the next commission still runs on the job controller. A `noop` asking
/// for more progress steps than the cap is refused at the door, naming the cap.
#[test]
fn floods_trip_no_rollback() {
    let dir = temp_dir("iso-flood");
    let config = config_file(
        dir.path(),
        r#"
[pipelines.flood-own]
command = ["sh", "-c", '''cat >/dev/null; printf '{"type":"stage","stage":"generating_ideas"}\n' >&3; exec yes '{"type":"heartbeat"}' >&3''']
env = { PATH = "/usr/bin:/bin" }

[pipelines.flood-builtin]
worker_args = ["--behave", "flood"]
"#,
    );
    // Five failures of the machinery in a window of twenty would trip it (over 5 %).
    let s = Server::start(
        exe(),
        dir.path(),
        &[("ATELIER_CONFIG", &config), ("ROLLBACK_MIN_JOBS", "5"), ("ROLLBACK_WINDOW_JOBS", "20")],
    );
    let alice = token("alice", false);
    let too_many = s.post(
        "/api/commissions",
        Some(&alice),
        &json!({"context": {"progress_steps": 2500}, "pipeline": "noop", "max_attempts": 1}),
    );
    assert_eq!(too_many.status, 400, "{}", too_many.text());
    assert_eq!(
        too_many.json()["error"]["message"],
        "context: progress_steps must be an integer 0..=1000",
        "{}",
        too_many.text()
    );
    let ids: Vec<u64> = (0..20)
        .map(|i| {
            let pipeline = if i % 2 == 0 { "flood-own" } else { "flood-builtin" };
            s.create(&alice, json!({"context": {}, "pipeline": pipeline, "max_attempts": 1}))["task_id"]
                .as_u64()
                .unwrap()
        })
        .collect();
    for id in ids {
        let job = ended_job(&s, &alice, id);
        assert_eq!(job["executor"], "job_controller", "{job}");
        assert_eq!(job["status"], "failed", "{job}");
        assert_eq!(
            job["error_message"], "protocol error: flooding: over 10000 protocol lines in one second",
            "{job}"
        );
    }
    let metrics = s.get("/metrics", Some(&token("root", true))).text();
    assert!(metrics.contains("atelier_rollback_active 0"), "{metrics}");
    assert!(metrics.contains("atelier_rollbacks_total{reason=\"failure_rate\"} 0"), "{metrics}");
    // The most steps allowed: no flood, and the job controller still takes the work.
    let id = s
        .create(&alice, json!({"context": {"progress_steps": 1000}, "pipeline": "noop", "max_attempts": 1}))
        ["task_id"]
        .as_u64()
        .unwrap();
    let job = ended_job(&s, &alice, id);
    assert_eq!((&job["executor"], &job["status"]), (&json!("job_controller"), &json!("succeeded")), "{job}");
    assert!(s.stop().success());
}

/// `/proc/PID/stat`'s process group, or None once the process is gone (a zombie counts as gone).
fn process_group(pid: u64) -> Option<i64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat.rsplit(')').next()?.split_whitespace();
    let state = fields.next()?;
    (state != "Z").then_some(())?;
    fields.nth(1)?.parse().ok()
}

/// A worker cannot move itself into the server's own process group (out of reach of a kill of
/// its job's group, and in reach of a signal to the server's): it runs in a session of its
/// own, and a process may join only a group of its own session. The job fails with the
/// worker's own report of the refusal, and its slot is free again.
#[test]
fn a_worker_cannot_join_the_servers_process_group() {
    let dir = temp_dir("iso-pgid");
    let config =
        config_file(dir.path(), "[pipelines.hide]\nworker_args = [\"--behave\", \"join-server-group\"]\n");
    let s = Server::start(
        exe(),
        dir.path(),
        &[("ATELIER_CONFIG", &config), ("MAX_CONCURRENT_JOBS", "1"), ("KILL_GRACE_MS", "300")],
    );
    let alice = token("alice", false);
    let id = s.create(&alice, json!({"context": {}, "pipeline": "hide", "max_attempts": 1}))["task_id"]
        .as_u64()
        .unwrap();
    let job = ended_job(&s, &alice, id);
    assert_eq!(job["status"], "failed", "{job}");
    let error = job["error_message"].as_str().unwrap_or_default();
    assert!(error.starts_with("setpgid into the server's group: EPERM"), "{job}");
    // The one job slot is free: the next commission runs to its end.
    let next = s.create(&alice, json!({"context": {}, "pipeline": "noop"}))["task_id"].as_u64().unwrap();
    assert_eq!(ended_job(&s, &alice, next)["status"], "succeeded");
    assert!(s.stop().success());
}

/// A command stage that runs out of memory (a real python3 under `memory_mb = 128` filling
/// 512 MiB: `MemoryError` and exit 1 under RLIMIT_AS, the kernel's SIGKILL under a job
/// cgroup) is the memory outcome, retried with double memory up to the cap, not a plain
/// failed stage.
#[test]
fn a_command_stage_out_of_memory_is_retried_with_double_memory() {
    let dir = temp_dir("iso-oom");
    let config = config_file(
        dir.path(),
        r#"
[pipelines.hungry]
memory_mb = 128
memory_max_mb = 256
stages.generating_ideas = { command = ["python3", "-c", "import sys; sys.stdin.read(); b = b'x' * (512 << 20)"] }
"#,
    );
    let s = Server::start(
        exe(),
        dir.path(),
        &[("ATELIER_CONFIG", &config), ("RETRY_BASE_MS", "10"), ("RETRY_CAP_MS", "20")],
    );
    let alice = token("alice", false);
    let id = s.create(&alice, json!({"context": {}, "pipeline": "hungry", "max_attempts": 3}))["task_id"]
        .as_u64()
        .unwrap();
    let c = wait_for(PATIENCE, || {
        let c = s.get(&format!("/api/commissions/{id}"), Some(&alice)).json();
        (c["state"] == "failed").then_some(c)
    })
    .expect("the commission fails once the memory cap is reached");
    let jobs = s.get(&format!("/api/commissions/{id}/jobs"), Some(&alice)).json();
    let ended: Vec<(&str, &str)> = jobs["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| (j["status"].as_str().unwrap(), j["error_message"].as_str().unwrap()))
        .collect();
    assert_eq!(
        ended,
        [
            ("killed", "memory limit exceeded (128 MiB); the next attempt gets 256 MiB"),
            ("killed", "memory limit exceeded (256 MiB, the cap)"),
        ],
        "{c}"
    );
    assert!(s.stop().success());
}

/// The shell lines that report all four stages and a result on fd 3.
const REPORT_ALL_STAGES: &str = r#"for s in generating_ideas creating_images uploading creating_products; do printf '{"type":"stage","stage":"%s"}\n' $s >&3; done; printf '{"type":"result","result":{"ok":true}}\n' >&3"#;

/// A job's logs are the server's to write and to serve, never through a symlink the worker
/// planted in its dir (the server neither overwrites the link's target nor serves it), and
/// one answer carries at most 1 MiB of each log however large the log is.
#[test]
fn job_logs_are_not_followed_through_links_and_are_served_capped() {
    let dir = temp_dir("iso-logs");
    let read_target = dir.path().join("read-target.txt");
    let write_target = dir.path().join("write-target.txt");
    std::fs::write(&read_target, "NOT-FOR-THE-LOGS").unwrap();
    std::fs::write(&write_target, "MUST-STAY").unwrap();
    let config = config_file(
        dir.path(),
        &format!(
            r#"
[pipelines.plant]
command = ["sh", "-c", '''cat >/dev/null; ln -s "$READ_TARGET" stdout.log; ln -s "$WRITE_TARGET" stderr.log; echo through-the-link >&2; {REPORT_ALL_STAGES}''']
env = {{ PATH = "/usr/bin:/bin", READ_TARGET = "{}", WRITE_TARGET = "{}" }}

[pipelines.big]
log_bytes_max = 4194304
command = ["sh", "-c", '''cat >/dev/null; head -c 3145728 /dev/zero | tr '\0' x; {REPORT_ALL_STAGES}''']
env = {{ PATH = "/usr/bin:/bin" }}
"#,
            read_target.display(),
            write_target.display()
        ),
    );
    let s = Server::start(exe(), dir.path(), &[("ATELIER_CONFIG", &config)]);
    let alice = token("alice", false);
    let logs_of = |pipeline: &str| {
        let id = s.create(&alice, json!({"context": {}, "pipeline": pipeline}))["task_id"].as_u64().unwrap();
        let job = ended_job(&s, &alice, id);
        assert_eq!(job["status"], "succeeded", "{job}");
        let r = s.get(&format!("/api/jobs/{}/logs", job["job_id"]), Some(&alice));
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    };
    let planted = logs_of("plant");
    assert_eq!((planted["stdout"].as_str(), planted["stderr"].as_str()), (Some(""), Some("")), "{planted}");
    assert_eq!(std::fs::read_to_string(&write_target).unwrap(), "MUST-STAY");
    let big = logs_of("big");
    let stdout = big["stdout"].as_str().unwrap();
    assert_eq!(stdout.len(), 1024 * 1024);
    assert!(stdout.bytes().all(|b| b == b'x'));
    assert!(s.stop().success());
}

/// The server is non-dumpable: a process of its own user cannot read its environment, where
/// the secret is. Root reads any process's /proc files (CAP_SYS_PTRACE), so as root both the
/// server and the reader run as `nobody`, the same user without that capability.
#[test]
fn a_process_of_the_servers_user_cannot_read_its_environment() {
    use std::os::unix::process::CommandExt;
    // SAFETY: geteuid and getegid only return this process's ids.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let nobody = 65_534;
    let (uid, gid) = if euid == 0 { (nobody, nobody) } else { (euid, egid) };
    let dir = temp_dir("iso-dumpable");
    std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
    let s = Server::start_as(exe(), dir.path(), &[], uid, gid);
    let environ = format!("/proc/{}/environ", s.pid());
    let read = std::process::Command::new("cat").arg(&environ).uid(uid).gid(gid).output().unwrap();
    let (out, err) = (String::from_utf8_lossy(&read.stdout), String::from_utf8_lossy(&read.stderr));
    assert!(!out.contains("ATELIER_SECRET"), "a process of uid {uid} read the server's environment");
    assert!(!read.status.success() && err.contains("Permission denied"), "{}: {out} {err}", read.status);
    assert!(s.stop().success());
}

/// The account workers run as under a root server, made when missing, as a Debian operator
/// would (README "Set-up"). Only root may, and only root needs it.
const WORKER_USER: &str = "atelier-worker";

/// The worker user's uid and gid, making the account first if there is none. One test at a
/// time: two `useradd`s at once can fail on the lock of /etc/passwd.
fn worker_account() -> (u32, u32) {
    static MAKING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = MAKING.lock().unwrap_or_else(|p| p.into_inner());
    let id = |flag: &str| {
        let out = std::process::Command::new("id").args([flag, WORKER_USER]).output().unwrap();
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().parse::<u32>().unwrap())
    };
    if id("-u").is_none() {
        // Exit 9: made meanwhile by someone else, which is as good.
        let made = std::process::Command::new("useradd")
            .args(["--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent"])
            .args(["--shell", "/usr/sbin/nologin", WORKER_USER])
            .status()
            .unwrap();
        assert!(made.success() || made.code() == Some(9), "useradd {WORKER_USER}: {made}");
    }
    (id("-u").expect("the worker user exists"), id("-g").expect("the worker user has a group"))
}

/// `/proc/PID/status`'s real, effective, saved and filesystem uids.
fn uids_of(pid: u64) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// Mode bits and owner of a path, as `"0710 0:997"`.
fn mode_and_owner(path: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path).unwrap();
    format!("{:04o} {}:{}", m.mode() & 0o7777, m.uid(), m.gid())
}

/// One hostile job under the worker user, with real processes: it tries to read the secret
/// file, the sled files, the server's log, another job's dir and the server's `/proc` files;
/// to write outside its dir; to join the server's process group; to leave its session and
/// outlive its job; to write to another running job's protocol pipe; and to fork past its
/// process limit. Each attempt fails or what it left is ended; the job itself succeeds (exit 0
/// with a result), the job it tried to disturb succeeds untouched, and the server serves on.
///
/// The data dir is as an earlier version (or an operator) left it: its server log is open to
/// everyone; the start makes it private. Every check is collected so that one run names every
/// protection that did not hold.
#[test]
fn a_hostile_worker_reaches_nothing_but_its_own_job() {
    if current_uid() != 0 {
        eprintln!(
            "skipped: switching workers to {WORKER_USER} needs root; the worker user parts are not tested"
        );
        return;
    }
    let (uid, gid) = worker_account();
    let dir = temp_dir("iso-hostile");
    let data = dir.path();
    let scripts = temp_dir("iso-hostile-scripts");
    std::fs::set_permissions(scripts.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let script = scripts.path().join("hostile_worker.py");
    std::fs::copy(workspace_root().join("tests/fixtures/hostile_worker.py"), &script).unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let secret_file = data.join("secret");
    std::fs::write(&secret_file, SECRET).unwrap();
    std::fs::set_permissions(&secret_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let config = config_file(
        data,
        &format!(
            r#"
[pipelines.hostile]
nproc_max = 40
command = ["python3", "{}"]
env = {{ PATH = "/usr/bin:/bin" }}

[pipelines.chatty]
command = ["sh", "-c", '''cat >/dev/null; echo private-to-this-job >&2; {REPORT_ALL_STAGES}''']
env = {{ PATH = "/usr/bin:/bin" }}
"#,
            script.display()
        ),
    );
    let log = data.join("server.log");
    let s = Server::start_logging_to(
        exe(),
        data,
        &[
            ("ATELIER_CONFIG", &config),
            ("ATELIER_SECRET", ""),
            ("ATELIER_WORKER_USER", WORKER_USER),
            ("ATELIER_ALLOW_ROOT_WORKERS", "false"),
            ("RUST_LOG", "info"),
        ],
        &log,
    );
    let alice = token("alice", false);
    let mut wrong: Vec<String> = Vec::new();
    let mut check = |ok: bool, what: String| {
        if !ok {
            wrong.push(what);
        }
    };

    // A finished job whose dir holds its logs.
    let chatty = s.create(&alice, json!({"context": {}, "pipeline": "chatty"}))["task_id"].as_u64().unwrap();
    let chatty_job = ended_job(&s, &alice, chatty);
    assert_eq!(chatty_job["status"], "succeeded", "{chatty_job}");
    let chatty_dir = data.join("jobs").join(chatty_job["job_id"].to_string());
    // A running job of the built-in worker, for the hostile one to disturb; it stays in its
    // first stage for a minute, far longer than the hostile job takes.
    let victim = s
        .create(&alice, json!({"context": {"delay_ms": 60000}, "pipeline": "noop", "max_attempts": 1}))
        ["task_id"]
        .as_u64()
        .unwrap();
    let victim_pid = wait_for(PATIENCE, || {
        let jobs = s.get(&format!("/api/commissions/{victim}/jobs"), Some(&alice)).json();
        jobs["items"].as_array()?.first()?["process_id"].as_u64()
    })
    .expect("the victim job runs");
    let worker_uids = format!("{uid} {uid} {uid} {uid}");
    check(
        uids_of(victim_pid).as_deref() == Some(&worker_uids),
        format!("the built-in worker runs as {:?}", uids_of(victim_pid)),
    );

    // Everything at the top of the data dir but the shared dirs, and one level into each dir.
    let mut private: Vec<String> =
        vec![chatty_dir.display().to_string(), chatty_dir.join("stderr.log").display().to_string()];
    for entry in std::fs::read_dir(data).unwrap() {
        let path = entry.unwrap().path();
        if path.ends_with("jobs") || path.ends_with("artifacts") {
            continue;
        }
        private.push(path.display().to_string());
        if path.is_dir() {
            private
                .extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path().display().to_string()));
        }
    }
    for name in ["secret", "sled/db", "sled/conf", "server.log"] {
        check(
            private.contains(&data.join(name).display().to_string()),
            format!("{name} is among the targets: {private:?}"),
        );
    }
    private.extend([data.display().to_string(), data.join("jobs").display().to_string()]);
    let planted = [
        data.join("planted"),
        data.join("jobs/planted"),
        data.join("jobs/pipelines/planted"),
        chatty_dir.join("planted"),
    ];
    let server_pid = u64::try_from(s.pid()).unwrap();
    let server_pgid = process_group(server_pid).expect("the server runs");
    let context = json!({
        "read": private,
        "write": planted.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "server_pid": server_pid,
        "server_pgid": server_pgid,
        "other_worker_pid": victim_pid,
    });
    let hostile = s.create(&alice, json!({"context": context, "pipeline": "hostile", "max_attempts": 1}))
        ["task_id"]
        .as_u64()
        .unwrap();
    let job = ended_job(&s, &alice, hostile);
    assert_eq!(job["status"], "succeeded", "the README's outcome for exit 0 with a result: {job}");
    let c = s.get(&format!("/api/commissions/{hostile}"), Some(&alice)).json();
    let report = &c["result"]["report"];
    assert!(report.is_object(), "the worker reported: {c}");

    check(
        report["uid"] == json!([uid, uid]) && report["gid"] == json!([gid, gid]),
        format!("runs as {uid}:{gid}: {report}"),
    );
    check(report["groups"] == json!([]), format!("no supplementary groups: {}", report["groups"]));
    for (path, said) in report["read"].as_object().unwrap() {
        check(said == "EACCES", format!("read {path}: {said}"));
    }
    for (path, said) in report["write"].as_object().unwrap() {
        check(said == "EACCES", format!("write {path}: {said}"));
    }
    for p in &planted {
        check(!p.exists(), format!("{} was planted", p.display()));
    }
    check(report["own_dir_write"] == "ok", format!("its own dir is its own: {}", report["own_dir_write"]));
    check(
        report["server_environ"] == "EACCES",
        format!("the server's environ: {}", report["server_environ"]),
    );
    check(report["server_fds"] == "EACCES", format!("the server's descriptors: {}", report["server_fds"]));
    check(report["other_pipe"] == "EACCES", format!("another job's protocol pipe: {}", report["other_pipe"]));
    check(report["forks"]["refused"] == "EAGAIN", format!("the process limit: {}", report["forks"]));
    check(
        report["forks"]["pids"].as_array().is_some_and(|p| p.len() < 40),
        format!(
            "forked {} processes under nproc_max 40",
            report["forks"]["pids"].as_array().map_or(0, Vec::len)
        ),
    );
    check(
        report["setpgid"]["outcome"] == "EPERM",
        format!("joining the server's process group: {}", report["setpgid"]),
    );
    // What it left behind, in a session of its own and in its group, is ended once its job
    // is over.
    let mut left: Vec<u64> =
        vec![report["setpgid"]["pid"].as_u64().unwrap(), report["setsid"]["pid"].as_u64().unwrap()];
    left.extend(report["forks"]["pids"].as_array().unwrap().iter().filter_map(Value::as_u64));
    let lingering = wait_for(PATIENCE, || {
        let alive: Vec<u64> = left.iter().copied().filter(|p| process_group(*p).is_some()).collect();
        alive.is_empty().then_some(())
    });
    check(
        lingering.is_some(),
        format!(
            "left behind and still running: {:?} (setpgid {}, setsid {})",
            left.iter().filter(|p| process_group(**p).is_some()).collect::<Vec<_>>(),
            report["setpgid"],
            report["setsid"]
        ),
    );

    // The job it tried to disturb still runs, untouched (a line written to its protocol pipe
    // would have failed it), until it is cancelled.
    // It sends a heartbeat at least every second: after a line injected into its pipe, that
    // heartbeat is out of order and fails it.
    std::thread::sleep(Duration::from_millis(2500));
    let victim_job = &s.get(&format!("/api/commissions/{victim}/jobs"), Some(&alice)).json()["items"][0];
    let still_running = victim_job["completed_at"].is_null();
    check(still_running, format!("the other job still runs: {victim_job}"));
    if still_running {
        let cancel = s.post(&format!("/api/commissions/{victim}/cancel"), Some(&alice), &json!({}));
        assert_eq!(cancel.status, 200, "{}", cancel.text());
        let victim_job = ended_job(&s, &alice, victim);
        check(
            victim_job["error_message"] == "cancelled",
            format!("the other job ended by its cancel: {victim_job}"),
        );
    }
    // The layout the worker met, and the finished jobs' dirs taken back.
    let hostile_dir = data.join("jobs").join(job["job_id"].to_string());
    for (path, want) in [
        (data.to_path_buf(), format!("0710 0:{gid}")),
        (data.join("jobs"), format!("0710 0:{gid}")),
        (data.join("artifacts"), format!("0730 0:{gid}")),
        (log.clone(), "0600 0:0".to_string()),
        (chatty_dir.clone(), "0700 0:0".to_string()),
        (hostile_dir, "0700 0:0".to_string()),
    ] {
        let got = mode_and_owner(&path);
        check(got == want, format!("{}: {got}, not {want}", path.display()));
    }
    // The server serves on, and the built-in steps still work under the worker user: an image
    // rendered in the job's dir and stored among the artifacts, then served.
    assert_eq!(s.get("/healthz", None).status, 200);
    let next = s.create(&alice, json!({"context": {"title": "after"}, "pipeline": "commission"}))["task_id"]
        .as_u64()
        .unwrap();
    let next_job = ended_job(&s, &alice, next);
    check(next_job["status"] == "succeeded", format!("a commission after it: {next_job}"));
    let snap = s.get(&format!("/api/commissions/{next}"), Some(&alice)).json();
    let image = snap["result"]["product"]["image_url"].as_str().map(|url| s.get(url, None).status);
    check(image == Some(200), format!("its image is served: {image:?} {snap}"));
    assert!(s.stop().success());
    assert!(wrong.is_empty(), "{} protections did not hold:\n{}", wrong.len(), wrong.join("\n"));
}

/// `atelier serve` with a worker user it cannot have does not start: exit 2, and the message
/// names the setting that would let it. As root: a user that does not exist, and root itself
/// without `allow_root_workers`; otherwise: any user but the server's own.
#[test]
fn the_start_refuses_a_worker_user_it_cannot_have() {
    let dir = temp_dir("iso-refused");
    let serve = |user: &str| {
        let out = std::process::Command::new(exe())
            .arg("serve")
            .env("ATELIER_DATA_DIR", dir.path().join("data"))
            .env("ATELIER_LISTEN", "127.0.0.1:0")
            .env("ATELIER_SECRET", SECRET)
            .env("ATELIER_WORKER_USER", user)
            .env_remove("ATELIER_ALLOW_ROOT_WORKERS")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = serve("no-such-user-of-atelier");
    assert_eq!(code, Some(2), "{err}");
    if current_uid() == 0 {
        assert!(err.contains("there is no user 'no-such-user-of-atelier' on this machine"), "{err}");
        let (code, err) = serve("0");
        assert_eq!(code, Some(2), "{err}");
        assert!(err.contains("is root") && err.contains("allow_root_workers = true"), "{err}");
    } else {
        eprintln!("not root: only the refusal of a user the server cannot switch to is tested");
        assert!(err.contains("cannot switch workers to another user"), "{err}");
    }
}

/// The worker user need not see the worker program: the trampoline decides to run the
/// built-in worker in place before it switches users, so a program kept in a dir only root
/// may enter (a server installed under /root) still runs every job.
#[test]
fn the_worker_program_may_sit_where_the_worker_user_cannot_look() {
    if current_uid() != 0 {
        eprintln!(
            "skipped: switching workers to {WORKER_USER} needs root; the worker user parts are not tested"
        );
        return;
    }
    worker_account();
    let dir = temp_dir("iso-hidden-program");
    let hidden = temp_dir("iso-hidden-program-bin");
    let program = hidden.path().join("atelier-worker");
    std::fs::copy(env!("CARGO_BIN_EXE_atelier-worker"), &program).unwrap();
    std::fs::set_permissions(hidden.path(), std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let s = Server::start(
        exe(),
        dir.path(),
        &[
            ("ATELIER_WORKER_USER", WORKER_USER),
            ("ATELIER_ALLOW_ROOT_WORKERS", "false"),
            ("ATELIER_WORKER_PROGRAM", program.to_str().unwrap()),
        ],
    );
    let alice = token("alice", false);
    let id = s.create(&alice, json!({"context": {"title": "hidden"}, "pipeline": "commission"}))["task_id"]
        .as_u64()
        .unwrap();
    let job = ended_job(&s, &alice, id);
    assert_eq!(job["status"], "succeeded", "{job}");
    assert!(s.stop().success());
}
