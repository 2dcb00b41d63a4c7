//! End-to-end: the front door against hostile clients, over raw TCP to the real binary.
//!
//! Each case sends bytes an attacker (or a confused proxy) might, and checks the exact status
//! and JSON error code, or that the connection is closed without an answer; then that nothing
//! was appended to the log, that `/healthz` answers, and that the connection gauge in
//! `/metrics` is back at its baseline (a slot leaked by any path would show there). Written
//! against the wire only, so that they hold for whichever server layer reads the sockets.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use atelier_tests::*;

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_atelier"))
}

/// How long a case waits for the server's answer or close.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// What the server must do with a case's bytes.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Answer with this status and JSON error code, then close.
    Refuse(u16, &'static str),
    /// Close without an answer.
    Close,
}

/// Writes `bytes` and reads until the server closes (or the timeout): everything it sent.
fn exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(ANSWER_TIMEOUT)).expect("a read timeout");
    // The server may refuse and close before taking every byte; that is what is tested.
    let _ = s.write_all(bytes);
    read_to_close(&mut s)
}

fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return raw,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
    }
}

/// The responses in `raw`, in order: (status, body), bodies delimited by Content-Length.
fn responses(raw: &[u8]) -> Vec<(u16, Vec<u8>)> {
    let mut out = Vec::new();
    let mut rest = raw;
    while let Some(split) = rest.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&rest[..split]).to_ascii_lowercase();
        let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        let end = (split + 4 + len).min(rest.len());
        out.push((status, rest[split + 4..end].to_vec()));
        rest = &rest[end..];
    }
    out
}

/// The connection gauge and the log's head seq, from one `/metrics` (whose own connection is
/// counted in the gauge).
fn gauge_and_head(s: &Server) -> (u64, u64) {
    let text = s.get("/metrics", Some(&token("root", true))).text();
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
    };
    (value("atelier_http_connections "), value("atelier_log_head_seq "))
}

/// How long the server may take to drain what a case left queued (a burst's connections still
/// in the accept queue count against the caps until their threads see the reset).
const SETTLE_TIME: Duration = Duration::from_secs(10);

/// After a case: `/healthz` answers 200 (within [`SETTLE_TIME`]), the log has no new event,
/// and the gauge returns to the baseline (a refused connection lingers briefly before it
/// closes).
fn assert_unharmed(s: &Server, name: &str, baseline: (u64, u64)) {
    let mut last = 0;
    let healthy = wait_for(SETTLE_TIME, || {
        last = s.get("/healthz", None).status;
        (last == 200).then_some(())
    });
    assert!(healthy.is_some(), "{name}: /healthz after the case answers {last}, not 200");
    let settled = wait_for(SETTLE_TIME, || {
        let now = gauge_and_head(s);
        (now.0 == baseline.0).then_some(now)
    });
    let now = settled.unwrap_or_else(|| {
        panic!("{name}: the connection gauge stays at {:?}, baseline {baseline:?}", gauge_and_head(s))
    });
    assert_eq!(now.1, baseline.1, "{name}: nothing is appended to the log");
}

fn assert_answer(name: &str, raw: &[u8], expect: Expect) {
    let got = responses(raw);
    match expect {
        Expect::Close => {
            assert!(raw.is_empty(), "{name}: expected a close, got {:?}", String::from_utf8_lossy(raw))
        }
        Expect::Refuse(status, code) => {
            assert_eq!(got.len(), 1, "{name}: one answer, got {:?}", String::from_utf8_lossy(raw));
            assert!(
                raw.starts_with(b"HTTP/1.1 "),
                "{name}: no interim answer first: {:?}",
                String::from_utf8_lossy(raw)
            );
            let (got_status, body) = &got[0];
            let body: Value = serde_json::from_slice(body)
                .unwrap_or_else(|e| panic!("{name}: a JSON body ({e}): {:?}", String::from_utf8_lossy(raw)));
            assert_eq!((*got_status, body["error"]["code"].as_str()), (status, Some(code)), "{name}: {body}");
        }
    }
}

