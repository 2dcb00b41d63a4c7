//! HTTP/1.1 connections on tiny_http, a thread per connection.
//!
//! tiny_http accepts, parses request heads, keeps connections alive and speaks TLS; each
//! connection's requests run on that connection's thread, in [`serve_request`], one at a
//! time. On top of its parsing, before any route or auth runs, come the checks it lacks: the
//! request line, control bytes in headers, and the body's framing (`framing`). The body is
//! read there, incrementally and under the body deadline; the request then goes to the
//! handler pool (deep stacks for routing, storage reads and JSON) and the reply comes back
//! to be written on the connection. An SSE request turns its connection's thread into the
//! stream's thread: a stream costs one small thread and one descriptor.
//!
//! tiny_http is vendored with marked patches (http/vendor/README.md): the task pool race
//! that left streams queued behind each other, an accept loop that stopped on the first
//! error, the hooks used here (admission, a handler on the connection's thread), head and
//! body deadlines, a head size limit, JSON bodies on its own refusals, strict chunked
//! bodies, and TLS on rustls 0.23.

use std::any::Any;
use std::io::{self, Read, Write};
use std::mem::ManuallyDrop;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use tiny_http::Next;

use crate::backup;
use crate::client_addr::client_addr;
use crate::dispatch::handle;
use crate::framing::{self, BodyFraming, Refusal};
use crate::pool::Job;
use crate::render;
use crate::reply::Reply;
use crate::request::{percent_decode, Req};
use crate::slot::{Full, Slot};
use crate::sse::{self, Framing};
use crate::state::Shared;

/// Request bodies above this are refused with 413.
pub const BODY_BYTES_MAX: usize = 1024 * 1024;
/// A write that cannot proceed for this long (a client that stopped reading) fails, which
/// ends that stream only; the client can resume from its last event id.
pub const SEND_TIMEOUT_MS: u64 = 10_000;
/// Request line and headers together; more is answered 431.
pub const HEAD_BYTES_MAX: usize = 16 * 1024;
/// After a refusal, how long and how much of the rest of the request is read and dropped
/// before the connection closes (see `linger_close`).
const LINGER: Duration = Duration::from_millis(500);
const LINGER_BYTES_MAX: usize = 256 * 1024;
/// Send timeout for the 503 answered to a connection beyond the cap (on the accept thread).
const OVER_CAPACITY_SEND_TIMEOUT: Duration = Duration::from_millis(100);

/// What a connection keeps for its life: its slot (given back when the connection's thread
/// ends, panics included) and its socket's descriptor, for lingering after a refusal.
struct Connection {
    slot: Slot,
    /// The socket's peer, canonical (an IPv4-mapped address as IPv4).
    peer: IpAddr,
    /// Whether the peer is a trusted proxy: each request's client is then the one
    /// `X-Forwarded-For` names, and the connection counts against that client's cap.
    proxied: bool,
    /// Not a `dup`: a connection costs one descriptor (10,000 streams must fit the limit).
    fd: RawFd,
    /// Whether the connection speaks TLS: a refusal is then never answered in plain text.
    tls: bool,
    /// Whether the socket's send timeout is set: on the connection's first request, on its
    /// own thread, so the accept thread (one for all connections) makes no system call for it.
    configured: bool,
    /// Where the handler pool sends this connection's replies, made once per connection.
    replies: (Sender<Reply>, Receiver<Reply>),
}

impl Connection {
    /// Runs `f` with the connection's socket, borrowed from tiny_http.
    fn with_socket<R>(&self, f: impl FnOnce(&TcpStream) -> R) -> R {
        // SAFETY: tiny_http owns the socket and closes it only after the connection's thread
        // is done with it, so it is open while a handler runs, which is the only time this
        // is called; `ManuallyDrop` keeps this borrowed handle from closing it.
        let socket = ManuallyDrop::new(unsafe { TcpStream::from_raw_fd(self.fd) });
        f(&socket)
    }
}

/// The admission hook: a slot for the connection, or a 503 and a close beyond a cap.
pub(crate) fn admit(shared: Arc<Shared>) -> tiny_http::AdmitHook {
    Box::new(move |stream: &TcpStream, peer: SocketAddr| {
        if shared.shutting_down.load(Ordering::SeqCst) {
            return None;
        }
        let tls = shared.config.tls.is_some();
        let peer = peer.ip().to_canonical();
        let proxied = shared.config.trusted_proxies.trusts(peer);
        let taken =
            if proxied { Slot::take_unassigned(&shared.slots) } else { Slot::take(&shared.slots, peer) };
        let slot = match taken {
            Ok(slot) => slot,
            Err(full) => {
                if !tls {
                    refuse_over_capacity(stream, full);
                }
                return None;
            }
        };
        // TCP_NODELAY comes from the listener (accepted sockets inherit it).
        let fd = stream.as_raw_fd();
        let replies = crossbeam_channel::bounded(1);
        let conn = Connection { slot, peer, proxied, fd, tls, configured: false, replies };
        Some(Box::new(conn) as Box<dyn Any + Send>)
    })
}

