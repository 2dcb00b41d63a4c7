//! The `atelier` binary: parses the command line and wires the crates together. No logic of
//! its own beyond turning errors into messages and exit codes.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use atelier_http::client::{Client, ClientError};
use atelier_http::{Executors, HttpConfig, Keys, Role, Server};
use atelier_storage::{check, Durability, EventStore, SledStore, StoreConfig};
use atelier_workers::{ProgramSource, WorkersConfig};

const HELP: &str = "\
atelier — runs commissions (long background jobs) and shows their progress live

USAGE:
    atelier serve   [--listen ADDR] [--data-dir DIR] [--config FILE]
    atelier token   --user NAME [--admin] [--ttl 24h]   print a bearer token (HS256 JWT)
    atelier replay  --check                   rebuild every projection from the log and compare
    atelier export  [--out FILE]              write the log as JSON lines (stdout by default)
    atelier import  FILE                      load an export into an empty data dir
    atelier submit  --context '{...}' [--pipeline P] [--priority N]   create a commission, print its id
    atelier watch   ID     follow a commission live with per-stage bars (exit 0 completed, 1 failed, 3 cancelled)
    atelier status  ID     print a commission's snapshot
    atelier list    [--state S] [--limit N]   list your commissions, newest first
    atelier help

The client commands take --url (or ATELIER_URL, default http://127.0.0.1:8080) and --token (or
ATELIER_TOKEN).

Executors and pipelines are configured in atelier.toml ([workers], [pipelines.NAME]) and with
USE_JOB_CONTROLLER, KEEP_TASK_RUNNER, JOB_CONTROLLER_PRIORITY, MAX_CONCURRENT_JOBS and
PROGRESS_UPDATE_INTERVAL (see workers/README.md).

SETTINGS (environment wins over atelier.toml, which wins over defaults):
    ATELIER_LISTEN            listen address                    127.0.0.1:8080
    ATELIER_DATA_DIR          data directory                    ./atelier-data
    ATELIER_CONFIG            config file                       ./atelier.toml if present
    ATELIER_SECRET            token signing secret              a random secret in DATA_DIR/secret
    ATELIER_DURABILITY        sync | periodic                   sync (acknowledge only after fsync)
    ATELIER_DURABILITY_INTERVAL_MS  periodic: sync this often (a crash loses up to this)  100
    ATELIER_CACHE_BYTES       sled page cache                   67108864
    ATELIER_RETENTION_DAYS    prune terminal commissions older than this   off
    ATELIER_JOB_DIRS_KEEP_DAYS  remove finished jobs' dirs (and logs) after   7 (0 = keep)
    ATELIER_HEARTBEAT_MS      SSE heartbeat interval            15000
    ATELIER_MAX_CONNECTIONS   open connections, streams included 10000
    ATELIER_METRICS_PUBLIC    1 = /metrics without a token      0
    ATELIER_HEADER_TIMEOUT_MS close connections whose headers do not arrive in time   10000
    ATELIER_WORKER_PROGRAM    the program each job runs         atelier-worker next to this binary
                              (`cargo build-worker` makes it), else this binary
    ATELIER_LOG_FORMAT        json for JSON lines               human-readable
    RUST_LOG                  log level filter                  info
";

/// The keys atelier.toml may have at its top level: the server's settings and the executors'
/// tables.
const TOP_LEVEL_KEYS: &[&str] = &[
    "listen",
    "data_dir",
    "durability",
    "durability_interval_ms",
    "cache_capacity_bytes",
    "retention_days",
    "heartbeat_ms",
    "max_connections",
    "metrics_public",
    "header_timeout_ms",
    "worker_program",
    "workers",
    "pipelines",
];

/// How often `ATELIER_DURABILITY=periodic` makes the log durable.
const DURABILITY_INTERVAL_MS_DEFAULT: u64 = 100;

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
        Some(hidden) if hidden.starts_with("__") => match atelier_workers::run_hidden_mode(&args) {
            Some(code) => return exit_code(code),
            None => Err(CliError(format!("unknown command '{hidden}'; see `atelier help`"))),
        },
        Some("token") => token(&args[1..]),
        Some("replay") => replay(&args[1..]),
        Some("export") => export(&args[1..]),
        Some("import") => import(&args[1..]),
        Some("submit") => submit(&args[1..]),
        Some("watch") => watch(&args[1..]),
        Some("status") => status(&args[1..]),
        Some("list") => list(&args[1..]),
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
    controller: atelier_workers::Workers,
    pipelines: Vec<String>,
    job_dirs_keep: Option<Duration>,
}

