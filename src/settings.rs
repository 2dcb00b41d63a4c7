//! The validated settings layer: turns the raw values of `atelier_config::Sources` (the config
//! file and the environment) and the command line's overrides into the typed settings each
//! command runs with. The precedence is one rule, flag > environment > file > default; the
//! last three are the raw layer's, a flag is applied here. The executors' settings are
//! validated by their owner, `WorkersConfig::from_sources`, from the same sources.

use std::path::PathBuf;

use atelier_config::{ConfigError, Found, Sources};
use atelier_http::client_addr::TrustedProxies;
use atelier_http::shares::ShareLimits;
use atelier_storage::{
    Durability, NodeConfig, StoreConfig, NODE_HEARTBEAT_MS_DEFAULT, NODE_LEASE_MS_DEFAULT, NODE_LEASE_MS_MAX,
    NODE_LEASE_MS_MIN,
};

/// The keys atelier.toml may have at its top level: the server's settings and the executors'
/// tables.
const TOP_LEVEL_KEYS: &[&str] = &[
    "listen",
    "data_dir",
    "database_url",
    "database_ca",
    "node_id",
    "node_lease_ms",
    "node_heartbeat_ms",
    "durability",
    "durability_interval_ms",
    "cache_capacity_bytes",
    "disk_reserve_bytes",
    "retention_days",
    "heartbeat_ms",
    "max_connections",
    "max_connections_per_ip",
    "metrics_public",
    "header_timeout_ms",
    "body_timeout_ms",
    "tls_cert",
    "tls_key",
    "trusted_proxies",
    "token_ttl_max",
    "user_priority_max",
    "user_active_max",
    "user_streams_max",
    "user_rate",
    "user_burst",
    "worker_program",
    "workers",
    "pipelines",
];

pub const LISTEN_DEFAULT: &str = "127.0.0.1:8080";
pub const DATA_DIR_DEFAULT: &str = "atelier-data";
pub const URL_DEFAULT: &str = "http://127.0.0.1:8080";
/// How often `ATELIER_DURABILITY=periodic` makes the log durable.
const DURABILITY_INTERVAL_MS_DEFAULT: u64 = 100;

/// The server's settings, and the store's (which `token`, `replay`, `export` and `import` use
/// too).
pub struct ServerSettings {
    pub listen: String,
    pub data_dir: PathBuf,
    /// `ATELIER_DATABASE_URL`: the log lives in this PostgreSQL database instead of the data
    /// dir's sled store (the data dir still holds the secret and the jobs' dirs).
    pub database_url: Option<String>,
    /// `ATELIER_DATABASE_CA`: connections to the database use TLS, verified against this PEM.
    pub database_ca: Option<PathBuf>,
    /// On PostgreSQL, `atelier serve` is a node of those sharing the database: its id (set,
    /// or made from the host name and the data dir), its lease and how often it renews it.
    pub node: NodeConfig,
    pub durability: Durability,
    pub cache_bytes: u64,
    /// The disk reserve's size in bytes (0: none).
    pub disk_reserve_bytes: u64,
    pub retention_days: Option<u64>,
    pub heartbeat_ms: u64,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub metrics_public: bool,
    pub header_timeout_ms: u64,
    pub body_timeout_ms: u64,
    /// HTTPS: the certificate chain and the private key (PEM files), both or neither.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Reverse proxies whose `X-Forwarded-For` names the client.
    pub trusted_proxies: TrustedProxies,
    /// The program each job runs; None: `atelier-worker` next to this binary, else this binary.
    pub worker_program: Option<PathBuf>,
    /// `ATELIER_SECRET`, if set: the token secret (else one kept in the data dir).
    pub secret: Option<String>,
    /// The longest a token may live, issued or accepted.
    pub token_ttl_max_s: i64,
    /// What one (non-admin) user may take of the server.
    pub share_limits: ShareLimits,
}

/// What the command line may override.
#[derive(Default)]
pub struct Overrides {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
}

impl ServerSettings {
    /// Validates every server setting of `sources` (so a bad one fails whichever command reads
    /// them), with `flags` on top.
    pub fn load(sources: &Sources<'_>, flags: Overrides) -> Result<ServerSettings, ConfigError> {
        sources.expect_top_level_keys(TOP_LEVEL_KEYS)?;
        ServerSettings::load_unlocated(sources, flags).map_err(|e| sources.locate(e))
    }

