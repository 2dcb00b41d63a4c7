//! End-to-end: every endpoint and error of the HTTP API against the real binary on loopback,
//! the auth matrix, and snapshots of response bodies.

use std::path::Path;

use atelier_tests::*;

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_atelier"))
}

fn server(dir: &TempDir) -> Server {
    Server::start(exe(), dir.path(), &[])
}

/// A commission that stays queued: scheduled far in the future, so no executor takes it.
fn noop(title: &str) -> Value {
    json!({"context": {"title": title, "text": "words"}, "pipeline": "noop", "scheduled_for": "2099-01-01T00:00:00Z"})
}

#[test]
fn create_get_list_cancel_retry() {
    let dir = temp_dir("api");
    let s = server(&dir);
    let alice = token("alice", false);
    let created = s.create(&alice, json!({"context": {"title": "A mug"}, "pipeline": "noop", "priority": 3, "max_attempts": 2, "scheduled_for": "2099-01-01T00:00:00Z"}));
    insta::assert_json_snapshot!("create_201", redact(&created));
    let id = created["task_id"].as_u64().unwrap();

    let got = s.get(&format!("/api/commissions/{id}"), Some(&alice));
    assert_eq!(got.status, 200);
    assert_eq!(got.json()["task_id"], id);
    assert_eq!(s.get(&format!("/api/progress/{id}/status"), Some(&alice)).json()["task_id"], id);

    // Idempotency: the same key returns the first commission with 200.
    let body = json!({"context": {"title": "x"}, "pipeline": "noop", "idempotency_key": "abc", "scheduled_for": "2099-01-01T00:00:00Z"});
    let first = s.post("/api/commissions", Some(&alice), &body);
    let again = s.post("/api/commissions", Some(&alice), &body);
    assert_eq!((first.status, again.status), (201, 200));
    assert_eq!(first.json()["task_id"], again.json()["task_id"]);

    // Listing: newest first, paged by cursor, filtered by state.
    for i in 0..3 {
        s.create(&alice, noop(&format!("n{i}")));
    }
    let page = s.get("/api/commissions/user/alice?limit=2", Some(&alice)).json();
    let ids: Vec<u64> =
        page["items"].as_array().unwrap().iter().map(|c| c["task_id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len(), 2);
    assert!(ids[0] > ids[1]);
    let cursor = page["next_cursor"].as_str().unwrap().to_string();
    let page2 = s.get(&format!("/api/commissions/user/alice?limit=2&cursor={cursor}"), Some(&alice)).json();
    assert!(page2["items"][0]["task_id"].as_u64().unwrap() < ids[1]);

    // Cancel: 200 with the snapshot, then 409 naming the rule.
    let c = s.post(&format!("/api/commissions/{id}/cancel"), Some(&alice), &json!({}));
    assert_eq!(c.status, 200, "{}", c.text());
    assert_eq!(c.json()["state"], "cancelled");
    let again = s.post(&format!("/api/commissions/{id}/cancel"), Some(&alice), &json!({}));
    assert_eq!(again.status, 409);
    insta::assert_json_snapshot!("cancel_409", again.json());
    let cancelled = s.get("/api/commissions/user/alice?state=cancelled", Some(&alice)).json();
    assert_eq!(cancelled["items"].as_array().unwrap().len(), 1);
    // Retry: only a failed commission.
    let r = s.post(&format!("/api/commissions/{id}/retry"), Some(&alice), &json!({}));
    assert_eq!(r.status, 409);
    assert_eq!(r.code(), "terminal_state");
    let jobs = s.get(&format!("/api/commissions/{id}/jobs"), Some(&alice));
    assert_eq!(jobs.status, 200);
}

#[test]
fn auth_matrix() {
    let dir = temp_dir("auth");
    let s = server(&dir);
    let (alice, bob, admin) = (token("alice", false), token("bob", false), token("root", true));
    let id = s.create(&alice, noop("mine"))["task_id"].as_u64().unwrap();
    let path = format!("/api/commissions/{id}");

    assert_eq!(s.get(&path, Some(&alice)).status, 200);
    assert_eq!(s.get(&path, Some(&admin)).status, 200, "admins see all");
    let other = s.get(&path, Some(&bob));
    assert_eq!(
        (other.status, other.code().as_str()),
        (404, "not_found"),
        "another user's commission is 404, not 403"
    );
    assert_eq!(s.post(&format!("{path}/cancel"), Some(&bob), &json!({})).status, 404);
    assert_eq!(s.get("/api/commissions/user/alice", Some(&bob)).json()["items"], json!([]));

    let none = s.get(&path, None);
    assert_eq!((none.status, none.code().as_str()), (401, "unauthorized"));
    assert_eq!(s.get(&path, Some(&expired_token("alice"))).status, 401);
    let forged = keys_for("not the secret, but just as long")
        .issue("alice", atelier_http::Role::Admin, now_s(), 60)
        .unwrap();
    assert_eq!(s.get(&path, Some(&forged)).status, 401);
    assert_eq!(s.get(&path, Some("garbage")).status, 401);
    // A real token's claims under a header naming no algorithm (`{"alg":"none"}`), unsigned.
    let claims = alice.split('.').nth(1).unwrap();
    let unsigned = s.get(&path, Some(&format!("eyJhbGciOiJub25lIn0.{claims}.")));
    assert_eq!((unsigned.status, unsigned.code().as_str()), (401, "unauthorized"));
    // The cookie works too.
    let by_cookie =
        request(s.addr, "GET", &path, None, &[("Cookie", &format!("atelier_token={alice}"))], None);
    assert_eq!(by_cookie.status, 200);

    // Admin-only routes.
    assert_eq!(s.get("/metrics", Some(&alice)).status, 403);
    assert_eq!(s.get("/api/events/stream", Some(&alice)).status, 403);
    // user_id on create is for admins only.
    let r = s.post(
        "/api/commissions",
        Some(&alice),
        &json!({"context": {}, "pipeline": "noop", "user_id": "bob"}),
    );
    assert_eq!(r.status, 403);
    let r = s.post(
        "/api/commissions",
        Some(&admin),
        &json!({"context": {}, "pipeline": "noop", "user_id": "bob"}),
    );
    assert_eq!(r.status, 201);
    assert_eq!(r.json()["user_id"], "bob");
    assert_eq!(s.get("/api/me", Some(&bob)).json(), json!({"user_id": "bob", "role": "user"}));
}

#[test]
fn bad_input_gets_a_clear_error_and_appends_nothing() {
    let dir = temp_dir("errors");
    let s = server(&dir);
    let alice = token("alice", false);
    let admin = token("root", true);
    let head = || -> u64 {
        let m = s.get("/metrics", Some(&admin)).text();
        m.lines().find_map(|l| l.strip_prefix("atelier_log_head_seq ")).unwrap().trim().parse().unwrap()
    };
    let before = head();
    let cases: Vec<(&str, Response)> = vec![
        (
            "bad json",
            request(
                s.addr,
                "POST",
                "/api/commissions",
                Some(&alice),
                &[("Content-Type", "application/json")],
                Some(b"{nope"),
            ),
        ),
        ("not an object", s.post("/api/commissions", Some(&alice), &json!([1]))),
        ("missing context", s.post("/api/commissions", Some(&alice), &json!({"pipeline": "noop"}))),
        ("context not object", s.post("/api/commissions", Some(&alice), &json!({"context": "x"}))),
        ("unknown field", s.post("/api/commissions", Some(&alice), &json!({"context": {}, "colour": "red"}))),
        (
            "bad priority",
            s.post("/api/commissions", Some(&alice), &json!({"context": {}, "priority": "high"})),
        ),
        (
            "bad attempts",
            s.post("/api/commissions", Some(&alice), &json!({"context": {}, "max_attempts": 0})),
        ),
        (
            "bad schedule",
            s.post("/api/commissions", Some(&alice), &json!({"context": {}, "scheduled_for": "tomorrow"})),
        ),
        (
            "bad pipeline name",
            s.post("/api/commissions", Some(&alice), &json!({"context": {}, "pipeline": "Shop!"})),
        ),
        (
            "wrong content type",
            request(
                s.addr,
                "POST",
                "/api/commissions",
                Some(&alice),
                &[("Content-Type", "text/plain")],
                Some(b"{}"),
            ),
        ),
        (
            "body too large",
            request(
                s.addr,
                "POST",
                "/api/commissions",
                Some(&alice),
                &[("Content-Type", "application/json")],
                Some(&vec![b' '; 1024 * 1024 + 10]),
            ),
        ),
        ("unknown route", s.get("/api/nothing-here", Some(&alice))),
        ("bad id", s.get("/api/commissions/abc", Some(&alice))),
        ("missing commission", s.get("/api/commissions/999999", Some(&alice))),
        ("wrong method", request(s.addr, "DELETE", "/api/commissions/1", Some(&alice), &[], None)),
        ("bad limit", s.get("/api/commissions/user/alice?limit=5000", Some(&alice))),
        ("bad state filter", s.get("/api/commissions/user/alice?state=sleeping", Some(&alice))),
        (
            "bad last-event-id",
            request(s.addr, "GET", "/api/events/stream", Some(&admin), &[("Last-Event-ID", "x")], None),
        ),
    ];
    let mut summary = Vec::new();
    for (name, r) in &cases {
        let body = r.json();
        assert!(
            body["error"]["code"].is_string() && body["error"]["message"].is_string(),
            "{name}: {}",
            r.text()
        );
        summary.push(json!({"case": name, "status": r.status, "body": body}));
    }
    let allow =
        cases.iter().find(|(n, _)| *n == "wrong method").unwrap().1.header("Allow").map(str::to_string);
    assert_eq!(allow.as_deref(), Some("GET"));
    insta::assert_json_snapshot!("errors", summary);
    assert_eq!(head(), before, "no rejected request appended anything");
}

#[test]
fn health_metrics_and_openapi() {
    let dir = temp_dir("ops");
    let s = server(&dir);
    assert_eq!(s.get("/healthz", None).json(), json!({"status": "ok"}));
    let admin = token("root", true);
    s.create(&admin, noop("m"));
    let m = s.get("/metrics", Some(&admin));
    assert_eq!(m.status, 200);
    let text = m.text();
    for name in [
        "atelier_http_requests_total{",
        "atelier_http_request_duration_seconds_bucket",
        "atelier_sse_connections",
        "atelier_sse_events_sent_total",
        "atelier_sse_dropped_slow_total",
        "atelier_events_appended_total",
        "atelier_append_duration_seconds_bucket",
        "atelier_commissions{state=\"created\"} 1",
        "atelier_log_head_seq 1",
    ] {
        assert!(text.contains(name), "missing {name} in:\n{text}");
    }
    let doc = s.get("/api/openapi.json", None).json();
    assert_eq!(doc["openapi"], "3.1.0");
    // Every documented path answers something other than "no route" for its method.
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            let concrete = path.replace("{id}", "1").replace("{user}", "alice").replace("{file}", "app.js");
            if concrete.ends_with("/stream") {
                continue; // streams are exercised in the SSE tests
            }
            let r = request(s.addr, &method.to_ascii_uppercase(), &concrete, Some(&admin), &[], None);
            let no_route = r.status == 404 && r.text().contains("no route");
            assert!(!no_route && r.status != 405, "{method} {path}: {} {}", r.status, r.text());
        }
    }
}

