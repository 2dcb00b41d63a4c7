//! The job controller's side of one worker process: spawn it, watch it, end it, and turn
//! however it ended into exactly one outcome.
//!
//! One thread per job waits in `poll` on everything that can happen to the job at once: the
//! protocol pipe, stdout and stderr, a pidfd that becomes readable when the process exits,
//! and a wake pipe for cancel and shutdown. Deadlines (wall clock, heartbeat, kill grace,
//! the next coalesced progress) become the poll timeout, so nothing polls on a timer.
//!
//! Exit is taken from the pidfd, never from pipe EOF: a grandchild that keeps the pipes open
//! cannot hold the job. When the worker has exited its whole process group is killed before
//! the worker is reaped, so the group id cannot have been reused by then.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use atelier_engine::{JobEnd, JobStatus};
use crossbeam_channel::{Receiver, Sender};
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::contain::Known;
use crate::protocol::{parse_line, LineBuffer};
use crate::session::{job_end, Finish, Halt, Session};

/// Bytes of a worker's stderr kept in memory to explain how it ended.
pub const STDERR_TAIL_BYTES: usize = 2048;
/// Bytes read from a pipe per `read` call.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// After exit, at most this much buffered output is still read from each pipe.
const DRAIN_BYTES_MAX: usize = 4 * 1024 * 1024;
/// A failed memory limit's error text starts with this; the next attempt's memory is
/// doubled once per such failure in a row.
pub const MEMORY_ERROR_PREFIX: &str = "memory limit exceeded";
/// A worker sending more protocol lines than this in one second is flooding and is cut off.
pub const PROTOCOL_LINES_PER_SECOND_MAX: u32 = 10_000;
/// Reports are held this long after the first of a batch before they are appended, so that a
/// burst of lines, or a short job's whole life, is one append (one fsync) rather than one per
/// poll wakeup; far below what anyone watching progress can notice.
const BATCH_WINDOW: Duration = Duration::from_millis(2);
/// Exit codes of the trampoline (see `trampoline.rs`).
const TRAMPOLINE_EXIT_CODES: std::ops::RangeInclusive<i32> = 124..=127;

/// What a running job is asked to do from outside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Request {
    None = 0,
    Cancel = 1,
    Shutdown = 2,
}

/// A request slot plus a pipe that wakes the job's poll. The first request wins.
pub(crate) struct JobSignal {
    state: AtomicU8,
    wake_w: Mutex<Option<OwnedFd>>,
    pub(crate) wake_r: Option<OwnedFd>,
}

impl JobSignal {
    /// With a wake pipe (for process jobs).
    pub(crate) fn with_pipe() -> io::Result<JobSignal> {
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).map_err(io::Error::from)?;
        Ok(JobSignal { state: AtomicU8::new(0), wake_w: Mutex::new(Some(w)), wake_r: Some(r) })
    }

    /// Without one (for in-process jobs, which check the slot themselves).
    pub(crate) fn plain() -> JobSignal {
        JobSignal { state: AtomicU8::new(0), wake_w: Mutex::new(None), wake_r: None }
    }

    pub(crate) fn raise(&self, r: Request) {
        let _ = self.state.compare_exchange(0, r as u8, Ordering::AcqRel, Ordering::Acquire);
        let guard = self.wake_w.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = guard.as_ref() {
            let _ = nix::unistd::write(w, &[1]);
        }
    }

    pub(crate) fn get(&self) -> Request {
        match self.state.load(Ordering::Acquire) {
            1 => Request::Cancel,
            2 => Request::Shutdown,
            _ => Request::None,
        }
    }
}

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
pub(crate) fn spawner_loop(exe: PathBuf, rx: Receiver<SpawnRequest>) {
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

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    let flags = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL).map_err(io::Error::from)?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags)).map_err(io::Error::from)?;
    Ok(())
}

fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = RawFd::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A capped output file: bytes past `max` are dropped, with one note saying so. The file is
/// created at the first byte: most workers print nothing, and a file created per job and
/// stream was a good share of a short job's cost (inode allocation); a missing log reads as
/// empty (`job_log_paths`).
struct LogSink {
    path: PathBuf,
    file: Option<File>,
    /// The file could not be created; do not try again for every chunk.
    failed: bool,
    written: u64,
    max: u64,
    truncated: bool,
}

