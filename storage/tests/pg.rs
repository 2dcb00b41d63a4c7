//! What the PostgreSQL backend adds to the conformance suite (`store.rs`): the global order
//! under concurrent writers of several nodes, the database's own guard on versions, schema
//! versions, and outages.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use atelier_engine::{Event, State};
use atelier_storage::{
    create, AppendOutcome, AppendRequest, AppendTarget, Created, EventStore, Filter, PgConfig, PgStore,
    StorageError, PG_SCHEMA_VERSION,
};
use common::*;
use postgres::{Client, NoTls};

fn open(url: &str) -> Arc<PgStore> {
    PgStore::open(PgConfig::new(url)).expect("open the PostgreSQL store")
}

fn created(store: &dyn EventStore, user: &str) -> u64 {
    match create(store, new_commission(user, None), &ctx(1_000)).unwrap().unwrap() {
        Created::New(c) => c.id,
        Created::Existing(_) => panic!("no key, no duplicate"),
    }
}

fn committed_seqs(raw: &mut Client, after: i64) -> Vec<i64> {
    raw.query("SELECT seq FROM atelier.events WHERE seq > $1 ORDER BY seq", &[&after])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// A group commit holds the head row from taking its seqs to its commit. While one is open,
/// no other writer (of this node or another) commits a higher seq, so a reader of committed
/// rows never sees seq n+1 without seq n; here a transaction holds the lock while two nodes
/// append, and then many appenders race while a reader checks every read is gap-free.
#[test]
fn a_reader_never_skips_a_lower_seq_while_a_group_commit_is_open() {
    let url = pg_url("order");
    let (a, b) = (open(&url), open(&url));
    created(&*a, "alice");
    let mut holder = Client::connect(&url, NoTls).unwrap();
    let mut open_commit = holder.transaction().unwrap();
    open_commit.query_one("SELECT seq FROM atelier.head FOR UPDATE", &[]).unwrap();
    let acked = Arc::new(AtomicUsize::new(0));
    let appenders: Vec<_> = [a.clone(), b.clone()]
        .into_iter()
        .map(|s| {
            let acked = acked.clone();
            std::thread::spawn(move || {
                created(&*s, "bob");
                acked.fetch_add(1, Ordering::SeqCst);
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut reader = Client::connect(&url, NoTls).unwrap();
    assert_eq!(committed_seqs(&mut reader, 0), vec![1], "nothing commits past an open group commit");
    assert_eq!(acked.load(Ordering::SeqCst), 0, "no append is acknowledged meanwhile");
    open_commit.commit().unwrap();
    for h in appenders {
        h.join().unwrap();
    }
    assert_eq!(committed_seqs(&mut reader, 0), vec![1, 2, 3]);

    // Many appenders on two nodes; the reader follows committed rows from its cursor.
    let done = Arc::new(AtomicBool::new(false));
    let follower = {
        let done = done.clone();
        let url = url.clone();
        std::thread::spawn(move || {
            let mut reader = Client::connect(&url, NoTls).unwrap();
            let mut cursor = 3i64;
            loop {
                let last_round = done.load(Ordering::SeqCst);
                for seq in committed_seqs(&mut reader, cursor) {
                    assert_eq!(seq, cursor + 1, "a reader saw seq {seq} before seq {}", cursor + 1);
                    cursor = seq;
                }
                if last_round {
                    return cursor;
                }
            }
        })
    };
    let appenders: Vec<_> = (0..6)
        .map(|t| {
            let s = if t % 2 == 0 { a.clone() } else { b.clone() };
            std::thread::spawn(move || {
                for _ in 0..40 {
                    created(&*s, "carol");
                }
            })
        })
        .collect();
    for h in appenders {
        h.join().unwrap();
    }
    done.store(true, Ordering::SeqCst);
    assert_eq!(follower.join().unwrap(), 3 + 6 * 40);
    // Each node's subscribers see the whole log once, in order, whoever wrote it.
    for store in [&a, &b] {
        let mut sub = store.subscribe(0, Filter::All).unwrap();
        let seqs: Vec<u64> = std::iter::from_fn(|| sub.next_timeout(Duration::from_secs(2)).unwrap())
            .map(|d| d.env.seq)
            .collect();
        assert_eq!(seqs, (1..=243).collect::<Vec<u64>>());
    }
}

/// The database refuses a second version n of a commission whatever writes it, and two nodes
/// racing on one commission end with one contiguous run of versions.
#[test]
fn two_writers_never_both_append_version_n() {
    let url = pg_url("versions");
    let (a, b) = (open(&url), open(&url));
    let id = created(&*a, "alice");
    let mut raw = Client::connect(&url, NoTls).unwrap();
    let dup = raw.execute(
        "INSERT INTO atelier.events (seq, commission_id, version, user_id, envelope, view)
         VALUES (1000, $1, 1, 'alice', '', '')",
        &[&i64::try_from(id).unwrap()],
    );
    let code = dup.expect_err("version 1 exists").code().cloned();
    assert_eq!(code, Some(postgres::error::SqlState::UNIQUE_VIOLATION));

    let racers: Vec<_> = [a.clone(), b.clone()]
        .into_iter()
        .map(|s| {
            std::thread::spawn(move || {
                let mut appended = 0;
                for _ in 0..30 {
                    let v = s.commission(id).unwrap().unwrap().version;
                    let out = s
                        .append(AppendRequest {
                            target: AppendTarget::Existing(id),
                            expected_version: v,
                            events: vec![Event::CancelRequested],
                            at: 5,
                        })
                        .unwrap();
                    match out {
                        AppendOutcome::Appended { .. } => appended += 1,
                        AppendOutcome::Conflict { current_version } => assert!(current_version > v),
                        other => panic!("{other:?}"),
                    }
                }
                appended
            })
        })
        .collect();
    let appended: u64 = racers.into_iter().map(|h| h.join().unwrap()).sum();
    let events = a.events_of(id).unwrap();
    assert_eq!(events.len() as u64, 1 + appended);
    assert!(events.iter().zip(1..).all(|(e, v)| e.version == v), "versions are 1..=n, once each");
}

#[test]
fn a_database_migrated_by_a_newer_atelier_is_refused_by_name() {
    let url = pg_url("newer");
    drop(open(&url));
    let mut raw = Client::connect(&url, NoTls).unwrap();
    raw.execute("INSERT INTO atelier.schema_migrations (version) VALUES ($1)", &[&(PG_SCHEMA_VERSION + 1)])
        .unwrap();
    match PgStore::open(PgConfig::new(&url)) {
        Err(e @ StorageError::NewerDatabaseSchema { .. }) => {
            assert!(e.to_string().contains("upgrade Atelier"), "{e}")
        }
        other => panic!("expected NewerDatabaseSchema, got {:?}", other.map(|_| ())),
    }
}

/// Waits up to `limit` for `cond`.
fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cond()
}

/// PostgreSQL crashes (`pg_ctl stop -m immediate`) under load and comes back: while it is
/// away appends fail fast with `Unavailable` and `health` says so; afterwards appends resume
/// by themselves, every acknowledged append is there, and a live subscription catches up
/// with the whole log, in order.
#[test]
fn an_outage_fails_appends_fast_and_loses_no_acknowledged_event() {
    let server = atelier_pg_harness::PgServer::start();
    let url = server.fresh_database("outage");
    let store = open(&url);
    let mut sub = store.subscribe(0, Filter::All).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let appenders: Vec<_> = (0..4)
        .map(|_| {
            let (store, stop) = (store.clone(), stop.clone());
            std::thread::spawn(move || {
                let (mut acked, mut refused, mut slowest_refusal) = (Vec::new(), 0, Duration::ZERO);
                while !stop.load(Ordering::SeqCst) {
                    let started = Instant::now();
                    match create(&*store, new_commission("alice", None), &ctx(1)) {
                        Ok(Ok(Created::New(c))) => acked.push(c.id),
                        Ok(other) => panic!("{other:?}"),
                        Err(StorageError::Unavailable { .. }) => {
                            refused += 1;
                            slowest_refusal = slowest_refusal.max(started.elapsed());
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        Err(e) => panic!("an outage is Unavailable, not {e}"),
                    }
                }
                (acked, refused, slowest_refusal)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    server.stop_immediate();
    assert!(eventually(Duration::from_secs(5), || store.health().is_err()), "health follows the outage");
    std::thread::sleep(Duration::from_millis(500));
    server.start_again();
    assert!(eventually(Duration::from_secs(15), || store.health().is_ok()), "health follows the return");
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    let mut acked = Vec::new();
    let mut refused = 0;
    for h in appenders {
        let (ids, r, slowest) = h.join().unwrap();
        assert!(slowest < Duration::from_secs(3), "a refusal took {slowest:?}");
        acked.extend(ids);
        refused += r;
    }
    assert!(refused > 0, "some appends met the outage");
    for id in &acked {
        assert!(store.commission(*id).unwrap().is_some(), "acknowledged commission {id} is there");
    }
    let head = store.head_seq();
    assert!(head >= acked.len() as u64);
    let mut seqs = Vec::new();
    while let Some(d) = sub.next_timeout(Duration::from_secs(5)).unwrap() {
        seqs.push(d.env.seq);
        if d.env.seq == head {
            break;
        }
    }
    assert_eq!(seqs, (1..=head).collect::<Vec<u64>>(), "the live subscription caught up in order");
}

/// `replay --check` folds the log again and finds the tables equal; a doctored projection
/// is reported by name; the export reads the same log as the sled store's.
#[test]
fn replay_check_matches_the_tables_and_reports_a_doctored_one() {
    let url = pg_url("check");
    let store = open(&url);
    let id = created(&*store, "alice");
    for (i, cmd) in full_run(store.allocate_job_id().unwrap()).into_iter().enumerate() {
        atelier_storage::execute(&*store, id, cmd, &ctx(2_000 + i as i64)).unwrap().unwrap();
    }
    let keyed = match create(&*store, new_commission("bob", Some("k")), &ctx(5)).unwrap().unwrap() {
        Created::New(c) => c.id,
        Created::Existing(_) => panic!("a fresh key"),
    };
    let report = store.replay_check().unwrap();
    assert!(report.diff.is_empty(), "{:?}", report.diff);
    assert_eq!((report.events, report.commissions, report.jobs), (store.head_seq(), 2, 1));
    let mut out = Vec::new();
    assert_eq!(atelier_storage::check::export(&*store, &mut out).unwrap(), store.head_seq());

    let mut raw = Client::connect(&url, NoTls).unwrap();
    raw.execute(
        "UPDATE atelier.commissions SET live = NOT live WHERE id = $1",
        &[&i64::try_from(keyed).unwrap()],
    )
    .unwrap();
    raw.execute("DELETE FROM atelier.idempotency", &[]).unwrap();
    raw.execute("UPDATE atelier.state_counts SET n = n + 1 WHERE n > 0", &[]).unwrap();
    let diff = store.replay_check().unwrap().diff;
    assert_eq!(diff.len(), 3, "{diff:?}");
    assert!(diff[0].starts_with(&format!("commissions: {keyed} columns")), "{diff:?}");
    assert!(diff[1].starts_with("idempotency: (bob, k)"), "{diff:?}");
    assert!(diff[2].starts_with("state_counts: stored"), "{diff:?}");
}

/// The state counts (`/metrics`' `atelier_commissions{state}`) are a table each group commit
/// moves: after creates, a run to completion, a cancel and an import they equal a count of the
/// commissions by state, and `replay --check` agrees.
#[test]
fn the_state_counts_follow_every_group_commit() {
    let url = pg_url("counts");
    let store = open(&url);
    let ids: Vec<u64> = (0..5).map(|_| created(&*store, "alice")).collect();
    for (i, cmd) in full_run(store.allocate_job_id().unwrap()).into_iter().enumerate() {
        atelier_storage::execute(&*store, ids[0], cmd, &ctx(2_000 + i as i64)).unwrap().unwrap();
    }
    atelier_storage::execute(&*store, ids[1], atelier_engine::Command::RequestCancel, &ctx(9))
        .unwrap()
        .unwrap();
    let mut raw = Client::connect(&url, NoTls).unwrap();
    let counted: Vec<(i16, i64)> = raw
        .query("SELECT state, count(*) FROM atelier.commissions GROUP BY state ORDER BY state", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let stored: Vec<(i16, i64)> = raw
        .query("SELECT state, n FROM atelier.state_counts WHERE n <> 0 ORDER BY state", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(stored, counted);
    assert_eq!(counted.iter().map(|(_, n)| n).sum::<i64>(), 5);
    assert!(counted.len() >= 3, "created, completed and a cancel's state: {counted:?}");
    let total: u64 = store.state_counts().unwrap().iter().map(|(_, n)| n).sum();
    assert_eq!(total, 5);
    assert!(store.replay_check().unwrap().diff.is_empty());

    // A database of schema 1 (before the table, and before the nodes of schema 3) gets it
    // filled from its commissions, and migrates on to the newest schema.
    store.close();
    drop(store);
    raw.batch_execute(
        "DROP TABLE atelier.state_counts, atelier.nodes, atelier.claims;
         ALTER TABLE atelier.jobs DROP COLUMN node, DROP COLUMN incarnation;
         DELETE FROM atelier.schema_migrations WHERE version >= 2",
    )
    .unwrap();
    let store = open(&url);
    let mut again: Vec<(State, u64)> = store.state_counts().unwrap();
    again.retain(|(_, n)| *n != 0);
    assert_eq!(again.iter().map(|(_, n)| n).sum::<u64>(), 5, "{again:?}");
    assert!(store.replay_check().unwrap().diff.is_empty());
}

/// A log exported from a data dir's sled store imports into an empty PostgreSQL log and reads
/// the same there (snapshots, jobs, `replay --check` clean); a second import is refused, and a
/// line the state machine refuses loads nothing.
#[test]
fn a_sled_export_imports_into_postgres_and_reads_the_same() {
    let sled = common::sled_backend("export");
    let from = sled.open();
    let id = created(&*from, "alice");
    for (i, cmd) in full_run(from.allocate_job_id().unwrap()).into_iter().enumerate() {
        atelier_storage::execute(&*from, id, cmd, &ctx(2_000 + i as i64)).unwrap().unwrap();
    }
    create(&*from, new_commission("bob", Some("k")), &ctx(5)).unwrap().unwrap();
    let mut exported = Vec::new();
    let n = atelier_storage::check::export(&*from, &mut exported).unwrap();

    let url = pg_url("import");
    let to = open(&url);
    assert_eq!(atelier_storage::check::import(&*to, &mut &exported[..]).unwrap(), n);
    assert_eq!(to.head_seq(), n);
    assert_eq!(to.read_log(0, usize::MAX).unwrap(), from.read_log(0, usize::MAX).unwrap());
    assert_eq!(to.commission(id).unwrap(), from.commission(id).unwrap());
    assert_eq!(to.jobs_of(id).unwrap(), from.jobs_of(id).unwrap());
    assert!(to.replay_check().unwrap().diff.is_empty());
    // The key came along: the same create is a duplicate.
    assert!(matches!(
        create(&*to, new_commission("bob", Some("k")), &ctx(6)).unwrap().unwrap(),
        Created::Existing(_)
    ));
    let again = atelier_storage::check::import(&*to, &mut &exported[..]);
    assert!(matches!(again, Err(StorageError::Import { line: 0, .. })), "{again:?}");

    let bad = open(&pg_url("import-bad"));
    let text = String::from_utf8(exported).unwrap();
    let broken: String =
        text.lines().filter(|l| !l.contains("\"seq\":2,")).map(|l| format!("{l}\n")).collect();
    match atelier_storage::check::import(&*bad, &mut broken.as_bytes()) {
        Err(StorageError::Import { line: 2, .. }) => {}
        other => panic!("expected the second line refused, got {other:?}"),
    }
    assert_eq!(bad.read_log(0, usize::MAX).unwrap(), Vec::new(), "nothing of a refused import is kept");
}

/// `NOTIFY` only wakes a node's log follower; what it publishes it reads from its cursor. Here
/// every follower's connection is cut and kept from coming back (the database takes no new
/// connections) while node A appends on the connection it holds, so each notification of
/// those appends is lost: node B's subscriber still gets every event, once, in order, after
/// its follower reconnects.
#[test]
fn a_lost_notification_costs_latency_never_an_event() {
    let url = pg_url("lostnotify");
    let (a, b) = (open(&url), open(&url));
    let mut sub = b.subscribe(0, Filter::All).unwrap();
    created(&*a, "alice");
    let first = sub.next_timeout(Duration::from_secs(5)).unwrap().expect("B follows A's log");
    assert_eq!(first.env.seq, 1);
    // A database cannot refuse connections to itself: this session is in another one.
    let (server, db) = url.rsplit_once('/').unwrap();
    let mut raw = Client::connect(&format!("{server}/postgres"), NoTls).unwrap();
    raw.batch_execute(&format!("ALTER DATABASE {db} WITH ALLOW_CONNECTIONS false")).unwrap();
    let cut: i64 = raw
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE datname = $1 AND application_name = $2",
            &[&db, &atelier_storage::PG_FOLLOWER_APPLICATION_NAME],
        )
        .unwrap()
        .get(0);
    assert_eq!(cut, 2, "each node's follower holds one connection");
    for _ in 0..20 {
        created(&*a, "alice");
    }
    assert_eq!(
        sub.next_timeout(Duration::from_millis(300)).unwrap().map(|d| d.env.seq),
        None,
        "B is cut off"
    );
    raw.batch_execute(&format!("ALTER DATABASE {db} WITH ALLOW_CONNECTIONS true")).unwrap();
    let mut seqs = Vec::new();
    while let Some(d) = sub.next_timeout(Duration::from_secs(5)).unwrap() {
        seqs.push(d.env.seq);
        if seqs.len() == 20 {
            break;
        }
    }
    assert_eq!(seqs, (2..=21).collect::<Vec<u64>>(), "every event after the cut, once, in order");
    assert_eq!(sub.next_timeout(Duration::from_millis(1_500)).unwrap().map(|d| d.env.seq), None);
}

/// Retention on PostgreSQL: an old terminal commission leaves the projections and its events
/// become stubs that keep their seqs; a live one stays; history, export and `events_of` skip
/// the stubs, the state counts follow, and `replay --check` is clean and counts them pruned.
#[test]
fn retention_prunes_old_terminal_commissions_and_keeps_the_seqs() {
    let url = pg_url("prune");
    let store = open(&url);
    let old = match create(&*store, new_commission("alice", Some("old")), &ctx(5)).unwrap().unwrap() {
        Created::New(c) => c.id,
        Created::Existing(_) => panic!("a fresh key"),
    };
    atelier_storage::execute(&*store, old, atelier_engine::Command::RequestCancel, &ctx(10))
        .unwrap()
        .unwrap();
    let live = created(&*store, "alice");
    let head = store.head_seq();
    assert_eq!(store.prune_terminal_before(1_000_000).unwrap(), 1);
    assert!(store.commission(old).unwrap().is_none());
    assert!(store.events_of(old).unwrap().is_empty());
    assert!(store.commission(live).unwrap().is_some());
    assert_eq!(store.head_seq(), head, "the seqs stay");
    let mut sub = store.subscribe(0, Filter::All).unwrap();
    let first = sub.next_timeout(Duration::from_secs(2)).unwrap().expect("the live commission's event");
    assert_eq!(first.env.commission_id, live);
    let mut out = Vec::new();
    assert_eq!(atelier_storage::check::export(&*store, &mut out).unwrap(), 1);
    // The export leaves out the pruned seqs; an import puts stubs in their place.
    let copy = open(&pg_url("prune_copy"));
    assert_eq!(atelier_storage::check::import(&*copy, &mut out.as_slice()).unwrap(), 1);
    assert_eq!(copy.head_seq(), head);
    let copied = copy.replay_check().unwrap();
    assert!(copied.diff.is_empty(), "{:?}", copied.diff);
    assert_eq!((copied.pruned, copied.commissions), (head - 1, 1));
    let counted: u64 = store.state_counts().unwrap().iter().map(|(_, n)| n).sum();
    assert_eq!(counted, 1);
    let report = store.replay_check().unwrap();
    assert!(report.diff.is_empty(), "{:?}", report.diff);
    assert_eq!(
        (report.events, report.pruned, report.commissions),
        (head, head - 1, 1),
        "all but the live one's"
    );
    // The key of a pruned commission is free again.
    match create(&*store, new_commission("alice", Some("old")), &ctx(20)).unwrap().unwrap() {
        Created::New(c) => assert!(c.id > live),
        Created::Existing(c) => panic!("the pruned commission came back: {}", c.id),
    }
    assert_eq!(store.prune_terminal_before(1_000_000).unwrap(), 0, "nothing more to prune");
}
