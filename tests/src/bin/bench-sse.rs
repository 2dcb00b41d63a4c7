//! HTTP and SSE benchmark: a tokio load generator against the real `atelier serve` on loopback.
//! It starts a fresh server (fresh data dir) for every run, so the server's pid, RSS and file
//! limit are known, and stops it at the end.
//!
//! Scenarios (`--scenario latency,hold,storm`, all by default):
//! - latency: `--streams` (100) user streams open; `--appends` (1000) commissions created one
//!   at a time, each in one user's stream. Delivery = SSE receipt − the create's HTTP 200
//!   (the server publishes before it acknowledges, so this can be negative), also shown from
//!   the request being sent and from the event's `at`.
//! - hold: `--hold` (10,000) commission streams held open: server VmRSS and threads; then one
//!   cancel to each of `--burst` (5,000) of them, `--burst-concurrency` (64) in flight;
//!   delivery of the `cancelled` event measured as above.
//! - storm: `--storm` (5,000) commission streams read their `created` event, all disconnect,
//!   every commission is cancelled, then all reconnect at once with Last-Event-ID: time until
//!   each has both missed events, and any missing, duplicated or out-of-order event.
//!
//! Usage: bench-sse [--exe target/release/atelier] [--scenario S,..] [--runs 3] [--streams 100]
//!        [--appends 1000] [--hold 10000] [--burst 5000] [--burst-concurrency 64] [--storm 5000]
//!        [--postgres-nodes N]
//!
//! `--postgres-nodes N` runs N nodes on one database of a PostgreSQL server of the bench's own
//! (pg-harness) instead of one server on sled; latency then appends on the first node and reads
//! the streams on the last, so with N ≥ 2 every event crosses nodes (append on one, SSE on
//! another, through the database's log). The other scenarios use the first node.
//!
//! Prints one line per run and the medians over runs, then one JSON line (the last line).
//! Client and server share the host clock, which the `at`-based figures rely on.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use atelier_pg_harness::PgServer;
use atelier_tests::{temp_dir, token, Server, TempDir, NO_SHARE_LIMITS};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};

/// Client-side read buffer per SSE stream; an event is ~0.5 KiB.
const STREAM_BUFFER_BYTES: usize = 2048;
/// Handshakes in flight while opening the held streams.
const OPEN_CONCURRENCY: usize = 512;
/// How long to wait for the last expected event before calling it missing.
const COLLECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Commissions that must stay queued: far in the future, so the job controller ignores them.
const SCHEDULED_FOR: &str = "2099-01-01T00:00:00Z";

struct Args {
    exe: PathBuf,
    scenarios: Vec<String>,
    runs: usize,
    streams: usize,
    appends: usize,
    hold: usize,
    burst: usize,
    burst_concurrency: usize,
    storm: usize,
    /// 0: one server on sled; N: N nodes on one PostgreSQL database.
    postgres_nodes: usize,
}

fn parse_args() -> Args {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned());
    let num = |name: &str, default: usize| {
        arg(name).map_or(default, |v| v.parse().unwrap_or_else(|_| panic!("{name}: a count")))
    };
    let exe = arg("--exe").map(PathBuf::from).unwrap_or_else(|| {
        std::env::current_exe().expect("current exe").parent().expect("exe dir").join("atelier")
    });
    Args {
        exe,
        scenarios: arg("--scenario")
            .unwrap_or_else(|| "latency,hold,storm".into())
            .split(',')
            .map(|s| s.trim().to_string())
            .collect(),
        runs: num("--runs", 1),
        streams: num("--streams", 100),
        appends: num("--appends", 1000),
        hold: num("--hold", 10_000),
        burst: num("--burst", 5_000),
        burst_concurrency: num("--burst-concurrency", 64),
        storm: num("--storm", 5_000),
        postgres_nodes: num("--postgres-nodes", 0),
    }
}

/// Raises this process's open-file limit to its hard limit; the server inherits it.
fn raise_fd_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit write to and read from a struct we own.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        lim.rlim_cur
    }
}

