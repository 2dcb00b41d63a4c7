//! A cgroup per job, where the machine offers one: the limits the kernel holds for the job's
//! processes together, however many there are and whichever group or session they moved to.
//!
//! Without cgroups a job's limits are rlimits, and rlimits are per process or per user:
//! RLIMIT_NPROC counts every process and thread of the server's user (the server's own SSE
//! threads included, so with ~1,024 streams every fork in a worker fails) and does not bind
//! root; RLIMIT_AS counts address space, not memory, and an allocation failing under it is
//! the only sign of running out; and nothing finds every process a job made. A job's cgroup
//! gives it a process count of its own (`pids.max`), a memory limit on what it really uses
//! with an OOM-kill count that tells the memory outcome from any other SIGKILL, and a kill
//! that reaches every process in it (v2 `cgroup.kill`; on v1, freeze, kill each, thaw, so
//! nothing escapes by forking meanwhile).
//!
//! Layout: `<parent>/atelier-<key>/job-<job_id>`, in each hierarchy used (v2: the one unified
//! tree; v1: the pids, memory and freezer hierarchies). `<parent>` is the server's own cgroup
//! (`auto`) or the configured delegated parent; `<key>` is a hash of the data dir, so that
//! servers of different data dirs on one machine never clean up each other's jobs, while a
//! server restarted on the same data dir finds and removes what a crash left behind.
//!
//! The worker joins its cgroup itself: the trampoline writes its own pid into each
//! `cgroup.procs` before anything else runs (see `inside/trampoline.rs`), and fails the job
//! if it cannot. So nothing of the job ever runs outside it, with no extra round trip
//! between the server and the child, and the spawn stays one `posix_spawn`.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The `[workers] cgroup` setting.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum CgroupSetting {
    /// Use cgroups where they are writable; otherwise rlimits only, and one log line why.
    #[default]
    Auto,
    /// rlimits only.
    Off,
    /// Job cgroups go under this delegated parent (v2), or under this path's place in each v1
    /// hierarchy; a start that cannot use it fails.
    Parent(PathBuf),
}

impl CgroupSetting {
    /// `auto`, `off`, or an absolute path.
    pub fn parse(text: &str) -> Result<CgroupSetting, String> {
        match text {
            "auto" => Ok(CgroupSetting::Auto),
            "off" => Ok(CgroupSetting::Off),
            p if p.starts_with('/') => Ok(CgroupSetting::Parent(PathBuf::from(p))),
            other => {
                Err(format!("{other:?} is not \"auto\", \"off\" or an absolute path of a delegated cgroup"))
            }
        }
    }
}

/// How long a job's cgroup removal waits for its killed processes to be gone.
const EMPTY_WAIT_MS: u64 = 2_000;
/// How long a v1 freeze may take before the kill goes ahead anyway.
const FREEZE_WAIT_MS: u64 = 1_000;
/// v1 without a freezer, or v2 without `cgroup.kill`: rounds of "kill every pid listed".
const KILL_ROUNDS_MAX: u32 = 100;
/// CPU a job may use at once (v2 `cpu.max`), in percent of one CPU: a job cannot take every
/// core of the machine from the server and the other jobs. Its CPU time is RLIMIT_CPU's.
pub const JOB_CPU_PERCENT_MAX: u64 = 100;
/// v2 `cpu.max` period, in microseconds (the kernel's default).
const CPU_PERIOD_US: u64 = 100_000;
const JOB_PREFIX: &str = "job-";

/// What went wrong with cgroups, with the path it happened at.
#[derive(Debug)]
pub enum CgroupError {
    /// No cgroup hierarchy with the controllers a job needs is mounted.
    NotMounted { why: String },
    /// The server's own cgroup could not be read from `/proc/self/cgroup`.
    OwnCgroup { source: io::Error },
    /// A cgroup file or dir could not be read, made, written or removed.
    Io { path: PathBuf, action: &'static str, source: io::Error },
}

impl fmt::Display for CgroupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CgroupError::NotMounted { why } => write!(f, "no usable cgroup hierarchy: {why}"),
            CgroupError::OwnCgroup { source } => write!(f, "cannot read /proc/self/cgroup: {source}"),
            CgroupError::Io { path, action, source } => {
                write!(f, "cannot {action} {}: {source}", path.display())
            }
        }
    }
}

