//! Behaviour of the event stores. The conformance tests (appends, concurrency, idempotency,
//! subscriptions, listings, reopening) are generic over the backend and run against sled and
//! PostgreSQL alike (`for_each_backend!`); the rest are sled's own (integrity, locking and
//! schema checks, export/import and replay).

mod common;

use std::sync::Arc;
use std::time::Duration;

use atelier_engine::{Command, Event, Rejection, State};
use atelier_storage::layout::{self, Projection};
use atelier_storage::{
    check, create, execute, AppendOutcome, AppendRequest, AppendTarget, Created, EventStore, Filter,
    ListQuery, SledStore, StorageError, StoreConfig, WRITER_BEAT_INTERVAL_MS,
};
use common::*;

fn open(dir: &TempDir) -> Arc<SledStore> {
    SledStore::open(StoreConfig::new(dir.path())).expect("open store")
}

/// A fresh store with one of alice's commissions, a job id for it and the commands of that
/// job's whole run.
fn alice_and_a_full_run(open: Open, name: &str) -> (Fixture, Arc<dyn EventStore>, u64, u64, Vec<Command>) {
    let f = open(name);
    let store = f.open();
    let id = created(&*store, "alice");
    let job = store.allocate_job_id().unwrap();
    (f, store, id, job, full_run(job))
}

fn created(store: &dyn EventStore, user: &str) -> u64 {
    match create(store, new_commission(user, None), &ctx(1_000)).unwrap().unwrap() {
        Created::New(c) => c.id,
        Created::Existing(_) => panic!("no key, no duplicate"),
    }
}

fn full_run_is_projected(open: Open) {
    let f = open("full");
    let store = f.open();
    let id = created(&*store, "alice");
    for (i, cmd) in full_run(store.allocate_job_id().unwrap()).into_iter().enumerate() {
        execute(&*store, id, cmd, &ctx(2_000 + i as i64)).unwrap().unwrap();
    }
    let c = store.commission(id).unwrap().unwrap();
    assert_eq!(c.state, State::Completed);
    assert_eq!(c.progress_percent(), 100);
    let events = store.events_of(id).unwrap();
    assert_eq!(events.len() as u64, c.version);
    assert!(events.windows(2).all(|w| w[1].seq == w[0].seq + 1 && w[1].version == w[0].version + 1));
    assert_eq!(store.jobs_of(id).unwrap().len(), 1);
    assert_eq!(store.read_log(0, usize::MAX).unwrap(), events);
}

fn version_conflict_is_an_outcome_and_appends_nothing(open: Open) {
    let f = open("conflict");
    let store = f.open();
    let id = created(&*store, "alice");
    let head = store.head_seq();
    let out = store
        .append(AppendRequest {
            target: AppendTarget::Existing(id),
            expected_version: 7,
            events: vec![Event::CancelRequested],
            at: 5,
        })
        .unwrap();
    assert!(matches!(out, AppendOutcome::Conflict { current_version: 1 }), "{out:?}");
    assert_eq!(store.head_seq(), head);
}

fn a_refused_event_in_a_batch_appends_none_of_it(open: Open) {
    let f = open("atomic");
    let store = f.open();
    let id = created(&*store, "alice");
    let head = store.head_seq();
    // cancel_requested is fine, but completed is not allowed from created: all or nothing.
    let out = store
        .append(AppendRequest {
            target: AppendTarget::Existing(id),
            expected_version: 1,
            events: vec![Event::CancelRequested, Event::Completed { result: "{}".into() }],
            at: 5,
        })
        .unwrap();
    assert!(matches!(out, AppendOutcome::Rejected(Rejection::IllegalTransition { .. })), "{out:?}");
    assert_eq!(store.head_seq(), head);
    assert_eq!(store.commission(id).unwrap().unwrap().version, 1);
}

fn idempotent_create_returns_the_first_commission_even_when_racing(open: Open) {
    let f = open("idem");
    let store = f.open();
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let s = store.clone();
            std::thread::spawn(move || {
                create(&*s, new_commission("alice", Some("k1")), &ctx(1)).unwrap().unwrap()
            })
        })
        .collect();
    let results: Vec<Created> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let news: Vec<u64> =
        results.iter().filter_map(|r| if let Created::New(c) = r { Some(c.id) } else { None }).collect();
    assert_eq!(news.len(), 1, "exactly one create wins");
    assert!(results.iter().all(|r| match r {
        Created::New(c) | Created::Existing(c) => c.id == news[0],
    }));
    // Same key, other user: a different commission.
    assert!(matches!(
        create(&*store, new_commission("bob", Some("k1")), &ctx(1)).unwrap().unwrap(),
        Created::New(_)
    ));
}