    fn load_unlocated(s: &Sources<'_>, flags: Overrides) -> Result<ServerSettings, ConfigError> {
        let text = |key: &str, env: &str| s.get(key, &[env]).map(|f| f.raw.text());
        let num = |key: &str, env: &str, default: u64| -> Result<u64, ConfigError> {
            s.get(key, &[env]).map_or(Ok(default), |f| number(&f, "is not a number"))
        };
        let durability = durability(s)?;
        let connections_max_default =
            u64::try_from(atelier_http::CONNECTIONS_MAX_DEFAULT).expect("invariant: a small constant");
        let connections_per_ip_max_default =
            u64::try_from(atelier_http::CONNECTIONS_PER_IP_MAX_DEFAULT).expect("invariant: a small constant");
        let share_limits = share_limits(s)?;
        let data_dir = flags
            .data_dir
            .or_else(|| text("data_dir", "ATELIER_DATA_DIR").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from(DATA_DIR_DEFAULT));
        Ok(ServerSettings {
            share_limits,
            listen: flags
                .listen
                .or_else(|| text("listen", "ATELIER_LISTEN"))
                .unwrap_or_else(|| LISTEN_DEFAULT.into()),
            node: node(s, &data_dir)?,
            data_dir,
            database_url: database_url(s)?,
            database_ca: text("database_ca", "ATELIER_DATABASE_CA").map(PathBuf::from),
            durability,
            cache_bytes: num(
                "cache_capacity_bytes",
                "ATELIER_CACHE_BYTES",
                atelier_storage::CACHE_CAPACITY_BYTES_DEFAULT,
            )?,
            disk_reserve_bytes: num(
                "disk_reserve_bytes",
                "ATELIER_DISK_RESERVE_BYTES",
                atelier_storage::DISK_RESERVE_BYTES_DEFAULT,
            )?,
            retention_days: s
                .get("retention_days", &["ATELIER_RETENTION_DAYS"])
                .map(|f| number(&f, "is not a number of days"))
                .transpose()?,
            heartbeat_ms: num("heartbeat_ms", "ATELIER_HEARTBEAT_MS", atelier_http::HEARTBEAT_MS_DEFAULT)?,
            max_connections: usize::try_from(num(
                "max_connections",
                "ATELIER_MAX_CONNECTIONS",
                connections_max_default,
            )?)
            .unwrap_or(usize::MAX),
            max_connections_per_ip: usize::try_from(num(
                "max_connections_per_ip",
                "ATELIER_MAX_CONNECTIONS_PER_IP",
                connections_per_ip_max_default,
            )?)
            .unwrap_or(usize::MAX),
            metrics_public: text("metrics_public", "ATELIER_METRICS_PUBLIC")
                .is_some_and(|v| v == "1" || v == "true"),
            header_timeout_ms: num(
                "header_timeout_ms",
                "ATELIER_HEADER_TIMEOUT_MS",
                atelier_http::HEADER_TIMEOUT_MS_DEFAULT,
            )?,
            body_timeout_ms: num(
                "body_timeout_ms",
                "ATELIER_BODY_TIMEOUT_MS",
                atelier_http::BODY_TIMEOUT_MS_DEFAULT,
            )?,
            tls: tls(s)?,
            trusted_proxies: match s.get("trusted_proxies", &["ATELIER_TRUSTED_PROXIES"]) {
                None => TrustedProxies::default(),
                Some(found) => {
                    TrustedProxies::parse(&found.raw.text()).map_err(|e| found.invalid(e.to_string()))?
                }
            },
            worker_program: text("worker_program", "ATELIER_WORKER_PROGRAM").map(PathBuf::from),
            secret: s.env("ATELIER_SECRET"),
            token_ttl_max_s: token_ttl_max_s(s)?,
        })
    }

    pub fn store_config(&self) -> StoreConfig {
        let mut config = StoreConfig::new(&self.data_dir);
        config.cache_capacity_bytes = self.cache_bytes;
        config.durability = self.durability;
        config.disk_reserve_bytes = self.disk_reserve_bytes;
        config
    }
}

/// `durability` (`sync` or `periodic`, with its interval).
fn durability(s: &Sources<'_>) -> Result<Durability, ConfigError> {
    let Some(found) = s.get("durability", &["ATELIER_DURABILITY"]) else {
        return Ok(Durability::Sync);
    };
    match found.raw.text().as_str() {
        "sync" => Ok(Durability::Sync),
        "periodic" => Ok(Durability::Periodic {
            interval_ms: s
                .get("durability_interval_ms", &["ATELIER_DURABILITY_INTERVAL_MS"])
                .map_or(Ok(DURABILITY_INTERVAL_MS_DEFAULT), |f| number(&f, "is not a number"))?,
        }),
        other => Err(found.invalid(format!("'{other}' is not sync or periodic"))),
    }
}

