//! `atelier __trampoline`: the first program a job process runs.
//!
//! The server spawns it with posix_spawn (no `pre_exec`, which would make std fork the whole
//! server: ~43 ms per GiB of RSS instead of ~1 ms). Everything that must happen between fork
//! and exec happens here instead, in a small fresh process: resource limits, its own process
//! group, the worker user (`worker_user`), death with the server (PR_SET_PDEATHSIG), the
//! protocol pipe moved to fd 3, every other descriptor closed. Then it execs the real worker,
//! which inherits all of it.
//!
//! When the worker is the built-in one (`<this program> __worker ...`), the trampoline runs it
//! in place instead of executing the same program again: everything exec would keep is
//! already set up, and a second start-up (loading, relocating, glibc's CPU probing, which
//! traps to the hypervisor in a VM) was about half of a short job's CPU time.

use std::ffi::CString;

use nix::sys::resource::{setrlimit, Resource};
use nix::sys::signal::Signal;
use nix::unistd::{dup2, execvp, getpgrp, getpid, getppid, setpgid, Pid};

/// Exit codes of the trampoline itself (the worker's own codes follow after exec).
pub const EXIT_USAGE: i32 = 126;
pub const EXIT_EXEC_FAILED: i32 = 127;
/// The server died before the trampoline could tie its life to it.
pub const EXIT_ORPHANED: i32 = 125;
pub const EXIT_SETUP_FAILED: i32 = 124;

/// What the trampoline applies before exec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrampolineArgs {
    pub server_pid: u32,
    pub proto_fd: i32,
    pub memory_bytes: u64,
    pub cpu_seconds: u64,
    pub nofile_max: u64,
    pub nproc_max: u64,
    pub fsize_bytes: u64,
    /// The user (uid, gid) to switch to after the limits, with no supplementary groups; `None`
    /// keeps the server's (see `worker_user`).
    pub user: Option<(u32, u32)>,
    /// The `cgroup.procs` files of the job's cgroup (one per hierarchy; none without
    /// cgroups): the trampoline joins them first, so nothing of the job runs outside.
    pub cgroup_procs: Vec<String>,
    /// The server's [`crate::inside::interface::INTERFACE`]: a trampoline built from other sources (a worker
    /// program replaced on disk while the server runs) refuses to run the job.
    pub interface: String,
    pub argv: Vec<String>,
}

impl TrampolineArgs {
    /// The arguments after `__trampoline`.
    pub fn to_args(&self) -> Vec<String> {
        let mut v = vec![
            "--server-pid".to_string(),
            self.server_pid.to_string(),
            "--proto-fd".into(),
            self.proto_fd.to_string(),
            "--memory-bytes".into(),
            self.memory_bytes.to_string(),
            "--cpu-seconds".into(),
            self.cpu_seconds.to_string(),
            "--nofile".into(),
            self.nofile_max.to_string(),
            "--nproc".into(),
            self.nproc_max.to_string(),
            "--fsize-bytes".into(),
            self.fsize_bytes.to_string(),
            "--interface".into(),
            self.interface.clone(),
        ];
        if let Some((uid, gid)) = self.user {
            v.extend(["--uid".into(), uid.to_string(), "--gid".into(), gid.to_string()]);
        }
        for procs in &self.cgroup_procs {
            v.extend(["--cgroup-procs".to_string(), procs.clone()]);
        }
        v.push("--".into());
        v.extend(self.argv.iter().cloned());
        v
    }

    pub fn parse(args: &[String]) -> Result<TrampolineArgs, String> {
        let args = match args.first().map(String::as_str) {
            Some("__trampoline") => &args[1..],
            _ => args,
        };
        let split = args.iter().position(|a| a == "--").ok_or("missing `--` before the worker command")?;
        let (opts, argv) = (&args[..split], &args[split + 1..]);
        if argv.is_empty() {
            return Err("missing the worker command after `--`".into());
        }
        let mut t = TrampolineArgs {
            server_pid: 0,
            proto_fd: -1,
            memory_bytes: 0,
            cpu_seconds: 0,
            nofile_max: 0,
            nproc_max: 0,
            fsize_bytes: 0,
            user: None,
            cgroup_procs: Vec::new(),
            interface: String::new(),
            argv: argv.to_vec(),
        };
        let (mut uid, mut gid) = (None, None);
        let mut it = opts.iter();
        while let Some(name) = it.next() {
            let value = it.next().ok_or_else(|| format!("{name} needs a value"))?;
            let num = || value.parse::<u64>().map_err(|e| format!("{name} {value}: {e}"));
            match name.as_str() {
                "--server-pid" => t.server_pid = u32::try_from(num()?).map_err(|e| format!("{name}: {e}"))?,
                "--proto-fd" => t.proto_fd = i32::try_from(num()?).map_err(|e| format!("{name}: {e}"))?,
                "--memory-bytes" => t.memory_bytes = num()?,
                "--cpu-seconds" => t.cpu_seconds = num()?,
                "--nofile" => t.nofile_max = num()?,
                "--nproc" => t.nproc_max = num()?,
                "--fsize-bytes" => t.fsize_bytes = num()?,
                "--interface" => t.interface = value.clone(),
                "--uid" => uid = Some(u32::try_from(num()?).map_err(|e| format!("{name}: {e}"))?),
                "--gid" => gid = Some(u32::try_from(num()?).map_err(|e| format!("{name}: {e}"))?),
                "--cgroup-procs" => t.cgroup_procs.push(value.clone()),
                other => return Err(format!("unknown option {other}")),
            }
        }
        if t.server_pid == 0 || t.proto_fd < 0 || t.interface.is_empty() {
            return Err("--server-pid, --proto-fd and --interface are required".into());
        }
        t.user = match (uid, gid) {
            (Some(uid), Some(gid)) => Some((uid, gid)),
            (None, None) => None,
            _ => return Err("--uid and --gid go together".into()),
        };
        Ok(t)
    }
}

