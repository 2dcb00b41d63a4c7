//! End-to-end tests of both executors with real worker processes (the `atelier-workerd` test
//! binary stands in for `atelier`): pipelines to completion, the fault matrix, cancel,
//! concurrency, restart reconciliation, coalescing and rollback.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use atelier_engine::{
    Command, Commission, Ctx, Event, Executor, Job, JobStatus, NewCommission, RetryPolicy, State,
};
use atelier_storage::{create, execute, Created, EventStore, SledStore, StoreConfig};
use atelier_workers::{DataDir, Workers, WorkersConfig};
use tempfile::TempDir;

const EXE: &str = env!("CARGO_BIN_EXE_atelier-workerd");

/// A fresh dir under the system temp dir, removed when the guard drops.
fn temp_dir(name: &str) -> TempDir {
    tempfile::Builder::new().prefix(&format!("atelier-workers-{name}-")).tempdir().expect("create temp dir")
}

struct Harness {
    store: Arc<dyn EventStore>,
    controller: Option<Workers>,
    dir: TempDir,
}

fn now_ms() -> i64 {
    i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_millis())
        .expect("fits")
}

fn ctx() -> Ctx {
    Ctx { now: now_ms(), jitter_seed: 7, retry: RetryPolicy { base_ms: 10, cap_ms: 20 } }
}

/// Settings every test shares (fast retries, no coalescing, no rollback surprises), each
/// overridable by `workers`.
fn config(pipelines: &str, workers: &[(&str, &str)]) -> WorkersConfig {
    // Workers run as this test's own user (root allowed): the fault matrix is about the
    // controller, not about the worker user (tests/e2e/isolation.rs covers that).
    let me = nix::unistd::geteuid().as_raw().to_string();
    let mut kv: Vec<(&str, &str)> = vec![
        ("progress_update_interval_seconds", "0"),
        ("retry_base_ms", "10"),
        ("retry_cap_ms", "20"),
        ("kill_grace_ms", "500"),
        ("auto_rollback", "false"),
        ("user", &me),
        ("allow_root_workers", "true"),
    ];
    for (k, v) in workers {
        match kv.iter_mut().find(|(a, _)| a == k) {
            Some(e) => e.1 = v,
            None => kv.push((k, v)),
        }
    }
    let mut text = String::from("[workers]\n");
    for (k, v) in kv {
        text.push_str(&format!("{k} = {v}\n"));
    }
    text.push_str(pipelines);
    WorkersConfig::load(Some(&text), &|_| None).expect("test config is valid")
}