fn concurrent_commands_on_one_commission_serialize_through_versions(open: Open) {
    let (_dir, store, id, job, cmds) = alice_and_a_full_run(open, "race");
    for cmd in &cmds[..2] {
        execute(&*store, id, cmd.clone(), &ctx(3)).unwrap().unwrap();
    }
    let handles: Vec<_> = (1..=50u32)
        .map(|p| {
            let s = store.clone();
            std::thread::spawn(move || {
                execute(
                    &*s,
                    id,
                    Command::ReportProgress {
                        job_id: job,
                        stage: atelier_engine::Stage::GeneratingIdeas,
                        percent: p,
                        message: None,
                    },
                    &ctx(4),
                )
                .unwrap()
            })
        })
        .collect();
    let accepted = handles.into_iter().map(|h| h.join().unwrap()).filter(Result::is_ok).count();
    let c = store.commission(id).unwrap().unwrap();
    // Whatever interleaving happened, progress never went down and every accepted report is an event.
    assert_eq!(c.version as usize, 3 + accepted);
    let percents: Vec<u8> = store
        .events_of(id)
        .unwrap()
        .iter()
        .filter_map(|e| match e.event {
            Event::Progress { percent, .. } => Some(percent),
            _ => None,
        })
        .collect();
    let evs: Vec<_> =
        store.events_of(id).unwrap().iter().map(|e| (e.seq, e.version, format!("{:?}", e.event))).collect();
    assert!(percents.windows(2).all(|w| w[0] <= w[1]), "{percents:?} {evs:#?}");
}

fn subscription_replays_then_goes_live_without_gap_or_duplicate(open: Open) {
    let (_dir, store, id, _job, cmds) = alice_and_a_full_run(open, "sub");
    execute(&*store, id, cmds[0].clone(), &ctx(3)).unwrap().unwrap();
    let mut sub = store.subscribe(0, Filter::Commission(id)).unwrap();
    let writer = {
        let s = store.clone();
        let rest = cmds[1..].to_vec();
        std::thread::spawn(move || {
            for cmd in rest {
                execute(&*s, id, cmd, &ctx(4)).unwrap().unwrap();
                // Noise from another commission must not reach this subscription.
                create(&*s, new_commission("bob", None), &ctx(4)).unwrap().unwrap();
            }
        })
    };
    let mut seen = Vec::new();
    while let Some(d) = sub.next_timeout(Duration::from_secs(5)).unwrap() {
        assert_eq!(d.env.commission_id, id);
        seen.push(d.env.version);
        if d.view.state == State::Completed {
            break;
        }
    }
    writer.join().unwrap();
    let expected: Vec<u64> = (1..=store.commission(id).unwrap().unwrap().version).collect();
    assert_eq!(seen, expected);
    // Resume after a seq: strictly after it.
    let mid = store.events_of(id).unwrap()[5].seq;
    let mut resumed = store.subscribe(mid, Filter::User("alice".into())).unwrap();
    let first = resumed.next_timeout(Duration::from_secs(1)).unwrap().unwrap();
    assert!(first.env.seq > mid);
}

/// `try_next` hands out only what is ready: never history it has not read, never a wait; what
/// it hands out and what `next_timeout` hands out after it form one gap-free sequence.
fn try_next_takes_only_what_is_ready(open: Open) {
    let (_dir, store, id, _job, cmds) = alice_and_a_full_run(open, "try-next");
    let mut sub = store.subscribe(0, Filter::Commission(id)).unwrap();
    // History not read yet: nothing ready, and asking does not read it.
    assert!(sub.wants_history());
    assert!(sub.try_next().is_none());
    assert!(sub.wants_history());
    sub.read_history().unwrap();
    let mut seen = vec![sub.try_next().expect("created was read as history").env.version];
    // That history reached the head, so the same call registered for live events: drained,
    // the subscription wants nothing more read for it (an SSE stream never goes back to the
    // pool, and never reads the log on its own thread).
    assert!(sub.try_next().is_none());
    assert!(!sub.wants_history(), "registered with the history read that reached the head");
    assert!(sub.next_timeout(Duration::from_millis(10)).unwrap().is_none());
    // Several appends land before the subscriber looks: all of them are ready at once.
    for cmd in &cmds[..3] {
        execute(&*store, id, cmd.clone(), &ctx(3)).unwrap().unwrap();
    }
    while let Some(d) = sub.try_next() {
        seen.push(d.env.version);
    }
    assert!(seen.len() > 1, "published events are ready without waiting: {seen:?}");
    // The rest by waiting; together one gap-free sequence.
    execute(&*store, id, cmds[3].clone(), &ctx(3)).unwrap().unwrap();
    let version = store.commission(id).unwrap().unwrap().version;
    while (seen.len() as u64) < version {
        seen.push(sub.next_timeout(Duration::from_secs(5)).unwrap().expect("a live event").env.version);
    }
    assert_eq!(seen, (1..=version).collect::<Vec<_>>());
    assert!(sub.try_next().is_none());
}