/// Entry point of `atelier __trampoline ...`; returns only when it could not exec.
pub fn trampoline_main(args: &[String]) -> i32 {
    let t = match TrampolineArgs::parse(args) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("atelier __trampoline: {e}");
            return EXIT_USAGE;
        }
    };
    // First, before it changes anything about this process: the server checked its worker
    // program at start, but the file may have been replaced since (a rebuild, a deploy).
    if t.interface != crate::inside::interface::INTERFACE {
        eprintln!(
            "atelier __trampoline: this worker program was built from other sources than the server (interface {}, the server's {}); rebuild it or restart the server",
            crate::inside::interface::INTERFACE,
            t.interface
        );
        return EXIT_SETUP_FAILED;
    }
    // Into the job's cgroup before anything else: its limits and its kill must cover every
    // process of the job, and this one is the first. Not joined, the job does not run.
    for procs in &t.cgroup_procs {
        if let Err(e) = std::fs::write(procs, getpid().as_raw().to_string()) {
            eprintln!("atelier __trampoline: cannot join the job's cgroup ({procs}): {e}");
            return EXIT_SETUP_FAILED;
        }
    }
    // The spawner already made us a group leader (posix_spawn's SETPGROUP); this covers a
    // caller that did not. Failing is fine only if we already lead our group.
    if setpgid(Pid::from_raw(0), Pid::from_raw(0)).is_err() && getpgrp() != getpid() {
        eprintln!("atelier __trampoline: cannot get a process group of our own");
        return EXIT_SETUP_FAILED;
    }
    let limits = [
        (Resource::RLIMIT_AS, t.memory_bytes, t.memory_bytes),
        // SIGXCPU at the soft limit, SIGKILL a second later if it is ignored.
        (Resource::RLIMIT_CPU, t.cpu_seconds, t.cpu_seconds.saturating_add(1)),
        (Resource::RLIMIT_NOFILE, t.nofile_max, t.nofile_max),
        (Resource::RLIMIT_NPROC, t.nproc_max, t.nproc_max),
        (Resource::RLIMIT_FSIZE, t.fsize_bytes, t.fsize_bytes),
        (Resource::RLIMIT_CORE, 0, 0),
    ];
    for (resource, soft, hard) in limits {
        // 0 means "not limited" for the limits the caller may leave out.
        if soft == 0 && resource != Resource::RLIMIT_CORE {
            continue;
        }
        if let Err(e) = setrlimit(resource, soft, hard) {
            eprintln!("atelier __trampoline: setrlimit {resource:?}: {e}");
            return EXIT_SETUP_FAILED;
        }
    }
    // Decided before the switch: the worker user may not be able to look at the program's
    // dir (a server installed under /root), and need not, to run the built-in worker here.
    let in_place = t.argv.get(1).map(String::as_str) == Some("__worker") && is_this_program(&t.argv[0]);
    // After the limits (set while we may still raise them), and before the death signal: a
    // change of credentials clears PR_SET_PDEATHSIG.
    if let Some((uid, gid)) = t.user {
        if let Err(e) = switch_user(uid, gid) {
            eprintln!("atelier __trampoline: cannot run as uid {uid}, gid {gid}: {e}");
            return EXIT_SETUP_FAILED;
        }
    }
    if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL) {
        eprintln!("atelier __trampoline: PR_SET_PDEATHSIG: {e}");
        return EXIT_SETUP_FAILED;
    }
    // The server may have died between spawning us and the prctl above; then nobody would
    // ever kill us, so leave now.
    if u32::try_from(getppid().as_raw()).ok() != Some(t.server_pid) {
        return EXIT_ORPHANED;
    }
    if t.proto_fd != 3 {
        if let Err(e) = dup2(t.proto_fd, 3) {
            eprintln!("atelier __trampoline: dup2 protocol fd: {e}");
            return EXIT_SETUP_FAILED;
        }
    }
    // Everything above 3 goes: the worker gets stdin, stdout, stderr and the protocol pipe.
    // SAFETY: close_range only closes descriptors; nothing in this process uses them after.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32) };
    if rc != 0 {
        close_fds_slowly();
    }
    if in_place {
        return crate::inside::worker::worker_main(&t.argv[1..]);
    }
    let argv: Result<Vec<CString>, _> = t.argv.iter().map(|a| CString::new(a.as_bytes())).collect();
    let Ok(argv) = argv else {
        eprintln!("atelier __trampoline: an argument contains a NUL byte");
        return EXIT_USAGE;
    };
    let err = match execvp(&argv[0], &argv) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    eprintln!("atelier __trampoline: cannot run {:?}: {err}", t.argv[0]);
    EXIT_EXEC_FAILED
}

