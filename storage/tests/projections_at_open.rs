//! The open's rule for projections: they are caches, so when they disagree with the log the
//! open rebuilds them from the log (and starts); only the log failing its own checks stops it.
//! Each test doctors a stopped data dir through sled itself, the way a full disk or a crash
//! left one: projection entries of different ages, a `projected_seq` that lies.

mod common;

use std::sync::Arc;

use atelier_engine::State;
use atelier_storage::layout::{self, Projection};
use atelier_storage::{check, create, execute, Created, EventStore, SledStore, StorageError, StoreConfig};
use common::*;

fn open(dir: &TempDir) -> Result<Arc<SledStore>, StorageError> {
    SledStore::open(StoreConfig::new(dir.path()))
}

/// A stopped data dir with three commissions: the first completed, the others created.
/// Returns their ids and the log's head.
fn three_commissions(name: &str) -> (TempDir, Vec<u64>, u64) {
    let dir = temp_dir(name);
    let store = open(&dir).unwrap();
    let mut ids = Vec::new();
    for user in ["alice", "bob", "carol"] {
        match create(&*store, new_commission(user, Some("k")), &ctx(1_000)).unwrap().unwrap() {
            Created::New(c) => ids.push(c.id),
            Created::Existing(_) => panic!("a new key"),
        }
    }
    for cmd in full_run(store.allocate_job_id().unwrap()) {
        execute(&*store, ids[0], cmd, &ctx(2_000)).unwrap().unwrap();
    }
    let head = store.head_seq();
    store.close();
    drop(store);
    (dir, ids, head)
}

/// Runs `f` on the stopped data dir's projection tree and makes it durable.
fn doctor(dir: &TempDir, f: impl FnOnce(&sled::Tree, &sled::Tree)) {
    let db = open_raw(dir);
    let proj = db.open_tree(layout::PROJECTIONS_TREE).unwrap();
    let log = db.open_tree(layout::LOG_TREE).unwrap();
    f(&proj, &log);
    db.flush().unwrap();
}