impl std::error::Error for CgroupError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CgroupError::NotMounted { .. } => None,
            CgroupError::OwnCgroup { source } | CgroupError::Io { source, .. } => Some(source),
        }
    }
}

fn io_at<'a>(path: &'a Path, action: &'static str) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io { path: path.to_path_buf(), action, source }
}

/// Which kind of cgroup dir a path is, so each operation knows its files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// cgroup v2: every controller in one dir.
    Unified,
    V1Pids,
    V1Memory,
    V1Freezer,
}

impl Kind {
    fn v1_controller(self) -> Option<&'static str> {
        match self {
            Kind::Unified => None,
            Kind::V1Pids => Some("pids"),
            Kind::V1Memory => Some("memory"),
            Kind::V1Freezer => Some("freezer"),
        }
    }
}

const V1_KINDS: [Kind; 3] = [Kind::V1Pids, Kind::V1Memory, Kind::V1Freezer];
/// The v2 controllers a job's cgroup needs enabled in its parent's `cgroup.subtree_control`.
const V2_CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];

/// One mounted cgroup hierarchy, from `/proc/self/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Mount {
    /// Where it is mounted.
    point: PathBuf,
    /// The path inside the hierarchy that is mounted there (`/` unless bind-mounted).
    root: String,
    /// v2, or v1 with these controllers.
    v1_controllers: Option<Vec<String>>,
}

/// The cgroup mounts in a `/proc/self/mountinfo` text. Pure, for the unit tests.
fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            // `id parent maj:min root point opts [optional...] - fstype source superopts`
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let mut right = right.split(' ');
            let fstype = right.next()?;
            let _source = right.next()?;
            let superopts = right.next().unwrap_or("");
            let (root, point) = (unescape(left.get(3)?), unescape(left.get(4)?));
            let v1_controllers = match fstype {
                "cgroup2" => None,
                "cgroup" => Some(superopts.split(',').map(str::to_string).collect()),
                _ => return None,
            };
            Some(Mount { point: PathBuf::from(point), root, v1_controllers })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 4).and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(char::from(c));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The server's own cgroup path per hierarchy, from `/proc/self/cgroup`: `None` keys the v2
/// line (`0::/path`), `Some(controller)` each v1 controller. Pure, for the unit tests.
fn parse_own_cgroups(text: &str) -> Vec<(Option<String>, String)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            out.push((None, path.to_string()));
        } else {
            out.extend(controllers.split(',').map(|c| (Some(c.to_string()), path.to_string())));
        }
    }
    out
}

/// Where `own` (a path inside the hierarchy) is under a mount of it.
fn under_mount(m: &Mount, own: &str) -> PathBuf {
    let rel = own.strip_prefix(m.root.trim_end_matches('/')).unwrap_or(own);
    m.point.join(rel.trim_start_matches('/'))
}

