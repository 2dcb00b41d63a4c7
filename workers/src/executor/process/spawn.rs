//! Getting a job's worker process running: its pipes, its stdin, its environment, the
//! trampoline's arguments, and the one spawner thread that starts every worker.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use nix::fcntl::{fcntl, FcntlArg, OFlag};

use super::classify::Applied;
use crate::cgroup::{CgroupLimits, Cgroups, JobCgroup};
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
    /// The protocol pipe's write end; the child's fd 3, and no other child's (see `posix_spawn`).
    pub(crate) proto_w: OwnedFd,
    pub(crate) reply: Sender<io::Result<(u32, Known)>>,
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

fn spawn_one(exe: &Path, req: SpawnRequest) -> io::Result<(u32, Known)> {
    let fds =
        [req.stdin.as_raw_fd(), req.stdout.as_raw_fd(), req.stderr.as_raw_fd(), req.proto_w.as_raw_fd()];
    // Known to a sweep from the moment it exists (see `contain`).
    crate::contain::spawn_with(|| posix_spawn(exe, &req.args, &req.env, &req.cwd, fds), |pid| *pid)
}

/// The descriptors a worker gets, in order: stdin, stdout, stderr, the protocol pipe.
const CHILD_FDS: usize = 4;
const _: () = assert!(PROTOCOL_FD as usize == CHILD_FDS - 1);

/// Starts `exe` with `args` and exactly `env`, in `cwd`, as the leader of a new session (and so
/// of a new process group),
/// with `fds[i]` as its descriptor `i`: posix_spawn (vfork-like, ~1 ms whatever the server's
/// RSS; std's `pre_exec` would fork the whole server).
///
/// Every descriptor the server makes is close-on-exec and stays so: the child's copies are
/// made by dup2 file actions inside the child, which clear close-on-exec on the copy only. So
/// no other spawn of the server, at any moment (a task runner's stage command, another job),
/// can inherit this job's pipes. The group exists before this returns, so a kill of the group
/// can never miss the worker.
fn posix_spawn(
    exe: &Path,
    args: &[String],
    env: &[(String, String)],
    cwd: &Path,
    fds: [RawFd; CHILD_FDS],
) -> io::Result<u32> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let nul = |_| io::Error::new(io::ErrorKind::InvalidInput, "an argument contains a NUL byte");
    let path = CString::new(exe.as_os_str().as_bytes()).map_err(nul)?;
    let dir = CString::new(cwd.as_os_str().as_bytes()).map_err(nul)?;
    let mut argv = vec![path.clone()];
    for a in args {
        argv.push(CString::new(a.as_bytes()).map_err(nul)?);
    }
    let envp: Vec<CString> =
        env.iter().map(|(k, v)| CString::new(format!("{k}={v}"))).collect::<Result<_, _>>().map_err(nul)?;
    let mut argv_p: Vec<*mut libc::c_char> = argv.iter().map(|a| a.as_ptr().cast_mut()).collect();
    argv_p.push(std::ptr::null_mut());
    let mut envp_p: Vec<*mut libc::c_char> = envp.iter().map(|a| a.as_ptr().cast_mut()).collect();
    envp_p.push(std::ptr::null_mut());
    // A source below CHILD_FDS could be overwritten by an earlier dup2, or be its own target
    // (a no-op dup2 that would keep close-on-exec): move it up first, still close-on-exec.
    let mut moved = Vec::new();
    let mut src = fds;
    for fd in &mut src {
        if usize::try_from(*fd).is_ok_and(|n| n < CHILD_FDS) {
            let up = fcntl(*fd, FcntlArg::F_DUPFD_CLOEXEC(CHILD_FDS as RawFd)).map_err(io::Error::from)?;
            // SAFETY: F_DUPFD_CLOEXEC just returned this new descriptor; nothing else owns it.
            moved.push(unsafe { OwnedFd::from_raw_fd(up) });
            *fd = up;
        }
    }
    let check = |rc: libc::c_int| if rc == 0 { Ok(()) } else { Err(io::Error::from_raw_os_error(rc)) };
    // SAFETY: the file actions and attributes are initialised before use and destroyed once,
    // below; every pointer passed (paths, argv, envp, both NULL-terminated) outlives the call.
    unsafe {
        let mut actions: libc::posix_spawn_file_actions_t = std::mem::zeroed();
        let mut attr: libc::posix_spawnattr_t = std::mem::zeroed();
        check(libc::posix_spawn_file_actions_init(&mut actions))?;
        if let Err(e) = check(libc::posix_spawnattr_init(&mut attr)) {
            libc::posix_spawn_file_actions_destroy(&mut actions);
            return Err(e);
        }
        let mut sigdefault: libc::sigset_t = std::mem::zeroed();
        let mut sigmask: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut sigmask);
        libc::sigemptyset(&mut sigdefault);
        // std ignores SIGPIPE in the server; a worker gets the default, as std's spawn gives.
        libc::sigaddset(&mut sigdefault, libc::SIGPIPE);
        // A session of its own, not only a process group: a process may join only a group of
        // its own session, so nothing of the job can move into the server's group (out of
        // reach of the job's group kill, and in reach of a signal to the server's group).
        // setsid also makes the worker its group's leader, so no SETPGROUP (which a session
        // leader is refused).
        // (libc declares SETSID a short and the others ints; posix_spawnattr_setflags takes
        // a short, which all of them fit.)
        let flags = libc::c_int::from(libc::POSIX_SPAWN_SETSID)
            | libc::POSIX_SPAWN_SETSIGMASK
            | libc::POSIX_SPAWN_SETSIGDEF;
        let flags = libc::c_short::try_from(flags).expect("invariant: the spawn flags fit a short");
        let mut pid: libc::pid_t = 0;
        let result = (0..CHILD_FDS)
            .try_for_each(|i| {
                check(libc::posix_spawn_file_actions_adddup2(&mut actions, src[i], i as libc::c_int))
            })
            .and_then(|()| check(libc::posix_spawn_file_actions_addchdir_np(&mut actions, dir.as_ptr())))
            .and_then(|()| check(libc::posix_spawnattr_setflags(&mut attr, flags)))
            .and_then(|()| check(libc::posix_spawnattr_setsigmask(&mut attr, &sigmask)))
            .and_then(|()| check(libc::posix_spawnattr_setsigdefault(&mut attr, &sigdefault)))
            .and_then(|()| {
                check(libc::posix_spawn(
                    &mut pid,
                    path.as_ptr(),
                    &actions,
                    &attr,
                    argv_p.as_ptr(),
                    envp_p.as_ptr(),
                ))
            });
        libc::posix_spawn_file_actions_destroy(&mut actions);
        libc::posix_spawnattr_destroy(&mut attr);
        result?;
        Ok(u32::try_from(pid).expect("invariant: posix_spawn returns a positive pid"))
    }
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
    /// Where each job's cgroup is made; `None`: rlimits only.
    cgroups: Option<Cgroups>,
}