fn seq_bytes(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

fn projected(dir: &TempDir) -> u64 {
    let db = open_raw(dir);
    let proj = db.open_tree(layout::PROJECTIONS_TREE).unwrap();
    let v = proj.get(Projection::Meta.key(layout::META_PROJECTED)).unwrap().expect("a projected seq");
    u64::from_be_bytes(v.as_ref().try_into().unwrap())
}

/// What the open must give back after a rebuild: every commission at its logged state, and
/// projections that `replay --check` finds equal to the log.
fn assert_whole(store: &SledStore, ids: &[u64], head: u64) {
    assert_eq!(store.head_seq(), head);
    assert_eq!(store.commission(ids[0]).unwrap().unwrap().state, State::Completed);
    for id in &ids[1..] {
        assert_eq!(store.commission(*id).unwrap().unwrap().state, State::Created);
    }
    let report = check::replay_check(store).unwrap();
    assert!(report.diff.is_empty(), "after the rebuild: {:?}", report.diff);
    assert_eq!(report.commissions, ids.len());
}

// Postmortem (issue 14): a full disk left `projected_seq` at 1 while later snapshots survived;
// the catch-up replayed seq 2.. on top of them and the open refused "already exists".
#[test]
fn a_projected_seq_older_than_the_snapshots_is_rebuilt_not_refused() {
    let (dir, ids, head) = three_commissions("older");
    doctor(&dir, |proj, _| {
        proj.insert(Projection::Meta.key(layout::META_PROJECTED), &seq_bytes(1)).unwrap();
    });
    let store = open(&dir).expect("the open rebuilds the projections");
    assert_whole(&store, &ids, head);
    store.close();
    drop(store);
    assert_eq!(projected(&dir), head, "the rebuilt projections are written back whole");
}

#[test]
fn projections_ahead_of_the_log_are_rebuilt() {
    let (dir, ids, head) = three_commissions("ahead");
    doctor(&dir, |proj, _| {
        proj.insert(Projection::Meta.key(layout::META_PROJECTED), &seq_bytes(head + 50)).unwrap();
        // An entry of a commission the log never had: a rebuild drops it.
        proj.insert(Projection::Live.key_u64(999), &[]).unwrap();
    });
    let store = open(&dir).expect("the open rebuilds the projections");
    assert_whole(&store, &ids, head);
    assert!(store.live_commissions().unwrap().iter().all(|c| c.id != 999));
}

#[test]
fn an_undecodable_snapshot_met_by_the_catch_up_is_rebuilt() {
    let (dir, ids, head) = three_commissions("undecodable");
    doctor(&dir, |proj, _| {
        proj.insert(Projection::Meta.key(layout::META_PROJECTED), &seq_bytes(head - 1)).unwrap();
        proj.insert(Projection::Commissions.key_u64(ids[0]), &b"\xffnot a snapshot"[..]).unwrap();
    });
    let store = open(&dir).expect("the open rebuilds the projections");
    assert_whole(&store, &ids, head);
}

#[test]
fn a_missing_snapshot_and_index_are_rebuilt_with_the_idempotency_keys() {
    let (dir, ids, head) = three_commissions("missing");
    doctor(&dir, |proj, _| {
        proj.insert(Projection::Meta.key(layout::META_PROJECTED), &seq_bytes(1)).unwrap();
        for p in [Projection::Commissions, Projection::ByUser, Projection::Idempotency] {
            for k in proj.scan_prefix([p.prefix()]).keys() {
                proj.remove(k.unwrap()).unwrap();
            }
        }
    });
    let store = open(&dir).expect("the open rebuilds the projections");
    assert_whole(&store, &ids, head);
    // The idempotency index is back: the same key gives the first commission, not a new one.
    match create(&*store, new_commission("bob", Some("k")), &ctx(3_000)).unwrap().unwrap() {
        Created::Existing(c) => assert_eq!(c.id, ids[1]),
        Created::New(c) => panic!("the rebuilt index lost bob's key: new commission {}", c.id),
    }
}

#[test]
fn a_gap_in_the_log_still_stops_the_open_with_its_seq_when_projections_are_rebuilt() {
    let (dir, _, head) = three_commissions("gap");
    doctor(&dir, |proj, log| {
        proj.insert(Projection::Meta.key(layout::META_PROJECTED), &seq_bytes(head + 1)).unwrap();
        // Seq 2 is the second create, a group commit of its own.
        assert!(log.remove(2u64.to_be_bytes()).unwrap().is_some(), "seq 2 is a log value of its own");
    });
    match open(&dir) {
        Err(StorageError::Corruption { seq: 2, .. }) => {}
        other => panic!("expected corruption at 2, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn a_broken_chain_stops_the_rebuild_with_its_seq() {
    let (dir, _, head) = three_commissions("chain");
    doctor(&dir, |proj, log| {
        proj.insert(Projection::Meta.key(layout::META_PROJECTED), &seq_bytes(head + 1)).unwrap();
        // Seq 3 framed again after a different predecessor: its crc holds, its chain does not.
        let v = log.get(3u64.to_be_bytes()).unwrap().expect("seq 3 is a log value of its own");
        let ranges = atelier_storage::codec::split_block(&v).unwrap();
        let (_, payload) = atelier_storage::codec::split_record(&v[ranges[0].clone()]).unwrap();
        let (record, _) = atelier_storage::codec::frame_record(3, 12345, payload);
        log.insert(3u64.to_be_bytes(), atelier_storage::codec::frame_block(&[record])).unwrap();
    });
    match open(&dir) {
        Err(e @ StorageError::Corruption { seq: 3, .. }) => {
            assert!(e.to_string().contains("hash chain"), "{e}")
        }
        other => panic!("expected corruption at 3, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn a_rebuild_never_hands_out_the_id_of_a_pruned_commission_again() {
    let dir = temp_dir("pruned");
    let store = open(&dir).unwrap();
    let mut ids = Vec::new();
    for user in ["alice", "bob"] {
        match create(&*store, new_commission(user, None), &ctx(1_000)).unwrap().unwrap() {
            Created::New(c) => ids.push(c.id),
            Created::Existing(_) => panic!("no key"),
        }
    }
    // The newest commission ends and is pruned: its records keep only checksum and chain.
    for cmd in full_run(store.allocate_job_id().unwrap()) {
        execute(&*store, ids[1], cmd, &ctx(2_000)).unwrap().unwrap();
    }
    assert_eq!(store.prune_terminal_before(i64::MAX).unwrap(), 1);
    store.close();
    drop(store);
    let head = {
        let store = open(&dir).unwrap();
        let head = store.head_seq();
        store.close();
        head
    };
    doctor(&dir, |proj, _| {
        proj.insert(Projection::Meta.key(layout::META_PROJECTED), &seq_bytes(head + 1)).unwrap();
    });
    let store = open(&dir).expect("the open rebuilds the projections");
    assert!(store.rebuilt_at_open().is_some());
    assert_eq!(store.commission(ids[1]).unwrap(), None, "pruned stays pruned");
    match create(&*store, new_commission("carol", None), &ctx(3_000)).unwrap().unwrap() {
        Created::New(c) => assert!(c.id > ids[1], "id {} handed out again", c.id),
        Created::Existing(_) => panic!("no key"),
    }
    let report = check::replay_check(&store).unwrap();
    assert!(report.diff.is_empty(), "{:?}", report.diff);
}