impl Harness {
    fn new(name: &str) -> Harness {
        let dir = temp_dir(name);
        let store = SledStore::open(StoreConfig::new(dir.path().join("store"))).expect("open store");
        Harness { store, controller: None, dir }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn layout(&self) -> DataDir {
        DataDir::new(self.data_dir())
    }

    /// Jobs run `atelier-workerd`, or the worker program named by ATELIER_WORKER_PROGRAM (CI
    /// runs this fault matrix again with the statically linked `atelier-worker`).
    fn start(&mut self, cfg: WorkersConfig) {
        let exe =
            std::env::var_os("ATELIER_WORKER_PROGRAM").map_or_else(|| PathBuf::from(EXE), PathBuf::from);
        self.start_with_exe(cfg, exe);
    }

    fn start_with_exe(&mut self, cfg: WorkersConfig, exe: PathBuf) {
        let c = Workers::start(self.store.clone(), cfg, self.data_dir(), exe).expect("the workers start");
        assert!(c.is_running());
        self.controller = Some(c);
    }

    fn controller(&self) -> &Workers {
        self.controller.as_ref().expect("started")
    }

    fn create(&self, pipeline: &str, context: serde_json::Value, max_attempts: u32) -> u64 {
        self.create_full(pipeline, context, max_attempts, 0, None)
    }

    fn create_full(
        &self,
        pipeline: &str,
        context: serde_json::Value,
        max_attempts: u32,
        priority: i32,
        scheduled_for: Option<i64>,
    ) -> u64 {
        let new = NewCommission {
            user_id: "tester".into(),
            pipeline: pipeline.into(),
            priority,
            scheduled_for,
            context: context.to_string(),
            idempotency_key: None,
            max_attempts,
        };
        match create(&*self.store, new, &ctx()).expect("store works").expect("valid commission") {
            Created::New(c) | Created::Existing(c) => c.id,
        }
    }

    fn get(&self, id: u64) -> Commission {
        self.store.commission(id).expect("store works").expect("exists")
    }

    fn jobs(&self, id: u64) -> Vec<Job> {
        self.store.jobs_of(id).expect("store works")
    }

    fn wait_until(
        &self,
        id: u64,
        timeout: Duration,
        what: &str,
        f: impl Fn(&Commission) -> bool,
    ) -> Commission {
        let end = Instant::now() + timeout;
        loop {
            let c = self.get(id);
            if f(&c) {
                return c;
            }
            assert!(
                Instant::now() < end,
                "commission {id} ({}) not {what} in {timeout:?}: {c:#?}",
                c.pipeline
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_terminal(&self, id: u64, timeout: Duration) -> Commission {
        self.wait_until(id, timeout, "terminal", |c| c.state.is_terminal())
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(c) = self.controller.take() {
            c.shutdown();
            assert!(!c.is_running());
        }
    }
}

/// `/proc/PID/stat`: (state, process group), or None when the process is gone.
fn proc_stat(pid: u32) -> Option<(char, i32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: parse after the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let _ppid = fields.next()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((state, pgrp))
}

/// Processes (other than zombies being reaped) in process group `pgid`.
fn group_members(pgid: i32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| proc_stat(*pid).is_some_and(|(_, g)| g == pgid))
        .collect()
}

/// The job's worker is reaped (no zombie) and left nothing behind in its process group.
fn assert_clean(job: &Job) {
    let Some(pid) = job.process_id else { return };
    let end = Instant::now() + Duration::from_secs(3);
    loop {
        let zombie = proc_stat(pid).is_some_and(|(s, _)| s == 'Z');
        let members = group_members(i32::try_from(pid).expect("pid fits"));
        if !zombie && members.is_empty() {
            return;
        }
        assert!(
            Instant::now() < end,
            "job {} (pid {pid}): zombie={zombie}, group members left: {members:?}",
            job.job_id
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn result_json(c: &Commission) -> serde_json::Value {
    serde_json::from_str(c.result.as_deref().expect("has a result")).expect("result is JSON")
}

const LONG: Duration = Duration::from_secs(20);

#[test]
fn builtin_pipelines_complete_and_the_task_runner_agrees() {
    let mut h = Harness::new("builtin");
    h.start(config("", &[]));
    assert_eq!(h.controller().pipeline_names(), vec!["commission", "fail", "noop"]);
    let noop = h.create("noop", serde_json::json!({}), 1);
    let ctx_json = serde_json::json!({"title": "Harbour at dawn", "text": "fishing boats, mist"});
    let comm = h.create("commission", ctx_json.clone(), 1);
    let c = h.wait_terminal(noop, LONG);
    assert_eq!(c.state, State::Completed, "{c:#?}");
    assert_eq!(result_json(&c), serde_json::json!({"ok": true}));
    let c = h.wait_terminal(comm, LONG);
    assert_eq!(c.state, State::Completed, "{c:#?}");
    let r = result_json(&c);
    assert_eq!(r["ideas"].as_array().map(Vec::len), Some(3), "{r}");
    let url = r["product"]["image_url"].as_str().expect("image url");
    let hash =
        url.strip_prefix("/artifacts/").and_then(|s| s.strip_suffix(".png")).expect("content-addressed url");
    let png = std::fs::read(h.layout().artifacts().join(format!("{hash}.png"))).expect("artifact stored");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(r["product"]["price_cents"].as_u64().is_some_and(|p| p > 0));
    assert_eq!(c.artifacts.len(), 1);
    assert_eq!(c.artifacts[0].uri, url);
    for id in [noop, comm] {
        let jobs = h.jobs(id);
        assert_eq!(jobs.len(), 1);
        let j = &jobs[0];
        assert_eq!(
            (j.executor, j.status, j.exit_code),
            (Executor::JobController, JobStatus::Succeeded, Some(0))
        );
        assert!(j.process_id.is_some() && j.cpu_ms < 10_000 && j.max_rss_bytes > 0, "{j:?}");
        assert_clean(j);
        // The built-in worker prints nothing, and logs are created at their first byte.
        let (out, err) = h.layout().job_logs(j.job_id);
        assert!(!out.exists() && !err.exists(), "no empty log files");
        // A job's dir is made when something goes in it: the rendered image, not a noop.
        assert_eq!(out.parent().is_some_and(Path::is_dir), id == comm, "job dir of commission {id}");
    }

    // The same commission on the task runner gives the same result, byte for byte.
    let mut t = Harness::new("builtin-task");
    t.start(config("", &[("use_job_controller", "false")]));
    let id = t.create("commission", ctx_json, 1);
    let tc = t.wait_terminal(id, LONG);
    assert_eq!(tc.state, State::Completed, "{tc:#?}");
    assert_eq!(tc.result, c.result);
    assert_eq!(t.jobs(id)[0].executor, Executor::TaskRunner);
    let png2 = std::fs::read(t.layout().artifacts().join(format!("{hash}.png"))).expect("same artifact");
    assert_eq!(png, png2);

    let m = h.controller().metrics_text();
    for name in [
        "atelier_jobs_started_total{executor=\"job_controller\"} 2",
        "atelier_jobs_finished_total{executor=\"job_controller\",outcome=\"succeeded\"} 2",
        "atelier_job_duration_seconds_count{executor=\"job_controller\"} 2",
        "atelier_jobs_running{executor=\"job_controller\"} 0",
        "atelier_job_spawn_seconds_count 2",
        "atelier_job_max_rss_bytes_count 2",
        "atelier_job_max_rss_bytes_bucket{le=\"4294967296\"} 2",
        "atelier_progress_events_coalesced_total",
        "atelier_executor_routing{executor=\"job_controller\"} 2",
        "atelier_rollback_active 0",
        "atelier_rollbacks_total{reason=\"slow\"} 0",
    ] {
        assert!(m.contains(name), "metrics lack {name}:\n{m}");
    }
}

/// Pipelines whose worker misbehaves in one way each.
const FAULTS: &str = r#"
[pipelines.f-sigkill]
worker_args = ["--behave", "sigkill"]
[pipelines.f-abort]
worker_args = ["--behave", "abort"]
[pipelines.f-segv]
worker_args = ["--behave", "segfault"]
[pipelines.f-forkbomb]
worker_args = ["--behave", "fork-bomb"]
nproc_max = 64
timeout_seconds = 3
[pipelines.f-oom]
worker_args = ["--behave", "oom"]
memory_mb = 128
memory_max_mb = 256
[pipelines.f-spin]
worker_args = ["--behave", "spin"]
cpu_seconds = 1
[pipelines.f-hang]
worker_args = ["--behave", "hang"]
timeout_seconds = 1
[pipelines.f-silent]
worker_args = ["--behave", "no-heartbeat"]
heartbeat_timeout_ms = 400
[pipelines.f-garbage]
worker_args = ["--behave", "garbage"]
[pipelines.f-huge]
worker_args = ["--behave", "huge-line"]
[pipelines.f-order]
worker_args = ["--behave", "out-of-order"]
[pipelines.f-noresult]
worker_args = ["--behave", "no-result"]
[pipelines.f-exit]
worker_args = ["--behave", "exit-nonzero"]
[pipelines.f-orphan]
worker_args = ["--behave", "fork-orphan"]
[pipelines.f-flood]
worker_args = ["--behave", "flood"]
[pipelines.f-missing]
command = ["/nonexistent/worker"]
[pipelines.ext]
command = ["sh", "-c", '''cat >/dev/null; for s in generating_ideas creating_images uploading creating_products; do printf '{"type":"stage","stage":"%s"}\n' $s >&3; done; printf '{"type":"result","result":{"job":"%s","path":"%s"}}\n' "$ATELIER_JOB_ID" "$PATH" >&3''']
env = { PATH = "/usr/bin:/bin" }
[pipelines.f-sh]
command = ["sh", "-c", "echo '{\"type\":\"stage\",\"stage\":\"generating_ideas\"}' >&3; echo oops >&2; exit 4"]
"#;

#[test]
fn fault_matrix() {
    let mut h = Harness::new("faults");
    h.start(config(FAULTS, &[("max_concurrent_jobs", "4"), ("heartbeat_timeout_ms", "10000")]));
    // (pipeline, context, attempts allowed, final state, attempts used, last job status, error contains)
    let cases: Vec<(&str, serde_json::Value, u32, State, usize, JobStatus, &str)> = vec![
        ("f-sigkill", serde_json::json!({}), 2, State::Failed, 2, JobStatus::Killed, "killed by SIGKILL"),
        ("f-abort", serde_json::json!({}), 1, State::Failed, 1, JobStatus::Killed, "killed by SIGABRT"),
        ("f-segv", serde_json::json!({}), 2, State::Failed, 2, JobStatus::Killed, "killed by SIGSEGV"),
        (
            "f-oom",
            serde_json::json!({}),
            3,
            State::Failed,
            2,
            JobStatus::Killed,
            "memory limit exceeded (256 MiB, the cap)",
        ),
        ("f-spin", serde_json::json!({}), 2, State::Failed, 1, JobStatus::Killed, "CPU limit exceeded (1 s)"),
        ("f-hang", serde_json::json!({}), 1, State::Failed, 1, JobStatus::TimedOut, "timed out after 1 s"),
        (
            "f-silent",
            serde_json::json!({}),
            2,
            State::Failed,
            2,
            JobStatus::TimedOut,
            "stalled: no protocol line for 400 ms",
        ),
        (
            "f-garbage",
            serde_json::json!({}),
            2,
            State::Failed,
            1,
            JobStatus::Failed,
            "protocol error: malformed line \"this is not json\"",
        ),
        ("f-huge", serde_json::json!({}), 1, State::Failed, 1, JobStatus::Failed, "-byte limit"),
        (
            "f-order",
            serde_json::json!({}),
            1,
            State::Failed,
            1,
            JobStatus::Failed,
            "out of order: stage creating_images first",
        ),
        (
            "f-noresult",
            serde_json::json!({}),
            1,
            State::Failed,
            1,
            JobStatus::Failed,
            "exited 0 without a result",
        ),
        ("f-exit", serde_json::json!({}), 2, State::Failed, 2, JobStatus::Failed, "exited with code 7"),
        ("ext", serde_json::json!({}), 1, State::Completed, 1, JobStatus::Succeeded, ""),
        ("f-orphan", serde_json::json!({}), 1, State::Completed, 1, JobStatus::Succeeded, ""),
        (
            "f-flood",
            serde_json::json!({}),
            1,
            State::Failed,
            1,
            JobStatus::Failed,
            "flooding: over 10000 protocol lines in one second",
        ),
        (
            "f-missing",
            serde_json::json!({}),
            1,
            State::Failed,
            1,
            JobStatus::Failed,
            "could not start the worker program",
        ),
        (
            "f-sh",
            serde_json::json!({}),
            1,
            State::Failed,
            1,
            JobStatus::Failed,
            "exited with code 4; stderr: oops",
        ),
        (
            "fail",
            serde_json::json!({}),
            2,
            State::Failed,
            1,
            JobStatus::Failed,
            "the fail pipeline always fails",
        ),
        (
            "commission",
            serde_json::json!({"fail": "permanent"}),
            3,
            State::Failed,
            1,
            JobStatus::Failed,
            "asked to fail (permanent)",
        ),
        (
            "commission",
            serde_json::json!({"fail": "retryable", "fail_attempts": 1}),
            3,
            State::Completed,
            2,
            JobStatus::Succeeded,
            "",
        ),
    ];
    let bomb = h.create("f-forkbomb", serde_json::json!({}), 1);
    let ids: Vec<u64> = cases.iter().map(|(p, ctx, n, ..)| h.create(p, ctx.clone(), *n)).collect();
    for (id, (pipeline, _, _, state, attempts, status, error)) in ids.iter().zip(&cases) {
        let c = h.wait_terminal(*id, LONG);
        let jobs = h.jobs(*id);
        let last = jobs.last().expect("a job ran");
        let what = format!("{pipeline}: {c:#?}\n{jobs:#?}");
        assert_eq!(c.state, *state, "{what}");
        assert_eq!(jobs.len(), *attempts, "{what}");
        assert_eq!(last.status, *status, "{what}");
        let msg = last.error_message.clone().unwrap_or_default();
        assert!(msg.contains(error), "{pipeline}: error {msg:?} should contain {error:?}");
        if *state == State::Failed {
            assert_eq!(c.error.as_deref(), Some(msg.as_str()));
        }
        for j in &jobs {
            assert_clean(j);
        }
    }
    // What a worker prints is kept in its job's logs.
    let sh = ids[cases.iter().position(|c| c.0 == "f-sh").expect("f-sh case")];
    let (_, err) = h.layout().job_logs(h.jobs(sh)[0].job_id);
    assert_eq!(std::fs::read_to_string(err).expect("stderr.log"), "oops\n");
    // An external job program gets its job id and the pipeline's environment.
    let ext = ids[cases.iter().position(|c| c.0 == "ext").expect("ext case")];
    let r = result_json(&h.get(ext));
    assert_eq!(r["job"], h.jobs(ext)[0].job_id.to_string());
    assert_eq!(r["path"], "/usr/bin:/bin");
    // The memory limit doubled for the retry, and said so.
    let oom_jobs = h.jobs(ids[cases.iter().position(|c| c.0 == "f-oom").expect("f-oom case")]);
    assert!(
        oom_jobs[0]
            .error_message
            .as_deref()
            .is_some_and(|e| e.contains("(128 MiB); the next attempt gets 256 MiB")),
        "{oom_jobs:#?}"
    );
    // A signal's number is recorded too.
    assert_eq!(h.jobs(ids[0])[0].signal, Some(9));
    // A fork bomb: the job cgroup's pids.max or RLIMIT_NPROC (64) stops it; root is not
    // bound by RLIMIT_NPROC, so without a cgroup the worker's own bound (256 children) does
    // and the wall timeout ends the job. Either way the whole group is gone afterwards.
    // (`the_process_limit_stops_a_forking_worker` shows the limit binding, also as root.)
    let c = h.wait_terminal(bomb, LONG);
    let jobs = h.jobs(bomb);
    let last = jobs.last().expect("the bomb ran");
    let msg = last.error_message.clone().unwrap_or_default();
    assert_eq!(c.state, State::Failed, "{c:#?}");
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    if unsafe { libc::geteuid() } == 0 && h.controller().job_cgroup_parents().is_empty() {
        assert_eq!((last.status, msg.contains("timed out after 3 s")), (JobStatus::TimedOut, true), "{msg}");
    } else {
        assert_eq!((last.status, msg.contains("fork failed after")), (JobStatus::Failed, true), "{msg}");
    }
    assert_clean(last);
    // The server still works after all that.
    let ok = h.create("noop", serde_json::json!({}), 1);
    assert_eq!(h.wait_terminal(ok, LONG).state, State::Completed);
}

#[test]
fn a_pipelines_output_is_cut_at_its_own_cap() {
    let mut h = Harness::new("logcap");
    let chatty = r#"
[pipelines.chatty]
log_bytes_max = 1000
command = ["sh", "-c", '''cat >/dev/null; head -c 5000 /dev/zero | tr '\0' x; for s in generating_ideas creating_images uploading creating_products; do printf '{"type":"stage","stage":"%s"}\n' $s >&3; done; printf '{"type":"result","result":{}}\n' >&3''']
"#;
    h.start(config(chatty, &[("log_bytes_max", "100000")]));
    let id = h.create("chatty", serde_json::json!({}), 1);
    assert_eq!(h.wait_terminal(id, LONG).state, State::Completed);
    let (out, _) = h.layout().job_logs(h.jobs(id)[0].job_id);
    let log = std::fs::read_to_string(out).expect("stdout.log");
    assert_eq!(log, format!("{}\n[atelier: output cut at 1000 bytes]\n", "x".repeat(1000)));
}

#[test]
fn cancel_while_running() {
    let mut h = Harness::new("cancel");
    h.start(config(
        "[pipelines.stubborn]\nworker_args = [\"--behave\", \"ignore-term\"]\n",
        &[("kill_grace_ms", "300")],
    ));
    let slow = h.create("noop", serde_json::json!({"delay_ms": 20000}), 1);
    let stubborn = h.create("stubborn", serde_json::json!({}), 1);
    for id in [slow, stubborn] {
        h.wait_until(id, LONG, "in a stage", |c| c.state.stage().is_some());
        let asked = Instant::now();
        execute(&*h.store, id, Command::RequestCancel, &ctx())
            .expect("store works")
            .expect("cancel accepted");
        let c = h.wait_terminal(id, Duration::from_secs(5));
        assert_eq!(c.state, State::Cancelled, "{c:#?}");
        assert!(asked.elapsed() < Duration::from_secs(3), "cancel took {:?}", asked.elapsed());
        let jobs = h.jobs(id);
        assert_eq!(jobs[0].status, JobStatus::Killed, "{jobs:#?}");
        assert_clean(&jobs[0]);
    }
    // The stubborn one ignored SIGTERM and needed the SIGKILL.
    assert_eq!(h.jobs(stubborn)[0].signal, Some(9));
    assert_eq!(h.jobs(slow)[0].signal, Some(15));
}

/// Pipelines whose worker runs into one rlimit each (python3 and sh, on the PATH they are
/// given).
const LIMITS: &str = r#"
[pipelines.l-nofile]
nofile_max = 16
env = { PATH = "/usr/bin:/bin" }
command = ["python3", "-c", "import os\nfds = [os.open('/dev/null', os.O_RDONLY) for _ in range(64)]"]
[pipelines.l-fsize]
fsize_mb = 1
env = { PATH = "/usr/bin:/bin" }
command = ["sh", "-c", "exec head -c 2000000 /dev/zero > big"]
[pipelines.l-core]
env = { PATH = "/usr/bin:/bin" }
command = ["python3", "-c", "import ctypes, resource, sys\nsys.stderr.write('core limit %r\\n' % (resource.getrlimit(resource.RLIMIT_CORE),))\nsys.stderr.flush()\nctypes.string_at(0)"]
"#;

/// RLIMIT_NOFILE, RLIMIT_FSIZE and RLIMIT_CORE, each run into by a worker, end the job as
/// workers/README.md's table says: too many open files is the worker's own non-zero exit
/// (retryable, its last stderr line kept), SIGXFSZ is "file size limit exceeded" (not
/// retryable), and a crash leaves no core file behind (the worker sees a core limit of 0 it
/// cannot raise) and counts as a signal (retryable).
#[test]
fn rlimits_end_jobs_as_the_table_says() {
    // A core dump would land in the crashing worker's working dir (its job dir) when the
    // kernel writes plain `core` files; let the test process allow them, so that only the
    // worker's own limit can prevent one.
    // SAFETY: getrlimit/setrlimit on this process's own limits, with a valid struct.
    unsafe {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        assert_eq!(libc::getrlimit(libc::RLIMIT_CORE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_CORE, &lim), 0);
    }
    let mut h = Harness::new("limits");
    h.start(config(LIMITS, &[("max_concurrent_jobs", "3")]));
    let nofile = h.create("l-nofile", serde_json::json!({}), 2);
    let fsize = h.create("l-fsize", serde_json::json!({}), 2);
    let core = h.create("l-core", serde_json::json!({}), 2);

    let c = h.wait_terminal(nofile, LONG);
    let jobs = h.jobs(nofile);
    assert_eq!((c.state, jobs.len()), (State::Failed, 2), "retryable: {jobs:#?}");
    let msg = jobs[1].error_message.clone().unwrap_or_default();
    assert_eq!(jobs[1].status, JobStatus::Failed, "{jobs:#?}");
    assert!(
        msg.starts_with("the worker exited with code 1; stderr: OSError: [Errno 24] Too many open files"),
        "{msg}"
    );

    let c = h.wait_terminal(fsize, LONG);
    let jobs = h.jobs(fsize);
    assert_eq!((c.state, jobs.len()), (State::Failed, 1), "not retryable: {jobs:#?}");
    assert_eq!((jobs[0].status, jobs[0].signal), (JobStatus::Killed, Some(libc::SIGXFSZ)), "{jobs:#?}");
    assert_eq!(jobs[0].error_message.as_deref(), Some("file size limit exceeded, killed by SIGXFSZ"));
    let big = h.layout().job(jobs[0].job_id).join("big");
    assert_eq!(std::fs::metadata(&big).expect("the file it wrote").len(), 1024 * 1024);

    let c = h.wait_terminal(core, LONG);
    let jobs = h.jobs(core);
    assert_eq!((c.state, jobs.len()), (State::Failed, 2), "retryable: {jobs:#?}");
    for j in &jobs {
        let dir = h.layout().job(j.job_id);
        let cores: Vec<_> = std::fs::read_dir(&dir)
            .expect("the job dir")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("core"))
            .collect();
        assert!(cores.is_empty(), "core files in {}: {cores:?}", dir.display());
        assert_eq!((j.status, j.signal), (JobStatus::Killed, Some(libc::SIGSEGV)), "{jobs:#?}");
        assert_eq!(j.error_message.as_deref(), Some("killed by SIGSEGV; stderr: core limit (0, 0)"));
        let (_, err) = h.layout().job_logs(j.job_id);
        let err = std::fs::read_to_string(err).expect("stderr.log");
        assert_eq!(err.lines().next(), Some("core limit (0, 0)"), "{err}");
    }
    for id in [nofile, fsize, core] {
        for j in &h.jobs(id) {
            assert_clean(j);
        }
    }
}

/// A worker that forks until it cannot (at most 200 children, each sleeping in its group).
const FORKER: &str = "import os, sys, time\nn = 0\ntry:\n    for _ in range(200):\n        if os.fork() == 0:\n            time.sleep(30)\n            os._exit(0)\n        n += 1\nexcept OSError as e:\n    sys.stderr.write('fork failed after %d: %s\\n' % (n, e))\n    sys.exit(3)\nsys.stderr.write('forked %d\\n' % n)\nsys.exit(4)";

/// RLIMIT_NPROC binds: a worker forking 200 children stops at `nproc_max`. The limit counts
/// the processes of the worker's user and does not bind root, so as root the worker first
/// becomes `nobody` (setpriv, which keeps the limits the trampoline set).
#[test]
fn the_process_limit_stops_a_forking_worker() {
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    let root = unsafe { libc::geteuid() } == 0;
    let mut command = vec!["python3", "-c", FORKER];
    if root {
        command.splice(0..0, ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]);
    }
    let mut h = Harness::new("nproc");
    h.start(config(&forker_pipeline(&command), &[]));
    assert_forking_stopped(&h);
}

/// The `forker` pipeline: `command` under `nproc_max = 16`.
fn forker_pipeline(command: &[&str]) -> String {
    // A JSON array of strings is a TOML array too.
    let command = serde_json::to_string(command).expect("strings serialize");
    format!("[pipelines.forker]\nnproc_max = 16\nenv = {{ PATH = \"/usr/bin:/bin\" }}\ncommand = {command}\n")
}

/// Runs a `forker` job and checks that its forks failed before the limit of 16 (the worker
/// itself is one of them).
fn assert_forking_stopped(h: &Harness) {
    let id = h.create("forker", serde_json::json!({}), 1);
    let c = h.wait_terminal(id, LONG);
    let jobs = h.jobs(id);
    let msg = jobs[0].error_message.clone().unwrap_or_default();
    assert_eq!((c.state, jobs[0].status), (State::Failed, JobStatus::Failed), "{jobs:#?}");
    let forked: u32 = msg
        .strip_prefix("the worker exited with code 3; stderr: fork failed after ")
        .and_then(|rest| rest.split(':').next()?.parse().ok())
        .unwrap_or_else(|| panic!("the worker did not run into the limit: {msg}"));
    assert!(forked < 16, "{forked} children under nproc_max = 16: {msg}");
    assert!(msg.contains("Resource temporarily unavailable"), "{msg}");
    assert_clean(&jobs[0]);
}

/// Whether a process is still there, other than as a zombie waiting to be reaped.
fn alive(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|(state, _)| state != 'Z')
}

/// Cancel ends the worker's whole process group: a child and a grandchild it started (which
/// do not answer for themselves) are gone with it.
#[test]
fn cancel_kills_the_workers_children_and_grandchildren() {
    let family = r#"
[pipelines.family]
env = { PATH = "/usr/bin:/bin" }
command = ["sh", "-c", '''printf '{"type":"stage","stage":"generating_ideas"}\n' >&3; sleep 300 & echo "child $!" >&2; sh -c 'sleep 300 & echo "grandchild $!" >&2; wait' & echo "child $!" >&2; wait''']
"#;
    let mut h = Harness::new("cancel-family");
    h.start(config(family, &[("kill_grace_ms", "300")]));
    let id = h.create("family", serde_json::json!({}), 1);
    h.wait_until(id, LONG, "in a stage", |c| c.state.stage().is_some());
    let job = h.jobs(id)[0].clone();
    let (_, err) = h.layout().job_logs(job.job_id);
    let pids: Vec<u32> = wait_for_lines(&err, 3)
        .iter()
        .map(|l| l.rsplit(' ').next().and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("{l:?}")))
        .collect();
    let worker = job.process_id.expect("the worker's pid");
    for pid in pids.iter().copied().chain([worker]) {
        assert!(alive(pid), "{pid} runs before the cancel");
    }
    execute(&*h.store, id, Command::RequestCancel, &ctx()).expect("store works").expect("cancel accepted");
    assert_eq!(h.wait_terminal(id, Duration::from_secs(5)).state, State::Cancelled);
    let end = Instant::now() + Duration::from_secs(3);
    while pids.iter().any(|p| alive(*p)) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    let left: Vec<u32> = pids.iter().copied().filter(|p| alive(*p)).collect();
    assert!(left.is_empty(), "left running after the cancel: {left:?} (of {pids:?})");
    assert_clean(&h.jobs(id)[0]);
}

/// The first `n` lines of a file another process is writing, once they are there.
fn wait_for_lines(path: &Path, n: usize) -> Vec<String> {
    let end = Instant::now() + LONG;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(Instant::now() < end, "{} has {} of {n} lines: {text:?}", path.display(), lines.len());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn concurrency_limit_and_priority_order() {
    let mut h = Harness::new("burst");
    // Queued before the controller starts, so the start-up scan sees them all at once.
    let low: Vec<u64> =
        (0..3).map(|_| h.create_full("noop", serde_json::json!({"delay_ms": 150}), 1, 0, None)).collect();
    let high: Vec<u64> =
        (0..2).map(|_| h.create_full("noop", serde_json::json!({"delay_ms": 150}), 1, 5, None)).collect();
    h.start(config("", &[("max_concurrent_jobs", "1")]));
    for id in low.iter().chain(&high) {
        assert_eq!(h.wait_terminal(*id, LONG).state, State::Completed);
    }
    let order: Vec<u64> = started_order(&*h.store);
    let expected: Vec<u64> = high.iter().chain(&low).copied().collect();
    assert_eq!(order, expected, "highest priority first, then oldest");
    drop(h);

    // A burst: never more than max_concurrent_jobs at once.
    let mut h = Harness::new("burst2");
    h.start(config("", &[("max_concurrent_jobs", "2")]));
    let ids: Vec<u64> = (0..8).map(|_| h.create("noop", serde_json::json!({"delay_ms": 100}), 1)).collect();
    for id in &ids {
        assert_eq!(h.wait_terminal(*id, LONG).state, State::Completed);
    }
    let (mut running, mut peak) = (0i32, 0i32);
    for env in h.store.read_log(0, 10_000).expect("log") {
        match env.event {
            Event::JobStarted { .. } => running += 1,
            Event::JobFinished(_) => running -= 1,
            _ => {}
        }
        peak = peak.max(running);
    }
    assert!((1..=2).contains(&peak), "peak {peak}");
}

fn started_order(store: &dyn EventStore) -> Vec<u64> {
    store
        .read_log(0, 10_000)
        .expect("log")
        .into_iter()
        .filter(|e| matches!(e.event, Event::JobStarted { .. }))
        .map(|e| e.commission_id)
        .collect()
}

#[test]
fn restart_kills_leftovers_and_retries() {
    let mut h = Harness::new("restart");
    let id = h.create("noop", serde_json::json!({}), 3);
    // A "previous server" started a job whose process is still around.
    let job_id = h.store.allocate_job_id().expect("job id");
    let leftover = std::os::unix::process::CommandExt::process_group(
        std::process::Command::new("sleep").arg("1000").env("ATELIER_JOB_ID", job_id.to_string()),
        0,
    )
    .spawn()
    .expect("spawn sleep");
    let pid = leftover.id();
    let start = Command::StartJob {
        job_id,
        executor: Executor::JobController,
        job_name: "noop".into(),
        pid: Some(pid),
    };
    execute(&*h.store, id, start, &ctx()).expect("store").expect("started");
    execute(
        &*h.store,
        id,
        Command::EnterStage { job_id, stage: atelier_engine::Stage::GeneratingIdeas },
        &ctx(),
    )
    .expect("store")
    .expect("stage");
    h.start(config("", &[]));
    let c = h.wait_terminal(id, LONG);
    assert_eq!(c.state, State::Completed, "{c:#?}");
    let jobs = h.jobs(id);
    assert_eq!(jobs[0].error_message.as_deref(), Some("server restarted"));
    assert_eq!(jobs.len(), 2);
    // Killed (then reaped by us, its parent, since this test spawned it).
    let mut leftover = leftover;
    let status = leftover.wait().expect("wait");
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9));
}

#[test]
fn progress_is_coalesced_but_stages_and_results_are_not() {
    let mut h = Harness::new("coalesce");
    let mut cfg = config("", &[]);
    cfg.progress_update_interval_ms = 1000;
    h.start(cfg);
    let id = h.create("noop", serde_json::json!({"progress_steps": 500}), 1);
    assert_eq!(h.wait_terminal(id, LONG).state, State::Completed);
    let events = h.store.events_of(id).expect("events");
    let stages = events.iter().filter(|e| matches!(e.event, Event::StageEntered { .. })).count();
    assert_eq!(stages, 4);
    for stage in atelier_engine::Stage::ALL {
        let progress: Vec<u8> = events
            .iter()
            .filter_map(|e| match &e.event {
                Event::Progress { stage: s, percent, .. } if *s == stage => Some(*percent),
                _ => None,
            })
            .collect();
        // The first report goes out at once; the rest is one pending report flushed before
        // the next stage, and it is the latest (100 %).
        assert!(!progress.is_empty() && progress.len() <= 2, "{stage}: {progress:?}");
        assert_eq!(progress.last(), Some(&100), "{stage}: {progress:?}");
    }
    let m = h.controller().metrics_text();
    let coalesced: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("atelier_progress_events_coalesced_total "))
        .and_then(|v| v.parse().ok())
        .expect("metric present");
    assert!(coalesced >= 4 * 400, "coalesced {coalesced}");
}

