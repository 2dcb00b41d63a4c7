//! Regression tests of the marked patches (PATCH(atelier N)); see ../README.md. Each test
//! fails on tiny_http 0.12.0 as published.

use std::any::Any;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tiny_http::{Next, Options, Response, Server};

fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    (l, addr)
}

/// Sends `bytes`, reads until the server closes (or 5 s).
fn exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn json_refusal(status: u16, message: &str) -> (&'static str, Vec<u8>) {
    ("application/json", format!("{{\"status\":{},\"message\":\"{}\"}}", status, message).into_bytes())
}

/// A server whose handler answers 200 "ok" on the connection's thread.
fn server_with(options: Options) -> (Server, SocketAddr) {
    let (l, addr) = listener();
    let options = Options {
        handler: Some(Arc::new(|_: &mut (dyn Any + Send), rq: tiny_http::Request| {
            let _ = rq.respond(Response::from_string("ok"));
            Next::ReadNext
        })),
        ..options
    };
    (Server::from_listener_with(l, None, options).unwrap(), addr)
}

/// PATCH 3: the admission hook can refuse a connection, and its context lives exactly as
/// long as the connection.
#[test]
fn admission_refuses_and_its_context_lives_as_long_as_the_connection() {
    struct Guard(Arc<AtomicUsize>);
    impl Drop for Guard {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let open = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(AtomicUsize::new(0));
    let (hook_open, hook_seen) = (open.clone(), seen.clone());
    let (_server, addr) = server_with(Options {
        admit: Some(Box::new(move |stream: &TcpStream, _peer| {
            // Every other connection is refused with an answer of the hook's own.
            if hook_seen.fetch_add(1, Ordering::SeqCst) % 2 == 1 {
                let mut s = stream;
                let _ = s.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n");
                return None;
            }
            hook_open.fetch_add(1, Ordering::SeqCst);
            Some(Box::new(Guard(hook_open.clone())) as Box<dyn Any + Send>)
        })),
        ..Options::default()
    });
    let kept = TcpStream::connect(addr).unwrap();
    let refused = exchange(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(refused.starts_with("HTTP/1.1 503"), "{}", refused);
    let deadline = Instant::now() + Duration::from_secs(5);
    while open.load(Ordering::SeqCst) != 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(open.load(Ordering::SeqCst), 1, "the kept connection's context is alive");
    drop(kept);
    while open.load(Ordering::SeqCst) != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(open.load(Ordering::SeqCst), 0, "its context is dropped when it closes");
}

/// PATCH 3: a handler on the connection's thread answers requests in order, and `Close`
/// ends the connection.
#[test]
fn the_handler_runs_each_request_and_can_close_the_connection() {
    let (l, addr) = listener();
    let _server = Server::from_listener_with(
        l,
        None,
        Options {
            handler: Some(Arc::new(|_: &mut (dyn Any + Send), rq: tiny_http::Request| {
                let close = rq.url() == "/close";
                let _ = rq.respond(Response::from_string(format!("you asked {}", rq_url_static(close))));
                if close {
                    Next::Close
                } else {
                    Next::ReadNext
                }
            })),
            ..Options::default()
        },
    )
    .unwrap();
    let got = exchange(
        addr,
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /close HTTP/1.1\r\nHost: x\r\n\r\nGET /never HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert_eq!(got.matches("HTTP/1.1 200").count(), 2, "{}", got);
    assert!(got.contains("you asked /a") && got.contains("you asked /close"), "{}", got);
}

fn rq_url_static(close: bool) -> &'static str {
    if close {
        "/close"
    } else {
        "/a"
    }
}

/// PATCH 4: a head dribbled one byte at a time is cut off at the head deadline with 408,
/// although no single read waits long.
#[test]
fn a_slow_head_is_answered_408_at_its_deadline() {
    let (_server, addr) = server_with(Options {
        head_timeout: Some(Duration::from_millis(600)),
        refusal_body: Some(json_refusal),
        ..Options::default()
    });
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = Instant::now();
    for b in b"GET / HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaa\r\n" {
        if s.write_all(&[*b]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        if started.elapsed() > Duration::from_secs(3) {
            break;
        }
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 408"), "{}", out);
    assert!(out.contains("{\"status\":408"), "the refusal body: {}", out);
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
}

/// PATCH 4: a body has a deadline of its own from the end of its head.
#[test]
fn a_dribbled_body_times_out_at_the_body_deadline() {
    let (l, addr) = listener();
    let _server = Server::from_listener_with(
        l,
        None,
        Options {
            head_timeout: Some(Duration::from_secs(30)),
            body_timeout: Some(Duration::from_millis(500)),
            handler: Some(Arc::new(|_: &mut (dyn Any + Send), mut rq: tiny_http::Request| {
                let mut body = Vec::new();
                let answer = match rq.as_reader().read_to_end(&mut body) {
                    Ok(_) => "read".to_string(),
                    Err(e) => format!("{:?}", e.kind()),
                };
                let _ = rq.respond(Response::from_string(answer));
                Next::Close
            })),
            ..Options::default()
        },
    )
    .unwrap();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n").unwrap();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(2) {
        if s.write_all(b"a").is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let out = String::from_utf8_lossy(&out);
    assert!(out.ends_with("TimedOut"), "{}", out);
}

/// PATCH 5: a head over the limit is answered 431 instead of growing without bound, and a
/// folded header line is refused.
#[test]
fn heads_are_bounded_and_folded_lines_refused() {
    let (_server, addr) = server_with(Options {
        head_bytes_max: 1024,
        refusal_body: Some(json_refusal),
        ..Options::default()
    });
    let long = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(4096));
    let got = exchange(addr, long.as_bytes());
    assert!(got.starts_with("HTTP/1.1 431"), "{}", got);
    let got = exchange(addr, b"GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n folded: 2\r\n\r\n");
    assert!(got.starts_with("HTTP/1.1 400"), "{}", got);
    let got = exchange(addr, b"GET / HTTP/1.1\r\nHost: \xff\r\n\r\n");
    assert!(got.starts_with("HTTP/1.1 400"), "not ASCII: {}", got);
}

/// PATCH 6: an HTTP/2 preface gets one 505 (with the refusal body) and the connection
/// closes; before, the answer waited for good behind the request's own writer.
#[test]
fn an_http2_preface_is_answered_505_and_closed() {
    let (_server, addr) = server_with(Options { refusal_body: Some(json_refusal), ..Options::default() });
    let got = exchange(addr, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    assert!(got.starts_with("HTTP/1.1 505"), "{}", got);
    assert!(got.contains("{\"status\":505"), "{}", got);
}

/// PATCH 13: a refusal's status line is HTTP/1.1 (or 1.0 to a 1.0 request), whatever version
/// the request line named; a bad header after `HTTP/2.0` was answered `HTTP/2.0 400`.
#[test]
fn a_refusal_never_claims_a_version_this_server_does_not_speak() {
    let (_server, addr) = server_with(Options { refusal_body: Some(json_refusal), ..Options::default() });
    for version in ["2.0", "0.9", "1.7"] {
        let request = format!("POST / HTTP/{}\r\nHost: x\r\nBad\x0fHeader\r\n\r\n", version);
        let got = exchange(addr, request.as_bytes());
        assert!(got.starts_with("HTTP/1.1 4") || got.starts_with("HTTP/1.1 5"), "HTTP/{}: {}", version, got);
    }
    let got = exchange(addr, b"GET / HTTP/1.0\r\nHost: x\r\nBad\x0fHeader\r\n\r\n");
    assert!(got.starts_with("HTTP/1.0 400"), "{}", got);
}

/// PATCH 9: a client gone before its connection was accepted panicked the connection's
/// thread once its request was read (`peer_addr` unwrapped).
#[test]
fn clients_gone_at_once_do_not_panic_their_connection_thread() {
    // The server runs in this process: count panics raised in tiny_http's client module.
    static PANICS: AtomicUsize = AtomicUsize::new(0);
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if info.location().map_or(false, |l| l.file().ends_with("client.rs")) {
            PANICS.fetch_add(1, Ordering::SeqCst);
        }
        previous(info);
    }));
    let (_server, addr) = server_with(Options::default());
    for _ in 0..500 {
        drop(socket_that_resets(addr));
    }
    let got = exchange(addr, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(got.starts_with("HTTP/1.1 200"), "{}", got);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "connection threads panicked");
}

/// A connection that sends a whole request and is then closed with a reset (SO_LINGER 0),
/// often before the server has accepted it: its head can be read, its peer address cannot.
fn socket_that_resets(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    let sock = socket2::SockRef::from(&s);
    sock.set_linger(Some(Duration::from_secs(0))).unwrap();
    s
}

/// PATCH 10: `100 Continue` carries no Content-Length.
#[test]
fn the_interim_answer_has_no_content_length() {
    let (l, addr) = listener();
    let _server = Server::from_listener_with(
        l,
        None,
        Options {
            handler: Some(Arc::new(|_: &mut (dyn Any + Send), mut rq: tiny_http::Request| {
                let mut body = String::new();
                let _ = rq.as_reader().read_to_string(&mut body);
                let _ = rq.respond(Response::from_string(body));
                Next::Close
            })),
            ..Options::default()
        },
    )
    .unwrap();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n").unwrap();
    let mut interim = Vec::new();
    let mut byte = [0u8; 1];
    while !interim.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        interim.push(byte[0]);
    }
    let interim = String::from_utf8_lossy(&interim).to_ascii_lowercase();
    assert!(interim.starts_with("http/1.1 100"), "{}", interim);
    assert!(!interim.contains("content-length"), "{}", interim);
}

/// PATCH 11: a connection costs one descriptor (its halves share the socket; each was a
/// `dup` before, two descriptors per connection).
#[test]
fn a_connection_costs_one_descriptor() {
    fn open_fds() -> usize {
        std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
    }
    let admitted = Arc::new(AtomicUsize::new(0));
    let counted = admitted.clone();
    let (_server, addr) = server_with(Options {
        admit: Some(Box::new(move |_: &TcpStream, _| {
            counted.fetch_add(1, Ordering::SeqCst);
            Some(Box::new(()) as Box<dyn Any + Send>)
        })),
        ..Options::default()
    });
    std::thread::sleep(Duration::from_millis(100));
    let before = open_fds();
    let clients: Vec<TcpStream> = (0..50).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    while admitted.load(Ordering::SeqCst) < 50 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200));
    // The client's socket and the server's, in this one process.
    let grown = open_fds() - before;
    assert!(grown <= 2 * 50 + 5, "50 connections took {} descriptors here", grown);
    drop(clients);
}
