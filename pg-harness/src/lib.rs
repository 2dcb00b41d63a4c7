//! A throwaway PostgreSQL server for the tests of the PostgreSQL backend: `initdb` into a
//! temporary dir, started with `pg_ctl` on a Unix socket in that dir (no TCP port to collide
//! with another test binary; [`PgServer::start_tls`] adds a free one with TLS), stopped with
//! `pg_ctl stop -m fast` when dropped.
//!
//! When the tests run as root, PostgreSQL (which refuses to run as root) runs as the
//! `postgres` user, or `nobody`, through `runuser`; the temporary dir is given to that user.
//!
//! Missing binaries fail the test with a message saying what to install: a backend that was
//! never tested must not look as if it passed.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// How long `pg_ctl` may wait for the server to start or stop.
pub const PG_CTL_WAIT_S: u32 = 60;
/// The role the tests connect as (made by `initdb`, trusted on the socket).
pub const PG_TEST_ROLE: &str = "atelier";
/// The port that names the socket file (`.s.PGSQL.<port>`) of a server without TCP.
const SOCKET_PORT: u16 = 5432;

/// A running PostgreSQL server in a temporary dir.
pub struct PgServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// Who runs the server's programs, when this process is root.
    run_as: Option<String>,
    settings: Vec<(String, String)>,
    /// The socket file's port number, and the TCP port when [`PgServer::start_tls`] listens.
    port: u16,
}

/// Why a test that needs PostgreSQL fails on a machine without it.
const NOT_INSTALLED: &str = "PostgreSQL's programs (initdb, pg_ctl) are not installed: install the \
    Debian package `postgresql` (scripts/test does) or set ATELIER_PG_BIN to their dir";

/// Where the PostgreSQL programs are: `ATELIER_PG_BIN`, else the newest
/// `/usr/lib/postgresql/<version>/bin`, else the dir of a `pg_ctl` on the `PATH`.
pub fn find_bin_dir() -> Option<PathBuf> {
    find_bin_dir_in(std::env::var_os("ATELIER_PG_BIN"), Path::new("/usr/lib/postgresql"))
}