impl LogSink {
    fn new(path: PathBuf, max: u64) -> LogSink {
        LogSink { path, file: None, failed: false, written: 0, max, truncated: false }
    }

    fn write(&mut self, data: &[u8]) {
        if data.is_empty() || self.failed {
            return;
        }
        if self.file.is_none() {
            // The job's directory too: it is made when something first goes in it.
            if let Some(dir) = self.path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            self.file = File::create(&self.path).ok();
            self.failed = self.file.is_none();
        }
        let Some(f) = self.file.as_mut() else { return };
        let room = usize::try_from(self.max.saturating_sub(self.written)).unwrap_or(usize::MAX);
        let n = room.min(data.len());
        if n > 0 && f.write_all(&data[..n]).is_ok() {
            self.written += n as u64;
        }
        if n < data.len() && !self.truncated {
            self.truncated = true;
            let _ = writeln!(f, "\n[atelier: output cut at {} bytes]", self.max);
        }
    }
}

/// Why the controller ended (or is ending) a worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum KillReason {
    Cancel,
    Shutdown,
    Timeout { seconds: u64 },
    Stalled { ms: u64 },
    Protocol(String),
    Stale(String),
    Storage(String),
}

/// How the kernel says the worker ended.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ExitInfo {
    pub(crate) code: Option<i32>,
    pub(crate) signal: Option<i32>,
    pub(crate) max_rss_bytes: u64,
    pub(crate) cpu_ms: u64,
}

/// The limits this attempt ran under.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Applied {
    pub(crate) memory_mb: u64,
    pub(crate) memory_max_mb: u64,
    pub(crate) cpu_seconds: u64,
    pub(crate) timeout_seconds: u64,
    pub(crate) heartbeat_ms: u64,
}

/// What a job's poll loop watches.
pub(crate) struct Watched {
    pub(crate) child: Child,
    pub(crate) proto_r: OwnedFd,
    pub(crate) out_r: OwnedFd,
    pub(crate) err_r: OwnedFd,
    pub(crate) job_dir: PathBuf,
    pub(crate) log_bytes_max: u64,
    pub(crate) kill_grace: Duration,
}

/// The result of watching: how it ended, and whether the failure was the controller's
/// machinery (as opposed to the job's own doing), which feeds the rollback rate.
pub(crate) struct Ended {
    pub(crate) finish: Finish,
    pub(crate) infra_failure: bool,
}

fn kill_group(pgid: i32, sig: Signal) {
    if let Err(e) = killpg(Pid::from_raw(pgid), sig) {
        if e != nix::errno::Errno::ESRCH {
            tracing::warn!(pgid, signal = %sig, error = %e, "cannot signal the job's process group");
        }
    }
}