/// The parent dirs job cgroups would go under, per kind, for `setting` on a machine with
/// these mounts and this process's own cgroups: v2 where its mount has every controller a job
/// needs, else v1's pids hierarchy (required) with memory and freezer where mounted. Pure, for
/// the unit tests.
fn plan(
    setting: &CgroupSetting,
    mounts: &[Mount],
    own: &[(Option<String>, String)],
    v2_controllers: &dyn Fn(&Path) -> Option<String>,
) -> Result<Vec<(Kind, PathBuf)>, CgroupError> {
    let own_in = |controller: Option<&str>| {
        own.iter().find(|(c, _)| c.as_deref() == controller).map(|(_, p)| p.as_str()).unwrap_or("/")
    };
    // A configured parent must lie in a cgroup hierarchy: elsewhere the "cgroup" would be a
    // plain dir whose files limit nothing, while the rlimits it replaces are left off.
    let named = match setting {
        CgroupSetting::Parent(p) => {
            let m =
                mounts.iter().filter(|m| p.starts_with(&m.point)).max_by_key(|m| m.point.as_os_str().len());
            let Some(m) = m else {
                let why = format!("{} is not in a mounted cgroup hierarchy", p.display());
                return Err(CgroupError::NotMounted { why });
            };
            Some(m)
        }
        _ => None,
    };
    let parent_in = |m: &Mount, controller: Option<&str>| match setting {
        CgroupSetting::Parent(p) => match named {
            // A configured v1 path names one hierarchy; the same place is used in the others.
            Some(named) if named.v1_controllers.is_some() && m.v1_controllers.is_some() => {
                let rel = p.strip_prefix(&named.point).expect("invariant: starts_with checked");
                m.point.join(rel)
            }
            _ => p.clone(),
        },
        _ => under_mount(m, own_in(controller)),
    };
    let v2 = mounts.iter().find(|m| m.v1_controllers.is_none()).filter(|m| {
        // The root's `cgroup.controllers` lists what the hierarchy offers at all; a v2 mount
        // beside v1 controllers (a hybrid machine) offers none of them.
        v2_controllers(&m.point).is_some_and(|have| {
            let have: Vec<&str> = have.split_whitespace().collect();
            V2_CONTROLLERS.iter().all(|c| have.contains(c))
        })
    });
    match (named, v2) {
        (Some(n), _) if n.v1_controllers.is_some() => {}
        (Some(_), None) => {
            let why = "the configured parent's cgroup v2 hierarchy lacks the memory, pids or cpu controller";
            return Err(CgroupError::NotMounted { why: why.into() });
        }
        (_, Some(m)) => return Ok(vec![(Kind::Unified, parent_in(m, None))]),
        (None, None) => {}
    }
    let mut dirs = Vec::new();
    for kind in V1_KINDS {
        let controller = kind.v1_controller().expect("invariant: v1 kinds name a controller");
        let mount = mounts
            .iter()
            .find(|m| m.v1_controllers.as_ref().is_some_and(|cs| cs.iter().any(|c| c == controller)));
        if let Some(m) = mount {
            dirs.push((kind, parent_in(m, Some(controller))));
        }
    }
    if !dirs.iter().any(|(k, _)| *k == Kind::V1Pids) {
        let why = "neither a cgroup v2 hierarchy with the memory, pids and cpu controllers nor a v1 pids hierarchy is mounted";
        return Err(CgroupError::NotMounted { why: why.into() });
    }
    Ok(dirs)
}

/// A short stable name for a data dir: servers of different data dirs keep apart.
fn key_of(data_dir: &Path) -> String {
    use sha2::{Digest, Sha256};
    use std::os::unix::ffi::OsStrExt;
    Sha256::digest(data_dir.as_os_str().as_bytes()).iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// The limits a job's cgroup holds. Units last.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CgroupLimits {
    pub(crate) memory_bytes: u64,
    pub(crate) pids_max: u64,
}

/// This server's cgroups for jobs: checked (and cleaned of what a crash left) at start.
#[derive(Debug)]
pub(crate) struct Cgroups {
    bases: Arc<Bases>,
}

/// The server's own dirs, `<parent>/atelier-<key>` per kind, there only while a job of its
/// runs: a server that is idle or stopped leaves nothing in the machine's cgroup tree (and
/// one killed leaves only what its running jobs had, for its next start to remove).
#[derive(Debug)]
struct Bases {
    dirs: Vec<(Kind, PathBuf)>,
    /// Jobs whose cgroup is in them now; the dirs are made at the first and removed after
    /// the last.
    jobs: Mutex<u64>,
}

impl Bases {
    fn make(&self) -> Result<(), CgroupError> {
        for (kind, base) in &self.dirs {
            make_dir(base)?;
            if *kind == Kind::Unified {
                enable_controllers(base)?;
            }
        }
        Ok(())
    }

    /// Removes the dirs (one not empty stays).
    fn remove(&self) {
        for (_, base) in &self.dirs {
            if let Err(e) = std::fs::remove_dir(base) {
                tracing::debug!(dir = %base.display(), error = %e, "job cgroups' dir kept");
            }
        }
    }

    /// One more job: the dirs are there once this returns `Ok`.
    fn enter(&self) -> Result<(), CgroupError> {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        if *jobs == 0 {
            self.make()?;
        }
        *jobs += 1;
        Ok(())
    }

