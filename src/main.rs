//! The `atelier` binary: parses the command line and wires the crates together. No logic of
//! its own beyond turning errors into messages and exit codes.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use atelier_http::{Executors, HttpConfig, Keys, Role, Server};
use atelier_storage::{check, Durability, EventStore, SledStore, StoreConfig};
use atelier_workers::{Controller, WorkersConfig};

const HELP: &str = "\
atelier — runs commissions (long background jobs) and shows their progress live

USAGE:
    atelier serve   [--listen ADDR] [--data-dir DIR] [--config FILE]
    atelier token   --user NAME [--admin] [--ttl 24h]   print a bearer token (HS256 JWT)
    atelier replay  --check                   rebuild every projection from the log and compare
    atelier export  [--out FILE]              write the log as JSON lines (stdout by default)
    atelier import  FILE                      load an export into an empty data dir
    atelier help

Executors and pipelines are configured in atelier.toml ([workers], [pipelines.NAME]) and with
USE_JOB_CONTROLLER, KEEP_TASK_RUNNER, JOB_CONTROLLER_PRIORITY, MAX_CONCURRENT_JOBS and
PROGRESS_UPDATE_INTERVAL (see README.md).

SETTINGS (environment wins over atelier.toml, which wins over defaults):
    ATELIER_LISTEN            listen address                    127.0.0.1:8080
    ATELIER_DATA_DIR          data directory                    ./atelier-data
    ATELIER_CONFIG            config file                       ./atelier.toml if present
    ATELIER_SECRET            token signing secret              a random secret in DATA_DIR/secret
    ATELIER_DURABILITY        sync | periodic                   sync (acknowledge only after fsync)
    ATELIER_CACHE_BYTES       sled page cache                   67108864
    ATELIER_RETENTION_DAYS    prune terminal commissions older than this   off
    ATELIER_HEARTBEAT_MS      SSE heartbeat interval            15000
    ATELIER_MAX_CONNECTIONS   concurrent SSE streams            10000
    ATELIER_METRICS_PUBLIC    1 = /metrics without a token      0
    ATELIER_LOG_FORMAT        json for JSON lines               human-readable
    RUST_LOG                  log level filter                  info
";

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

#[derive(Debug)]
struct CliError(String);

impl<E: std::fmt::Display> From<E> for CliError {
    fn from(e: E) -> Self {
        CliError(e.to_string())
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1..]),
        // Hidden: the worker side of the job controller (see workers/).
        Some("__trampoline") => return exit_code(atelier_workers::trampoline_main(&args[1..])),
        Some("__worker") => return exit_code(atelier_workers::worker_main(&args[1..])),
        Some("token") => token(&args[1..]),
        Some("replay") => replay(&args[1..]),
        Some("export") => export(&args[1..]),
        Some("import") => import(&args[1..]),
        Some("help" | "--help" | "-h") | None => {
            print!("{HELP}");
            Ok(ExitCode::SUCCESS)
        }
        Some("--version" | "-V") => {
            println!("atelier {}", env!("CARGO_PKG_VERSION"));
            Ok(ExitCode::SUCCESS)
        }
        Some(other) => Err(CliError(format!("unknown command '{other}'; see `atelier help`"))),
    };
    match result {
        Ok(code) => code,
        Err(CliError(msg)) => {
            eprintln!("atelier: {msg}");
            ExitCode::from(2)
        }
    }
}

fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// The executors as the HTTP side sees them.
struct Workers {
    controller: Controller,
    data_dir: PathBuf,
    pipelines: Vec<String>,
}

impl Executors for Workers {
    fn is_running(&self) -> bool {
        self.controller.is_running()
    }

    fn metrics_text(&self) -> String {
        self.controller.metrics_text()
    }

    fn job_log_paths(&self, job_id: u64) -> (PathBuf, PathBuf) {
        atelier_workers::job_log_paths(&self.data_dir, job_id)
    }

    fn pipeline_exists(&self, name: &str) -> bool {
        self.pipelines.iter().any(|p| p == name)
    }
}

/// A flag's value: `--name VALUE`.
fn flag(args: &[String], name: &str) -> Result<Option<String>, CliError> {
    match args.iter().position(|a| a == name) {
        None => Ok(None),
        Some(i) => args.get(i + 1).cloned().map(Some).ok_or_else(|| CliError(format!("{name} needs a value"))),
    }
}

fn check_flags(args: &[String], known: &[&str], switches: &[&str]) -> Result<(), CliError> {
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        if switches.contains(&a.as_str()) {
            i += 1;
        } else if known.contains(&a.as_str()) {
            i += 2;
        } else if a.starts_with('-') {
            return Err(CliError(format!("unknown option '{a}'; see `atelier help`")));
        } else {
            i += 1;
        }
    }
    Ok(())
}

/// Settings from atelier.toml and the environment.
struct Settings {
    /// The whole atelier.toml, for the executors' own tables.
    config_text: Option<String>,
    listen: String,
    data_dir: PathBuf,
    durability: Durability,
    cache_bytes: u64,
    retention_days: Option<u64>,
    heartbeat_ms: u64,
    max_connections: usize,
    metrics_public: bool,
}

