//! Helpers for end-to-end tests: run the real `atelier` binary on loopback, talk HTTP to it
//! with a deliberately small client (so tests see exactly what goes over the wire), follow SSE.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use serde_json::{json, Value};

/// The token secret every test server uses, so tests can mint tokens themselves.
pub const SECRET: &str = "test-secret-for-end-to-end-tests";

pub use tempfile::TempDir;

/// For tests that damage a stopped data dir's projections ([`with_projections`]).
pub use sled;

/// This process's effective uid.
pub fn current_uid() -> u32 {
    // SAFETY: geteuid only returns this process's id.
    unsafe { libc::geteuid() }
}

/// With `ATELIER_TEST_BACKEND=postgres`, every server the tests start keeps its log in
/// PostgreSQL (a server of this test binary's own, one database per data dir, so that a
/// restart on the same data dir finds its log again); otherwise in the data dir's sled store.
pub fn database_for(data_dir: &Path) -> Option<String> {
    use std::sync::Mutex;
    static DATABASES: Mutex<Vec<(PathBuf, String)>> = Mutex::new(Vec::new());
    if std::env::var("ATELIER_TEST_BACKEND").ok()?.as_str() != "postgres" {
        return None;
    }
    let mut dbs = DATABASES.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, url)) = dbs.iter().find(|(d, _)| d == data_dir) {
        return Some(url.clone());
    }
    let name = data_dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let url = atelier_pg_harness::PgServer::shared().fresh_database(&name);
    dbs.push((data_dir.to_path_buf(), url.clone()));
    Some(url)
}

/// A fresh, empty dir under the system temp dir, removed when the guard drops: hold it for as
/// long as any server or child process works in it.
pub fn temp_dir(name: &str) -> TempDir {
    tempfile::Builder::new().prefix(&format!("atelier-e2e-{name}-")).tempdir().expect("temp dir")
}

pub fn now_s() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// The keys of a server whose secret is `secret` (at least 32 bytes).
pub fn keys_for(secret: &str) -> atelier_http::Keys {
    atelier_http::Keys::new(&atelier_http::secret::Secret::new(secret).expect("a long enough test secret"))
}

pub fn token(user: &str, admin: bool) -> String {
    let role = if admin { atelier_http::Role::Admin } else { atelier_http::Role::User };
    keys_for(SECRET).issue(user, role, now_s(), 3600).expect("within the maximum lifetime")
}

pub fn expired_token(user: &str) -> String {
    keys_for(SECRET)
        .issue(user, atelier_http::Role::User, now_s() - 3600, 3590)
        .expect("within the maximum lifetime")
}

/// In a server's settings: its log is the data dir's sled store even when the suite runs on
/// PostgreSQL (`ATELIER_TEST_BACKEND`), e.g. a server on a backup's copy, which is a sled data
/// dir. Not passed on to the server.
pub const SLED: (&str, &str) = ("ATELIER_DATABASE_URL", "");

/// Settings that lift every fair-share limit of non-admin users, for benchmarks that play one
/// user holding thousands of streams or commissions.
pub const NO_SHARE_LIMITS: [(&str, &str); 3] =
    [("ATELIER_USER_ACTIVE_MAX", "0"), ("ATELIER_USER_STREAMS_MAX", "0"), ("ATELIER_USER_RATE", "0")];

/// A running `atelier serve`, killed (SIGKILL) on drop unless stopped first.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    pub exe: PathBuf,
    pub env: Vec<(String, String)>,
    /// The line after the listen address: the admin sign-in link the server prints.
    pub sign_in_line: String,
}

impl Server {
    pub fn start(exe: &Path, data_dir: &Path, env: &[(&str, &str)]) -> Server {
        Self::start_on(exe, data_dir, env, "127.0.0.1:0")
    }

    pub fn start_on(exe: &Path, data_dir: &Path, env: &[(&str, &str)], listen: &str) -> Server {
        Self::start_with(Command::new(exe), exe, data_dir, env, listen, Stdio::inherit())
    }

    /// Starts the server as user `uid`, group `gid` (another user's only when the caller is root).
    pub fn start_as(exe: &Path, data_dir: &Path, env: &[(&str, &str)], uid: u32, gid: u32) -> Server {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(exe);
        cmd.uid(uid).gid(gid);
        // Its workers run as itself (see `start_with`).
        let me = uid.to_string();
        let mut env = env.to_vec();
        env.insert(0, ("ATELIER_WORKER_USER", &me));
        Self::start_with(cmd, exe, data_dir, &env, "127.0.0.1:0", Stdio::inherit())
    }