fn find_bin_dir_in(env: Option<std::ffi::OsString>, versions_dir: &Path) -> Option<PathBuf> {
    if let Some(dir) = env.filter(|d| !d.is_empty()) {
        // A dir named on purpose that lacks the programs is a mistake to report, not a
        // reason to look elsewhere.
        let dir = PathBuf::from(dir);
        return dir.join("pg_ctl").exists().then_some(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(versions_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("pg_ctl").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths).find(|p| p.join("pg_ctl").exists() && p.join("initdb").exists())
    })
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn user_exists(name: &str) -> bool {
    Command::new("id").arg("-u").arg(name).output().is_ok_and(|o| o.status.success())
}

fn check(what: &str, out: std::io::Result<Output>) -> Output {
    match out {
        Ok(o) if o.status.success() => o,
        Ok(o) => panic!(
            "{what} failed ({}):\n{}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!("{what} could not run: {e}"),
    }
}

impl PgServer {
    /// Starts a server with the test defaults: `fsync=off` (a test's data need not survive
    /// the machine; it survives a server crash, which is what the tests do), commits still
    /// synchronous.
    pub fn start() -> PgServer {
        PgServer::start_with(&[("fsync", "off")])
    }

    /// Starts a server with these `postgresql.conf` settings on top of the harness's own.
    pub fn start_with(settings: &[(&str, &str)]) -> PgServer {
        PgServer::start_on(settings, SOCKET_PORT, &[])
    }

    /// Starts a server that also listens on a free TCP port of 127.0.0.1 with TLS (`ssl = on`)
    /// on this certificate and key (PEM), for [`PgServer::tcp_url`]; the socket stays as it is.
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> PgServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let settings = [
            ("fsync", "off"),
            ("listen_addresses", "'127.0.0.1'"),
            ("ssl", "on"),
            ("ssl_cert_file", "'server.crt'"),
            ("ssl_key_file", "'server.key'"),
        ];
        PgServer::start_on(&settings, port, &[("server.crt", cert_pem), ("server.key", key_pem)])
    }

    /// Starts a server that also listens on `addr` (an address of this host, such as one end
    /// of a veth pair) on the socket's port number, and trusts the test role from `clients`
    /// (CIDR) there, for [`PgServer::url_at`]: a client in another network namespace reaches
    /// it through a link a test can cut.
    pub fn start_listening_on(addr: std::net::Ipv4Addr, clients: &str) -> PgServer {
        let listen = format!("'{addr}'");
        let hba = format!(
            "local all all trust\nhost all all 127.0.0.1/32 trust\nhost all {PG_TEST_ROLE} {clients} trust\n"
        );
        PgServer::start_on(
            &[("fsync", "off"), ("listen_addresses", &listen)],
            SOCKET_PORT,
            &[("pg_hba.conf", &hba)],
        )
    }

    /// A URL for `database` as the test role over TCP to `host` (see
    /// [`PgServer::start_listening_on`]).
    pub fn url_at(&self, host: std::net::Ipv4Addr, database: &str) -> String {
        format!("postgres://{PG_TEST_ROLE}@{host}:{}/{database}", self.port)
    }

    /// A URL for `database` as the test role over TCP to `localhost` (see [`PgServer::start_tls`]).
    pub fn tcp_url(&self, database: &str) -> String {
        format!("postgres://{PG_TEST_ROLE}@localhost:{}/{database}", self.port)
    }

    /// `settings` go after the harness's own (so they win); `files` are written into the data
    /// dir before the start, private to the server's user (a TLS key must be).
    fn start_on(settings: &[(&str, &str)], port: u16, files: &[(&str, &str)]) -> PgServer {
        let bin = find_bin_dir().unwrap_or_else(|| panic!("{}", NOT_INSTALLED));
        let run_as =
            is_root().then(|| if user_exists("postgres") { "postgres" } else { "nobody" }.to_string());
        let dir =
            tempfile::Builder::new().prefix("atelier-pg-").tempdir().expect("create the server's temp dir");
        if let Some(user) = &run_as {
            check("chown the server's dir", Command::new("chown").arg(user).arg(dir.path()).output());
        }
        let mut server = PgServer { dir, bin, run_as, settings: Vec::new(), port };
        let data = server.data_dir();
        let out = server
            .program("initdb")
            .args(["--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync", "-U", PG_TEST_ROLE, "-D"])
            .arg(&data)
            .output();
        check("initdb", out);
        server.settings.extend([
            ("listen_addresses".into(), "''".into()),
            ("unix_socket_directories".into(), format!("'{}'", server.socket_dir().display())),
            ("port".into(), port.to_string()),
            ("max_connections".into(), "200".into()),
        ]);
        server.settings.extend(settings.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        for (name, text) in files {
            server.write_private(&data.join(name), text);
        }
        let conf: String = server.settings.iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
        let conf_path = data.join("postgresql.auto.conf");
        let written = std::fs::OpenOptions::new()
            .append(true)
            .open(&conf_path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, conf.as_bytes()));
        if let Err(e) = written {
            panic!("write {}: {e}", conf_path.display());
        }
        server.pg_ctl_start();
        server
    }

    /// The server shared by every test of this test binary, started at first use and stopped
    /// when the process exits.
    pub fn shared() -> &'static PgServer {
        SHARED.get_or_init(|| {
            let server = PgServer::start();
            // SAFETY: `stop_shared` is an `extern "C" fn()` that only runs pg_ctl; registering
            // it has no other precondition. The test harness ends with `process::exit`, which
            // runs atexit handlers (statics are never dropped).
            unsafe { libc::atexit(stop_shared) };
            server
        })
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Where the server's socket (and nothing else of ours) lives: the temp dir itself.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `text` to `path`, mode 0600, owned by the server's user.
    fn write_private(&self, path: &Path, text: &str) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod 0600");
        if let Some(user) = &self.run_as {
            check("chown a server file", Command::new("chown").arg(user).arg(path).output());
        }
    }

    fn program(&self, name: &str) -> Command {
        let path = self.bin.join(name);
        match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(path);
                c
            }
            None => Command::new(path),
        }
    }

    fn pg_ctl(&self, args: &[&str]) -> std::io::Result<Output> {
        self.program("pg_ctl")
            .args(args)
            .arg("-D")
            .arg(self.data_dir())
            .args(["-t", &PG_CTL_WAIT_S.to_string()])
            .output()
    }

    fn pg_ctl_start(&self) {
        let log = self.dir.path().join("server.log");
        let out = self
            .program("pg_ctl")
            .arg("start")
            .arg("-w")
            .arg("-l")
            .arg(&log)
            .arg("-D")
            .arg(self.data_dir())
            .args(["-t", &PG_CTL_WAIT_S.to_string()])
            .output();
        if !matches!(&out, Ok(o) if o.status.success()) {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            check(&format!("pg_ctl start (server log:\n{log})"), out);
        }
    }

    /// A URL for `database` as the test role, over the socket.
    pub fn url(&self, database: &str) -> String {
        let host: String = self
            .socket_dir()
            .to_string_lossy()
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        format!("postgres://{PG_TEST_ROLE}@{host}:{}/{database}", self.port)
    }

    /// Runs SQL as the test role in `database` (through `psql`, so the harness needs no client
    /// library), and returns what it printed (unaligned, tuples only).
    pub fn psql(&self, database: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(self.socket_dir())
            .args(["-p", &self.port.to_string(), "-U", PG_TEST_ROLE, "-d", database, "-c", sql])
            .output();
        String::from_utf8_lossy(&check(&format!("psql {sql:?}"), out).stdout).trim().to_string()
    }

    /// A new, empty database, and its URL.
    pub fn fresh_database(&self, name: &str) -> String {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let clean: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' })
            .take(40)
            .collect();
        let db = format!("t{}_{n}_{clean}", std::process::id());
        self.psql("postgres", &format!("CREATE DATABASE {db}"));
        self.url(&db)
    }

    /// Kills the server without a clean shutdown (`-m immediate`, what a crash looks like to
    /// the clients) and starts it again.
    pub fn restart_immediate(&self) {
        self.stop_immediate();
        self.start_again();
    }

    /// Stops the server the way a crash would (`pg_ctl stop -m immediate`).
    pub fn stop_immediate(&self) {
        check("pg_ctl stop -m immediate", self.pg_ctl(&["stop", "-w", "-m", "immediate"]));
    }

    /// Starts a stopped server again on the same data and socket.
    pub fn start_again(&self) {
        self.pg_ctl_start();
    }

    fn stop_fast(&self) {
        // Not a panic: this runs in Drop and at exit, where the server may be stopped already.
        let _ = self.pg_ctl(&["stop", "-w", "-m", "fast"]);
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop_fast();
    }
}

static SHARED: OnceLock<PgServer> = OnceLock::new();

extern "C" fn stop_shared() {
    if let Some(server) = SHARED.get() {
        server.stop_fast();
        // The static is never dropped, so neither is its temp dir.
        let _ = std::fs::remove_dir_all(server.dir.path());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_named_dir_without_the_programs_is_not_found() {
        let empty = tempfile::tempdir().expect("a temp dir");
        assert_eq!(find_bin_dir_in(Some(empty.path().into()), Path::new("/nonexistent")), None);
        assert!(NOT_INSTALLED.contains("install the Debian package `postgresql`"));
    }

    #[test]
    fn a_server_starts_answers_and_survives_an_immediate_restart() {
        let server = PgServer::start();
        let url = server.fresh_database("harness");
        let db = url.rsplit('/').next().expect("a database in the URL");
        server.psql(db, "CREATE TABLE t (x int); INSERT INTO t VALUES (1)");
        server.restart_immediate();
        assert_eq!(server.psql(db, "SELECT x FROM t"), "1");
        let socket = server.socket_dir().join(".s.PGSQL.5432");
        assert!(socket.exists(), "the server listens on {}", socket.display());
        drop(server);
        assert!(!socket.exists(), "the server stopped when dropped");
    }
}