/// A user's history spans many replay chunks and is interleaved with another user's events:
/// every one of the user's events comes once, in order, with the view folded up to it.
fn a_users_history_across_chunks_is_exact(open: Open) {
    let f = open("user-history");
    let store = f.open();
    // Commissions started in a round robin, so that their events interleave in the log.
    let ids: Vec<u64> = (0..90).map(|i| created(&*store, if i % 7 == 0 { "bob" } else { "alice" })).collect();
    let runs: Vec<(u64, Vec<Command>)> =
        ids.iter().map(|&id| (id, full_run(store.allocate_job_id().unwrap()))).collect();
    for step in 0..runs[0].1.len() {
        for (id, cmds) in &runs {
            execute(&*store, *id, cmds[step].clone(), &ctx(5 + step as i64)).unwrap().unwrap();
        }
    }
    let log = store.read_log(0, usize::MAX).unwrap();
    let alices: Vec<u64> =
        ids.iter().copied().filter(|id| store.commission(*id).unwrap().unwrap().user_id == "alice").collect();
    let expected: Vec<u64> =
        log.iter().filter(|e| alices.contains(&e.commission_id)).map(|e| e.seq).collect();
    assert!(expected.len() > 2 * atelier_storage::REPLAY_CHUNK_EVENTS, "{} events", expected.len());
    for after in [0, expected[expected.len() / 3], *expected.last().unwrap() - 1] {
        let mut sub = store.subscribe(after, Filter::User("alice".into())).unwrap();
        let mut got = Vec::new();
        while let Some(d) = sub.next_timeout(Duration::from_millis(300)).unwrap() {
            // The view is the commission right after this event.
            let mut c = None;
            for e in log.iter().filter(|e| e.commission_id == d.env.commission_id && e.seq <= d.env.seq) {
                c = Some(atelier_engine::apply(c, e).unwrap());
            }
            assert_eq!(*d.view, atelier_storage::ViewAfter::of(&c.unwrap()), "view after seq {}", d.env.seq);
            got.push(d.env.seq);
        }
        let want: Vec<u64> = expected.iter().copied().filter(|s| *s > after).collect();
        assert_eq!(got, want, "after {after}");
    }
}

fn a_slow_subscriber_is_cut_off_and_never_blocks_the_writer(open: Open) {
    let f = open("slow");
    let store = f.open();
    let mut slow = store.subscribe(store.head_seq(), Filter::All).unwrap();
    // Register it (history is empty, so this returns on timeout after registering).
    assert!(slow.next_timeout(Duration::from_millis(10)).unwrap().is_none());
    for _ in 0..(atelier_storage::SUBSCRIBER_QUEUE_EVENTS_MAX + 10) {
        created(&*store, "alice");
    }
    assert_eq!(store.dropped_slow_total(), 1);
    let mut n = 0;
    let end = loop {
        match slow.next_timeout(Duration::from_millis(100)) {
            Ok(Some(_)) => n += 1,
            Ok(None) => panic!("expected the cut-off"),
            Err(e) => break e,
        }
    };
    match end {
        atelier_storage::SubscriptionEnd::Overflow { last_seq } => assert_eq!(last_seq, n),
        other => panic!("{other:?}"),
    }
}

fn listing_pages_newest_first_and_filters_by_state(open: Open) {
    let f = open("list");
    let store = f.open();
    let ids: Vec<u64> = (0..5).map(|_| created(&*store, "alice")).collect();
    created(&*store, "bob");
    execute(&*store, ids[1], Command::RequestCancel, &ctx(2)).unwrap().unwrap();
    let p1 = store.list_user("alice", &ListQuery { limit: 2, cursor: None, state: None }).unwrap();
    assert_eq!(p1.items.iter().map(|c| c.id).collect::<Vec<_>>(), vec![ids[4], ids[3]]);
    let p2 = store.list_user("alice", &ListQuery { limit: 2, cursor: p1.next_cursor, state: None }).unwrap();
    assert_eq!(p2.items.iter().map(|c| c.id).collect::<Vec<_>>(), vec![ids[2], ids[1]]);
    let p3 = store.list_user("alice", &ListQuery { limit: 2, cursor: p2.next_cursor, state: None }).unwrap();
    assert_eq!(p3.items.len(), 1);
    assert_eq!(p3.next_cursor, None);
    let cancelled = store
        .list_user("alice", &ListQuery { limit: 10, cursor: None, state: Some(State::Cancelled) })
        .unwrap();
    assert_eq!(cancelled.items.iter().map(|c| c.id).collect::<Vec<_>>(), vec![ids[1]]);
    let counts = store.state_counts().unwrap();
    assert!(counts.contains(&(State::Created, 5)) && counts.contains(&(State::Cancelled, 1)), "{counts:?}");
    assert_eq!(store.live_commissions().unwrap().len(), 5);
}

fn reopen_keeps_everything_and_never_reuses_an_id(open: Open) {
    let f = open("reopen");
    let store = f.open();
    let id = created(&*store, "alice");
    let head = store.head_seq();
    drop(store);
    let store = f.open();
    assert_eq!(store.head_seq(), head);
    assert_eq!(store.commission(id).unwrap().unwrap().state, State::Created);
    let id2 = created(&*store, "alice");
    assert!(id2 > id, "ids are never reused");
}