/// The servers of one run (one on sled, or `--postgres-nodes` on one fresh database of `pg`)
/// and their data dirs.
fn start_servers(args: &Args, pg: Option<&PgServer>) -> (Vec<Server>, Vec<TempDir>) {
    let url = pg.map(|pg| pg.fresh_database("bench_sse"));
    let (mut servers, mut dirs) = (Vec::new(), Vec::new());
    for i in 0..args.postgres_nodes.max(1) {
        let dir = temp_dir("bench-sse");
        let node_id = format!("bench-{i}");
        let mut env = vec![
            ("ATELIER_MAX_CONNECTIONS", "20000"),
            // Every stream comes from this one address.
            ("ATELIER_MAX_CONNECTIONS_PER_IP", "20000"),
            ("RUST_LOG", "warn"),
        ];
        // One user holds every stream here: the benchmark measures the server, not the shares.
        env.extend(NO_SHARE_LIMITS);
        if let Some(url) = &url {
            env.extend([("ATELIER_DATABASE_URL", url.as_str()), ("ATELIER_NODE_ID", node_id.as_str())]);
        }
        servers.push(Server::start(&args.exe, dir.path(), &env));
        dirs.push(dir);
    }
    (servers, dirs)
}

/// VmRSS (KiB) and thread count of a process.
fn proc_status(pid: i32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("Threads:"))
}

fn wall_ms() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

/// Nearest-rank percentile of a non-empty sorted slice.
fn pct(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn dist(mut v: Vec<f64>) -> Value {
    v.sort_by(f64::total_cmp);
    let r = |x: f64| (x * 1000.0).round() / 1000.0;
    json!({"n": v.len(), "p50": r(pct(&v, 50.0)), "p99": r(pct(&v, 99.0)), "max": r(v.last().copied().unwrap_or(f64::NAN))})
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn signed_ms(later: Instant, earlier: Instant) -> f64 {
    if later >= earlier {
        ms(later - earlier)
    } else {
        -ms(earlier - later)
    }
}

// ------------------------------------------------------------------ HTTP client

/// A keep-alive HTTP/1.1 connection for JSON requests.
struct Conn {
    addr: SocketAddr,
    io: Option<BufReader<TcpStream>>,
}

impl Conn {
    fn new(addr: SocketAddr) -> Conn {
        Conn { addr, io: None }
    }

    async fn post(&mut self, path: &str, token: &str, body: &str) -> std::io::Result<(u16, Value)> {
        for attempt in 0..2 {
            match self.try_post(path, token, body).await {
                Ok(r) => return Ok(r),
                // The server may close an idle keep-alive connection; retry once on a fresh one.
                Err(e) if attempt == 0 => {
                    self.io = None;
                    let _ = e;
                }
                Err(e) => return Err(e),
            }
        }
        unreachable!("invariant: the loop returns")
    }

    async fn try_post(&mut self, path: &str, token: &str, body: &str) -> std::io::Result<(u16, Value)> {
        if self.io.is_none() {
            let s = TcpStream::connect(self.addr).await?;
            s.set_nodelay(true)?;
            self.io = Some(BufReader::new(s));
        }
        let io = self.io.as_mut().expect("invariant: connected above");
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        io.get_mut().write_all(req.as_bytes()).await?;
        let (status, headers) = read_head(io).await?;
        let len = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse::<usize>().ok())
            .ok_or_else(|| std::io::Error::other("no content-length"))?;
        let mut buf = vec![0u8; len];
        io.read_exact(&mut buf).await?;
        if headers
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("connection") && v.eq_ignore_ascii_case("close"))
        {
            self.io = None;
        }
        Ok((status, serde_json::from_slice(&buf).unwrap_or(Value::Null)))
    }
}

