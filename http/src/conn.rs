//! HTTP/1.1 connections on our own threads.
//!
//! An accept loop gives each connection a thread of its own. That thread reads a request
//! (head and body under one deadline, so a stalled or dribbling client is closed), hands it
//! to the handler pool (deep stacks for routing, storage reads and JSON), and writes the
//! reply, keeping the connection alive as HTTP/1.1 says. An SSE request turns its
//! connection's thread into the stream's thread: a stream costs one small thread and one
//! descriptor.
//!
//! Why not tiny_http: its task pool counts a thread as idle until that thread has woken up,
//! so a burst of new connections queues behind threads that streams then hold for good
//! (BENCHMARKS.md, "HTTP and SSE").
//! Its accept thread also stopped for good on the first accept error, and it had no hook to
//! time out a connection, which took a janitor scanning /proc/self/fd.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// Stack of a connection thread: it parses heads, writes replies and runs the SSE loop; the
/// JSON and storage work of a request runs on the handler pool.
pub const CONNECTION_STACK_BYTES: usize = 128 * 1024;
/// Request line and headers together; more is answered 431.
pub const HEAD_BYTES_MAX: usize = 16 * 1024;
/// A chunk-size line (size and extensions); longer is refused with 400.
const CHUNK_LINE_BYTES_MAX: usize = 1024;
/// After a refusal, how long and how much of the rest of the request is read and dropped
/// before the connection closes (see `linger_close`).
const LINGER: Duration = Duration::from_millis(500);
const LINGER_BYTES_MAX: usize = 256 * 1024;
/// Read buffer per connection.
const READ_BUFFER_BYTES: usize = 4096;
/// Send timeout for the 503 answered to a connection beyond the cap (on the accept thread).
const OVER_CAPACITY_SEND_TIMEOUT: Duration = Duration::from_millis(100);
/// Pause after an accept error (out of descriptors, say) before accepting again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Accepts until shutdown; a failed accept (EMFILE, ENFILE, ENOBUFS) pauses and retries, so
/// running out of descriptors never stops the server.
pub(crate) fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    // Logged and counted once per run of errors, not once per retry.
    let mut failing = false;
    while !shared.shutting_down.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => {
                failing = false;
                if shared.shutting_down.load(Ordering::SeqCst) {
                    return;
                }
                let slot = match Slot::take(&shared.slots, peer.ip().to_canonical()) {
                    Ok(slot) => slot,
                    Err(full) => {
                        refuse_over_capacity(&stream, full);
                        continue;
                    }
                };
                // The slot moves into the thread and is given back when it is dropped: when
                // `serve` returns or panics, or here with the closure if the thread never starts.
                let conn_shared = shared.clone();
                let spawned = std::thread::Builder::new()
                    .name("atelier-conn".into())
                    .stack_size(CONNECTION_STACK_BYTES)
                    .spawn(move || {
                        let _slot = slot;
                        serve(stream, &conn_shared);
                    });
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "could not start a connection thread; closed the connection");
                }
            }
            Err(e) => {
                if shared.shutting_down.load(Ordering::SeqCst) {
                    return;
                }
                if !failing {
                    failing = true;
                    shared.accept_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "accepting connections failed; retrying until it works again");
                }
                std::thread::sleep(ACCEPT_ERROR_PAUSE);
            }
        }
    }
}

/// Answers a connection beyond a cap with 503 and closes it, without a thread: the write
/// fits a fresh socket's buffer, and a short send timeout keeps the accept loop moving anyway.
fn refuse_over_capacity(stream: &TcpStream, full: Full) {
    let _ = stream.set_write_timeout(Some(OVER_CAPACITY_SEND_TIMEOUT));
    let message = match full {
        Full::Total(n) => format!("{n} connections are open; try again shortly"),
        Full::PerIp(n) => format!("{n} connections are open from your address; try again shortly"),
    };
    let body = render::error("over_capacity", &message).to_string();
    let _ = write_response(
        stream,
        503,
        "application/json",
        body.as_bytes(),
        &[("Retry-After", "1".into())],
        Close::Yes,
        Body::Send,
    );
}

/// Where to connect to wake a blocked accept() at shutdown.
pub(crate) fn wake_address(addr: SocketAddr) -> SocketAddr {
    let mut a = addr;
    if a.ip().is_unspecified() {
        a.set_ip(match a {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    a
}

/// Reads from the socket, each read bounded by the remaining time to a deadline.
struct Deadlined<'a> {
    stream: &'a TcpStream,
    deadline: Instant,
}

impl Read for Deadlined<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "request deadline passed"));
        }
        self.stream.set_read_timeout(Some(left))?;
        let mut s = self.stream;
        s.read(buf)
    }
}