/// The writer's beat is what a watchdog reads (`src/systemd.rs`): it must keep moving while
/// the store sits idle, or an idle server would look stuck, and it moves through appends too.
fn the_writer_beats_while_idle_and_while_appending(open: Open) {
    let f = open("beats");
    let store = f.open();
    let idle_for = Duration::from_millis(WRITER_BEAT_INTERVAL_MS * 5);
    let before = store.writer_beats().expect("a backend with a writer thread reports its beats");
    std::thread::sleep(idle_for);
    let idle = store.writer_beats().unwrap() - before;
    // Five intervals asleep: at least three turns, whatever the scheduling jitter.
    assert!(idle >= 3, "{idle} writer turns in {idle_for:?} of idling");
    let before = store.writer_beats().unwrap();
    for _ in 0..3 {
        created(&*store, "alice");
    }
    assert!(store.writer_beats().unwrap() > before, "appends go round the writer's loop");
}

#[test]
fn a_second_opener_of_a_data_dir_is_refused_by_name() {
    let dir = temp_dir("locked");
    let store = SledStore::open(StoreConfig::new(dir.path())).expect("open store");
    match SledStore::open(StoreConfig::new(dir.path())) {
        Err(StorageError::Locked { holder, .. }) => {
            assert!(holder.contains(&format!("pid {}", std::process::id())), "{holder}")
        }
        other => panic!("expected Locked, got {:?}", other.map(|_| ())),
    }
    drop(store);
}

#[test]
fn a_full_run_passes_replay_check() {
    let dir = temp_dir("full");
    let store = open(&dir);
    let id = created(&*store, "alice");
    for (i, cmd) in full_run(store.allocate_job_id().unwrap()).into_iter().enumerate() {
        execute(&*store, id, cmd, &ctx(2_000 + i as i64)).unwrap().unwrap();
    }
    let report = check::replay_check(&store).unwrap();
    assert!(report.diff.is_empty(), "{:?}", report.diff);
    assert_eq!(report.events, store.commission(id).unwrap().unwrap().version);
}

for_each_backend!(
    full_run_is_projected,
    version_conflict_is_an_outcome_and_appends_nothing,
    a_refused_event_in_a_batch_appends_none_of_it,
    idempotent_create_returns_the_first_commission_even_when_racing,
    concurrent_commands_on_one_commission_serialize_through_versions,
    subscription_replays_then_goes_live_without_gap_or_duplicate,
    try_next_takes_only_what_is_ready,
    a_users_history_across_chunks_is_exact,
    a_slow_subscriber_is_cut_off_and_never_blocks_the_writer,
    listing_pages_newest_first_and_filters_by_state,
    reopen_keeps_everything_and_never_reuses_an_id,
    the_writer_beats_while_idle_and_while_appending,
);

