//! HTTPS on the server's own TLS (ATELIER_TLS_CERT / ATELIER_TLS_KEY): a self-signed
//! certificate made per test and a real TLS client (rustls) that trusts only it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use atelier_tests::{temp_dir, token, Server};
use serde_json::{json, Value};

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_atelier"))
}

/// A certificate for 127.0.0.1 and localhost, and its key, written as PEM files in `dir`.
fn certificate(dir: &Path) -> (PathBuf, PathBuf, Vec<u8>) {
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let rcgen::CertifiedKey { cert, key_pair } =
        rcgen::generate_simple_self_signed(names).expect("a self-signed certificate");
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key_pair.serialize_pem()).unwrap();
    (cert_path, key_path, cert.der().to_vec())
}

fn client_config(cert_der: &[u8]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from(cert_der.to_vec())).expect("the test's root");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

fn connect(addr: SocketAddr, config: &Arc<rustls::ClientConfig>) -> Tls {
    let tcp = TcpStream::connect(addr).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap().to_owned();
    let conn = rustls::ClientConnection::new(config.clone(), name).expect("a TLS client");
    rustls::StreamOwned::new(conn, tcp)
}

/// One request over a fresh TLS connection (`Connection: close`): status and body.
fn exchange(addr: SocketAddr, config: &Arc<rustls::ClientConfig>, head: &str, body: &[u8]) -> (u16, Value) {
    let text = exchange_raw(addr, config, head, body);
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// One request over a fresh TLS connection (`Connection: close`): the whole response.
fn exchange_raw(addr: SocketAddr, config: &Arc<rustls::ClientConfig>, head: &str, body: &[u8]) -> String {
    let mut tls = connect(addr, config);
    let mut out =
        format!("{head}Host: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n", body.len())
            .into_bytes();
    out.extend_from_slice(body);
    tls.write_all(&out).expect("send over TLS");
    let mut raw = Vec::new();
    // A peer that closes without close_notify is an error to rustls; what arrived is kept.
    let _ = tls.read_to_end(&mut raw);
    String::from_utf8_lossy(&raw).into_owned()
}

/// Reads SSE events (id, event name) until the stream ends or `stop` says so.
fn events(reader: &mut BufReader<Tls>, stop: impl Fn(&str) -> bool) -> Vec<(u64, String)> {
    let (mut out, mut id, mut line) = (Vec::new(), None, String::new());
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return out,
            Ok(_) => {}
        }
        if let Some(v) = line.trim_end().strip_prefix("id: ") {
            id = v.parse().ok();
        } else if let Some(name) = line.trim_end().strip_prefix("event: ") {
            out.push((id.expect("an id before the event"), name.to_string()));
            if stop(name) {
                return out;
            }
        }
    }
}

fn open_stream(
    addr: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
    path: &str,
    token: &str,
    after: Option<u64>,
) -> BufReader<Tls> {
    let mut tls = connect(addr, config);
    let mut head = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nAccept: text/event-stream\r\nAuthorization: Bearer {token}\r\n"
    );
    if let Some(id) = after {
        head.push_str(&format!("Last-Event-ID: {id}\r\n"));
    }
    head.push_str("\r\n");
    tls.write_all(head.as_bytes()).expect("send over TLS");
    let mut reader = BufReader::new(tls);
    let mut status = String::new();
    reader.read_line(&mut status).expect("the status line");
    assert!(status.starts_with("HTTP/1.1 200 "), "{status:?}");
    reader
}

/// The server's CPU time so far (user + system), from /proc.
fn cpu_time(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the server's stat");
    let fields: Vec<&str> = stat.rsplit_once(')').expect("stat").1.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf only reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz.max(1))
}