/// The certificate and key files of HTTPS: both or neither.
fn tls(s: &Sources<'_>) -> Result<Option<(PathBuf, PathBuf)>, ConfigError> {
    match (s.get("tls_cert", &["ATELIER_TLS_CERT"]), s.get("tls_key", &["ATELIER_TLS_KEY"])) {
        (None, None) => Ok(None),
        (Some(cert), Some(key)) => Ok(Some((PathBuf::from(cert.raw.text()), PathBuf::from(key.raw.text())))),
        (Some(one), None) | (None, Some(one)) => {
            Err(one.invalid("HTTPS needs both ATELIER_TLS_CERT and ATELIER_TLS_KEY"))
        }
    }
}

/// The longest life a token may be issued or accepted with, in seconds.
fn token_ttl_max_s(s: &Sources<'_>) -> Result<i64, ConfigError> {
    let Some(found) = s.get("token_ttl_max", &["ATELIER_TOKEN_TTL_MAX"]) else {
        return Ok(atelier_http::auth::TOKEN_TTL_MAX_S_DEFAULT);
    };
    match parse_ttl(&found.raw.text()) {
        Ok(0) => Err(found.invalid("a token must be allowed to live at least 1s")),
        Ok(ttl) => Ok(ttl),
        Err(e) => Err(found.invalid(e)),
    }
}

/// Node ids: short, and plain enough for a metrics label and a log line.
const NODE_ID_BYTES_MAX: usize = 64;

/// The node's id, lease and heartbeat (`node_id`, `node_lease_ms`, `node_heartbeat_ms`).
/// The default id is the host name and a hash of the data dir's absolute path: stable across
/// restarts, and different for two servers on one machine.
fn node(s: &Sources<'_>, data_dir: &std::path::Path) -> Result<NodeConfig, ConfigError> {
    let ms = |key: &str, env: &str, default: u64| -> Result<(u64, Option<Found>), ConfigError> {
        match s.get(key, &[env]) {
            None => Ok((default, None)),
            Some(f) => Ok((number(&f, "is not a number of milliseconds")?, Some(f))),
        }
    };
    let (lease_ms, lease_found) = ms("node_lease_ms", "ATELIER_NODE_LEASE_MS", NODE_LEASE_MS_DEFAULT)?;
    if let Some(f) = &lease_found {
        if !(NODE_LEASE_MS_MIN..=NODE_LEASE_MS_MAX).contains(&lease_ms) {
            return Err(f.invalid(format!("must be from {NODE_LEASE_MS_MIN} to {NODE_LEASE_MS_MAX}")));
        }
    }
    let (heartbeat_ms, heartbeat_found) =
        ms("node_heartbeat_ms", "ATELIER_NODE_HEARTBEAT_MS", NODE_HEARTBEAT_MS_DEFAULT.min(lease_ms / 3))?;
    // Renewals at most a third of the lease apart: a node counts its lease lost one heartbeat
    // before it lapses, and a lost renewal must leave room for the next.
    if heartbeat_ms == 0 || heartbeat_ms.saturating_mul(3) > lease_ms {
        let what = format!("the heartbeat ({heartbeat_ms} ms) must be more than 0 and at most a third of the lease ({lease_ms} ms)");
        return Err(match heartbeat_found.or(lease_found) {
            Some(f) => f.invalid(what),
            None => ConfigError::invalid("node_heartbeat_ms", what),
        });
    }
    let id = match s.get("node_id", &["ATELIER_NODE_ID"]) {
        Some(f) => {
            let id = f.raw.text();
            let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_');
            if id.is_empty() || id.len() > NODE_ID_BYTES_MAX || !id.chars().all(plain) {
                return Err(f.invalid(format!(
                    "a node id is 1 to {NODE_ID_BYTES_MAX} letters, digits, '.', '-' or '_'"
                )));
            }
            id
        }
        None => default_node_id(data_dir),
    };
    Ok(NodeConfig { id, lease_ms, heartbeat_ms })
}

