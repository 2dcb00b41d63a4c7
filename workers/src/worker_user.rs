//! Which user a job's worker runs as, and what of the data dir that user may reach: the one
//! home of that policy, decided once at start.
//!
//! A worker runs code that teams write themselves. Under the server's own user it could read
//! the token secret, the sled files and every other job's dir, and write anything the server
//! can; as root it could do anything at all, and RLIMIT_NPROC would not bind it. So a server
//! running as root hands every worker to a dedicated unprivileged user (`[workers] user`,
//! `atelier-worker` by default) and refuses to run workers as root unless told to
//! (`allow_root_workers`). A server that is not root cannot switch users: its workers run as
//! itself, which is weaker (see workers/README.md).
//!
//! With a dedicated user the data dir is laid out for it (`prepare_data_dir`): the data dir,
//! the jobs dir and the pipeline specs dir are traversable by the worker's group but not
//! listable, the specs readable, the artifacts dir writable but not listable; everything else
//! stays the server's alone (0700 dirs, 0600 files). A job's own dir belongs to the worker
//! user while the job runs (`hand_over_job_dir`) and goes back to the server when it ends
//! (`take_back_job_dir`), so a job can reach no finished job's dir.

use std::fs::{File, OpenOptions, Permissions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub use crate::config::{UserSetting, WORKER_USER_DEFAULT};
use crate::paths::DataDir;

/// The data dir, the jobs dir and the pipeline specs dir under a dedicated worker user: the
/// worker's group may pass through (to its own job dir, the spec it is given) but not list.
pub const TRAVERSE_DIR_MODE: u32 = 0o710;
/// A pipeline spec under a dedicated worker user: its group reads it.
pub const SPEC_FILE_MODE: u32 = 0o640;
/// The artifacts dir under a dedicated worker user: the worker's group stores artifacts (the
/// built-in worker's `artifact_store` step) and opens them by name, but cannot list them.
pub const ARTIFACTS_DIR_MODE: u32 = 0o730;

/// A user a worker switches to: its uid and primary group, and no supplementary groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
}

/// Who workers run as, decided once at start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerUser {
    /// The server is not root: workers run as the server's user, with no switch.
    Server,
    /// The server is root and `allow_root_workers` lets workers run as root too.
    RootAllowed,
    /// The trampoline switches every worker to this user.
    Dedicated(Identity),
}

impl WorkerUser {
    /// The user the trampoline switches to, if any.
    pub fn switch_to(self) -> Option<Identity> {
        match self {
            WorkerUser::Dedicated(id) => Some(id),
            WorkerUser::Server | WorkerUser::RootAllowed => None,
        }
    }
}

/// Why workers cannot be given a user; each stops the start.
#[derive(Debug)]
pub enum WorkerUserError {
    /// Root server, `[workers] user` unset, and no `atelier-worker` account.
    NoWorkerUser,
    /// `[workers] user` names an account this machine does not have.
    UnknownUser { setting: UserSetting },
    /// The worker user is root (configured, or the server's own) without `allow_root_workers`.
    RootRefused { setting: UserSetting },
    /// A server that is not root was told to run workers as someone else.
    CannotSwitch { server_uid: u32, setting: UserSetting },
    /// The account database could not be read.
    Lookup { setting: UserSetting, source: std::io::Error },
    /// The worker user cannot pass through this ancestor of the data dir.
    Unreachable { path: PathBuf, uid: u32 },
}

