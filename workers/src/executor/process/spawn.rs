//! Getting a job's worker process running: its pipes, its stdin, its environment, the
//! trampoline's arguments, and the one spawner thread that starts every worker.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

use std::sync::Mutex;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};

use super::classify::Applied;
use crate::config::PipelineConfig;
use crate::contain::Known;
use crate::inside::pipe::PROTOCOL_FD;
use crate::inside::pipeline::JobInput;
use crate::inside::trampoline::TrampolineArgs;
use crate::inside::worker::{WorkerArgs, INPUT_STDIN};
use crate::program::INTERFACE;
use crate::shared::Shared;

/// How long a spawn may take before the job counts it as failed.
const SPAWN_REPLY_TIMEOUT_MS: u64 = 30_000;
/// PATH given to workers when the server has none.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Handed to the spawner thread.
pub(crate) struct SpawnRequest {
    pub(crate) args: Vec<String>,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) cwd: PathBuf,
    pub(crate) stdin: File,
    pub(crate) stdout: OwnedFd,
    pub(crate) stderr: OwnedFd,
    /// The protocol pipe's write end; inherited by the child only (see `spawn_one`).
    pub(crate) proto_w: OwnedFd,
    pub(crate) reply: Sender<io::Result<(Child, Known)>>,
}

/// The one long-lived thread that spawns workers. PR_SET_PDEATHSIG fires when the thread
/// that spawned a process exits, not the process, so spawning from short-lived job threads
/// would kill workers when their job thread ends.
fn spawner_loop(exe: PathBuf, rx: Receiver<SpawnRequest>) {
    for req in rx {
        let reply = req.reply.clone();
        let _ = reply.send(spawn_one(&exe, req));
    }
}

fn spawn_one(exe: &Path, req: SpawnRequest) -> io::Result<(Child, Known)> {
    // The protocol pipe is created close-on-exec so no other child inherits it; it is made
    // inheritable only here, on the one spawning thread, for exactly this spawn.
    fcntl(req.proto_w.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty())).map_err(io::Error::from)?;
    // No pre_exec: std then uses posix_spawn (vfork-like, ~1 ms whatever the server's RSS).
    // process_group(0) is done by posix_spawn itself, so the group exists before we return
    // and a kill of the group can never miss the worker.
    let result = crate::contain::spawn(std::os::unix::process::CommandExt::process_group(
        std::process::Command::new(exe)
            .args(&req.args)
            .env_clear()
            .envs(req.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&req.cwd)
            .stdin(Stdio::from(req.stdin))
            .stdout(Stdio::from(req.stdout))
            .stderr(Stdio::from(req.stderr)),
        0,
    ));
    drop(req.proto_w);
    result
}

pub(crate) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(io::Error::from)
}

/// The way to the spawner thread, and what every spawn needs to know about this server.
pub(crate) struct Spawner {
    /// `None` once stopped: nothing spawns after shutdown began.
    tx: Mutex<Option<Sender<SpawnRequest>>>,
    /// The program the trampoline runs as (the server's own binary or `atelier-worker`).
    exe: PathBuf,
    server_pid: u32,
}

impl Spawner {
    /// Starts the spawner thread for workers of program `exe`.
    pub(crate) fn start(exe: PathBuf) -> io::Result<(Spawner, std::thread::JoinHandle<()>)> {
        let (tx, rx) = crossbeam_channel::unbounded::<SpawnRequest>();
        let loop_exe = exe.clone();
        let handle = std::thread::Builder::new()
            .name("atelier-spawner".into())
            .spawn(move || spawner_loop(loop_exe, rx))?;
        Ok((Spawner { tx: Mutex::new(Some(tx)), exe, server_pid: std::process::id() }, handle))
    }

    /// Nothing spawns from now on; the spawner thread ends once its queue is empty.
    pub(crate) fn close(&self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
    }

