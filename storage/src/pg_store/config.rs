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
/// How long a session may sit idle inside a transaction before PostgreSQL ends it: a node cut
/// off in the middle of a group commit holds the log's head row, and every other node's
/// writes wait behind it until then. Atelier's own transactions never wait on anything but
/// the database.
pub const PG_IDLE_IN_TRANSACTION_TIMEOUT_MS: u64 = 5_000;
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

/// A node's lease on its running jobs lasts this long past its last renewal, by the
/// database's clock ...
pub const NODE_LEASE_MS_DEFAULT: u64 = 10_000;
/// ... and is renewed this often.
pub const NODE_HEARTBEAT_MS_DEFAULT: u64 = 2_000;
/// The longest lease a node may ask for: a longer one holds a dead node's jobs longer.
pub const NODE_LEASE_MS_MAX: u64 = 60_000;
/// The shortest: a lease must outlast a few renewals' round trips and a busy database.
pub const NODE_LEASE_MS_MIN: u64 = 1_000;

/// A server that shares the database with other servers (nodes) holds a lease there
/// (`nodes`): its running jobs are its own while the lease lasts, and another node fails
/// them once it lapses.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Stable across restarts: a restarted node takes back its id and fails its previous
    /// run's jobs at once, instead of waiting for their lease to lapse.
    pub id: String,
    pub lease_ms: u64,
    pub heartbeat_ms: u64,
}

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
    /// tests that play several writers). What the commands that must have the database to
    /// themselves (`replay --check`, `import`) do; a server is a node instead.
    pub one_server: bool,
    /// This store is a node's (`atelier serve`): it holds a lease, its writer appends only
    /// while the lease is valid, and the database is shared with the other nodes (while a
    /// `one_server` command holds it, no node opens).
    pub node: Option<NodeConfig>,
}

impl PgConfig {
    pub fn new(url: impl Into<String>) -> PgConfig {
        PgConfig {
            url: url.into(),
            pool_connections: PG_POOL_CONNECTIONS_DEFAULT,
            ca_file: None,
            one_server: false,
            node: None,
        }
    }

    /// The same, as node `node` ([`PgConfig::node`]).
    pub fn as_node(self, node: NodeConfig) -> PgConfig {
        PgConfig { node: Some(node), one_server: false, ..self }
    }

    /// The same, holding the database for this store alone ([`PgConfig::one_server`]).
    pub fn one_server(self) -> PgConfig {
        PgConfig { one_server: true, ..self }
    }
}