    /// One job fewer: after the last, the dirs go.
    fn leave(&self) {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        *jobs = jobs.saturating_sub(1);
        if *jobs == 0 {
            self.remove();
        }
    }
}

impl Cgroups {
    /// The job cgroups of `setting` for the server of `data_dir`: `Ok(None)` when off, or when
    /// `auto` finds them unusable (logged once, with why); an error only for a configured
    /// parent that cannot be used.
    pub(crate) fn start(setting: &CgroupSetting, data_dir: &Path) -> Result<Option<Cgroups>, CgroupError> {
        if *setting == CgroupSetting::Off {
            return Ok(None);
        }
        match Cgroups::try_start(setting, data_dir) {
            Ok(c) => {
                tracing::info!(dirs = ?c.parents(), "each job runs in a cgroup of its own");
                Ok(Some(c))
            }
            Err(e) if *setting == CgroupSetting::Auto => {
                tracing::warn!(error = %e, "no cgroup per job: the job limits are rlimits only (the process limit counts the whole user; set [workers] cgroup to a delegated parent to use one)");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    fn try_start(setting: &CgroupSetting, data_dir: &Path) -> Result<Cgroups, CgroupError> {
        let mountinfo = Path::new("/proc/self/mountinfo");
        let mounts = std::fs::read_to_string(mountinfo).map_err(io_at(mountinfo, "read"))?;
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|source| CgroupError::OwnCgroup { source })?;
        let controllers = |root: &Path| std::fs::read_to_string(root.join("cgroup.controllers")).ok();
        let parents = plan(setting, &parse_mountinfo(&mounts), &parse_own_cgroups(&own), &controllers)?;
        let name = format!("atelier-{}", key_of(data_dir));
        let dirs: Vec<(Kind, PathBuf)> = parents.iter().map(|(k, p)| (*k, p.join(&name))).collect();
        for (kind, parent) in &parents {
            if *kind == Kind::Unified {
                enable_controllers(parent)?;
            }
        }
        let cgroups = Cgroups { bases: Arc::new(Bases { dirs, jobs: Mutex::new(0) }) };
        // Made once now, so that a parent that cannot be used is known at start, not at the
        // first job.
        cgroups.bases.make()?;
        cgroups.remove_stale();
        cgroups.bases.remove();
        Ok(cgroups)
    }

    /// The cgroups a previous server of this data dir left (it crashed, or a removal timed
    /// out): every process in them is killed and the dirs removed.
    fn remove_stale(&self) {
        let mut stale: Vec<String> = Vec::new();
        for (_, base) in &self.bases.dirs {
            let Ok(entries) = std::fs::read_dir(base) else { continue };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(JOB_PREFIX) && !stale.contains(&name) {
                    stale.push(name);
                }
            }
        }
        for name in stale {
            tracing::warn!(cgroup = %name, "a job cgroup left by a previous server: killing what is in it and removing it");
            drop(self.job_named(&name, None));
        }
    }

    /// Where this server's job cgroups are made, one dir per hierarchy.
    pub(crate) fn parents(&self) -> Vec<PathBuf> {
        self.bases.dirs.iter().map(|(_, b)| b.clone()).collect()
    }

    fn job_named(&self, name: &str, bases: Option<Arc<Bases>>) -> JobCgroup {
        JobCgroup { dirs: self.bases.dirs.iter().map(|(k, b)| (*k, b.join(name))).collect(), bases }
    }

    /// Makes the cgroup of job `job_id` with `limits`. The job joins it from its trampoline.
    pub(crate) fn create_job(&self, job_id: u64, limits: CgroupLimits) -> Result<JobCgroup, CgroupError> {
        self.bases.enter()?;
        // From here on, dropping `job` (on an error too) removes what was made and leaves.
        let job = self.job_named(&format!("{JOB_PREFIX}{job_id}"), Some(self.bases.clone()));
        for (kind, dir) in &job.dirs {
            make_dir(dir)?;
            // Only the kernel makes this file: without it the dir is no cgroup.
            let procs = dir.join("cgroup.procs");
            if !procs.exists() {
                return Err(io_at(&procs, "find")(io::Error::from(io::ErrorKind::NotFound)));
            }
            job.limit(*kind, dir, limits)?;
        }
        Ok(job)
    }
}

/// Makes a cgroup dir (or keeps the one there).
fn make_dir(dir: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_at(dir, "create the cgroup")(e)),
    }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(io_at(path, "write"))
}

