//! The HTTP side: a JSON API, Server-Sent Events from log subscriptions, the web page.
//!
//! tiny_http parses requests on its own connection threads; a small pool of handler threads
//! takes them from `recv()`. An SSE request moves to a thread of its own (thread per stream)
//! and writes through the request's raw writer, flushing after every event: a tiny_http
//! `Response` body would buffer ~8 KiB before sending anything.

pub mod auth;
pub mod client;
mod metrics;
pub mod render;
mod assets;
mod routes;
mod sse;

use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use atelier_storage::EventStore;
use serde_json::Value;

pub use auth::{Identity, Keys, Role};
pub use routes::{openapi, Route, ROUTES};

/// Request bodies above this are refused with 413.
pub const BODY_BYTES_MAX: usize = 1024 * 1024;
/// Default cap on concurrent SSE streams; more are answered 503.
pub const CONNECTIONS_MAX_DEFAULT: usize = 10_000;
/// Listen backlog: Rust's default of 128 stalls reconnect storms for seconds.
pub const LISTEN_BACKLOG: i32 = 8192;
/// Threads taking parsed requests from tiny_http.
pub const HANDLER_THREADS: usize = 8;
pub const HEARTBEAT_MS_DEFAULT: u64 = 15_000;
/// A connection whose request headers do not arrive in this time is closed; an idle
/// keep-alive connection too. Set on the listener, inherited by accepted sockets.
pub const HEADER_TIMEOUT_MS_DEFAULT: u64 = 10_000;
/// A write that cannot proceed for this long (a client that stopped reading) fails, which
/// ends that stream only; the client can resume from its last event id.
pub const SEND_TIMEOUT_MS: u64 = 10_000;
/// File descriptors kept free of streams for the store, workers and short requests.
pub const RESERVED_FDS: u64 = 512;

/// What the HTTP side needs from the executors, without depending on them.
pub trait Executors: Send + Sync {
    fn is_running(&self) -> bool;
    fn metrics_text(&self) -> String;
    fn job_log_paths(&self, job_id: u64) -> (PathBuf, PathBuf);
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
            HttpError::BadAddress(a) => write!(f, "'{a}' is not an address to listen on (e.g. 127.0.0.1:8080)"),
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
    pub(crate) accept_restarts: Arc<AtomicU64>,
    /// Connections' last request, by peer address, for the janitor.
    pub(crate) peers: Mutex<HashMap<SocketAddr, PeerState>>,
}

/// The tiny_http servers on our listener. tiny_http's accept thread stops for good on an
/// accept error (EMFILE, say); the handler threads then start a new server on a clone of the
/// listener and keep draining the old one's queue, so running out of descriptors never stops
/// the server silently.
struct Acceptors {
    listener: std::net::TcpListener,
    current: RwLock<Arc<tiny_http::Server>>,
    retired: Mutex<Vec<Arc<tiny_http::Server>>>,
    accept_dead: AtomicBool,
    restarts: Arc<AtomicU64>,
}

