//! The database's schema, `atelier`, made and migrated by Atelier itself: each migration is
//! applied once, in order, and recorded in `atelier.schema_migrations`. Two servers starting
//! together take turns (a transaction-scoped advisory lock), and a database migrated by a newer
//! Atelier is refused by name rather than misread.

use postgres::Client;

use crate::error::{pg, StorageError};

/// Identifies Atelier's migration lock among the database's advisory locks ("atel").
const MIGRATION_LOCK_KEY: i64 = 0x6174_656c;

/// The migrations, in order; the newest index + 1 is the schema version this build writes.
///
/// `head` is the one row every group commit locks first: it holds the last seq handed out and
/// the next commission id, so both are gap-free and in commit order (see `writer`). The
/// projections are plain tables written in the same transaction as their events; the by-user
/// listing and the live set are indexes of `commissions`.
///
/// 2: `state_counts`, the commissions per state, moved by each group commit, so that a
/// `/metrics` scrape reads a few rows instead of counting the whole table.
///
/// 3: several nodes on one database (`nodes`): each node's lease, the node (and its run,
/// `incarnation`) that started each job, and `claims`, which node may start a runnable
/// commission at which version.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE atelier.head (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    seq bigint NOT NULL,
    next_commission bigint NOT NULL
);
INSERT INTO atelier.head (seq, next_commission) VALUES (0, 1);
CREATE TABLE atelier.events (
    seq bigint PRIMARY KEY,
    commission_id bigint NOT NULL,
    version bigint NOT NULL,
    user_id text NOT NULL,
    envelope bytea NOT NULL,
    view bytea NOT NULL,
    CONSTRAINT events_commission_version UNIQUE (commission_id, version)
);
CREATE INDEX events_user_seq ON atelier.events (user_id, seq);
CREATE TABLE atelier.commissions (
    id bigint PRIMARY KEY,
    user_id text NOT NULL,
    state smallint NOT NULL,
    live boolean NOT NULL,
    version bigint NOT NULL,
    snapshot bytea NOT NULL
);
CREATE INDEX commissions_user_id ON atelier.commissions (user_id, id);
CREATE INDEX commissions_live ON atelier.commissions (id) WHERE live;
CREATE TABLE atelier.idempotency (
    user_id text NOT NULL,
    key text NOT NULL,
    commission_id bigint NOT NULL,
    PRIMARY KEY (user_id, key)
);
CREATE TABLE atelier.jobs (
    id bigint PRIMARY KEY,
    commission_id bigint NOT NULL,
    record bytea NOT NULL
);
CREATE INDEX jobs_commission ON atelier.jobs (commission_id, id);
CREATE SEQUENCE atelier.job_ids;
"#,
    r#"
CREATE TABLE atelier.state_counts (
    state smallint PRIMARY KEY,
    n bigint NOT NULL
);
INSERT INTO atelier.state_counts (state, n) SELECT state, count(*) FROM atelier.commissions GROUP BY state;
"#,
    r#"
CREATE TABLE atelier.nodes (
    id text PRIMARY KEY,
    incarnation bigint NOT NULL,
    lease_until timestamptz NOT NULL,
    heartbeat_at timestamptz NOT NULL,
    started_at timestamptz NOT NULL,
    host text NOT NULL,
    pid integer NOT NULL
);
ALTER TABLE atelier.jobs ADD COLUMN node text, ADD COLUMN incarnation bigint;
CREATE TABLE atelier.claims (
    commission_id bigint PRIMARY KEY,
    version bigint NOT NULL,
    node text NOT NULL,
    incarnation bigint NOT NULL
);
"#,
];

/// The schema version this build reads and writes.
pub const PG_SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// Brings the schema up to [`PG_SCHEMA_VERSION`], in one transaction.
pub(super) fn migrate(client: &mut Client) -> Result<(), StorageError> {
    let mut tx = client.transaction().map_err(pg("begin the migration"))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])
        .map_err(pg("take the migration lock"))?;
    tx.batch_execute(
        "CREATE SCHEMA IF NOT EXISTS atelier;
         CREATE TABLE IF NOT EXISTS atelier.schema_migrations (
             version integer PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now()
         );",
    )
    .map_err(pg("create the schema"))?;
    let found: i32 = tx
        .query_one("SELECT coalesce(max(version), 0) FROM atelier.schema_migrations", &[])
        .and_then(|row| row.try_get(0))
        .map_err(pg("read the schema version"))?;
    if found > PG_SCHEMA_VERSION {
        return Err(StorageError::NewerDatabaseSchema { found, supported: PG_SCHEMA_VERSION });
    }
    for (version, sql) in (1..).zip(MIGRATIONS).skip(usize::try_from(found).unwrap_or(0)) {
        tx.batch_execute(sql).map_err(pg(format!("apply migration {version}")))?;
        tx.execute("INSERT INTO atelier.schema_migrations (version) VALUES ($1)", &[&version])
            .map_err(pg(format!("record migration {version}")))?;
        tracing::info!(version, "database schema migrated");
    }
    tx.commit().map_err(pg("commit the migration"))
}