/// Watches a started worker to its end and says how it ended.
pub(crate) fn watch(w: Watched, session: &mut Session, signal: &JobSignal, applied: &Applied) -> Ended {
    let pid = i32::try_from(w.child.id()).expect("invariant: pids fit i32");
    let started = Instant::now();
    let wall_deadline = started + Duration::from_secs(applied.timeout_seconds);
    let stall_after = Duration::from_millis(applied.heartbeat_ms);
    let pidfd = pidfd_open(pid);
    for fd in [&w.proto_r, &w.out_r, &w.err_r] {
        let _ = set_nonblocking(fd);
    }
    let mut out_log = LogSink::new(w.job_dir.join("stdout.log"), w.log_bytes_max);
    let mut err_log = LogSink::new(w.job_dir.join("stderr.log"), w.log_bytes_max);
    let mut tail: Vec<u8> = Vec::new();
    let mut lines = LineBuffer::default();
    let mut flood = FloodGuard::new();
    let mut open = [true, true, true];
    let mut last_line = Instant::now();
    let mut kill: Option<KillReason> = None;
    let mut sigkill_at: Option<Instant> = None;
    // When the queued reports are appended (see BATCH_WINDOW).
    let mut commit_at: Option<Instant> = None;

    let ender =
        Ender { pid, grace: w.kill_grace, commission_id: session.commission_id, job_id: session.job_id };
    let end_worker = |kill: &mut Option<KillReason>, sigkill_at: &mut Option<Instant>, reason: KillReason| {
        ender.end(kill, sigkill_at, reason)
    };

    let exit = loop {
        let now = Instant::now();
        let mut deadline: Option<Instant> = None;
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                deadline = Some(deadline.map_or(t, |d: Instant| d.min(t)));
            }
        };
        if kill.is_none() {
            consider(Some(wall_deadline));
            consider(Some(last_line + stall_after));
            consider(session.next_flush_at());
        }
        consider(sigkill_at);
        consider(commit_at);
        if pidfd.is_none() {
            // Old kernel without pidfd: look at the child every 50 ms.
            consider(Some(now + Duration::from_millis(50)));
        }
        let timeout = match deadline {
            None => PollTimeout::NONE,
            Some(d) => {
                let ms = d.saturating_duration_since(now).as_millis().min(60_000);
                // Round up so we do not wake just before the deadline and spin.
                PollTimeout::try_from(u32::try_from(ms).unwrap_or(60_000) + 1).unwrap_or(PollTimeout::MAX)
            }
        };
        let mut fds: Vec<PollFd> = Vec::with_capacity(5);
        let mut slots: Vec<u8> = Vec::with_capacity(5);
        if let Some(p) = pidfd.as_ref() {
            fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
            slots.push(0);
        }
        if let Some(wr) = signal.wake_r.as_ref() {
            fds.push(PollFd::new(wr.as_fd(), PollFlags::POLLIN));
            slots.push(1);
        }
        for (i, fd) in [&w.proto_r, &w.out_r, &w.err_r].into_iter().enumerate() {
            if open[i] {
                fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
                slots.push(2 + u8::try_from(i).expect("invariant: three pipes"));
            }
        }
        let ready: Vec<u8> = match nix::poll::poll(&mut fds, timeout) {
            Ok(_) => fds
                .iter()
                .zip(&slots)
                .filter(|(f, _)| f.revents().is_some_and(|r| !r.is_empty()))
                .map(|(_, s)| *s)
                .collect(),
            Err(nix::errno::Errno::EINTR) => Vec::new(),
            Err(e) => {
                tracing::error!(error = %e, "poll failed; killing the job");
                end_worker(&mut kill, &mut sigkill_at, KillReason::Storage(format!("poll: {e}")));
                std::thread::sleep(Duration::from_millis(10));
                Vec::new()
            }
        };
        drop(fds);
        let mut exited = false;
        for slot in ready {
            match slot {
                0 => exited = true,
                1 => {
                    if let Some(wr) = signal.wake_r.as_ref() {
                        let mut buf = [0u8; 64];
                        while matches!(nix::unistd::read(wr.as_raw_fd(), &mut buf), Ok(n) if n > 0) {}
                    }
                    match signal.get() {
                        Request::Cancel => end_worker(&mut kill, &mut sigkill_at, KillReason::Cancel),
                        Request::Shutdown => end_worker(&mut kill, &mut sigkill_at, KillReason::Shutdown),
                        Request::None => {}
                    }
                }
                2 => {
                    let (data, eof) = read_some(&w.proto_r, READ_CHUNK_BYTES);
                    open[0] = !eof;
                    if !data.is_empty() {
                        last_line = Instant::now();
                    }
                    if kill.is_none() {
                        if let Err(reason) = feed(&mut lines, &data, session, &mut flood) {
                            end_worker(&mut kill, &mut sigkill_at, reason);
                        }
                    }
                }
                3 => {
                    let (data, eof) = read_some(&w.out_r, READ_CHUNK_BYTES);
                    open[1] = !eof;
                    out_log.write(&data);
                }
                _ => {
                    let (data, eof) = read_some(&w.err_r, READ_CHUNK_BYTES);
                    open[2] = !eof;
                    err_log.write(&data);
                    keep_tail(&mut tail, &data);
                }
            }
        }
        if pidfd.is_none() {
            exited = child_exited(pid);
        }
        if kill.is_none() {
            if let Err(h) = session.flush_due() {
                end_worker(&mut kill, &mut sigkill_at, halt_reason(h));
            }
        }
        // What the worker says within BATCH_WINDOW goes to the log in one append; once the
        // worker has exited, the last batch waits to go with the job's end (`record_finish`).
        if session.has_batch() {
            let at = *commit_at.get_or_insert_with(|| Instant::now() + BATCH_WINDOW);
            if !exited && (kill.is_some() || Instant::now() >= at) {
                commit_at = None;
                if let Err(h) = session.commit() {
                    end_worker(&mut kill, &mut sigkill_at, halt_reason(h));
                }
            }
        } else {
            commit_at = None;
        }
        let now = Instant::now();
        if kill.is_none() && now >= wall_deadline {
            end_worker(&mut kill, &mut sigkill_at, KillReason::Timeout { seconds: applied.timeout_seconds });
        }
        if kill.is_none() && now >= last_line + stall_after {
            end_worker(&mut kill, &mut sigkill_at, KillReason::Stalled { ms: applied.heartbeat_ms });
        }
        if sigkill_at.is_some_and(|t| now >= t) {
            kill_group(pid, Signal::SIGKILL);
            sigkill_at = None;
        }
        if exited {
            // The worker is a zombie until reaped, so its pid (our group id) is still ours:
            // kill whatever it left behind in its group, then reap it.
            kill_group(pid, Signal::SIGKILL);
            break reap(pid);
        }
    };
    // Output written before the exit is still in the pipes.
    let (data, _) = read_some(&w.proto_r, DRAIN_BYTES_MAX);
    if kill.is_none() {
        if let Err(reason) = feed(&mut lines, &data, session, &mut flood) {
            kill = Some(reason);
        }
    }
    if kill.is_none()
        && !lines.leftover().is_empty()
        && session.result.is_none()
        && session.worker_error.is_none()
    {
        kill = Some(KillReason::Protocol("the worker exited in the middle of a line (no newline)".into()));
    }
    // The reports still queued are recorded with the job's end if the engine takes them all;
    // learn now whether it does, since a refusal changes how the job ended.
    let checked = match kill {
        None => session.check_batch(),
        // Stopped for another reason: what came before the stop is recorded, as it was said.
        Some(_) => session.commit(),
    };
    if let (None, Err(h)) = (&kill, checked) {
        kill = Some(halt_reason(h));
    }
    out_log.write(&read_some(&w.out_r, DRAIN_BYTES_MAX).0);
    let err_rest = read_some(&w.err_r, DRAIN_BYTES_MAX).0;
    err_log.write(&err_rest);
    keep_tail(&mut tail, &err_rest);
    // std's Child would otherwise never learn it was reaped; dropping it does not wait.
    drop(w.child);
    let tail = String::from_utf8_lossy(&tail).into_owned();
    let reported = Reported {
        job_id: session.job_id,
        result: session.result.clone(),
        worker_error: session.worker_error.clone(),
    };
    classify(&reported, &exit, kill.as_ref(), &tail, applied)
}

