//! Atelier behind nginx, as `packaging/nginx/atelier.conf` sets it up: a real nginx (Debian's
//! package; `scripts/test` installs it) runs that very file in front of a real server. Events
//! arrive live through it, a stream resumes through it with `Last-Event-ID` without a gap or a
//! duplicate, and a client's address reaches the per-address connection cap only when the
//! server trusts the proxy (`ATELIER_TRUSTED_PROXIES`); otherwise every client behind it counts
//! as nginx.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use atelier_tests::*;

/// Events appended (one commission created each) while the latency is measured.
const LIVE_EVENTS: usize = 200;
/// Time between two of those appends.
const APPEND_INTERVAL_MS: u64 = 5;
/// The most nginx may add to an event's way to the client (p99): the time an event arrives
/// through nginx, less the time it arrives on a stream straight from the server. A proxy that
/// buffers the stream holds events for seconds, or until the end.
const ADDED_P99_MS_MAX: f64 = 50.0;
/// The per-address connection cap the cap tests run the server with.
const PER_IP_MAX: usize = 3;

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_atelier"))
}

/// The nginx binary: on PATH, or where Debian puts it (/usr/sbin is not on every user's PATH).
fn nginx_binary() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("nginx")).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain([PathBuf::from("/usr/sbin/nginx")])
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("nginx is not installed: scripts/test installs it (apt-get install nginx)"))
}

/// A free port on loopback (free when asked; nginx binds it right after).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The packaged site, pointed at `upstream` and listening on `listen`: the two lines an
/// operator changes, each found exactly once so that a changed file fails here, not silently.
fn packaged_site(upstream: SocketAddr, listen: SocketAddr) -> String {
    let site = std::fs::read_to_string(workspace_root().join("packaging/nginx/atelier.conf"))
        .expect("read packaging/nginx/atelier.conf");
    for line in ["server 127.0.0.1:8080;", "listen 80;"] {
        assert_eq!(site.matches(line).count(), 1, "the packaged site has one `{line}`");
    }
    site.replace("server 127.0.0.1:8080;", &format!("server {upstream};"))
        .replace("listen 80;", &format!("listen {listen};"))
}

/// A real nginx in the foreground, everything it writes in its own temp dir; ended (SIGKILL)
/// on drop. One process (`master_process off`): a test that panics leaves no worker behind,
/// and a root nginx does not switch its worker to a user who cannot reach the temp dir.
struct Nginx {
    child: Child,
    addr: SocketAddr,
    dir: TempDir,
}

impl Nginx {
    fn start(upstream: SocketAddr) -> Nginx {
        let dir = temp_dir("nginx");
        let d = dir.path();
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), free_port());
        std::fs::write(d.join("atelier.conf"), packaged_site(upstream, addr)).unwrap();
        let temp_paths: String = ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"]
            .iter()
            .map(|t| format!("    {t}_temp_path {}/{t};\n", d.display()))
            .collect();
        let conf = format!(
            "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n    access_log {d}/access.log;\n{temp_paths}    include {d}/atelier.conf;\n}}\n",
            d = d.display()
        );
        std::fs::write(d.join("nginx.conf"), conf).unwrap();
        let mut child = Command::new(nginx_binary())
            .arg("-p")
            .arg(d)
            .arg("-c")
            .arg(d.join("nginx.conf"))
            .arg("-e")
            .arg(d.join("error.log"))
            .stdin(Stdio::null())
            .spawn()
            .expect("start nginx");
        let up = wait_for(Duration::from_secs(10), || {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(d.join("error.log")).unwrap_or_default();
                panic!("nginx exited at start ({status}):\n{log}");
            }
            std::net::TcpStream::connect(addr).ok()
        });
        assert!(up.is_some(), "nginx did not listen on {addr} within 10 s");
        Nginx { child, addr, dir }
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn queued(title: &str) -> Value {
    json!({"context": {"title": title}, "pipeline": "noop", "scheduled_for": "2099-01-01T00:00:00Z"})
}

fn now_ms() -> i64 {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    i64::try_from(d.as_millis()).unwrap()
}