#[test]
fn newer_schema_is_refused_with_a_clear_message() {
    let dir = temp_dir("schema");
    {
        let db = open_raw(&dir);
        db.open_tree(layout::PROJECTIONS_TREE)
            .unwrap()
            .insert(Projection::Meta.key(layout::META_SCHEMA), &99u64.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    let err = SledStore::open(StoreConfig::new(dir.path())).map(|_| ()).unwrap_err();
    assert!(matches!(err, StorageError::NewerSchema { found: 99, .. }), "{err}");
    assert!(err.to_string().contains("newer than this build supports"));
}

#[test]
fn flipped_bytes_are_reported_as_corruption_with_the_seq() {
    let dir = temp_dir("corrupt");
    let store = open(&dir);
    let id = created(&*store, "alice");
    execute(&*store, id, Command::RequestCancel, &ctx(2)).unwrap().unwrap();
    store.close();
    drop(store);
    // Damage seq 2 through sled itself (the byte flip a bad disk would make inside a value).
    // The cancel appended seqs 2 and 3 together: one block, and the flip is in its first record.
    damage_record(&dir, 2, |value, record| value[record.end - 1] ^= 0x40);
    let store = open(&dir);
    match store.events_of(id) {
        Err(StorageError::Corruption { seq: 2, .. }) => {}
        other => panic!("expected corruption at 2, got {other:?}"),
    }
    match check::replay_check(&store) {
        Err(StorageError::Corruption { seq: 2, .. }) => {}
        other => panic!("expected corruption at 2, got {:?}", other.map(|r| r.diff)),
    }
}

/// Changes the stored bytes of the record `seq` through sled itself: `f` gets the whole log
/// value (a record or a block) and where the record lies in it.
fn damage_record(dir: &TempDir, seq: u64, f: impl FnOnce(&mut Vec<u8>, std::ops::Range<usize>)) {
    let db = open_raw(dir);
    let log = db.open_tree(layout::LOG_TREE).unwrap();
    let (k, v) = log.range(..=seq.to_be_bytes()).next_back().unwrap().unwrap();
    let first = u64::from_be_bytes(k.as_ref().try_into().unwrap());
    let ranges = atelier_storage::codec::split_block(&v).unwrap();
    let mut value = v.to_vec();
    f(&mut value, ranges[(seq - first) as usize].clone());
    log.insert(k, value).unwrap();
    db.flush().unwrap();
}

/// Keys and first bytes of every log value.
fn log_values(dir: &TempDir) -> Vec<(u64, u8)> {
    let db = open_raw(dir);
    let log = db.open_tree(layout::LOG_TREE).unwrap();
    log.iter()
        .map(|i| i.unwrap())
        .map(|(k, v)| (u64::from_be_bytes(k.as_ref().try_into().unwrap()), v[0]))
        .collect()
}

#[test]
fn concurrent_appends_share_log_blocks_and_read_back_exactly() {
    let dir = temp_dir("blocks");
    let store = open(&dir);
    let threads: Vec<_> = (0..16)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                let mut ids = Vec::new();
                for _ in 0..10 {
                    let id = created(&*store, &format!("user{t}"));
                    // Half the threads finish "late", so that retention can take the others.
                    let base = if t % 2 == 0 { 2_000 } else { 5_000_000 };
                    for (i, cmd) in full_run(store.allocate_job_id().unwrap()).into_iter().enumerate() {
                        execute(&*store, id, cmd, &ctx(base + i as i64)).unwrap().unwrap();
                    }
                    ids.push(id);
                }
                ids
            })
        })
        .collect();
    let ids: Vec<u64> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    let head = store.head_seq();
    let all = store.read_log(0, usize::MAX).unwrap();
    assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), (1..=head).collect::<Vec<_>>());
    // Reads that start anywhere, also inside a block, see exactly the records after it.
    for after in (0..head).step_by(7) {
        let part = store.read_log(after, 5).unwrap();
        assert_eq!(
            part.iter().map(|e| e.seq).collect::<Vec<_>>(),
            (after + 1..=(after + 5).min(head)).collect::<Vec<_>>()
        );
    }
    for id in &ids {
        let mine: Vec<_> = all.iter().filter(|e| e.commission_id == *id).cloned().collect();
        assert_eq!(store.events_of(*id).unwrap(), mine);
    }
    store.close();
    drop(store);
    let values = log_values(&dir);
    assert!(
        values.iter().any(|(_, v)| *v == atelier_storage::codec::BLOCK_VERSION),
        "some group commit wrote a block"
    );
    assert!(values.len() < head as usize, "fewer log values than records");

    let store = open(&dir);
    assert_eq!(store.head_seq(), head, "the head is found inside the last block");
    let report = check::replay_check(&store).unwrap();
    assert!(report.diff.is_empty(), "{:?}", report.diff);
    assert_eq!(report.events, head);
    // Retention rewrites the blocks it touches with stubs; the records it keeps, which share
    // those blocks, read as before.
    let (early, late): (Vec<u64>, Vec<u64>) =
        ids.iter().partition(|id| store.commission(**id).unwrap().unwrap().updated_at < 1_000_000);
    assert_eq!(early.len(), 80);
    let kept: Vec<_> = late.iter().map(|id| store.events_of(*id).unwrap()).collect();
    assert_eq!(store.prune_terminal_before(1_000_000).unwrap(), 80);
    for (id, events) in late.iter().zip(&kept) {
        assert_eq!(&store.events_of(*id).unwrap(), events);
    }
    let left = store.read_log(0, usize::MAX).unwrap();
    assert_eq!(left.len(), kept.iter().map(Vec::len).sum::<usize>());
    assert!(left.iter().all(|e| late.contains(&e.commission_id)));
    let report = check::replay_check(&store).unwrap();
    assert!(report.diff.is_empty(), "{:?}", report.diff);
    store.close();
    drop(store);
    let store = open(&dir);
    assert_eq!(store.head_seq(), head);
    assert!(check::replay_check(&store).unwrap().diff.is_empty());
}

#[test]
fn a_hole_between_log_blocks_is_corruption_with_the_missing_seq() {
    let dir = temp_dir("hole");
    let store = open(&dir);
    for _ in 0..3 {
        created(&*store, "alice");
    }
    store.close();
    drop(store);
    {
        let db = open_raw(&dir);
        db.open_tree(layout::LOG_TREE)
            .unwrap()
            .remove(2u64.to_be_bytes())
            .unwrap()
            .expect("seq 2 is a value of its own");
        db.flush().unwrap();
    }
    let store = open(&dir);
    match store.read_log(0, usize::MAX) {
        Err(StorageError::Corruption { seq: 2, .. }) => {}
        other => panic!("expected corruption at 2, got {other:?}"),
    }
    match check::replay_check(&store) {
        Err(StorageError::Corruption { seq: 2, .. }) => {}
        other => panic!("expected corruption at 2, got {:?}", other.map(|r| r.diff)),
    }
}

#[test]
fn a_schema_1_data_dir_is_migrated_and_reads_the_same() {
    let dir = temp_dir("schema1");
    let store = open(&dir);
    let id = created(&*store, "alice");
    let job = store.allocate_job_id().unwrap();
    for cmd in [
        Command::StartJob {
            job_id: job,
            executor: atelier_engine::Executor::TaskRunner,
            job_name: "j".into(),
            pid: None,
        },
        Command::EnterStage { job_id: job, stage: atelier_engine::Stage::GeneratingIdeas },
    ] {
        execute(&*store, id, cmd, &ctx(2_000)).unwrap().unwrap();
    }
    let events = store.events_of(id).unwrap();
    assert_eq!(events.len(), 3);
    store.close();
    drop(store);
    // One appender, one event per append: every value is a bare record, as schema 1 wrote them.
    assert!(log_values(&dir).iter().all(|(_, v)| *v == atelier_storage::codec::FORMAT_VERSION));
    {
        let db = open_raw(&dir);
        let proj = db.open_tree(layout::PROJECTIONS_TREE).unwrap();
        proj.insert(Projection::Meta.key(layout::META_SCHEMA), &1u64.to_be_bytes()).unwrap();
        db.flush().unwrap();
    }
    let store = open(&dir);
    assert_eq!(store.events_of(id).unwrap(), events);
    assert!(check::replay_check(&store).unwrap().diff.is_empty());
    store.close();
    drop(store);
    let db = open_raw(&dir);
    let proj = db.open_tree(layout::PROJECTIONS_TREE).unwrap();
    let schema = proj.get(Projection::Meta.key(layout::META_SCHEMA)).unwrap().unwrap();
    assert_eq!(
        u64::from_be_bytes(schema.as_ref().try_into().unwrap()),
        u64::from(atelier_storage::SCHEMA_VERSION)
    );
}

