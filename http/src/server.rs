//! Starting and stopping a server: the listener, tiny_http over it (accept loop and
//! connection threads, TLS), the handler pool's threads, the descriptor budget that caps
//! connections, and the error a start can end in.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use atelier_storage::EventStore;

use crate::auth::Keys;
use crate::config::{HttpConfig, TlsFiles};
use crate::conn;
use crate::executors::Executors;
use crate::metrics::Metrics;
use crate::pool::{self, Job, HANDLER_THREADS};
use crate::slot::Slots;
use crate::state::Shared;

/// Listen backlog: Rust's default of 128 stalls reconnect storms for seconds.
pub const LISTEN_BACKLOG: i32 = 8192;
/// File descriptors kept free of connections for the store, the workers and their pipes.
pub const RESERVED_FDS: u64 = 512;

#[derive(Debug)]
pub enum HttpError {
    Bind {
        addr: String,
        source: std::io::Error,
    },
    BadAddress {
        addr: String,
        source: std::net::AddrParseError,
    },
    /// The listener's address or a server thread could not be had.
    Start(std::io::Error),
    /// A TLS certificate or key file could not be read.
    TlsFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// The TLS certificate or key was refused (not PEM, no key, a key that does not fit).
    Tls(Box<dyn std::error::Error + Send + Sync>),
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpError::Bind { addr, source } => write!(f, "cannot listen on {addr}: {source}"),
            HttpError::BadAddress { addr, .. } => {
                write!(f, "'{addr}' is not an address to listen on (e.g. 127.0.0.1:8080)")
            }
            HttpError::Start(e) => write!(f, "cannot start the HTTP server: {e}"),
            HttpError::TlsFile { path, .. } => write!(f, "cannot read the TLS file {}", path.display()),
            HttpError::Tls(e) => write!(f, "the TLS certificate or key cannot be used: {e}"),
        }
    }
}

impl std::error::Error for HttpError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            HttpError::Bind { source, .. } | HttpError::Start(source) => Some(source),
            HttpError::BadAddress { source, .. } => Some(source),
            HttpError::TlsFile { source, .. } => Some(source),
            HttpError::Tls(e) => Some(&**e),
        }
    }
}

pub struct Server {
    /// Dropped at shutdown: that stops its accept loop.
    front: Option<tiny_http::Server>,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    addr: SocketAddr,
}

impl Server {
    pub fn start(
        config: HttpConfig,
        store: Arc<dyn EventStore>,
        keys: Keys,
        executors: Option<Arc<dyn Executors>>,
    ) -> Result<Server, HttpError> {
        let addr: SocketAddr = config
            .listen
            .parse()
            .map_err(|source| HttpError::BadAddress { addr: config.listen.clone(), source })?;
        let mut config = config;
        config.connections_max = fit_connections_to_fd_limit(config.connections_max);
        let tls = config.tls.as_ref().map(read_tls_files).transpose()?;
        let listener =
            listen(addr).map_err(|source| HttpError::Bind { addr: config.listen.clone(), source })?;
        let addr = listener.local_addr().map_err(HttpError::Start)?;
        let (jobs_tx, jobs_rx) = crossbeam_channel::unbounded::<Job>();
        let metrics = Metrics::default();
        metrics.set_build(&config.build);
        let slots = Arc::new(Slots::new(config.connections_max, config.connections_per_ip_max));
        let shared = Arc::new(Shared {
            store,
            keys,
            config,
            executors,
            metrics,
            shutting_down: AtomicBool::new(false),
            streams: AtomicU64::new(0),
            slots,
            accept_errors: AtomicU64::new(0),
            jobs: jobs_tx,
        });
        let threads = (0..HANDLER_THREADS)
            .map(|i| {
                let (jobs, shared) = (jobs_rx.clone(), shared.clone());
                std::thread::Builder::new()
                    .name(format!("atelier-http-{i}"))
                    .spawn(move || pool::handler_loop(&jobs, &shared.shutting_down))
                    .map_err(HttpError::Start)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let errors = shared.clone();
        let options = tiny_http::Options {
            admit: Some(conn::admit(shared.clone())),
            handler: Some(conn::handler(shared.clone())),
            on_accept_error: Some(Box::new(move |e| {
                errors.accept_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "accepting a connection failed; accepting again shortly");
            })),
            head_timeout: Some(Duration::from_millis(shared.config.header_timeout_ms.max(1))),
            body_timeout: Some(Duration::from_millis(shared.config.body_timeout_ms.max(1))),
            head_bytes_max: conn::HEAD_BYTES_MAX,
            body_bytes_max: conn::BODY_BYTES_MAX,
            refusal_body: Some(conn::refusal_body),
        };
        // Its accept thread is not joined at shutdown: if the wake-up connect cannot get
        // through, a stop must not hang on a thread blocked in accept(); it ends with the
        // process.
        let front = tiny_http::Server::from_listener_with(listener, tls, options).map_err(HttpError::Tls)?;
        Ok(Server { front: Some(front), shared, threads, addr })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, ends open streams (they see the flag within `sse::SHUTDOWN_POLL`, 2 s) and joins the
    /// handler threads. Appends already handed to the store finish there.
    pub fn shutdown(mut self) {
        self.shared.shutting_down.store(true, Ordering::SeqCst);
        // Stops the accept loop (it wakes it out of accept() with a connection of its own).
        drop(self.front.take());
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while self.shared.streams.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The certificate chain and key, as tiny_http takes them.
fn read_tls_files(files: &TlsFiles) -> Result<tiny_http::SslConfig, HttpError> {
    let read = |path: &std::path::PathBuf| {
        std::fs::read(path).map_err(|source| HttpError::TlsFile { path: path.clone(), source })
    };
    Ok(tiny_http::SslConfig { certificate: read(&files.cert)?, private_key: read(&files.key)? })
}

/// Raises the soft descriptor limit to the hard one, and keeps the stream cap below what it
/// allows, so that connections alone can never exhaust descriptors.
fn fit_connections_to_fd_limit(wanted: usize) -> usize {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit write and read a plain struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return wanted;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    let budget = usize::try_from(lim.rlim_cur.saturating_sub(RESERVED_FDS)).unwrap_or(usize::MAX);
    if budget < wanted {
        tracing::warn!(wanted, allowed = budget, "the descriptor limit caps concurrent connections lower");
    }
    wanted.min(budget.max(1))
}

/// A listener with a large backlog and TCP_NODELAY. Accepted sockets get their read deadline
/// and send timeout in `conn`.
fn listen(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}