/// Enables the controllers a job needs for `dir`'s children (v2), unless already enabled.
fn enable_controllers(dir: &Path) -> Result<(), CgroupError> {
    let control = dir.join("cgroup.subtree_control");
    let enabled = std::fs::read_to_string(&control).map_err(io_at(&control, "read"))?;
    let enabled: Vec<&str> = enabled.split_whitespace().collect();
    let missing: Vec<String> =
        V2_CONTROLLERS.iter().filter(|c| !enabled.contains(c)).map(|c| format!("+{c}")).collect();
    if missing.is_empty() {
        return Ok(());
    }
    write(&control, &missing.join(" "))
}

/// A value of `key` in a flat keyed file (`memory.events`, `memory.oom_control`).
fn keyed_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The pids listed in a `cgroup.procs` text.
fn parse_pids(text: &str) -> Vec<i32> {
    text.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// One job's cgroup (one dir per hierarchy). Dropping it kills whatever is still in it and
/// removes it.
#[derive(Debug)]
pub(crate) struct JobCgroup {
    dirs: Vec<(Kind, PathBuf)>,
    /// The server's dirs this job is in (none for a stale one being removed).
    bases: Option<Arc<Bases>>,
}

impl JobCgroup {
    fn limit(&self, kind: Kind, dir: &Path, limits: CgroupLimits) -> Result<(), CgroupError> {
        let optional = |file: &str, value: &str| {
            // Present only where the kernel has it (swap accounting); without swap there is
            // nothing to limit.
            let path = dir.join(file);
            if path.exists() {
                write(&path, value)
            } else {
                Ok(())
            }
        };
        match kind {
            Kind::Unified => {
                write(&dir.join("memory.max"), &limits.memory_bytes.to_string())?;
                optional("memory.swap.max", "0")?;
                write(&dir.join("pids.max"), &limits.pids_max.to_string())?;
                let quota = CPU_PERIOD_US * JOB_CPU_PERCENT_MAX / 100;
                write(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))
            }
            Kind::V1Pids => write(&dir.join("pids.max"), &limits.pids_max.to_string()),
            Kind::V1Memory => {
                write(&dir.join("memory.limit_in_bytes"), &limits.memory_bytes.to_string())?;
                // memory + swap, at the same value: running out means the OOM killer, not swap.
                optional("memory.memsw.limit_in_bytes", &limits.memory_bytes.to_string())
            }
            Kind::V1Freezer => Ok(()),
        }
    }

    /// The `cgroup.procs` files the job's trampoline writes its pid into.
    pub(crate) fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|(_, d)| d.join("cgroup.procs")).collect()
    }

    /// Whether the kernel holds the job's memory (then RLIMIT_AS is left off: it counts
    /// address space, which runtimes reserve far beyond what they use).
    pub(crate) fn limits_memory(&self) -> bool {
        self.dirs.iter().any(|(k, _)| matches!(k, Kind::Unified | Kind::V1Memory))
    }

    /// Whether the kernel holds the job's process count (then RLIMIT_NPROC, which counts
    /// every process and thread of the user, the server's too, is left off).
    pub(crate) fn limits_pids(&self) -> bool {
        self.dirs.iter().any(|(k, _)| matches!(k, Kind::Unified | Kind::V1Pids))
    }

    /// How many times the kernel's OOM killer killed a process of the job.
    pub(crate) fn oom_kills(&self) -> u64 {
        let read = |file: PathBuf, key: &str| {
            std::fs::read_to_string(&file).ok().and_then(|t| keyed_value(&t, key)).unwrap_or(0)
        };
        self.dirs
            .iter()
            .map(|(kind, dir)| match kind {
                Kind::Unified => read(dir.join("memory.events"), "oom_kill"),
                Kind::V1Memory => read(dir.join("memory.oom_control"), "oom_kill"),
                _ => 0,
            })
            .sum()
    }

    /// The pids in the job's cgroup now (from the first hierarchy that lists them).
    fn pids(&self) -> Vec<i32> {
        let mut all = Vec::new();
        for (_, dir) in &self.dirs {
            if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                for pid in parse_pids(&text) {
                    if !all.contains(&pid) {
                        all.push(pid);
                    }
                }
            }
        }
        all
    }

    /// The pids in the job's cgroup that have not exited: a zombie (the worker, before its
    /// reap) may still be listed, and it is dead already.
    fn live_pids(&self) -> Vec<i32> {
        self.pids().into_iter().filter(|p| !is_zombie(*p)).collect()
    }

    /// SIGKILLs every process in the job's cgroup, including one that left its process group
    /// or session, and one forked while this runs.
    pub(crate) fn kill_all(&self) {
        // Most jobs end with nothing left in their cgroup: then there is nothing to freeze.
        if self.live_pids().is_empty() {
            return;
        }
        let unified = self.dirs.iter().find(|(k, _)| *k == Kind::Unified).map(|(_, d)| d);
        if let Some(dir) = unified {
            let kill = dir.join("cgroup.kill");
            if kill.exists() && write(&kill, "1").is_ok() {
                return;
            }
            let freeze = dir.join("cgroup.freeze");
            let frozen = freeze.exists() && write(&freeze, "1").is_ok();
            self.kill_listed();
            if frozen {
                let _ = write(&freeze, "0");
            }
            return;
        }
        let freezer =
            self.dirs.iter().find(|(k, _)| *k == Kind::V1Freezer).map(|(_, d)| d.join("freezer.state"));
        // Frozen, no process can fork, so the list read next is the whole job; killed while
        // frozen, each dies as soon as it is thawed.
        let frozen = freezer.as_ref().is_some_and(|state| freeze_v1(state));
        self.kill_listed();
        if let (Some(state), true) = (&freezer, frozen) {
            if let Err(e) = write(state, "THAWED") {
                tracing::warn!(error = %e, "cannot thaw a job's cgroup");
            }
        }
    }

    /// Kills every listed pid, again until none is left (a fork between a read and the kills
    /// is caught by the next round).
    fn kill_listed(&self) {
        for _ in 0..KILL_ROUNDS_MAX {
            let pids = self.live_pids();
            if pids.is_empty() {
                return;
            }
            for pid in pids {
                // A pid listed in the job's cgroup is the job's; ESRCH: it is gone already.
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Kills what is left, waits for the cgroup to empty, and removes its dirs.
    fn remove(&self) -> Result<(), CgroupError> {
        self.kill_all();
        let deadline = Instant::now() + Duration::from_millis(EMPTY_WAIT_MS);
        for (_, dir) in &self.dirs {
            loop {
                match std::fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    // EBUSY: a killed process has not exited yet.
                    Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(libc::EBUSY) => {
                        self.kill_listed();
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => return Err(io_at(dir, "remove the cgroup")(e)),
                }
            }
        }
        Ok(())
    }
}

impl Drop for JobCgroup {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            tracing::warn!(error = %e, "cannot remove a job's cgroup; the next start removes it");
        }
        if let Some(b) = &self.bases {
            b.leave();
        }
    }
}

