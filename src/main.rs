//! The `atelier` binary: parses the command line (`cli`), validates the settings
//! (`settings`), calls into the crates and turns their errors into messages and exit codes.
//! No logic of its own beyond that wiring.

mod cli;
mod settings;
mod systemd;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use atelier_config::{ConfigError, Sources};
use atelier_http::client::printable::printable_json;
use atelier_http::client::watch::{self, Outcome, WatchError};
use atelier_http::client::{Client, ClientError};
use atelier_http::secret::{SecretError, Stamp};
use atelier_http::{BuildInfo, Executors, HttpConfig, HttpError, Keys, Role, Server, TlsFiles};
use atelier_storage::{
    check, DataDirLock, EventStore, NodeConfig, PgConfig, PgStore, Prune, Retention, SledStore, StorageError,
    StoreConfig,
};
use atelier_workers::{BackupError, ProgramError, ProgramSource, Workers, WorkersConfig, WorkersError};
use clap::{CommandFactory, Parser};

use cli::{ClientArgs, Command, SecretAction, StoreArgs};
use settings::{ClientSettings, NoToken, Overrides, ServerSettings};

/// The exit code of every runtime error (usage errors are clap's, also 2).
const EXIT_ERROR: u8 = 2;
/// How often the server's main loop looks at the stop flag and retention.
const SERVE_TICK: Duration = Duration::from_millis(100);
/// How long the sign-in link the server prints is valid: it lands in the service's log
/// (journald), so it must be short-lived; a lasting token comes from `atelier token`.
const SIGN_IN_LINK_TTL_S: i64 = 15 * 60;
/// How often a running server looks at the secret file for a rotation.
const SECRET_CHECK_INTERVAL: Duration = Duration::from_secs(1);

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Why a command failed. Each variant keeps the error it came from, so `main` can print the
/// whole chain.
#[derive(Debug)]
enum CliError {
    /// An argument clap accepted but its value is unusable (not JSON, a bad TTL or user name).
    Usage(String),
    UnknownHiddenMode(String),
    Config(ConfigError),
    Storage(StorageError),
    Secret(SecretError),
    Program(ProgramError),
    Workers(WorkersError),
    Http(HttpError),
    Client(ClientError),
    Watch(WatchError),
    NoToken(NoToken),
    Backup(BackupError),
    /// A file or the binary's own path: `what` says which.
    Io {
        what: String,
        source: std::io::Error,
    },
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CliError::Usage(msg) => f.write_str(msg),
            CliError::UnknownHiddenMode(mode) => write!(f, "unknown command '{mode}'; see `atelier help`"),
            CliError::Io { what, .. } => f.write_str(what),
            // The rest say what went wrong themselves; their sources follow in the chain.
            CliError::Config(e) => e.fmt(f),
            CliError::Storage(e) => e.fmt(f),
            CliError::Secret(e) => e.fmt(f),
            CliError::Program(e) => e.fmt(f),
            CliError::Workers(e) => e.fmt(f),
            CliError::Http(e) => e.fmt(f),
            CliError::Client(e) => e.fmt(f),
            CliError::Watch(e) => e.fmt(f),
            CliError::NoToken(e) => e.fmt(f),
            CliError::Backup(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for CliError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        // A wrapped error is displayed as this one, so the chain goes on with its source.
        match self {
            CliError::Usage(_) | CliError::UnknownHiddenMode(_) => None,
            CliError::Io { source, .. } => Some(source),
            CliError::Config(e) => e.source(),
            CliError::Storage(e) => e.source(),
            CliError::Secret(e) => e.source(),
            CliError::Program(e) => e.source(),
            CliError::Workers(e) => e.source(),
            CliError::Http(e) => e.source(),
            CliError::Client(e) => e.source(),
            CliError::Watch(e) => e.source(),
            CliError::NoToken(e) => e.source(),
            CliError::Backup(e) => e.source(),
        }
    }
}

macro_rules! from_error {
    ($($variant:ident($ty:ty)),* $(,)?) => {
        $(impl From<$ty> for CliError {
            fn from(e: $ty) -> Self {
                CliError::$variant(e)
            }
        })*
    };
}

