//! Storage benchmark: durable appends/s at 1, 16 and 64 concurrent appenders beside sled's raw
//! no-flush insert rate measured in the same run, acknowledgement latency, replay (projection
//! rebuild) rate, and RSS after the log holds the replayed events. Each durable level also
//! reports the process CPU time (user + system) per append: on a shared machine it moves far
//! less than the rates do when other work steals the cores.
//!
//! Usage: bench-log [--seconds S] [--replay-events N] [--appenders 1,16,64] [--dir D]
//!
//! `--replay-events 0` skips the replay phase; `--appenders 64` runs only that level (handy
//! under a profiler).

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use atelier_engine::{Command, Executor, Stage};
use atelier_storage::{
    check, create, execute, AppendOutcome, AppendRequest, AppendTarget, Created, EventStore, SledStore,
    StoreConfig,
};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: &str| -> String {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
            .unwrap_or_else(|| default.to_string())
    };
    let seconds: f64 = arg("--seconds", "3").parse().expect("--seconds: a number");
    let replay_events: u64 = arg("--replay-events", "1000000").parse().expect("--replay-events: a count");
    let levels: Vec<usize> = arg("--appenders", "1,16,64")
        .split(',')
        .map(|n| n.trim().parse().expect("--appenders: comma-separated counts"))
        .collect();
    // Without --dir the run works in a fresh dir of its own, removed when `scratch` drops.
    let scratch = tempfile::Builder::new().prefix("atelier-bench-log-").tempdir().expect("temp dir");
    let base = std::path::PathBuf::from(arg("--dir", &scratch.path().display().to_string()));
    let _ = std::fs::remove_dir_all(&base);

    let raw = raw_sled_rate(&base.join("raw"), seconds);
    println!("sled raw insert (no flush, 1 thread): {raw:.0}/s");
    let mut results = Vec::new();
    for appenders in levels {
        let (rate, p50, p99, cpu_us) =
            durable_appends(&base.join(format!("a{appenders}")), appenders, seconds);
        println!(
            "durable appends, {appenders:>2} appenders: {rate:>8.0}/s  ratio to raw {:.2}  ack p50 {:.2} ms  p99 {:.2} ms  cpu {cpu_us:.1} us/append",
            rate / raw,
            p50 * 1e3,
            p99 * 1e3
        );
        results.push(serde_json::json!({"appenders": appenders, "per_s": rate.round(), "ratio_to_raw": (rate / raw * 100.0).round() / 100.0, "ack_p50_ms": p50 * 1e3, "ack_p99_ms": p99 * 1e3, "cpu_us_per_append": (cpu_us * 10.0).round() / 10.0}));
    }
    let (replay_rate, rss_mib, rss_trimmed_mib, n) =
        if replay_events > 0 { replay(&base.join("replay"), replay_events) } else { (0.0, 0.0, 0.0, 0) };
    if n > 0 {
        println!("replay (rebuild snapshots and jobs from the log, checks every checksum and the chain): {n} events at {replay_rate:.0}/s");
        println!("process RSS after writing and replaying {n} events (default cache): {rss_mib:.0} MiB");
        println!(
            "  the same after malloc_trim (freed heap of earlier phases returned): {rss_trimmed_mib:.0} MiB"
        );
    }
    println!(
        "{}",
        serde_json::json!({"raw_sled_per_s": raw.round(), "appends": results, "replay_per_s": replay_rate.round(), "replay_events": n, "rss_mib": rss_mib.round(), "rss_after_trim_mib": rss_trimmed_mib.round()})
    );
    let _ = std::fs::remove_dir_all(&base);
}

fn raw_sled_rate(dir: &std::path::Path, seconds: f64) -> f64 {
    let db =
        sled::Config::new().path(dir).cache_capacity(64 << 20).flush_every_ms(None).open().expect("sled");
    let tree = db.open_tree("raw").expect("tree");
    let value = vec![7u8; 64];
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed().as_secs_f64() < seconds {
        for _ in 0..1000 {
            n += 1;
            tree.insert(n.to_be_bytes(), value.as_slice()).expect("insert");
        }
    }
    n as f64 / started.elapsed().as_secs_f64()
}

fn ctx() -> atelier_engine::Ctx {
    atelier_engine::Ctx { now: 1, jitter_seed: 1, retry: Default::default() }
}

