//! `atelier serve` under systemd (`Type=notify`, `packaging/atelier.service`): `READY=1` once
//! the store is open and the listener accepts, `STOPPING=1` when a stop begins, and
//! `WATCHDOG=1` at half of `WATCHDOG_USEC` for as long as the threads it watches (the log
//! writer, the scheduler) keep going round their loops. This is the one home of that policy.
//! Outside systemd (no `NOTIFY_SOCKET`, no `WATCHDOG_USEC`) every call here does nothing.

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{RecvTimeoutError, Sender};
use sd_notify::NotifyState;

/// A watched thread counts as stuck once its beat count has not moved for this many of its
/// beat intervals (or for a ping interval, when that is longer): one slow step (an fsync, a
/// job's spawn) must not look stuck, a thread blocked for good must.
const STALE_AFTER_BEATS: u32 = 3;
/// The longest beat interval of the watched threads: each wakes at least this often, idle
/// or not.
const BEAT_INTERVAL_MS_MAX: u64 =
    max_u64(atelier_storage::WRITER_BEAT_INTERVAL_MS, atelier_workers::SCHEDULER_BEAT_INTERVAL_MS);

const fn max_u64(a: u64, b: u64) -> u64 {
    if a > b {
        a
    } else {
        b
    }
}

/// A thread the watchdog watches: its name for the log, and how to read its beat count
/// (`None`: it has no such thread, e.g. a store without a writer).
pub struct Beat {
    name: &'static str,
    read: Box<dyn Fn() -> Option<u64> + Send>,
}

impl Beat {
    pub fn new(name: &'static str, read: impl Fn() -> Option<u64> + Send + 'static) -> Beat {
        Beat { name, read: Box::new(read) }
    }
}

/// Tells the service manager the server is up (the store open, the listener accepting).
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)], "READY=1");
}

/// Tells the service manager a stop has begun; the stop itself is bounded by
/// `TimeoutStopSec=`, not by the watchdog.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")], "STOPPING=1");
}

fn send(states: &[NotifyState<'_>], what: &str) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot tell the service manager {what}");
    }
}

/// When each watched thread last moved, as seen at the watchdog's checks. Pure: the clock
/// and the counts are arguments.
struct Liveness {
    stale_after: Duration,
    /// `(count, when it was last seen to change)` per watched thread.
    seen: Vec<Option<(u64, Instant)>>,
}

impl Liveness {
    fn new(threads: usize, stale_after: Duration) -> Liveness {
        Liveness { stale_after, seen: vec![None; threads] }
    }

    /// Takes this check's counts; the index of the first thread that has not moved for
    /// longer than `stale_after`, and for how long, if one has not.
    fn check(&mut self, now: Instant, counts: &[Option<u64>]) -> Option<(usize, Duration)> {
        let mut stuck = None;
        for (i, (seen, count)) in self.seen.iter_mut().zip(counts).enumerate() {
            let Some(count) = *count else { continue };
            match seen {
                Some((last, since)) if *last == count => {
                    let still = now.saturating_duration_since(*since);
                    if still > self.stale_after && stuck.is_none() {
                        stuck = Some((i, still));
                    }
                }
                _ => *seen = Some((count, now)),
            }
        }
        stuck
    }
}

/// The thread that pings the service manager's watchdog while every watched thread lives.
/// Dropping it (or [`Watchdog::stop`]) ends the pings.
pub struct Watchdog {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Starts pinging when the service manager asked for a watchdog (`WATCHDOG_USEC`, for
    /// this pid); `None` when it did not.
    pub fn start(beats: Vec<Beat>) -> Option<Watchdog> {
        let timeout = sd_notify::watchdog_enabled()?;
        let ping_every = timeout / 2;
        let stale_after = ping_every.max(Duration::from_millis(BEAT_INTERVAL_MS_MAX) * STALE_AFTER_BEATS);
        if stale_after >= timeout {
            tracing::warn!(
                watchdog_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                "the watchdog timeout is shorter than a stuck thread takes to tell; raise WatchdogSec="
            );
        }
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let thread = std::thread::Builder::new()
            .name("atelier-watchdog".into())
            .spawn(move || {
                ping_while_alive(&beats, Liveness::new(beats.len(), stale_after), ping_every, &stopped)
            })
            .map_err(|e| tracing::error!(error = %e, "cannot start the watchdog thread; no pings"))
            .ok()?;
        Some(Watchdog { stop: Some(stop), thread: Some(thread) })
    }

    /// Ends the pings and waits for the thread.
    pub fn stop(mut self) {
        self.end();
    }

    fn end(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The watchdog thread: every `ping_every`, a ping when every watched thread moved lately;
/// none (and one error naming the thread) while one has not. Ends when `stopped` closes.
fn ping_while_alive(
    beats: &[Beat],
    mut liveness: Liveness,
    ping_every: Duration,
    stopped: &crossbeam_channel::Receiver<()>,
) {
    let mut withheld = false;
    loop {
        let counts: Vec<Option<u64>> = beats.iter().map(|b| (b.read)()).collect();
        match liveness.check(Instant::now(), &counts) {
            None => {
                if withheld {
                    tracing::warn!("every watched thread moves again: watchdog pings resume");
                    withheld = false;
                }
                send(&[NotifyState::Watchdog], "WATCHDOG=1");
            }
            Some((i, still)) if !withheld => {
                tracing::error!(
                    thread = beats[i].name,
                    stuck_ms = u64::try_from(still.as_millis()).unwrap_or(u64::MAX),
                    "a thread has not gone round its loop: no more watchdog pings, so the service manager restarts the server"
                );
                withheld = true;
            }
            Some(_) => {}
        }
        match stopped.recv_timeout(ping_every) {
            Err(RecvTimeoutError::Timeout) => {}
            _ => break,
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STALE: Duration = Duration::from_millis(300);

    #[test]
    fn a_thread_is_stuck_only_once_its_count_stands_still_past_the_limit() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut l = Liveness::new(2, STALE);
        assert_eq!(l.check(at(0), &[Some(1), Some(1)]), None);
        assert_eq!(l.check(at(200), &[Some(3), Some(1)]), None, "still within the limit");
        assert_eq!(l.check(at(300), &[Some(5), Some(1)]), None, "exactly at the limit is not past it");
        assert_eq!(l.check(at(400), &[Some(7), Some(1)]), Some((1, Duration::from_millis(400))));
        assert_eq!(l.check(at(600), &[Some(7), Some(2)]), None, "it moved again");
        assert_eq!(l.check(at(950), &[Some(7), Some(3)]), Some((0, Duration::from_millis(550))));
    }

    #[test]
    fn a_thread_that_does_not_exist_is_never_stuck() {
        let t0 = Instant::now();
        let mut l = Liveness::new(1, STALE);
        assert_eq!(l.check(t0, &[None]), None);
        assert_eq!(l.check(t0 + Duration::from_secs(10), &[None]), None);
    }
}