impl std::fmt::Display for WorkerUserError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WorkerUserError::NoWorkerUser => write!(
                f,
                "the server runs as root and there is no user '{WORKER_USER_DEFAULT}' to run workers as; \
                 create it (`adduser --system --group --no-create-home {WORKER_USER_DEFAULT}`), name another \
                 with [workers] user (ATELIER_WORKER_USER), or set [workers] allow_root_workers = true \
                 (ATELIER_ALLOW_ROOT_WORKERS) to run jobs as root"
            ),
            WorkerUserError::UnknownUser { setting } => {
                write!(f, "[workers] user: there is no user {setting} on this machine")
            }
            WorkerUserError::RootRefused { setting } => write!(
                f,
                "[workers] user {setting} is root: jobs would run as root; name an unprivileged user, \
                 or set [workers] allow_root_workers = true (ATELIER_ALLOW_ROOT_WORKERS)"
            ),
            WorkerUserError::CannotSwitch { server_uid, setting } => write!(
                f,
                "[workers] user {setting}: the server runs as uid {server_uid}, not root, and cannot \
                 switch workers to another user; start it as root or leave [workers] user unset"
            ),
            WorkerUserError::Lookup { setting, source } => {
                write!(f, "[workers] user: cannot look up {setting}: {source}")
            }
            WorkerUserError::Unreachable { path, uid } => write!(
                f,
                "the worker user (uid {uid}) cannot pass through {}: give others (or its group) \
                 execute permission on it, or move the data dir",
                path.display()
            ),
        }
    }
}

impl std::error::Error for WorkerUserError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            WorkerUserError::Lookup { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Looks up an account: `Ok(None)` when there is none.
pub type Lookup<'a> = &'a dyn Fn(&UserSetting) -> std::io::Result<Option<Identity>>;

/// Who workers run as, for a server running as `server_uid` (pure; `lookup` reads accounts).
pub fn resolve(
    setting: &UserSetting,
    allow_root_workers: bool,
    server_uid: u32,
    lookup: Lookup<'_>,
) -> Result<WorkerUser, WorkerUserError> {
    let found =
        lookup(setting).map_err(|source| WorkerUserError::Lookup { setting: setting.clone(), source })?;
    if server_uid != 0 {
        // Only root may switch users: a setting that names the server's own user is fine.
        return match (setting, found) {
            (UserSetting::Default, _) => Ok(WorkerUser::Server),
            (_, Some(id)) if id.uid == server_uid => Ok(WorkerUser::Server),
            _ => Err(WorkerUserError::CannotSwitch { server_uid, setting: setting.clone() }),
        };
    }
    match (setting, found) {
        (_, Some(id)) if id.uid != 0 => Ok(WorkerUser::Dedicated(id)),
        _ if allow_root_workers => Ok(WorkerUser::RootAllowed),
        (UserSetting::Default, None) => Err(WorkerUserError::NoWorkerUser),
        (_, None) => Err(WorkerUserError::UnknownUser { setting: setting.clone() }),
        (_, Some(_)) => Err(WorkerUserError::RootRefused { setting: setting.clone() }),
    }
}

/// Looks a setting up in the system's account database (`getpwnam_r` / `getpwuid_r`). A uid
/// without an account is taken as given, with its own number as its group: a numeric user
/// needs no entry in /etc/passwd to be switched to.
pub fn system_lookup(setting: &UserSetting) -> std::io::Result<Option<Identity>> {
    use nix::unistd::{Uid, User};
    let user = match setting {
        UserSetting::Default => User::from_name(WORKER_USER_DEFAULT),
        UserSetting::Name(name) => User::from_name(name),
        UserSetting::Uid(uid) => match User::from_uid(Uid::from_raw(*uid)) {
            Ok(None) => return Ok(Some(Identity { uid: *uid, gid: *uid })),
            other => other,
        },
    }
    .map_err(std::io::Error::from)?;
    Ok(user.map(|u| Identity { uid: u.uid.as_raw(), gid: u.gid.as_raw() }))
}

/// Sets the modes (and, with a dedicated user, the group) of the shared parts of the data dir
/// for `user`. Runs at every start, so a data dir made by an earlier version (all 0700 and
/// 0600), or under another worker user, is put right before any job runs; with no dedicated
/// user everything goes back to private. No job runs yet, so every job dir is taken back: one
/// a crash left running (its end never came to `take_back_job_dir`) must not stay the worker
/// user's.
pub fn prepare_data_dir(dir: &DataDir, user: WorkerUser) -> std::io::Result<()> {
    use crate::inside::private::{DIR_MODE, FILE_MODE};
    let (group, traverse, artifacts, spec) = match user {
        WorkerUser::Dedicated(id) => (Some(id.gid), TRAVERSE_DIR_MODE, ARTIFACTS_DIR_MODE, SPEC_FILE_MODE),
        WorkerUser::Server | WorkerUser::RootAllowed => (None, DIR_MODE, DIR_MODE, FILE_MODE),
    };
    crate::inside::private::create_dir_all(&dir.pipeline_specs())?;
    for path in [dir.root().to_path_buf(), dir.jobs(), dir.pipeline_specs()] {
        set_owner_and_mode(&path, group, traverse)?;
    }
    set_owner_and_mode(&dir.artifacts(), group, artifacts)?;
    for entry in std::fs::read_dir(dir.pipeline_specs())? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            set_owner_and_mode(&entry.path(), group, spec)?;
        }
    }
    if let WorkerUser::Dedicated(id) = user {
        make_the_rest_private(dir)?;
        check_reachable(dir.root(), id)?;
        if dir.artifacts_elsewhere() {
            check_reachable(&dir.artifacts(), id)?;
        }
        for entry in std::fs::read_dir(dir.jobs())? {
            let entry = entry?;
            let Some(job_id) = DataDir::job_id_of(&entry.file_name()) else { continue };
            // One odd entry (not a dir, say) must not stop the start; the janitor removes it.
            if let Err(e) = take_back_job_dir(&dir.job(job_id), user) {
                tracing::warn!(job = job_id, error = %e, "cannot take the job dir back from the worker user");
            }
        }
    }
    Ok(())
}