from_error!(
    Config(ConfigError),
    Storage(StorageError),
    Secret(SecretError),
    Program(ProgramError),
    Workers(WorkersError),
    Http(HttpError),
    Client(ClientError),
    Watch(WatchError),
    NoToken(NoToken),
    Backup(BackupError),
);

fn io_error(what: String) -> impl FnOnce(std::io::Error) -> CliError {
    move |source| CliError::Io { what, source }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Hidden: the worker side of the job controller (see workers/), before clap sees it.
    if let Some(hidden) = args.first().filter(|a| a.starts_with("__")) {
        return match atelier_workers::run_hidden_mode(&args) {
            Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
            None => report(&CliError::UnknownHiddenMode(hidden.clone())),
        };
    }
    let cli = cli::Cli::parse();
    let Some(command) = cli.command else {
        // Bare `atelier` prints the help and succeeds, as `atelier help` does.
        let _ = cli::Cli::command().print_help();
        return ExitCode::SUCCESS;
    };
    match run(command) {
        Ok(code) => code,
        Err(e) => report(&e),
    }
}

/// Prints `atelier: <error>` and a `caused by:` line for each source.
fn report(e: &CliError) -> ExitCode {
    eprintln!("atelier: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        eprintln!("  caused by: {s}");
        source = s.source();
    }
    if let Some(what_to_do) = what_to_do(e) {
        eprintln!("  what to do: {what_to_do}");
    }
    ExitCode::from(EXIT_ERROR)
}

/// The operator's next step, where the error alone does not say it.
fn what_to_do(e: &CliError) -> Option<String> {
    match e {
        // Projections are rebuilt at open; only the log itself failing its checks gets here.
        CliError::Storage(StorageError::Corruption { seq, .. }) => Some(format!(
            "the log itself fails its checks at seq {seq}, and Atelier does not guess past a bad \
             record. Stop every atelier on this data dir, keep a copy of it as it is, then restore \
             the data dir from a backup (`atelier import` of an export taken before); the records \
             before seq {seq} are what the copy can still give."
        )),
        _ => None,
    }
}

fn run(command: Command) -> Result<ExitCode, CliError> {
    match command {
        Command::Serve { listen, store } => serve(listen, store),
        Command::Token { user, admin, ttl, store } => token(&user, admin, &ttl, store),
        Command::Secret { action: SecretAction::Rotate { store } } => rotate_secret(store),
        Command::Replay { check: _, store } => replay(store),
        Command::Export { out, store } => export(out, store),
        Command::Import { file, store } => import(file, store),
        Command::Backup { dir, client } => backup(&dir, client),
        Command::Submit { context, pipeline, priority, client } => {
            submit(&context, pipeline, priority, client)
        }
        Command::Watch { id, client } => watch_command(id, client),
        Command::Status { id, client } => status(id, client),
        Command::List { state, limit, client } => list(state, limit, client),
    }
}

/// The server's settings from `--config` (else `ATELIER_CONFIG`, else ./atelier.toml), the
/// environment and the flags.
fn server_settings(
    store: StoreArgs,
    listen: Option<String>,
) -> Result<(ServerSettings, Sources<'static>), CliError> {
    let sources = Sources::discover(store.config.as_deref(), &atelier_config::process_env)?;
    let settings = ServerSettings::load(&sources, Overrides { listen, data_dir: store.data_dir })?;
    Ok((settings, sources))
}

/// The store the settings choose: PostgreSQL when `ATELIER_DATABASE_URL` names a database,
/// else the data dir's sled store.
enum Store {
    Sled(Arc<SledStore>),
    /// The lock keeps a second server off the data dir, as sled's own lock does.
    Pg {
        store: Arc<PgStore>,
        _lock: DataDirLock,
    },
}

impl Store {
    fn shared(&self) -> Arc<dyn EventStore> {
        match self {
            Store::Sled(s) => s.clone(),
            Store::Pg { store, .. } => store.clone(),
        }
    }

    fn close(&self) {
        match self {
            Store::Sled(s) => s.close(),
            Store::Pg { store, .. } => store.close(),
        }
    }
}

