//! The job controller's watch over one running worker process: feed what it says to the
//! job's session, capture its output, end it when it must end, and reap it; `classify.rs`
//! then turns however it ended into exactly one outcome.
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
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use super::classify::{classify, Applied, Ended, ExitInfo, KillReason, Reported};
use crate::cgroup::JobCgroup;
use crate::executor::signal::{JobSignal, Request};
use crate::inside::protocol::{parse_line, LineBuffer};
use crate::session::{Halt, Session};

/// Bytes of a worker's stderr kept in memory to explain how it ended.
pub const STDERR_TAIL_BYTES: usize = 2048;
/// Bytes read from a pipe per `read` call.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// After exit, at most this much buffered output is still read from each pipe.
const DRAIN_BYTES_MAX: usize = 4 * 1024 * 1024;
/// A worker sending more protocol lines than this in one second is flooding and is cut off.
pub const PROTOCOL_LINES_PER_SECOND_MAX: u32 = 10_000;
// A `noop` with the most progress steps a user may ask for (each stage's steps, its 100% line
// and its stage line, plus the result) stays under the guard even all in one second.
const _: () =
    assert!(4 * (crate::inside::pipeline::PROGRESS_STEPS_MAX + 2) + 1 < PROTOCOL_LINES_PER_SECOND_MAX as u64);
/// Reports are held this long after the first of a batch before they are appended, so that a
/// burst of lines, or a short job's whole life, is one append (one fsync) rather than one per
/// poll wakeup; far below what anyone watching progress can notice.
const BATCH_WINDOW: Duration = Duration::from_millis(2);

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
/// empty (`DataDir::job_logs`).
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
                let _ = crate::inside::private::create_dir_all(dir);
            }
            self.file = crate::inside::private::create_file(&self.path).ok();
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
/// What a job's poll loop watches.
pub(crate) struct Watched<'a> {
    /// The worker's pid: the server's child, reaped here.
    pub(crate) pid: u32,
    pub(crate) proto_r: OwnedFd,
    pub(crate) out_r: OwnedFd,
    pub(crate) err_r: OwnedFd,
    /// Where the worker's stdout and stderr are captured (`DataDir::job_logs`).
    pub(crate) logs: (PathBuf, PathBuf),
    pub(crate) log_bytes_max: u64,
    pub(crate) kill_grace: Duration,
    /// The job's cgroup, if it has one: every kill reaches all of it, and its OOM-kill count
    /// tells the memory outcome.
    pub(crate) cgroup: Option<&'a JobCgroup>,
}

/// Signals the job's process group, and its leader by pid: a leader that moved itself into
/// another group (`setpgid`, even into the server's own) is out of reach of the group kill.
/// The leader is our child and not reaped yet, so its pid cannot have been reused. A SIGKILL
/// also goes to every process in the job's cgroup, wherever it moved.
pub(super) fn kill_job(pid: i32, cgroup: Option<&JobCgroup>, sig: Signal) {
    kill_group(pid, sig);
    if let (Some(cg), Signal::SIGKILL) = (cgroup, sig) {
        cg.kill_all();
    }
    if let Err(e) = nix::sys::signal::kill(Pid::from_raw(pid), sig) {
        if e != nix::errno::Errno::ESRCH {
            tracing::warn!(pid, signal = %sig, error = %e, "cannot signal the job's worker");
        }
    }
}

fn kill_group(pgid: i32, sig: Signal) {
    if let Err(e) = killpg(Pid::from_raw(pgid), sig) {
        if e != nix::errno::Errno::ESRCH {
            tracing::warn!(pgid, signal = %sig, error = %e, "cannot signal the job's process group");
        }
    }
}

/// Watches a started worker to its end and says how it ended.
pub(crate) fn watch(w: Watched<'_>, session: &mut Session, signal: &JobSignal, applied: &Applied) -> Ended {
    let Watched { pid, proto_r, out_r, err_r, logs, log_bytes_max, kill_grace, cgroup } = w;
    let pid = i32::try_from(pid).expect("invariant: pids fit i32");
    let pipes = [proto_r, out_r, err_r];
    for fd in &pipes {
        let _ = set_nonblocking(fd);
    }
    let started = Instant::now();
    let mut job = Job {
        ender: Ender {
            pid,
            grace: kill_grace,
            commission_id: session.commission_id,
            job_id: session.job_id,
            cgroup,
        },
        session,
        signal,
        applied,
        pidfd: pidfd_open(pid),
        pipes,
        open: [true, true, true],
        out_log: LogSink::new(logs.0, log_bytes_max),
        err_log: LogSink::new(logs.1, log_bytes_max),
        tail: Vec::new(),
        lines: LineBuffer::default(),
        flood: FloodGuard::new(),
        wall_deadline: started + Duration::from_secs(applied.timeout_seconds),
        stall_after: Duration::from_millis(applied.heartbeat_ms),
        last_line: Instant::now(),
        kill: None,
        sigkill_at: None,
        commit_at: None,
    };
    let exit = loop {
        let ready = job.wait();
        let exited = job.take(ready);
        if let Some(exit) = job.after_wakeup(exited) {
            break exit;
        }
    };
    job.finish(&exit)
}