/// Whether `pid` has exited and waits to be reaped (or is gone).
fn is_zombie(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may hold any byte.
        Ok(stat) => stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next()) == Some("Z"),
        Err(_) => true,
    }
}

/// Freezes a v1 freezer cgroup; whether it got there in time.
fn freeze_v1(state: &Path) -> bool {
    if write(state, "FROZEN").is_err() {
        return false;
    }
    let deadline = Instant::now() + Duration::from_millis(FREEZE_WAIT_MS);
    while Instant::now() < deadline {
        if std::fs::read_to_string(state).is_ok_and(|s| s.trim() == "FROZEN") {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const UNIFIED: &str = "\
25 30 0:22 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    fn own(text: &str) -> Vec<(Option<String>, String)> {
        parse_own_cgroups(text)
    }

    #[test]
    fn mountinfo_names_each_hierarchy_and_its_controllers() {
        let m = parse_mountinfo(HYBRID);
        assert_eq!(m.len(), 5, "{m:?}");
        assert_eq!(m[1].point, Path::new("/sys/fs/cgroup/memory"));
        assert_eq!(m[1].v1_controllers, Some(vec!["rw".to_string(), "memory".to_string()]));
        assert_eq!(m[4].v1_controllers, None);
        let spaced = "1 2 0:1 /a\\040b /mnt/c\\040g rw - cgroup2 cgroup2 rw\n";
        assert_eq!(parse_mountinfo(spaced)[0].point, Path::new("/mnt/c g"));
        assert_eq!(parse_mountinfo(spaced)[0].root, "/a b");
    }

    #[test]
    fn own_cgroups_are_read_per_controller() {
        let o = own("4:memory:/svc/x\n8:pids:/\n1:cpu,cpuacct:/c\n0::/user.slice/u\n");
        assert!(o.contains(&(Some("memory".into()), "/svc/x".into())));
        assert!(o.contains(&(Some("cpuacct".into()), "/c".into())));
        assert!(o.contains(&(None, "/user.slice/u".into())));
    }

    /// A v2 mount without the controllers (a hybrid machine) is passed over for v1, under
    /// the server's own cgroup in each hierarchy.
    #[test]
    fn a_hybrid_machine_uses_v1_under_the_servers_own_cgroups() {
        let mounts = parse_mountinfo(HYBRID);
        let me = own("4:memory:/api/x\n8:pids:/\n6:freezer:/\n0::/\n");
        let none = |_: &Path| Some(String::new());
        let dirs = plan(&CgroupSetting::Auto, &mounts, &me, &none).unwrap();
        assert_eq!(
            dirs,
            vec![
                (Kind::V1Pids, PathBuf::from("/sys/fs/cgroup/pids")),
                (Kind::V1Memory, PathBuf::from("/sys/fs/cgroup/memory/api/x")),
                (Kind::V1Freezer, PathBuf::from("/sys/fs/cgroup/freezer")),
            ]
        );
        // A configured v1 path is the same place in each hierarchy.
        let set = CgroupSetting::Parent("/sys/fs/cgroup/pids/atelier".into());
        let dirs = plan(&set, &mounts, &me, &none).unwrap();
        assert_eq!(dirs[1], (Kind::V1Memory, PathBuf::from("/sys/fs/cgroup/memory/atelier")));
    }

    #[test]
    fn a_unified_machine_uses_v2_where_it_offers_the_controllers() {
        let mounts = parse_mountinfo(UNIFIED);
        let me = own("0::/system.slice/atelier.service\n");
        let all = |_: &Path| Some("cpuset cpu io memory hugetlb pids rdma misc\n".to_string());
        let dirs = plan(&CgroupSetting::Auto, &mounts, &me, &all).unwrap();
        assert_eq!(dirs, vec![(Kind::Unified, PathBuf::from("/sys/fs/cgroup/system.slice/atelier.service"))]);
        let set = CgroupSetting::Parent("/sys/fs/cgroup/jobs".into());
        assert_eq!(
            plan(&set, &mounts, &me, &all).unwrap(),
            vec![(Kind::Unified, PathBuf::from("/sys/fs/cgroup/jobs"))]
        );
        let elsewhere = CgroupSetting::Parent("/var/lib/jobs".into());
        assert!(matches!(plan(&elsewhere, &mounts, &me, &all), Err(CgroupError::NotMounted { .. })));
        let no_pids = |_: &Path| Some("cpu memory\n".to_string());
        assert!(matches!(
            plan(&CgroupSetting::Auto, &mounts, &me, &no_pids),
            Err(CgroupError::NotMounted { .. })
        ));
    }

    #[test]
    fn counters_and_pids_are_read_from_the_kernels_files() {
        let events = "low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(keyed_value(events, "oom_kill"), Some(1));
        assert_eq!(keyed_value(events, "oom"), Some(2));
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(keyed_value(v1, "oom_kill"), Some(3));
        assert_eq!(parse_pids("12\n345\n\n"), vec![12, 345]);
    }

    #[test]
    fn the_setting_is_auto_off_or_an_absolute_path() {
        assert_eq!(CgroupSetting::parse("auto"), Ok(CgroupSetting::Auto));
        assert_eq!(CgroupSetting::parse("off"), Ok(CgroupSetting::Off));
        assert_eq!(
            CgroupSetting::parse("/sys/fs/cgroup/x"),
            Ok(CgroupSetting::Parent("/sys/fs/cgroup/x".into()))
        );
        assert!(CgroupSetting::parse("relative/x").is_err());
    }

    /// A fake v2 cgroup dir in a temp dir: the files the kernel would have. What the job's
    /// cgroup writes is what the documented interface reads.
    #[test]
    fn a_v2_job_cgroup_writes_the_documented_files() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("atelier-k");
        std::fs::create_dir_all(&base).unwrap();
        let cg = Cgroups {
            bases: Arc::new(Bases { dirs: vec![(Kind::Unified, base.clone())], jobs: Mutex::new(0) }),
        };
        std::fs::write(base.join("cgroup.subtree_control"), "memory pids cpu").unwrap();
        let dir = base.join("job-7");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("memory.swap.max"), "max").unwrap();
        std::fs::write(dir.join("cgroup.procs"), "").unwrap();
        let job = cg.create_job(7, CgroupLimits { memory_bytes: 64 << 20, pids_max: 32 }).unwrap();
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
        assert_eq!(read("memory.max"), (64u64 << 20).to_string());
        assert_eq!(read("memory.swap.max"), "0");
        assert_eq!(read("pids.max"), "32");
        assert_eq!(read("cpu.max"), "100000 100000");
        assert_eq!(job.procs_files(), vec![dir.join("cgroup.procs")]);
        assert!(job.limits_memory() && job.limits_pids());
        std::fs::write(dir.join("memory.events"), "oom 1\noom_kill 1\n").unwrap();
        assert_eq!(job.oom_kills(), 1);
        // Leave it to the test dir: a plain dir with files is not removable like a cgroup.
        std::mem::forget(job);
    }

    /// A fake v2 job dir: with `cgroup.kill` the kernel kills all in one write; without it
    /// (before Linux 5.14) the cgroup is frozen, each listed process killed, and thawed.
    #[test]
    fn a_v2_kill_writes_cgroup_kill_or_freezes_and_kills_each() {
        let tmp = tempfile::tempdir().unwrap();
        let with_kill = tmp.path().join("a");
        std::fs::create_dir_all(&with_kill).unwrap();
        std::fs::write(with_kill.join("cgroup.kill"), "").unwrap();
        // An empty cgroup is left alone; this one lists a live process (the test's own: the
        // fake `cgroup.kill` is a plain file, so nothing is killed).
        std::fs::write(with_kill.join("cgroup.procs"), format!("{}\n", std::process::id())).unwrap();
        let job = JobCgroup { dirs: vec![(Kind::Unified, with_kill.clone())], bases: None };
        job.kill_all();
        assert_eq!(std::fs::read_to_string(with_kill.join("cgroup.kill")).unwrap(), "1");
        std::mem::forget(job);

        let older = tmp.path().join("b");
        std::fs::create_dir_all(&older).unwrap();
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        std::fs::write(older.join("cgroup.procs"), format!("{}\n", child.id())).unwrap();
        std::fs::write(older.join("cgroup.freeze"), "0").unwrap();
        let job = JobCgroup { dirs: vec![(Kind::Unified, older.clone())], bases: None };
        job.kill_all();
        let status = child.wait().unwrap();
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL));
        assert_eq!(std::fs::read_to_string(older.join("cgroup.freeze")).unwrap(), "0", "thawed after");
        std::mem::forget(job);
    }

    #[test]
    fn a_configured_v2_parent_without_the_controllers_is_refused() {
        let mounts = parse_mountinfo(HYBRID);
        let none = |_: &Path| Some(String::new());
        let set = CgroupSetting::Parent("/sys/fs/cgroup/unified/jobs".into());
        assert!(matches!(plan(&set, &mounts, &[], &none), Err(CgroupError::NotMounted { .. })));
    }
}