/// Everything else at the top of the data dir becomes the server's alone: the worker's group
/// passes through the data dir, so a store dir, a secret or a log file left open to group or
/// others (by an older version's umask, or an operator's `server.log` there) would be readable
/// through it. Whatever is inside a private dir is out of reach with it.
fn make_the_rest_private(dir: &DataDir) -> std::io::Result<()> {
    let shared = [dir.jobs(), dir.artifacts()];
    for entry in std::fs::read_dir(dir.root())? {
        let entry = entry?;
        let path = entry.path();
        let meta = std::fs::symlink_metadata(&path)?;
        if shared.contains(&path) || meta.file_type().is_symlink() || meta.mode() & 0o077 == 0 {
            continue;
        }
        std::fs::set_permissions(&path, Permissions::from_mode(meta.mode() & 0o7700))?;
    }
    Ok(())
}

/// Gives a pipeline spec the server just wrote the mode `user` needs to read it.
pub fn share_spec_file(path: &Path, user: WorkerUser) -> std::io::Result<()> {
    match user {
        WorkerUser::Dedicated(id) => set_owner_and_mode(path, Some(id.gid), SPEC_FILE_MODE),
        WorkerUser::Server | WorkerUser::RootAllowed => Ok(()),
    }
}

/// Makes a job's dir (private) and, with a dedicated user, gives it to that user for the job.
pub fn hand_over_job_dir(path: &Path, user: WorkerUser) -> std::io::Result<()> {
    crate::inside::private::create_dir_all(path)?;
    match user {
        WorkerUser::Dedicated(id) => {
            let dir = open_dir_nofollow(path)?;
            std::os::unix::fs::fchown(&dir, Some(id.uid), Some(id.gid))
        }
        WorkerUser::Server | WorkerUser::RootAllowed => Ok(()),
    }
}