/// `<host>-<8 hex digits of the data dir's absolute path>`.
fn default_node_id(data_dir: &std::path::Path) -> String {
    use sha2::{Digest, Sha256};
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') { c } else { '_' })
        .take(NODE_ID_BYTES_MAX - 9)
        .collect();
    let abs = std::path::absolute(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    let hash = Sha256::digest(abs.as_os_str().as_encoded_bytes());
    let hex: String = hash.iter().take(4).map(|b| format!("{b:02x}")).collect();
    format!("{}-{hex}", if host.is_empty() { "node" } else { &host })
}

/// `ATELIER_DATABASE_URL` / `database_url`: a PostgreSQL URL, or none (the sled store).
fn database_url(s: &Sources<'_>) -> Result<Option<String>, ConfigError> {
    let Some(found) = s.get("database_url", &["ATELIER_DATABASE_URL"]) else { return Ok(None) };
    let url = found.raw.text();
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(found.invalid("is not a postgres:// or postgresql:// URL"));
    }
    Ok(Some(url))
}

/// The fair-share limits; each defaults to `atelier_http::shares`' constant, and a 0 turns a
/// limit off (but the priority range, where 0 allows only 0).
fn share_limits(s: &Sources<'_>) -> Result<ShareLimits, ConfigError> {
    let d = ShareLimits::default();
    let bounded = |key: &str, env: &str, default: u64, max: u64| -> Result<u64, ConfigError> {
        match s.get(key, &[env]) {
            None => Ok(default),
            Some(found) => {
                let n = number(&found, "is not a whole number")?;
                if n > max {
                    return Err(found.invalid(format!("{n} is more than {max}")));
                }
                Ok(n)
            }
        }
    };
    let max_i32 = u64::from(i32::MAX.unsigned_abs());
    let max_u32 = u64::from(u32::MAX);
    let to_u32 = |n: u64| u32::try_from(n).expect("invariant: bounded above");
    Ok(ShareLimits {
        priority_max: i32::try_from(bounded(
            "user_priority_max",
            "ATELIER_USER_PRIORITY_MAX",
            u64::from(d.priority_max.unsigned_abs()),
            max_i32,
        )?)
        .expect("invariant: bounded above"),
        active_max: bounded("user_active_max", "ATELIER_USER_ACTIVE_MAX", d.active_max, u64::MAX)?,
        streams_max: bounded("user_streams_max", "ATELIER_USER_STREAMS_MAX", d.streams_max, u64::MAX)?,
        rate_per_s: to_u32(bounded("user_rate", "ATELIER_USER_RATE", u64::from(d.rate_per_s), max_u32)?),
        burst: to_u32(bounded("user_burst", "ATELIER_USER_BURST", u64::from(d.burst), max_u32)?),
    })
}

/// A whole number, from the environment or the file (where `"500"` and `500` both do).
fn number(found: &Found<'_>, what: &str) -> Result<u64, ConfigError> {
    let text = found.raw.text();
    text.parse().map_err(|_| found.invalid(format!("'{text}' {what}")))
}

/// Seconds in a lifetime written like 90, 90s, 30m, 24h or 7d; the error says why not.
pub fn parse_ttl(s: &str) -> Result<i64, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = n.parse().map_err(|_| format!("'{s}' is not like 30m, 24h or 7d"))?;
    let mult = match unit {
        "s" | "" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("unknown unit in '{s}' (use s, m, h or d)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("'{s}' is too long"))
}

/// Which server the client commands talk to, and as whom.
pub struct ClientSettings {
    pub url: String,
    pub token: String,
}

/// Why the client commands cannot run.
#[derive(Debug)]
pub struct NoToken;

impl std::fmt::Display for NoToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "no token: pass --token or set ATELIER_TOKEN (see `atelier token`)")
    }
}

impl std::error::Error for NoToken {}