/// Drops to `uid`/`gid` for good, with no supplementary groups (root's would otherwise stay),
/// then checks it took: every one of the real, effective and saved ids is the new one, and
/// root's cannot be had back.
fn switch_user(uid: u32, gid: u32) -> Result<(), String> {
    use nix::unistd::{getgroups, getresgid, getresuid, setgroups, setresgid, setresuid, Gid, Uid};
    let (u, g) = (Uid::from_raw(uid), Gid::from_raw(gid));
    setgroups(&[]).map_err(|e| format!("setgroups: {e}"))?;
    setresgid(g, g, g).map_err(|e| format!("setresgid: {e}"))?;
    setresuid(u, u, u).map_err(|e| format!("setresuid: {e}"))?;
    let ids = getresuid().map_err(|e| format!("getresuid: {e}"))?;
    let gids = getresgid().map_err(|e| format!("getresgid: {e}"))?;
    let groups = getgroups().map_err(|e| format!("getgroups: {e}"))?;
    if [ids.real, ids.effective, ids.saved] != [u; 3] || [gids.real, gids.effective, gids.saved] != [g; 3] {
        return Err(format!("the switch did not take: {ids:?} {gids:?}"));
    }
    if groups.iter().any(|x| *x != g) {
        return Err(format!("supplementary groups remain: {groups:?}"));
    }
    if uid != 0 && nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
        return Err("root can be had back".into());
    }
    Ok(())
}

/// Whether `path` is the very file this process runs (same device and inode; a binary
/// replaced on disk since the server started is not, and gets executed).
fn is_this_program(path: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(path), std::fs::metadata("/proc/self/exe")) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// For kernels without close_range (before 5.9).
fn close_fds_slowly() {
    let fds: Vec<i32> = match std::fs::read_dir("/proc/self/fd") {
        Ok(dir) => dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect(),
        Err(_) => (4..1024).collect(),
    };
    for fd in fds.into_iter().filter(|fd| *fd > 3) {
        let _ = nix::unistd::close(fd);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> TrampolineArgs {
        TrampolineArgs {
            server_pid: 42,
            proto_fd: 9,
            memory_bytes: 1 << 29,
            cpu_seconds: 60,
            nofile_max: 256,
            nproc_max: 64,
            fsize_bytes: 1 << 20,
            user: Some((998, 997)),
            cgroup_procs: vec!["/sys/fs/cgroup/pids/a/job-1/cgroup.procs".into()],
            interface: crate::inside::interface::INTERFACE.into(),
            argv: vec!["/bin/x".into(), "--a".into(), "--".into()],
        }
    }

    #[test]
    fn args_round_trip() {
        let t = sample();
        assert_eq!(TrampolineArgs::parse(&t.to_args()), Ok(t.clone()));
        let mut with_name = vec!["__trampoline".to_string()];
        with_name.extend(t.to_args());
        assert_eq!(TrampolineArgs::parse(&with_name), Ok(t.clone()));
        assert!(TrampolineArgs::parse(&["--server-pid".into(), "1".into()]).is_err());
        let mut no_interface = t.clone();
        no_interface.interface.clear();
        assert!(TrampolineArgs::parse(&no_interface.to_args()).is_err());
    }

    #[test]
    fn a_trampoline_from_other_sources_refuses_the_job_before_touching_anything() {
        let t = TrampolineArgs {
            interface: "0.0.0+0000000000000000".into(),
            argv: vec!["/bin/true".into()],
            ..sample()
        };
        let group = getpgrp();
        // Runs in this test process: had it gone past the check, it would have made this
        // process a group leader (and exec'd /bin/true).
        assert_eq!(trampoline_main(&t.to_args()), EXIT_SETUP_FAILED);
        assert_eq!(getpgrp(), group);
    }
}