/// Why a request could not be read.
enum ReadError {
    /// Closed, reset or timed out: close without an answer.
    Gone,
    /// Answer this and close: (status, code, message).
    Refuse(u16, &'static str, String),
}

impl From<io::Error> for ReadError {
    fn from(_: io::Error) -> ReadError {
        ReadError::Gone
    }
}

struct Head {
    method: String,
    target: String,
    http10: bool,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn keep_alive(&self) -> bool {
        let connection = self.header("connection").map(str::to_ascii_lowercase).unwrap_or_default();
        if self.http10 {
            connection.contains("keep-alive")
        } else {
            !connection.contains("close")
        }
    }
}

/// One connection: requests until the client closes, asks to close, stalls, or a stream
/// takes the connection over.
fn serve(stream: TcpStream, shared: &Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_write_timeout(Some(Duration::from_millis(SEND_TIMEOUT_MS)));
    let timeout = Duration::from_millis(shared.config.header_timeout_ms.max(1));
    let mut reader = BufReader::with_capacity(
        READ_BUFFER_BYTES,
        Deadlined { stream: &stream, deadline: Instant::now() + timeout },
    );
    let (reply_tx, reply_rx) = crossbeam_channel::bounded(1);
    loop {
        if shared.shutting_down.load(Ordering::SeqCst) {
            return;
        }
        // Headers and body must arrive within the timeout; so must the next request.
        reader.get_mut().deadline = Instant::now() + timeout;
        let started = Instant::now();
        let (head, body) = match read_request(&mut reader, &stream) {
            Ok(Some(r)) => r,
            Ok(None) | Err(ReadError::Gone) => return,
            Err(ReadError::Refuse(status, code, message)) => {
                shared.metrics.request("bad_request", status, started.elapsed().as_secs_f64());
                let body =
                    serde_json::to_vec(&render::error(code, &message)).expect("invariant: JSON serializes");
                let _ =
                    write_response(&stream, status, "application/json", &body, &[], Close::Yes, Body::Send);
                linger_close(&stream);
                return;
            }
        };
        let keep_alive = if head.keep_alive() { Close::No } else { Close::Yes };
        let head_only = if head.method.eq_ignore_ascii_case("HEAD") { Body::Omit } else { Body::Send };
        let req = to_req(head, body);
        let (shared2, reply) = (shared.clone(), reply_tx.clone());
        let job: Job = Box::new(move || {
            let _ = reply.send(handle(&req, started, &shared2));
        });
        if shared.jobs.send(job).is_err() {
            return;
        }
        let Ok(reply) = reply_rx.recv() else { return };
        let written = match reply {
            Reply::Stream(opened) => {
                // A stream that ends by itself hands the connection back to a keep-alive
                // client, unless that client already sent more (pipelined bytes would sit in
                // the read buffer given back below; such a client gets a close instead) or
                // asked with HEAD (it expects no body, so the connection cannot go on).
                let reusable =
                    keep_alive == Close::No && head_only == Body::Send && reader.buffer().is_empty();
                let framing = if opened.ends() && reusable { Framing::Chunked } else { Framing::UntilClose };
                // A stream does not read while it runs: give its read buffer back (40 MiB at
                // 10,000 streams), and take a new one if the connection goes on.
                drop(reader);
                if !sse::serve(&stream, *opened, framing, shared) {
                    return;
                }
                reader = BufReader::with_capacity(
                    READ_BUFFER_BYTES,
                    Deadlined { stream: &stream, deadline: Instant::now() + timeout },
                );
                continue;
            }
            Reply::Json(status, body) => {
                let body = serde_json::to_vec(&body).expect("invariant: JSON values serialize");
                write_response(&stream, status, "application/json", &body, &[], keep_alive, head_only)
            }
            Reply::Bytes(status, ctype, body, extra) => {
                write_response(&stream, status, ctype, &body, &extra, keep_alive, head_only)
            }
            Reply::Empty(status) => {
                write_response(&stream, status, "text/plain", &[], &[], keep_alive, head_only)
            }
        };
        if written.is_err() || keep_alive == Close::Yes {
            return;
        }
    }
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

/// Reads one request; `Ok(None)` when the client closed between requests. The body's
/// framing is decided from the head before any byte of it is read, and before any route or
/// auth runs.
fn read_request(reader: &mut impl BufRead, stream: impl Write) -> Result<Option<(Head, Vec<u8>)>, ReadError> {
    let mut budget = HEAD_BYTES_MAX;
    // A client may send blank lines before a request line (RFC 9112 §2.2).
    let line = loop {
        match read_line(reader, &mut budget)? {
            None => return Ok(None),
            Some(l) if l.is_empty() => continue,
            Some(l) => break l,
        }
    };
    let not_a_request_line =
        || ReadError::Refuse(400, "bad_request", "the request line is not METHOD TARGET HTTP/1.1".into());
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(not_a_request_line());
    };
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        v if v.starts_with("HTTP/") => {
            return Err(ReadError::Refuse(505, "http_version", format!("{v} is not served; use HTTP/1.1")))
        }
        _ => return Err(not_a_request_line()),
    };
    // Origin-form targets only, without control bytes (a NUL or a DEL in a path means
    // something different to every layer that reads it).
    if method.is_empty()
        || !method.bytes().all(|b| b.is_ascii_alphabetic())
        || !target.starts_with('/')
        || target.bytes().any(|b| b.is_ascii_control())
    {
        return Err(not_a_request_line());
    }
    let mut headers = Vec::new();
    loop {
        let Some(l) = read_line(reader, &mut budget)? else { return Err(ReadError::Gone) };
        if l.is_empty() {
            break;
        }
        headers.push(header_line(&l)?);
    }
    let framing = framing::body_framing(&headers, BODY_BYTES_MAX)?;
    let head = Head { method: method.to_string(), target: target.to_string(), http10, headers };
    let body = read_body(reader, stream, &head, framing)?;
    Ok(Some((head, body)))
}

