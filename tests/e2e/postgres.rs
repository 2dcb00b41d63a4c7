//! `atelier serve` on PostgreSQL (`ATELIER_DATABASE_URL`): commissions run and stream as on
//! sled; a stream resumes across a server restart without gap or duplicate; while the
//! database is down, a create answers 503 `storage_unavailable` at once, `/readyz` 503, and
//! open streams stay open and catch up once it is back; `replay --check` is clean after. And
//! the server SIGKILLed 20 times under 64 appenders loses no acknowledged create.

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

/// `atelier replay --check` on the log in the database at `url`.
fn replay_check(data_dir: &Path, url: &str) -> std::process::Output {
    Command::new(exe())
        .args(["replay", "--check"])
        .env("ATELIER_DATA_DIR", data_dir)
        .env("ATELIER_DATABASE_URL", url)
        .env("ATELIER_SECRET", SECRET)
        .output()
        .expect("run replay --check")
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

    let out = replay_check(dir.path(), &url);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "replay --check: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("projections match the log"), "{stdout}");
}

/// How many times the server is killed under load, and how many clients append meanwhile.
const KILL_ROUNDS: u64 = 20;
const APPENDERS: usize = 64;

/// 64 clients create commissions while the server is SIGKILLed, 20 times over, each time after
/// a different stretch of load: every commission a client saw acknowledged (201) is in the
/// log afterwards with its `created` event, under that client's user (so that an id handed out
/// twice, once before a lost commit and once after, cannot pass for the lost one), and
/// `replay --check` is clean.
#[test]
fn kill_9_under_64_appenders_20_times_loses_no_acknowledged_event() {
    let pg = PgServer::start();
    let url = pg.fresh_database("kill9");
    let dir = temp_dir("pg-kill9");
    let env = [("ATELIER_DATABASE_URL", url.as_str())];
    // Admins, so that no fair-share limit refuses the load; one user per appender.
    let users: Vec<(String, String)> =
        (0..APPENDERS).map(|i| (format!("kill{i}"), token(&format!("kill{i}"), true))).collect();
    let mut acked = Vec::new();
    let mut listen = "127.0.0.1:0".to_string();
    for round in 0..KILL_ROUNDS {
        let s = Server::start_on(exe(), dir.path(), &env, &listen);
        listen = s.addr.to_string();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let base = format!("http://{listen}");
        let (acks, round_acked) = std::thread::scope(|scope| {
            let appenders: Vec<_> =
                users.iter().map(|u| scope.spawn(|| append_until_refused(&base, u, &stop))).collect();
            // A different moment in each round: early (the first appends in flight) to late.
            std::thread::sleep(Duration::from_millis(150 + (round * 97) % 600));
            s.kill();
            stop.store(true, std::sync::atomic::Ordering::Release);
            let ids: Vec<(u64, String)> =
                appenders.into_iter().flat_map(|a| a.join().expect("an appender")).collect();
            (ids.len(), ids)
        });
        assert!(acks > 0, "round {round}: some creates were acknowledged before the kill");
        acked.extend(round_acked);
    }
    let listed =
        pg.psql(&database_name(&url), "SELECT commission_id, user_id FROM atelier.events WHERE version = 1");
    let stored: std::collections::HashSet<(u64, String)> = listed
        .lines()
        .map(|l| l.split_once('|').expect("id|user"))
        .map(|(id, user)| (id.parse().expect("a commission id"), user.to_string()))
        .collect();
    let lost: Vec<_> = acked.iter().filter(|id| !stored.contains(id)).collect();
    assert!(lost.is_empty(), "{} of {} acknowledged creates lost: {lost:?}", lost.len(), acked.len());
    eprintln!("{} creates acknowledged over {KILL_ROUNDS} kills, all in the log", acked.len());
    let out = replay_check(dir.path(), &url);
    assert!(out.status.success(), "replay --check: {}", String::from_utf8_lossy(&out.stdout));
}

/// Creates commissions one after another until the server stops answering; the ids of those
/// acknowledged with 201.
fn append_until_refused(
    base: &str,
    (user, token): &(String, String),
    stop: &std::sync::atomic::AtomicBool,
) -> Vec<(u64, String)> {
    let client = atelier_http::client::Client::new(base, token).expect("a client");
    let mut ids = Vec::new();
    while !stop.load(std::sync::atomic::Ordering::Acquire) {
        match client.json("POST", "/api/commissions", Some(&noop())) {
            Ok((201, body)) => {
                ids.push((body["task_id"].as_u64().expect("a created commission has an id"), user.clone()))
            }
            Ok((status, body)) => panic!("a create answered {status}: {body}"),
            Err(e @ atelier_http::client::ClientError::Api { .. }) => panic!("a create was refused: {e}"),
            // The kill: the connection is refused or cut mid-answer (not acknowledged).
            Err(_) => break,
        }
    }
    ids
}

