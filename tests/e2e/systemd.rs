//! `atelier serve` under systemd's notify protocol (`Type=notify`, `WatchdogSec=`), against the
//! real binary: the test plays the service manager with a Unix datagram socket of its own in
//! `NOTIFY_SOCKET` and a `WATCHDOG_USEC`. `READY=1` comes when the server answers, watchdog
//! pings come at half the timeout and stop while the log writer (a hung fdatasync, preloaded
//! from `tests/fixtures/hang_fdatasync.c`) or the scheduler (the `test-faults` stall) is
//! stuck, and `STOPPING=1` comes on SIGTERM. And what names the running build for the one
//! who installed it: `atelier --version` and `atelier_build_info` in `/metrics`.

use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use atelier_tests::*;

/// The watchdog timeout the tests hand the server; pings are due at half of it.
const WATCHDOG_MS: u64 = 400;

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_atelier"))
}

/// One datagram from the server, and when it came.
#[derive(Clone, Debug)]
struct Note {
    at: Instant,
    text: String,
}

/// The service manager's end: every datagram the server sends, in order. Given the server's
/// address, at `READY=1` it asks `/healthz` at once, before it reads anything else, and keeps
/// the answer.
struct Manager {
    path: PathBuf,
    notes: Arc<Mutex<Vec<Note>>>,
    healthz_at_ready: Arc<Mutex<Option<u16>>>,
    _dir: TempDir,
}

impl Manager {
    fn listen(addr: Option<SocketAddr>) -> Manager {
        let dir = temp_dir("notify");
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let notes = Arc::new(Mutex::new(Vec::new()));
        let healthz_at_ready = Arc::new(Mutex::new(None));
        let (n, h) = (notes.clone(), healthz_at_ready.clone());
        // Ends when the test drops the manager (the socket's file goes with the dir, and the
        // loop stops once nobody holds the notes but this thread).
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while Arc::strong_count(&n) > 1 {
                let Ok(len) = socket.recv(&mut buf) else { continue };
                let text = String::from_utf8_lossy(&buf[..len]).into_owned();
                let at = Instant::now();
                if let Some(addr) = addr.filter(|_| text.lines().any(|l| l == "READY=1")) {
                    *h.lock().unwrap() = Some(request(addr, "GET", "/healthz", None, &[], None).status);
                }
                n.lock().unwrap().push(Note { at, text });
            }
        });
        Manager { path, notes, healthz_at_ready, _dir: dir }
    }

    /// The variables systemd hands a `Type=notify` service with `WatchdogSec=`.
    fn env(&self) -> Vec<(String, String)> {
        vec![
            ("NOTIFY_SOCKET".into(), self.path.to_str().unwrap().to_string()),
            ("WATCHDOG_USEC".into(), (WATCHDOG_MS * 1000).to_string()),
        ]
    }

    fn notes(&self) -> Vec<Note> {
        self.notes.lock().unwrap().clone()
    }

    fn when(&self, line: &str) -> Option<Instant> {
        self.notes().iter().find(|n| n.text.lines().any(|l| l == line)).map(|n| n.at)
    }

    /// When each watchdog ping came, in order.
    fn pings(&self) -> Vec<Instant> {
        self.notes().iter().filter(|n| n.text.lines().any(|l| l == "WATCHDOG=1")).map(|n| n.at).collect()
    }
}

/// A loopback address nobody listens on, for a server the test must reach the moment it says
/// it is ready (before the harness has read the address it prints).
fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// `owned` and then `extra`, as the harness takes them.
fn env_of<'a>(owned: &'a [(String, String)], extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    owned.iter().map(|(k, v)| (k.as_str(), v.as_str())).chain(extra.iter().copied()).collect()
}