impl Acceptors {
    fn current(&self) -> Arc<tiny_http::Server> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn retired(&self) -> Vec<Arc<tiny_http::Server>> {
        self.retired.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces a server whose accept thread died. Retried on the next loop if the clone
    /// itself fails (no descriptor free yet).
    fn replace(&self) {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        if !self.accept_dead.load(Ordering::SeqCst) {
            return; // another handler thread replaced it already
        }
        let fresh = self
            .listener
            .try_clone()
            .map_err(|e| e.to_string())
            .and_then(|l| tiny_http::Server::from_listener(l, None).map_err(|e| e.to_string()));
        match fresh {
            Ok(server) => {
                let old = std::mem::replace(&mut *current, Arc::new(server));
                self.retired.lock().unwrap_or_else(|p| p.into_inner()).push(old);
                self.accept_dead.store(false, Ordering::SeqCst);
                self.restarts.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("restarted the accept loop after an accept error");
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot restart the accept loop yet; retrying");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

pub struct Server {
    acceptors: Arc<Acceptors>,
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
        let addr: SocketAddr = config.listen.parse().map_err(|_| HttpError::BadAddress(config.listen.clone()))?;
        let mut config = config;
        config.connections_max = fit_connections_to_fd_limit(config.connections_max);
        let listener = listen(addr, Duration::from_millis(config.header_timeout_ms.max(1)))
            .map_err(|source| HttpError::Bind { addr: config.listen.clone(), source })?;
        let addr = listener.local_addr().map_err(|e| HttpError::Start(e.to_string()))?;
        let ours = listener.try_clone().map_err(|e| HttpError::Start(e.to_string()))?;
        let http = tiny_http::Server::from_listener(listener, None).map_err(|e| HttpError::Start(e.to_string()))?;
        let acceptors = Arc::new(Acceptors {
            listener: ours,
            current: RwLock::new(Arc::new(http)),
            retired: Mutex::new(Vec::new()),
            accept_dead: AtomicBool::new(false),
            restarts: Arc::new(AtomicU64::new(0)),
        });
        let shared = Arc::new(Shared {
            store,
            keys,
            config,
            executors,
            metrics: metrics::Metrics::default(),
            shutting_down: AtomicBool::new(false),
            streams: AtomicU64::new(0),
            accept_restarts: acceptors.restarts.clone(),
            peers: Mutex::new(HashMap::new()),
        });
        watch_for_accept_panics(&acceptors);
        {
            use std::os::fd::AsRawFd;
            let fd = acceptors.listener.as_raw_fd();
            let shared = shared.clone();
            let timeout = Duration::from_millis(shared.config.header_timeout_ms.max(1));
            std::thread::Builder::new()
                .name("atelier-http-janitor".into())
                .spawn(move || socket_janitor(fd, addr.port(), timeout, shared))
                .map_err(|e| HttpError::Start(e.to_string()))?;
        }
        let threads = (0..HANDLER_THREADS)
            .map(|i| {
                let acceptors = acceptors.clone();
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("atelier-http-{i}"))
                    .spawn(move || handler_loop(&acceptors, &shared))
                    .map_err(|e| HttpError::Start(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Server { acceptors, shared, threads, addr })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, ends open streams (they see the flag within a second) and joins the
    /// handler threads. Appends already handed to the store finish there.
    pub fn shutdown(mut self) {
        self.shared.shutting_down.store(true, Ordering::SeqCst);
        for _ in 0..self.threads.len() {
            self.acceptors.current().unblock();
        }
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
/// allows, so that streams alone can never exhaust descriptors.
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
        tracing::warn!(wanted, allowed = budget, "the descriptor limit caps concurrent streams lower");
    }
    wanted.min(budget.max(1))
}

/// A listener with a large backlog, TCP_NODELAY and a send timeout — socket options Linux
/// copies to every accepted socket, so tiny_http's connections get them.
fn listen(addr: SocketAddr, header_timeout: Duration) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nodelay(true)?;
    // Not SO_RCVTIMEO: accept() honours it and tiny_http's accept thread would stop on the
    // first idle timeout. The read timeout is put on accepted sockets by `socket_janitor`.
    let _ = header_timeout;
    socket.set_write_timeout(Some(Duration::from_millis(SEND_TIMEOUT_MS)))?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// How often the janitor looks at connections.
const JANITOR_INTERVAL: Duration = Duration::from_millis(500);

/// What the janitor knows of a connection from the handlers.
#[derive(Clone, Copy)]
pub(crate) struct PeerState {
    pub last_request: Instant,
    /// A stream owns the connection; it ends by itself (write errors, send timeout).
    pub streaming: bool,
}

/// Closes connections that sit without a request for the header timeout: one whose headers
/// never finish, or an idle keep-alive one. tiny_http gives no hook at accept time and its
/// threads are already blocked in read() (a later SO_RCVTIMEO would not apply), so the
/// janitor finds our sockets in /proc/self/fd and shuts the stale ones down, which ends the
/// blocked read with EOF.
fn socket_janitor(listener_fd: i32, port: u16, timeout: Duration, shared: Arc<Shared>) {
    let inode_of = |fd: i32| -> Option<u64> {
        std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
    };
    // Every clone of the listening socket shares its inode; never touch it.
    let listener_inode = inode_of(listener_fd);
    // Per socket inode: when first seen, and its peer if it is one of our connections.
    let mut known: HashMap<u64, (Instant, Option<SocketAddr>)> = HashMap::new();
    while !shared.shutting_down.load(Ordering::SeqCst) {
        std::thread::sleep(JANITOR_INTERVAL);
        let Ok(dir) = std::fs::read_dir("/proc/self/fd") else { continue };
        let now = Instant::now();
        let mut live_inodes = std::collections::HashSet::with_capacity(known.len());
        let mut live_peers = std::collections::HashSet::with_capacity(known.len());
        for entry in dir.flatten() {
            let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
            let Some(inode) = inode_of(fd) else { continue };
            if Some(inode) == listener_inode {
                continue;
            }
            live_inodes.insert(inode);
            let (seen, peer) = *known.entry(inode).or_insert_with(|| {
                let ours = socket_addrs(fd).filter(|(local, _)| local.port() == port).map(|(_, peer)| peer);
                (now, ours)
            });
            let Some(peer) = peer else { continue };
            live_peers.insert(peer);
            let state = shared.peers.lock().ok().and_then(|p| p.get(&peer).copied());
            let last_activity = state.map_or(seen, |s| s.last_request.max(seen));
            let streaming = state.is_some_and(|s| s.streaming);
            if !streaming && now.duration_since(last_activity) > timeout && inode_of(fd) == Some(inode) {
                // SAFETY: shutdown on an fd we just checked is this socket; it only ends I/O.
                unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
            }
        }
        known.retain(|i, _| live_inodes.contains(i));
        if let Ok(mut peers) = shared.peers.lock() {
            peers.retain(|p, _| live_peers.contains(p));
        }
    }
}

/// The local and peer addresses of a TCP socket fd.
fn socket_addrs(fd: i32) -> Option<(SocketAddr, SocketAddr)> {
    use socket2::SockAddr;
    // SAFETY: getsockname/getpeername fill storage we own, up to the length we pass.
    let get = |peer: bool| unsafe {
        SockAddr::try_init(|storage, len| {
            let rc = if peer { libc::getpeername(fd, storage.cast(), len) } else { libc::getsockname(fd, storage.cast(), len) };
            if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
        })
        .ok()
        .and_then(|(_, a)| a.as_socket())
    };
    Some((get(false)?, get(true)?))
}

/// tiny_http's accept thread unwraps a `try_clone` of each accepted socket, so running out of
/// descriptors panics it instead of reporting an error. This hook notices that panic.
fn watch_for_accept_panics(acceptors: &Arc<Acceptors>) {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    static DEAD: std::sync::OnceLock<std::sync::Weak<Acceptors>> = std::sync::OnceLock::new();
    let _ = DEAD.set(Arc::downgrade(acceptors));
    INSTALLED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_tiny_http = info.location().is_some_and(|l| l.file().contains("tiny_http"));
            if in_tiny_http {
                if let Some(a) = DEAD.get().and_then(std::sync::Weak::upgrade) {
                    a.accept_dead.store(true, Ordering::SeqCst);
                }
            }
            previous(info);
        }));
    });
}

fn handler_loop(acceptors: &Acceptors, shared: &Arc<Shared>) {
    'serve: while !shared.shutting_down.load(Ordering::SeqCst) {
        if acceptors.accept_dead.load(Ordering::SeqCst) {
            acceptors.replace();
        }
        // Connections of a replaced server still deliver their requests there.
        let retired = acceptors.retired();
        for old in &retired {
            if let Ok(Some(req)) = old.try_recv() {
                handle(req, shared);
                continue 'serve;
            }
        }
        let wait = if retired.is_empty() { Duration::from_millis(500) } else { Duration::from_millis(20) };
        match acceptors.current().recv_timeout(wait) {
            Ok(Some(req)) => handle(req, shared),
            Ok(None) => {}
            Err(e) => {
                // tiny_http reports an accept error once and its accept thread is gone.
                tracing::error!(error = %e, "accepting connections failed");
                acceptors.accept_dead.store(true, Ordering::SeqCst);
            }
        }
    }
}

/// What a handler answers.
pub(crate) enum Reply {
    Json(u16, Value),
    Bytes(u16, &'static str, Vec<u8>, Vec<(&'static str, String)>),
    Empty(u16),
    /// Hand the request to a stream thread.
    Stream(sse::StreamSpec),
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

fn handle(mut request: tiny_http::Request, shared: &Arc<Shared>) {
    let started = Instant::now();
    let peer = request.remote_addr().copied();
    if let (Some(peer), Ok(mut peers)) = (peer, shared.peers.lock()) {
        let streaming = peers.get(&peer).is_some_and(|p| p.streaming);
        peers.insert(peer, PeerState { last_request: started, streaming });
    }
    let url = request.url().to_string();
    let (path, query) = url.split_once('?').unwrap_or((&url, ""));
    let query = query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    let headers: Vec<(String, String)> =
        request.headers().iter().map(|h| (h.field.as_str().as_str().to_string(), h.value.as_str().to_string())).collect();
    let mut req = Req { method: request.method().as_str().to_ascii_uppercase(), path: path.to_string(), query, headers, body: Vec::new() };

    let (route, reply) = match read_body(&mut request, &req) {
        Err(reply) => ("body", reply),
        Ok(body) => {
            req.body = body;
            let shared2 = shared.clone();
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| routes::dispatch(&req, &shared2)));
            match outcome {
                Ok(r) => r,
                Err(_) => {
                    tracing::error!(path = %req.path, "a handler panicked");
                    ("panic", error(500, "internal", "the server hit a bug handling this request; it keeps running"))
                }
            }
        }
    };
    let status = match &reply {
        Reply::Json(s, _) | Reply::Bytes(s, ..) | Reply::Empty(s) => *s,
        Reply::Stream(_) => 200,
    };
    shared.metrics.request(route, status, started.elapsed().as_secs_f64());
    match reply {
        Reply::Stream(spec) => {
            if let (Some(peer), Ok(mut peers)) = (peer, shared.peers.lock()) {
                peers.insert(peer, PeerState { last_request: started, streaming: true });
            }
            sse::spawn(request, spec, shared.clone())
        }
        Reply::Json(status, body) => {
            let body = serde_json::to_vec(&body).expect("invariant: JSON values serialize");
            respond(request, status, "application/json", body, Vec::new());
        }
        Reply::Bytes(status, ctype, body, extra) => respond(request, status, ctype, body, extra),
        Reply::Empty(status) => respond(request, status, "text/plain", Vec::new(), Vec::new()),
    }
}

