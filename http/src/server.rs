//! Starting and stopping a server: the listener, the handler pool's threads and the accept
//! loop, the descriptor budget that caps connections, and the error a start can end in.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use atelier_storage::EventStore;

use crate::auth::Keys;
use crate::config::HttpConfig;
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
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpError::Bind { addr, source } => write!(f, "cannot listen on {addr}: {source}"),
            HttpError::BadAddress { addr, .. } => {
                write!(f, "'{addr}' is not an address to listen on (e.g. 127.0.0.1:8080)")
            }
            HttpError::Start(e) => write!(f, "cannot start the HTTP server: {e}"),
        }
    }
}

impl std::error::Error for HttpError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            HttpError::Bind { source, .. } | HttpError::Start(source) => Some(source),
            HttpError::BadAddress { source, .. } => Some(source),
        }
    }
}

pub struct Server {
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
        let listener =
            listen(addr).map_err(|source| HttpError::Bind { addr: config.listen.clone(), source })?;
        let addr = listener.local_addr().map_err(HttpError::Start)?;
        let (jobs_tx, jobs_rx) = crossbeam_channel::unbounded::<Job>();
        let slots = Arc::new(Slots::new(config.connections_max, config.connections_per_ip_max));
        let shared = Arc::new(Shared {
            store,
            keys,
            config,
            executors,
            metrics: Metrics::default(),
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
        // Not joined at shutdown: if the wake-up connect cannot get through, a stop must not
        // hang on a thread blocked in accept(); it ends with the process.
        {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("atelier-accept".into())
                .spawn(move || conn::accept_loop(listener, shared))
                .map_err(HttpError::Start)?;
        }
        Ok(Server { shared, threads, addr })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, ends open streams (they see the flag within `sse::SHUTDOWN_POLL`, 2 s) and joins the
    /// handler threads. Appends already handed to the store finish there.
    pub fn shutdown(mut self) {
        self.shared.shutting_down.store(true, Ordering::SeqCst);
        // Wake the accept loop out of accept().
        let _ = std::net::TcpStream::connect_timeout(&conn::wake_address(self.addr), Duration::from_secs(1));
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while self.shared.streams.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
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
