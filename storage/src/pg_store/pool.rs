//! A small, bounded pool of connections: a channel holds one slot per connection, and a slot
//! is empty until its first use or after its connection broke. A reader waits at most
//! [`PG_POOL_WAIT_MS`] for a slot and fails with `Unavailable` beyond, so that an outage or
//! a stuck database costs a request a bounded wait, never a thread forever.

use std::ops::{Deref, DerefMut};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use postgres::{Client, NoTls};

use super::config::{PG_CONNECT_TIMEOUT_MS, PG_POOL_WAIT_MS, PG_STATEMENT_TIMEOUT_MS};
use crate::error::{pg, StorageError};

pub(super) struct Pool {
    config: postgres::Config,
    tx: Sender<Option<Client>>,
    rx: Receiver<Option<Client>>,
}

/// The connection settings every connection of the store uses.
pub(super) fn client_config(url: &str) -> Result<postgres::Config, StorageError> {
    let mut config: postgres::Config = url.parse().map_err(|source| StorageError::Postgres {
        context: "parse the database URL".into(),
        source: std::sync::Arc::new(source),
    })?;
    config
        .connect_timeout(Duration::from_millis(PG_CONNECT_TIMEOUT_MS))
        .options(&format!("-c statement_timeout={PG_STATEMENT_TIMEOUT_MS}"))
        .application_name("atelier");
    Ok(config)
}

pub(super) fn connect(config: &postgres::Config) -> Result<Client, StorageError> {
    config.connect(NoTls).map_err(pg("connect"))
}

impl Pool {
    pub(super) fn new(config: postgres::Config, connections: usize) -> Pool {
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
            Some(c) if !c.is_closed() => Some(c),
            // A broken or never-made connection: the slot is given back empty on failure.
            _ => Some(connect(&self.config)?),
        };
        Ok(pooled)
    }
}

/// A connection out of the pool; its slot goes back when dropped (empty if it broke).
pub(super) struct Pooled<'a> {
    pool: &'a Pool,
    client: Option<Client>,
}

impl Deref for Pooled<'_> {
    type Target = Client;
    fn deref(&self) -> &Client {
        self.client.as_ref().expect("invariant: a pooled connection holds its client until dropped")
    }
}

impl DerefMut for Pooled<'_> {
    fn deref_mut(&mut self) -> &mut Client {
        self.client.as_mut().expect("invariant: a pooled connection holds its client until dropped")
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        let client = self.client.take().filter(|c| !c.is_closed());
        // The channel has room: this slot came out of it.
        let _ = self.pool.tx.try_send(client);
    }
}
