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

/// A worker that moves itself into the server's own process group, out of reach of a kill of
/// its job's group, is still ended on cancel (by its pid), and its job slot is free again.
#[test]
fn a_worker_in_the_servers_group_is_ended_on_cancel() {
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
    let server_group = process_group(u64::try_from(s.pid()).unwrap()).expect("the server runs");
    let pid = wait_for(PATIENCE, || {
        let jobs = s.get(&format!("/api/commissions/{id}/jobs"), Some(&alice)).json();
        let pid = jobs["items"].as_array()?.first()?["process_id"].as_u64()?;
        (process_group(pid) == Some(server_group)).then_some(pid)
    })
    .expect("the worker moved into the server's process group");
    let c = s.post(&format!("/api/commissions/{id}/cancel"), Some(&alice), &json!({}));
    assert_eq!(c.status, 200, "{}", c.text());
    let job = ended_job(&s, &alice, id);
    assert_eq!((&job["status"], &job["error_message"]), (&json!("killed"), &json!("cancelled")), "{job}");
    let gone = wait_for(PATIENCE, || process_group(pid).is_none().then_some(()));
    assert!(gone.is_some(), "worker {pid} outlived its cancelled job");
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
