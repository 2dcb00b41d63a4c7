//! The PostgreSQL backend's benchmark: durable appends/s with 64 appenders (each append one
//! new commission, acknowledged after its commit), against what the same server does with
//! pgbench inserting one row per transaction from 64 clients, in the same run; then the rate
//! at which `replay --check` folds the log. The server is this run's own, with `fsync=on` and
//! `synchronous_commit=on`.
//!
//!     cargo run --release -p atelier-storage --example bench-pg -- [--seconds S] [--appenders N]

#[path = "../tests/common.rs"]
mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use atelier_pg_harness::{find_bin_dir, PgServer, PG_TEST_ROLE};
use atelier_storage::{create, EventStore, PgConfig, PgStore};
use common::{ctx, new_commission};

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.into())
}

fn main() {
    let seconds: u64 = arg("--seconds", "10").parse().expect("--seconds: a whole number");
    let appenders: usize = arg("--appenders", "64").parse().expect("--appenders: a count");
    let server = PgServer::start_with(&[("fsync", "on"), ("synchronous_commit", "on")]);

    let url = server.fresh_database("bench_atelier");
    let store = PgStore::open(PgConfig::new(url.clone())).expect("open the store");
    let (rate, acked) = durable_appends(&store, appenders, Duration::from_secs(seconds));
    let (groups, grouped) = store.group_commit_totals();
    println!(
        "atelier PgStore durable appends, {appenders} appenders: {rate:.0}/s ({acked} in {seconds} s, mean group {:.1})",
        grouped as f64 / groups.max(1) as f64
    );

    let tps = pgbench(&server, appenders, seconds);
    println!("pgbench one-row insert per transaction, {appenders} clients: {tps:.0} tps");
    println!("ratio atelier / pgbench: {:.2}", rate / tps);

    let started = Instant::now();
    let report = store.replay_check().expect("replay --check");
    let elapsed = started.elapsed().as_secs_f64();
    assert!(report.diff.is_empty(), "{:?}", report.diff);
    println!(
        "replay --check: {} events in {elapsed:.2} s = {:.0} events/s",
        report.events,
        report.events as f64 / elapsed
    );
}

fn durable_appends(store: &Arc<PgStore>, appenders: usize, run: Duration) -> (f64, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..appenders)
        .map(|_| {
            let (store, stop, acked) = (store.clone(), stop.clone(), acked.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    create(&*store, new_commission("bench", None), &ctx(1))
                        .expect("append")
                        .expect("accepted");
                    acked.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    // A second of warm-up (connections, plans), then the measured window.
    std::thread::sleep(Duration::from_secs(1));
    let (from, started) = (acked.load(Ordering::Relaxed), Instant::now());
    std::thread::sleep(run);
    let n = acked.load(Ordering::Relaxed) - from;
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("an appender");
    }
    (n as f64 / elapsed, n)
}

fn pgbench(server: &PgServer, clients: usize, seconds: u64) -> f64 {
    let url = server.fresh_database("bench_pgbench");
    let db = url.rsplit('/').next().expect("a database").to_string();
    server.psql(&db, "CREATE TABLE t (id bigserial PRIMARY KEY, v int NOT NULL)");
    let script = std::env::temp_dir().join(format!("atelier-pgbench-{}.sql", std::process::id()));
    std::fs::write(&script, "INSERT INTO t (v) VALUES (1);\n").expect("write the pgbench script");
    let bin = find_bin_dir().expect("PostgreSQL's programs");
    let out = Command::new(bin.join("pgbench"))
        .args(["-n", "-c", &clients.to_string(), "-j", "2", "-T", &seconds.to_string(), "-f"])
        .arg(&script)
        .arg("-h")
        .arg(server.socket_dir())
        .args(["-U", PG_TEST_ROLE, &db])
        .output()
        .expect("run pgbench");
    let _ = std::fs::remove_file(&script);
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("tps = ")?.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("pgbench: {text}{}", String::from_utf8_lossy(&out.stderr)))
}