fn database_name(url: &str) -> String {
    url.rsplit('/').next().and_then(|tail| tail.split('?').next()).expect("a database in the URL").to_string()
}

/// Servers on one database share an artifacts dir (`ATELIER_ARTIFACTS_DIR`): a server that
/// did not run a commission serves its image all the same; with only its own data dir, it
/// could not.
#[test]
fn a_shared_artifacts_dir_lets_another_server_serve_what_one_made() {
    let url = PgServer::shared().fresh_database("artifacts");
    let shared = temp_dir("pg-artifacts");
    let (dir_a, dir_b) = (temp_dir("pg-artifacts-a"), temp_dir("pg-artifacts-b"));
    let art = shared.path().display().to_string();
    let env = [("ATELIER_DATABASE_URL", url.as_str()), ("ATELIER_ARTIFACTS_DIR", art.as_str())];
    let alice = token("alice", false);
    let a = Server::start(exe(), dir_a.path(), &env);
    let id = a.create(&alice, json!({"context": {"title": "Cats", "text": "meow"}}))["task_id"]
        .as_u64()
        .expect("an id");
    let done = a.completed(id, &alice, Duration::from_secs(60)).expect("the commission completes");
    let uri = done["artifacts"][0]["uri"].as_str().expect("an image").to_string();
    let png = a.get(&uri, None);
    assert_eq!(png.status, 200);
    assert!(png.body.starts_with(b"\x89PNG"), "a PNG");
    assert!(std::fs::read_dir(dir_a.path().join("artifacts")).is_err(), "nothing under the data dir");
    a.stop();

    let alone = Server::start(exe(), dir_b.path(), &env[..1]);
    assert_eq!(alone.get(&uri, None).status, 404, "a server with only its own data dir lacks it");
    alone.stop();
    let b = Server::start(exe(), dir_b.path(), &env);
    let served = b.get(&uri, None);
    assert_eq!(served.status, 200, "{}", served.text());
    assert_eq!(served.body, png.body);
    b.stop();

    let relative = Command::new(exe())
        .arg("serve")
        .env("ATELIER_DATA_DIR", dir_b.path())
        .env("ATELIER_DATABASE_URL", &url)
        .env("ATELIER_ARTIFACTS_DIR", "shared/artifacts")
        .output()
        .expect("run serve");
    let stderr = String::from_utf8_lossy(&relative.stderr);
    assert_eq!(relative.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("ARTIFACTS_DIR") && stderr.contains("not an absolute path"), "{stderr}");
}

/// Servers share a database as nodes, each under its own id: a second server with another
/// data dir starts beside the first, while a second one with the same node id is refused by
/// name; `replay --check` (which needs the database to itself) is refused while a node runs;
/// a node SIGKILLed comes back at once under its id. And a node whose lease lapsed appends
/// nothing until it has rejoined with a new lease.
#[test]
fn nodes_share_a_database_and_a_node_whose_lease_lapsed_appends_nothing() {
    let pg = PgServer::shared();
    let url = pg.fresh_database("nodes");
    let (dir_a, dir_b, dir_c) = (temp_dir("pg-node-a"), temp_dir("pg-node-b"), temp_dir("pg-node-c"));
    let env = [("ATELIER_DATABASE_URL", url.as_str())];
    let alice = token("alice", false);
    let a = Server::start(exe(), dir_a.path(), &[env[0], ("ATELIER_NODE_ID", "a")]);
    let b = Server::start(exe(), dir_b.path(), &[env[0], ("ATELIER_NODE_ID", "b")]);
    let id = a.create(&alice, noop())["task_id"].as_u64().expect("an id");
    assert!(b.completed(id, &alice, Duration::from_secs(30)).is_some(), "B sees what A took");
    let same_id = Command::new(exe())
        .arg("serve")
        .env("ATELIER_DATA_DIR", dir_c.path())
        .env("ATELIER_DATABASE_URL", &url)
        .env("ATELIER_NODE_ID", "a")
        .env("ATELIER_NODE_LEASE_MS", "1000")
        .env("ATELIER_NODE_HEARTBEAT_MS", "300")
        .env("ATELIER_SECRET", SECRET)
        .env("ATELIER_LISTEN", "127.0.0.1:0")
        .output()
        .expect("run a second node a");
    let stderr = String::from_utf8_lossy(&same_id.stderr);
    assert!(!same_id.status.success(), "{stderr}");
    assert!(
        stderr.contains("node id a is in use") && stderr.contains(&format!("pid {}", a.pid())),
        "the holder is named: {stderr}"
    );
    let check = replay_check(dir_c.path(), &url);
    assert!(!check.status.success(), "replay --check waits for the nodes to stop");

    // A crashed node comes back at once under its id (its earlier run is gone).
    a.kill();
    let started = Instant::now();
    let a = Server::start(exe(), dir_a.path(), &[env[0], ("ATELIER_NODE_ID", "a")]);
    assert!(started.elapsed() < Duration::from_secs(5), "no wait for a dead run's lease");

    // B's lease lapses by the database's clock (as when B froze): B appends nothing more
    // until it has taken a new lease, and then it does again.
    let mut db = postgres::Client::connect(&url, postgres::NoTls).expect("a session of the test's own");
    let incarnation = |db: &mut postgres::Client| -> i64 {
        db.query_one("SELECT incarnation FROM atelier.nodes WHERE id = 'b'", &[]).unwrap().get(0)
    };
    let before = incarnation(&mut db);
    db.execute(
        "UPDATE atelier.nodes SET lease_until = clock_timestamp() - interval '1 second' WHERE id = 'b'",
        &[],
    )
    .expect("lapse B's lease");
    let refused = b.post("/api/commissions", Some(&alice), &noop());
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert!(refused.text().contains("lost its lease"), "{}", refused.text());
    let back = wait_for(Duration::from_secs(10), || {
        let r = b.post("/api/commissions", Some(&alice), &noop());
        (r.status == 201).then_some(())
    });
    assert!(back.is_some(), "B rejoins and appends again");
    assert_eq!(incarnation(&mut db), before + 1, "as a new run");
    let cluster = a.get("/api/cluster", Some(&token("root", true))).json();
    let ids: Vec<&str> =
        cluster["nodes"].as_array().unwrap().iter().filter_map(|n| n["id"].as_str()).collect();
    assert_eq!(ids, ["a", "b"], "{cluster}");
    assert_eq!(cluster["node"], "a");
    drop(b);
}