/// What the worker said before it ended.
#[derive(Clone, Debug, Default)]
pub(crate) struct Reported {
    pub(crate) job_id: u64,
    pub(crate) result: Option<String>,
    pub(crate) worker_error: Option<(String, bool)>,
}

struct Ender {
    pid: i32,
    grace: Duration,
    commission_id: u64,
    job_id: u64,
}

impl Ender {
    /// Decides to end the worker: SIGTERM with a grace for cancel and shutdown, SIGKILL for
    /// everything else. The first reason is the one recorded.
    fn end(&self, kill: &mut Option<KillReason>, sigkill_at: &mut Option<Instant>, reason: KillReason) {
        if kill.is_some() {
            return;
        }
        tracing::info!(commission = self.commission_id, job = self.job_id, reason = ?reason, "ending worker");
        let graceful = matches!(reason, KillReason::Cancel | KillReason::Shutdown);
        *kill = Some(reason);
        if graceful && !self.grace.is_zero() {
            kill_group(self.pid, Signal::SIGTERM);
            *sigkill_at = Some(Instant::now() + self.grace);
        } else {
            kill_group(self.pid, Signal::SIGKILL);
        }
    }
}

fn halt_reason(h: Halt) -> KillReason {
    match h {
        Halt::Protocol(e) => KillReason::Protocol(e),
        Halt::Cancelled => KillReason::Cancel,
        Halt::Stale(e) => KillReason::Stale(e),
        Halt::Storage(e) => KillReason::Storage(e),
    }
}

/// Counts protocol lines per one-second window.
struct FloodGuard {
    window_start: Instant,
    lines: u32,
}

impl FloodGuard {
    fn new() -> FloodGuard {
        FloodGuard { window_start: Instant::now(), lines: 0 }
    }

    fn count(&mut self, n: usize) -> Result<(), KillReason> {
        let now = Instant::now();
        if now.duration_since(self.window_start) >= Duration::from_secs(1) {
            self.window_start = now;
            self.lines = 0;
        }
        self.lines = self.lines.saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
        if self.lines > PROTOCOL_LINES_PER_SECOND_MAX {
            return Err(KillReason::Protocol(format!(
                "flooding: over {PROTOCOL_LINES_PER_SECOND_MAX} protocol lines in one second"
            )));
        }
        Ok(())
    }
}

