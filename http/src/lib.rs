//! The HTTP side: a JSON API, Server-Sent Events from log subscriptions, the web page.
//!
//! `conn` speaks HTTP/1.1 with a thread per connection; a small pool of handler threads runs
//! the routes. An SSE request keeps its connection's thread (thread per stream) and writes
//! each event straight to the socket.

mod assets;
pub mod auth;
pub mod client;
mod conn;
mod metrics;
pub mod render;
mod routes;
mod sse;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use atelier_storage::EventStore;
use serde_json::Value;

pub use auth::{Identity, Keys, Role};
pub use routes::{openapi, Route, ROUTES};

/// Request bodies above this are refused with 413.
pub const BODY_BYTES_MAX: usize = 1024 * 1024;
/// Default cap on open connections (streams included); more are answered 503 and closed.
pub const CONNECTIONS_MAX_DEFAULT: usize = 10_000;
/// Listen backlog: Rust's default of 128 stalls reconnect storms for seconds.
pub const LISTEN_BACKLOG: i32 = 8192;
/// Threads running the routes for requests the connection threads parsed.
pub const HANDLER_THREADS: usize = 8;
pub const HEARTBEAT_MS_DEFAULT: u64 = 15_000;
/// A connection whose request (headers and body) does not arrive in this time is closed; an
/// idle keep-alive connection too.
pub const HEADER_TIMEOUT_MS_DEFAULT: u64 = 10_000;
/// A write that cannot proceed for this long (a client that stopped reading) fails, which
/// ends that stream only; the client can resume from its last event id.
pub const SEND_TIMEOUT_MS: u64 = 10_000;
/// File descriptors kept free of connections for the store, the workers and their pipes.
pub const RESERVED_FDS: u64 = 512;

/// What the HTTP side needs from the executors, without depending on them.
pub trait Executors: Send + Sync {
    fn is_running(&self) -> bool;
    fn metrics_text(&self) -> String;
    fn job_log_paths(&self, job_id: u64) -> (PathBuf, PathBuf);
    /// Where the content-addressed artifacts are stored.
    fn artifacts_dir(&self) -> PathBuf;
    /// How long a finished job's dir (and its logs) is kept, in ms; `None`: for good.
    fn job_dirs_keep_ms(&self) -> Option<u64>;
    fn pipeline_exists(&self, name: &str) -> bool;
}

#[derive(Clone, Debug)]
pub struct HttpConfig {
    pub listen: String,
    pub data_dir: PathBuf,
    pub connections_max: usize,
    pub heartbeat_ms: u64,
    pub metrics_public: bool,
    pub default_pipeline: String,
    pub header_timeout_ms: u64,
}

impl HttpConfig {
    pub fn new(listen: impl Into<String>, data_dir: impl Into<PathBuf>) -> HttpConfig {
        HttpConfig {
            listen: listen.into(),
            data_dir: data_dir.into(),
            connections_max: CONNECTIONS_MAX_DEFAULT,
            heartbeat_ms: HEARTBEAT_MS_DEFAULT,
            metrics_public: false,
            default_pipeline: "commission".into(),
            header_timeout_ms: HEADER_TIMEOUT_MS_DEFAULT,
        }
    }
}

#[derive(Debug)]
pub enum HttpError {
    Bind { addr: String, source: std::io::Error },
    BadAddress(String),
    Start(String),
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpError::Bind { addr, source } => write!(f, "cannot listen on {addr}: {source}"),
            HttpError::BadAddress(a) => {
                write!(f, "'{a}' is not an address to listen on (e.g. 127.0.0.1:8080)")
            }
            HttpError::Start(e) => write!(f, "cannot start the HTTP server: {e}"),
        }
    }
}

impl std::error::Error for HttpError {}

pub(crate) struct Shared {
    pub(crate) store: Arc<dyn EventStore>,
    pub(crate) keys: Keys,
    pub(crate) config: HttpConfig,
    pub(crate) executors: Option<Arc<dyn Executors>>,
    pub(crate) metrics: metrics::Metrics,
    pub(crate) shutting_down: AtomicBool,
    pub(crate) streams: AtomicU64,
    /// Open connections, counted by the accept loop against `connections_max`.
    pub(crate) connections: AtomicU64,
    /// Accept errors the accept loop recovered from (out of descriptors, say).
    pub(crate) accept_errors: AtomicU64,
    /// The handler pool's queue.
    pub(crate) jobs: crossbeam_channel::Sender<conn::Job>,
}