impl Executors for Workers {
    fn is_running(&self) -> bool {
        self.controller.is_running()
    }

    fn metrics_text(&self) -> String {
        self.controller.metrics_text()
    }

    fn job_log_paths(&self, job_id: u64) -> (PathBuf, PathBuf) {
        self.controller.data_dir().job_logs(job_id)
    }

    fn artifacts_dir(&self) -> PathBuf {
        self.controller.data_dir().artifacts()
    }

    fn job_dirs_keep_ms(&self) -> Option<u64> {
        self.job_dirs_keep.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    fn pipeline_exists(&self, name: &str) -> bool {
        self.pipelines.iter().any(|p| p == name)
    }
}

/// A flag's value: `--name VALUE`.
fn flag(args: &[String], name: &str) -> Result<Option<String>, CliError> {
    match args.iter().position(|a| a == name) {
        None => Ok(None),
        Some(i) => {
            args.get(i + 1).cloned().map(Some).ok_or_else(|| CliError(format!("{name} needs a value")))
        }
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
    header_timeout_ms: u64,
    /// The program each job runs; None: `atelier-worker` next to this binary, else this binary.
    worker_program: Option<PathBuf>,
}

fn settings(args: &[String]) -> Result<Settings, CliError> {
    let config_path = flag(args, "--config")?
        .or_else(|| std::env::var("ATELIER_CONFIG").ok())
        .map(PathBuf::from)
        .or_else(|| Some(PathBuf::from("atelier.toml")).filter(|p| p.exists()));
    let config_text = match &config_path {
        None => None,
        Some(p) => Some(
            std::fs::read_to_string(p).map_err(|e| CliError(format!("cannot read {}: {e}", p.display())))?,
        ),
    };
    let path_text = config_path.as_ref().map_or(String::new(), |p| p.display().to_string());
    let file: toml::Table = match &config_text {
        None => toml::Table::new(),
        Some(text) => text.parse().map_err(|e| CliError(format!("{path_text}: {e}")))?,
    };
    // A misspelt setting must not be ignored in silence ([workers] and [pipelines.*] are
    // checked key by key by the workers' own loader).
    if let Some(unknown) = file.keys().find(|k| !TOP_LEVEL_KEYS.contains(&k.as_str())) {
        let known = TOP_LEVEL_KEYS.join(", ");
        return Err(CliError(format!("{path_text}: unknown setting '{unknown}' (known: {known})")));
    }
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
        Some("periodic") => Durability::Periodic {
            interval_ms: num(
                "ATELIER_DURABILITY_INTERVAL_MS",
                "durability_interval_ms",
                DURABILITY_INTERVAL_MS_DEFAULT,
            )?,
        },
        Some(other) => {
            return Err(CliError(format!(
                "ATELIER_DURABILITY / durability: '{other}' is not sync or periodic"
            )))
        }
    };
    Ok(Settings {
        config_text,
        listen: flag(args, "--listen")?
            .or_else(|| get("ATELIER_LISTEN", "listen"))
            .unwrap_or_else(|| "127.0.0.1:8080".into()),
        data_dir: flag(args, "--data-dir")?
            .or_else(|| get("ATELIER_DATA_DIR", "data_dir"))
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("atelier-data")),
        durability,
        cache_bytes: num(
            "ATELIER_CACHE_BYTES",
            "cache_capacity_bytes",
            atelier_storage::CACHE_CAPACITY_BYTES_DEFAULT,
        )?,
        retention_days: get("ATELIER_RETENTION_DAYS", "retention_days")
            .map(|v| {
                v.parse()
                    .map_err(|_| CliError(format!("ATELIER_RETENTION_DAYS: '{v}' is not a number of days")))
            })
            .transpose()?,
        heartbeat_ms: num("ATELIER_HEARTBEAT_MS", "heartbeat_ms", atelier_http::HEARTBEAT_MS_DEFAULT)?,
        max_connections: usize::try_from(num(
            "ATELIER_MAX_CONNECTIONS",
            "max_connections",
            atelier_http::CONNECTIONS_MAX_DEFAULT as u64,
        )?)
        .unwrap_or(usize::MAX),
        metrics_public: get("ATELIER_METRICS_PUBLIC", "metrics_public")
            .is_some_and(|v| v == "1" || v == "true"),
        header_timeout_ms: num(
            "ATELIER_HEADER_TIMEOUT_MS",
            "header_timeout_ms",
            atelier_http::HEADER_TIMEOUT_MS_DEFAULT,
        )?,
        worker_program: get("ATELIER_WORKER_PROGRAM", "worker_program").map(PathBuf::from),
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
    std::fs::create_dir_all(data_dir)
        .map_err(|e| CliError(format!("cannot create {}: {e}", data_dir.display())))?;
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
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
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
    http_config.header_timeout_ms = s.header_timeout_ms;
    let dyn_store: Arc<dyn EventStore> = store.clone();
    let mut workers_config = WorkersConfig::load(s.config_text.as_deref(), &|k| std::env::var(k).ok())?;
    // The server owns its process: it may end whatever a job leaves behind outside its group.
    workers_config.contain_descendants = true;
    let pipelines = workers_config.pipelines.keys().cloned().collect();
    let job_dirs_keep = workers_config.job_dirs_keep();
    let server_exe =
        std::env::current_exe().map_err(|e| CliError(format!("cannot find the atelier binary: {e}")))?;
    let program = atelier_workers::choose_worker_program(&server_exe, s.worker_program.clone())?;
    match &program.source {
        ProgramSource::ServerInsteadOf { why, .. } => {
            tracing::warn!(program = %program.path.display(), "{why}; jobs run this binary's own worker mode instead")
        }
        ProgramSource::Server => tracing::info!(
            program = %program.path.display(),
            "jobs run this binary's worker mode; a static atelier-worker next to it (`cargo build-worker`) starts in about half the CPU"
        ),
        source => tracing::info!(program = %program.path.display(), ?source, "worker program"),
    }
    let exe = program.path;
    let data_dir = std::fs::canonicalize(&s.data_dir).unwrap_or_else(|_| s.data_dir.clone());
    let controller = atelier_workers::Workers::start(dyn_store.clone(), workers_config, data_dir, exe)?;
    let workers = Arc::new(Workers { controller, pipelines, job_dirs_keep });
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
            let f =
                std::fs::File::create(&path).map_err(|e| CliError(format!("cannot create {path}: {e}")))?;
            check::export(&store, &mut std::io::BufWriter::new(f))?
        }
        None => check::export(&store, &mut std::io::BufWriter::new(std::io::stdout().lock()))?,
    };
    eprintln!("exported {n} events");
    Ok(ExitCode::SUCCESS)
}