impl Spawner {
    /// Starts the spawner thread for workers of program `exe`.
    pub(crate) fn start(
        exe: PathBuf,
        cgroups: Option<Cgroups>,
    ) -> io::Result<(Spawner, std::thread::JoinHandle<()>)> {
        let (tx, rx) = crossbeam_channel::unbounded::<SpawnRequest>();
        let loop_exe = exe.clone();
        let handle = std::thread::Builder::new()
            .name("atelier-spawner".into())
            .spawn(move || spawner_loop(loop_exe, rx))?;
        Ok((Spawner { tx: Mutex::new(Some(tx)), exe, server_pid: std::process::id(), cgroups }, handle))
    }

    /// Where each job's cgroup is made (one dir per hierarchy; none without cgroups).
    pub(crate) fn cgroup_parents(&self) -> Vec<PathBuf> {
        self.cgroups.as_ref().map(Cgroups::parents).unwrap_or_default()
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
        let (proto_r, proto_w) = pipe()?;
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        let stdin = input_memfd(input)?;
        // A worker program of the pipeline's own runs in its job's dir, made now. The built-in
        // worker is told where its dir is and makes it only if it puts something there
        // (`RunEnv::make_job_dir`); it runs in the jobs dir meanwhile. Under a worker user of
        // its own it could not make it (the jobs dir is not the worker's to write), so then
        // every job's dir is made here and handed over.
        let user = shared.worker_user;
        if p.command.is_some() || user.switch_to().is_some() {
            crate::worker_user::hand_over_job_dir(dir, user)?;
        }
        let (worker_argv, cwd) = match &p.command {
            Some(cmd) => (cmd.clone(), dir.to_path_buf()),
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
        let memory_bytes = applied.memory_mb * 1024 * 1024;
        let cgroup = match &self.cgroups {
            Some(c) => Some(
                c.create_job(input.job_id, CgroupLimits { memory_bytes, pids_max: p.limits.nproc_max })
                    .map_err(io::Error::other)?,
            ),
            None => None,
        };
        // What the job's cgroup holds, the rlimits leave alone (0: not set; see `cgroup`).
        let by_cgroup = |holds: fn(&JobCgroup) -> bool, v: u64| match &cgroup {
            Some(cg) if holds(cg) => 0,
            _ => v,
        };
        let t = TrampolineArgs {
            server_pid: self.server_pid,
            proto_fd: PROTOCOL_FD,
            memory_bytes: by_cgroup(JobCgroup::limits_memory, memory_bytes),
            cpu_seconds: p.limits.cpu_seconds,
            nofile_max: p.limits.nofile_max,
            nproc_max: by_cgroup(JobCgroup::limits_pids, p.limits.nproc_max),
            fsize_bytes: p.limits.fsize_mb * 1024 * 1024,
            user: user.switch_to().map(|id| (id.uid, id.gid)),
            cgroup_procs: cgroup
                .iter()
                .flat_map(JobCgroup::procs_files)
                .map(|f| f.display().to_string())
                .collect(),
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
        let (pid, known) = reply_rx
            .recv_timeout(Duration::from_millis(SPAWN_REPLY_TIMEOUT_MS))
            .map_err(|_| std::io::Error::other("the spawner did not answer"))??;
        Ok(SpawnedWorker { pid, known, proto_r, out_r, err_r, cgroup })
    }
}

/// A started worker.
pub(crate) struct SpawnedWorker {
    /// The server's child, for the caller to reap.
    pub(crate) pid: u32,
    /// Its record as a known child (see `contain`).
    pub(crate) known: Known,
    /// The server's ends of the protocol pipe, stdout and stderr.
    pub(crate) proto_r: OwnedFd,
    pub(crate) out_r: OwnedFd,
    pub(crate) err_r: OwnedFd,
    /// The job's cgroup, removed (with whatever is still in it) when dropped.
    pub(crate) cgroup: Option<JobCgroup>,
}

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
        // A stage silent this long is ended as stalled: a stage command can pace its heartbeats.
        ("ATELIER_HEARTBEAT_TIMEOUT_MS".to_string(), shared.config.heartbeat_timeout_ms_for(p).to_string()),
        ("ATELIER_PROTOCOL_FD".to_string(), PROTOCOL_FD.to_string()),
    ]);
    last_wins(env)
}