/// Takes a job's dir back from the worker user once its job has ended: owned by the server
/// and private again, so no later job of that user can enter it. A dir that is not there
/// (a job that never got one) is fine.
pub fn take_back_job_dir(path: &Path, user: WorkerUser) -> std::io::Result<()> {
    if user.switch_to().is_none() {
        return Ok(());
    }
    let dir = match open_dir_nofollow(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        other => other?,
    };
    std::os::unix::fs::fchown(
        &dir,
        Some(nix::unistd::geteuid().as_raw()),
        Some(nix::unistd::getegid().as_raw()),
    )?;
    dir.set_permissions(Permissions::from_mode(crate::inside::private::DIR_MODE))
}

/// The worker owns its dir while it runs, and the jobs dir is not writable by it, so the
/// entry stays a dir; opening it without following links keeps it so even if that changes.
fn open_dir_nofollow(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW).open(path)
}

fn set_owner_and_mode(path: &Path, group: Option<u32>, mode: u32) -> std::io::Result<()> {
    if group.is_some() {
        std::os::unix::fs::chown(path, None, group)?;
    }
    std::fs::set_permissions(path, Permissions::from_mode(mode))
}

/// Every ancestor of the data dir must let the worker user through, or every job would fail
/// at its first path: better said once, at start, with the dir to fix.
fn check_reachable(root: &Path, id: Identity) -> std::io::Result<()> {
    for dir in root.ancestors().skip(1) {
        let meta = std::fs::metadata(dir)?;
        let mode = meta.mode();
        let passes = mode & 0o001 != 0
            || (meta.gid() == id.gid && mode & 0o010 != 0)
            || (meta.uid() == id.uid && mode & 0o100 != 0);
        if !passes {
            let e = WorkerUserError::Unreachable { path: dir.to_path_buf(), uid: id.uid };
            return Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, e.to_string()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const WORKER: Identity = Identity { uid: 998, gid: 997 };

    fn accounts(setting: &UserSetting) -> std::io::Result<Option<Identity>> {
        Ok(match setting {
            UserSetting::Default => None,
            UserSetting::Name(n) if n == "w" => Some(WORKER),
            UserSetting::Name(n) if n == "root" => Some(Identity { uid: 0, gid: 0 }),
            UserSetting::Name(n) if n == "me" => Some(Identity { uid: 1000, gid: 1000 }),
            UserSetting::Name(_) => None,
            UserSetting::Uid(uid) => Some(Identity { uid: *uid, gid: *uid }),
        })
    }

    fn with_default_account(setting: &UserSetting) -> std::io::Result<Option<Identity>> {
        match setting {
            UserSetting::Default => Ok(Some(WORKER)),
            other => accounts(other),
        }
    }

    fn check(setting: &str, allow_root: bool, server_uid: u32, lookup: Lookup<'_>) -> String {
        let setting = if setting.is_empty() { UserSetting::Default } else { UserSetting::parse(setting) };
        match resolve(&setting, allow_root, server_uid, lookup) {
            Ok(u) => format!("{u:?}"),
            Err(e) => format!("error: {e:?}"),
        }
    }

    /// The policy as a table: setting, allow_root_workers, server uid → who workers run as.
    #[test]
    fn the_policy_as_a_table() {
        let cases: &[(&str, bool, u32, Lookup<'_>, &str)] = &[
            ("", false, 0, &with_default_account, "Dedicated(Identity { uid: 998, gid: 997 })"),
            ("", false, 0, &accounts, "error: NoWorkerUser"),
            ("", true, 0, &accounts, "RootAllowed"),
            ("w", false, 0, &accounts, "Dedicated(Identity { uid: 998, gid: 997 })"),
            ("1234", false, 0, &accounts, "Dedicated(Identity { uid: 1234, gid: 1234 })"),
            ("nobody-here", false, 0, &accounts, "error: UnknownUser { setting: Name(\"nobody-here\") }"),
            ("root", false, 0, &accounts, "error: RootRefused { setting: Name(\"root\") }"),
            ("0", false, 0, &accounts, "error: RootRefused { setting: Uid(0) }"),
            ("root", true, 0, &accounts, "RootAllowed"),
            ("", false, 1000, &accounts, "Server"),
            ("me", false, 1000, &accounts, "Server"),
            ("1000", false, 1000, &accounts, "Server"),
            ("w", false, 1000, &accounts, "error: CannotSwitch { server_uid: 1000, setting: Name(\"w\") }"),
        ];
        for (setting, allow, uid, lookup, want) in cases {
            assert_eq!(
                &check(setting, *allow, *uid, *lookup),
                want,
                "user {setting:?}, allow {allow}, server {uid}"
            );
        }
    }

    fn mode_and_group(path: &Path) -> (u32, u32) {
        let m = std::fs::symlink_metadata(path).unwrap();
        (m.mode() & 0o7777, m.gid())
    }

    /// A data dir as an earlier version left it (everything private, a log open to all) is
    /// laid out for the worker user at start, and put back to private without one; a job's
    /// dir is the worker's while it runs and the server's after.
    #[test]
    fn an_existing_data_dir_is_laid_out_for_the_worker_user() {
        if nix::unistd::geteuid().as_raw() != 0 {
            eprintln!("skipped: giving files to another user needs root");
            return;
        }
        let scratch = tempfile::Builder::new().prefix("atelier-worker-user-").tempdir().unwrap();
        let dir = DataDir::new(scratch.path());
        crate::inside::private::create_dir_all(&dir.pipeline_specs()).unwrap();
        crate::inside::private::create_dir_all(&dir.artifacts()).unwrap();
        let spec = dir.pipeline_spec("p", "ab12");
        crate::inside::private::create_file(&spec).unwrap();
        let log = scratch.path().join("server.log");
        std::fs::write(&log, "").unwrap();
        std::fs::set_permissions(&log, Permissions::from_mode(0o644)).unwrap();
        let worker = WorkerUser::Dedicated(Identity { uid: 54_321, gid: 54_322 });
        prepare_data_dir(&dir, worker).unwrap();
        assert_eq!(mode_and_group(dir.root()), (TRAVERSE_DIR_MODE, 54_322));
        assert_eq!(mode_and_group(&dir.jobs()), (TRAVERSE_DIR_MODE, 54_322));
        assert_eq!(mode_and_group(&dir.pipeline_specs()), (TRAVERSE_DIR_MODE, 54_322));
        assert_eq!(mode_and_group(&spec), (SPEC_FILE_MODE, 54_322));
        assert_eq!(mode_and_group(&dir.artifacts()), (ARTIFACTS_DIR_MODE, 54_322));
        assert_eq!(mode_and_group(&log).0, 0o600);
        let job = dir.job(7);
        hand_over_job_dir(&job, worker).unwrap();
        let m = std::fs::metadata(&job).unwrap();
        assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o700, 54_321, 54_322));
        take_back_job_dir(&job, worker).unwrap();
        let m = std::fs::metadata(&job).unwrap();
        assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o700, 0, 0));
        take_back_job_dir(&dir.job(8), worker).expect("a job without a dir is fine");
        // One a crash left with the worker user is taken back at the next start.
        hand_over_job_dir(&job, worker).unwrap();
        prepare_data_dir(&dir, worker).unwrap();
        assert_eq!(std::fs::metadata(&job).unwrap().uid(), 0);
        prepare_data_dir(&dir, WorkerUser::RootAllowed).unwrap();
        for path in [dir.root(), &dir.jobs(), &dir.pipeline_specs(), &dir.artifacts()] {
            assert_eq!(mode_and_group(path).0, 0o700, "{}", path.display());
        }
        assert_eq!(mode_and_group(&spec).0, 0o600);
    }

    #[test]
    fn every_refusal_names_the_setting_that_lifts_it() {
        for e in
            [WorkerUserError::NoWorkerUser, WorkerUserError::RootRefused { setting: UserSetting::Uid(0) }]
        {
            assert!(e.to_string().contains("allow_root_workers"), "{e}");
        }
        assert!(WorkerUserError::NoWorkerUser.to_string().contains("adduser --system"));
    }
}