#[test]
fn a_truncated_tail_record_fails_open_with_its_seq() {
    let dir = temp_dir("trunc");
    let store = open(&dir);
    created(&*store, "alice");
    created(&*store, "alice");
    store.close();
    drop(store);
    {
        let db = open_raw(&dir);
        let log = db.open_tree(layout::LOG_TREE).unwrap();
        let rec = log.get(2u64.to_be_bytes()).unwrap().unwrap().to_vec();
        log.insert(2u64.to_be_bytes(), &rec[..rec.len() / 2]).unwrap();
        db.flush().unwrap();
    }
    match SledStore::open(StoreConfig::new(dir.path())) {
        Err(StorageError::Corruption { seq: 2, .. }) => {}
        other => panic!("expected corruption at 2, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn replay_check_reports_a_doctored_projection() {
    let dir = temp_dir("doctor");
    let store = open(&dir);
    let id = created(&*store, "alice");
    store.close();
    drop(store);
    {
        let db = open_raw(&dir);
        let removed =
            db.open_tree(layout::PROJECTIONS_TREE).unwrap().remove(Projection::Live.key_u64(id)).unwrap();
        assert!(removed.is_some(), "the live entry was where the layout says");
        db.flush().unwrap();
    }
    let store = open(&dir);
    let report = check::replay_check(&store).unwrap();
    assert_eq!(report.diff, vec![format!("live: missing {id}")]);
}

#[test]
fn export_then_import_rebuilds_the_same_projections() {
    let a = temp_dir("export");
    let store = open(&a);
    let id = created(&*store, "alice");
    for cmd in full_run(store.allocate_job_id().unwrap()) {
        execute(&*store, id, cmd, &ctx(9)).unwrap().unwrap();
    }
    created(&*store, "bob");
    let mut buf = Vec::new();
    let n = check::export(&*store, &mut buf).unwrap();
    let b = temp_dir("import");
    let copy = open(&b);
    assert_eq!(check::import(&*copy, &mut &buf[..]).unwrap(), n);
    assert_eq!(copy.commission(id).unwrap(), store.commission(id).unwrap());
    assert!(check::replay_check(&copy).unwrap().diff.is_empty());
    // A second import into a non-empty dir is refused.
    assert!(matches!(check::import(&*copy, &mut &buf[..]), Err(StorageError::Import { line: 0, .. })));
    // A damaged line is refused with its line number.
    let c = temp_dir("import-bad");
    let fresh = open(&c);
    let text = String::from_utf8(buf).unwrap().replacen("\"version\":2", "\"version\":5", 1);
    match check::import(&*fresh, &mut text.as_bytes()) {
        Err(StorageError::Import { line: 2, .. }) => {}
        other => panic!("{other:?}"),
    }
}

/// One group commit bigger than a block (an import chunk here) is written as several blocks
/// in one atomic sled batch, and reads back like any other.
#[test]
fn a_group_commit_larger_than_a_block_spans_blocks() {
    let a = temp_dir("big-src");
    let store = open(&a);
    let mut ids = Vec::new();
    for i in 0..60 {
        let id = created(&*store, &format!("user{}", i % 3));
        for cmd in full_run(store.allocate_job_id().unwrap()) {
            execute(&*store, id, cmd, &ctx(9)).unwrap().unwrap();
        }
        ids.push(id);
    }
    let mut buf = Vec::new();
    let n = check::export(&*store, &mut buf).unwrap();
    assert!(n > atelier_storage::codec::BLOCK_RECORDS_MAX as u64, "{n} events");
    let b = temp_dir("big-dst");
    let copy = open(&b);
    assert_eq!(check::import(&*copy, &mut &buf[..]).unwrap(), n);
    copy.close();
    drop(copy);
    let values = log_values(&b);
    assert!(values.len() > 1 && values.len() < n as usize, "{} values for {n} records", values.len());
    let copy = open(&b);
    assert_eq!(copy.head_seq(), n);
    for id in &ids {
        assert_eq!(copy.events_of(*id).unwrap(), store.events_of(*id).unwrap());
    }
    assert_eq!(copy.read_log(0, usize::MAX).unwrap(), store.read_log(0, usize::MAX).unwrap());
    assert!(check::replay_check(&copy).unwrap().diff.is_empty());
}

#[test]
fn retention_prunes_old_terminal_commissions_and_keeps_the_chain() {
    let dir = temp_dir("prune");
    let store = open(&dir);
    let old = created(&*store, "alice");
    execute(&*store, old, Command::RequestCancel, &ctx(10)).unwrap().unwrap();
    let live = created(&*store, "alice");
    assert_eq!(store.prune_terminal_before(1_000_000).unwrap(), 1);
    assert!(store.commission(old).unwrap().is_none());
    assert!(store.commission(live).unwrap().is_some());
    let report = check::replay_check(&store).unwrap();
    assert!(report.diff.is_empty(), "{:?}", report.diff);
    assert_eq!(report.pruned, 3);
}

/// Appends `n` progress events to a commission that is in its first stage, `per_append` at a time.
fn progress_events(store: &SledStore, id: u64, n: usize, per_append: usize) {
    let mut version = store.commission(id).unwrap().unwrap().version;
    let mut left = n;
    while left > 0 {
        let k = left.min(per_append);
        let events =
            vec![
                Event::Progress { stage: atelier_engine::Stage::GeneratingIdeas, percent: 50, message: None };
                k
            ];
        match store
            .append(AppendRequest {
                target: AppendTarget::Existing(id),
                expected_version: version,
                events,
                at: 5,
            })
            .unwrap()
        {
            AppendOutcome::Appended { commission, .. } => version = commission.version,
            other => panic!("{other:?}"),
        }
        left -= k;
    }
}

#[test]
fn reads_span_written_and_write_back_projections() {
    // Snapshots and the by-commission index are written back: part of a commission's events
    // are in the projection tree, part only in memory. Reads must see one gap-free history,
    // and runs longer than INDEX_RUN_SEQS_MAX must split and read back in order.
    let dir = temp_dir("writeback");
    let store = open(&dir);
    let id = created(&*store, "alice");
    let job = store.allocate_job_id().unwrap();
    for cmd in &full_run(job)[..2] {
        execute(&*store, id, cmd.clone(), &ctx(3)).unwrap().unwrap();
    }
    let other = created(&*store, "bob");
    let runs = atelier_storage::layout::INDEX_RUN_SEQS_MAX;
    progress_events(&store, id, runs + 10, 100);
    store.flush_projections().unwrap();
    progress_events(&store, id, 2 * runs + 3, 300);
    execute(&*store, other, Command::RequestCancel, &ctx(4)).unwrap().unwrap();

    let check = |store: &SledStore| {
        let c = store.commission(id).unwrap().unwrap();
        let events = store.events_of(id).unwrap();
        assert_eq!(events.len() as u64, c.version);
        assert!(events.iter().enumerate().all(|(i, e)| e.version == i as u64 + 1), "versions 1..=n in order");
        assert!(events.windows(2).all(|w| w[0].seq < w[1].seq));
        assert_eq!(store.commission(other).unwrap().unwrap().state, State::Cancelled);
        c.version
    };
    let version = check(&store);
    assert_eq!(version, 3 + (3 * runs + 13) as u64);
    let report = check::replay_check(&store).unwrap();
    assert!(report.diff.is_empty(), "{:?}", report.diff);
    assert_eq!(check(&store), version, "the same after the write-back state is written");
    store.close();
    drop(store);
    let store = open(&dir);
    assert_eq!(check(&store), version, "the same after reopening");
}

/// Readiness asks the store whether it takes writes; a closed store must say it does not.
#[test]
fn health_reports_whether_the_store_takes_writes() {
    let dir = temp_dir("health");
    let store = open(&dir);
    assert!(store.health().is_ok());
    store.close();
    assert!(matches!(store.health(), Err(StorageError::Closed)), "{:?}", store.health());
}

/// Every user's stream from any point equals the global log filtered to that user's
/// commissions, whether its entries are in the tree or still in the write-back state, and a
/// user whose name starts another's ("al", "alice") sees only their own.
#[test]
fn a_users_stream_equals_the_filtered_log_across_write_back() {
    let dir = temp_dir("user-seqs");
    let store = open(&dir);
    let users = ["alice", "al", "bob"];
    let mut ids = Vec::new();
    for round in 0..3 {
        for i in 0..40 {
            ids.push(created(&*store, users[i % users.len()]));
        }
        for &id in &ids {
            if store.commission(id).unwrap().unwrap().state == State::Created {
                execute(&*store, id, Command::RequestCancel, &ctx(10 + round)).unwrap().unwrap();
            }
        }
        // Part of the index in the tree, part in the write-back state.
        if round < 2 {
            store.flush_projections().unwrap();
        }
    }
    let log = store.read_log(0, usize::MAX).unwrap();
    for user in users {
        let mine: Vec<u64> = log
            .iter()
            .filter(|e| store.commission(e.commission_id).unwrap().unwrap().user_id == user)
            .map(|e| e.seq)
            .collect();
        assert!(!mine.is_empty());
        for after in [0, mine[mine.len() / 2], *mine.last().unwrap()] {
            let mut sub = store.subscribe(after, Filter::User(user.into())).unwrap();
            let mut got = Vec::new();
            while let Some(d) = sub.next_timeout(Duration::from_millis(200)).unwrap() {
                assert_eq!(&*d.view.user_id, user);
                got.push(d.env.seq);
            }
            let want: Vec<u64> = mine.iter().copied().filter(|s| *s > after).collect();
            assert_eq!(got, want, "{user} after {after}");
        }
    }
    let report = check::replay_check(&store).unwrap();
    assert!(report.diff.is_empty(), "{:?}", report.diff);
}

/// `replay --check` verifies the user-seqs index: a missing entry and one naming the wrong
/// commission are both reported.
#[test]
fn replay_check_reports_a_damaged_user_seqs_index() {
    let dir = temp_dir("user-seqs-doctor");
    let store = open(&dir);
    let first = created(&*store, "alice");
    let second = created(&*store, "alice");
    store.flush_projections().unwrap();
    let (s1, s2) = (store.events_of(first).unwrap()[0].seq, store.events_of(second).unwrap()[0].seq);
    store.close();
    drop(store);
    {
        let db = open_raw(&dir);
        let proj = db.open_tree(layout::PROJECTIONS_TREE).unwrap();
        let key = |seq: u64| Projection::UserSeqs.key_user("alice", &seq.to_be_bytes());
        assert!(proj.remove(key(s1)).unwrap().is_some(), "the entry was where the layout says");
        proj.insert(key(s2), &first.to_be_bytes()).unwrap();
        db.flush().unwrap();
    }
    let store = open(&dir);
    let report = check::replay_check(&store).unwrap();
    assert_eq!(report.diff.len(), 3, "{:?}", report.diff);
    assert!(report.diff.iter().all(|d| d.starts_with("user_seqs: ")), "{:?}", report.diff);
    assert!(
        report.diff.iter().any(|d| d.contains(&format!("missing (\"alice\", {s1}, {first})"))),
        "{:?}",
        report.diff
    );
}

/// A data dir from before the user-seqs index (schema 2) gets it at open: the streams read
/// the same and the check finds nothing to report.
#[test]
fn a_schema_2_data_dir_gets_its_user_seqs_index() {
    let dir = temp_dir("schema2");
    let store = open(&dir);
    let ids: Vec<u64> = (0..5).map(|i| created(&*store, if i % 2 == 0 { "alice" } else { "bob" })).collect();
    execute(&*store, ids[0], Command::RequestCancel, &ctx(5)).unwrap().unwrap();
    let store_events = store.read_log(0, usize::MAX).unwrap().len();
    store.close();
    drop(store);
    {
        let db = open_raw(&dir);
        let proj = db.open_tree(layout::PROJECTIONS_TREE).unwrap();
        let entries: Vec<_> = proj.scan_prefix([Projection::UserSeqs.prefix()]).keys().collect();
        let events = store_events;
        assert_eq!(entries.len(), events, "one entry per event");
        for k in entries {
            proj.remove(k.unwrap()).unwrap();
        }
        proj.insert(Projection::Meta.key(layout::META_SCHEMA), &2u64.to_be_bytes()).unwrap();
        db.flush().unwrap();
    }
    let store = open(&dir);
    let report = check::replay_check(&store).unwrap();
    assert!(report.diff.is_empty(), "{:?}", report.diff);
    let mut sub = store.subscribe(0, Filter::User("alice".into())).unwrap();
    let mut got = Vec::new();
    while let Some(d) = sub.next_timeout(Duration::from_millis(200)).unwrap() {
        got.push(d.env.commission_id);
    }
    let alices = [ids[0], ids[2], ids[4]];
    let want: Vec<u64> = store
        .read_log(0, usize::MAX)
        .unwrap()
        .iter()
        .map(|e| e.commission_id)
        .filter(|c| alices.contains(c))
        .collect();
    assert_eq!(got, want);
}

/// An export skips what retention pruned; its import puts pruned records in their place, so
/// that a pruned log moves (and `atelier backup` copies it) with the same seqs, gap-free.
#[test]
fn the_export_of_a_pruned_log_imports_with_the_same_seqs() {
    let dir = temp_dir("prune-export");
    let store = open(&dir);
    let old = created(&*store, "alice");
    execute(&*store, old, Command::RequestCancel, &ctx(10)).unwrap().unwrap();
    let live = created(&*store, "alice");
    assert_eq!(store.prune_terminal_before(1_000_000).unwrap(), 1);
    let mut out = Vec::new();
    assert_eq!(check::export(&*store, &mut out).unwrap(), 1, "only the live commission's event");
    let copy_dir = temp_dir("prune-import");
    let copy = open(&copy_dir);
    assert_eq!(check::import(&*copy, &mut out.as_slice()).unwrap(), 1);
    assert_eq!(copy.head_seq(), store.head_seq());
    assert_eq!(copy.commission(live).unwrap(), store.commission(live).unwrap());
    assert!(copy.commission(old).unwrap().is_none());
    let report = check::replay_check(&copy).unwrap();
    assert!(report.diff.is_empty(), "{:?}", report.diff);
    assert_eq!(report.pruned, 3);
    let next = created(&*copy, "bob");
    assert!(next > live, "ids go on after the copied ones");
}