fn gaps_ms(pings: &[Instant]) -> Vec<u64> {
    pings.windows(2).map(|w| w[1].duration_since(w[0]).as_millis() as u64).collect()
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

#[test]
fn ready_comes_when_the_server_answers_pings_keep_time_and_stopping_comes_on_sigterm() {
    let data = temp_dir("systemd-ready");
    let addr = free_addr();
    let m = Manager::listen(Some(addr));
    let owned = m.env();
    let server = Server::start_on(exe(), data.path(), &env_of(&owned, &[]), &addr.to_string());
    let ready = wait_for(Duration::from_secs(10), || m.when("READY=1")).expect("READY=1 arrives");
    assert_eq!(*m.healthz_at_ready.lock().unwrap(), Some(200), "/healthz answers the moment READY=1 comes");
    let first = &m.notes()[0];
    assert!(first.text.lines().any(|l| l == "READY=1"), "READY=1 comes first: {first:?}");
    assert!(
        first.text.lines().any(|l| l == format!("STATUS=serving on http://{addr}")),
        "READY=1 says where it serves: {first:?}"
    );
    std::thread::sleep(Duration::from_millis(2_000));
    let pings: Vec<Instant> = m.pings().into_iter().filter(|p| *p >= ready).collect();
    let gaps = gaps_ms(&pings);
    eprintln!("ping gaps (ms) with WATCHDOG_USEC={}000: {gaps:?}", WATCHDOG_MS);
    assert!(pings.len() >= 7, "pings every {} ms for 2 s: {gaps:?}", WATCHDOG_MS / 2);
    let mid = median(gaps.clone());
    assert!((170..=260).contains(&mid), "pings at half the watchdog timeout ({WATCHDOG_MS} ms): {gaps:?}");
    assert!(gaps.iter().all(|g| *g < WATCHDOG_MS), "no gap reaches the timeout: {gaps:?}");
    let status = server.stop();
    assert!(status.success(), "a SIGTERM stop exits 0: {status:?}");
    let stopping = wait_for(Duration::from_secs(2), || m.when("STOPPING=1")).expect("STOPPING=1 on SIGTERM");
    assert!(
        m.pings().iter().all(|p| *p < stopping),
        "no watchdog ping after STOPPING=1 (the stop is bounded by TimeoutStopSec=)"
    );
}

/// How long the tests keep a thread stuck.
const STUCK_FOR: Duration = Duration::from_millis(1_500);

/// Runs a server under the watchdog, has `stick` make one of its watched threads stuck for
/// [`STUCK_FOR`], and checks that the pings stop for most of that time and come back after
/// it, and that the log names the thread.
fn pings_stop_while_stuck(name: &str, extra: &[(&str, &str)], stick: impl FnOnce(&Server), thread: &str) {
    let data = temp_dir(name);
    // Beside the data dir, not in it (the server makes the data dir private), and removed
    // with its guard however the test ends.
    let logs = temp_dir(&format!("{name}-log"));
    let log = logs.path().join("server.log");
    let m = Manager::listen(None);
    let owned = m.env();
    let server = Server::start_logging_to(exe(), data.path(), &env_of(&owned, extra), &log);
    wait_for(Duration::from_secs(10), || m.when("READY=1")).expect("READY=1 arrives");
    stick(&server);
    // Stale after 300 ms (three beats), so the pings miss at least the rest of the stall.
    let stall_ms = STUCK_FOR.as_millis() as u64;
    let long_gap = stall_ms - 500;
    // Then they come back: a long gap with a few pings after it.
    let resumed = wait_for(Duration::from_secs(10), || {
        let gaps = gaps_ms(&m.pings());
        let at = gaps.iter().position(|g| *g >= long_gap)?;
        (gaps.len() - at >= 3).then_some(())
    });
    let gaps = gaps_ms(&m.pings());
    eprintln!("ping gaps (ms) with the {thread} stuck for {stall_ms} ms: {gaps:?}");
    assert!(resumed.is_some(), "pings stop while the {thread} is stuck and come back after: {gaps:?}");
    let longest = gaps.iter().copied().max().unwrap_or(0);
    assert!(
        longest <= stall_ms + 2 * WATCHDOG_MS,
        "the pings come back once the {thread} moves ({stall_ms} ms stuck): {gaps:?}"
    );
    drop(server);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.lines().any(|l| l.contains("no more watchdog pings") && l.contains(thread)),
        "the log names the stuck {thread}:\n{text}"
    );
}

#[test]
fn watchdog_pings_stop_while_the_scheduler_is_stuck() {
    // The scheduler (test-faults) blocks 1.5 s after it starts, which is before READY=1.
    let stall = format!("1500:{}", STUCK_FOR.as_millis());
    pings_stop_while_stuck(
        "systemd-scheduler",
        &[("ATELIER_TEST_SCHEDULER_STALL", &stall)],
        |_| {},
        "scheduler",
    );
}

#[test]
fn watchdog_pings_stop_while_the_log_writer_is_stuck() {
    if std::env::var("ATELIER_TEST_BACKEND").is_ok_and(|b| b == "postgres") {
        eprintln!("skipped: the hung disk is the sled writer's; this run keeps the log in PostgreSQL");
        return;
    }
    let tools = temp_dir("hang-fdatasync");
    let lib = build_preload("hang_fdatasync.c", tools.path());
    let trigger = tools.path().join("hang-now");
    let (lib, trigger_s) = (lib.to_str().unwrap().to_string(), trigger.to_str().unwrap().to_string());
    pings_stop_while_stuck(
        "systemd-writer",
        &[("LD_PRELOAD", &lib), ("HANG_FDATASYNC_TRIGGER", &trigger_s)],
        |server| {
            std::fs::write(&trigger, b"").unwrap();
            // An append makes the writer fdatasync, where it hangs until the trigger goes.
            let addr = server.addr;
            std::thread::spawn(move || {
                let body = json!({"context": {"title": "hung"}, "pipeline": "noop"}).to_string();
                request(
                    addr,
                    "POST",
                    "/api/commissions",
                    Some(&token("alice", false)),
                    &[("Content-Type", "application/json")],
                    Some(body.as_bytes()),
                )
            });
            std::thread::sleep(STUCK_FOR);
            std::fs::remove_file(&trigger).unwrap();
        },
        "log writer",
    );
}

#[test]
fn version_and_build_info_name_the_checkouts_commit() {
    let out = std::process::Command::new(exe()).arg("--version").output().expect("run atelier --version");
    assert!(out.status.success());
    let line = String::from_utf8(out.stdout).unwrap();
    // What build.rs saw: this checkout's commit, or "unknown" outside a checkout.
    let git = std::process::Command::new("git")
        .args(["-C", env!("CARGO_MANIFEST_DIR"), "rev-parse", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().chars().take(12).collect::<String>());
    let revision = git.unwrap_or_else(|| "unknown".to_string());
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(line.trim(), format!("atelier {version} ({revision})"));
    let data = temp_dir("build-info");
    let server = Server::start(exe(), data.path(), &[]);
    let metrics = server.get("/metrics", Some(&token("root", true))).text();
    let expected = format!("atelier_build_info{{revision=\"{revision}\",version=\"{version}\"}} 1");
    assert!(metrics.lines().any(|l| l == expected), "{expected} in /metrics:\n{metrics}");
}