/// The store as `atelier serve` opens it: on PostgreSQL, as a node of those sharing the
/// database.
fn open_node_store(s: &ServerSettings) -> Result<Store, CliError> {
    open_store_as(s, Some(s.node.clone()))
}

/// The store as the other commands open it: on PostgreSQL, with the database to themselves.
fn open_store(s: &ServerSettings) -> Result<Store, CliError> {
    open_store_as(s, None)
}

fn open_store_as(s: &ServerSettings, node: Option<NodeConfig>) -> Result<Store, CliError> {
    Ok(match &s.database_url {
        Some(url) => {
            std::fs::create_dir_all(&s.data_dir)
                .map_err(io_error(format!("cannot create the data dir {}", s.data_dir.display())))?;
            let lock = DataDirLock::acquire(&s.data_dir)?;
            Store::Pg {
                store: PgStore::open({
                    let config = PgConfig { ca_file: s.database_ca.clone(), ..PgConfig::new(url.clone()) };
                    match node {
                        Some(node) => config.as_node(node),
                        None => config.one_server(),
                    }
                })?,
                _lock: lock,
            }
        }
        None => Store::Sled(SledStore::open(s.store_config())?),
    })
}

/// The token keys: refuses a short or exposed secret before anything is written.
fn keys(s: &ServerSettings) -> Result<Keys, CliError> {
    let secret = atelier_http::secret::load_or_create(s.secret.as_deref(), &s.data_dir)?;
    Ok(Keys::new(&secret).with_ttl_max_s(s.token_ttl_max_s))
}

/// Makes every file and dir this process (and the workers it starts) creates private to its
/// owner: the data dir holds the log, the secret, users' job logs and artifacts, and an export
/// holds every user's data. sled creates its files itself, so the umask is the one place that
/// reaches them.
fn private_files() {
    // SAFETY: umask only sets the process's file mode mask; it cannot fail.
    unsafe {
        libc::umask(0o077);
    }
}

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
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

/// The executors as the HTTP side sees them: every answer comes from the running `Workers`.
struct ServedExecutors {
    workers: Workers,
}

impl Executors for ServedExecutors {
    fn is_running(&self) -> bool {
        self.workers.is_running()
    }

    fn metrics_text(&self) -> String {
        self.workers.metrics_text()
    }

    fn job_log_paths(&self, job_id: u64) -> (PathBuf, PathBuf) {
        self.workers.data_dir().job_logs(job_id)
    }

    fn artifacts_dir(&self) -> PathBuf {
        self.workers.data_dir().artifacts()
    }

