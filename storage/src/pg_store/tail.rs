//! The log follower: one thread per store that reads the log from this node's durable head
//! and publishes what other writers committed to this node's subscribers, in seq order.
//!
//! `LISTEN atelier_log` is only a wake-up hint (a group commit notifies as it commits; the
//! notification carries nothing): the follower always reads the log from its cursor, and reads
//! it every [`PG_TAIL_POLL_INTERVAL_MS`] anyway, so a lost notification (or a connection that
//! broke while one was sent) costs latency, never an event. While the database is away the
//! follower reconnects with backoff; subscriptions keep waiting (and their streams keep
//! heartbeating) and catch up when it is back.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use postgres::Client;

use super::config::{PG_RECONNECT_BACKOFF_MAX_MS, PG_RECONNECT_BACKOFF_MIN_MS, PG_TAIL_POLL_INTERVAL_MS};
use super::pool::connect;
use super::state::{delivery_of, sql_own, Inner};
use crate::error::{pg, StorageError};
use crate::subscribe::REPLAY_CHUNK_EVENTS;

pub(super) fn run(inner: Arc<Inner>) {
    let poll = Duration::from_millis(PG_TAIL_POLL_INTERVAL_MS);
    let mut client: Option<Client> = None;
    let mut backoff_ms = PG_RECONNECT_BACKOFF_MIN_MS;
    while !inner.closing.load(Ordering::Acquire) {
        let c = match client.as_mut() {
            Some(c) => c,
            None => match listen(&inner) {
                Ok(c) => {
                    backoff_ms = PG_RECONNECT_BACKOFF_MIN_MS;
                    client.insert(c)
                }
                Err(e) => {
                    tracing::debug!(error = %e, "the log follower cannot reach the database");
                    std::thread::sleep(Duration::from_millis(backoff_ms));
                    backoff_ms = (backoff_ms * 2).min(PG_RECONNECT_BACKOFF_MAX_MS);
                    continue;
                }
            },
        };
        let followed = catch_up(&inner, c).and_then(|()| wait(c, poll));
        if let Err(e) = followed {
            tracing::warn!(error = %e, "the log follower lost the database; reconnecting");
            client = None;
        }
    }
}

/// The follower's connections name themselves, so that an operator (or a test) can tell the
/// one holding `LISTEN` in `pg_stat_activity`.
pub const PG_FOLLOWER_APPLICATION_NAME: &str = "atelier follower";

fn listen(inner: &Inner) -> Result<Client, StorageError> {
    let mut c = connect(&inner.config.named(PG_FOLLOWER_APPLICATION_NAME))?;
    c.batch_execute("LISTEN atelier_log").map_err(pg("listen for log notifications"))?;
    Ok(c)
}

/// Waits for a notification or the poll interval, then takes every notification already
/// queued: one read of the log answers them all.
fn wait(c: &mut Client, poll: Duration) -> Result<(), StorageError> {
    let mut notes = c.notifications();
    notes.timeout_iter(poll).next().map_err(pg("wait for log notifications"))?;
    while notes.iter().next().map_err(pg("take log notifications"))?.is_some() {}
    Ok(())
}

/// Reads the log after the durable head and publishes it, chunk by chunk.
fn catch_up(inner: &Inner, c: &mut Client) -> Result<(), StorageError> {
    let limit = i64::try_from(REPLAY_CHUNK_EVENTS).unwrap_or(i64::MAX);
    loop {
        let head = inner.durable_head.load(Ordering::Acquire);
        let rows = c
            .query(
                "SELECT seq, envelope, view FROM atelier.events WHERE seq > $1 ORDER BY seq LIMIT $2",
                &[&sql_own(head), &limit],
            )
            .map_err(pg("follow the log"))?;
        let full = rows.len() == REPLAY_CHUNK_EVENTS;
        let deliveries = rows.iter().map(delivery_of).collect::<Result<Vec<_>, _>>()?;
        let mut reg = inner.registry.lock().unwrap_or_else(|p| p.into_inner());
        // This node's writer may have published some of them meanwhile.
        let head = inner.durable_head.load(Ordering::Acquire);
        let fresh: Vec<_> = deliveries.into_iter().skip_while(|d| d.env.seq <= head).collect();
        let Some(last) = fresh.last().map(|d| d.env.seq) else {
            if full {
                continue;
            }
            return Ok(());
        };
        if fresh[0].env.seq != head + 1 || last - head != fresh.len() as u64 {
            // The head lock makes a lower seq visible before a higher one (see `writer`), so
            // this is a broken log, never a commit still in flight.
            return Err(StorageError::corruption(head + 1, "the log skips this seq"));
        }
        inner.durable_head.store(last, Ordering::Release);
        let dropped = reg.publish(&fresh);
        drop(reg);
        if dropped > 0 {
            inner.dropped_slow.fetch_add(dropped, Ordering::Relaxed);
        }
        if !full {
            return Ok(());
        }
    }
}