fn import(args: &[String]) -> Result<ExitCode, CliError> {
    check_flags(args, &["--data-dir", "--config"], &[])?;
    let path = args
        .iter()
        .find(|a| !a.starts_with("--"))
        .ok_or_else(|| CliError("import FILE: which file?".into()))?;
    let f = std::fs::File::open(path).map_err(|e| CliError(format!("cannot open {path}: {e}")))?;
    let s = settings(args)?;
    let store = open_store(&s)?;
    let n = check::import(&store, &mut std::io::BufReader::new(f))?;
    eprintln!("imported {n} events");
    Ok(ExitCode::SUCCESS)
}

const CLIENT_FLAGS: &[&str] = &["--url", "--token"];
/// How often `watch` tries to reconnect before giving up.
const WATCH_RECONNECTS_MAX: u32 = 120;
const WATCH_RECONNECT_DELAY: Duration = Duration::from_secs(1);

fn client(args: &[String]) -> Result<Client, CliError> {
    let url = flag(args, "--url")?
        .or_else(|| std::env::var("ATELIER_URL").ok().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| "http://127.0.0.1:8080".into());
    let token = flag(args, "--token")?
        .or_else(|| std::env::var("ATELIER_TOKEN").ok().filter(|t| !t.is_empty()))
        .ok_or_else(|| {
            CliError("no token: pass --token or set ATELIER_TOKEN (see `atelier token`)".into())
        })?;
    Ok(Client::new(&url, &token)?)
}

/// The first argument that is not a flag or a flag's value.
fn positional<'a>(args: &'a [String], flags_with_values: &[&str]) -> Option<&'a String> {
    let mut i = 0;
    while i < args.len() {
        if flags_with_values.contains(&args[i].as_str()) {
            i += 2;
        } else if args[i].starts_with("--") {
            i += 1;
        } else {
            return Some(&args[i]);
        }
    }
    None
}