/// One entry per name, the last one given: an environment with a name twice is read by its
/// first entry (glibc's getenv), so a pipeline's own PATH would lose to the server's, and a
/// pipeline could shadow the job's variables.
fn last_wins(env: Vec<(String, String)>) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::with_capacity(env.len());
    for (k, v) in env {
        match out.iter_mut().find(|(name, _)| *name == k) {
            Some(slot) => slot.1 = v,
            None => out.push((k, v)),
        }
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// Through the whole spawn, the server's copy of a job's protocol pipe stays close-on-exec
    /// (so a spawn on another thread at that moment cannot inherit it), while the child gets
    /// it as its descriptor 3.
    #[test]
    fn the_protocol_pipe_stays_close_on_exec_in_the_server() {
        let (proto_r, proto_w) = pipe().unwrap();
        let (_out_r, out_w) = pipe().unwrap();
        let (_err_r, err_w) = pipe().unwrap();
        let raw = proto_w.as_raw_fd();
        let stop = Arc::new(AtomicBool::new(false));
        let watcher = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut looks = 0u64;
                let mut inheritable = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(flags) = fcntl(raw, FcntlArg::F_GETFD) {
                        looks += 1;
                        if flags & libc::FD_CLOEXEC == 0 {
                            inheritable += 1;
                        }
                    }
                }
                (looks, inheritable)
            })
        };
        // Let the watcher get going before the spawn.
        std::thread::sleep(Duration::from_millis(20));
        let (reply, _) = crossbeam_channel::bounded(1);
        let req = SpawnRequest {
            args: vec!["-c".into(), "echo on-fd-3 >&3".into()],
            env: vec![("PATH".into(), DEFAULT_PATH.into())],
            cwd: PathBuf::from("/"),
            stdin: File::open("/dev/null").unwrap(),
            stdout: out_w,
            stderr: err_w,
            proto_w,
            reply,
        };
        let (pid, _known) = spawn_one(Path::new("/bin/sh"), req).expect("spawns");
        stop.store(true, Ordering::Relaxed);
        let (looks, inheritable) = watcher.join().unwrap();
        let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()), None);
        assert_eq!(status, Ok(nix::sys::wait::WaitStatus::Exited(nix::unistd::Pid::from_raw(pid as i32), 0)));
        assert!(looks > 0, "the watcher looked at the descriptor");
        assert_eq!(inheritable, 0, "the server's copy was inheritable {inheritable} times of {looks}");
        let mut said = String::new();
        File::from(proto_r).read_to_string(&mut said).unwrap();
        assert_eq!(said, "on-fd-3\n");
    }

    /// A name given twice keeps its place and takes its last value: the pipeline's PATH over
    /// the server's, the job's variables over the pipeline's.
    #[test]
    fn a_later_variable_replaces_an_earlier_one() {
        let pair = |k: &str, v: &str| (k.to_string(), v.to_string());
        let env = vec![pair("PATH", "/server"), pair("A", "1"), pair("PATH", "/pipeline"), pair("A", "2")];
        assert_eq!(last_wins(env), vec![pair("PATH", "/pipeline"), pair("A", "2")]);
    }
}