#[test]
fn https_serves_the_api_and_streams_that_resume() {
    let dir = temp_dir("tls-api");
    let (cert, key, der) = certificate(dir.path());
    let data = dir.path().join("data");
    let s = Server::start(
        exe(),
        &data,
        &[("ATELIER_TLS_CERT", cert.to_str().unwrap()), ("ATELIER_TLS_KEY", key.to_str().unwrap())],
    );
    assert!(s.sign_in_line.contains("https://"), "the sign-in link is https: {}", s.sign_in_line);
    let config = client_config(&der);
    assert_eq!(exchange(s.addr, &config, "GET /healthz HTTP/1.1\r\n", b"").0, 200);

    let alice = token("alice", false);
    let body = json!({"context": {"title": "over TLS"}, "pipeline": "noop"}).to_string();
    let head = format!("POST /api/commissions HTTP/1.1\r\nAuthorization: Bearer {alice}\r\nContent-Type: application/json\r\n");
    let (status, created) = exchange(s.addr, &config, &head, body.as_bytes());
    assert_eq!(status, 201, "{created}");
    let id = created["task_id"].as_u64().expect("an id");

    // The whole stream to its terminal event, then resumed after its first event.
    let path = format!("/api/progress/{id}/stream");
    let terminal = |name: &str| matches!(name, "completed" | "failed" | "cancelled");
    let all = events(&mut open_stream(s.addr, &config, &path, &alice, None), terminal);
    assert!(all.len() >= 3, "the commission's events over TLS: {all:?}");
    assert!(terminal(&all.last().unwrap().1), "{all:?}");
    let resumed = events(&mut open_stream(s.addr, &config, &path, &alice, Some(all[0].0)), terminal);
    assert_eq!(resumed, all[1..].to_vec(), "resumed strictly after Last-Event-ID");
}

#[test]
fn plain_http_and_stalled_or_aborted_handshakes_cost_nothing() {
    let dir = temp_dir("tls-edges");
    let (cert, key, der) = certificate(dir.path());
    let s = Server::start(
        exe(),
        &dir.path().join("data"),
        &[
            ("ATELIER_TLS_CERT", cert.to_str().unwrap()),
            ("ATELIER_TLS_KEY", key.to_str().unwrap()),
            ("ATELIER_HEADER_TIMEOUT_MS", "1000"),
        ],
    );
    let config = client_config(&der);

    // Plain HTTP to the HTTPS port: never a plaintext answer.
    let mut plain = TcpStream::connect(s.addr).unwrap();
    plain.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    plain.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    let _ = plain.read_to_end(&mut raw);
    assert!(!raw.starts_with(b"HTTP/"), "no plaintext answer: {:?}", String::from_utf8_lossy(&raw));

    // A client that connects and never starts its handshake holds nobody up, and is closed
    // at the head deadline.
    let mut stalled = TcpStream::connect(s.addr).unwrap();
    assert_eq!(exchange(s.addr, &config, "GET /healthz HTTP/1.1\r\n", b"").0, 200);
    stalled.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = Instant::now();
    let _ = stalled.read_to_end(&mut Vec::new());
    assert!(started.elapsed() < Duration::from_secs(4), "closed at the head deadline");

    // RUSTSEC-2024-0336: close_notify right after client_hello spun rustls 0.20's complete_io
    // on the server for good. Four such clients; the server's CPU stays idle.
    let before = cpu_time(s.pid());
    let mut aborted = Vec::new();
    for _ in 0..4 {
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap().to_owned();
        let mut client = rustls::ClientConnection::new(config.clone(), name).unwrap();
        let mut hello = Vec::new();
        client.write_tls(&mut hello).unwrap();
        client.send_close_notify();
        client.write_tls(&mut hello).unwrap();
        let mut tcp = TcpStream::connect(s.addr).unwrap();
        tcp.write_all(&hello).unwrap();
        aborted.push(tcp); // kept open: the spin needed the connection to stay
    }
    std::thread::sleep(Duration::from_secs(2));
    let spent = cpu_time(s.pid()) - before;
    assert!(spent < Duration::from_millis(500), "the server spent {spent:?} of CPU on 4 aborted handshakes");
    assert_eq!(exchange(s.addr, &config, "GET /healthz HTTP/1.1\r\n", b"").0, 200);
    drop(aborted);
}