    /// Spawns the worker of `input.job_id` (through the spawner thread).
    pub(crate) fn spawn_worker(
        &self,
        shared: &Shared,
        p: &PipelineConfig,
        dir: &Path,
        input: &JobInput,
        spec_file: &Path,
        applied: &Applied,
    ) -> std::io::Result<SpawnedWorker> {
        use std::os::fd::AsRawFd;
        let (proto_r, proto_w) = pipe()?;
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        let stdin = input_memfd(input)?;
        // A worker program of the pipeline's own runs in its job's dir, made now. The built-in
        // worker is told where its dir is and makes it only if it puts something there
        // (`RunEnv::make_job_dir`); it runs in the jobs dir meanwhile.
        let (worker_argv, cwd) = match &p.command {
            Some(cmd) => {
                crate::inside::private::create_dir_all(dir)?;
                (cmd.clone(), dir.to_path_buf())
            }
            None => {
                let args = WorkerArgs {
                    input: PathBuf::from(INPUT_STDIN),
                    pipeline_file: spec_file.to_path_buf(),
                    artifacts_dir: shared.data_dir.artifacts(),
                    job_dir: Some(dir.to_path_buf()),
                    tick_ms: (applied.heartbeat_ms / 4).clamp(10, 1000),
                    behave: None,
                };
                let mut v = vec![self.exe.display().to_string(), "__worker".to_string()];
                v.extend(args.to_args());
                v.extend(p.worker_args.iter().cloned());
                (v, shared.data_dir.jobs())
            }
        };
        let t = TrampolineArgs {
            server_pid: self.server_pid,
            proto_fd: proto_w.as_raw_fd(),
            memory_bytes: applied.memory_mb * 1024 * 1024,
            cpu_seconds: p.limits.cpu_seconds,
            nofile_max: p.limits.nofile_max,
            nproc_max: p.limits.nproc_max,
            fsize_bytes: p.limits.fsize_mb * 1024 * 1024,
            interface: INTERFACE.into(),
            argv: worker_argv,
        };
        let mut args = vec!["__trampoline".to_string()];
        args.extend(t.to_args());
        let (reply_tx, reply_rx) = crossbeam_channel::bounded(1);
        let req = SpawnRequest {
            args,
            env: worker_env(shared, p, input, dir),
            cwd,
            stdin,
            stdout: out_w,
            stderr: err_w,
            proto_w,
            reply: reply_tx,
        };
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let tx = tx.ok_or_else(|| std::io::Error::other("the spawner is stopped"))?;
        tx.send(req).map_err(|_| std::io::Error::other("the spawner is gone"))?;
        let (child, known) = reply_rx
            .recv_timeout(Duration::from_millis(SPAWN_REPLY_TIMEOUT_MS))
            .map_err(|_| std::io::Error::other("the spawner did not answer"))??;
        Ok((child, known, proto_r, out_r, err_r))
    }
}

pub(crate) type SpawnedWorker = (
    std::process::Child,
    crate::contain::Known,
    std::os::fd::OwnedFd,
    std::os::fd::OwnedFd,
    std::os::fd::OwnedFd,
);

/// The environment of a job's worker: a PATH, what the pipeline passes or sets, and the job's
/// own variables.
fn worker_env(shared: &Shared, p: &PipelineConfig, input: &JobInput, dir: &Path) -> Vec<(String, String)> {
    let mut env = vec![(
        "PATH".to_string(),
        std::env::var("PATH").ok().filter(|p| !p.is_empty()).unwrap_or_else(|| DEFAULT_PATH.to_string()),
    )];
    for name in &p.pass_env {
        if let Ok(v) = std::env::var(name) {
            env.push((name.clone(), v));
        }
    }
    env.extend(p.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.extend([
        ("ATELIER_JOB_ID".to_string(), input.job_id.to_string()),
        ("ATELIER_COMMISSION_ID".to_string(), input.commission_id.to_string()),
        // The attempt this job is, counted from 1 (as the job input has it).
        ("ATELIER_ATTEMPT".to_string(), input.attempt.to_string()),
        ("ATELIER_JOB_DIR".to_string(), dir.display().to_string()),
        ("ATELIER_ARTIFACTS_DIR".to_string(), shared.data_dir.artifacts().display().to_string()),
        ("ATELIER_PROTOCOL_FD".to_string(), PROTOCOL_FD.to_string()),
    ]);
    env
}

/// The job's input as an anonymous in-memory file, rewound: the worker's stdin. A regular,
/// seekable file, but with nothing on disk.
fn input_memfd(input: &JobInput) -> std::io::Result<std::fs::File> {
    use std::io::{Seek, Write};
    use std::os::fd::FromRawFd;
    let text = serde_json::to_vec(input).map_err(std::io::Error::other)?;
    // SAFETY: memfd_create takes a NUL-terminated name and flags, and returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"atelier-input".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.write_all(&text)?;
    f.rewind()?;
    Ok(f)
}
