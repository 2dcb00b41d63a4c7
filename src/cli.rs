//! The command line as clap types: every subcommand, flag and default in one place, so that
//! `--help`, `atelier help`, suggestions for typos and usage errors (exit 2) all come from it.
//! Flags only name overrides; the settings module applies them over the environment and the
//! config file.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// The settings table `atelier help` prints below the commands; README's "Settings" mirrors it.
const SETTINGS_HELP: &str = "\
The client commands take --url (or ATELIER_URL, default http://127.0.0.1:8080) and --token (or
ATELIER_TOKEN).

Executors and pipelines are configured in atelier.toml ([workers], [pipelines.NAME]) and with
USE_JOB_CONTROLLER, KEEP_TASK_RUNNER, JOB_CONTROLLER_PRIORITY, MAX_CONCURRENT_JOBS and
PROGRESS_UPDATE_INTERVAL (see workers/README.md).

Settings (a flag wins over the environment, which wins over atelier.toml, which wins over the
defaults):
    ATELIER_LISTEN            listen address                    127.0.0.1:8080
    ATELIER_DATA_DIR          data directory                    ./atelier-data
    ATELIER_DATABASE_URL      keep the log in PostgreSQL (postgres://...)   the data dir's sled store
    ATELIER_DATABASE_CA       TLS to PostgreSQL, verified against this PEM (sslmode=require alone: the system's roots)   plain text
    ATELIER_NODE_ID           on PostgreSQL: this server's node id, stable across restarts   HOST-<hash of DATA_DIR>
    ATELIER_NODE_LEASE_MS     on PostgreSQL: a node's jobs move to others this long after it stops renewing   10000
    ATELIER_NODE_HEARTBEAT_MS on PostgreSQL: how often a node renews its lease (at most a third of it)   2000
    ATELIER_CONFIG            config file                       ./atelier.toml if present
    ATELIER_SECRET            token signing secret, 32 bytes or more   a random secret in DATA_DIR/secret
    ATELIER_TOKEN_TTL_MAX     longest a token may live (s, m, h or d)   30d
    ATELIER_DURABILITY        sync | periodic                   sync (acknowledge only after fsync)
    ATELIER_DURABILITY_INTERVAL_MS  periodic: sync this often (a crash loses up to this)  100
    ATELIER_CACHE_BYTES       sled page cache                   67108864
    ATELIER_DISK_RESERVE_BYTES  ballast file in DATA_DIR, given back when the disk fills   16777216 (0 = none)
    ATELIER_RETENTION_DAYS    prune terminal commissions older than this   off
    ATELIER_JOB_DIRS_KEEP_DAYS  remove finished jobs' dirs (and logs) after   7 (0 = keep)
    ATELIER_ARTIFACTS_KEEP_DAYS  remove artifacts no commission refers to after   7 (0 = keep)
    ATELIER_ARTIFACTS_DIR     artifacts here (absolute; shared by servers on one database)   DATA_DIR/artifacts
    ATELIER_CGROUP            a cgroup per job: auto | off | a delegated parent's path   auto
    ATELIER_HEARTBEAT_MS      SSE heartbeat interval            15000
    ATELIER_MAX_CONNECTIONS   open connections, streams included 10000
    ATELIER_MAX_CONNECTIONS_PER_IP  open connections from one address   256
    ATELIER_USER_PRIORITY_MAX a user's priorities: -N..=N (admins any)   10
    ATELIER_USER_ACTIVE_MAX   active commissions per user (0 = no limit)   1000
    ATELIER_USER_STREAMS_MAX  open streams per user (0 = no limit)   32
    ATELIER_USER_RATE         requests a second per user (0 = no limit)   50
    ATELIER_USER_BURST        requests a user may make at once before the rate applies   200
    ATELIER_METRICS_PUBLIC    1 = /metrics without a token      0
    ATELIER_HEADER_TIMEOUT_MS answer 408 and close when a request head does not arrive in time   10000
    ATELIER_BODY_TIMEOUT_MS   answer 408 and close when a request body does not arrive in time   30000
    ATELIER_TLS_CERT          HTTPS: the certificate chain (PEM), with ATELIER_TLS_KEY   off (HTTP)
    ATELIER_TLS_KEY           HTTPS: the private key (PEM), with ATELIER_TLS_CERT   off (HTTP)
    ATELIER_TRUSTED_PROXIES   proxies (IPs, CIDRs) whose X-Forwarded-For names the client   none
    ATELIER_WORKER_PROGRAM    the program each job runs         atelier-worker next to this binary
                              (`cargo build-worker` makes it), else this binary
    ATELIER_WORKER_USER       the user jobs run as, a name or uid (switching needs root)   atelier-worker
                              under root, else this server's own user (see workers/README.md)
    ATELIER_ALLOW_ROOT_WORKERS  true = under root, jobs may run as root   false (the start stops)
    ATELIER_LOG_FORMAT        json for JSON lines               human-readable
    RUST_LOG                  log level filter                  info";

/// What `atelier backup --help` adds below the flags; README's "Backups" says the same.
const BACKUP_HELP: &str = "\
The server keeps serving: it sends its log through its head when asked (GET /api/admin/backup,
an admin token), appends go on meanwhile, and DIR gets exactly the events up to that seq, as a
sled data dir, with every artifact its commissions refer to. `atelier serve` and
`atelier replay --check` work on DIR like on any data dir. On failure DIR is left as it was.

The token secret is not copied (an admin token must not carry away the key that signs everyone's
tokens): copy DATA_DIR/secret into DIR (mode 0600), or set ATELIER_SECRET, for a server on DIR to
accept the tokens the old one signed; without either it makes a new secret.

A server whose log is in PostgreSQL is backed up the same way, into a sled data dir; pg_dump of
its database is the way to a copy that stays in PostgreSQL.";

/// `atelier --version`: the package version and the source revision it was built from
/// (`build.rs`), as `/metrics` names them in `atelier_build_info`.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("ATELIER_REVISION"), ")");

#[derive(Debug, Parser)]
#[command(
    name = "atelier",
    version = VERSION,
    about = "atelier — runs commissions (long background jobs) and shows their progress live",
    after_help = SETTINGS_HELP
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the API, the live streams and the status page, and run the jobs
    Serve {
        /// Listen address [env: ATELIER_LISTEN] [default: 127.0.0.1:8080]
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Print a bearer token (HS256 JWT)
    Token {
        /// Whose token it is
        #[arg(long, value_name = "NAME")]
        user: String,
        /// An admin token
        #[arg(long)]
        admin: bool,
        /// How long it is valid: seconds, or a number with s, m, h or d
        #[arg(long, value_name = "TTL", default_value = "24h")]
        ttl: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Manage the token signing secret kept in the data dir
    Secret {
        #[command(subcommand)]
        action: SecretAction,
    },
    /// Rebuild every projection from the log and compare (exit 1 when they differ)
    Replay {
        /// Compare the rebuilt projections with the stored ones (required)
        #[arg(long, required = true)]
        check: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Write the log as JSON lines
    Export {
        /// Write here instead of stdout
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Load an export into an empty data dir
    Import {
        /// An export's JSON lines
        file: PathBuf,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Copy a running server's log and artifacts into a new data dir, as of one log seq
    #[command(after_help = BACKUP_HELP)]
    Backup {
        /// The new data dir: must not exist, or be empty
        dir: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Create a commission and print its id
    Submit {
        /// The commission's context, a JSON object
        #[arg(long, value_name = "JSON")]
        context: String,
        /// The pipeline that runs it [default: the server's]
        #[arg(long, value_name = "P")]
        pipeline: Option<String>,
        /// Higher runs first
        #[arg(long, value_name = "N", allow_negative_numbers = true)]
        priority: Option<i64>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Follow a commission live with per-stage bars (exit 0 completed, 1 failed, 3 cancelled)
    Watch {
        /// The commission's id
        id: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print a commission's snapshot as JSON
    Status {
        /// The commission's id
        id: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List your commissions, newest first
    List {
        /// Only commissions in this state
        #[arg(long, value_name = "S")]
        state: Option<String>,
        /// At most this many
        #[arg(long, value_name = "N", default_value_t = 20)]
        limit: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum SecretAction {
    /// Write a new secret: every token signed so far stops working (a running server picks it
    /// up within a second; streams resume with a new token and Last-Event-ID)
    Rotate {
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// Where the server's data and settings are, for the commands that open the store.
#[derive(Debug, Args)]
pub struct StoreArgs {
    /// Data directory [env: ATELIER_DATA_DIR] [default: ./atelier-data]
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Config file [env: ATELIER_CONFIG] [default: ./atelier.toml if present]
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// Which server the client commands talk to, and as whom.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The server [env: ATELIER_URL] [default: http://127.0.0.1:8080]
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// A bearer token from `atelier token` [env: ATELIER_TOKEN]
    #[arg(long, value_name = "TOKEN")]
    pub token: Option<String>,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        super::Cli::command().debug_assert();
    }

    /// The flags' help repeats the settings' defaults in prose; it must say what the settings
    /// module does.
    #[test]
    fn flag_help_states_the_defaults_the_settings_use() {
        use crate::settings::{DATA_DIR_DEFAULT, LISTEN_DEFAULT, URL_DEFAULT};
        let cmd = super::Cli::command();
        let help = |sub: &str, arg: &str| -> String {
            let sub = cmd.find_subcommand(sub).expect("subcommand");
            let arg = sub.get_arguments().find(|a| a.get_id() == arg).expect("argument");
            arg.get_help().expect("help").to_string()
        };
        assert!(help("serve", "listen").contains(&format!("[default: {LISTEN_DEFAULT}]")));
        assert!(help("serve", "data_dir").contains(&format!("[default: ./{DATA_DIR_DEFAULT}]")));
        assert!(help("watch", "url").contains(&format!("[default: {URL_DEFAULT}]")));
        assert!(super::SETTINGS_HELP.contains(&format!(
            "ATELIER_LISTEN            listen address                    {LISTEN_DEFAULT}"
        )));
    }
}