#[test]
fn a_certificate_without_its_key_or_a_bad_key_stops_the_start() {
    let dir = temp_dir("tls-refused");
    let (cert, _key, _) = certificate(dir.path());
    let run = |env: &[(&str, &str)]| {
        let mut cmd = std::process::Command::new(exe());
        cmd.arg("serve")
            .env("ATELIER_LISTEN", "127.0.0.1:0")
            .env("ATELIER_DATA_DIR", dir.path().join("data"))
            .env("ATELIER_SECRET", atelier_tests::SECRET)
            .env("ATELIER_WORKER_USER", atelier_tests::current_uid().to_string())
            .env("ATELIER_ALLOW_ROOT_WORKERS", "true")
            .stdin(std::process::Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("run atelier serve");
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, stderr) = run(&[("ATELIER_TLS_CERT", cert.to_str().unwrap())]);
    assert_ne!(code, Some(0));
    assert!(stderr.contains("ATELIER_TLS_KEY"), "{stderr}");
    let not_a_key = dir.path().join("not-a-key.pem");
    std::fs::write(&not_a_key, "not PEM").unwrap();
    let (code, stderr) = run(&[
        ("ATELIER_TLS_CERT", cert.to_str().unwrap()),
        ("ATELIER_TLS_KEY", not_a_key.to_str().unwrap()),
    ]);
    assert_ne!(code, Some(0));
    assert!(stderr.contains("TLS"), "{stderr}");
    let (code, stderr) = run(&[
        ("ATELIER_TLS_CERT", "/nonexistent/cert.pem"),
        ("ATELIER_TLS_KEY", not_a_key.to_str().unwrap()),
    ]);
    assert_ne!(code, Some(0));
    assert!(stderr.contains("/nonexistent/cert.pem"), "{stderr}");
}

/// Over HTTPS the sign-in cookie is `Secure`, and the page's origin is the `https` one: a
/// cookie-borne change from `http://` of the same host is refused.
#[test]
fn over_https_the_cookie_is_secure_and_the_origin_is_https() {
    let dir = temp_dir("tls-cookie");
    let (cert, key, der) = certificate(dir.path());
    let s = Server::start(
        exe(),
        &dir.path().join("data"),
        &[("ATELIER_TLS_CERT", cert.to_str().unwrap()), ("ATELIER_TLS_KEY", key.to_str().unwrap())],
    );
    let config = client_config(&der);
    let alice = token("alice", false);
    let signed_in =
        exchange_raw(s.addr, &config, &format!("GET /commissions/3?token={alice} HTTP/1.1\r\n"), b"");
    let cookie = signed_in.lines().find(|l| l.starts_with("Set-Cookie: ")).expect("a cookie");
    assert!(cookie.ends_with("; Secure"), "{cookie}");
    assert!(signed_in.contains("Location: /commissions/3\r\n"), "{signed_in}");

    let body = json!({"context": {"title": "by cookie"}, "pipeline": "noop", "scheduled_for": "2099-01-01T00:00:00Z"})
        .to_string();
    let post = |origin: &str| {
        let head = format!(
            "POST /api/commissions HTTP/1.1\r\nCookie: atelier_token={alice}\r\nOrigin: {origin}\r\n\
             X-Atelier-Request: 1\r\nContent-Type: application/json\r\n"
        );
        exchange(s.addr, &config, &head, body.as_bytes())
    };
    let (status, refused) = post("http://127.0.0.1");
    assert_eq!((status, refused["error"]["code"].as_str()), (403, Some("cross_origin")));
    let (status, created) = post("https://127.0.0.1");
    assert_eq!(status, 201, "{created}");
}