#[test]
fn page_sign_in_sets_an_httponly_cookie() {
    let dir = temp_dir("page");
    let s = server(&dir);
    let alice = token("alice", false);
    let r = s.get(&format!("/?token={alice}"), None);
    assert_eq!(r.status, 303);
    let cookie = r.header("Set-Cookie").unwrap();
    assert!(
        cookie.contains("HttpOnly")
            && cookie.contains("SameSite=Strict")
            && cookie.starts_with("atelier_token=")
    );
    let page = s.get("/", None);
    assert_eq!(page.status, 200);
    assert!(page.header("Content-Type").unwrap().starts_with("text/html"));
    assert_eq!(s.get("/assets/app.js", None).status, 200);
    assert_eq!(s.get("/artifacts/nothing.png", None).status, 404);
}

#[test]
fn second_server_on_the_same_data_dir_is_refused_by_name() {
    let dir = temp_dir("lock");
    let s = server(&dir);
    let out = std::process::Command::new(exe())
        .args(["serve"])
        .env("ATELIER_DATA_DIR", dir.path())
        .env("ATELIER_LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by pid") && err.contains(&s.pid().to_string()), "{err}");
}

#[test]
fn cli_replay_check_export_import_and_bad_flags() {
    let dir = temp_dir("cli");
    {
        let s = server(&dir);
        let alice = token("alice", false);
        let id = s.create(&alice, noop("a"))["task_id"].as_u64().unwrap();
        s.post(&format!("/api/commissions/{id}/cancel"), Some(&alice), &json!({}));
        assert!(s.stop().success(), "graceful stop exits 0");
    }
    // The CLI reaches the log where the server kept it: the data dir, or its database.
    let cli = |data_dir: &std::path::Path| {
        let mut cmd = std::process::Command::new(exe());
        cmd.env("ATELIER_DATA_DIR", data_dir);
        if let Some(url) = database_for(data_dir) {
            cmd.env("ATELIER_DATABASE_URL", url);
        }
        cmd
    };
    let run = |args: &[&str]| cli(dir.path()).args(args).output().unwrap();
    let check = run(&["replay", "--check"]);
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stdout));
    assert!(String::from_utf8_lossy(&check.stdout).contains("projections match the log"));
    let export = run(&["export"]);
    assert!(export.status.success());
    assert_eq!(String::from_utf8_lossy(&export.stdout).lines().count(), 3);
    let copy = temp_dir("cli-import");
    let file = copy.path().join("log.jsonl");
    std::fs::write(&file, &export.stdout).unwrap();
    let target = copy.path().join("data");
    let import = cli(&target).args(["import", file.to_str().unwrap()]).output().unwrap();
    assert!(import.status.success(), "{}", String::from_utf8_lossy(&import.stderr));
    let bad = run(&["serve", "--bogus"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unexpected argument '--bogus'"));
    let tok = run(&["token"]);
    assert_eq!(tok.status.code(), Some(2));
    assert!(run(&["help"]).status.success());
}

#[test]
fn a_request_whose_headers_never_finish_is_answered_408_and_closed() {
    let dir = temp_dir("slowloris");
    let s = Server::start(exe(), dir.path(), &[("ATELIER_HEADER_TIMEOUT_MS", "400")]);
    let mut c = std::net::TcpStream::connect(s.addr).unwrap();
    use std::io::{Read, Write};
    c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").unwrap();
    c.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    let started = std::time::Instant::now();
    let mut raw = Vec::new();
    let _ = c.read_to_end(&mut raw);
    let raw = String::from_utf8_lossy(&raw);
    assert!(raw.starts_with("HTTP/1.1 408 "), "answered 408, then closed: {raw:?}");
    assert!(raw.contains(r#"{"error":{"code":"request_timeout","#), "a JSON error: {raw:?}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "closed by the header timeout: {:?}",
        started.elapsed()
    );
    assert_eq!(s.get("/healthz", None).status, 200, "others are served");
}

/// Postmortem: the first server (tiny_http) stopped accepting for good on its first accept
/// error, so running out of descriptors once stopped it for good. Now the connection cap is
/// fitted under the descriptor limit: beyond it a connection gets a 503 and is closed, and the
/// server never runs out.
#[test]
fn a_low_descriptor_limit_caps_connections_and_the_server_keeps_serving() {
    use std::io::Read;
    let dir = temp_dir("emfile");
    let s = Server::start_with_fd_limit(exe(), dir.path(), &[("ATELIER_HEADER_TIMEOUT_MS", "1000")], 96);
    let admin = token("root", true);
    // Hold many idle connections: far more than the descriptors allow.
    let held: Vec<std::net::TcpStream> =
        (0..200).filter_map(|_| std::net::TcpStream::connect(s.addr).ok()).collect();
    let mut refused = 0;
    for mut c in held.iter().skip(1) {
        c.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
        let mut text = String::new();
        let _ = c.read_to_string(&mut text);
        if text.starts_with("HTTP/1.1 503") && text.contains("over_capacity") {
            refused += 1;
        }
    }
    assert!(refused >= 150, "connections beyond the cap get a 503: {refused} of {}", held.len() - 1);
    drop(held);
    let back = wait_for(std::time::Duration::from_secs(15), || {
        let r = s.get("/metrics", Some(&admin));
        (r.status == 200).then_some(())
    });
    assert!(back.is_some(), "the server serves again once the connections are gone");
}

#[test]
fn a_misspelt_setting_stops_the_start_with_its_name() {
    let dir = temp_dir("http-bad-config");
    let config = dir.path().join("atelier.toml");
    let serve_with = |text: &str| -> String {
        std::fs::write(&config, text).unwrap();
        let out = std::process::Command::new(exe())
            .args([
                "serve",
                "--config",
                config.to_str().unwrap(),
                "--data-dir",
                dir.path().join("data").to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{text}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let stderr = serve_with("listen = \"127.0.0.1:0\"\nmax_conections = 5\n");
    assert!(
        stderr.contains("unknown setting 'max_conections'") && stderr.contains("max_connections"),
        "{stderr}"
    );
    // In the executors' tables, the line too.
    let stderr = serve_with("[workers]\nmax_concurrent_jobs = 2\n\n[pipelines.a]\nmemory_mb = 1\n");
    assert!(stderr.contains("config file line 5: setting 'pipelines.a.memory_mb'"), "{stderr}");
}

/// Workers fill the artifacts dir, so a job could leave a file under the name of an image another
/// job makes: an artifact is served only when its content hashes to its name, and never through
/// a link or from a FIFO.
#[test]
fn an_artifact_is_served_only_when_it_hashes_to_its_name() {
    let dir = temp_dir("artifact-hash");
    let s = server(&dir);
    let alice = token("alice", false);
    let id =
        s.create(&alice, json!({"context": {"title": "Cats", "text": "meow"}}))["task_id"].as_u64().unwrap();
    let done = s.completed(id, &alice, std::time::Duration::from_secs(60)).expect("the commission completes");
    let uri = done["artifacts"][0]["uri"].as_str().expect("an image").to_string();
    let original = s.get(&uri, None);
    assert_eq!(original.status, 200);
    let file = dir.path().join(uri.trim_start_matches('/'));
    let swapped = |s: &Server, what: &str| {
        let r = s.get(&uri, None);
        assert_eq!(r.status, 404, "{what}: {}", r.text());
        assert_eq!(r.code(), "not_found", "{what}");
    };
    std::fs::write(&file, b"\x89PNG other content").unwrap();
    swapped(&s, "other content under the name");
    std::fs::remove_file(&file).unwrap();
    std::os::unix::fs::symlink(dir.path().join("secret"), &file).unwrap();
    swapped(&s, "a link");
    std::fs::remove_file(&file).unwrap();
    let c = std::ffi::CString::new(file.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    swapped(&s, "a FIFO");
    std::fs::remove_file(&file).unwrap();
    std::fs::write(&file, &original.body).unwrap();
    assert_eq!(s.get(&uri, None).body, original.body, "the right content is served again");
}
