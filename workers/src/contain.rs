//! Processes that leave their job's process group: found and ended.
//!
//! A job ends by a kill of its process group, which reaches every process a worker started
//! unless one of them left the group: `setsid()` (a daemon's double fork, the `setsid`
//! tool) or `setpgid()`. Left alone, such a process is re-parented to init and outlives its
//! job for good. With containment on, the server is a child subreaper (`PR_SET_CHILD_SUBREAPER`):
//! whatever a worker leaves behind is re-parented to the server instead, and a sweep (every
//! [`SWEEP_INTERVAL`]) kills and reaps every child of the server that is not a process the
//! server started itself and still waits for.
//!
//! The server's own children are in [`KNOWN`]: a pid goes in under the lock in the same
//! critical section as its spawn (so a sweep never sees it unknown), and comes out only
//! after it was reaped. A sweep reaps only the pids it killed (`waitpid` on each), never
//! `waitpid(-1)`, so it never takes an exit status a job thread waits for.
//!
//! Not covered here: a process that escaped and then outlives the server itself (after a
//! crash of the server it is re-parented to init), and one that moved into the server's own
//! process group. A job's cgroup (`cgroup`), where the machine offers one, covers both.

use std::collections::BTreeMap;
use std::io;
use std::process::{Child, Command};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// How often the server looks for children it did not start.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// How long a sweep waits for a killed process to exit before leaving it to the next sweep.
const REAP_WAIT: Duration = Duration::from_millis(100);
/// How often it looks meanwhile.
const REAP_POLL: Duration = Duration::from_millis(2);

/// Children the server started and has not reaped yet: pid → how many times it is known
/// (a pid reused while the old entry is still being removed counts twice).
static KNOWN: Mutex<BTreeMap<u32, u32>> = Mutex::new(BTreeMap::new());

fn known() -> MutexGuard<'static, BTreeMap<u32, u32>> {
    KNOWN.lock().unwrap_or_else(|p| p.into_inner())
}

/// Spawns `cmd` and records the child as the server's own, atomically for a sweep.
pub(crate) fn spawn(cmd: &mut Command) -> io::Result<(Child, Known)> {
    spawn_with(|| cmd.spawn(), Child::id)
}

/// Starts a child with `start` (whose result has the pid `pid_of` reads) and records it as
/// the server's own, atomically for a sweep.
pub(crate) fn spawn_with<T>(
    start: impl FnOnce() -> io::Result<T>,
    pid_of: impl FnOnce(&T) -> u32,
) -> io::Result<(T, Known)> {
    let mut k = known();
    let child = start()?;
    let pid = pid_of(&child);
    *k.entry(pid).or_insert(0) += 1;
    Ok((child, Known(pid)))
}

/// A child recorded by [`spawn`]; dropping it says the child was reaped (or given up: an
/// unreaped child that is no longer known is ended by the next sweep).
pub(crate) struct Known(u32);

impl Drop for Known {
    fn drop(&mut self) {
        let mut k = known();
        if let Some(n) = k.get_mut(&self.0) {
            *n -= 1;
            if *n == 0 {
                k.remove(&self.0);
            }
        }
    }
}

/// Test scaffolding (`test-faults` builds only): with this set the server stays dumpable, so
/// a test running as the server's user but not as root can still list its descriptors in
/// `/proc/<server>/fd`.
#[cfg(feature = "test-faults")]
const KEEP_DUMPABLE_ENV: &str = "ATELIER_TEST_KEEP_DUMPABLE";

/// Makes this process non-dumpable (`PR_SET_DUMPABLE 0`): its `/proc/<pid>` files (`environ`,
/// `mem`, `fd`, `maps`) become root's and it cannot be ptraced, so a worker running as the
/// server's user cannot read the server's environment (`ATELIER_SECRET`) or memory. It also
/// leaves no core dump. Root (CAP_SYS_PTRACE) still can.
pub fn become_undumpable() -> io::Result<()> {
    #[cfg(feature = "test-faults")]
    if std::env::var_os(KEEP_DUMPABLE_ENV).is_some() {
        tracing::warn!("staying dumpable ({KEEP_DUMPABLE_ENV}); for tests only");
        return Ok(());
    }
    // SAFETY: prctl with PR_SET_DUMPABLE takes one integer argument.
    let rc = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0 as libc::c_ulong, 0, 0, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes this process the subreaper of everything it starts.
pub fn become_subreaper() -> io::Result<()> {
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes one integer argument.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Children of this process (from /proc: pids whose parent is us), each with its state.
fn children() -> Vec<(u32, char)> {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| stat(pid).filter(|(_, ppid)| *ppid == me).map(|(state, _)| (pid, state)))
        .collect()
}

/// `/proc/PID/stat`: (state, parent pid).
fn stat(pid: u32) -> Option<(char, u32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain anything: parse after the last ')'.
    let mut fields = text[text.rfind(')')? + 2..].split_whitespace();
    let state = fields.next()?.chars().next()?;
    Some((state, fields.next()?.parse().ok()?))
}

/// Kills and reaps every child that is not the server's own; returns the pids of those that
/// were still running (an escaped process). Dead ones (a job's group member killed with its
/// job, re-parented here) are only reaped.
pub fn sweep() -> Vec<u32> {
    let strays: Vec<(u32, char)> = {
        // Under the lock: no spawn is between its fork and its record.
        let k = known();
        children().into_iter().filter(|(pid, _)| !k.contains_key(pid)).collect()
    };
    let mut escaped = Vec::new();
    for (pid, state) in strays {
        let Ok(raw) = i32::try_from(pid) else { continue };
        let running = state != 'Z';
        if running {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            tracing::warn!(
                pid,
                command = comm.trim(),
                "ending a process that outlived its job (it had left the job's process group)"
            );
            // Still our child and not known, so the pid cannot have been reused meanwhile.
            let _ = kill(Pid::from_raw(raw), Signal::SIGKILL);
            escaped.push(pid);
        }
        let deadline = Instant::now() + REAP_WAIT;
        loop {
            match waitpid(Pid::from_raw(raw), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) if Instant::now() < deadline => std::thread::sleep(REAP_POLL),
                // Reaped, gone, or left for the next sweep.
                _ => break,
            }
        }
    }
    escaped
}

/// Ends escaped processes every [`SWEEP_INTERVAL`], and once more when `stop` disconnects;
/// `ended` hears how many each sweep ended.
pub(crate) fn sweep_loop(stop: &crossbeam_channel::Receiver<()>, ended: &dyn Fn(usize)) {
    loop {
        let stopped = matches!(
            stop.recv_timeout(SWEEP_INTERVAL),
            Err(crossbeam_channel::RecvTimeoutError::Disconnected)
        );
        ended(sweep().len());
        if stopped {
            return;
        }
    }
}
