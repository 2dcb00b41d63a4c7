//! `atelier serve` on PostgreSQL (`ATELIER_DATABASE_URL`): commissions run and stream as on
//! sled; a stream resumes across a server restart without gap or duplicate; while the
//! database is down, a create answers 503 `storage_unavailable` at once, `/readyz` 503, and
//! open streams stay open and catch up once it is back; `replay --check` is clean after.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use atelier_pg_harness::PgServer;
use atelier_tests::*;

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_atelier"))
}

fn noop() -> Value {
    json!({"context": {"title": "t"}, "pipeline": "noop"})
}

/// The stream's events up to the log's head (heartbeats keep a stream from timing out, so
/// reading until a silence would never end).
fn events_upto(sse: &mut Sse, head: u64, seen: &mut Vec<u64>) {
    while seen.last().is_none_or(|last| *last < head) {
        seen.push(sse.next().expect("an event up to the head").id.expect("every event has its seq"));
    }
}

fn all_completed(s: &Server, token: &str, n: usize) -> bool {
    wait_for(Duration::from_secs(60), || {
        let page = s.get("/api/commissions/user/alice?limit=50", Some(token)).json();
        let items = page["items"].as_array()?.clone();
        (items.len() == n && items.iter().all(|c| c["state"] == "completed")).then_some(())
    })
    .is_some()
}

#[test]
fn serve_on_postgres_streams_resumes_and_rides_out_an_outage() {
    let pg = PgServer::start();
    let url = pg.fresh_database("serve");
    let dir = temp_dir("pg-serve");
    let env = [("ATELIER_DATABASE_URL", url.as_str()), ("ATELIER_HEARTBEAT_MS", "200")];
    let alice = token("alice", false);
    let admin = token("root", true);
    let mut s = Server::start(exe(), dir.path(), &env);
    for _ in 0..4 {
        s.create(&alice, noop());
    }
    assert!(all_completed(&s, &alice, 4), "noop commissions complete on PostgreSQL");
    let mut seen = Vec::new();
    let mut sse = Sse::open(s.addr, "/api/commissions/user/alice/stream", &alice, None);
    sse.set_timeout(Duration::from_secs(5));
    events_upto(&mut sse, s.head_seq(), &mut seen);
    assert!(seen.len() >= 4 * 8, "4 noop runs: {seen:?}");

    // The database goes away under a live stream.
    let mut live = Sse::open(s.addr, "/api/commissions/user/alice/stream", &alice, seen.last().copied());
    live.set_timeout(Duration::from_secs(20));
    pg.stop_immediate();
    let started = Instant::now();
    let refused = s.post("/api/commissions", Some(&alice), &noop());
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(refused.code(), "storage_unavailable");
    assert!(started.elapsed() < Duration::from_secs(5), "refused fast: {:?}", started.elapsed());
    let ready = s.readyz_becomes(503, Duration::from_secs(5));
    assert_eq!(ready.status, 503, "{}", ready.text());
    assert_eq!(ready.code(), "not_ready");
    std::thread::sleep(Duration::from_millis(600));
    pg.start_again();
    assert_eq!(s.readyz_becomes(200, Duration::from_secs(20)).status, 200, "ready again by itself");
    s.create(&alice, noop());
    let caught_up = live.next().expect("the open stream carries on after the outage");
    assert!(caught_up.id > seen.last().copied(), "{caught_up:?}");
    seen.push(caught_up.id.expect("a seq"));
    drop(live);

    // A crash of the server; the stream resumes from its last seq on the restarted one.
    let addr = s.addr.to_string();
    s.kill();
    s = Server::start_on(exe(), dir.path(), &env, &addr);
    s.create(&alice, noop());
    assert!(all_completed(&s, &alice, 6), "every commission completes after the restart");
    let head = s.head_seq();
    let mut sse = Sse::open(s.addr, "/api/commissions/user/alice/stream", &alice, seen.last().copied());
    sse.set_timeout(Duration::from_secs(5));
    events_upto(&mut sse, head, &mut seen);
    let mut all = Sse::open(s.addr, "/api/events/stream", &admin, None);
    all.set_timeout(Duration::from_secs(5));
    let mut expected = Vec::new();
    events_upto(&mut all, head, &mut expected);
    assert_eq!(seen, expected, "resumed streams = the full history, in order, no gaps or duplicates");
    s.stop();

    let out = Command::new(exe())
        .args(["replay", "--check"])
        .env("ATELIER_DATA_DIR", dir.path())
        .env("ATELIER_DATABASE_URL", &url)
        .env("ATELIER_SECRET", "x".repeat(32))
        .output()
        .expect("run replay --check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "replay --check: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("projections match the log"), "{stdout}");
}
