//! The vendored sled when its disk fills (storage/vendor/README.md, change 3). Postmortem
//! (issue 14): a blob write that failed with ENOSPC left its IO buffer's writer slot claimed,
//! so the buffer was never written and every later `flush` waited forever; with sled 0.34.7
//! as published, this procedure hung in 19 runs of 30 and once came back with a batch torn in
//! two. Each round here fills a 48 MiB tmpfs the way the store does (30 KB values, a flush
//! after each, then a three-key batch), and checks that the failure is an error, not a hang,
//! and that the reopened database holds every flushed value and whole batches only.
//!
//! Mounting needs root (or CAP_SYS_ADMIN); where it is refused the test says so and passes
//! without running.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use atelier_tests::Tmpfs;

const ROUNDS: usize = 10;
const TMPFS_SIZE: &str = "48m";
const VALUE_BYTES: usize = 30 * 1000;
const BALLAST_LEAVES_BYTES: u64 = 6 * 1024 * 1024;
/// Writes per round at most: the disk fills after ~45.
const WRITES_MAX: u64 = 1_000;
/// A round takes well under a second; a hung flush never ends.
const ROUND_WITHIN: Duration = Duration::from_secs(20);

fn seq_of(v: &[u8]) -> u64 {
    u64::from_be_bytes(v[..8].try_into().unwrap())
}

fn value(i: u64) -> Vec<u8> {
    let mut v = vec![b'x'; VALUE_BYTES];
    v[..8].copy_from_slice(&i.to_be_bytes());
    v
}

/// Writes until sled fails; returns the last value whose flush succeeded and the batch
/// counter sled acknowledged last (not flushed: a batch is whole or absent after reopen).
fn fill(dir: &Path) -> u64 {
    let db = sled::Config::new().path(dir).open().unwrap();
    let log = db.open_tree("log").unwrap();
    let proj = db.open_tree("projections").unwrap();
    let mut flushed = 0;
    for i in 1..=WRITES_MAX {
        let wrote = (|| -> sled::Result<()> {
            log.insert(i.to_be_bytes(), value(i))?;
            db.flush()?;
            flushed = i;
            let mut batch = sled::Batch::default();
            batch.insert("meta_a", &i.to_be_bytes());
            batch.insert(format!("snapshot_{:02}", i % 20).as_bytes(), value(i));
            batch.insert("meta_z", &i.to_be_bytes());
            proj.apply_batch(batch)
        })();
        if wrote.is_err() {
            // Failed once, every later flush fails too, promptly.
            assert!(db.flush().is_err(), "a flush after a failed write");
            return flushed;
        }
    }
    panic!("{WRITES_MAX} writes and the disk never filled");
}

/// What a reopened database must hold: every flushed value, a gap-free log, whole batches.
fn check(dir: &Path, flushed: u64) -> Result<(), String> {
    let db = sled::Config::new().path(dir).open().map_err(|e| format!("reopen: {e}"))?;
    let log = db.open_tree("log").unwrap();
    let proj = db.open_tree("projections").unwrap();
    let last = log.last().unwrap().map_or(0, |(k, _)| seq_of(&k));
    if last < flushed || log.len() as u64 != last {
        return Err(format!("log: {} values up to {last}, {flushed} were flushed", log.len()));
    }
    for item in log.iter() {
        let (k, v) = item.unwrap();
        if seq_of(&k) != seq_of(&v) || v.len() != VALUE_BYTES {
            return Err(format!("log value {} is not what was written", seq_of(&k)));
        }
    }
    let a = proj.get("meta_a").unwrap().map_or(0, |v| seq_of(&v));
    let z = proj.get("meta_z").unwrap().map_or(0, |v| seq_of(&v));
    if a != z {
        return Err(format!("a batch torn in two: meta_a {a}, meta_z {z}"));
    }
    for k in 0..20 {
        let want = (1..=a).rev().find(|i| i % 20 == k);
        let got = proj.get(format!("snapshot_{k:02}")).unwrap().map(|v| seq_of(&v));
        if want != got {
            return Err(format!("snapshot_{k:02} is {got:?}, the batch at {a} says {want:?}"));
        }
    }
    Ok(())
}

/// Fills the disk that holds `dir` (all but the ballast's leftover), frees it, checks.
fn one_round(dir: &Path, ballast: &Path) -> Result<(), String> {
    let flushed = fill(dir);
    std::fs::remove_file(ballast).unwrap();
    // Twice: sled's recovery must also come back the same from its own recovery.
    check(dir, flushed)?;
    check(dir, flushed)
}

#[test]
fn a_full_disk_fails_sled_writes_without_a_hang_or_a_torn_batch() {
    if let Err(why) = Tmpfs::mount(TMPFS_SIZE) {
        println!("SKIPPED: cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {why}");
        return;
    }
    for round in 0..ROUNDS {
        // The mount stays with this thread, so that a hung round still unmounts it.
        let mnt = Tmpfs::mount(TMPFS_SIZE).expect("mounted before");
        let dir: PathBuf = mnt.path().join("sled");
        let ballast = mnt.ballast("ballast", BALLAST_LEAVES_BYTES);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(one_round(&dir, &ballast));
        });
        match rx.recv_timeout(ROUND_WITHIN) {
            Ok(Ok(())) => {}
            Ok(Err(why)) => panic!("round {round}: {why}"),
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("round {round}: sled hung after the disk filled"),
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("round {round}: the round panicked"),
        }
    }
}