    /// Starts the server from a command the caller prepared (a wrapper such as `setpriv`
    /// whose last argument is `exe`, a `pre_exec` step); `serve` and the settings are added.
    pub fn start_command(cmd: Command, exe: &Path, data_dir: &Path, env: &[(&str, &str)]) -> Server {
        Self::start_with(cmd, exe, data_dir, env, "127.0.0.1:0", Stdio::inherit())
    }

    /// [`Server::start_command`] with the server listening on `listen` (an address of the
    /// network namespace `cmd` starts in, say).
    pub fn start_command_on(
        cmd: Command,
        exe: &Path,
        data_dir: &Path,
        env: &[(&str, &str)],
        listen: &str,
    ) -> Server {
        Self::start_with(cmd, exe, data_dir, env, listen, Stdio::inherit())
    }

    /// Starts the server with its log (stderr) going to `log`.
    pub fn start_logging_to(exe: &Path, data_dir: &Path, env: &[(&str, &str)], log: &Path) -> Server {
        let log = std::fs::File::create(log).expect("create the log file");
        Self::start_with(Command::new(exe), exe, data_dir, env, "127.0.0.1:0", log.into())
    }

    /// Starts the server with at most `nofile` open file descriptors (soft and hard).
    pub fn start_with_fd_limit(exe: &Path, data_dir: &Path, env: &[(&str, &str)], nofile: u64) -> Server {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(exe);
        // SAFETY: setrlimit is async-signal-safe; the closure touches nothing else.
        unsafe {
            cmd.pre_exec(move || {
                let lim = libc::rlimit { rlim_cur: nofile, rlim_max: nofile };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Self::start_with(cmd, exe, data_dir, env, "127.0.0.1:0", Stdio::inherit())
    }

    fn start_with(
        mut cmd: Command,
        exe: &Path,
        data_dir: &Path,
        env: &[(&str, &str)],
        listen: &str,
        stderr: Stdio,
    ) -> Server {
        cmd.arg("serve")
            .env("ATELIER_LISTEN", listen)
            .env("ATELIER_DATA_DIR", data_dir)
            .env("ATELIER_SECRET", SECRET)
            .env("RUST_LOG", "warn")
            // Tests poll far faster than any real client (every 20 ms, a request per commission
            // watched); tests/e2e/shares.rs sets the rate it tests.
            .env("ATELIER_USER_RATE", "0")
            // Workers run as the server's own user, root included, whatever accounts this
            // machine has: only tests/e2e/isolation.rs is about the worker user, and it says so.
            .env("ATELIER_WORKER_USER", current_uid().to_string())
            .env("ATELIER_ALLOW_ROOT_WORKERS", "true")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        if !env.iter().any(|(k, _)| *k == "ATELIER_DATABASE_URL") {
            if let Some(url) = database_for(data_dir) {
                cmd.env("ATELIER_DATABASE_URL", url);
            }
        }
        for (k, v) in env.iter().filter(|kv| **kv != SLED) {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn atelier serve");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        let addr = loop {
            line.clear();
            if out.read_line(&mut line).unwrap_or(0) == 0 || Instant::now() > deadline {
                panic!("atelier serve did not start (last line: {line:?})");
            }
            let line = line.trim();
            let rest = line
                .strip_prefix("atelier listening on http://")
                .or(line.strip_prefix("atelier listening on https://"));
            if let Some(rest) = rest {
                break rest.parse().expect("listen address");
            }
        };
        let mut sign_in_line = String::new();
        let _ = out.read_line(&mut sign_in_line);
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = String::new();
            while out.read_line(&mut sink).unwrap_or(0) > 0 {
                sink.clear();
            }
        });
        Server {
            child,
            addr,
            data_dir: data_dir.to_path_buf(),
            exe: exe.to_path_buf(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            sign_in_line: sign_in_line.trim().to_string(),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// SIGTERM and wait: a graceful stop.
    pub fn stop(mut self) -> std::process::ExitStatus {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        let status = self.child.wait().expect("wait for the server");
        std::mem::forget(self);
        status
    }

    /// SIGKILL and wait: a crash.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::mem::forget(self);
    }

    /// Polls `/readyz` until it answers `status`, for at most `within`; the last answer.
    pub fn readyz_becomes(&self, status: u16, within: Duration) -> Response {
        let deadline = Instant::now() + within;
        loop {
            let r = self.get("/readyz", None);
            if r.status == status || Instant::now() > deadline {
                return r;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn get(&self, path: &str, token: Option<&str>) -> Response {
        request(self.addr, "GET", path, token, &[], None)
    }

    pub fn post(&self, path: &str, token: Option<&str>, body: &Value) -> Response {
        request(
            self.addr,
            "POST",
            path,
            token,
            &[("Content-Type", "application/json")],
            Some(body.to_string().as_bytes()),
        )
    }

    /// The log's head as `/readyz` reports it: a refused request must leave it where it was.
    pub fn head_seq(&self) -> u64 {
        self.get("/readyz", None).json()["head_seq"].as_u64().expect("readyz reports head_seq")
    }

    /// Polls commission `id` (as `token`'s user) until it is `completed`, for at most
    /// `within`; its snapshot then, or `None`.
    pub fn completed(&self, id: u64, token: &str, within: Duration) -> Option<Value> {
        wait_for(within, || {
            let c = self.get(&format!("/api/commissions/{id}"), Some(token)).json();
            (c["state"] == "completed").then_some(c)
        })
    }

    /// Creates a commission and returns its snapshot.
    pub fn create(&self, token: &str, body: Value) -> Value {
        let r = self.post("/api/commissions", Some(token), &body);
        assert_eq!(r.status, 201, "create: {}", r.text());
        r.json()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The error code of an error body.
    pub fn code(&self) -> String {
        self.json()["error"]["code"].as_str().unwrap_or("<none>").to_string()
    }
}

/// One HTTP/1.1 request with `Connection: close`; reads the whole response.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Response {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = token {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.map_or(0, <[u8]>::len)));
    s.write_all(head.as_bytes()).unwrap();
    if let Some(b) = body {
        let _ = s.write_all(b);
    }
    // Read the head, then exactly Content-Length bytes when given (some peers keep the
    // connection open despite `Connection: close`), else to the end.
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        if let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            if let Some(len) = len {
                if raw.len() >= split + 4 + len {
                    break;
                }
            }
        }
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
    }
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Response {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head: {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines.next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked")) {
        body = atelier_http::client::dechunk(&body);
    }
    Response { status, headers, body }
}

/// One SSE message.
#[derive(Clone, Debug)]
pub struct SseEvent {
    pub id: Option<u64>,
    pub event: String,
    pub data: Value,
}

/// How reading a stream went.
#[derive(Debug)]
pub enum Next {
    Event(SseEvent),
    /// The server closed the stream.
    End,
    /// The read failed: a timeout (the stream stayed open and silent) or a reset.
    Failed(std::io::Error),
}

/// A live SSE connection.
pub struct Sse {
    pub status: u16,
    /// The body: the socket's bytes, or their payload when the response is chunked (a proxy
    /// in front of the server may frame a stream so).
    reader: Box<dyn BufRead + Send>,
    socket: TcpStream,
    pub retry_hint: Option<u64>,
}

/// A TCP connection to `addr` from the local address `from` (any port): a loopback client
/// can play many clients by connecting from 127.0.0.2, 127.0.0.3, ...
pub fn connect_from(from: std::net::IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let s = rt.block_on(async {
        let socket =
            if from.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        socket.bind(SocketAddr::new(from, 0))?;
        socket.connect(addr).await
    })?;
    let s = s.into_std()?;
    s.set_nonblocking(false)?;
    Ok(s)
}

impl Sse {
    pub fn open(addr: SocketAddr, path: &str, token: &str, last_event_id: Option<u64>) -> Sse {
        let s = TcpStream::connect(addr).expect("connect");
        Sse::open_on(s, addr, path, token, last_event_id)
    }

    /// Opens a stream on a connection made already (see [`connect_from`]).
    pub fn open_on(
        mut s: TcpStream,
        addr: SocketAddr,
        path: &str,
        token: &str,
        last_event_id: Option<u64>,
    ) -> Sse {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        // `Connection: close`: the stream's body runs to the close, so `next` sees its end as
        // EOF (a keep-alive client gets a chunked body; `tests/e2e/sse.rs` covers that).
        let mut head = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: text/event-stream\r\nAuthorization: Bearer {token}\r\n");
        if let Some(id) = last_event_id {
            head.push_str(&format!("Last-Event-ID: {id}\r\n"));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).unwrap();
        let socket = s.try_clone().expect("clone the socket");
        let mut reader = BufReader::new(s);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let status = line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let mut chunked = false;
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                break;
            }
            let l = line.to_ascii_lowercase();
            chunked |= l.starts_with("transfer-encoding:") && l.contains("chunked");
        }
        let reader: Box<dyn BufRead + Send> = if chunked {
            Box::new(BufReader::new(atelier_http::client::Dechunked::new(reader)))
        } else {
            Box::new(reader)
        };
        Sse { status, reader, socket, retry_hint: None }
    }

    pub fn set_timeout(&self, t: Duration) {
        self.socket.set_read_timeout(Some(t)).unwrap();
    }

    /// The next event; `None` when the stream ends (or times out, or fails). Comments are
    /// skipped. Tests that must tell an end from a stall use [`Sse::read_next`].
    // Like `EventStream::next`: reads the socket, so not an `Iterator` (tests call it with
    // a timeout set and treat `None` as the end or a stall).
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Option<SseEvent> {
        match self.read_next() {
            Next::Event(e) => Some(e),
            Next::End | Next::Failed(_) => None,
        }
    }

    /// The next event, or how the stream stopped: closed by the server, or a read that failed
    /// (a timeout when the server neither sends nor closes). Comments are skipped.
    pub fn read_next(&mut self) -> Next {
        let (mut id, mut event, mut data) = (None, String::new(), String::new());
        let mut line = String::new();
        loop {
            line.clear();
            match self.reader.read_line(&mut line) {
                Ok(0) => return Next::End,
                Err(e) => return Next::Failed(e),
                Ok(_) => {}
            }
            let l = line.trim_end_matches(['\r', '\n']);
            if l.is_empty() {
                if !data.is_empty() {
                    let data = serde_json::from_str(&data).expect("SSE data is JSON");
                    return Next::Event(SseEvent { id, event, data });
                }
                continue;
            }
            if let Some(v) = l.strip_prefix("id: ") {
                id = v.parse().ok();
            } else if let Some(v) = l.strip_prefix("event: ") {
                event = v.to_string();
            } else if let Some(v) = l.strip_prefix("data: ") {
                data.push_str(v);
            } else if let Some(v) = l.strip_prefix("retry: ") {
                self.retry_hint = v.parse().ok();
            }
        }
    }

    /// Every event up to the server's close of the stream; panics if a read fails first (the
    /// server kept the stream open past the read timeout).
    pub fn events_until_closed(&mut self) -> Vec<SseEvent> {
        let mut events = Vec::new();
        loop {
            match self.read_next() {
                Next::Event(e) => events.push(e),
                Next::End => return events,
                Next::Failed(e) => panic!("the stream was not closed after {} events: {e}", events.len()),
            }
        }
    }

    /// Reads and discards everything up to the server's close: the bytes read, or the error
    /// of the read that failed first (a timeout while the server keeps the stream open).
    pub fn drain_until_closed(&mut self) -> std::io::Result<u64> {
        std::io::copy(&mut self.reader, &mut std::io::sink())
    }

    pub fn shutdown(self) {
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
    }
}

/// Opens streams the way an async client (or a reconnect storm) does: every connect in flight
/// at once on a tokio runtime. Returns each request's status (0 if it was closed or timed out
/// unanswered); all streams stay open until every one has answered.
pub fn open_streams_at_once(addr: SocketAddr, requests: &[(String, String)], timeout: Duration) -> Vec<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let tasks: Vec<_> = requests
            .iter()
            .cloned()
            .map(|(path, token)| {
                tokio::spawn(async move {
                    let open = async {
                        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
                        let head = format!(
                            "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"
                        );
                        s.write_all(head.as_bytes()).await.ok()?;
                        let mut buf = [0u8; 64];
                        let n = s.read(&mut buf).await.ok()?;
                        let status = String::from_utf8_lossy(&buf[..n])
                            .split_whitespace()
                            .nth(1)?
                            .parse::<u16>()
                            .ok()?;
                        Some((status, s))
                    };
                    tokio::time::timeout(timeout, open).await.ok().flatten()
                })
            })
            .collect();
        let mut opened = Vec::new();
        for t in tasks {
            opened.push(t.await.ok().flatten());
        }
        opened.iter().map(|o| o.as_ref().map_or(0, |(status, _)| *status)).collect()
    })
}

