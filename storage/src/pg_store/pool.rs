//! A small, bounded pool of connections: a channel holds one slot per connection, and a slot
//! is empty until its first use or after its connection broke. A reader waits at most
//! [`PG_POOL_WAIT_MS`] for a slot and fails with `Unavailable` beyond, so that an outage or
//! a stuck database costs a request a bounded wait, never a thread forever.

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use postgres::types::ToSql;
use postgres::{Client, GenericClient, NoTls, Row, Statement};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::config::{
    PG_CONNECT_TIMEOUT_MS, PG_IDLE_IN_TRANSACTION_TIMEOUT_MS, PG_POOL_WAIT_MS, PG_STATEMENT_TIMEOUT_MS,
};
use crate::error::{pg, StorageError};

/// TCP keepalives on every connection: a database gone without a word (a cut network) is
/// noticed by the connection's own reads within this and the kernel's probes.
const PG_KEEPALIVE_IDLE_S: u64 = 5;

pub(super) struct Pool {
    config: ConnectConfig,
    tx: Sender<Option<(Client, Statements)>>,
    rx: Receiver<Option<(Client, Statements)>>,
}

/// One connection's prepared statements, by their text. A query given as text is parsed and
/// planned by the server at every call, and costs two round trips (prepare, then execute);
/// prepared once per connection, it costs one, and no parse. The store's queries are a
/// fixed, small set of literals, so the cache stays that small.
#[derive(Default)]
pub(super) struct Statements(HashMap<&'static str, Statement>);

impl Statements {
    /// `sql` prepared on `client` (the connection these statements belong to).
    pub(super) fn get(
        &mut self,
        client: &mut impl GenericClient,
        sql: &'static str,
    ) -> Result<Statement, postgres::Error> {
        if let Some(s) = self.0.get(sql) {
            return Ok(s.clone());
        }
        let s = client.prepare(sql)?;
        self.0.insert(sql, s.clone());
        Ok(s)
    }
}

/// How every connection of the store connects: the URL's settings, and TLS when asked for
/// (`tls`).
#[derive(Clone)]
pub(super) struct ConnectConfig {
    pg: postgres::Config,
    tls: Option<MakeRustlsConnect>,
}

impl ConnectConfig {
    /// The same, with connections that name themselves `name` in `pg_stat_activity`.
    pub(super) fn named(&self, name: &str) -> ConnectConfig {
        let mut c = self.clone();
        c.pg.application_name(name);
        c
    }
}

/// The connection settings every connection of the store uses; `ca`: `ATELIER_DATABASE_CA`.
pub(super) fn client_config(url: &str, ca: Option<&std::path::Path>) -> Result<ConnectConfig, StorageError> {
    let mut pg: postgres::Config = url.parse().map_err(|source| StorageError::Postgres {
        context: "parse the database URL".into(),
        source: std::sync::Arc::new(source),
    })?;
    pg.connect_timeout(Duration::from_millis(PG_CONNECT_TIMEOUT_MS))
        .options(&format!(
            "-c statement_timeout={PG_STATEMENT_TIMEOUT_MS} -c idle_in_transaction_session_timeout={PG_IDLE_IN_TRANSACTION_TIMEOUT_MS}"
        ))
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(PG_KEEPALIVE_IDLE_S))
        .application_name("atelier");
    let tls = super::tls::connector(&mut pg, ca)?;
    Ok(ConnectConfig { pg, tls })
}

pub(super) fn connect(config: &ConnectConfig) -> Result<Client, StorageError> {
    match &config.tls {
        Some(tls) => config.pg.connect(tls.clone()),
        None => config.pg.connect(NoTls),
    }
    .map_err(pg("connect"))
}

impl Pool {
    pub(super) fn new(config: ConnectConfig, connections: usize) -> Pool {
        let connections = connections.max(1);
        let (tx, rx) = crossbeam_channel::bounded(connections);
        for _ in 0..connections {
            tx.send(None).expect("invariant: the channel holds every slot");
        }
        Pool { config, tx, rx }
    }

    pub(super) fn get(&self) -> Result<Pooled<'_>, StorageError> {
        let slot = self.rx.recv_timeout(Duration::from_millis(PG_POOL_WAIT_MS)).map_err(|_| {
            StorageError::Unavailable { context: "no pooled connection came free".into(), source: None }
        })?;
        let mut pooled = Pooled { pool: self, client: None };
        pooled.client = match slot {
            Some((c, s)) if !c.is_closed() => Some((c, s)),
            // A broken or never-made connection: the slot is given back empty on failure.
            _ => Some((connect(&self.config)?, Statements::default())),
        };
        Ok(pooled)
    }
}

/// A connection out of the pool; its slot goes back when dropped (empty if it broke).
pub(super) struct Pooled<'a> {
    pool: &'a Pool,
    client: Option<(Client, Statements)>,
}

impl Pooled<'_> {
    fn parts(&mut self) -> (&mut Client, &mut Statements) {
        let (c, s) =
            self.client.as_mut().expect("invariant: a pooled connection holds its client until dropped");
        (c, s)
    }

    /// [`Client::query`] with `sql` prepared once per connection (they shadow the client's own).
    pub(super) fn query(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, postgres::Error> {
        let (c, s) = self.parts();
        let st = s.get(c, sql)?;
        c.query(&st, params)
    }

    pub(super) fn query_opt(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, postgres::Error> {
        let (c, s) = self.parts();
        let st = s.get(c, sql)?;
        c.query_opt(&st, params)
    }

    pub(super) fn query_one(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, postgres::Error> {
        let (c, s) = self.parts();
        let st = s.get(c, sql)?;
        c.query_one(&st, params)
    }
}

impl Deref for Pooled<'_> {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client.as_ref().expect("invariant: a pooled connection holds its client until dropped").0
    }
}

impl DerefMut for Pooled<'_> {
    fn deref_mut(&mut self) -> &mut Client {
        self.parts().0
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        let client = self.client.take().filter(|(c, _)| !c.is_closed());
        // The channel has room: this slot came out of it.
        let _ = self.pool.tx.try_send(client);
    }
}