/// One header line as (name, value). The name must be a token right up to its colon (a space
/// before the colon, or a line folded onto the previous one, reads differently in other
/// parsers), and the value must hold no control bytes but tabs.
fn header_line(l: &str) -> Result<(String, String), ReadError> {
    let shown = || l.chars().take(80).filter(|c| !c.is_control()).collect::<String>();
    let Some((k, v)) = l.split_once(':') else {
        return Err(ReadError::Refuse(
            400,
            "bad_request",
            format!("a header line without a colon: '{}'", shown()),
        ));
    };
    if !framing::is_token(k) {
        return Err(ReadError::Refuse(
            400,
            "bad_request",
            format!("a header name that is not a token: '{}'", shown()),
        ));
    }
    if v.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
        return Err(ReadError::Refuse(400, "bad_request", format!("a control byte in header '{k}'")));
    }
    Ok((k.to_string(), v.trim().to_string()))
}

impl From<Refusal> for ReadError {
    fn from(r: Refusal) -> ReadError {
        ReadError::Refuse(r.status, r.code, r.message)
    }
}

/// One line without its CR LF; `None` at end of stream before any byte. Counts against the
/// head budget; 431 when it runs out.
fn read_line(reader: &mut impl BufRead, budget: &mut usize) -> Result<Option<String>, ReadError> {
    let mut buf = Vec::new();
    let n = reader.by_ref().take(*budget as u64 + 1).read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(None);
    }
    if n > *budget {
        return Err(ReadError::Refuse(
            431,
            "headers_too_large",
            format!("the request head is over {HEAD_BYTES_MAX} bytes"),
        ));
    }
    *budget -= n;
    if !buf.ends_with(b"\n") {
        return Err(ReadError::Gone); // closed mid-line
    }
    while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        buf.pop();
    }
    String::from_utf8(buf)
        .map(Some)
        .map_err(|_| ReadError::Refuse(400, "bad_request", "the request head is not UTF-8".into()))
}

/// `continue_to` gets the interim `100 Continue` a client may wait for before its body; it is
/// sent only once the framing was accepted, so a refused body is never asked for.
fn read_body(
    reader: &mut impl BufRead,
    mut continue_to: impl Write,
    head: &Head,
    framing: BodyFraming,
) -> Result<Vec<u8>, ReadError> {
    if framing == BodyFraming::None {
        return Ok(Vec::new());
    }
    if head.header("expect").is_some_and(|e| e.eq_ignore_ascii_case("100-continue")) {
        continue_to.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    }
    let mut body = Vec::new();
    match framing {
        BodyFraming::None => {}
        BodyFraming::Length(n) => read_exactly(reader, &mut body, n)?,
        BodyFraming::Chunked => loop {
            let line = read_chunk_line(reader)?;
            let size = framing::chunk_size(&line, body.len(), BODY_BYTES_MAX)?;
            if size == 0 {
                read_trailers(reader)?;
                break;
            }
            read_exactly(reader, &mut body, size)?;
            let mut crlf = [0u8; 2];
            reader.read_exact(&mut crlf)?;
            if &crlf != b"\r\n" {
                return Err(ReadError::Refuse(400, "bad_request", "a chunk is not followed by CR LF".into()));
            }
        },
    }
    Ok(body)
}