impl ClientSettings {
    /// The client commands read the environment only: a server's atelier.toml in the working
    /// dir is no business of theirs.
    pub fn load(
        sources: &Sources<'_>,
        url: Option<String>,
        token: Option<String>,
    ) -> Result<ClientSettings, NoToken> {
        Ok(ClientSettings {
            url: url.or_else(|| sources.env("ATELIER_URL")).unwrap_or_else(|| URL_DEFAULT.into()),
            token: token.or_else(|| sources.env("ATELIER_TOKEN")).ok_or(NoToken)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, env: &'static [(&'static str, &'static str)]) -> Result<ServerSettings, ConfigError> {
        let lookup = move |k: &str| env.iter().find(|(n, _)| *n == k).map(|(_, v)| (*v).to_string());
        let sources = Sources::from_text(Some(text), &lookup)?;
        ServerSettings::load(&sources, Overrides::default())
    }

    #[test]
    fn environment_over_file_over_default() {
        let s =
            load("listen = \"1.2.3.4:5\"\nheartbeat_ms = 500\n", &[("ATELIER_HEARTBEAT_MS", "700")]).unwrap();
        assert_eq!((s.listen.as_str(), s.heartbeat_ms), ("1.2.3.4:5", 700));
        assert_eq!(s.header_timeout_ms, atelier_http::HEADER_TIMEOUT_MS_DEFAULT);
        assert_eq!(s.max_connections_per_ip, atelier_http::CONNECTIONS_PER_IP_MAX_DEFAULT);
        let s = load("max_connections_per_ip = 3\n", &[("ATELIER_MAX_CONNECTIONS_PER_IP", "9")]).unwrap();
        assert_eq!(s.max_connections_per_ip, 9);
        assert_eq!(s.token_ttl_max_s, atelier_http::auth::TOKEN_TTL_MAX_S_DEFAULT);
        let s = load("token_ttl_max = \"7d\"\n", &[]).unwrap();
        assert_eq!(s.token_ttl_max_s, 7 * 86_400);
        let s = load("token_ttl_max = 60\n", &[("ATELIER_TOKEN_TTL_MAX", "2h")]).unwrap();
        assert_eq!(s.token_ttl_max_s, 7_200);
        assert_eq!(s.share_limits, ShareLimits::default());
        let s = load("user_rate = 5\nuser_streams_max = 0\n", &[("ATELIER_USER_PRIORITY_MAX", "3")]).unwrap();
        assert_eq!((s.share_limits.rate_per_s, s.share_limits.streams_max), (5, 0));
        assert_eq!(s.share_limits.priority_max, 3);
        let s = load("", &[("ATELIER_LISTEN", "")]).unwrap();
        assert_eq!(s.listen, LISTEN_DEFAULT, "an empty variable counts as unset");
    }

    #[test]
    fn the_database_url_chooses_postgres_and_nothing_set_keeps_sled() {
        assert_eq!(load("", &[]).unwrap().database_url, None);
        let s = load("database_url = \"postgres://a@h/db\"\n", &[]).unwrap();
        assert_eq!(s.database_url.as_deref(), Some("postgres://a@h/db"));
        let s =
            load("database_url = \"postgres://a@h/db\"\n", &[("ATELIER_DATABASE_URL", "postgresql://b@h/x")])
                .unwrap();
        assert_eq!(s.database_url.as_deref(), Some("postgresql://b@h/x"));
        let err = load("", &[("ATELIER_DATABASE_URL", "mysql://h/db")]).err().expect("bad value");
        assert_eq!(
            err.to_string(),
            "setting 'ATELIER_DATABASE_URL': is not a postgres:// or postgresql:// URL"
        );
    }

    #[test]
    fn errors_name_the_variable_or_the_key_and_line() {
        let err = load("", &[("ATELIER_DURABILITY", "often")]).err().expect("bad value");
        assert_eq!(err.to_string(), "setting 'ATELIER_DURABILITY': 'often' is not sync or periodic");
        let err = load("listen = \"x\"\nheartbeat_ms = \"soon\"\n", &[]).err().expect("bad value");
        assert_eq!(err.to_string(), "config file line 2: setting 'heartbeat_ms': 'soon' is not a number");
        let err = load("", &[("ATELIER_TOKEN_TTL_MAX", "1w")]).err().expect("bad value");
        assert_eq!(
            err.to_string(),
            "setting 'ATELIER_TOKEN_TTL_MAX': unknown unit in '1w' (use s, m, h or d)"
        );
        let err = load("", &[("ATELIER_USER_PRIORITY_MAX", "3000000000")]).err().expect("bad value");
        assert_eq!(
            err.to_string(),
            "setting 'ATELIER_USER_PRIORITY_MAX': 3000000000 is more than 2147483647"
        );
        let err = load("user_burst = -1\n", &[]).err().expect("bad value");
        assert_eq!(err.to_string(), "config file line 1: setting 'user_burst': '-1' is not a whole number");
        let err = load("max_conections = 5\n", &[]).err().expect("unknown key");
        assert!(err.to_string().starts_with("config file line 1: unknown setting 'max_conections' (known: "));
    }
}