/// A self-signed certificate (PEM) for `localhost` and its key.
fn localhost_cert() -> (String, String) {
    let rcgen::CertifiedKey { cert, key_pair } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("a self-signed certificate");
    (cert.pem(), key_pair.serialize_pem())
}

/// `ATELIER_DATABASE_CA`: every connection to the database is TLS, verified against that CA (a
/// real PostgreSQL with `ssl = on`, over TCP); a server whose certificate the CA did not sign
/// is refused at start, and a CA with `sslmode=disable` is a configuration error.
#[test]
fn the_database_ca_makes_every_connection_tls_and_verified() {
    let (cert, key) = localhost_cert();
    let pg = PgServer::start_tls(&cert, &key);
    let db = "tlsdb";
    pg.psql("postgres", &format!("CREATE DATABASE {db}"));
    let url = pg.tcp_url(db);
    let dir = temp_dir("pg-tls");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &cert).unwrap();
    let ca_text = ca.display().to_string();
    let env = [("ATELIER_DATABASE_URL", url.as_str()), ("ATELIER_DATABASE_CA", ca_text.as_str())];
    let alice = token("alice", false);
    let s = Server::start(exe(), dir.path(), &env);
    s.create(&alice, noop());
    assert!(all_completed(&s, &alice, 1), "a commission runs over TLS");
    let plain = pg.psql(
        db,
        "SELECT count(*) FILTER (WHERE NOT s.ssl), count(*) FROM pg_stat_ssl s
         JOIN pg_stat_activity a USING (pid) WHERE a.application_name LIKE 'atelier%'",
    );
    let (plain, all) = plain.split_once('|').expect("two counts");
    assert_eq!(plain, "0", "no plain-text connection of the server's ({all} in all)");
    assert!(all.parse::<u32>().unwrap() >= 3, "the writer, the follower and the lock at least: {all}");
    s.stop();

    let (other_cert, _) = localhost_cert();
    let wrong = dir.path().join("wrong-ca.pem");
    std::fs::write(&wrong, other_cert).unwrap();
    let refused = |url: &str, ca: &Path| {
        let out = Command::new(exe())
            .args(["replay", "--check"])
            .env("ATELIER_DATA_DIR", dir.path())
            .env("ATELIER_DATABASE_URL", url)
            .env("ATELIER_DATABASE_CA", ca)
            .env("ATELIER_SECRET", SECRET)
            .output()
            .expect("run replay --check");
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let stderr = refused(&url, &wrong);
    assert!(stderr.contains("connect") && stderr.to_lowercase().contains("certificate"), "{stderr}");
    let stderr = refused(&format!("{url}?sslmode=disable"), &ca);
    assert!(stderr.contains("sslmode=disable"), "{stderr}");
}
