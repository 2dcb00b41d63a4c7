//! The vendored sled's IO pool wakes one waiting thread per piece of work it queues, where
//! the published sled woke them all (storage/vendor/README.md, change 1). A lost wake-up
//! there would not hang for good, since an idle pool thread looks at the queue again after a
//! second, but it would leave an IO buffer's write queued for up to that second while every
//! flush waits for it. So many threads fill small IO buffers at once (each full buffer's
//! write goes to the pool) and flush; every flush must be done well within the second, and a
//! watchdog fails the test, rather than letting CI hang, if the writes stop altogether.

use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Threads writing and flushing at the same time.
const THREADS: usize = 16;
/// Flushes each of them makes.
const ROUNDS: usize = 60;
/// Values written before each flush; with [`SEGMENT_BYTES`] buffers, several fill up.
const VALUES_PER_ROUND: usize = 4;
const VALUE_BYTES: usize = 8 * 1024;
/// sled's smallest IO buffer size, so that writes fill buffers (and queue their writes on
/// the pool) often.
const SEGMENT_BYTES: usize = 64 * 1024;
/// A write that waited for a pool thread's one-second poll instead of a wake-up holds its
/// flush about a second; one that was woken for takes milliseconds, even on a loaded machine.
const FLUSH_LATENCY_MAX: Duration = Duration::from_millis(800);
/// The whole run; past it the pool is taken to have stopped.
const DEADLINE: Duration = Duration::from_secs(120);

#[test]
fn every_write_queued_on_the_io_pool_is_picked_up_at_once() {
    let dir = tempfile::Builder::new().prefix("atelier-test-sled-pool-").tempdir().expect("temp dir");
    let db = sled::Config::new()
        .path(dir.path().join("db"))
        .segment_size(SEGMENT_BYTES)
        .open()
        .expect("open sled");
    let (done_tx, done) = mpsc::channel::<Duration>();
    for t in 0..THREADS {
        let db = db.clone();
        let done_tx = done_tx.clone();
        std::thread::spawn(move || {
            let mut slowest = Duration::ZERO;
            for i in 0..ROUNDS {
                for v in 0..VALUES_PER_ROUND {
                    db.insert(format!("{t}-{i}-{v}"), vec![0u8; VALUE_BYTES]).expect("insert");
                }
                let flushing = Instant::now();
                db.flush().expect("flush");
                slowest = slowest.max(flushing.elapsed());
            }
            done_tx.send(slowest).expect("the test waits");
        });
    }
    drop(done_tx);
    let deadline = Instant::now() + DEADLINE;
    let mut slowest = Duration::ZERO;
    for finished in 0..THREADS {
        let left = deadline.saturating_duration_since(Instant::now());
        let s = done.recv_timeout(left).unwrap_or_else(|e| {
            panic!("{finished} of {THREADS} threads finished before {DEADLINE:?} ({e}): the writes stopped")
        });
        slowest = slowest.max(s);
    }
    assert!(
        slowest < FLUSH_LATENCY_MAX,
        "a flush took {slowest:?}: a write queued on the pool lost its wake-up and waited for a poll"
    );
}