pub struct Server {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    addr: SocketAddr,
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Server {
    pub fn start(
        config: HttpConfig,
        store: Arc<dyn EventStore>,
        keys: Keys,
        executors: Option<Arc<dyn Executors>>,
    ) -> Result<Server, HttpError> {
        let addr: SocketAddr =
            config.listen.parse().map_err(|_| HttpError::BadAddress(config.listen.clone()))?;
        let mut config = config;
        config.connections_max = fit_connections_to_fd_limit(config.connections_max);
        let listener =
            listen(addr).map_err(|source| HttpError::Bind { addr: config.listen.clone(), source })?;
        let addr = listener.local_addr().map_err(|e| HttpError::Start(e.to_string()))?;
        let (jobs_tx, jobs_rx) = crossbeam_channel::unbounded::<conn::Job>();
        let shared = Arc::new(Shared {
            store,
            keys,
            config,
            executors,
            metrics: metrics::Metrics::default(),
            shutting_down: AtomicBool::new(false),
            streams: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            accept_errors: AtomicU64::new(0),
            jobs: jobs_tx,
        });
        let threads = (0..HANDLER_THREADS)
            .map(|i| {
                let (jobs, shared) = (jobs_rx.clone(), shared.clone());
                std::thread::Builder::new()
                    .name(format!("atelier-http-{i}"))
                    .spawn(move || conn::handler_loop(&jobs, &shared))
                    .map_err(|e| HttpError::Start(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Not joined at shutdown: if the wake-up connect cannot get through, a stop must not
        // hang on a thread blocked in accept(); it ends with the process.
        {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("atelier-accept".into())
                .spawn(move || conn::accept_loop(listener, shared))
                .map_err(|e| HttpError::Start(e.to_string()))?;
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

/// What a handler answers.
pub(crate) enum Reply {
    Json(u16, Value),
    Bytes(u16, &'static str, Vec<u8>, Vec<(&'static str, String)>),
    Empty(u16),
    /// A stream, subscribed and with its first history read: the connection's thread runs it.
    /// Boxed: a subscription is large, and replies travel by value (and as `Err` in routes).
    Stream(Box<sse::Opened>),
}

pub(crate) fn error(status: u16, code: &str, message: impl AsRef<str>) -> Reply {
    Reply::Json(status, render::error(code, message.as_ref()))
}

/// A parsed request as handlers see it.
pub(crate) struct Req {
    pub method: String,
    pub path: String,
    pub query: Vec<(String, String)>,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Req {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn query(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    pub fn cookie(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("cookie"))
            .flat_map(|(_, v)| v.split(';'))
            .filter_map(|c| c.trim().split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }
}

pub(crate) fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Runs one request on a handler thread: the body's media type, routing, the handler (a
/// panic is a 500 and the server keeps running), metrics.
pub(crate) fn handle(req: &Req, started: Instant, shared: &Arc<Shared>) -> Reply {
    let (route, reply) = match check_media_type(req) {
        Err(reply) => ("body", reply),
        Ok(()) => {
            let outcome =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| routes::dispatch(req, shared)));
            match outcome {
                Ok(r) => r,
                Err(_) => {
                    tracing::error!(path = %req.path, "a handler panicked");
                    (
                        "panic",
                        error(
                            500,
                            "internal",
                            "the server hit a bug handling this request; it keeps running",
                        ),
                    )
                }
            }
        }
    };
    let status = match &reply {
        Reply::Json(s, _) | Reply::Bytes(s, ..) | Reply::Empty(s) => *s,
        Reply::Stream(_) => 200,
    };
    shared.metrics.request(route, status, started.elapsed().as_secs_f64());
    reply
}

/// A body must be JSON (its size was checked while reading it).
fn check_media_type(req: &Req) -> Result<(), Reply> {
    if !req.body.is_empty() {
        let ctype = req.header("content-type").unwrap_or("");
        let mime = ctype.split(';').next().unwrap_or("").trim();
        if !mime.eq_ignore_ascii_case("application/json") {
            return Err(error(
                415,
                "unsupported_media_type",
                format!("send JSON with Content-Type: application/json (got '{ctype}')"),
            ));
        }
    }
    Ok(())
}

/// The request fuzz target's body (also run over the stored corpus by `cargo test`): an
/// arbitrary method, path, query, headers and body go through parsing, routing and the
/// handlers' input checks without a panic. Input: lines `METHOD PATH`, then headers, a blank
/// line, then the body.
#[doc(hidden)]
pub fn fuzz_request(data: &[u8]) {
    for req in conn::fuzz_parse(data) {
        check_request(&req);
    }
    fuzz_request_lines(data);
}

/// Input as lines `METHOD PATH`, headers, a blank line, then the body — the shape of the
/// seeds, reaching the handlers' checks even where the bytes are not a valid HTTP head.
fn fuzz_request_lines(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (head, body) = text.split_once("\n\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let first = lines.next().unwrap_or("");
    let (method, url) = first.split_once(' ').unwrap_or((first, "/"));
    let (path, query) = url.split_once('?').unwrap_or((url, ""));
    let req = Req {
        method: method.to_ascii_uppercase(),
        path: path.to_string(),
        query: query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (percent_decode(k), percent_decode(v)))
            .collect(),
        headers: lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect(),
        body: body.as_bytes().to_vec(),
    };
    check_request(&req);
}

fn check_request(req: &Req) {
    let _ = routes::find(&req.method, &req.path);
    let _ = req.cookie("atelier_token");
    let keys = Keys::new(b"fuzz");
    if let Some(t) = req.header("authorization") {
        let _ = keys.verify(t.trim_start_matches("Bearer "), 0);
    }
    routes::fuzz_inputs(req);
}
