//! End-to-end with real worker processes: kill -9 the server while jobs run — no worker
//! survives it, and after a restart every commission still reaches a terminal state; job
//! records and logs over HTTP.

use std::path::Path;
use std::time::Duration;

use atelier_tests::*;

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_atelier"))
}

fn alive(pid: u64) -> bool {
    // A zombie has exited; only a running or sleeping process counts.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit(')').next().and_then(|r| r.split_whitespace().next()) != Some("Z"))
        .unwrap_or(false)
}

#[test]
fn sigkill_the_server_with_jobs_running() {
    let dir = temp_dir("jobs-crash");
    let s = Server::start(exe(), dir.path(), &[("MAX_CONCURRENT_JOBS", "3")]);
    let alice = token("alice", false);
    let ids: Vec<u64> = (0..5)
        .map(|i| {
            s.create(
                &alice,
                json!({"context": {"title": format!("slow {i}"), "delay_ms": 600}, "pipeline": "commission"}),
            )["task_id"]
                .as_u64()
                .unwrap()
        })
        .collect();
    // Wait until three jobs run, and note their worker pids.
    let pids = wait_for(Duration::from_secs(20), || {
        let pids: Vec<u64> = ids
            .iter()
            .flat_map(|id| {
                s.get(&format!("/api/commissions/{id}/jobs"), Some(&alice)).json()["items"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .filter(|j| j["status"] == "running")
            .filter_map(|j| j["process_id"].as_u64())
            .collect();
        (pids.len() == 3).then_some(pids)
    })
    .expect("three jobs running at once");
    assert!(pids.iter().all(|p| alive(*p)));
    // A job runs the small worker program: the one named by ATELIER_WORKER_PROGRAM (CI runs
    // this suite again with the statically linked one), else the one next to the server.
    let worker_program = std::env::var_os("ATELIER_WORKER_PROGRAM")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_atelier-worker").into());
    let worker_program = std::fs::canonicalize(worker_program).unwrap();
    for pid in &pids {
        assert_eq!(std::fs::read_link(format!("/proc/{pid}/exe")).unwrap(), worker_program, "worker {pid}");
    }
    let addr = s.addr.to_string();
    s.kill();
    let gone = wait_for(Duration::from_secs(5), || pids.iter().all(|p| !alive(*p)).then_some(()));
    assert!(gone.is_some(), "no worker outlives the server (PDEATHSIG): {pids:?}");

    let s = Server::start_on(exe(), dir.path(), &[("MAX_CONCURRENT_JOBS", "3")], &addr);
    let done = wait_for(Duration::from_secs(60), || {
        let states: Vec<String> = ids
            .iter()
            .map(|id| {
                s.get(&format!("/api/commissions/{id}"), Some(&alice)).json()["state"]
                    .as_str()
                    .unwrap_or("")
                    .to_string()
            })
            .collect();
        states.iter().all(|st| st == "completed").then_some(states)
    });
    assert!(done.is_some(), "every commission completes after the restart");
    // The interrupted attempts are on record, with the reason.
    let mut restarted = 0;
    for id in &ids {
        let jobs = s.get(&format!("/api/commissions/{id}/jobs"), Some(&alice)).json();
        for j in jobs["items"].as_array().unwrap() {
            if j["error_message"].as_str().is_some_and(|e| e.contains("server restarted")) {
                restarted += 1;
            }
        }
    }
    assert_eq!(restarted, 3, "the three interrupted jobs are recorded as such");
    let check = std::process::Command::new(exe())
        .args(["replay", "--check"])
        .env("ATELIER_DATA_DIR", dir.path())
        .output()
        .unwrap();
    assert_eq!(check.status.code(), Some(2), "the running server holds the data dir lock");
    assert!(String::from_utf8_lossy(&check.stderr).contains("in use by pid"));
    let stopped = s.stop();
    assert!(stopped.success());
    let check = std::process::Command::new(exe())
        .args(["replay", "--check"])
        .env("ATELIER_DATA_DIR", dir.path())
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stdout));
}

#[test]
fn the_worker_program_is_checked_before_it_runs_jobs() {
    let dir = temp_dir("jobs-worker-program");
    let alice = token("alice", false);
    // The server binary's own worker mode, named explicitly: jobs run and complete.
    let s =
        Server::start(exe(), &dir.path().join("own"), &[("ATELIER_WORKER_PROGRAM", exe().to_str().unwrap())]);
    let id = s.create(&alice, json!({"context": {"title": "own"}, "pipeline": "commission"}))["task_id"]
        .as_u64()
        .unwrap();
    let state = wait_for(Duration::from_secs(20), || {
        let st = s.get(&format!("/api/commissions/{id}"), Some(&alice)).json()["state"]
            .as_str()
            .unwrap_or("")
            .to_string();
        (st == "completed" || st == "failed").then_some(st)
    });
    assert_eq!(state.as_deref(), Some("completed"));
    assert!(s.stop().success());

    // A worker program built from other sources is refused at start, with the reason.
    let stale = dir.path().join("atelier-worker");
    std::fs::write(&stale, "#!/bin/sh\necho 0.0.0+0000000000000000\n").unwrap();
    std::fs::set_permissions(&stale, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = std::process::Command::new(exe())
        .arg("serve")
        .env("ATELIER_DATA_DIR", dir.path().join("stale"))
        .env("ATELIER_LISTEN", "127.0.0.1:0")
        .env("ATELIER_WORKER_PROGRAM", &stale)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("built from other sources") && stderr.contains("0.0.0+0000000000000000"),
        "{stderr}"
    );
}

#[test]
fn every_line_about_a_job_carries_its_commission_and_job() {
    let dir = temp_dir("jobs-spans");
    let alice = token("alice", false);
    for (executor, use_controller) in [("job_controller", "true"), ("task_runner", "false")] {
        let log = dir.path().join(format!("{executor}.log"));
        let env =
            [("RUST_LOG", "info"), ("ATELIER_LOG_FORMAT", "json"), ("USE_JOB_CONTROLLER", use_controller)];
        let s = Server::start_logging_to(exe(), &dir.path().join(executor), &env, &log);
        let id = s.create(&alice, json!({"context": {"title": "spans"}, "pipeline": "commission"}))
            ["task_id"]
            .as_u64()
            .unwrap();
        let done = wait_for(Duration::from_secs(20), || {
            (s.get(&format!("/api/commissions/{id}"), Some(&alice)).json()["state"] == "completed")
                .then_some(())
        });
        assert!(done.is_some(), "{executor}: the commission completes");
        let job_id = s.get(&format!("/api/commissions/{id}/jobs"), Some(&alice)).json()["items"][0]["job_id"]
            .as_u64()
            .unwrap();
        assert!(s.stop().success());
        let text = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        let about_the_job: Vec<&Value> =
            lines.iter().filter(|l| l["fields"]["message"] == "job recorded").collect();
        assert_eq!(about_the_job.len(), 1, "{executor}: one 'job recorded' line in\n{text}");
        let spans = &about_the_job[0]["spans"];
        assert_eq!(spans[0]["name"], "commission", "{executor}: {spans}");
        assert_eq!(spans[0]["id"], id);
        assert_eq!(spans[0]["user"], "alice");
        assert_eq!(spans[1]["name"], "job", "{executor}: {spans}");
        assert_eq!(spans[1]["id"], job_id);
        assert_eq!(spans[1]["executor"], executor);
    }
}

/// Workers that end badly, each in its own way (the fault matrix in workers/tests has them
/// all, against the library); here against the real server, to count what they leave in it.
const FAULTY: &str = r#"
[pipelines.f-sigkill]
worker_args = ["--behave", "sigkill"]
[pipelines.f-segv]
worker_args = ["--behave", "segfault"]
[pipelines.f-garbage]
worker_args = ["--behave", "garbage"]
[pipelines.f-huge]
worker_args = ["--behave", "huge-line"]
[pipelines.f-noresult]
worker_args = ["--behave", "no-result"]
[pipelines.f-orphan]
worker_args = ["--behave", "fork-orphan"]
[pipelines.f-hang]
worker_args = ["--behave", "hang"]
timeout_seconds = 1
[pipelines.f-flood]
worker_args = ["--behave", "flood"]
[pipelines.f-missing]
command = ["/nonexistent/worker"]
"#;

#[test]
fn workers_that_end_badly_leave_no_descriptor_in_the_server() {
    let dir = temp_dir("jobs-fds");
    let config = dir.path().join("atelier.toml");
    std::fs::write(&config, FAULTY).unwrap();
    let s = Server::start(
        exe(),
        &dir.path().join("data"),
        // Dumpable, so that this test can list the server's descriptors without being root.
        &[
            ("ATELIER_CONFIG", config.to_str().unwrap()),
            ("MAX_CONCURRENT_JOBS", "4"),
            ("ATELIER_TEST_KEEP_DUMPABLE", "1"),
        ],
    );
    let alice = token("alice", false);
    let finish = |pipelines: &[&str]| {
        let ids: Vec<u64> = pipelines
            .iter()
            .map(|p| {
                s.create(&alice, json!({"context": {}, "pipeline": p, "max_attempts": 1}))["task_id"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        for (id, p) in ids.iter().zip(pipelines) {
            let state = wait_for(Duration::from_secs(30), || {
                let st = s.get(&format!("/api/commissions/{id}"), Some(&alice)).json()["state"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                (st == "completed" || st == "failed").then_some(st)
            });
            assert!(state.is_some(), "{p}: commission {id} ends");
        }
    };
    // Warm up what a server opens once (log files, threads' pipes) with a job of each kind.
    finish(&["noop", "commission"]);
    let fds = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", s.pid()))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .map(|p| p.display().to_string())
            .collect();
        v.sort();
        v
    };
    // The last request's connection closes right after its reply; let it.
    std::thread::sleep(Duration::from_millis(300));
    let before = fds();
    finish(&[
        "f-sigkill",
        "f-segv",
        "f-garbage",
        "f-huge",
        "f-noresult",
        "f-orphan",
        "f-hang",
        "f-flood",
        "f-missing",
        "noop",
    ]);
    // Connections of the requests above may still be closing: wait (bounded) for the count.
    let settled = wait_for(Duration::from_secs(5), || (fds().len() <= before.len()).then_some(()));
    assert!(settled.is_some(), "descriptors before: {before:#?}\nafter: {:#?}", fds());
    assert_eq!(s.get("/healthz", None).status, 200, "the server still serves");
}

#[test]
fn job_records_and_logs_over_http() {
    let dir = temp_dir("jobs-http");
    let s = Server::start(exe(), dir.path(), &[]);
    let alice = token("alice", false);
    let id = s.create(&alice, json!({"context": {"title": "t"}, "pipeline": "commission"}))["task_id"]
        .as_u64()
        .unwrap();
    let job = wait_for(Duration::from_secs(20), || {
        let jobs = s.get(&format!("/api/commissions/{id}/jobs"), Some(&alice)).json();
        let j = jobs["items"].as_array()?.first()?.clone();
        (j["status"] == "succeeded").then_some(j)
    })
    .expect("the job succeeds");
    for key in [
        "job_id",
        "task_id",
        "executor",
        "job_name",
        "process_id",
        "status",
        "created_at",
        "started_at",
        "completed_at",
        "exit_code",
        "signal",
        "error_message",
        "max_rss_bytes",
        "cpu_ms",
    ] {
        assert!(job.get(key).is_some(), "job has {key}: {job}");
    }
    assert_eq!(job["executor"], "job_controller");
    assert_eq!(job["exit_code"], 0);
    assert!(job["max_rss_bytes"].as_u64().unwrap() > 0, "rusage recorded");
    let jid = job["job_id"].as_u64().unwrap();
    assert_eq!(s.get(&format!("/api/jobs/{jid}/status"), Some(&alice)).json()["job_id"], jid);
    let logs = s.get(&format!("/api/jobs/{jid}/logs"), Some(&alice));
    assert_eq!(logs.status, 200);
    assert!(logs.json().get("stderr").is_some());
    assert_eq!(s.get(&format!("/api/jobs/{jid}/status"), Some(&token("bob", false))).status, 404);
    assert!(
        dir.path().join("jobs").join(jid.to_string()).join("image.png").is_file(),
        "the rendered image is in the job's dir"
    );
    // A job that puts nothing in its dir never gets one, and its logs are empty, not gone
    // (410 is for a dir the sweep removed: `routes::logs_swept`).
    let quiet = s.create(&alice, json!({"context": {}, "pipeline": "noop"}))["task_id"].as_u64().unwrap();
    let qjob = wait_for(Duration::from_secs(20), || {
        let jobs = s.get(&format!("/api/commissions/{quiet}/jobs"), Some(&alice)).json();
        let j = jobs["items"].as_array()?.first()?.clone();
        (j["status"] == "succeeded").then(|| j["job_id"].as_u64().unwrap())
    })
    .expect("the noop job succeeds");
    assert!(!dir.path().join("jobs").join(qjob.to_string()).exists(), "no dir for a job that wrote nothing");
    let logs = s.get(&format!("/api/jobs/{qjob}/logs"), Some(&alice));
    assert_eq!(
        (logs.status, logs.json()["stdout"].as_str(), logs.json()["stderr"].as_str()),
        (200, Some(""), Some(""))
    );
    // The product image is served, content-addressed.
    let snap = s.get(&format!("/api/commissions/{id}"), Some(&alice)).json();
    let url = snap["result"]["product"]["image_url"].as_str().unwrap().to_string();
    let img = s.get(&url, None);
    assert_eq!(img.status, 200);
    assert_eq!(&img.body[..8], b"\x89PNG\r\n\x1a\n");
    // readyz: the store is open and the job controller runs.
    assert_eq!(s.get("/readyz", None).status, 200);
}

/// `POST /api/jobs/create` on a commission waiting on its backoff runs it now.
#[test]
fn creating_a_job_for_a_commission_in_backoff_runs_it_now() {
    let dir = temp_dir("jobs-now");
    // A day of backoff: without the request, the second attempt would not start in this test.
    let s = Server::start(exe(), dir.path(), &[("RETRY_BASE_MS", "86400000"), ("RETRY_CAP_MS", "86400000")]);
    let admin = token("root", true);
    let alice = token("alice", false);
    let id = s
        .create(&alice, json!({"context": {"fail": "retryable"}, "pipeline": "fail", "max_attempts": 3}))
        ["task_id"]
        .as_u64()
        .unwrap();
    let waiting = wait_for(Duration::from_secs(20), || {
        let c = s.get(&format!("/api/commissions/{id}"), Some(&alice)).json();
        (c["state"] == "retrying").then_some(c)
    })
    .expect("the first attempt fails and the commission waits on its backoff");
    assert!(waiting["next_retry_at"].is_string(), "{waiting}");
    let r = s.post("/api/jobs/create", Some(&alice), &json!({"task_id": id}));
    assert_eq!(r.status, 403, "admins only");
    let r = s.post("/api/jobs/create", Some(&admin), &json!({"task_id": id}));
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["status"], "pending");
    let second = wait_for(Duration::from_secs(20), || {
        let jobs = s.get(&format!("/api/commissions/{id}/jobs"), Some(&alice)).json();
        (jobs["items"].as_array()?.len() >= 2).then_some(())
    });
    assert!(second.is_some(), "the second attempt ran at once");
    let c = s.get(&format!("/api/commissions/{id}"), Some(&alice)).json();
    assert!(c["attempt"].as_u64().unwrap() >= 2, "{c}");
}

/// A process that leaves its job's process group (here with `setsid`, as a daemon would) is
/// out of reach of the group kill that ends a job; the server, a child subreaper, ends it and
/// reaps it once the job is over.
#[test]
fn a_process_that_leaves_its_jobs_group_is_ended_after_the_job() {
    let dir = temp_dir("jobs-escape");
    // The worker starts a process that calls setsid() and then sleeps for five minutes; the
    // worker waits until it has left the group (it writes its pid only then), reports its
    // stages and a result, and exits 0.
    let config = dir.path().join("atelier.toml");
    std::fs::write(
        &config,
        r#"
[pipelines.escape]
command = ["sh", "-c", '''cat >/dev/null; python3 -c 'import os, time; os.setsid(); open("escapee.tmp", "w").write(str(os.getpid())); os.rename("escapee.tmp", "escapee.pid"); time.sleep(300)' </dev/null >/dev/null 2>&1 3>&- & while [ ! -f escapee.pid ]; do sleep 0.01; done; for s in generating_ideas creating_images uploading creating_products; do printf '{"type":"stage","stage":"%s"}\n' $s >&3; done; printf '{"type":"result","result":{"ok":true}}\n' >&3''']
env = { PATH = "/usr/bin:/bin" }
"#,
    )
    .unwrap();
    let config = config.display().to_string();
    // Without job cgroups: a job's cgroup would end the process itself, before the sweep.
    let s = Server::start(exe(), dir.path(), &[("ATELIER_CONFIG", &config), ("ATELIER_CGROUP", "off")]);
    let alice = token("alice", false);
    let id = s.create(&alice, json!({"context": {}, "pipeline": "escape"}))["task_id"].as_u64().unwrap();
    let jid = wait_for(Duration::from_secs(20), || {
        let jobs = s.get(&format!("/api/commissions/{id}/jobs"), Some(&alice)).json();
        let j = jobs["items"].as_array()?.first()?.clone();
        (j["status"] == "succeeded").then_some(j["job_id"].as_u64().unwrap())
    })
    .expect("the job succeeds");
    let pid: u64 = std::fs::read_to_string(dir.path().join("jobs").join(jid.to_string()).join("escapee.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let session = |pid: u64| -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit(')').next()?.split_whitespace().nth(3)?.parse().ok()
    };
    assert_eq!(session(pid), Some(pid), "the process runs in a session of its own, outside the job's group");
    // Gone, and reaped: no /proc entry left, not even a zombie.
    let gone = wait_for(Duration::from_secs(10), || {
        (!std::path::Path::new(&format!("/proc/{pid}")).exists()).then_some(())
    });
    assert!(gone.is_some(), "the escaped process {pid} outlived its job");
    let metrics = s.get("/metrics", Some(&token("root", true))).text();
    assert!(metrics.contains("atelier_job_escapees_killed_total 1"), "{metrics}");
    assert!(s.stop().success());
}