/// Where the protocol pipe, stdout and stderr sit in `Job::pipes` (their poll slots are
/// 2, 3 and 4, after the pidfd's 0 and the wake pipe's 1).
const PROTO: usize = 0;
const OUT: usize = 1;
const ERR: usize = 2;

/// One watched worker, between wakeups of its poll.
struct Job<'a> {
    ender: Ender<'a>,
    session: &'a mut Session,
    signal: &'a JobSignal,
    applied: &'a Applied,
    pidfd: Option<OwnedFd>,
    pipes: [OwnedFd; 3],
    /// Which of `pipes` has not reached EOF.
    open: [bool; 3],
    out_log: LogSink,
    err_log: LogSink,
    tail: Vec<u8>,
    lines: LineBuffer,
    flood: FloodGuard,
    wall_deadline: Instant,
    stall_after: Duration,
    last_line: Instant,
    kill: Option<KillReason>,
    sigkill_at: Option<Instant>,
    /// When the queued reports are appended (see BATCH_WINDOW).
    commit_at: Option<Instant>,
}

impl Job<'_> {
    fn end(&mut self, reason: KillReason) {
        self.ender.end(&mut self.kill, &mut self.sigkill_at, reason);
    }

    /// The earliest deadline as a poll timeout: rounded up, so the poll does not wake just
    /// before the deadline and spin.
    fn timeout(&self, now: Instant) -> PollTimeout {
        let mut deadline: Option<Instant> = None;
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                deadline = Some(deadline.map_or(t, |d: Instant| d.min(t)));
            }
        };
        if self.kill.is_none() {
            consider(Some(self.wall_deadline));
            consider(Some(self.last_line + self.stall_after));
            consider(self.session.next_flush_at());
        }
        consider(self.sigkill_at);
        consider(self.commit_at);
        if self.pidfd.is_none() {
            // Old kernel without pidfd: look at the child every 50 ms.
            consider(Some(now + Duration::from_millis(50)));
        }
        match deadline {
            None => PollTimeout::NONE,
            Some(d) => {
                let ms = d.saturating_duration_since(now).as_millis().min(60_000);
                PollTimeout::try_from(u32::try_from(ms).unwrap_or(60_000) + 1).unwrap_or(PollTimeout::MAX)
            }
        }
    }

    /// Waits for the next thing to happen; returns the poll slots that are ready.
    fn wait(&mut self) -> Vec<u8> {
        let timeout = self.timeout(Instant::now());
        let mut fds: Vec<PollFd> = Vec::with_capacity(5);
        let mut slots: Vec<u8> = Vec::with_capacity(5);
        if let Some(p) = self.pidfd.as_ref() {
            fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
            slots.push(0);
        }
        if let Some(wr) = self.signal.wake_r.as_ref() {
            fds.push(PollFd::new(wr.as_fd(), PollFlags::POLLIN));
            slots.push(1);
        }
        for (i, fd) in self.pipes.iter().enumerate() {
            if self.open[i] {
                fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
                slots.push(2 + u8::try_from(i).expect("invariant: three pipes"));
            }
        }
        let polled = nix::poll::poll(&mut fds, timeout).map(|_| {
            fds.iter()
                .zip(&slots)
                .filter(|(f, _)| f.revents().is_some_and(|r| !r.is_empty()))
                .map(|(_, s)| *s)
                .collect::<Vec<u8>>()
        });
        drop(fds);
        match polled {
            Ok(ready) => ready,
            Err(nix::errno::Errno::EINTR) => Vec::new(),
            Err(e) => {
                tracing::error!(error = %e, "poll failed; killing the job");
                self.end(KillReason::Storage(format!("poll: {e}")));
                std::thread::sleep(Duration::from_millis(10));
                Vec::new()
            }
        }
    }

    /// Takes what the ready slots have; returns whether the worker has exited.
    fn take(&mut self, ready: Vec<u8>) -> bool {
        let mut exited = false;
        for slot in ready {
            match slot {
                0 => exited = true,
                1 => self.take_request(),
                2 => {
                    let (data, eof) = read_some(&self.pipes[PROTO], READ_CHUNK_BYTES);
                    self.open[PROTO] = !eof;
                    if !data.is_empty() {
                        self.last_line = Instant::now();
                    }
                    if self.kill.is_none() {
                        if let Err(reason) = feed(&mut self.lines, &data, self.session, &mut self.flood) {
                            self.end(reason);
                        }
                    }
                }
                3 => {
                    let (data, eof) = read_some(&self.pipes[OUT], READ_CHUNK_BYTES);
                    self.open[OUT] = !eof;
                    self.out_log.write(&data);
                }
                _ => {
                    let (data, eof) = read_some(&self.pipes[ERR], READ_CHUNK_BYTES);
                    self.open[ERR] = !eof;
                    self.err_log.write(&data);
                    keep_tail(&mut self.tail, &data);
                }
            }
        }
        if self.pidfd.is_none() {
            exited = child_exited(self.ender.pid);
        }
        exited
    }

    /// The wake pipe fired: a cancel or shutdown is asked for.
    fn take_request(&mut self) {
        if let Some(wr) = self.signal.wake_r.as_ref() {
            let mut buf = [0u8; 64];
            while matches!(nix::unistd::read(wr.as_raw_fd(), &mut buf), Ok(n) if n > 0) {}
        }
        match self.signal.get() {
            Request::Cancel => self.end(KillReason::Cancel),
            Request::Shutdown => self.end(KillReason::Shutdown),
            Request::Abandon => self.end(KillReason::Storage("this node lost its lease".into())),
            Request::None => {}
        }
    }

    /// Flushes and commits what is due, enforces the deadlines, and reaps the worker once it
    /// has exited (then returns how it exited).
    fn after_wakeup(&mut self, exited: bool) -> Option<ExitInfo> {
        if self.kill.is_none() {
            if let Err(h) = self.session.flush_due() {
                self.end(halt_reason(h));
            }
        }
        // What the worker says within BATCH_WINDOW goes to the log in one append; once the
        // worker has exited, the last batch waits to go with the job's end (`record_finish`).
        if self.session.has_batch() {
            let at = *self.commit_at.get_or_insert_with(|| Instant::now() + BATCH_WINDOW);
            if !exited && (self.kill.is_some() || Instant::now() >= at) {
                self.commit_at = None;
                if let Err(h) = self.session.commit() {
                    self.end(halt_reason(h));
                }
            }
        } else {
            self.commit_at = None;
        }
        let now = Instant::now();
        if self.kill.is_none() && now >= self.wall_deadline {
            self.end(KillReason::Timeout { seconds: self.applied.timeout_seconds });
        }
        if self.kill.is_none() && now >= self.last_line + self.stall_after {
            self.end(KillReason::Stalled { ms: self.applied.heartbeat_ms });
        }
        if self.sigkill_at.is_some_and(|t| now >= t) {
            kill_job(self.ender.pid, self.ender.cgroup, Signal::SIGKILL);
            self.sigkill_at = None;
        }
        if !exited {
            return None;
        }
        // The worker is a zombie until reaped, so its pid (our group id) is still ours: kill
        // whatever it left behind in its group (and its cgroup), then reap it.
        kill_group(self.ender.pid, Signal::SIGKILL);
        if let Some(cg) = self.ender.cgroup {
            cg.kill_all();
        }
        let mut exit = reap(self.ender.pid);
        exit.oom_kills = self.ender.cgroup.map_or(0, JobCgroup::oom_kills);
        Some(exit)
    }

    /// After the exit: reads what is still in the pipes, settles the last batch, and
    /// classifies the ending.
    fn finish(mut self, exit: &ExitInfo) -> Ended {
        let (data, _) = read_some(&self.pipes[PROTO], DRAIN_BYTES_MAX);
        if self.kill.is_none() {
            if let Err(reason) = feed(&mut self.lines, &data, self.session, &mut self.flood) {
                self.kill = Some(reason);
            }
        }
        if self.kill.is_none()
            && !self.lines.leftover().is_empty()
            && self.session.result.is_none()
            && self.session.worker_error.is_none()
        {
            let reason = "the worker exited in the middle of a line (no newline)";
            self.kill = Some(KillReason::Protocol(reason.into()));
        }
        // The reports still queued are recorded with the job's end if the engine takes them
        // all; learn now whether it does, since a refusal changes how the job ended.
        let checked = match self.kill {
            None => self.session.check_batch(),
            // Stopped for another reason: what came before the stop is recorded, as it was said.
            Some(_) => self.session.commit(),
        };
        if let (None, Err(h)) = (&self.kill, checked) {
            self.kill = Some(halt_reason(h));
        }
        self.out_log.write(&read_some(&self.pipes[OUT], DRAIN_BYTES_MAX).0);
        let err_rest = read_some(&self.pipes[ERR], DRAIN_BYTES_MAX).0;
        self.err_log.write(&err_rest);
        keep_tail(&mut self.tail, &err_rest);
        let tail = String::from_utf8_lossy(&self.tail).into_owned();
        let reported = Reported {
            job_id: self.session.job_id,
            result: self.session.result.clone(),
            worker_error: self.session.worker_error.clone(),
        };
        classify(&reported, exit, self.kill.as_ref(), &tail, self.applied)
    }
}

struct Ender<'a> {
    pid: i32,
    grace: Duration,
    commission_id: u64,
    job_id: u64,
    cgroup: Option<&'a JobCgroup>,
}

impl Ender<'_> {
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
            kill_job(self.pid, self.cgroup, Signal::SIGTERM);
            *sigkill_at = Some(Instant::now() + self.grace);
        } else {
            kill_job(self.pid, self.cgroup, Signal::SIGKILL);
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
            return Err(KillReason::Flood { lines_max: PROTOCOL_LINES_PER_SECOND_MAX });
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
        oom_kills: 0,
    }
}