#[test]
fn spawn_failure_rolls_back_to_the_task_runner() {
    let mut h = Harness::new("rollback");
    h.start_with_exe(
        config("", &[("auto_rollback", "true")]),
        Path::new("/nonexistent/atelier").to_path_buf(),
    );
    let id = h.create("noop", serde_json::json!({}), 2);
    let c = h.wait_terminal(id, LONG);
    assert_eq!(c.state, State::Completed, "{c:#?}");
    let jobs = h.jobs(id);
    assert_eq!(jobs.len(), 2, "{jobs:#?}");
    assert_eq!((jobs[0].executor, jobs[0].process_id), (Executor::JobController, None));
    assert!(jobs[0].error_message.as_deref().is_some_and(|e| e.contains("could not spawn")), "{jobs:#?}");
    assert_eq!(jobs[1].executor, Executor::TaskRunner);
    let m = h.controller().metrics_text();
    assert!(m.contains("atelier_rollback_active 1"), "{m}");
    assert!(m.contains("atelier_rollbacks_total{reason=\"spawn_failed\"} 1"), "{m}");
    assert!(m.contains("atelier_executor_routing{executor=\"task_runner\"} 1"), "{m}");
}

#[test]
fn scheduled_commissions_wait_for_their_time() {
    let mut h = Harness::new("scheduled");
    h.start(config("", &[]));
    let at = now_ms() + 400;
    let id = h.create_full("noop", serde_json::json!({}), 1, 0, Some(at));
    let c = h.wait_terminal(id, LONG);
    assert_eq!(c.state, State::Completed);
    let started = h.jobs(id)[0].started_at.expect("started");
    assert!(started >= at, "started {started} before {at}");
}