    fn job_dirs_keep_ms(&self) -> Option<u64> {
        self.workers.job_dirs_keep().map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    fn pipeline_exists(&self, name: &str) -> bool {
        self.workers.has_pipeline(name)
    }

    fn pipeline_names(&self) -> Vec<String> {
        self.workers.pipeline_names()
    }
}

/// Starts the executors on `store`, with the worker program the settings name (or the one
/// beside this binary).
fn start_workers(
    s: &ServerSettings,
    sources: &Sources<'_>,
    store: Arc<dyn EventStore>,
) -> Result<Arc<ServedExecutors>, CliError> {
    let mut workers_config = WorkersConfig::from_sources(sources)?;
    // The server owns its process: it may end whatever a job leaves behind outside its group.
    workers_config.contain_descendants = true;
    let server_exe = std::env::current_exe().map_err(io_error("cannot find the atelier binary".into()))?;
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
    let data_dir = std::fs::canonicalize(&s.data_dir).unwrap_or_else(|_| s.data_dir.clone());
    let workers = Workers::start(store, workers_config, data_dir, program.path)?;
    Ok(Arc::new(ServedExecutors { workers }))
}

fn serve(listen: Option<String>, store_args: StoreArgs) -> Result<ExitCode, CliError> {
    init_logging();
    // First: a worker runs as our user, and must not read our environment (the secret) or
    // memory through /proc.
    if let Err(e) = atelier_workers::become_undumpable() {
        tracing::warn!(error = %e, "cannot make the server non-dumpable; a worker of its user can read /proc/<server>/environ");
    }
    private_files();
    let (s, sources) = server_settings(store_args, listen)?;
    // The secret first: a refused one leaves the data dir untouched.
    let keys = keys(&s)?;
    let store = open_node_store(&s)?;
    let mut http_config = HttpConfig::new(s.listen.clone(), s.data_dir.clone());
    http_config.heartbeat_ms = s.heartbeat_ms;
    http_config.connections_max = s.max_connections;
    http_config.connections_per_ip_max = s.max_connections_per_ip;
    http_config.metrics_public = s.metrics_public;
    http_config.header_timeout_ms = s.header_timeout_ms;
    http_config.body_timeout_ms = s.body_timeout_ms;
    http_config.tls = s.tls.clone().map(|(cert, key)| TlsFiles { cert, key });
    http_config.trusted_proxies = s.trusted_proxies.clone();
    http_config.build = BuildInfo {
        version: env!("CARGO_PKG_VERSION").to_string(),
        revision: env!("ATELIER_REVISION").to_string(),
    };
    let http_config = http_config.with_share_limits(s.share_limits);
    let dyn_store = store.shared();
    let executors = start_workers(&s, &sources, dyn_store.clone())?;
    let server = Server::start(http_config, dyn_store.clone(), keys.clone(), Some(executors.clone()))?;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    let addr = server.local_addr();
    let link_ttl_s = SIGN_IN_LINK_TTL_S.min(keys.ttl_max_s());
    let admin = keys
        .issue("admin", Role::Admin, now_s(), link_ttl_s)
        .expect("invariant: the lifetime is within the maximum");
    tracing::info!(%addr, data_dir = %s.data_dir.display(), "atelier is serving");
    let scheme = if s.tls.is_some() { "https" } else { "http" };
    println!("atelier listening on {scheme}://{addr}");
    // The store is open and the listener accepts (connections wait in its backlog until the
    // accept thread takes them): the service manager may send traffic and start dependents.
    systemd::ready(&format!("serving on {scheme}://{addr}"));
    let watchdog = {
        let (store, executors) = (dyn_store.clone(), executors.clone());
        systemd::Watchdog::start(vec![
            systemd::Beat::new("log writer", move || store.writer_beats()),
            systemd::Beat::new("scheduler", move || Some(executors.workers.scheduler_beats())),
        ])
    };
    let lifetime = match link_ttl_s % 60 {
        0 => format!("{} minutes", link_ttl_s / 60),
        _ => format!("{link_ttl_s} seconds"),
    };
    println!("open the status page as a local admin (this link works for {lifetime}): {scheme}://{addr}/?token={admin}");
    let prunable: Arc<dyn Prune> = match &store {
        Store::Sled(sled) => sled.clone(),
        Store::Pg { store, .. } => store.clone(),
    };
    let mut retention = s.retention_days.map(|days| (prunable, Retention::days(days)));
    let maintenance = store.shared();
    let mut secret_watch = SecretWatch::new(&s);
    while !STOP.load(Ordering::SeqCst) {
        std::thread::sleep(SERVE_TICK);
        if let Some(w) = &mut secret_watch {
            w.tick(&keys);
        }
        // Of the nodes sharing a database, one prunes: the maintainer.
        if let Some((store, r)) = retention.as_mut().filter(|_| maintenance.is_maintainer()) {
            r.tick(&**store, now_s().saturating_mul(1000));
        }
    }
    tracing::info!("shutting down: no new connections, ending streams, finishing appends");
    // The stop is bounded by the service manager's stop timeout, not by the watchdog.
    if let Some(w) = watchdog {
        w.stop();
    }
    systemd::stopping();
    server.shutdown();
    executors.workers.shutdown();
    store.close();
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

fn token(user: &str, admin: bool, ttl: &str, store: StoreArgs) -> Result<ExitCode, CliError> {
    if user.is_empty() || user.contains('/') || user.chars().any(char::is_control) {
        return Err(CliError::Usage("--user: a non-empty name without '/' or control characters".into()));
    }
    let ttl = settings::parse_ttl(ttl).map_err(|e| CliError::Usage(format!("--ttl: {e}")))?;
    let role = if admin { Role::Admin } else { Role::User };
    private_files();
    let (s, _) = server_settings(store, None)?;
    let token = keys(&s)?.issue(user, role, now_s(), ttl).map_err(|e| {
        CliError::Usage(format!(
            "--ttl: {e}; pass a shorter --ttl or raise token_ttl_max (ATELIER_TOKEN_TTL_MAX)"
        ))
    })?;
    println!("{token}");
    Ok(ExitCode::SUCCESS)
}

/// `atelier secret rotate`: a new secret in the data dir, written like the first one.
fn rotate_secret(store: StoreArgs) -> Result<ExitCode, CliError> {
    private_files();
    let (s, _) = server_settings(store, None)?;
    atelier_http::secret::rotate(s.secret.as_deref(), &s.data_dir)?;
    println!(
        "wrote a new token secret to {}: tokens signed before no longer work (a running server \
         picks it up within a second); make new ones with `atelier token`",
        s.data_dir.join(atelier_http::secret::SECRET_FILE).display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Notices `atelier secret rotate` from the running server: the secret file's stamp (its
/// inode and mtime; a rotation renames a new file into place) is compared at most every
/// [`SECRET_CHECK_INTERVAL`]. Polling rather than a signal: the rotating command need not
/// know the server's pid nor may signal it (another account, another container on the same
/// volume), and one stat a second costs nothing. Absent when `ATELIER_SECRET` names the
/// secret: there is no file to watch.
struct SecretWatch {
    data_dir: PathBuf,
    stamp: Option<Stamp>,
    checked: Instant,
}

impl SecretWatch {
    fn new(s: &ServerSettings) -> Option<SecretWatch> {
        if s.secret.as_deref().is_some_and(|v| !v.is_empty()) {
            return None;
        }
        Some(SecretWatch {
            data_dir: s.data_dir.clone(),
            stamp: Stamp::of(&s.data_dir),
            checked: Instant::now(),
        })
    }

    /// Rotates `keys` when the file changed. A new file that cannot be used (too short, open
    /// to others) is logged once and the current secret kept: a bad rotation must not lock
    /// every user out, nor let in tokens of a weak key.
    fn tick(&mut self, keys: &Keys) {
        if self.checked.elapsed() < SECRET_CHECK_INTERVAL {
            return;
        }
        self.checked = Instant::now();
        let stamp = Stamp::of(&self.data_dir);
        if stamp.is_none() || stamp == self.stamp {
            return;
        }
        self.stamp = stamp;
        match atelier_http::secret::load_or_create(None, &self.data_dir) {
            Ok(secret) => {
                keys.rotate(&secret);
                tracing::info!("the token secret changed: tokens signed with the earlier one no longer work");
            }
            Err(e) => {
                tracing::error!(error = %e, "the token secret file changed but cannot be used; keeping the current secret")
            }
        }
    }
}

fn replay(store: StoreArgs) -> Result<ExitCode, CliError> {
    private_files();
    let (s, _) = server_settings(store, None)?;
    let report = match open_store(&s)? {
        Store::Sled(store) => {
            if let Some(why) = store.rebuilt_at_open() {
                println!(
                    "the projections disagreed with the log at open ({why}); they were rebuilt from the log"
                );
            }
            check::replay_check(&store)?
        }
        Store::Pg { store, .. } => store.replay_check()?,
    };
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

fn export(out: Option<PathBuf>, store: StoreArgs) -> Result<ExitCode, CliError> {
    private_files();
    let (s, _) = server_settings(store, None)?;
    let store = open_store(&s)?.shared();
    let n = match out {
        Some(path) => {
            let f = std::fs::File::create(&path)
                .map_err(io_error(format!("cannot create {}", path.display())))?;
            check::export(&*store, &mut std::io::BufWriter::new(f))?
        }
        None => check::export(&*store, &mut std::io::BufWriter::new(std::io::stdout().lock()))?,
    };
    eprintln!("exported {n} events");
    Ok(ExitCode::SUCCESS)
}

fn import(file: PathBuf, store: StoreArgs) -> Result<ExitCode, CliError> {
    let f = std::fs::File::open(&file).map_err(io_error(format!("cannot open {}", file.display())))?;
    private_files();
    let (s, _) = server_settings(store, None)?;
    let n = match open_store(&s)? {
        Store::Sled(store) => check::import(&*store, &mut std::io::BufReader::new(f))?,
        Store::Pg { store, .. } => check::import(&*store, &mut std::io::BufReader::new(f))?,
    };
    eprintln!("imported {n} events");
    Ok(ExitCode::SUCCESS)
}

/// `atelier backup DIR`: the server's log as of one seq, imported into DIR, and the artifacts
/// it refers to (see `atelier_workers::restore`).
fn backup(dir: &std::path::Path, args: ClientArgs) -> Result<ExitCode, CliError> {
    private_files();
    let c = client(args)?;
    atelier_workers::check_target(dir)?;
    let mut body = c.backup()?;
    let mut fetch = |hash: &str| match c.bytes(&format!("/artifacts/{hash}.png")) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(ClientError::Api { status: 404, .. }) => Ok(None),
        Err(e) => Err(e.into()),
    };
    let restored = atelier_workers::restore(StoreConfig::new(dir), &mut body.lines, &mut fetch)?;
    println!(
        "backed up {} events (the log through seq {}) and {} artifacts into {}",
        restored.events,
        body.through,
        restored.artifacts,
        dir.display()
    );
    for hash in &restored.artifacts_missing {
        eprintln!("atelier: warning: the server no longer has the artifact {hash}; the copy lacks it");
    }
    eprintln!(
        "the token secret is not in the backup: copy the server's DATA_DIR/secret into {} (or set \
         ATELIER_SECRET) for a server there to accept the same tokens",
        dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn client(args: ClientArgs) -> Result<Client, CliError> {
    let sources = Sources::env_only(&atelier_config::process_env);
    let s = ClientSettings::load(&sources, args.url, args.token)?;
    Ok(Client::new(&s.url, &s.token)?)
}

fn submit(
    context: &str,
    pipeline: Option<String>,
    priority: Option<i64>,
    args: ClientArgs,
) -> Result<ExitCode, CliError> {
    let context: serde_json::Value =
        serde_json::from_str(context).map_err(|e| CliError::Usage(format!("--context: not JSON: {e}")))?;
    let mut body = serde_json::json!({ "context": context });
    if let Some(p) = pipeline {
        body["pipeline"] = p.into();
    }
    if let Some(p) = priority {
        body["priority"] = p.into();
    }
    let (_, snap) = client(args)?.json("POST", "/api/commissions", Some(&body))?;
    println!("{}", snap["task_id"]);
    Ok(ExitCode::SUCCESS)
}

fn status(id: u64, args: ClientArgs) -> Result<ExitCode, CliError> {
    let (_, snap) = client(args)?.json("GET", &format!("/api/commissions/{id}"), None)?;
    // Workers wrote some of it: JSON escapes C0 controls but not DEL or C1 ones.
    let snap = printable_json(&snap);
    println!("{}", serde_json::to_string_pretty(&snap).unwrap_or_default());
    Ok(ExitCode::SUCCESS)
}

fn list(state: Option<String>, limit: u64, args: ClientArgs) -> Result<ExitCode, CliError> {
    let c = client(args)?;
    let (_, me) = c.json("GET", "/api/me", None)?;
    let user = me["user_id"].as_str().unwrap_or_default().to_string();
    let mut path = format!("/api/commissions/user/{user}?limit={limit}");
    if let Some(s) = state {
        path.push_str(&format!("&state={s}"));
    }
    let page = printable_json(&c.json("GET", &path, None)?.1);
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

fn watch_command(id: u64, args: ClientArgs) -> Result<ExitCode, CliError> {
    Ok(match watch::watch(&client(args)?, id)? {
        Outcome::Completed => ExitCode::SUCCESS,
        Outcome::Failed => ExitCode::from(1),
        Outcome::Cancelled => ExitCode::from(3),
    })
}