fn read_body(request: &mut tiny_http::Request, req: &Req) -> Result<Vec<u8>, Reply> {
    if let Some(len) = request.body_length() {
        if len > BODY_BYTES_MAX {
            return Err(error(413, "body_too_large", format!("the body is over {BODY_BYTES_MAX} bytes")));
        }
    }
    let mut body = Vec::new();
    request
        .as_reader()
        .take(BODY_BYTES_MAX as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| error(400, "bad_body", format!("could not read the body: {e}")))?;
    if body.len() > BODY_BYTES_MAX {
        return Err(error(413, "body_too_large", format!("the body is over {BODY_BYTES_MAX} bytes")));
    }
    if !body.is_empty() {
        let ctype = req.header("content-type").unwrap_or("");
        let mime = ctype.split(';').next().unwrap_or("").trim();
        if !mime.eq_ignore_ascii_case("application/json") {
            return Err(error(415, "unsupported_media_type", format!("send JSON with Content-Type: application/json (got '{ctype}')")));
        }
    }
    Ok(body)
}

fn respond(request: tiny_http::Request, status: u16, ctype: &str, body: Vec<u8>, extra: Vec<(&'static str, String)>) {
    let mut resp = tiny_http::Response::from_data(body).with_status_code(status);
    let mut add = |k: &str, v: &str| {
        if let Ok(h) = tiny_http::Header::from_bytes(k.as_bytes(), v.as_bytes()) {
            resp.add_header(h);
        }
    };
    add("Content-Type", ctype);
    add("Cache-Control", "no-store");
    add("X-Content-Type-Options", "nosniff");
    for (k, v) in &extra {
        add(k, v);
    }
    let _ = request.respond(resp);
}

/// The request fuzz target's body (also run over the stored corpus by `cargo test`): an
/// arbitrary method, path, query, headers and body go through parsing, routing and the
/// handlers' input checks without a panic. Input: lines `METHOD PATH`, then headers, a blank
/// line, then the body.
#[doc(hidden)]
pub fn fuzz_request(data: &[u8]) {
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
        headers: lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).collect(),
        body: body.as_bytes().to_vec(),
    };
    let _ = routes::find(&req.method, &req.path);
    let _ = req.cookie("atelier_token");
    let keys = Keys::new(b"fuzz");
    if let Some(t) = req.header("authorization") {
        let _ = keys.verify(t.trim_start_matches("Bearer "), 0);
    }
    routes::fuzz_inputs(&req);
}