/// CPU time (user + system) this process has used so far.
fn process_cpu() -> Duration {
    // SAFETY: getrusage writes into the zeroed struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to an owned rusage.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    assert_eq!(rc, 0, "getrusage");
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Each appender owns a commission in its first stage and appends progress events to it,
/// one append per event, each acknowledged only once durable. Returns appends/s, ack p50 and
/// p99 (seconds) and process CPU microseconds per append over the timed part.
fn durable_appends(dir: &std::path::Path, appenders: usize, seconds: f64) -> (f64, f64, f64, f64) {
    let store = SledStore::open(StoreConfig::new(dir)).expect("open");
    let barrier = Arc::new(Barrier::new(appenders + 1));
    let threads: Vec<_> = (0..appenders)
        .map(|t| {
            let store = store.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let new = atelier_engine::NewCommission {
                    user_id: format!("u{t}"),
                    pipeline: "noop".into(),
                    priority: 0,
                    scheduled_for: None,
                    context: "{}".into(),
                    idempotency_key: None,
                    max_attempts: 3,
                };
                let Created::New(c) = create(&*store, new, &ctx()).unwrap().unwrap() else { unreachable!() };
                let job = store.allocate_job_id().unwrap();
                execute(
                    &*store,
                    c.id,
                    Command::StartJob {
                        job_id: job,
                        executor: Executor::TaskRunner,
                        job_name: "b".into(),
                        pid: None,
                    },
                    &ctx(),
                )
                .unwrap()
                .unwrap();
                let mut version = execute(
                    &*store,
                    c.id,
                    Command::EnterStage { job_id: job, stage: Stage::GeneratingIdeas },
                    &ctx(),
                )
                .unwrap()
                .unwrap()
                .version;
                let mut lat = Vec::with_capacity(100_000);
                barrier.wait();
                let started = Instant::now();
                while started.elapsed().as_secs_f64() < seconds {
                    let ev = atelier_engine::Event::Progress {
                        stage: Stage::GeneratingIdeas,
                        percent: 50,
                        message: None,
                    };
                    let t0 = Instant::now();
                    match store
                        .append(AppendRequest {
                            target: AppendTarget::Existing(c.id),
                            expected_version: version,
                            events: vec![ev],
                            at: 2,
                        })
                        .unwrap()
                    {
                        AppendOutcome::Appended { commission, .. } => version = commission.version,
                        other => panic!("{other:?}"),
                    }
                    lat.push(t0.elapsed());
                }
                (lat, started.elapsed())
            })
        })
        .collect();
    barrier.wait();
    let cpu_before = process_cpu();
    let mut all = Vec::new();
    let mut longest = Duration::ZERO;
    for t in threads {
        let (lat, el) = t.join().unwrap();
        all.extend(lat);
        longest = longest.max(el);
    }
    let cpu = process_cpu() - cpu_before;
    all.sort();
    let pct = |q: f64| all[((all.len() - 1) as f64 * q) as usize].as_secs_f64();
    let rate = all.len() as f64 / longest.as_secs_f64();
    let (commits, requests) = store.group_commit_totals();
    eprintln!(
        "  {appenders} appenders: {commits} group commits, mean batch {:.1} requests",
        requests as f64 / commits.max(1) as f64
    );
    store.close();
    (rate, pct(0.5), pct(0.99), cpu.as_secs_f64() * 1e6 / all.len() as f64)
}

/// Returns the replay rate, RSS (MiB) while the store holds the events, the same after
/// `malloc_trim`, and the number of events.
fn replay(dir: &std::path::Path, events: u64) -> (f64, f64, f64, u64) {
    let store = SledStore::open(StoreConfig::new(dir)).expect("open");
    // Fill with 64 concurrent appenders (fast via group commit): commissions of 20 events each.
    let per = events / 64;
    let threads: Vec<_> = (0..64)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                let mut written = 0;
                while written < per {
                    let new = atelier_engine::NewCommission {
                        user_id: format!("u{t}"),
                        pipeline: "noop".into(),
                        priority: 0,
                        scheduled_for: None,
                        context: r#"{"title":"A post","text":"Some words"}"#.into(),
                        idempotency_key: None,
                        max_attempts: 3,
                    };
                    let Created::New(c) = create(&*store, new, &ctx()).unwrap().unwrap() else {
                        unreachable!()
                    };
                    let mut version = c.version;
                    let job = store.allocate_job_id().unwrap();
                    let mut evs = vec![atelier_engine::Event::JobStarted {
                        attempt: 1,
                        job_id: job,
                        executor: Executor::TaskRunner,
                        job_name: "b".into(),
                        pid: None,
                    }];
                    for stage in Stage::ALL {
                        evs.push(atelier_engine::Event::StageEntered { stage });
                        for p in [25u8, 50, 75, 100] {
                            evs.push(atelier_engine::Event::Progress { stage, percent: p, message: None });
                        }
                    }
                    written += 1 + evs.len() as u64;
                    for ev in evs {
                        match store
                            .append(AppendRequest {
                                target: AppendTarget::Existing(c.id),
                                expected_version: version,
                                events: vec![ev],
                                at: 2,
                            })
                            .unwrap()
                        {
                            AppendOutcome::Appended { commission, .. } => version = commission.version,
                            other => panic!("{other:?}"),
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let started = Instant::now();
    let rebuilt = check::rebuild(&store).expect("rebuild");
    let rate = rebuilt.events as f64 / started.elapsed().as_secs_f64();
    let n = rebuilt.events;
    drop(rebuilt);
    let rss = rss_mib();
    // Informative only, measured after the figure above: most of the RSS is heap that the
    // earlier phases freed and glibc keeps; what is left after a trim is what is live.
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap pages to the OS.
    unsafe {
        libc::malloc_trim(0);
    }
    let rss_trimmed = rss_mib();
    store.close();
    (rate, rss, rss_trimmed, n)
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
        / 1024.0
}