/// One event as a reader got it.
struct Receipt {
    seq: u64,
    /// When it arrived.
    at: Instant,
    /// How long after its append (the event's `at`, in ms) it arrived.
    since_append_ms: f64,
}

/// `n` events read on a thread of their own, each with when it arrived.
fn receive_timed(mut sse: Sse, n: usize) -> std::thread::JoinHandle<(Vec<Receipt>, Sse)> {
    std::thread::spawn(move || {
        let mut got = Vec::with_capacity(n);
        while got.len() < n {
            let e = sse.next().unwrap_or_else(|| panic!("the stream ended after {} events", got.len()));
            let at = Instant::now();
            let appended = e.data["at"].as_str().and_then(atelier_engine::time::parse_rfc3339).expect("at");
            let since_append_ms = (now_ms() - appended) as f64;
            got.push(Receipt { seq: e.id.expect("an id"), at, since_append_ms });
        }
        (got, sse)
    })
}

/// The p-th percentile, p50 and p99 of `ms`, and its max, as text.
fn percentiles(mut ms: Vec<f64>) -> (f64, String) {
    ms.sort_by(f64::total_cmp);
    let p = |q: usize| ms[(ms.len() * q / 100).min(ms.len() - 1)];
    (p(99), format!("p50 {:.1} p99 {:.1} max {:.1}", p(50), p(99), ms[ms.len() - 1]))
}

/// The seqs must follow one another: the admin stream carries every event of the log.
fn assert_contiguous(seqs: &[u64], after: u64, what: &str) {
    let expected: Vec<u64> = (after + 1..=after + seqs.len() as u64).collect();
    assert_eq!(seqs, expected, "{what}: every seq once, in order");
}

#[test]
fn events_arrive_live_through_nginx_and_a_stream_resumes_without_gap_or_duplicate() {
    let dir = temp_dir("proxy-live");
    let s = Server::start(exe(), dir.path(), &[("ATELIER_TRUSTED_PROXIES", "127.0.0.1")]);
    let nginx = Nginx::start(s.addr);
    let admin = token("root", true);
    let start = s.head_seq();
    let proxied = Sse::open(nginx.addr, "/api/events/stream", &admin, Some(start));
    assert_eq!(proxied.status, 200, "the stream through nginx: {}", nginx.error_log());
    let direct = Sse::open(s.addr, "/api/events/stream", &admin, Some(start));
    let (via_nginx, straight) = (receive_timed(proxied, LIVE_EVENTS), receive_timed(direct, LIVE_EVENTS));
    let alice = token("alice", false);
    for i in 0..LIVE_EVENTS {
        let r = request(
            nginx.addr,
            "POST",
            "/api/commissions",
            Some(&alice),
            &[("Content-Type", "application/json")],
            Some(queued(&format!("live {i}")).to_string().as_bytes()),
        );
        assert_eq!(r.status, 201, "a create through nginx: {}", r.text());
        std::thread::sleep(Duration::from_millis(APPEND_INTERVAL_MS));
    }
    let (got, proxied) = via_nginx.join().expect("the proxied reader");
    let (got_direct, _) = straight.join().expect("the direct reader");
    assert_contiguous(&got.iter().map(|g| g.seq).collect::<Vec<_>>(), start, "through nginx");
    assert_contiguous(&got_direct.iter().map(|g| g.seq).collect::<Vec<_>>(), start, "direct");
    let added: Vec<f64> = got
        .iter()
        .zip(&got_direct)
        .map(|(n, d)| n.at.saturating_duration_since(d.at).as_secs_f64() * 1000.0)
        .collect();
    let (added_p99, added_text) = percentiles(added);
    let (_, via_text) = percentiles(got.iter().map(|g| g.since_append_ms).collect());
    let (_, direct_text) = percentiles(got_direct.iter().map(|g| g.since_append_ms).collect());
    eprintln!(
        "over {LIVE_EVENTS} events, ms: append to receipt through nginx {via_text}; straight from the server \
         {direct_text}; added by nginx {added_text}"
    );
    assert!(added_p99 <= ADDED_P99_MS_MAX, "nginx holds events back: it adds {added_text} ms");

    // The client goes away; more is appended meanwhile; it comes back with its last id.
    let last = got.last().unwrap().seq;
    proxied.shutdown();
    let ids: Vec<u64> =
        (0..10).map(|i| s.create(&alice, queued(&format!("gap {i}")))["task_id"].as_u64().unwrap()).collect();
    let mut resumed = Sse::open(nginx.addr, "/api/events/stream", &admin, Some(last));
    assert_eq!(resumed.status, 200);
    let events: Vec<SseEvent> = (0..ids.len()).map(|_| resumed.next().expect("a resumed event")).collect();
    assert_contiguous(
        &events.iter().map(|e| e.id.unwrap()).collect::<Vec<_>>(),
        last,
        "resumed through nginx",
    );
    let task_ids: Vec<u64> = events.iter().map(|e| e.data["task_id"].as_u64().unwrap()).collect();
    assert_eq!(task_ids, ids, "exactly the events appended while away");
    // And nothing more: the next read waits (heartbeats are comments, skipped).
    resumed.set_timeout(Duration::from_millis(500));
    assert!(matches!(resumed.read_next(), Next::Failed(_)), "no duplicate after the resumed events");
}