/// Splits `data` into lines and hands each to the session.
fn feed(
    lines: &mut LineBuffer,
    data: &[u8],
    session: &mut Session,
    flood: &mut FloodGuard,
) -> Result<(), KillReason> {
    if data.is_empty() {
        return Ok(());
    }
    let complete = lines.push(data).map_err(KillReason::Protocol)?;
    flood.count(complete.len())?;
    for line in complete {
        let msg = parse_line(&line).map_err(KillReason::Protocol)?;
        session.handle(msg).map_err(halt_reason)?;
    }
    Ok(())
}

/// Reads what is available without blocking, up to `max` bytes. Returns the data and
/// whether the pipe reached EOF. Reads straight into the returned buffer: most calls find a
/// few hundred bytes or only EOF, and a zeroed 64 KiB scratch buffer per call was a visible
/// share of a short job's cost in the server.
fn read_some(fd: &OwnedFd, max: usize) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    // SAFETY: ManuallyDrop keeps the File from closing the descriptor, which `fd` owns.
    let f = std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(fd.as_raw_fd()) });
    // `read_to_end` retries EINTR and keeps what it read before EAGAIN (nothing more yet).
    match (&*f).take(u64::try_from(max).unwrap_or(u64::MAX)).read_to_end(&mut out) {
        // Short of the limit: the read that ended it returned 0, the writer is gone.
        Ok(_) => {
            let eof = out.len() < max;
            (out, eof)
        }
        Err(_) => (out, false),
    }
}

fn keep_tail(tail: &mut Vec<u8>, data: &[u8]) {
    tail.extend_from_slice(data);
    if tail.len() > STDERR_TAIL_BYTES {
        let cut = tail.len() - STDERR_TAIL_BYTES;
        tail.drain(..cut);
    }
}

fn child_exited(pid: i32) -> bool {
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid with WNOWAIT only inspects our own child and fills `info`.
    let rc = unsafe {
        libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, libc::WEXITED | libc::WNOHANG | libc::WNOWAIT)
    };
    // SAFETY: si_pid is valid to read after a successful waitid.
    rc == 0 && unsafe { info.si_pid() } != 0
}

/// Reaps our own child `pid` (never any other) and reads its resource usage.
fn reap(pid: i32) -> ExitInfo {
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is plain data that wait4 fills in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: wait4 on our own child's pid, with valid pointers to locals.
        let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if rc == pid {
            break;
        }
        if rc < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        tracing::error!(pid, error = %io::Error::last_os_error(), "wait4 failed");
        return ExitInfo::default();
    }
    let cpu = |t: libc::timeval| -> u64 {
        u64::try_from(t.tv_sec).unwrap_or(0) * 1000 + u64::try_from(t.tv_usec).unwrap_or(0) / 1000
    };
    ExitInfo {
        code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
        signal: libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status)),
        // ru_maxrss is in KiB on Linux.
        max_rss_bytes: u64::try_from(usage.ru_maxrss).unwrap_or(0) * 1024,
        cpu_ms: cpu(usage.ru_utime) + cpu(usage.ru_stime),
    }
}

pub(crate) fn signal_name(sig: i32) -> String {
    Signal::try_from(sig).map(|s| s.as_str().to_string()).unwrap_or_else(|_| format!("signal {sig}"))
}

/// Whether stderr shows the process ran out of memory under its address-space limit.
fn looks_like_oom(stderr_tail: &str) -> bool {
    const MARKERS: [&str; 6] = [
        "memory allocation of",
        "MemoryError",
        "Cannot allocate memory",
        "out of memory",
        "bad_alloc",
        "failed to allocate",
    ];
    MARKERS.iter().any(|m| stderr_tail.contains(m))
}

fn last_line(tail: &str) -> Option<&str> {
    tail.lines().map(str::trim).rfind(|l| !l.is_empty())
}