#[test]
fn failure_rate_rolls_back_to_the_task_runner() {
    let mut h = Harness::new("failrate");
    h.start(config(
        "[pipelines.f-exit]\nworker_args = [\"--behave\", \"exit-nonzero\"]\n",
        &[
            ("auto_rollback", "true"),
            ("rollback_min_jobs", "2"),
            ("rollback_window_jobs", "10"),
            ("max_concurrent_jobs", "1"),
        ],
    ));
    for _ in 0..2 {
        let id = h.create("f-exit", serde_json::json!({}), 1);
        assert_eq!(h.wait_terminal(id, LONG).state, State::Failed);
    }
    let m = h.controller().metrics_text();
    assert!(m.contains("atelier_rollback_active 1"), "{m}");
    assert!(m.contains("atelier_rollbacks_total{reason=\"failure_rate\"} 1"), "{m}");
    let id = h.create("noop", serde_json::json!({}), 1);
    assert_eq!(h.wait_terminal(id, LONG).state, State::Completed);
    assert_eq!(h.jobs(id)[0].executor, Executor::TaskRunner);
}

#[test]
fn shutdown_stops_jobs_and_a_new_controller_finishes_them() {
    let mut h = Harness::new("shutdown");
    h.start(config("", &[]));
    let id = h.create("noop", serde_json::json!({"delay_ms": 20000}), 3);
    h.wait_until(id, LONG, "in a stage", |c| c.state.stage().is_some());
    let began = Instant::now();
    h.controller.take().expect("started").shutdown();
    assert!(began.elapsed() < Duration::from_secs(5), "shutdown took {:?}", began.elapsed());
    let c = h.get(id);
    assert_eq!(c.state, State::Retrying, "{c:#?}");
    let jobs = h.jobs(id);
    assert_eq!(jobs[0].error_message.as_deref(), Some("server shut down"));
    assert_clean(&jobs[0]);
    // The next server picks it up (without the delay this time it would be instant; with it,
    // cancel to keep the test short).
    h.start(config("", &[]));
    h.wait_until(id, LONG, "running again", |c| c.state.stage().is_some());
    execute(&*h.store, id, Command::RequestCancel, &ctx()).expect("store").expect("cancel");
    assert_eq!(h.wait_terminal(id, LONG).state, State::Cancelled);
    assert_eq!(h.jobs(id).len(), 2);
}

