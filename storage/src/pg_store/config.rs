//! How to reach PostgreSQL, and the limits of the connections to it.

/// Connections the readers share (snapshots, listings, history); the writer and the log
/// follower hold one each besides.
pub const PG_POOL_CONNECTIONS_DEFAULT: usize = 8;
/// How long connecting may take before the database counts as unavailable.
pub const PG_CONNECT_TIMEOUT_MS: u64 = 2_000;
/// How long a reader waits for a pooled connection to come free.
pub const PG_POOL_WAIT_MS: u64 = 2_000;
/// Any one statement's bound (`statement_timeout`), lock waits included.
pub const PG_STATEMENT_TIMEOUT_MS: u64 = 10_000;
/// How often the log follower reads the log without a notification: a lost `NOTIFY` costs at
/// most this much latency, never an event.
pub const PG_TAIL_POLL_INTERVAL_MS: u64 = 500;
/// How often an idle writer checks its connection, so that `health` follows an outage (and the
/// end of one) without waiting for an append.
pub const PG_HEALTH_CHECK_INTERVAL_MS: u64 = 1_000;
/// Reconnects back off from this ...
pub const PG_RECONNECT_BACKOFF_MIN_MS: u64 = 100;
/// ... doubling up to this.
pub const PG_RECONNECT_BACKOFF_MAX_MS: u64 = 5_000;

#[derive(Clone, Debug)]
pub struct PgConfig {
    /// A `postgres://` URL (or a libpq key=value string).
    pub url: String,
    pub pool_connections: usize,
    /// `ATELIER_DATABASE_CA`: the PEM file of the CA(s) the database's certificate must chain to;
    /// given, connections use TLS or fail (`tls`).
    pub ca_file: Option<std::path::PathBuf>,
    /// Hold the database for this store alone while it is open (`guard`): what a server and
    /// the commands that open its store do. Off, several stores share the database (the
    /// tests that play several writers).
    pub one_server: bool,
}

impl PgConfig {
    pub fn new(url: impl Into<String>) -> PgConfig {
        PgConfig {
            url: url.into(),
            pool_connections: PG_POOL_CONNECTIONS_DEFAULT,
            ca_file: None,
            one_server: false,
        }
    }

    /// The same, holding the database for this store alone ([`PgConfig::one_server`]).
    pub fn one_server(self) -> PgConfig {
        PgConfig { one_server: true, ..self }
    }
}
