//! The request fuzz target's body, in the library so that the fuzz workspace and `cargo
//! test`'s replay of the stored corpus run the same code. Each input goes, as raw bytes on a
//! loopback connection, through a real server started once per process (tiny_http's parsing,
//! the framing checks, routing, auth, the handlers and a sled store in a scratch dir), which
//! must answer HTTP/1.1 or close, never 500, and whose threads must not panic; and, read as
//! lines (`METHOD PATH`, headers, a blank line, the body), through the handlers' pure input
//! checks.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use atelier_storage::{SledStore, StoreConfig};

use crate::auth::{Keys, Role};
use crate::config::HttpConfig;
use crate::dispatch::{find, token_of};
use crate::request::{percent_decode, Req};
use crate::routes::input;
use crate::server::Server;

/// The request fuzz target's body (also run over the stored corpus by `cargo test`): an
/// arbitrary method, path, query, headers and body go through parsing, routing and the
/// handlers' input checks without a panic. Input: lines `METHOD PATH`, then headers, a blank
/// line, then the body.
#[doc(hidden)]
pub fn fuzz_request(data: &[u8]) {
    fuzz_exchange(data);
    fuzz_request_lines(data);
}

/// The stand-in an input may use for a valid admin token, so that inputs reach the routes
/// behind auth and the store.
const TOKEN_PLACEHOLDER: &[u8] = b"TOKEN";
/// How long an input's connection waits for the server's answer (and its close).
const ANSWER_WAIT: Duration = Duration::from_millis(300);
/// How long an input's whole answer is read at most.
const ANSWER_WAIT_TOTAL: Duration = Duration::from_millis(1000);
/// The most of an answer that is read.
const ANSWER_BYTES_MAX: usize = 256 * 1024;

/// A server on loopback for the fuzz target, started once per process and left running.
struct FrontDoor {
    addr: SocketAddr,
    token: String,
    dir: PathBuf,
    _server: Server,
}

static FRONT_DOOR: OnceLock<FrontDoor> = OnceLock::new();
/// Panics seen on any thread since the front door started.
static PANICS: AtomicUsize = AtomicUsize::new(0);

fn front_door() -> &'static FrontDoor {
    FRONT_DOOR.get_or_init(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
        let dir = std::env::temp_dir().join(format!("atelier-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = SledStore::open(StoreConfig::new(&dir)).expect("the fuzz target's store opens");
        let secret = crate::secret::Secret::new(*b"fuzz-secret-of-thirty-two-bytes!");
        let keys = Keys::new(&secret.expect("invariant: 32 bytes"));
        let now = crate::clock::now_ms() / 1000;
        let token =
            keys.issue("fuzz", Role::Admin, now, 24 * 3600).expect("invariant: a day is within the TTL");
        let mut config = HttpConfig::new("127.0.0.1:0", &dir);
        // Short deadlines and heartbeats: an input that leaves a request or a stream open
        // costs its thread for a moment only.
        config.header_timeout_ms = 200;
        config.body_timeout_ms = 200;
        config.heartbeat_ms = 50;
        config.connections_per_ip_max = config.connections_max;
        let server =
            Server::start(config, store, keys.clone(), None).expect("the fuzz target's server starts");
        FrontDoor { addr: server.local_addr(), token, dir, _server: server }
    })
}

/// The fuzz target's scratch dir (its store), for a caller that removes it when done.
#[doc(hidden)]
pub fn fuzz_scratch_dir() -> Option<PathBuf> {
    FRONT_DOOR.get().map(|f| f.dir.clone())
}

/// Sends `data` (the token placeholder replaced) on a fresh connection to the fuzz target's
/// server and returns its answer, checked.
#[doc(hidden)]
pub fn fuzz_exchange(data: &[u8]) -> Vec<u8> {
    let door = front_door();
    let mut bytes = Vec::with_capacity(data.len());
    let mut rest = data;
    while let Some(i) = rest.windows(TOKEN_PLACEHOLDER.len()).position(|w| w == TOKEN_PLACEHOLDER) {
        bytes.extend_from_slice(&rest[..i]);
        bytes.extend_from_slice(door.token.as_bytes());
        rest = &rest[i + TOKEN_PLACEHOLDER.len()..];
    }
    bytes.extend_from_slice(rest);
    let Ok(mut c) = TcpStream::connect(door.addr) else { return Vec::new() };
    let _ = c.set_read_timeout(Some(ANSWER_WAIT));
    let _ = c.set_write_timeout(Some(ANSWER_WAIT));
    let _ = c.write_all(&bytes);
    let _ = c.shutdown(std::net::Shutdown::Write);
    // Read until the server closes, the answer is long enough, or the whole wait is over: a
    // stream keeps sending heartbeats, so a per-read timeout alone would never end it.
    let mut answer = Vec::new();
    let deadline = std::time::Instant::now() + ANSWER_WAIT_TOTAL;
    let mut chunk = [0u8; 8192];
    while answer.len() < ANSWER_BYTES_MAX && std::time::Instant::now() < deadline {
        match c.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
        }
    }
    // An HTTP/1.0 request is answered in HTTP/1.0 (tiny_http answers in the request's
    // version); anything else is HTTP/1.1.
    let status = answer.strip_prefix(b"HTTP/1.1 ").or_else(|| answer.strip_prefix(b"HTTP/1.0 "));
    assert!(
        answer.is_empty() || status.is_some(),
        "not an HTTP/1.x answer: {:?}",
        String::from_utf8_lossy(&answer[..answer.len().min(200)])
    );
    assert!(
        !status.is_some_and(|rest| rest.starts_with(b"500")),
        "an internal error: {:?}",
        String::from_utf8_lossy(&answer[..answer.len().min(400)])
    );
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a server thread panicked");
    answer
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
    let _ = find(&req.method, &req.path);
    let _ = req.cookie("atelier_token");
    let secret = crate::secret::Secret::new(*b"fuzz-secret-of-thirty-two-bytes!");
    let keys = Keys::new(&secret.expect("invariant: 32 bytes"));
    if let Some(t) = req.header("authorization") {
        let _ = keys.verify(t.trim_start_matches("Bearer "), 0);
    }
    check_inputs(req);
}

/// Runs the pure input checks of the handlers (no store needed).
fn check_inputs(req: &Req) {
    let _ = input::last_event_id(req);
    let _ = input::json_body(req);
    let _ = token_of(req, true);
    if let Ok((_, params)) = find(&req.method, &req.path) {
        for p in params {
            let _ = input::parse_id(p, "id");
            let _ = percent_decode(p);
        }
    }
}