const SHOP: &str = r#"
[pipelines.shop]
memory_mb = 256
stages.generating_ideas = { command = ["sh", "-c", '''cat >/dev/null; echo '{"type":"progress","stage":"generating_ideas","percent":50,"message":"thinking"}'; echo '{"type":"result","result":{"ideas":[{"title":"Shell mug","pitch":"Made by sh"}]}}' '''] }
stages.uploading = { builtin = "artifact_store" }
[pipelines.rude]
stages.generating_ideas = { command = ["sh", "-c", '''echo '{"type":"stage","stage":"creating_images"}' '''] }
"#;

#[test]
fn stage_commands_speak_the_protocol_on_stdout() {
    let mut h = Harness::new("stagecmd");
    h.start(config(SHOP, &[]));
    let id = h.create("shop", serde_json::json!({"title": "ignored by the command"}), 1);
    let rude = h.create("rude", serde_json::json!({}), 1);
    let c = h.wait_terminal(id, LONG);
    assert_eq!(c.state, State::Completed, "{c:#?}");
    let r = result_json(&c);
    assert_eq!(r["product"]["title"], "Shell mug", "{r}");
    assert_eq!(r["product"]["description"], "Made by sh", "{r}");
    let relayed = h.store.events_of(id).expect("events").iter().any(
        |e| matches!(&e.event, Event::Progress { percent: 50, message: Some(m), .. } if m == "thinking"),
    );
    assert!(relayed, "the command's progress reached the log");
    let c = h.wait_terminal(rude, LONG);
    assert_eq!(c.state, State::Failed);
    assert!(c.error.as_deref().is_some_and(|e| e.contains("printed a 'stage' line")), "{c:#?}");
}

