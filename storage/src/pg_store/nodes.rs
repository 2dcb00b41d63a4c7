//! Several servers (nodes) on one database: each node holds a lease in `atelier.nodes`, renewed
//! by a keeper thread of its own every `heartbeat_ms`, and lasting `lease_ms` past the last
//! renewal by the database's clock (one clock for all nodes: theirs may disagree).
//!
//! - A job is its node's while the node's lease holds: the writer records the node and its run
//!   (`incarnation`) with each job it starts (`atelier.jobs.node`), and a node whose lease
//!   lapsed, or an earlier run of a node, runs nothing: its running jobs are lost
//!   ([`Inner::lost_jobs`]) and the maintainer fails them so they retry.
//! - Fencing: every group commit checks the node's lease under the head row's lock; once the
//!   lease lapsed, the node appends nothing more, whatever it wakes up to. A node also stops
//!   by its own clock: with no renewal for `lease_ms - heartbeat_ms`, it counts its lease lost
//!   before any other node can (a partitioned node's jobs stop before they are taken over).
//!   A node that lost its lease stops its jobs, then takes a new lease as a new run
//!   (`EventStore::rejoin`).
//! - A lapsed lease is never renewed: the renewal's condition is the lease itself.
//! - Claims (`atelier.claims`): before it spawns a job, a node takes the commission at its
//!   version; another node may take it only at a later version, or once the holder's lease
//!   lapsed. So one node spawns per attempt; the append of `job_started` at that version is
//!   still what decides (`UNIQUE (commission_id, version)`).
//! - The maintainer is the live node with the least id: it alone rescues lost jobs and runs
//!   retention. Two nodes that briefly both think so do no harm: a rescue is an append at a
//!   version, and retention prunes what is already prunable.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use postgres::Client;

use super::config::{NodeConfig, PG_RECONNECT_BACKOFF_MIN_MS};
use super::lease::Lease;
use super::pool::{connect, ConnectConfig};
use super::state::{from_sql, sql_own, state_code, Inner};
use crate::error::{pg, StorageError};
use crate::event_store::{LostJob, NodeInfo};

/// How long a starting node waits for its id's previous lease to lapse or its holder to end,
/// beyond the lease itself, before it refuses to start (another live server has the id).
const REGISTER_SLACK_MS: u64 = 2_000;
/// How often a starting node looks again at a lease that still holds.
const REGISTER_RETRY_MS: u64 = 200;

/// This process, as the nodes table records it (and an earlier run of it can be told by).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string()
}