fn settings(args: &[String]) -> Result<Settings, CliError> {
    let config_path = flag(args, "--config")?
        .or_else(|| std::env::var("ATELIER_CONFIG").ok())
        .map(PathBuf::from)
        .or_else(|| Some(PathBuf::from("atelier.toml")).filter(|p| p.exists()));
    let config_text = match &config_path {
        None => None,
        Some(p) => Some(std::fs::read_to_string(p).map_err(|e| CliError(format!("cannot read {}: {e}", p.display())))?),
    };
    let file: toml::Table = match &config_text {
        None => toml::Table::new(),
        Some(text) => text.parse().map_err(|e| CliError(format!("{}: {e}", config_path.as_ref().map_or(String::new(), |p| p.display().to_string()))))?,
    };
    let get = |env: &str, key: &str| -> Option<String> {
        std::env::var(env).ok().filter(|v| !v.is_empty()).or_else(|| {
            file.get(key).map(|v| match v {
                toml::Value::String(s) => s.clone(),
                other => other.to_string(),
            })
        })
    };
    let num = |env: &str, key: &str, default: u64| -> Result<u64, CliError> {
        match get(env, key) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| CliError(format!("{env} / {key}: '{v}' is not a number"))),
        }
    };
    let durability = match get("ATELIER_DURABILITY", "durability").as_deref() {
        None | Some("sync") => Durability::Sync,
        Some("periodic") => Durability::Periodic { interval_ms: num("ATELIER_DURABILITY_INTERVAL_MS", "durability_interval_ms", 100)? },
        Some(other) => return Err(CliError(format!("ATELIER_DURABILITY / durability: '{other}' is not sync or periodic"))),
    };
    Ok(Settings {
        config_text,
        listen: flag(args, "--listen")?.or_else(|| get("ATELIER_LISTEN", "listen")).unwrap_or_else(|| "127.0.0.1:8080".into()),
        data_dir: flag(args, "--data-dir")?
            .or_else(|| get("ATELIER_DATA_DIR", "data_dir"))
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("atelier-data")),
        durability,
        cache_bytes: num("ATELIER_CACHE_BYTES", "cache_capacity_bytes", 64 * 1024 * 1024)?,
        retention_days: get("ATELIER_RETENTION_DAYS", "retention_days")
            .map(|v| v.parse().map_err(|_| CliError(format!("ATELIER_RETENTION_DAYS: '{v}' is not a number of days"))))
            .transpose()?,
        heartbeat_ms: num("ATELIER_HEARTBEAT_MS", "heartbeat_ms", 15_000)?,
        max_connections: usize::try_from(num("ATELIER_MAX_CONNECTIONS", "max_connections", 10_000)?).unwrap_or(usize::MAX),
        metrics_public: get("ATELIER_METRICS_PUBLIC", "metrics_public").is_some_and(|v| v == "1" || v == "true"),
    })
}

fn open_store(s: &Settings) -> Result<Arc<SledStore>, CliError> {
    let mut config = StoreConfig::new(&s.data_dir);
    config.cache_capacity_bytes = s.cache_bytes;
    config.durability = s.durability;
    Ok(SledStore::open(config)?)
}

/// The token secret: ATELIER_SECRET, or a random one kept in the data dir.
fn keys(data_dir: &std::path::Path) -> Result<Keys, CliError> {
    if let Ok(secret) = std::env::var("ATELIER_SECRET") {
        if !secret.is_empty() {
            return Ok(Keys::new(secret.as_bytes()));
        }
    }
    let path = data_dir.join("secret");
    if let Ok(s) = std::fs::read_to_string(&path) {
        return Ok(Keys::new(s.trim().as_bytes()));
    }
    std::fs::create_dir_all(data_dir).map_err(|e| CliError(format!("cannot create {}: {e}", data_dir.display())))?;
    let mut bytes = [0u8; 32];
    use std::io::Read;
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes))?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)?;
    use std::io::Write;
    f.write_all(hex.as_bytes())?;
    Ok(Keys::new(hex.as_bytes()))
}

fn now_s() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