/// A pipeline that runs programs goes to the job controller even when the router picks the
/// task runner (here by priority, as during a rollback), and runs there.
#[test]
fn a_pipeline_that_runs_programs_goes_to_the_job_controller() {
    let mut h = Harness::new("stagecmd-routed");
    h.start(config(SHOP, &[("task_runner_priority", "20")]));
    let id = h.create("shop", serde_json::json!({}), 1);
    assert_eq!(h.wait_terminal(id, LONG).state, State::Completed);
    assert_eq!(h.jobs(id)[0].executor, Executor::JobController);
    let noop = h.create("noop", serde_json::json!({}), 1);
    assert_eq!(h.wait_terminal(noop, LONG).state, State::Completed);
    assert_eq!(h.jobs(noop)[0].executor, Executor::TaskRunner, "the rest still goes where the router says");
}

/// The task runner runs no programs: a pipeline with a command stage is refused there with
/// the reason, for good when there is no job controller to run it (retryable otherwise, so
/// it waits out a rollback), and the command never runs.
#[test]
fn the_task_runner_refuses_command_stages() {
    let mut h = Harness::new("stagecmd-runner");
    let marker = h.dir.path().join("ran");
    let pipelines = format!(
        "[pipelines.cmd]\nstages.generating_ideas = {{ command = [\"sh\", \"-c\", \"touch {}\"] }}\n",
        marker.display()
    );
    h.start(config(&pipelines, &[("use_job_controller", "false")]));
    let id = h.create("cmd", serde_json::json!({}), 3);
    let c = h.wait_terminal(id, LONG);
    assert_eq!(c.state, State::Failed, "{c:#?}");
    let jobs = h.jobs(id);
    assert_eq!(jobs.len(), 1, "not retried without a job controller: {jobs:#?}");
    assert_eq!(jobs[0].executor, Executor::TaskRunner);
    assert_eq!(
        jobs[0].error_message.as_deref(),
        Some(
            "the task runner does not run pipeline 'cmd': it runs a command in stage generating_ideas, \
             and the task runner runs no programs (they would run without a worker's user, limits \
             or cleared environment); it runs on the job controller"
        )
    );
    assert!(!marker.exists(), "the command ran");
    let noop = h.create("noop", serde_json::json!({}), 1);
    assert_eq!(h.wait_terminal(noop, LONG).state, State::Completed, "built-in steps still run there");
}

/// posix_spawn, not fork: spawning stays cheap however big the server is.
#[test]
fn spawn_cost_does_not_grow_with_server_memory() {
    // 1 GiB, touched, so a fork would have to copy its page tables (~40 ms).
    let ballast: Vec<u8> = vec![1u8; 1 << 30];
    let mut h = Harness::new("spawncost");
    h.start(config("", &[("max_concurrent_jobs", "1")]));
    let ids: Vec<u64> = (0..3).map(|_| h.create("noop", serde_json::json!({}), 1)).collect();
    for id in ids {
        assert_eq!(h.wait_terminal(id, LONG).state, State::Completed);
    }
    let m = h.controller().metrics_text();
    let value = |name: &str| -> f64 {
        m.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .expect("metric present")
    };
    let mean = value("atelier_job_spawn_seconds_sum ") / value("atelier_job_spawn_seconds_count ");
    assert!(
        mean < 0.020,
        "mean spawn {mean} s with {} bytes of ballast",
        std::hint::black_box(&ballast).len()
    );
}

