//! The commands that need the database to themselves (`replay --check`, `export`, `import`)
//! hold a session advisory lock, on a connection of their own, for as long as their store is
//! open, the way a sled data dir's `LOCK` file keeps a server off it; the nodes (servers)
//! hold the same lock shared, so any number of them run together, but none beside such a
//! command. A store that cannot have the lock is refused with its holder's name.
//!
//! The lock lives with its session: a server that crashed gives it up as soon as PostgreSQL
//! sees its connection go, so a restart waits [`PG_SERVER_LOCK_WAIT_MS`] at most for a
//! predecessor's session to end. When the guard's own connection breaks, the keeper
//! reconnects and takes the lock again; if another server took it meanwhile, this store is
//! fenced: it refuses every append from then on, and `health` says why.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use postgres::Client;

use super::config::PG_HEALTH_CHECK_INTERVAL_MS;
use super::pool::{connect, ConnectConfig};
use super::state::Inner;
use crate::error::{pg, StorageError};

/// Identifies the one-server lock among the database's advisory locks ("atelserv").
pub const PG_SERVER_LOCK_KEY: i64 = 0x6174_656c_7365_7276;
/// How long opening waits for the lock before refusing: enough for a crashed predecessor's
/// session to end (PostgreSQL notices a closed connection at once).
pub const PG_SERVER_LOCK_WAIT_MS: u64 = 5_000;
const RETRY_MS: u64 = 100;

/// Takes the lock on a connection of its own, waiting up to [`PG_SERVER_LOCK_WAIT_MS`];
/// [`StorageError::DatabaseInUse`] names the holder when another server keeps it.
/// `shared`: a node's lock, which other nodes share.
pub(super) fn take(config: &ConnectConfig, shared: bool) -> Result<Client, StorageError> {
    let config = config.named(&holder_name());
    let deadline = Instant::now() + Duration::from_millis(PG_SERVER_LOCK_WAIT_MS);
    let mut client = connect(&config)?;
    loop {
        if try_lock(&mut client, shared)? {
            return Ok(client);
        }
        if Instant::now() >= deadline {
            return Err(StorageError::DatabaseInUse { holder: holder(&mut client)? });
        }
        std::thread::sleep(Duration::from_millis(RETRY_MS));
    }
}

/// Keeps the lock while the store is open: checks the guard's connection every
/// [`PG_HEALTH_CHECK_INTERVAL_MS`], and after it broke, reconnects and locks again, or fences
/// the store when another server holds the lock now.
pub(super) fn keep(inner: Arc<Inner>, mut client: Option<Client>, config: ConnectConfig, shared: bool) {
    let config = config.named(&holder_name());
    while !inner.closing.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(PG_HEALTH_CHECK_INTERVAL_MS));
        if let Some(c) = client.as_mut() {
            if c.simple_query("SELECT 1").is_ok() {
                continue;
            }
            tracing::warn!("the server lock's connection broke; taking the lock again");
            client = None;
        }
        let Ok(mut c) = connect(&config) else { continue };
        match try_lock(&mut c, shared) {
            Ok(true) => client = Some(c),
            Ok(false) => {
                let holder = holder(&mut c).unwrap_or_else(|e| e.to_string());
                tracing::error!(%holder, "another server took the database; this one appends nothing more");
                *inner.fenced.lock().unwrap_or_else(|p| p.into_inner()) = Some(holder);
                return;
            }
            Err(_) => {}
        }
    }
}

fn try_lock(c: &mut Client, shared: bool) -> Result<bool, StorageError> {
    let sql =
        if shared { "SELECT pg_try_advisory_lock_shared($1)" } else { "SELECT pg_try_advisory_lock($1)" };
    c.query_one(sql, &[&PG_SERVER_LOCK_KEY]).map(|r| r.get(0)).map_err(pg("take the server lock"))
}

/// Who holds the lock, by its connection's name (see [`holder_name`]) and address.
fn holder(c: &mut Client) -> Result<String, StorageError> {
    let row = c
        .query_opt(
            "SELECT a.application_name, coalesce(host(a.client_addr), 'a local socket'), a.backend_start::text
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
               AND ((l.classid::bigint << 32) | l.objid::bigint) = $1
             ORDER BY l.mode LIMIT 1",
            &[&PG_SERVER_LOCK_KEY],
        )
        .map_err(pg("find the server lock's holder"))?;
    Ok(match row {
        Some(r) => {
            let name: String = r.get(0);
            let name = if name.is_empty() { "a session without a name".to_string() } else { name };
            format!("{name} (from {}, connected at {})", r.get::<_, String>(1), r.get::<_, String>(2))
        }
        None => "another server (it has just let go; try again)".to_string(),
    })
}

/// This server as its lock's connection names it in `pg_stat_activity`.
fn holder_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("atelier server on {} pid {}", host.trim(), std::process::id())
}