fn parse_ttl(s: &str) -> Result<i64, CliError> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = n.parse().map_err(|_| CliError(format!("--ttl: '{s}' is not like 30m, 24h or 7d")))?;
    let mult = match unit {
        "s" | "" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(CliError(format!("--ttl: unknown unit in '{s}' (use s, m, h or d)"))),
    };
    Ok(n * mult)
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if std::env::var("ATELIER_LOG_FORMAT").is_ok_and(|v| v == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn serve(args: &[String]) -> Result<ExitCode, CliError> {
    check_flags(args, &["--listen", "--data-dir", "--config"], &[])?;
    init_logging();
    let s = settings(args)?;
    let store = open_store(&s)?;
    let keys = keys(&s.data_dir)?;
    let mut http_config = HttpConfig::new(s.listen.clone(), s.data_dir.clone());
    http_config.heartbeat_ms = s.heartbeat_ms;
    http_config.connections_max = s.max_connections;
    http_config.metrics_public = s.metrics_public;
    let dyn_store: Arc<dyn EventStore> = store.clone();
    let workers_config = WorkersConfig::load(s.config_text.as_deref(), &|k| std::env::var(k).ok())?;
    let pipelines = workers_config.pipelines.keys().cloned().collect();
    let exe = std::env::current_exe().map_err(|e| CliError(format!("cannot find the atelier binary: {e}")))?;
    let data_dir = std::fs::canonicalize(&s.data_dir).unwrap_or_else(|_| s.data_dir.clone());
    let controller = Controller::start(dyn_store.clone(), workers_config, data_dir.clone(), exe)?;
    let workers = Arc::new(Workers { controller, data_dir, pipelines });
    let executors: Arc<dyn Executors> = workers.clone();
    let server = Server::start(http_config, dyn_store, keys.clone(), Some(executors))?;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    let addr = server.local_addr();
    let admin = keys.issue("admin", Role::Admin, now_s() + 24 * 3600);
    tracing::info!(%addr, data_dir = %s.data_dir.display(), "atelier is serving");
    println!("atelier listening on http://{addr}");
    println!("open the status page as a local admin: http://{addr}/?token={admin}");
    let retention = s.retention_days.map(|d| Duration::from_secs(d * 86_400));
    let mut last_prune = std::time::Instant::now() - Duration::from_secs(3600);
    while !STOP.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
        if let Some(keep) = retention {
            if last_prune.elapsed() >= Duration::from_secs(3600) {
                last_prune = std::time::Instant::now();
                let before = (now_s() - keep.as_secs() as i64) * 1000;
                match store.prune_terminal_before(before) {
                    Ok(n) if n > 0 => tracing::info!(pruned = n, "retention pruned terminal commissions"),
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "retention failed"),
                }
            }
        }
    }
    tracing::info!("shutting down: no new connections, ending streams, finishing appends");
    server.shutdown();
    workers.controller.shutdown();
    store.close();
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

fn token(args: &[String]) -> Result<ExitCode, CliError> {
    check_flags(args, &["--user", "--ttl", "--data-dir", "--config"], &["--admin"])?;
    let user = flag(args, "--user")?.ok_or_else(|| CliError("--user NAME is required".into()))?;
    if user.is_empty() || user.contains('/') || user.chars().any(char::is_control) {
        return Err(CliError("--user: a non-empty name without '/' or control characters".into()));
    }
    let ttl = parse_ttl(&flag(args, "--ttl")?.unwrap_or_else(|| "24h".into()))?;
    let role = if args.iter().any(|a| a == "--admin") { Role::Admin } else { Role::User };
    let s = settings(args)?;
    println!("{}", keys(&s.data_dir)?.issue(&user, role, now_s() + ttl));
    Ok(ExitCode::SUCCESS)
}

fn replay(args: &[String]) -> Result<ExitCode, CliError> {
    check_flags(args, &["--data-dir", "--config"], &["--check"])?;
    if !args.iter().any(|a| a == "--check") {
        return Err(CliError("replay needs --check".into()));
    }
    let s = settings(args)?;
    let store = open_store(&s)?;
    let report = check::replay_check(&store)?;
    println!(
        "replayed {} events ({} pruned) into {} commissions and {} jobs in {:.2?}",
        report.events, report.pruned, report.commissions, report.jobs, report.elapsed
    );
    if report.diff.is_empty() {
        println!("projections match the log");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("projections differ from the log:");
        for line in &report.diff {
            println!("  {line}");
        }
        Ok(ExitCode::from(1))
    }
}

fn export(args: &[String]) -> Result<ExitCode, CliError> {
    check_flags(args, &["--out", "--data-dir", "--config"], &[])?;
    let s = settings(args)?;
    let store = open_store(&s)?;
    let n = match flag(args, "--out")? {
        Some(path) => {
            let f = std::fs::File::create(&path).map_err(|e| CliError(format!("cannot create {path}: {e}")))?;
            check::export(&store, &mut std::io::BufWriter::new(f))?
        }
        None => check::export(&store, &mut std::io::BufWriter::new(std::io::stdout().lock()))?,
    };
    eprintln!("exported {n} events");
    Ok(ExitCode::SUCCESS)
}

fn import(args: &[String]) -> Result<ExitCode, CliError> {
    check_flags(args, &["--data-dir", "--config"], &[])?;
    let path = args.iter().find(|a| !a.starts_with("--")).ok_or_else(|| CliError("import FILE: which file?".into()))?;
    let f = std::fs::File::open(path).map_err(|e| CliError(format!("cannot open {path}: {e}")))?;
    let s = settings(args)?;
    let store = open_store(&s)?;
    let n = check::import(&store, &mut std::io::BufReader::new(f))?;
    eprintln!("imported {n} events");
    Ok(ExitCode::SUCCESS)
}