/// The server dies by SIGKILL mid-job: its worker dies with it (PDEATHSIG), and the next
/// server fails the orphaned attempt as "server restarted" and runs it again.
#[test]
fn server_crash_kills_workers_and_restart_recovers() {
    use std::io::BufRead;
    let dir = temp_dir("crash");
    let mut server = std::process::Command::new(EXE)
        .args(["__crash-test-server", &dir.path().display().to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start the crash test server");
    let mut line = String::new();
    let stdout = server.stdout.take().expect("piped");
    std::io::BufReader::new(stdout).read_line(&mut line).expect("server reports its job");
    let words: Vec<&str> = line.split_whitespace().collect();
    let (id, pid): (u64, u32) = match words.as_slice() {
        ["commission", id, "pid", pid] => (id.parse().expect("id"), pid.parse().expect("pid")),
        _ => panic!("unexpected line {line:?}"),
    };
    assert!(proc_stat(pid).is_some_and(|(s, _)| s != 'Z'), "worker {pid} runs");
    server.kill().expect("SIGKILL the server");
    server.wait().expect("reap the server");
    let end = Instant::now() + Duration::from_secs(5);
    while proc_stat(pid).is_some_and(|(s, _)| s != 'Z') {
        assert!(Instant::now() < end, "worker {pid} outlived its server");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Restart on the same data with a pipeline of the same name that does not hang.
    let store = SledStore::open(StoreConfig::new(dir.path().join("store"))).expect("reopen store");
    let mut h = Harness { store, controller: None, dir };
    let stages = "[pipelines.crashy]\nstages.generating_ideas = { builtin = \"noop\" }\nstages.creating_images = { builtin = \"noop\" }\nstages.uploading = { builtin = \"noop\" }\nstages.creating_products = { builtin = \"noop\" }\n";
    h.start(config(stages, &[]));
    let c = h.wait_terminal(id, LONG);
    assert_eq!(c.state, State::Completed, "{c:#?}");
    let jobs = h.jobs(id);
    assert_eq!(jobs.len(), 2, "{jobs:#?}");
    assert_eq!(jobs[0].error_message.as_deref(), Some("server restarted"));
}

#[test]
fn finished_jobs_dirs_are_swept_after_the_keep_time() {
    let mut h = Harness::new("janitor");
    h.start(config("", &[]));
    // A job that puts something in its dir (the rendered image): a noop job has none.
    let done = h.create("commission", serde_json::json!({"title": "t"}), 1);
    h.wait_until(done, Duration::from_secs(20), "completed", |c| c.state == State::Completed);
    let job = h.jobs(done)[0].clone();
    h.controller().shutdown();
    let jobs_dir = h.layout().jobs();
    let finished_dir = jobs_dir.join(job.job_id.to_string());
    assert!(finished_dir.is_dir(), "a finished job keeps its dir until it is due");
    // A dir whose job is not in the log: fresh (a job about to start) and stale (its
    // commission was pruned by retention).
    let fresh = jobs_dir.join("900001");
    let stale = jobs_dir.join("900002");
    std::fs::create_dir_all(&fresh).unwrap();
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::create_dir_all(jobs_dir.join("notes")).unwrap();
    std::fs::File::open(jobs_dir.join("notes")).unwrap().set_modified(SystemTime::UNIX_EPOCH).unwrap();
    let long_ago = SystemTime::now() - atelier_workers::janitor::ORPHAN_DIR_GRACE - Duration::from_secs(60);
    std::fs::File::open(&stale).unwrap().set_modified(long_ago).unwrap();
    let keep = Duration::from_secs(86_400);
    let ended = job.completed_at.expect("the job ended");

    // Not yet due: everything stays, except the stale orphan.
    let s = atelier_workers::janitor::sweep(&*h.store, &h.layout(), keep, ended + 3_600_000).unwrap();
    assert_eq!((s.removed, s.kept), (1, 2), "{s:?}");
    assert!(finished_dir.exists() && fresh.exists() && !stale.exists());
    // A day and a bit after the end the finished job's dir goes; the fresh orphan stays.
    let s = atelier_workers::janitor::sweep(&*h.store, &h.layout(), keep, ended + 86_400_000 + 1).unwrap();
    assert_eq!((s.removed, s.kept), (1, 1), "{s:?}");
    assert!(!finished_dir.exists() && fresh.exists());
    assert!(jobs_dir.join("notes").exists(), "what is not a job's dir is not the sweep's");
    assert!(h.store.job(job.job_id).unwrap().is_some(), "the job record itself stays in the log");
}

/// The trampoline drops to the worker user for good before the worker runs: its uid and gid,
/// and none of the caller's supplementary groups (a root server's groups would open their
/// files to every job).
#[test]
fn the_trampoline_switches_to_the_worker_user_with_no_groups() {
    use std::os::unix::process::CommandExt;
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: switching users needs root");
        return;
    }
    let server_pid = std::process::id().to_string();
    let mut cmd = std::process::Command::new(EXE);
    cmd.args(["__trampoline", "--server-pid", &server_pid, "--proto-fd", "1"])
        .args(["--interface", atelier_workers::INTERFACE, "--uid", "54321", "--gid", "54322"])
        .args(["--", "/usr/bin/id"]);
    // SAFETY: setgroups is async-signal-safe and the closure touches nothing else.
    unsafe {
        cmd.pre_exec(|| {
            let groups: [libc::gid_t; 2] = [4, 27];
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().expect("run the trampoline");
    let (said, err) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{}: {err}", out.status);
    assert_eq!(said.trim(), "uid=54321 gid=54322 groups=54322", "{err}");
}

/// Starts a controller for `pipelines`; `None` (having said so) when this machine gives jobs
/// no cgroup of their own (not root, or no usable hierarchy): the tests of what a job cgroup
/// holds then skip.
fn start_with_cgroups(name: &str, pipelines: &str) -> Option<Harness> {
    // Under cgroup v2 the test's own cgroup holds processes (this one), so no child of it may
    // have controllers; as root, the hierarchy's root may.
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    let v2_root = unsafe { libc::geteuid() } == 0 && Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let setting = if v2_root { "\"/sys/fs/cgroup\"" } else { "\"auto\"" };
    let mut h = Harness::new(name);
    h.start(config(pipelines, &[("cgroup", setting)]));
    if !h.controller().job_cgroup_parents().is_empty() {
        Some(h)
    } else {
        eprintln!(
            "skipped: no cgroup per job here (needs a writable cgroup v1 pids or v2 hierarchy, e.g. root)"
        );
        None
    }
}

/// The cgroup dirs of job `job_id` of this harness's controller that exist now.
fn job_cgroup_dirs(h: &Harness, job_id: u64) -> Vec<PathBuf> {
    let parents = h.controller().job_cgroup_parents();
    parents.iter().map(|p| p.join(format!("job-{job_id}"))).filter(|d| d.is_dir()).collect()
}

/// With a cgroup per job, the process limit is the job's `pids.max`: it binds a worker
/// running as root (which RLIMIT_NPROC does not), and counts the job's processes only.
#[test]
fn a_job_cgroup_holds_the_process_limit_even_for_root() {
    let Some(h) = start_with_cgroups("cg-nproc", &forker_pipeline(&["python3", "-c", FORKER])) else {
        return;
    };
    assert_forking_stopped(&h);
}

/// The job's cgroup reaches what its process group does not: a process that moved to a
/// session of its own is killed when the job ends, and the job's cgroup is removed after it.
#[test]
fn a_job_cgroup_ends_a_process_that_left_the_jobs_group() {
    let pipeline = format!(
        r#"
[pipelines.runaway]
env = {{ PATH = "/usr/bin:/bin" }}
command = ["sh", "-c", '''setsid sleep 300 & echo "escaped $!" >&2; sleep 0.3; {REPORT}''']
"#,
        REPORT = r#"for s in generating_ideas creating_images uploading creating_products; do printf '{"type":"stage","stage":"%s"}\n' $s >&3; done; printf '{"type":"result","result":{"ok":true}}\n' >&3"#
    );
    let Some(h) = start_with_cgroups("cg-escape", &pipeline) else { return };
    let id = h.create("runaway", serde_json::json!({}), 1);
    assert_eq!(h.wait_terminal(id, LONG).state, State::Completed);
    let job = h.jobs(id)[0].clone();
    let (_, err) = h.layout().job_logs(job.job_id);
    let line = wait_for_lines(&err, 1).remove(0);
    let escaped: u32 =
        line.strip_prefix("escaped ").and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("{line:?}"));
    let end = Instant::now() + Duration::from_secs(3);
    while alive(escaped) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    let pgid = proc_stat(escaped).map(|(_, g)| g);
    assert!(
        !alive(escaped),
        "{escaped} (group {pgid:?}, the job's was {:?}) outlived its job",
        job.process_id
    );
    let left = job_cgroup_dirs(&h, job.job_id);
    assert!(left.is_empty(), "the job's cgroup outlived it: {left:?}");
}

/// A command stage that uses more memory than `memory_mb` (a real python3 filling 512 MiB,
/// no allocation failing: the cgroup holds resident memory, not address space) is killed by
/// the kernel at the job cgroup's limit; that SIGKILL, told apart by the cgroup's OOM-kill
/// count, is the memory outcome, retried with double memory up to the cap.
#[test]
fn a_stage_killed_at_the_cgroups_memory_limit_is_retried_with_double_memory() {
    let pipeline = r#"
[pipelines.hungry]
memory_mb = 64
memory_max_mb = 128
env = { PATH = "/usr/bin:/bin" }
stages.generating_ideas = { command = ["python3", "-c", "import sys; sys.stdin.read(); b = b'x' * (512 << 20)"] }
"#;
    let Some(h) = start_with_cgroups("cg-oom", pipeline) else { return };
    let id = h.create("hungry", serde_json::json!({}), 3);
    let c = h.wait_terminal(id, LONG);
    let jobs = h.jobs(id);
    let ended: Vec<(JobStatus, &str)> =
        jobs.iter().map(|j| (j.status, j.error_message.as_deref().unwrap_or(""))).collect();
    assert_eq!(
        ended,
        [
            (JobStatus::Killed, "memory limit exceeded (64 MiB); the next attempt gets 128 MiB"),
            (JobStatus::Killed, "memory limit exceeded (128 MiB, the cap)"),
        ],
        "{c:#?}"
    );
    for j in &jobs {
        let (_, err) = h.layout().job_logs(j.job_id);
        let err = std::fs::read_to_string(err).unwrap_or_default();
        assert!(!err.contains("MemoryError"), "an allocation failed instead of the kernel's kill: {err}");
    }
}

/// A job cgroup that a crashed server left behind, with a process still in it (as one that
/// escaped its job's group would be), is emptied and removed when a server of the same data
/// dir starts again. Made here by hand beside a live job's cgroup, under the same parent.
#[test]
fn a_crashed_servers_job_cgroups_are_emptied_and_removed_at_the_next_start() {
    let pipeline = r#"
[pipelines.hang]
env = { PATH = "/usr/bin:/bin" }
command = ["sh", "-c", '''printf '{"type":"stage","stage":"generating_ideas"}\n' >&3; exec sleep 300''']
"#;
    let Some(mut h) = start_with_cgroups("cg-stale", pipeline) else { return };
    let id = h.create("hang", serde_json::json!({}), 1);
    h.wait_until(id, LONG, "in a stage", |c| c.state.stage().is_some());
    let job_id = h.jobs(id)[0].job_id;
    let live = job_cgroup_dirs(&h, job_id);
    assert!(!live.is_empty(), "the running job has a cgroup");
    let mut leftover = std::process::Command::new("sleep").arg("300").spawn().expect("start sleep");
    let stale: Vec<PathBuf> = live.iter().map(|d| d.with_file_name("job-999999")).collect();
    for dir in &stale {
        std::fs::create_dir(dir).expect("make a job cgroup");
        std::fs::write(dir.join("cgroup.procs"), leftover.id().to_string()).expect("move the process in");
    }
    execute(&*h.store, id, Command::RequestCancel, &ctx()).expect("store works").expect("cancel accepted");
    h.wait_terminal(id, LONG);
    let first = h.controller.take().expect("started");
    first.shutdown();
    drop(first);
    assert!(alive(leftover.id()), "nothing removes another server's cgroups while it runs");
    h.start(config(pipeline, &[("cgroup", "\"auto\"")]));
    let reaped = wait_for_exit(&mut leftover, Duration::from_secs(3));
    assert_eq!(reaped.and_then(|s| std::os::unix::process::ExitStatusExt::signal(&s)), Some(libc::SIGKILL));
    let left: Vec<&PathBuf> = stale.iter().filter(|d| d.exists()).collect();
    assert!(left.is_empty(), "stale job cgroups kept: {left:?}");
}

/// The child's exit status once it has exited, within `timeout`.
fn wait_for_exit(child: &mut std::process::Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let end = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// Artifacts no commission references are removed once older than the keep time; one that a
/// retained or a live commission refers to stays, however old, and so does one just stored
/// (by a running job whose report is not in the log yet). Once retention prunes the
/// commission that referred to an artifact, the artifact goes too.
#[test]
fn unreferenced_artifacts_are_swept_after_the_keep_time() {
    let dir = temp_dir("artifact-gc");
    let sled = SledStore::open(StoreConfig::new(dir.path().join("store"))).expect("open store");
    let mut h = Harness { store: sled.clone(), controller: None, dir };
    h.start(config("", &[]));
    let done = h.create("commission", serde_json::json!({"title": "t"}), 1);
    let c = h.wait_until(done, LONG, "completed", |c| c.state == State::Completed);
    h.controller().shutdown();
    let artifacts = h.layout().artifacts();
    let stored = artifacts.join(c.artifacts[0].uri.trim_start_matches("/artifacts/"));
    assert!(stored.is_file(), "the job stored its image");
    let file = |hash_byte: &str| artifacts.join(format!("{}.png", hash_byte.repeat(32)));
    let (orphan, fresh, wanted) = (file("0a"), file("0b"), file("0c"));
    let temporary = artifacts.join(format!(".{}.png.1.tmp", "0d".repeat(32)));
    for f in [&orphan, &fresh, &wanted, &temporary] {
        std::fs::write(f, b"png").unwrap();
    }
    // A commission not yet run (scheduled a day ahead) whose context refers to `wanted`.
    let uri = format!("/artifacts/{}.png", "0c".repeat(32));
    h.create_full("noop", serde_json::json!({"like": uri}), 1, 0, Some(now_ms() + 86_400_000));
    let keep = Duration::from_secs(86_400);
    let long_ago = SystemTime::now() - keep - Duration::from_secs(60);
    for f in [&stored, &orphan, &wanted, &temporary] {
        std::fs::File::open(f).unwrap().set_modified(long_ago).unwrap();
    }

    let sweep = || atelier_workers::janitor::sweep_artifacts(&*h.store, &h.layout(), keep, SystemTime::now());
    let s = sweep().expect("the sweep runs");
    assert_eq!((s.removed, s.kept, s.failed), (1, 3, 0), "{s:?}");
    assert!(!orphan.exists(), "an old artifact nothing refers to goes");
    assert!(stored.exists(), "a retained commission's artifact stays");
    assert!(wanted.exists(), "an artifact a live commission's context refers to stays");
    assert!(fresh.exists(), "an artifact just stored stays for the keep time");
    assert!(temporary.exists(), "what is not an artifact is not the sweep's");

    // Retention prunes the completed commission, and with it the last reference.
    assert_eq!(sled.prune_terminal_before(now_ms() + 1).expect("prunes"), 1);
    let s = sweep().expect("the sweep runs");
    assert_eq!((s.removed, s.kept), (1, 2), "{s:?}");
    assert!(!stored.exists() && wanted.exists() && fresh.exists());
}

/// A job that stores an artifact already there (the same content) touches its file, so an
/// old unreferenced artifact a job is about to refer to is not due for the sweep.
#[test]
fn storing_an_artifact_already_there_makes_it_new_again() {
    let mut h = Harness::new("artifact-touch");
    h.start(config("", &[]));
    let first = h.create("commission", serde_json::json!({"title": "same"}), 1);
    let c = h.wait_until(first, LONG, "completed", |c| c.state == State::Completed);
    let stored = h.layout().artifacts().join(c.artifacts[0].uri.trim_start_matches("/artifacts/"));
    let long_ago = SystemTime::now() - Duration::from_secs(30 * 86_400);
    std::fs::File::open(&stored).unwrap().set_modified(long_ago).unwrap();
    let again = h.create("commission", serde_json::json!({"title": "same"}), 1);
    let c = h.wait_until(again, LONG, "completed", |c| c.state == State::Completed);
    assert_eq!(h.layout().artifacts().join(c.artifacts[0].uri.trim_start_matches("/artifacts/")), stored);
    let changed = std::fs::metadata(&stored).unwrap().modified().unwrap();
    let age = SystemTime::now().duration_since(changed).unwrap_or_default();
    assert!(age < Duration::from_secs(60), "the artifact stored again is {age:?} old");
}