fn post(head_lines: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "POST /api/commissions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{head_lines}\r\n"
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

fn get(target: &[u8], head_lines: &str) -> Vec<u8> {
    let mut out = b"GET ".to_vec();
    out.extend_from_slice(target);
    out.extend_from_slice(format!(" HTTP/1.1\r\nHost: x\r\n{head_lines}\r\n").as_bytes());
    out
}

/// The framing and parsing cases: bytes in one write, and what the server must answer.
fn framing_cases() -> Vec<(&'static str, Vec<u8>, Expect)> {
    use Expect::*;
    let bad = Refuse(400, "bad_request");
    let too_large = Refuse(413, "body_too_large");
    let body = br#"{"context":{"title":"t"},"pipeline":"noop"}"#;
    let many_headers: String = (0..3000).map(|i| format!("X-H{i}: v\r\n")).collect();
    let long_header = format!("X-Long: {}\r\n", "a".repeat(20 * 1024));
    vec![
        ("te_and_cl", post("Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", b"0\r\n\r\n"), bad),
        ("cl_and_te", post("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"), bad),
        ("te_xchunked", post("Transfer-Encoding: xchunked\r\n", b"0\r\n\r\n"), bad),
        ("te_gzip_chunked", post("Transfer-Encoding: gzip, chunked\r\n", b"0\r\n\r\n"), bad),
        ("te_chunked_twice_in_one", post("Transfer-Encoding: chunked, chunked\r\n", b"0\r\n\r\n"), bad),
        ("te_identity", post("Transfer-Encoding: identity\r\n", b""), bad),
        (
            "te_header_twice",
            post("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"),
            bad,
        ),
        ("cl_duplicate_same", post("Content-Length: 2\r\nContent-Length: 2\r\n", b"{}"), bad),
        ("cl_duplicate_differ", post("Content-Length: 2\r\nContent-Length: 3\r\n", b"{} "), bad),
        ("cl_plus_sign", post("Content-Length: +2\r\n", b"{}"), bad),
        ("cl_negative", post("Content-Length: -1\r\n", b""), bad),
        ("cl_list", post("Content-Length: 2, 2\r\n", b"{}"), bad),
        ("cl_hex", post("Content-Length: 0x2\r\n", b"{}"), bad),
        ("cl_huge", post("Content-Length: 99999999999999999999999999\r\n", b""), too_large),
        ("cl_over_cap", post("Content-Length: 1048577\r\n", b""), too_large),
        // A length that parses but no buffer could hold: refusing it dropped tiny_http's
        // body reader, whose drain allocated the declared size and aborted the server.
        ("cl_beyond_memory", post("Content-Length: 99999999999\r\n", b""), too_large),
        ("cl_usize_max", post("Content-Length: 18446744073709551615\r\n", b""), too_large),
        ("cl_space_before_colon", post("Content-Length : 2\r\n", b"{}"), bad),
        (
            "chunk_size_overflow",
            post("Transfer-Encoding: chunked\r\n", b"1\r\na\r\nFFFFFFFFFFFFFFFF\r\naaaa\r\n0\r\n\r\n"),
            too_large,
        ),
        ("chunk_size_over_cap", post("Transfer-Encoding: chunked\r\n", b"100001\r\n"), too_large),
        ("chunk_size_not_hex", post("Transfer-Encoding: chunked\r\n", b"zz\r\n"), bad),
        ("chunk_size_signed", post("Transfer-Encoding: chunked\r\n", b"+2\r\n{}\r\n0\r\n\r\n"), bad),
        ("chunk_without_crlf", post("Transfer-Encoding: chunked\r\n", b"2\r\n{}XX0\r\n\r\n"), bad),
        ("chunk_line_bare_lf", post("Transfer-Encoding: chunked\r\n", b"2\n{}\r\n0\r\n\r\n"), bad),
        ("header_bomb_many", get(b"/healthz", &many_headers), Refuse(431, "headers_too_large")),
        ("header_bomb_long", get(b"/healthz", &long_header), Refuse(431, "headers_too_large")),
        ("header_not_utf8", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Bytes: \xff\xfe\r\n\r\n".to_vec(), bad),
        ("path_not_utf8", get(b"/health\xffz", ""), bad),
        ("nul_in_path", get(b"/health\0z", ""), bad),
        ("control_byte_in_header", get(b"/healthz", "X-Ctl: a\x01b\r\n"), bad),
        ("obs_fold_header", get(b"/healthz", "X-Folded: a\r\n b\r\n"), bad),
        ("http_0_9", b"GET /healthz\r\n\r\n".to_vec(), bad),
        ("http2_preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(), Refuse(505, "http_version")),
        ("absolute_form_target", get(b"http://x/healthz", ""), bad),
        ("asterisk_form_target", b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), bad),
        ("garbage_request_line", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n".to_vec(), bad),
        (
            "expect_continue_refused_body",
            post("Expect: 100-continue\r\nContent-Length: 2000000\r\n", b""),
            too_large,
        ),
        ("vanish_mid_head", b"GET /healthz HTTP/1.1\r\nHost:".to_vec(), Close),
        ("vanish_mid_body", post(&format!("Content-Length: {}\r\n", body.len()), &body[..5]), Close),
        ("vanish_mid_chunk", post("Transfer-Encoding: chunked\r\n", b"10\r\nabc"), Close),
    ]
}

/// The cases whose client goes away after its bytes (it shuts its sending side): the server
/// sees the end of the request stream and must close.
fn is_vanishing(name: &str) -> bool {
    name.starts_with("vanish_")
}

#[test]
fn framing_and_parsing_attacks_are_refused_before_any_route_runs() {
    let dir = temp_dir("hostile-framing");
    let s = Server::start(exe(), dir.path(), &[]);
    let baseline = gauge_and_head(&s);
    let cases = framing_cases();
    assert!(cases.len() >= 30, "{} cases", cases.len());
    for (name, bytes, expect) in cases {
        let raw = if is_vanishing(name) {
            let mut c = TcpStream::connect(s.addr).expect("connect");
            c.set_read_timeout(Some(ANSWER_TIMEOUT)).expect("a read timeout");
            c.write_all(&bytes).expect("send");
            c.shutdown(std::net::Shutdown::Write).expect("half-close");
            read_to_close(&mut c)
        } else {
            exchange(s.addr, &bytes)
        };
        assert_answer(name, &raw, expect);
        assert_unharmed(&s, name, baseline);
    }
}

#[test]
fn pipelined_and_well_framed_requests_are_all_answered_in_order() {
    let dir = temp_dir("hostile-pipeline");
    let s = Server::start(exe(), dir.path(), &[]);
    let baseline = gauge_and_head(&s);
    // Three requests in one write: a chunked POST without a token (its body is read whole,
    // then auth refuses it), then two GETs, the last asking to close.
    let mut bytes = post("Transfer-Encoding: chunked\r\n", b"2\r\n{}\r\n0\r\nX-Trailer: t\r\n\r\n");
    bytes.extend_from_slice(&get(b"/healthz", ""));
    bytes.extend_from_slice(&get(b"/healthz", "Connection: close\r\n"));
    let got = responses(&exchange(s.addr, &bytes));
    let statuses: Vec<u16> = got.iter().map(|(status, _)| *status).collect();
    assert_eq!(statuses, [401, 200, 200]);
    assert_unharmed(&s, "pipelined", baseline);

    // A body announced with Expect: 100-continue and accepted gets the interim answer first.
    let mut c = TcpStream::connect(s.addr).expect("connect");
    c.set_read_timeout(Some(ANSWER_TIMEOUT)).expect("a read timeout");
    c.write_all(&post("Expect: 100-continue\r\nContent-Length: 2\r\nConnection: close\r\n", b""))
        .expect("send");
    let mut interim = Vec::new();
    let mut byte = [0u8; 1];
    while !interim.ends_with(b"\r\n\r\n") {
        c.read_exact(&mut byte).expect("the interim answer");
        interim.push(byte[0]);
    }
    let interim = String::from_utf8_lossy(&interim).to_ascii_lowercase();
    assert!(interim.starts_with("http/1.1 100 continue\r\n"), "{interim}");
    assert!(!interim.contains("content-length") && !interim.contains("transfer-encoding"), "{interim}");
    c.write_all(b"{}").expect("the body");
    assert_eq!(responses(&read_to_close(&mut c)).first().map(|r| r.0), Some(401));
    assert_unharmed(&s, "expect_continue_accepted", baseline);
}

#[test]
fn a_client_that_vanishes_mid_response_costs_nothing() {
    let dir = temp_dir("hostile-vanish");
    let s = Server::start(exe(), dir.path(), &[]);
    let baseline = gauge_and_head(&s);
    let admin = token("root", true);
    for _ in 0..20 {
        let mut c = TcpStream::connect(s.addr).expect("connect");
        let req =
            format!("GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {admin}\r\n\r\n").repeat(50);
        c.write_all(req.as_bytes()).expect("send");
        let mut first = [0u8; 1];
        let _ = c.read(&mut first);
        drop(c);
    }
    assert_unharmed(&s, "vanish_mid_response", baseline);
}

/// Slowloris (a head two bytes a second) and a dribbled body: each is answered 408 with a
/// JSON error and closed when its deadline (head, then body) passes, without holding its slot.
#[test]
fn slow_heads_and_dribbled_bodies_are_cut_off_at_the_deadline() {
    let dir = temp_dir("hostile-slow");
    let s = Server::start(
        exe(),
        dir.path(),
        &[("ATELIER_HEADER_TIMEOUT_MS", "1500"), ("ATELIER_BODY_TIMEOUT_MS", "1500")],
    );
    let baseline = gauge_and_head(&s);
    let dribble = |name: &str, bytes: Vec<u8>, gap: Duration| {
        let mut c = TcpStream::connect(s.addr).expect("connect");
        let started = Instant::now();
        let mut closed = false;
        for b in bytes {
            if c.write_all(&[b]).is_err() {
                closed = true;
                break;
            }
            std::thread::sleep(gap);
            if started.elapsed() > Duration::from_secs(6) {
                break;
            }
        }
        c.set_read_timeout(Some(ANSWER_TIMEOUT)).expect("a read timeout");
        let raw = read_to_close(&mut c);
        if !(closed && raw.is_empty()) {
            assert_answer(name, &raw, Expect::Refuse(408, "request_timeout"));
        }
        assert!(started.elapsed() < Duration::from_secs(8), "{name}: closed near the deadline");
        assert_unharmed(&s, name, baseline);
    };
    dribble("slowloris", get(b"/healthz", "X-Slow: aaaaaaaaaaaaaaaaaaaa\r\n"), Duration::from_millis(500));
    let mut body = post("Content-Length: 40\r\n", b"");
    body.extend_from_slice(&[b' '; 40]);
    let head_len = body.len() - 40;
    let mut c = TcpStream::connect(s.addr).expect("connect");
    c.write_all(&body[..head_len]).expect("the head");
    let started = Instant::now();
    for b in &body[head_len..] {
        if c.write_all(&[*b]).is_err() || started.elapsed() > Duration::from_secs(6) {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    c.set_read_timeout(Some(ANSWER_TIMEOUT)).expect("a read timeout");
    let raw = read_to_close(&mut c);
    assert_answer("dribbled_body", &raw, Expect::Refuse(408, "request_timeout"));
    assert!(started.elapsed() < Duration::from_secs(4), "dribbled_body: cut off at the body deadline");
    assert_unharmed(&s, "dribbled_body", baseline);
}

/// Postmortem: a chunk size of FFFFFFFFFFFFFFFF after a 1-byte chunk wrapped the body length,
/// the connection thread panicked, and its slot was never given back: with a cap of 5, six
/// such requests (no token needed) left the server answering 503 to everyone.
#[test]
fn chunk_overflow_requests_never_use_up_the_connection_slots() {
    let dir = temp_dir("hostile-slots");
    let s = Server::start(exe(), dir.path(), &[("ATELIER_MAX_CONNECTIONS", "5")]);
    let baseline = gauge_and_head(&s);
    for i in 0..8 {
        let raw =
            exchange(s.addr, &post("Transfer-Encoding: chunked\r\n", b"1\r\na\r\nFFFFFFFFFFFFFFFF\r\n"));
        assert_answer(&format!("chunk_overflow_{i}"), &raw, Expect::Refuse(413, "body_too_large"));
        assert_unharmed(&s, "chunk_overflow", baseline);
    }
    assert_eq!(s.get("/healthz", None).status, 200);
}

#[test]
fn one_address_beyond_its_cap_gets_503_and_retry_after() {
    let dir = temp_dir("hostile-per-ip");
    let s = Server::start(exe(), dir.path(), &[("ATELIER_MAX_CONNECTIONS_PER_IP", "4")]);
    let baseline = gauge_and_head(&s);
    // The server gives a slot back once the connection's thread is done, which can be after
    // the client has read the whole answer: wait until no connection from 127.0.0.1 is left
    // (the asking connection alone is open), or the first of the held four may be refused.
    let alone = wait_for(SETTLE_TIME, || (gauge_from(&s, OTHER_LOOPBACK) == 1).then_some(()));
    assert!(alone.is_some(), "the baseline's own connection is closed");
    let held: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(s.addr).expect("connect")).collect();
    // A connect returns once the kernel has the connection, before the server accepts it:
    // wait until the server counts all four, asking from another loopback address (whose
    // connections count against a cap of their own), then the next one from 127.0.0.1 must
    // be refused at once. Retrying that next one until a 503 came hid why it did not.
    let mut open = 0;
    let counted = wait_for(SETTLE_TIME, || {
        open = gauge_from(&s, OTHER_LOOPBACK);
        (open > baseline.0 + 3).then_some(())
    });
    assert!(counted.is_some(), "the four held connections are counted: the gauge shows {open}");
    let r = request(s.addr, "GET", "/healthz", None, &[], None);
    assert_eq!(r.status, 503, "the fifth connection from one address is refused: {}", r.text());
    assert_eq!(r.code(), "over_capacity");
    assert_eq!(r.header("Retry-After"), Some("1"));
    assert_eq!(request_from(&s, OTHER_LOOPBACK, "/healthz", None).0, 200, "another address is served");
    drop(held);
    let back = wait_for(Duration::from_secs(5), || (s.get("/healthz", None).status == 200).then_some(()));
    assert!(back.is_some(), "served again once the held connections close");
    assert_unharmed(&s, "per_ip_cap", baseline);
}

/// A loopback address other than 127.0.0.1 (Linux routes all of 127/8 to `lo`).
const OTHER_LOOPBACK: std::net::Ipv4Addr = std::net::Ipv4Addr::new(127, 0, 0, 2);

/// One `Connection: close` GET from the local address `from`: the status and the raw bytes.
fn request_from(s: &Server, from: std::net::Ipv4Addr, path: &str, token: Option<&str>) -> (u16, Vec<u8>) {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("a socket");
    socket.bind(&SocketAddr::from((from, 0)).into()).expect("bind the source address");
    socket.connect(&s.addr.into()).expect("connect");
    let mut c: TcpStream = socket.into();
    c.set_read_timeout(Some(ANSWER_TIMEOUT)).expect("a read timeout");
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let head = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n");
    c.write_all(head.as_bytes()).expect("send");
    let raw = read_to_close(&mut c);
    (responses(&raw).first().map_or(0, |(status, _)| *status), raw)
}

/// The connection gauge (this request's own connection included), asked from `from`.
fn gauge_from(s: &Server, from: std::net::Ipv4Addr) -> u64 {
    let (_, raw) = request_from(s, from, "/metrics", Some(&token("root", true)));
    let text = String::from_utf8_lossy(&raw);
    text.lines()
        .find_map(|l| l.strip_prefix("atelier_http_connections "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Behind a trusted reverse proxy every connection comes from the proxy's address: each one
/// counts against the client its request's `X-Forwarded-For` names instead. From a peer that is
/// not trusted the header is ignored (a client cannot pick the address it is counted as).
#[test]
fn behind_a_trusted_proxy_the_cap_is_per_forwarded_client() {
    let open = |s: &Server, client: &str| -> (TcpStream, u16) {
        let mut c = TcpStream::connect(s.addr).expect("connect");
        c.set_read_timeout(Some(ANSWER_TIMEOUT)).expect("a read timeout");
        let alice = token("alice", false);
        let head = format!(
            "GET /api/commissions/user/alice/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice}\r\nX-Forwarded-For: {client}\r\n\r\n"
        );
        c.write_all(head.as_bytes()).expect("send");
        let mut status = [0u8; 12];
        let got =
            c.read_exact(&mut status).map(|_| String::from_utf8_lossy(&status[9..12]).parse().unwrap_or(0));
        (c, got.unwrap_or(0))
    };
    let dir = temp_dir("hostile-proxy");
    let s = Server::start(
        exe(),
        dir.path(),
        &[("ATELIER_MAX_CONNECTIONS_PER_IP", "2"), ("ATELIER_TRUSTED_PROXIES", "127.0.0.1, ::1")],
    );
    let (a1, st1) = open(&s, "198.51.100.7");
    let (a2, st2) = open(&s, "198.51.100.7");
    let (_a3, st3) = open(&s, "198.51.100.7");
    assert_eq!((st1, st2, st3), (200, 200, 503), "two streams for one forwarded client, then 503");
    let (b1, st4) = open(&s, "198.51.100.8");
    assert_eq!(st4, 200, "another client behind the same proxy is not held back");
    drop((a1, a2, b1));

    let dir = temp_dir("hostile-untrusted");
    let s = Server::start(exe(), dir.path(), &[("ATELIER_MAX_CONNECTIONS_PER_IP", "2")]);
    let held: Vec<(TcpStream, u16)> = (0..2).map(|i| open(&s, &format!("198.51.100.{i}"))).collect();
    assert!(held.iter().all(|(_, st)| *st == 200));
    let (_c, st) = open(&s, "198.51.100.99");
    assert_eq!(st, 503, "an untrusted peer's X-Forwarded-For does not buy it another slot");
}

/// 20,000 connection attempts as fast as four threads can make them (each reset at once, so
/// the client side keeps no ports in TIME_WAIT), bounded in time; then the server serves
/// and holds no slot for any of them.
#[test]
fn a_burst_of_connection_attempts_leaves_the_server_serving() {
    const ATTEMPTS: usize = 20_000;
    const THREADS: usize = 4;
    const BURST_TIME_MAX: Duration = Duration::from_secs(20);
    let dir = temp_dir("hostile-burst");
    let s = Server::start(exe(), dir.path(), &[]);
    let baseline = gauge_and_head(&s);
    let addr = s.addr;
    let started = Instant::now();
    let made: usize = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                scope.spawn(move || {
                    let mut made = 0;
                    for i in 0..ATTEMPTS / THREADS {
                        if started.elapsed() > BURST_TIME_MAX {
                            break;
                        }
                        let Ok(mut c) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
                            continue;
                        };
                        made += 1;
                        if (i + t) % 64 == 0 {
                            let _ = c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
                        }
                        reset_on_drop(&c);
                    }
                    made
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().expect("a burst thread")).sum()
    });
    assert!(made > ATTEMPTS / 10, "only {made} connections were made");
    assert_unharmed(&s, "burst", baseline);
}

/// SO_LINGER with a zero timeout: closing sends a reset and leaves no TIME_WAIT behind.
fn reset_on_drop(c: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt reads a plain struct of the size given, on a socket we own.
    unsafe {
        libc::setsockopt(
            c.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::addr_of!(linger).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::linger>())
                .expect("invariant: a small struct"),
        );
    }
}