/// Replaces values that change from run to run (times) so bodies can be snapshotted.
pub fn redact(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| {
                    let redacted = k.ends_with("_at") && !v.is_null() || k == "at";
                    (k.clone(), if redacted { Value::String("<time>".into()) } else { redact(v) })
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(redact).collect()),
        other => other.clone(),
    }
}

/// Polls `f` until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub mod netns;
pub mod webdriver;

/// Where tests leave artifacts (browser screenshots): target/test-artifacts.
pub fn artifacts_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// The claims of a JWT, read without checking its signature (tests look at what a server
/// issued).
pub fn jwt_claims(token: &str) -> Value {
    use base64::Engine as _;
    let claims = token.split('.').nth(1).expect("a JWT has three parts");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(claims).expect("base64url claims");
    serde_json::from_slice(&bytes).expect("JSON claims")
}

/// The workspace's root folder (tests run from their own crate's folder).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is inside the workspace").to_path_buf()
}

/// Every `.rs` file under `dir`, build output, snapshots and vendored crates left out (vendored
/// crates keep their authors' style: storage/vendor/README.md).
pub fn rust_sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("a readable source dir") {
        let p = entry.expect("a readable dir entry").path();
        if p.is_dir() {
            if !p.ends_with("target") && !p.ends_with("snapshots") && !p.ends_with("vendor") {
                rust_sources(&p, out);
            }
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// Opens the projection tree of a stopped server's data dir with sled itself, for a test to
/// damage it the way a bug or a bad disk would (`atelier replay --check` must then find it).
/// sled's own files are flushed before it returns.
pub fn with_projections<T>(data_dir: &Path, f: impl FnOnce(&sled::Tree) -> T) -> T {
    let db = sled::open(data_dir.join("sled")).expect("open the stopped data dir's sled");
    let tree = db.open_tree(atelier_storage::layout::PROJECTIONS_TREE).expect("the projection tree");
    let out = f(&tree);
    db.flush().expect("flush the damaged tree");
    out
}

/// Builds a shared library from one C file in tests/fixtures with gcc, into `out_dir`, for a
/// test to LD_PRELOAD into the server (a failing disk, say). gcc is part of what the tests
/// need (README, "Set-up").
pub fn build_preload(fixture: &str, out_dir: &Path) -> PathBuf {
    let source = workspace_root().join("tests/fixtures").join(fixture);
    let lib = out_dir.join(Path::new(fixture).with_extension("so").file_name().expect("a file name"));
    let out = Command::new("gcc")
        .args(["-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-o"])
        .arg(&lib)
        .arg(&source)
        .arg("-ldl")
        .output()
        .unwrap_or_else(|e| panic!("run gcc to build {fixture} (the tests need gcc): {e}"));
    assert!(out.status.success(), "gcc {fixture}: {}", String::from_utf8_lossy(&out.stderr));
    lib
}

/// A tmpfs of `size` (as mount's `-o size=` takes it) mounted on a temp dir, for the full-disk
/// tests; unmounted on drop, also when a test panics (lazily, if something still holds it).
/// Declare it before any server that uses it, so that the server is dropped (killed) first.
pub struct Tmpfs {
    dir: TempDir,
}

impl Tmpfs {
    /// `Err` says why mount refused (it needs root or CAP_SYS_ADMIN).
    pub fn mount(size: &str) -> Result<Tmpfs, String> {
        let dir = temp_dir("tmpfs");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(Tmpfs { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Takes all but `leave` bytes of its free space with a file at `name`, really (tmpfs
    /// allocates on fallocate; a sparse file would take nothing). Returns the file's path.
    pub fn ballast(&self, name: &str, leave: u64) -> PathBuf {
        use std::os::fd::AsRawFd;
        let path = self.path().join(name);
        let take = free_bytes(self.path()).saturating_sub(leave);
        let f = std::fs::File::create(&path).expect("create the ballast");
        let len = libc::off_t::try_from(take).expect("a tmpfs-sized length");
        // SAFETY: posix_fallocate on a valid, owned fd; no memory is involved.
        let rc = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, len) };
        assert_eq!(rc, 0, "fallocate the ballast");
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if !Command::new("umount").arg(self.dir.path()).status().is_ok_and(|s| s.success()) {
            let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
        }
    }
}

/// Free bytes for an unprivileged writer on the file system that holds `dir`.
pub fn free_bytes(dir: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).expect("a path without NUL");
    // SAFETY: statvfs fills the zeroed struct we own; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0, "statvfs {}", dir.display());
    st.f_bavail * st.f_frsize
}