/// Takes the lease of node `config.id` for a new run and returns its incarnation. An earlier
/// run's lease is taken over at once when that run is gone (it was on this host, and its pid
/// is not alive, or is this process); otherwise this waits for it to lapse, and refuses with
/// [`StorageError::NodeInUse`] when it is still renewed.
pub(super) fn register(client: &mut Client, config: &NodeConfig) -> Result<i64, StorageError> {
    let (host, pid) = (host_name(), i32::try_from(std::process::id()).unwrap_or(i32::MAX));
    let lease_ms = i64::try_from(config.lease_ms).unwrap_or(i64::MAX);
    let deadline = Instant::now() + Duration::from_millis(config.lease_ms + REGISTER_SLACK_MS);
    loop {
        let row = client
            .query_opt(
                "SELECT incarnation, lease_until > clock_timestamp(), host, pid FROM atelier.nodes WHERE id = $1",
                &[&config.id],
            )
            .map_err(pg("read the node's lease"))?;
        let taken = match row {
            None => client.query_opt(
                "INSERT INTO atelier.nodes (id, incarnation, lease_until, heartbeat_at, started_at, host, pid)
                 VALUES ($1, 1, clock_timestamp() + $2 * interval '1 millisecond', clock_timestamp(), clock_timestamp(), $3, $4)
                 ON CONFLICT (id) DO NOTHING RETURNING incarnation",
                &[&config.id, &(lease_ms as f64), &host, &pid],
            ),
            Some(r) => {
                let (seen, holds, their_host, their_pid): (i64, bool, String, i32) =
                    (r.get(0), r.get(1), r.get(2), r.get(3));
                let gone = their_host == host && (their_pid == pid || !pid_alive(their_pid));
                if holds && !gone {
                    if Instant::now() >= deadline {
                        return Err(StorageError::NodeInUse {
                            node: config.id.clone(),
                            holder: format!("host {their_host} pid {their_pid}"),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(REGISTER_RETRY_MS));
                    continue;
                }
                // Compare and set: of two runs starting at once, one takes it.
                client.query_opt(
                    "UPDATE atelier.nodes SET incarnation = incarnation + 1,
                         lease_until = clock_timestamp() + $3 * interval '1 millisecond',
                         heartbeat_at = clock_timestamp(), started_at = clock_timestamp(), host = $4, pid = $5
                     WHERE id = $1 AND incarnation = $2 RETURNING incarnation",
                    &[&config.id, &seen, &(lease_ms as f64), &host, &pid],
                )
            }
        };
        if let Some(r) = taken.map_err(pg("take the node's lease"))? {
            let incarnation: i64 = r.get(0);
            tracing::info!(node = %config.id, incarnation, "node lease taken");
            return Ok(incarnation);
        }
    }
}

fn pid_alive(pid: i32) -> bool {
    pid > 0 && std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Renews the lease; `false` when it had lapsed (or another run took the id): it is lost.
fn renew(client: &mut Client, lease: &Lease) -> Result<bool, StorageError> {
    let lease_ms = lease.config.lease_ms as f64;
    let n = client
        .execute(
            "UPDATE atelier.nodes SET lease_until = clock_timestamp() + $3 * interval '1 millisecond',
                 heartbeat_at = clock_timestamp()
             WHERE id = $1 AND incarnation = $2 AND lease_until > clock_timestamp()",
            &[&lease.config.id, &lease.incarnation(), &lease_ms],
        )
        .map_err(pg("renew the node's lease"))?;
    Ok(n == 1)
}

/// The live node with the least id runs the maintenance.
fn maintainer(client: &mut Client) -> Result<Option<String>, StorageError> {
    client
        .query_one("SELECT min(id) FROM atelier.nodes WHERE lease_until > clock_timestamp()", &[])
        .map(|r| r.get(0))
        .map_err(pg("find the maintainer"))
}

/// The keeper thread: renews the lease every `heartbeat_ms` on a connection of its own,
/// follows who the maintainer is, counts the lease lost when the database says it lapsed or
/// when no renewal got through for `lease_ms - heartbeat_ms`, and takes a new lease when
/// asked to rejoin.
pub(super) fn keep(inner: Arc<Inner>, config: ConnectConfig) {
    let Some(lease) = inner.lease.as_ref() else { return };
    let config = config.named(&format!("atelier node {}", lease.config.id));
    let heartbeat = Duration::from_millis(lease.config.heartbeat_ms);
    let own_deadline = Duration::from_millis(lease.config.lease_ms.saturating_sub(lease.config.heartbeat_ms));
    let mut client: Option<Client> = None;
    let mut renewed_at = Instant::now();
    while !inner.closing.load(Ordering::Acquire) {
        let wait =
            if lease.rejoin_asked() { Duration::from_millis(PG_RECONNECT_BACKOFF_MIN_MS) } else { heartbeat };
        std::thread::sleep(wait);
        if client.is_none() {
            client = connect(&config).ok();
        }
        let Some(c) = client.as_mut() else {
            if !lease.is_lost() && renewed_at.elapsed() > own_deadline {
                lease.lose("no renewal reached the database in time");
            }
            continue;
        };
        if lease.is_lost() {
            if lease.rejoin_asked() {
                match register(c, &lease.config) {
                    Ok(incarnation) => {
                        lease.rejoined(incarnation);
                        renewed_at = Instant::now();
                        tracing::warn!(node = %lease.config.id, incarnation, "node rejoined with a new lease");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot take a new lease yet");
                        client = None;
                    }
                }
            }
            continue;
        }
        // Counted from before the renewal was sent: the lease runs from a later moment.
        let sent = Instant::now();
        match renew(c, lease).and_then(|held| Ok((held, maintainer(c)?))) {
            Ok((true, first)) => {
                renewed_at = sent;
                lease.set_maintainer(first.as_deref() == Some(lease.config.id.as_str()));
            }
            Ok((false, _)) => lease.lose("its lease lapsed before it was renewed"),
            Err(e) => {
                tracing::warn!(error = %e, "cannot renew the node's lease");
                client = None;
                lease.set_maintainer(false);
                if renewed_at.elapsed() > own_deadline {
                    lease.lose("no renewal reached the database in time");
                }
            }
        }
    }
}

/// The codes of the states a job runs in, as `atelier.commissions.state` holds them.
fn running_states() -> Vec<i16> {
    atelier_engine::State::ALL.iter().filter(|s| s.is_running()).map(|s| state_code(*s)).collect()
}

impl Inner {
    /// See `EventStore::claim`.
    pub(super) fn claim(&self, commission_id: u64, version: u64) -> Result<bool, StorageError> {
        let Some(lease) = &self.lease else { return Ok(true) };
        lease.check()?;
        let mut c = self.pool.get()?;
        let row = c
            .query_opt(
                "INSERT INTO atelier.claims AS c (commission_id, version, node, incarnation) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (commission_id) DO UPDATE
                     SET version = EXCLUDED.version, node = EXCLUDED.node, incarnation = EXCLUDED.incarnation
                 WHERE c.version < EXCLUDED.version
                    OR (c.node = EXCLUDED.node AND c.incarnation = EXCLUDED.incarnation)
                    OR NOT EXISTS (SELECT 1 FROM atelier.nodes n WHERE n.id = c.node
                                   AND n.incarnation = c.incarnation AND n.lease_until > clock_timestamp())
                 RETURNING 1",
                &[&sql_own(commission_id), &sql_own(version), &lease.config.id, &lease.incarnation()],
            )
            .map_err(pg("claim a commission"))?;
        Ok(row.is_some())
    }

    /// See `EventStore::lost_jobs`: each running commission's active job whose node's lease
    /// lapsed, or that an earlier run of its node (or no node on record) started.
    pub(super) fn lost_jobs(&self) -> Result<Vec<LostJob>, StorageError> {
        let running = running_states();
        let node = self.lease.as_ref().map(|l| l.config.id.clone());
        let rows = self
            .pool
            .get()?
            .query(
                "SELECT j.commission_id, j.id, j.node, c.snapshot FROM atelier.jobs j
                 JOIN atelier.commissions c ON c.id = j.commission_id
                 LEFT JOIN atelier.nodes n ON n.id = j.node
                 WHERE c.live AND c.state = ANY($1)
                   AND (n.id IS NULL OR n.incarnation IS DISTINCT FROM j.incarnation
                        OR n.lease_until <= clock_timestamp())",
                &[&running],
            )
            .map_err(pg("find lost jobs"))?;
        let mut lost = Vec::new();
        for r in rows {
            let (commission_id, job_id) = (from_sql(r.get(0), "jobs")?, from_sql(r.get(1), "jobs")?);
            // A running commission's earlier jobs are listed too; only its active one counts.
            let snapshot = super::state::decode_snapshot(r.get(3))?;
            if snapshot.active_job != Some(job_id) {
                continue;
            }
            let job_node: Option<String> = r.get(2);
            lost.push(LostJob { commission_id, job_id, here: job_node == node, node: job_node });
        }
        Ok(lost)
    }

    /// See `EventStore::cluster`.
    pub(super) fn cluster(&self) -> Result<Vec<NodeInfo>, StorageError> {
        let running = running_states();
        let mut c = self.pool.get()?;
        let rfc3339 = "YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"";
        let nodes = c
            .query(
                "SELECT id, incarnation, host, pid,
                        to_char(started_at AT TIME ZONE 'UTC', $1), to_char(heartbeat_at AT TIME ZONE 'UTC', $1),
                        to_char(lease_until AT TIME ZONE 'UTC', $1), lease_until > clock_timestamp(),
                        id = (SELECT min(id) FROM atelier.nodes WHERE lease_until > clock_timestamp())
                 FROM atelier.nodes ORDER BY id",
                &[&rfc3339],
            )
            .map_err(pg("list the nodes"))?;
        let jobs = c
            .query(
                "SELECT j.node, j.commission_id, j.id, c.snapshot FROM atelier.jobs j
                 JOIN atelier.commissions c ON c.id = j.commission_id
                 JOIN atelier.nodes n ON n.id = j.node AND n.incarnation = j.incarnation
                 WHERE c.live AND c.state = ANY($1) ORDER BY j.commission_id",
                &[&running],
            )
            .map_err(pg("list the nodes' jobs"))?;
        let mut out = Vec::with_capacity(nodes.len());
        for r in nodes {
            let id: String = r.get(0);
            let mut node = NodeInfo {
                incarnation: from_sql(r.get(1), "nodes")?,
                host: r.get(2),
                pid: u32::try_from(r.get::<_, i32>(3)).unwrap_or(0),
                started_at: r.get(4),
                heartbeat_at: r.get(5),
                lease_until: r.get(6),
                alive: r.get(7),
                maintainer: r.get::<_, Option<bool>>(8).unwrap_or(false),
                running: Vec::new(),
                id,
            };
            for j in jobs.iter().filter(|j| j.get::<_, String>(0) == node.id) {
                let (cid, job_id) = (from_sql(j.get(1), "jobs")?, from_sql(j.get(2), "jobs")?);
                if super::state::decode_snapshot(j.get(3))?.active_job == Some(job_id) {
                    node.running.push((cid, job_id));
                }
            }
            out.push(node);
        }
        Ok(out)
    }
}