async fn read_head(io: &mut BufReader<TcpStream>) -> std::io::Result<(u16, Vec<(String, String)>)> {
    let mut line = String::new();
    if io.read_line(&mut line).await? == 0 {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed before a response"));
    }
    let status = line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let mut headers = Vec::new();
    loop {
        line.clear();
        if io.read_line(&mut line).await? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed in the head"));
        }
        let l = line.trim_end();
        if l.is_empty() {
            return Ok((status, headers));
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
}

fn create_body(i: usize) -> String {
    json!({"context": {"bench": "sse", "i": i}, "pipeline": "noop", "scheduled_for": SCHEDULED_FOR})
        .to_string()
}

/// Creates `n` queued commissions with `concurrency` connections; returns ids in creation order.
async fn create_many(addr: SocketAddr, tok: &str, n: usize, concurrency: usize) -> Vec<u64> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let next = next.clone();
        let tok = tok.to_string();
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::new(addr);
            let mut ids = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return ids;
                }
                let (status, body) =
                    conn.post("/api/commissions", &tok, &create_body(i)).await.expect("create");
                assert_eq!(status, 201, "create: {body}");
                ids.push((i, body["task_id"].as_u64().expect("task_id")));
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("create task"));
    }
    all.sort_unstable();
    all.into_iter().map(|(_, id)| id).collect()
}

// ------------------------------------------------------------------ SSE client

/// One SSE message as the bench saw it.
#[derive(Clone, Debug)]
struct Receipt {
    stream: usize,
    id: u64,
    kind: String,
    task_id: u64,
    at_ms: f64,
    recv: Instant,
    recv_wall_ms: f64,
}

/// What a stream task reports.
enum Note {
    Opened { status: u16, at: Instant },
    Event(Receipt),
    Ended,
}

async fn open_sse(
    addr: SocketAddr,
    path: &str,
    tok: &str,
    last_event_id: Option<u64>,
) -> std::io::Result<(u16, BufReader<TcpStream>)> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let mut io = BufReader::with_capacity(STREAM_BUFFER_BYTES, s);
    // Read as lines to the close: ask for a body that runs to the close, not a chunked one.
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\nAccept: text/event-stream\r\nAuthorization: Bearer {tok}\r\n");
    if let Some(id) = last_event_id {
        req.push_str(&format!("Last-Event-ID: {id}\r\n"));
    }
    req.push_str("\r\n");
    io.get_mut().write_all(req.as_bytes()).await?;
    let (status, _) = read_head(&mut io).await?;
    Ok((status, io))
}