/// Appends `n` bytes to `body`, growing it only by the bytes that have arrived: a declared
/// length reserves nothing ahead of them.
fn read_exactly(reader: &mut impl BufRead, body: &mut Vec<u8>, n: usize) -> Result<(), ReadError> {
    let mut left = n;
    while left > 0 {
        let available = reader.fill_buf()?;
        if available.is_empty() {
            return Err(ReadError::Gone);
        }
        let take = available.len().min(left);
        body.extend_from_slice(&available[..take]);
        reader.consume(take);
        left -= take;
    }
    Ok(())
}

/// A chunk-size or trailer line, without its CR LF, which must be there: a bare LF is read
/// differently by other parsers.
fn read_chunk_line(reader: &mut impl BufRead) -> Result<Vec<u8>, ReadError> {
    let mut line = Vec::new();
    reader.by_ref().take(CHUNK_LINE_BYTES_MAX as u64 + 2).read_until(b'\n', &mut line)?;
    if !line.ends_with(b"\n") {
        if line.len() > CHUNK_LINE_BYTES_MAX {
            return Err(ReadError::Refuse(400, "bad_request", "a chunk line is too long".into()));
        }
        return Err(ReadError::Gone); // closed mid-line
    }
    if !line.ends_with(b"\r\n") {
        return Err(ReadError::Refuse(400, "bad_request", "a chunk line does not end in CR LF".into()));
    }
    line.truncate(line.len() - 2);
    Ok(line)
}

/// Reads and drops the trailer fields after the last chunk, up to the blank line, within the
/// head's byte budget.
fn read_trailers(reader: &mut impl BufRead) -> Result<(), ReadError> {
    let mut budget = HEAD_BYTES_MAX;
    loop {
        let line = read_chunk_line(reader)?;
        if line.is_empty() {
            return Ok(());
        }
        budget = budget.checked_sub(line.len() + 2).ok_or_else(|| {
            ReadError::Refuse(
                431,
                "headers_too_large",
                format!("the trailers are over {HEAD_BYTES_MAX} bytes"),
            )
        })?;
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
    stream: &TcpStream,
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
    let mut w = stream;
    w.write_all(&out)
}

/// The request fuzz target's parser half: arbitrary bytes as a connection's input go through
/// the request reader (heads, chunked and sized bodies, limits) without a panic, and what it
/// accepts becomes a routed request.
pub(crate) fn fuzz_parse(data: &[u8]) -> Vec<Req> {
    let mut reader = BufReader::new(data);
    let mut out = Vec::new();
    while let Ok(Some((head, body))) = read_request(&mut reader, io::sink()) {
        out.push(to_req(head, body));
        if out.len() > 8 {
            break;
        }
    }
    out
}

#[cfg(test)]
mod parse_tests {
    use super::*;

    #[test]
    fn chunked_bodies_pipelining_and_limits() {
        let input = b"POST /api/commissions?x=%41 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n2\r\n1}\r\n0\r\n\r\nGET /healthz HTTP/1.0\r\n\r\n";
        let reqs = fuzz_parse(input);
        assert_eq!(reqs.len(), 2);
        assert_eq!(
            (reqs[0].method.as_str(), reqs[0].path.as_str(), reqs[0].body.as_slice()),
            ("POST", "/api/commissions", &b"{\"a\":1}"[..])
        );
        assert_eq!(reqs[0].query, vec![("x".to_string(), "A".to_string())]);
        assert_eq!(reqs[1].path, "/healthz");
        // Refused: a huge Content-Length (413), HTTP/2 (505), a head over the limit (431).
        let refused = |bytes: &[u8]| match read_request(&mut BufReader::new(bytes), io::sink()) {
            Err(ReadError::Refuse(status, ..)) => status,
            _ => 0,
        };
        assert_eq!(refused(b"GET / HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n"), 413);
        assert_eq!(refused(b"GET / HTTP/2\r\n\r\n"), 505);
        let long = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(HEAD_BYTES_MAX));
        assert_eq!(refused(long.as_bytes()), 431);
    }
}