/// The handler tiny_http runs on each connection's thread for each of its requests.
pub(crate) fn handler(shared: Arc<Shared>) -> tiny_http::Handler {
    Arc::new(move |context: &mut (dyn Any + Send), rq: tiny_http::Request| {
        match context.downcast_mut::<Connection>() {
            Some(conn) => {
                if !conn.configured {
                    let timeout = Some(Duration::from_millis(SEND_TIMEOUT_MS));
                    let _ = conn.with_socket(|s| s.set_write_timeout(timeout));
                    conn.configured = true;
                }
                serve_request(conn, rq, &shared)
            }
            None => Next::Close,
        }
    })
}

/// The bodies of tiny_http's own refusals (a malformed head, a head over its limit, a
/// deadline passed, an HTTP version not served): the API's JSON error shape.
pub(crate) fn refusal_body(status: u16, message: &str) -> (&'static str, Vec<u8>) {
    let code = match status {
        408 => "request_timeout",
        417 => "expectation_failed",
        431 => "headers_too_large",
        505 => "http_version",
        _ => "bad_request",
    };
    let body = serde_json::to_vec(&render::error(code, message)).expect("invariant: JSON serializes");
    ("application/json", body)
}

/// Answers a connection beyond a cap with 503 and closes it, without a thread: the write
/// fits a fresh socket's buffer, and a short send timeout keeps the accept loop moving anyway.
fn refuse_over_capacity(stream: &TcpStream, full: Full) {
    let _ = stream.set_write_timeout(Some(OVER_CAPACITY_SEND_TIMEOUT));
    let body = render::error("over_capacity", &over_capacity_message(full)).to_string();
    let mut w = stream;
    let _ = write_response(
        &mut w,
        503,
        "application/json",
        body.as_bytes(),
        &[("Retry-After", "1".into())],
        Close::Yes,
        Body::Send,
    );
}

fn over_capacity_message(full: Full) -> String {
    match full {
        Full::Total(n) => format!("{n} connections are open; try again shortly"),
        Full::PerIp(n) => format!("{n} connections are open from your address; try again shortly"),
    }
}

/// The head of a request as the checks and handlers see it.
struct Head {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    keep_alive: bool,
}

/// A request's head from tiny_http, or the refusal of what tiny_http accepts and we do not:
/// a method that is not letters, a target that is not origin-form or holds control bytes (a
/// NUL or a DEL in a path means something different to every layer that reads it),
/// HTTP/0.9, control bytes in a header value.
fn head_of(rq: &tiny_http::Request) -> Result<Head, Refusal> {
    let refuse = |status, code, message: &str| Refusal { status, code, message: message.to_string() };
    let method = rq.method().as_str();
    let target = rq.url();
    if method.is_empty()
        || !method.bytes().all(|b| b.is_ascii_alphabetic())
        || !target.starts_with('/')
        || target.bytes().any(|b| b.is_ascii_control())
    {
        return Err(refuse(400, "bad_request", "the request line is not METHOD TARGET HTTP/1.1"));
    }
    let version = rq.http_version();
    let http10 = match (version.0, version.1) {
        (1, 1) => false,
        (1, 0) => true,
        _ => return Err(refuse(505, "http_version", "this server only serves HTTP/1.0 and HTTP/1.1")),
    };
    let mut headers = Vec::with_capacity(rq.headers().len());
    for h in rq.headers() {
        let (k, v) = (h.field.as_str().as_str(), h.value.as_str());
        if !framing::is_token(k) {
            return Err(refuse(400, "bad_request", "a header name that is not a token"));
        }
        if v.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
            return Err(Refusal {
                status: 400,
                code: "bad_request",
                message: format!("a control byte in header '{k}'"),
            });
        }
        headers.push((k.to_string(), v.to_string()));
    }
    let connection = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("connection"))
        .map(|(_, v)| v.to_ascii_lowercase())
        .unwrap_or_default();
    let keep_alive = if http10 { connection.contains("keep-alive") } else { !connection.contains("close") };
    Ok(Head { method: method.to_string(), target: target.to_string(), headers, keep_alive })
}

