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

use std::io::Read;
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
/// Default cap on concurrent SSE streams; more are answered 503.
pub const CONNECTIONS_MAX_DEFAULT: usize = 10_000;
/// Listen backlog: Rust's default of 128 stalls reconnect storms for seconds.
pub const LISTEN_BACKLOG: i32 = 8192;
/// Threads taking parsed requests from tiny_http.
pub const HANDLER_THREADS: usize = 8;
pub const HEARTBEAT_MS_DEFAULT: u64 = 15_000;

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
}

pub struct Server {
    http: Arc<tiny_http::Server>,
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
        let listener = listen(addr).map_err(|source| HttpError::Bind { addr: config.listen.clone(), source })?;
        let addr = listener.local_addr().map_err(|e| HttpError::Start(e.to_string()))?;
        let http = Arc::new(tiny_http::Server::from_listener(listener, None).map_err(|e| HttpError::Start(e.to_string()))?);
        let shared = Arc::new(Shared {
            store,
            keys,
            config,
            executors,
            metrics: metrics::Metrics::default(),
            shutting_down: AtomicBool::new(false),
            streams: AtomicU64::new(0),
        });
        let threads = (0..HANDLER_THREADS)
            .map(|i| {
                let http = http.clone();
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("atelier-http-{i}"))
                    .spawn(move || handler_loop(&http, &shared))
                    .map_err(|e| HttpError::Start(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Server { http, shared, threads, addr })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, ends open streams (they see the flag within a second) and joins the
    /// handler threads. Appends already handed to the store finish there.
    pub fn shutdown(mut self) {
        self.shared.shutting_down.store(true, Ordering::SeqCst);
        for _ in 0..self.threads.len() {
            self.http.unblock();
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

/// A listener with a large backlog and TCP_NODELAY (inherited by accepted sockets on Linux).
fn listen(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

fn handler_loop(http: &tiny_http::Server, shared: &Arc<Shared>) {
    while !shared.shutting_down.load(Ordering::SeqCst) {
        let req = match http.recv() {
            Ok(r) => r,
            Err(e) => {
                if !shared.shutting_down.load(Ordering::SeqCst) {
                    tracing::warn!(error = %e, "accepting a request failed");
                    std::thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
        };
        handle(req, shared);
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
        Reply::Stream(spec) => sse::spawn(request, spec, shared.clone()),
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