fn task_id(args: &[String], flags: &[&str]) -> Result<u64, CliError> {
    let raw = positional(args, flags).ok_or_else(|| CliError("which commission? pass its id".into()))?;
    raw.parse().map_err(|_| CliError(format!("'{raw}' is not a commission id")))
}

fn submit(args: &[String]) -> Result<ExitCode, CliError> {
    let flags = [CLIENT_FLAGS, &["--context", "--pipeline", "--priority"]].concat();
    check_flags(args, &flags, &[])?;
    let context: serde_json::Value = match flag(args, "--context")? {
        Some(c) => serde_json::from_str(&c).map_err(|e| CliError(format!("--context: not JSON: {e}")))?,
        None => return Err(CliError("--context '{...}' is required".into())),
    };
    let mut body = serde_json::json!({ "context": context });
    if let Some(p) = flag(args, "--pipeline")? {
        body["pipeline"] = p.into();
    }
    if let Some(p) = flag(args, "--priority")? {
        body["priority"] = p.parse::<i64>().map_err(|_| CliError("--priority: an integer".into()))?.into();
    }
    let (_, snap) = client(args)?.json("POST", "/api/commissions", Some(&body))?;
    println!("{}", snap["task_id"]);
    Ok(ExitCode::SUCCESS)
}

fn status(args: &[String]) -> Result<ExitCode, CliError> {
    check_flags(args, CLIENT_FLAGS, &[])?;
    let id = task_id(args, CLIENT_FLAGS)?;
    let (_, snap) = client(args)?.json("GET", &format!("/api/commissions/{id}"), None)?;
    println!("{}", serde_json::to_string_pretty(&snap).unwrap_or_default());
    Ok(ExitCode::SUCCESS)
}