/// One request on its connection's thread: checked, its body read, routed on the handler
/// pool, answered. Says whether the connection goes on.
fn serve_request(conn: &mut Connection, mut rq: tiny_http::Request, shared: &Arc<Shared>) -> Next {
    if shared.shutting_down.load(Ordering::SeqCst) {
        return Next::Close;
    }
    let started = Instant::now();
    let checked = head_of(&rq).and_then(|head| {
        let framing = framing::body_framing(&head.headers, BODY_BYTES_MAX)?;
        Ok((head, framing))
    });
    let (head, framing) = match checked {
        Ok(ok) => ok,
        Err(r) => return refuse(conn, rq, r, &[], started, shared),
    };
    if conn.proxied {
        let forwarded: Vec<&str> = head
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("x-forwarded-for"))
            .map(|(_, v)| v.as_str())
            .collect();
        let client = client_addr(conn.peer, &forwarded, &shared.config.trusted_proxies);
        if let Err(full) = conn.slot.count_as(client) {
            let r = Refusal { status: 503, code: "over_capacity", message: over_capacity_message(full) };
            return refuse(conn, rq, r, &[("Retry-After", "1".into())], started, shared);
        }
    }
    let body = match read_body(&mut rq, framing) {
        Ok(body) => body,
        Err(BodyError::Gone) => {
            // Nothing to answer to a client that is gone; tiny_http would answer a request
            // dropped unanswered with a 500, so its writer is taken and dropped unused.
            conn.with_socket(|s| s.shutdown(std::net::Shutdown::Both)).ok();
            drop(rq.into_writer());
            return Next::Close;
        }
        Err(BodyError::Refuse(r)) => return refuse(conn, rq, r, &[], started, shared),
    };
    let close = if head.keep_alive { Close::No } else { Close::Yes };
    let head_only = if head.method.eq_ignore_ascii_case("HEAD") { Body::Omit } else { Body::Send };
    let req = to_req(head, body);
    let (reply_tx, reply_rx) = (conn.replies.0.clone(), &conn.replies.1);
    let job_shared = shared.clone();
    let job: Job = Box::new(move || {
        let _ = reply_tx.send(handle(&req, started, &job_shared));
    });
    if shared.jobs.send(job).is_err() {
        return Next::Close;
    }
    let Ok(reply) = reply_rx.recv() else { return Next::Close };
    let mut w = rq.into_writer();
    let written = match reply {
        Reply::Stream(opened) => {
            // A stream that ends by itself hands the connection back to a keep-alive client,
            // unless that client asked with HEAD (it expects no body, so the connection cannot
            // go on). Why: a client following one commission after another otherwise pays a
            // TCP connect, and the server a thread, per commission.
            let reusable = close == Close::No && head_only == Body::Send;
            let framing = if opened.ends() && reusable { Framing::Chunked } else { Framing::UntilClose };
            return if sse::serve(&mut w, *opened, framing, shared) { Next::ReadNext } else { Next::Close };
        }
        Reply::Backup(b) => {
            let send =
                if head_only == Body::Send { backup::Sending::Body } else { backup::Sending::HeadOnly };
            let _ = backup::serve(&mut w, shared, &b, send);
            return Next::Close;
        }
        Reply::Json(status, body) => {
            let body = serde_json::to_vec(&body).expect("invariant: JSON values serialize");
            write_response(&mut w, status, "application/json", &body, &[], close, head_only)
        }
        Reply::Bytes(status, ctype, body, extra) => {
            write_response(&mut w, status, ctype, &body, &extra, close, head_only)
        }
        Reply::Empty(status) => write_response(&mut w, status, "text/plain", &[], &[], close, head_only),
    };
    if written.is_err() || close == Close::Yes {
        Next::Close
    } else {
        Next::ReadNext
    }
}