/// Opens a stream and forwards what it reads until it ends or the task is aborted.
/// `permit` (a handshake slot) is released once the head is read.
async fn follow(
    stream: usize,
    addr: SocketAddr,
    path: String,
    tok: String,
    last_event_id: Option<u64>,
    tx: mpsc::UnboundedSender<Note>,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
) {
    let opened = open_sse(addr, &path, &tok, last_event_id).await;
    drop(permit);
    let (status, mut io) = match opened {
        Ok(ok) => ok,
        Err(e) => {
            eprintln!("bench-sse: stream {stream} did not open: {e}");
            let _ = tx.send(Note::Opened { status: 0, at: Instant::now() });
            return;
        }
    };
    let _ = tx.send(Note::Opened { status, at: Instant::now() });
    if status != 200 {
        return;
    }
    let (mut id, mut kind, mut data) = (0u64, String::new(), String::new());
    let mut line = String::new();
    loop {
        line.clear();
        match io.read_line(&mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let l = line.trim_end_matches(['\r', '\n']);
        if l.is_empty() {
            if !data.is_empty() {
                let recv = Instant::now();
                let recv_wall_ms = wall_ms();
                let v: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
                let at_ms = v["at"]
                    .as_str()
                    .and_then(atelier_engine::time::parse_rfc3339)
                    .map_or(f64::NAN, |m| m as f64);
                let task_id = v["task_id"].as_u64().unwrap_or(0);
                let _ = tx.send(Note::Event(Receipt {
                    stream,
                    id,
                    kind: std::mem::take(&mut kind),
                    task_id,
                    at_ms,
                    recv,
                    recv_wall_ms,
                }));
                data.clear();
            }
            continue;
        }
        if let Some(v) = l.strip_prefix("id: ") {
            id = v.parse().unwrap_or(0);
        } else if let Some(v) = l.strip_prefix("event: ") {
            kind = v.to_string();
        } else if let Some(v) = l.strip_prefix("data: ") {
            data.push_str(v);
        }
    }
    let _ = tx.send(Note::Ended);
}

// ------------------------------------------------------------------ scenarios

/// Appends (creates) on `append_addr`, reads the streams on `stream_addr` (the same server, or
/// another node of the same database).
async fn latency(append_addr: SocketAddr, stream_addr: SocketAddr, streams: usize, appends: usize) -> Value {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let users: Vec<String> = (0..streams).map(|i| format!("lat{i:04}")).collect();
    let tokens: Vec<String> = users.iter().map(|u| token(u, false)).collect();
    let mut handles = Vec::new();
    for (i, (u, t)) in users.iter().zip(&tokens).enumerate() {
        handles.push(tokio::spawn(follow(
            i,
            stream_addr,
            format!("/api/commissions/user/{u}/stream"),
            t.clone(),
            None,
            tx.clone(),
            None,
        )));
    }
    let mut opened = 0;
    while opened < streams {
        match rx.recv().await.expect("stream notes") {
            Note::Opened { status, .. } => {
                assert_eq!(status, 200, "a latency stream did not open");
                opened += 1;
            }
            Note::Event(_) | Note::Ended => {}
        }
    }
    // The server registers a stream's subscription just after sending the head.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut conn = Conn::new(append_addr);
    let mut sent: HashMap<u64, (Instant, Instant)> = HashMap::new();
    let mut receipts: HashMap<u64, Receipt> = HashMap::new();
    for i in 0..appends {
        let t_send = Instant::now();
        let (status, body) =
            conn.post("/api/commissions", &tokens[i % streams], &create_body(i)).await.expect("create");
        let t_ok = Instant::now();
        assert_eq!(status, 201, "create: {body}");
        sent.insert(body["task_id"].as_u64().expect("task_id"), (t_send, t_ok));
        while let Ok(note) = rx.try_recv() {
            if let Note::Event(r) = note {
                receipts.insert(r.task_id, r);
            }
        }
    }
    let deadline = tokio::time::Instant::now() + COLLECT_TIMEOUT;
    while receipts.len() < sent.len() {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(Note::Event(r))) => {
                receipts.insert(r.task_id, r);
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    for h in handles {
        h.abort();
    }
    let (mut from_ok, mut from_send, mut from_at) = (Vec::new(), Vec::new(), Vec::new());
    for (id, (t_send, t_ok)) in &sent {
        if let Some(r) = receipts.get(id) {
            from_ok.push(signed_ms(r.recv, *t_ok));
            from_send.push(ms(r.recv - *t_send));
            from_at.push(r.recv_wall_ms - r.at_ms);
        }
    }
    json!({
        "streams": streams, "appends": appends, "missing": sent.len() - from_ok.len(),
        "delivery_after_200_ms": dist(from_ok), "delivery_after_send_ms": dist(from_send), "delivery_after_at_ms": dist(from_at),
    })
}

/// Opens one commission stream per id, at most `limit` handshakes at a time (all at once
/// without one); the tasks forward what they read to `tx`.
fn open_all(
    addr: SocketAddr,
    tok: &str,
    ids: &[u64],
    last: Option<&[u64]>,
    tx: &mpsc::UnboundedSender<Note>,
    limit: Option<usize>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let sem = limit.map(|n| Arc::new(Semaphore::new(n)));
    ids.iter()
        .enumerate()
        .map(|(i, id)| {
            let (path, tok, tx, sem) =
                (format!("/api/progress/{id}/stream"), tok.to_string(), tx.clone(), sem.clone());
            let last_id = last.map(|l| l[i]);
            tokio::spawn(async move {
                let permit = match sem {
                    Some(s) => Some(s.acquire_owned().await.expect("semaphore")),
                    None => None,
                };
                follow(i, addr, path, tok, last_id, tx, permit).await;
            })
        })
        .collect()
}

/// Waits until `n` streams reported Opened; returns (opened with 200, other statuses, last open time).
async fn await_opened(
    rx: &mut mpsc::UnboundedReceiver<Note>,
    n: usize,
    events: &mut Vec<Receipt>,
) -> (usize, usize, Option<Instant>) {
    let (mut ok, mut bad, mut last) = (0, 0, None);
    while ok + bad < n {
        match tokio::time::timeout(COLLECT_TIMEOUT, rx.recv()).await {
            Ok(Some(Note::Opened { status, at, .. })) => {
                if status == 200 {
                    ok += 1;
                } else {
                    bad += 1;
                }
                last = Some(at);
            }
            Ok(Some(Note::Event(r))) => events.push(r),
            Ok(Some(Note::Ended)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    (ok, bad, last)
}

async fn hold(addr: SocketAddr, pid: i32, n: usize, burst: usize, burst_concurrency: usize) -> Value {
    let tok = token("hold", false);
    let t0 = Instant::now();
    let ids = create_many(addr, &tok, n, 32).await;
    let create_s = t0.elapsed().as_secs_f64();
    let (rss_idle_kib, threads_idle) = proc_status(pid);

    let (tx, mut rx) = mpsc::unbounded_channel();
    let t_open = Instant::now();
    let handles = open_all(addr, &tok, &ids, None, &tx, Some(OPEN_CONCURRENCY));
    let mut early = Vec::new();
    let (ok, bad, last) = await_opened(&mut rx, n, &mut early).await;
    let open_s = last.map_or(f64::NAN, |l| (l - t_open).as_secs_f64());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss_held_kib, threads_held) = proc_status(pid);

    // The burst: one cancel to each of the first `burst` streams.
    let burst = burst.min(n);
    let next = Arc::new(AtomicUsize::new(0));
    let ids = Arc::new(ids);
    let t_burst = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..burst_concurrency {
        let (next, ids, tok) = (next.clone(), ids.clone(), tok.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::new(addr);
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= burst {
                    return out;
                }
                let t_send = Instant::now();
                let (status, body) = conn
                    .post(&format!("/api/commissions/{}/cancel", ids[i]), &tok, "")
                    .await
                    .expect("cancel");
                assert_eq!(status, 200, "cancel: {body}");
                out.push((i, t_send, Instant::now()));
            }
        }));
    }
    let mut cancelled: HashMap<usize, Receipt> = HashMap::new();
    let mut sent = Vec::new();
    for t in tasks {
        sent.extend(t.await.expect("cancel task"));
    }
    let appends_s = t_burst.elapsed().as_secs_f64();
    let deadline = tokio::time::Instant::now() + COLLECT_TIMEOUT;
    while cancelled.len() < burst {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(Note::Event(r))) if r.kind == "cancelled" => {
                cancelled.insert(r.stream, r);
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    let last_receipt = cancelled.values().map(|r| r.recv).max();
    let (rss_after_kib, threads_after) = proc_status(pid);
    for h in handles {
        h.abort();
    }
    let (mut from_ok, mut from_send, mut from_at) = (Vec::new(), Vec::new(), Vec::new());
    for (i, t_send, t_ok) in &sent {
        if let Some(r) = cancelled.get(i) {
            from_ok.push(signed_ms(r.recv, *t_ok));
            from_send.push(ms(r.recv - *t_send));
            from_at.push(r.recv_wall_ms - r.at_ms);
        }
    }
    json!({
        "streams": n, "opened": ok, "refused": bad, "open_all_s": open_s, "create_per_s": (n as f64 / create_s).round(),
        "rss_before_streams_mib": rss_idle_kib / 1024, "threads_before_streams": threads_idle,
        "rss_held_mib": rss_held_kib / 1024, "threads_held": threads_held,
        "rss_after_burst_mib": rss_after_kib / 1024, "threads_after_burst": threads_after,
        "burst": burst, "burst_concurrency": burst_concurrency, "burst_appends_s": appends_s,
        "burst_last_receipt_s": last_receipt.map_or(f64::NAN, |l| (l - t_burst).as_secs_f64()),
        "missing": burst - from_ok.len(),
        "delivery_after_200_ms": dist(from_ok), "delivery_after_send_ms": dist(from_send), "delivery_after_at_ms": dist(from_at),
    })
}

async fn storm(addr: SocketAddr, pid: i32, n: usize) -> Value {
    let tok = token("storm", false);
    let ids = create_many(addr, &tok, n, 32).await;

    // Every stream first reads its `created` event (history), then all drop at once.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let handles = open_all(addr, &tok, &ids, None, &tx, Some(OPEN_CONCURRENCY));
    let mut created: HashMap<usize, u64> = HashMap::new();
    let mut early = Vec::new();
    let (ok, _, _) = await_opened(&mut rx, n, &mut early).await;
    assert_eq!(ok, n, "storm: not every stream opened");
    for r in early {
        created.insert(r.stream, r.id);
    }
    let deadline = tokio::time::Instant::now() + COLLECT_TIMEOUT;
    while created.len() < n {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(Note::Event(r))) => {
                created.insert(r.stream, r.id);
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => {
                panic!("storm: only {} of {n} streams saw their created event", created.len())
            }
        }
    }
    for h in handles {
        h.abort();
    }
    drop(rx);

    // While they are away: both events of a cancel for every commission.
    let next = Arc::new(AtomicUsize::new(0));
    let ids = Arc::new(ids);
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (next, ids, tok) = (next.clone(), ids.clone(), tok.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::new(addr);
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= ids.len() {
                    return out;
                }
                let (status, body) = conn
                    .post(&format!("/api/commissions/{}/cancel", ids[i]), &tok, "")
                    .await
                    .expect("cancel");
                assert_eq!(status, 200, "cancel: {body}");
                out.push((i, body["last_event_id"].as_u64().expect("last_event_id")));
            }
        }));
    }
    let mut final_seq = vec![0u64; n];
    for t in tasks {
        for (i, last) in t.await.expect("cancel task") {
            final_seq[i] = last;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss_before_kib, threads_before) = proc_status(pid);

    // The storm: every client reconnects at once with its Last-Event-ID.
    let last_ids: Vec<u64> = (0..n).map(|i| created[&i]).collect();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let t_storm = Instant::now();
    let handles = open_all(addr, &tok, &ids, Some(&last_ids), &tx, None);
    drop(tx);
    let mut got: Vec<Vec<(u64, String)>> = vec![Vec::new(); n];
    let mut done_at: Vec<Option<Instant>> = vec![None; n];
    let mut refused = 0;
    let mut done = 0;
    let deadline = tokio::time::Instant::now() + COLLECT_TIMEOUT;
    while done + refused < n {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(Note::Opened { status, .. })) if status != 200 => refused += 1,
            Ok(Some(Note::Event(r))) => {
                got[r.stream].push((r.id, r.kind.clone()));
                if r.id == final_seq[r.stream] {
                    done_at[r.stream] = Some(r.recv);
                    done += 1;
                }
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    let (rss_after_kib, threads_after) = proc_status(pid);
    for h in handles {
        h.abort();
    }
    // Each must have exactly cancel_requested then cancelled, both after its Last-Event-ID.
    let (mut missing, mut extra) = (0, 0);
    for i in 0..n {
        let kinds: Vec<&str> = got[i].iter().map(|(_, k)| k.as_str()).collect();
        let ordered = got[i].windows(2).all(|w| w[0].0 < w[1].0);
        let after_last = got[i].iter().all(|(id, _)| *id > last_ids[i]);
        if kinds != ["cancel_requested", "cancelled"] || !ordered || !after_last {
            missing += ["cancel_requested", "cancelled"].iter().filter(|k| !kinds.contains(k)).count();
            extra += got[i].len().saturating_sub(2) + usize::from(!ordered || !after_last);
        }
    }
    let resumed: Vec<f64> = done_at.iter().flatten().map(|t| ms(*t - t_storm)).collect();
    json!({
        "clients": n, "refused": refused, "resumed": resumed.len(), "missing_events": missing, "extra_or_misordered": extra,
        "all_resumed_s": if resumed.len() == n { resumed.iter().copied().fold(0.0, f64::max) / 1e3 } else { f64::NAN },
        "resume_ms": dist(resumed),
        "rss_before_mib": rss_before_kib / 1024, "threads_before": threads_before,
        "rss_after_mib": rss_after_kib / 1024, "threads_after": threads_after,
    })
}

// ------------------------------------------------------------------ driver

/// The median of a numeric field over runs (by a JSON pointer).
fn median_of(runs: &[Value], pointer: &str) -> Value {
    let mut v: Vec<f64> = runs.iter().filter_map(|r| r.pointer(pointer).and_then(Value::as_f64)).collect();
    if v.is_empty() {
        return Value::Null;
    }
    v.sort_by(f64::total_cmp);
    json!(v[v.len() / 2])
}

fn summary(scenario: &str, runs: &[Value]) -> Value {
    let fields: &[&str] = match scenario {
        "latency" => &[
            "/delivery_after_200_ms/p50",
            "/delivery_after_200_ms/p99",
            "/delivery_after_send_ms/p50",
            "/delivery_after_send_ms/p99",
            "/delivery_after_at_ms/p99",
            "/missing",
        ],
        "hold" => &[
            "/opened",
            "/open_all_s",
            "/rss_held_mib",
            "/threads_held",
            "/rss_after_burst_mib",
            "/burst_appends_s",
            "/burst_last_receipt_s",
            "/delivery_after_200_ms/p50",
            "/delivery_after_200_ms/p99",
            "/delivery_after_send_ms/p99",
            "/delivery_after_at_ms/p99",
            "/missing",
        ],
        _ => &[
            "/resumed",
            "/all_resumed_s",
            "/resume_ms/p50",
            "/resume_ms/p99",
            "/missing_events",
            "/extra_or_misordered",
            "/refused",
            "/rss_after_mib",
        ],
    };
    let mut m = serde_json::Map::new();
    for f in fields {
        m.insert(f.trim_start_matches('/').replace('/', "."), median_of(runs, f));
    }
    Value::Object(m)
}

fn main() {
    let args = parse_args();
    let nofile = raise_fd_limit();
    println!("bench-sse: server {} , open-file limit {nofile} (bench and server)", args.exe.display());
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let pg = (args.postgres_nodes > 0).then(PgServer::start);
    let mut out = serde_json::Map::new();
    for scenario in &args.scenarios {
        let mut runs = Vec::new();
        for run in 0..args.runs {
            let (servers, dirs) = start_servers(&args, pg.as_ref());
            let (addr, pid) = (servers[0].addr, servers[0].pid());
            let stream_addr = servers[servers.len() - 1].addr;
            let result = rt.block_on(async {
                match scenario.as_str() {
                    "latency" => latency(addr, stream_addr, args.streams, args.appends).await,
                    "hold" => hold(addr, pid, args.hold, args.burst, args.burst_concurrency).await,
                    "storm" => storm(addr, pid, args.storm).await,
                    other => panic!("unknown scenario '{other}' (latency, hold, storm)"),
                }
            });
            for server in servers {
                server.kill();
            }
            drop(dirs);
            println!("{scenario} run {}: {result}", run + 1);
            runs.push(result);
        }
        let s = summary(scenario, &runs);
        println!("{scenario} median of {}: {s}", runs.len());
        out.insert(scenario.clone(), json!({"median": s, "runs": runs}));
    }
    println!("{}", Value::Object(out));
}