fn list(args: &[String]) -> Result<ExitCode, CliError> {
    let flags = [CLIENT_FLAGS, &["--state", "--limit"]].concat();
    check_flags(args, &flags, &[])?;
    let c = client(args)?;
    let (_, me) = c.json("GET", "/api/me", None)?;
    let user = me["user_id"].as_str().unwrap_or_default().to_string();
    let mut path = format!(
        "/api/commissions/user/{user}?limit={}",
        flag(args, "--limit")?.unwrap_or_else(|| "20".into())
    );
    if let Some(s) = flag(args, "--state")? {
        path.push_str(&format!("&state={s}"));
    }
    let (_, page) = c.json("GET", &path, None)?;
    for item in page["items"].as_array().into_iter().flatten() {
        println!(
            "{:>8}  {:<18} {:<18} {:>3}%  {}",
            item["task_id"].as_u64().unwrap_or(0),
            item["state"].as_str().unwrap_or(""),
            item["stage"].as_str().unwrap_or("-"),
            item["progress_percent"].as_u64().unwrap_or(0),
            item["context"]["title"].as_str().unwrap_or("")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Per-stage progress bars; plain lines when stdout is not a terminal.
struct Bars {
    multi: indicatif::MultiProgress,
    stages: Vec<(String, indicatif::ProgressBar)>,
    plain: bool,
}

impl Bars {
    fn new(snap: &serde_json::Value) -> Bars {
        use std::io::IsTerminal;
        let plain = !std::io::stdout().is_terminal();
        let multi = indicatif::MultiProgress::new();
        if plain {
            multi.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        let style = indicatif::ProgressStyle::with_template("{prefix:>18} [{bar:30}] {pos:>3}% {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> ");
        let stages = snap["stages"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| {
                let bar = multi.add(indicatif::ProgressBar::new(100));
                bar.set_style(style.clone());
                bar.set_prefix(s["name"].as_str().unwrap_or("").replace('_', " "));
                bar.set_position(s["progress_percent"].as_u64().unwrap_or(0));
                (s["name"].as_str().unwrap_or("").to_string(), bar)
            })
            .collect();
        let bars = Bars { multi, stages, plain };
        if plain {
            // Without a terminal there are no bars: print where the commission stands first, so
            // output that starts mid-way (the watch began after some events) is still complete.
            bars.line(&format!(
                "commission {}: {} {}%",
                snap["task_id"],
                snap["state"].as_str().unwrap_or("?"),
                snap["progress_percent"].as_u64().unwrap_or(0)
            ));
            for s in snap["stages"].as_array().into_iter().flatten() {
                bars.line(&format!(
                    "  {:<18} {:<10} {:>3}%",
                    s["name"].as_str().unwrap_or(""),
                    s["state"].as_str().unwrap_or(""),
                    s["progress_percent"].as_u64().unwrap_or(0)
                ));
            }
        }
        bars
    }

    fn line(&self, text: &str) {
        if self.plain {
            println!("{text}");
        } else {
            let _ = self.multi.println(text);
        }
    }

    fn apply(&self, e: &atelier_http::client::StreamEvent) {
        let d = &e.data;
        let stage = d["stage"].as_str().unwrap_or("");
        let state = d["state"].as_str().unwrap_or("");
        let mut reached = true;
        for (name, bar) in &self.stages {
            if name == stage {
                reached = false;
                if let Some(p) = d["stage_progress_percent"].as_u64() {
                    bar.set_position(p);
                }
                if let Some(m) = d["message"].as_str() {
                    bar.set_message(m.to_string());
                }
            } else if reached && !stage.is_empty() || state == "completed" {
                bar.set_position(100);
            }
        }
        self.line(&format!(
            "{:>6} {:<16} {:<18} {:<18} {:>3}%{}",
            e.id.map(|i| i.to_string()).unwrap_or_default(),
            e.event,
            state,
            if stage.is_empty() { "-" } else { stage },
            d["progress_percent"].as_u64().unwrap_or(0),
            d["message"].as_str().map(|m| format!("  {m}")).unwrap_or_default()
        ));
    }
}

fn watch(args: &[String]) -> Result<ExitCode, CliError> {
    check_flags(args, CLIENT_FLAGS, &[])?;
    let id = task_id(args, CLIENT_FLAGS)?;
    let c = client(args)?;
    let (_, snap) = c.json("GET", &format!("/api/commissions/{id}"), None)?;
    let bars = Bars::new(&snap);
    let mut last = snap["last_event_id"].as_u64();
    let mut state = snap["state"].as_str().unwrap_or("").to_string();
    let mut reconnects = 0;
    let mut announced = false;
    while !matches!(state.as_str(), "completed" | "failed" | "cancelled") {
        match c.stream(&format!("/api/progress/{id}/stream"), last) {
            Ok(Some(mut stream)) => {
                // Until the stream ends or breaks (then resume after `last`).
                while let Ok(Some(e)) = stream.next() {
                    reconnects = 0;
                    announced = false;
                    if e.id.is_some() {
                        last = e.id;
                    }
                    state = e.data["state"].as_str().unwrap_or("").to_string();
                    bars.apply(&e);
                }
            }
            Ok(None) => {
                // 204: finished, nothing newer than what we saw.
                let (_, snap) = c.json("GET", &format!("/api/commissions/{id}"), None)?;
                state = snap["state"].as_str().unwrap_or("").to_string();
            }
            Err(ClientError::Api { status, message, .. }) if status < 500 => return Err(CliError(message)),
            Err(e) => tracing::debug!(error = %e, "watch: connection failed"),
        }
        if matches!(state.as_str(), "completed" | "failed" | "cancelled") {
            break;
        }
        if !announced {
            bars.line("reconnecting…");
            announced = true;
        }
        reconnects += 1;
        if reconnects > WATCH_RECONNECTS_MAX {
            return Err(CliError(format!("lost the server for {WATCH_RECONNECTS_MAX} tries; giving up")));
        }
        std::thread::sleep(WATCH_RECONNECT_DELAY);
    }
    let (_, snap) = c.json("GET", &format!("/api/commissions/{id}"), None)?;
    for (_, bar) in &bars.stages {
        bar.abandon();
    }
    match state.as_str() {
        "completed" => {
            let product = &snap["result"]["product"];
            bars.line(&format!("completed: {}", product["title"].as_str().unwrap_or("(no product title)")));
            if let Some(img) = product["image_url"].as_str() {
                bars.line(&format!("image: {img}"));
            }
            Ok(ExitCode::SUCCESS)
        }
        "failed" => {
            bars.line(&format!("failed: {}", snap["error"].as_str().unwrap_or("(no error message)")));
            Ok(ExitCode::from(1))
        }
        _ => {
            bars.line("cancelled");
            Ok(ExitCode::from(3))
        }
    }
}