/// Opens `/api/events/stream` through nginx from the client address `from`; the status and
/// the stream, kept open by the caller.
fn stream_from(nginx: &Nginx, from: &str, admin: &str) -> (u16, Sse) {
    let from: IpAddr = from.parse().unwrap();
    let conn = connect_from(from, nginx.addr).expect("connect from a loopback address");
    let sse = Sse::open_on(conn, nginx.addr, "/api/events/stream", admin, None);
    (sse.status, sse)
}

fn capped_server(dir: &Path, trusted: &str) -> Server {
    let cap = PER_IP_MAX.to_string();
    Server::start(
        exe(),
        dir,
        &[("ATELIER_MAX_CONNECTIONS_PER_IP", &cap), ("ATELIER_TRUSTED_PROXIES", trusted)],
    )
}

#[test]
fn untrusted_nginx_makes_every_client_behind_it_share_its_address() {
    let dir = temp_dir("proxy-untrusted");
    let s = capped_server(dir.path(), "");
    let nginx = Nginx::start(s.addr);
    let admin = token("root", true);
    let mut open = Vec::new();
    for i in 0..PER_IP_MAX {
        let (status, sse) = stream_from(&nginx, &format!("127.0.0.{}", i + 2), &admin);
        assert_eq!(status, 200, "client {i}");
        open.push(sse);
    }
    // A client of its own address, but nginx's connection is the server's peer: full.
    let (status, _) = stream_from(&nginx, "127.0.0.20", &admin);
    assert_eq!(status, 503, "one more client behind an untrusted proxy: nginx's address is full");
    drop(open);
}

#[test]
fn trusted_nginx_counts_each_client_by_its_forwarded_address() {
    let dir = temp_dir("proxy-trusted");
    let s = capped_server(dir.path(), "127.0.0.1");
    let nginx = Nginx::start(s.addr);
    let admin = token("root", true);
    let mut open = Vec::new();
    // More clients than the cap, each of its own address: all in.
    for i in 0..=PER_IP_MAX {
        let (status, sse) = stream_from(&nginx, &format!("127.0.0.{}", i + 2), &admin);
        assert_eq!(status, 200, "client {i} of its own address");
        open.push(sse);
    }
    // One client up to the cap, then refused: its own address is full, not nginx's.
    for i in 0..PER_IP_MAX {
        let (status, sse) = stream_from(&nginx, "127.0.0.30", &admin);
        assert_eq!(status, 200, "127.0.0.30's stream {i}");
        open.push(sse);
    }
    let (status, refused) = stream_from(&nginx, "127.0.0.30", &admin);
    assert_eq!(status, 503, "127.0.0.30 past its cap, counted by X-Forwarded-For");
    drop(refused);
    let (status, _) = stream_from(&nginx, "127.0.0.31", &admin);
    assert_eq!(status, 200, "another client is still let in");
}