/// Answers a refused request and closes its connection: the bytes after a refused head
/// cannot be trusted to start a new request.
///
/// The socket's read side is shut before the request is dropped: tiny_http drains an unread
/// sized body when its request goes, and a refused body may never come.
fn refuse(
    conn: &Connection,
    rq: tiny_http::Request,
    r: Refusal,
    extra: &[(&'static str, String)],
    started: Instant,
    shared: &Shared,
) -> Next {
    shared.metrics.request("bad_request", r.status, started.elapsed().as_secs_f64());
    let body = serde_json::to_vec(&render::error(r.code, &r.message)).expect("invariant: JSON serializes");
    if conn.tls {
        // The answer goes through the TLS session; there is no lingering in plain bytes.
        conn.with_socket(|s| s.shutdown(std::net::Shutdown::Read)).ok();
        let mut w = rq.into_writer();
        let _ = write_response(&mut w, r.status, "application/json", &body, extra, Close::Yes, Body::Send);
    } else {
        // Straight on the socket: the request's writer is tiny_http's, and taking it drops
        // the request.
        conn.with_socket(|mut s| {
            let _ =
                write_response(&mut s, r.status, "application/json", &body, extra, Close::Yes, Body::Send);
            linger_close(s);
            let _ = s.shutdown(std::net::Shutdown::Read);
        });
        drop(rq);
    }
    Next::Close
}

fn to_req(head: Head, body: Vec<u8>) -> Req {
    let (path, query) = head.target.split_once('?').unwrap_or((&head.target, ""));
    let query = query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    Req {
        method: head.method.to_ascii_uppercase(),
        path: path.to_string(),
        query,
        headers: head.headers,
        body,
    }
}

/// Why a body could not be read.
enum BodyError {
    /// Closed or reset: close without an answer.
    Gone,
    /// Answer this and close.
    Refuse(Refusal),
}

/// Reads the body the framing announced, growing the buffer only by the bytes that have
/// arrived (a declared length reserves nothing ahead of them), under the body deadline.
/// tiny_http sends the interim `100 Continue` a client may wait for on the first read, so a
/// body refused by its framing is never asked for.
fn read_body(rq: &mut tiny_http::Request, framing: BodyFraming) -> Result<Vec<u8>, BodyError> {
    if framing == BodyFraming::None {
        return Ok(Vec::new());
    }
    let mut body = Vec::new();
    let cap = u64::try_from(BODY_BYTES_MAX).unwrap_or(u64::MAX);
    let read = rq.as_reader().take(cap + 1).read_to_end(&mut body);
    if let Err(e) = read {
        return Err(body_error(e));
    }
    if body.len() > BODY_BYTES_MAX {
        return Err(too_large());
    }
    if let BodyFraming::Length(n) = framing {
        if body.len() < n {
            return Err(BodyError::Gone); // closed before the declared length
        }
    }
    Ok(body)
}

fn too_large() -> BodyError {
    BodyError::Refuse(Refusal::too_large(BODY_BYTES_MAX))
}

fn body_error(e: io::Error) -> BodyError {
    let refuse = |status, code, message: String| BodyError::Refuse(Refusal { status, code, message });
    if e.get_ref().is_some_and(|inner| inner.is::<tiny_http::BodyTooLarge>()) {
        return too_large();
    }
    match e.kind() {
        io::ErrorKind::TimedOut => {
            refuse(408, "request_timeout", "the request body did not arrive in time".to_string())
        }
        io::ErrorKind::InvalidData => refuse(400, "bad_request", e.to_string()),
        _ => BodyError::Gone,
    }
}

/// Closes a connection after a refusal without resetting it: the client may still be sending
/// the request we refused, and closing with unread bytes would send a reset that can destroy
/// the answer before the client reads it. So stop writing, then read and drop what comes for
/// a short, bounded while.
fn linger_close(stream: &TcpStream) {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let deadline = Instant::now() + LINGER;
    let mut drained = 0usize;
    let mut buf = [0u8; 4096];
    while drained < LINGER_BYTES_MAX {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        let mut s = stream;
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => drained += n,
        }
    }
}

/// Whether the connection closes after this response.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Close {
    Yes,
    No,
}

/// Whether the body goes out (not for HEAD).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Body {
    Send,
    Omit,
}

pub(crate) fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        303 => "See Other",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

/// Writes a whole response in one write.
pub(crate) fn write_response(
    w: &mut dyn Write,
    status: u16,
    ctype: &str,
    body: &[u8],
    extra: &[(&'static str, String)],
    close: Close,
    send: Body,
) -> io::Result<()> {
    use std::fmt::Write as _;
    let mut head = String::with_capacity(256);
    let _ = write!(head, "HTTP/1.1 {status} {}\r\n", reason(status));
    if status != 204 {
        let _ = write!(head, "Content-Type: {ctype}\r\nContent-Length: {}\r\n", body.len());
    }
    head.push_str("Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n");
    for (k, v) in extra {
        // Header values come from our handlers; never let one split the head.
        if !v.contains(['\r', '\n']) {
            let _ = write!(head, "{k}: {v}\r\n");
        }
    }
    if close == Close::Yes {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    if send == Body::Send && status != 204 {
        out.extend_from_slice(body);
    }
    w.write_all(&out)?;
    w.flush()
}
