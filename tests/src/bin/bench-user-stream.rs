//! A big user's history against everyone else: one user ("big") has `--commissions` (20,000)
//! commissions; `--streams` (8) of their streams open from the start at once and read the whole
//! history, `--rounds` (5) times one after another, while another user makes one request after
//! another (GET of their own commission). Reports that other user's latency (p50, p99, max)
//! while the streams replay, beside the same with no streams open, and how long a round of
//! streams took (the median round).
//!
//! Usage: bench-user-stream [--exe target/release/atelier] [--commissions 20000] [--streams 8]
//!        [--rounds 5] [--runs 3]
//!
//! Prints one line per run and the medians over runs, then one JSON line (the last line).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use atelier_tests::{json, request, temp_dir, token, Server, Value, NO_SHARE_LIMITS};

/// Threads creating the big user's commissions.
const CREATE_THREADS: usize = 16;
/// Requests the other user makes with no stream open, for the idle figure.
const IDLE_REQUESTS: usize = 300;

struct Args {
    exe: PathBuf,
    commissions: usize,
    streams: usize,
    rounds: usize,
    runs: usize,
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
        commissions: num("--commissions", 20_000),
        streams: num("--streams", 8),
        rounds: num("--rounds", 5),
        runs: num("--runs", 3),
    }
}

fn queued(user: &str) -> Value {
    json!({"context": {"title": "x"}, "pipeline": "noop", "scheduled_for": "2099-01-01T00:00:00Z", "user_id": user})
}

/// Creates `n` commissions for `user` (as an admin), from several threads.
fn create_many(addr: SocketAddr, user: &str, n: usize) {
    let admin = token("root", true);
    std::thread::scope(|scope| {
        for t in 0..CREATE_THREADS {
            let (admin, body) = (admin.clone(), queued(user).to_string());
            scope.spawn(move || {
                let headers = [("Content-Type", "application/json")];
                for _ in (t..n).step_by(CREATE_THREADS) {
                    let r = request(
                        addr,
                        "POST",
                        "/api/commissions",
                        Some(&admin),
                        &headers,
                        Some(body.as_bytes()),
                    );
                    assert_eq!(r.status, 201, "create: {}", r.text());
                }
            });
        }
    });
}

/// Opens a user's stream from the start and reads it until `events` events arrived.
fn read_history(addr: SocketAddr, user: &str, tok: &str, events: usize) -> Duration {
    let started = Instant::now();
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(600))).unwrap();
    let head = format!(
        "GET /api/commissions/user/{user}/stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {tok}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).unwrap();
    let mut reader = BufReader::with_capacity(64 * 1024, s);
    let mut line = String::new();
    let mut seen = 0;
    while seen < events {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            panic!("the stream ended after {seen} of {events} events");
        }
        if line.starts_with("id: ") {
            seen += 1;
        }
    }
    started.elapsed()
}

/// One GET of the other user's commission; its latency.
fn one_request(addr: SocketAddr, path: &str, tok: &str) -> Duration {
    let t = Instant::now();
    let r = request(addr, "GET", path, Some(tok), &[], None);
    assert_eq!(r.status, 200, "{}", r.text());
    t.elapsed()
}

fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Run {
    idle_p99_ms: f64,
    busy_p50_ms: f64,
    busy_p99_ms: f64,
    busy_max_ms: f64,
    requests: usize,
    streams_s: f64,
}

fn run(args: &Args) -> Run {
    let dir = temp_dir("bench-user-stream");
    let mut env = vec![("ATELIER_DURABILITY", "periodic"), ("RUST_LOG", "warn")];
    env.extend(NO_SHARE_LIMITS);
    let s = Server::start(&args.exe, dir.path(), &env);
    create_many(s.addr, "big", args.commissions);
    let other = token("other", false);
    let id = s.create(&other, queued("other"))["task_id"].as_u64().unwrap();
    let path = format!("/api/commissions/{id}");

    let mut idle: Vec<Duration> = (0..IDLE_REQUESTS).map(|_| one_request(s.addr, &path, &other)).collect();
    idle.sort();

    let big = token("big", false);
    let mut busy = Vec::new();
    let mut rounds = Vec::new();
    for _ in 0..args.rounds {
        let done = Arc::new(AtomicBool::new(false));
        let t0 = Instant::now();
        std::thread::scope(|scope| {
            let readers: Vec<_> = (0..args.streams)
                .map(|_| {
                    let big = big.clone();
                    scope.spawn(move || read_history(s.addr, "big", &big, args.commissions))
                })
                .collect();
            let watcher = {
                let done = done.clone();
                scope.spawn(move || {
                    for r in readers {
                        r.join().expect("a stream reader");
                    }
                    done.store(true, Ordering::SeqCst);
                })
            };
            while !done.load(Ordering::SeqCst) {
                busy.push(one_request(s.addr, &path, &other));
            }
            watcher.join().unwrap();
        });
        rounds.push(t0.elapsed().as_secs_f64());
    }
    let streams_s = median(rounds);
    busy.sort();
    s.stop();
    Run {
        idle_p99_ms: percentile_ms(&idle, 0.99),
        busy_p50_ms: percentile_ms(&busy, 0.50),
        busy_p99_ms: percentile_ms(&busy, 0.99),
        busy_max_ms: busy.last().map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0),
        requests: busy.len(),
        streams_s,
    }
}

fn main() {
    let args = parse_args();
    println!(
        "{} commissions of one user, {} streams from the start; another user's GET latency (exe {})",
        args.commissions,
        args.streams,
        args.exe.display()
    );
    let mut runs = Vec::new();
    for i in 0..args.runs {
        let r = run(&args);
        println!(
            "run {i}: idle p99 {:.2} ms | during the streams: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms over {} requests | streams done in {:.2} s",
            r.idle_p99_ms, r.busy_p50_ms, r.busy_p99_ms, r.busy_max_ms, r.requests, r.streams_s
        );
        runs.push(r);
    }
    let m = |f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
    let (idle, p50, p99, max, secs) = (
        m(|r| r.idle_p99_ms),
        m(|r| r.busy_p50_ms),
        m(|r| r.busy_p99_ms),
        m(|r| r.busy_max_ms),
        m(|r| r.streams_s),
    );
    println!("median: idle p99 {idle:.2} ms | busy p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms | streams {secs:.2} s");
    println!(
        "{}",
        json!({"commissions": args.commissions, "streams": args.streams, "runs": args.runs,
            "idle_p99_ms": idle, "busy_p50_ms": p50, "busy_p99_ms": p99, "busy_max_ms": max, "streams_s": secs})
    );
}