/// The one outcome of a finished worker. Pure, so the whole fault matrix is a table test.
pub(crate) fn classify(
    session: &Reported,
    exit: &ExitInfo,
    kill: Option<&KillReason>,
    stderr_tail: &str,
    applied: &Applied,
) -> Ended {
    let job_id = session.job_id;
    let end = |status: JobStatus, error: Option<String>| JobEnd {
        exit_code: exit.code,
        signal: exit.signal,
        max_rss_bytes: exit.max_rss_bytes,
        cpu_ms: exit.cpu_ms,
        ..job_end(job_id, status, error)
    };
    let fail = |error: String, retryable: bool, status: JobStatus, infra: bool| Ended {
        finish: Finish::Fail { error: error.clone(), retryable, end: end(status, Some(error)) },
        infra_failure: infra,
    };
    let with_stderr = |msg: String| match last_line(stderr_tail) {
        Some(l) => format!("{msg}; stderr: {}", l.chars().take(300).collect::<String>()),
        None => msg,
    };
    match kill {
        Some(KillReason::Cancel) => {
            return Ended {
                finish: Finish::Cancelled { end: end(JobStatus::Killed, Some("cancelled".into())) },
                infra_failure: false,
            }
        }
        Some(KillReason::Shutdown) => return fail("server shut down".into(), true, JobStatus::Killed, false),
        Some(KillReason::Timeout { seconds }) => {
            return fail(
                format!("timed out after {seconds} s (wall-clock limit)"),
                true,
                JobStatus::TimedOut,
                false,
            )
        }
        Some(KillReason::Stalled { ms }) => {
            return fail(format!("stalled: no protocol line for {ms} ms"), true, JobStatus::TimedOut, true)
        }
        Some(KillReason::Protocol(e)) => {
            return fail(format!("protocol error: {e}"), false, JobStatus::Failed, true)
        }
        Some(KillReason::Stale(e)) => {
            tracing::warn!(job = job_id, reason = %e, "job is stale; nothing to record");
            return Ended { finish: Finish::Nothing, infra_failure: false };
        }
        Some(KillReason::Storage(e)) => {
            return fail(format!("controller error: {e}"), true, JobStatus::Killed, true)
        }
        None => {}
    }
    if let (Some(0), Some(result)) = (exit.code, &session.result) {
        return Ended {
            finish: Finish::Complete { result: result.clone(), end: end(JobStatus::Succeeded, None) },
            infra_failure: false,
        };
    }
    if let Some((error, retryable)) = &session.worker_error {
        return fail(error.clone(), *retryable, JobStatus::Failed, false);
    }
    let crashed = exit.signal.is_some() || exit.code.is_some_and(|c| c != 0);
    if crashed && looks_like_oom(stderr_tail) {
        let mb = applied.memory_mb;
        return if mb < applied.memory_max_mb {
            let next = (mb * 2).min(applied.memory_max_mb);
            fail(
                format!("{MEMORY_ERROR_PREFIX} ({mb} MiB); the next attempt gets {next} MiB"),
                true,
                JobStatus::Killed,
                false,
            )
        } else {
            fail(format!("{MEMORY_ERROR_PREFIX} ({mb} MiB, the cap)"), false, JobStatus::Killed, false)
        };
    }
    let cpu_limit_ms = applied.cpu_seconds.saturating_mul(1000);
    match exit.signal {
        Some(libc::SIGXCPU) => {
            return fail(
                format!("CPU limit exceeded ({} s), killed by SIGXCPU", applied.cpu_seconds),
                false,
                JobStatus::Killed,
                false,
            )
        }
        Some(libc::SIGKILL) if exit.cpu_ms >= cpu_limit_ms => {
            return fail(
                format!("CPU limit exceeded ({} s), killed by SIGKILL", applied.cpu_seconds),
                false,
                JobStatus::Killed,
                false,
            )
        }
        Some(libc::SIGXFSZ) => {
            return fail(
                "file size limit exceeded, killed by SIGXFSZ".into(),
                false,
                JobStatus::Killed,
                false,
            )
        }
        Some(sig) => {
            return fail(
                with_stderr(format!("killed by {}", signal_name(sig))),
                true,
                JobStatus::Killed,
                true,
            )
        }
        None => {}
    }
    match exit.code {
        Some(0) => fail("the worker exited 0 without a result".into(), false, JobStatus::Failed, true),
        Some(127) => fail(
            with_stderr("could not start the worker program (exit 127)".into()),
            false,
            JobStatus::Failed,
            true,
        ),
        Some(c) if TRAMPOLINE_EXIT_CODES.contains(&c) => fail(
            with_stderr(format!("could not set up the worker (exit {c})")),
            true,
            JobStatus::Failed,
            true,
        ),
        Some(c) => {
            fail(with_stderr(format!("the worker exited with code {c}")), true, JobStatus::Failed, true)
        }
        None => fail("the worker ended in an unknown way".into(), true, JobStatus::Failed, true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_markers() {
        assert!(looks_like_oom("memory allocation of 16777216 bytes failed\n"));
        assert!(looks_like_oom("Traceback...\nMemoryError\n"));
        assert!(!looks_like_oom("all fine"));
    }

    fn applied() -> Applied {
        Applied { memory_mb: 128, memory_max_mb: 256, cpu_seconds: 2, timeout_seconds: 5, heartbeat_ms: 400 }
    }

    fn exit(code: Option<i32>, signal: Option<i32>) -> ExitInfo {
        ExitInfo { code, signal, max_rss_bytes: 0, cpu_ms: 0 }
    }

    /// (what the worker said, how it exited, why we killed it, stderr) -> (outcome label,
    /// retryable, error text contains, counted against the controller)
    #[test]
    fn every_ending_has_one_outcome() {
        let ok = Reported { job_id: 1, result: Some("{}".into()), worker_error: None };
        let none = Reported { job_id: 1, ..Reported::default() };
        let err = Reported { job_id: 1, result: None, worker_error: Some(("boom".into(), true)) };
        type Case<'a> =
            (&'a Reported, ExitInfo, Option<KillReason>, &'a str, &'a str, Option<bool>, &'a str, bool);
        let cases: Vec<Case> = vec![
            (&ok, exit(Some(0), None), None, "", "succeeded", None, "", false),
            (&ok, exit(Some(3), None), None, "", "failed", Some(true), "exited with code 3", true),
            (&none, exit(Some(0), None), None, "", "failed", Some(false), "without a result", true),
            (&err, exit(Some(0), None), None, "", "failed", Some(true), "boom", false),
            (&none, exit(None, Some(9)), None, "", "killed", Some(true), "killed by SIGKILL", true),
            (
                &none,
                exit(None, Some(6)),
                None,
                "memory allocation of 1 bytes failed",
                "killed",
                Some(true),
                "the next attempt gets 256 MiB",
                false,
            ),
            (&none, exit(None, Some(24)), None, "", "killed", Some(false), "CPU limit exceeded (2 s)", false),
            (
                &none,
                exit(None, Some(9)),
                Some(KillReason::Timeout { seconds: 5 }),
                "",
                "timed_out",
                Some(true),
                "timed out after 5 s",
                false,
            ),
            (
                &none,
                exit(None, Some(9)),
                Some(KillReason::Stalled { ms: 400 }),
                "",
                "timed_out",
                Some(true),
                "stalled",
                true,
            ),
            (
                &ok,
                exit(None, Some(9)),
                Some(KillReason::Protocol("x".into())),
                "",
                "failed",
                Some(false),
                "protocol error: x",
                true,
            ),
            (&none, exit(None, Some(15)), Some(KillReason::Cancel), "", "cancelled", None, "", false),
            (
                &none,
                exit(None, Some(15)),
                Some(KillReason::Shutdown),
                "",
                "killed",
                Some(true),
                "server shut down",
                false,
            ),
            (
                &none,
                exit(Some(127), None),
                None,
                "cannot run",
                "failed",
                Some(false),
                "could not start the worker program",
                true,
            ),
        ];
        for (i, (said, ex, kill, tail, outcome, retryable, text, infra)) in cases.into_iter().enumerate() {
            let e = classify(said, &ex, kill.as_ref(), tail, &applied());
            assert_eq!(e.finish.outcome(), outcome, "case {i}: {:?}", e.finish);
            assert_eq!(e.infra_failure, infra, "case {i}: {:?}", e.finish);
            match &e.finish {
                Finish::Fail { error, retryable: r, end } => {
                    assert_eq!(Some(*r), retryable, "case {i}");
                    assert!(error.contains(text), "case {i}: {error:?} lacks {text:?}");
                    assert_eq!((end.exit_code, end.signal), (ex.code, ex.signal), "case {i}");
                }
                other => assert_eq!(retryable, None, "case {i}: {other:?}"),
            }
        }
    }

    #[test]
    fn signal_names() {
        assert_eq!(signal_name(9), "SIGKILL");
        assert_eq!(signal_name(24), "SIGXCPU");
    }
}
