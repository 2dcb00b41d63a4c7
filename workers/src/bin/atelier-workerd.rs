//! A stand-in for the `atelier` binary's hidden subcommands, so the workers crate can test
//! real worker processes without the server: `atelier-workerd __trampoline ...` and
//! `atelier-workerd __worker ...`. `__crash-test-server DIR` is a minimal server for the
//! crash test: it starts the executors on a store in DIR, starts one hanging job, prints its
//! worker's pid, and waits to be killed.

use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use atelier_engine::{Ctx, NewCommission, RetryPolicy};
use atelier_storage::{EventStore, SledStore, StoreConfig};
use atelier_workers::{Workers, WorkersConfig};

const CRASH_CONFIG: &str = r#"
[workers]
progress_update_interval_seconds = 0
[pipelines.crashy]
worker_args = ["--behave", "hang"]
"#;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(code) = atelier_workers::run_hidden_mode(&args) {
        std::process::exit(code);
    }
    let code = match args.first().map(String::as_str) {
        Some("__crash-test-server") => match args.get(1) {
            Some(dir) => crash_test_server(dir),
            None => 2,
        },
        _ => {
            eprintln!("usage: atelier-workerd __trampoline ... | __worker ... | __crash-test-server DIR");
            2
        }
    };
    std::process::exit(code);
}

fn crash_test_server(dir: &str) -> i32 {
    let dir = std::path::PathBuf::from(dir);
    let run = || -> Result<(), String> {
        let store = SledStore::open(StoreConfig::new(dir.join("store"))).map_err(|e| e.to_string())?;
        let store: std::sync::Arc<dyn EventStore> = store;
        // Workers run as this process's own user (root allowed): the crash test is about the log.
        let me = nix::unistd::geteuid().as_raw().to_string();
        let env = |name: &str| match name {
            "ATELIER_WORKER_USER" => Some(me.clone()),
            "ATELIER_ALLOW_ROOT_WORKERS" => Some("true".to_string()),
            _ => None,
        };
        let cfg = WorkersConfig::load(Some(CRASH_CONFIG), &env).map_err(|e| e.to_string())?;
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let _workers =
            Workers::start(store.clone(), cfg, dir.join("data"), exe).map_err(|e| e.to_string())?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_err(|e| e.to_string())?.as_millis();
        let ctx = Ctx {
            now: i64::try_from(now).map_err(|e| e.to_string())?,
            jitter_seed: 1,
            retry: RetryPolicy::default(),
        };
        let new = NewCommission {
            user_id: "crash".into(),
            pipeline: "crashy".into(),
            priority: 0,
            scheduled_for: None,
            context: "{}".into(),
            idempotency_key: None,
            max_attempts: 3,
        };
        let id = match atelier_storage::create(&*store, new, &ctx)
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?
        {
            atelier_storage::Created::New(c) | atelier_storage::Created::Existing(c) => c.id,
        };
        loop {
            let c = store.commission(id).map_err(|e| e.to_string())?.ok_or("commission vanished")?;
            let job = match c.active_job {
                Some(j) if c.state.stage().is_some() => store.job(j).map_err(|e| e.to_string())?,
                _ => None,
            };
            if let Some(pid) = job.and_then(|j| j.process_id) {
                println!("commission {id} pid {pid}");
                std::io::stdout().flush().map_err(|e| e.to_string())?;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    };
    match run() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("crash test server: {e}");
            1
        }
    }
}
