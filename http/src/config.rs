//! The server's settings, and the defaults a caller that sets nothing gets: the binary fills
//! an [`HttpConfig`] from its own configuration and hands it to `Server::start`.

use std::path::PathBuf;
use std::sync::Arc;

use crate::client_addr::TrustedProxies;
use crate::shares::{ShareLimits, Shares};

/// Default cap on open connections (streams included); more are answered 503 and closed.
pub const CONNECTIONS_MAX_DEFAULT: usize = 10_000;
/// Default cap on open connections from one client address. A browser opens at most six
/// connections to a host and a dashboard a few streams, so 256 serves dozens of users behind
/// one NAT or proxy, while one address can hold at most a fortieth of the default total: a
/// single misbehaving host cannot take every slot. Loopback gets no exemption (a local
/// process can misbehave too); a server behind a local reverse proxy should raise it.
pub const CONNECTIONS_PER_IP_MAX_DEFAULT: usize = 256;
pub const HEARTBEAT_MS_DEFAULT: u64 = 15_000;
/// A connection whose request head does not arrive in this time is answered 408 and closed;
/// an idle keep-alive connection too (the time counts from the end of the previous answer).
pub const HEADER_TIMEOUT_MS_DEFAULT: u64 = 10_000;
/// A request body that does not arrive whole in this time (from the end of its head) is
/// answered 408 and its connection closed: the largest body (1 MiB) at 35 KB/s.
pub const BODY_TIMEOUT_MS_DEFAULT: u64 = 30_000;

/// The certificate chain and private key (PEM files) of a server that speaks HTTPS.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The build a server runs, as `/metrics` names it (`atelier_build_info{version,revision} 1`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildInfo {
    pub version: String,
    /// The source revision (a git commit), or "unknown".
    pub revision: String,
}

impl Default for BuildInfo {
    /// This crate's version (the workspace's); the binary knows the revision and sets it.
    fn default() -> BuildInfo {
        BuildInfo { version: env!("CARGO_PKG_VERSION").to_string(), revision: "unknown".to_string() }
    }
}

/// How clients reach the server: over HTTPS the sign-in cookie is `Secure`, and a page's
/// `Origin` names `https`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

#[derive(Clone, Debug)]
pub struct HttpConfig {
    pub listen: String,
    pub data_dir: PathBuf,
    pub connections_max: usize,
    pub connections_per_ip_max: usize,
    pub heartbeat_ms: u64,
    pub metrics_public: bool,
    pub default_pipeline: String,
    pub header_timeout_ms: u64,
    pub body_timeout_ms: u64,
    /// HTTPS instead of HTTP on the listen address.
    pub tls: Option<TlsFiles>,
    /// Peers whose `X-Forwarded-For` names the client (a reverse proxy in front): a
    /// connection from one counts against each request's client's cap, not the proxy's.
    pub trusted_proxies: TrustedProxies,
    pub build: BuildInfo,
    /// The fair-share limits and each user's holdings of them. It travels with the settings
    /// into the server's shared state; set through [`HttpConfig::with_share_limits`].
    pub(crate) shares: Arc<Shares>,
}

impl HttpConfig {
    pub fn new(listen: impl Into<String>, data_dir: impl Into<PathBuf>) -> HttpConfig {
        HttpConfig {
            listen: listen.into(),
            data_dir: data_dir.into(),
            connections_max: CONNECTIONS_MAX_DEFAULT,
            connections_per_ip_max: CONNECTIONS_PER_IP_MAX_DEFAULT,
            heartbeat_ms: HEARTBEAT_MS_DEFAULT,
            metrics_public: false,
            default_pipeline: "commission".into(),
            header_timeout_ms: HEADER_TIMEOUT_MS_DEFAULT,
            body_timeout_ms: BODY_TIMEOUT_MS_DEFAULT,
            tls: None,
            trusted_proxies: TrustedProxies::default(),
            build: BuildInfo::default(),
            shares: Arc::new(Shares::new(ShareLimits::default())),
        }
    }

    /// How clients reach this server: HTTPS when it serves TLS.
    pub fn scheme(&self) -> Scheme {
        match self.tls {
            Some(_) => Scheme::Https,
            None => Scheme::Http,
        }
    }

    /// These settings with `limits` on what one user may take.
    pub fn with_share_limits(self, limits: ShareLimits) -> HttpConfig {
        HttpConfig { shares: Arc::new(Shares::new(limits)), ..self }
    }

    pub fn share_limits(&self) -> ShareLimits {
        self.shares.limits()
    }
}
