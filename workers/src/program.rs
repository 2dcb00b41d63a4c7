//! Which program the job controller starts for a job (its trampoline, which then runs the
//! built-in worker in place).
//!
//! Every job pays one exec of that program, and an exec of the whole dynamically linked
//! server binary is most of a job's CPU (the dynamic loader, relocations, page faults). The
//! small `atelier-worker` binary, statically linked by `cargo build-worker`, costs about half
//! as much per job (BENCHMARKS.md, "Worker program"). The server uses it when it sits next to
//! the server binary and was built from the same sources; otherwise the server runs its own
//! hidden modes, as before. Both programs answer `__interface` with [`INTERFACE`], so a worker
//! program left over from an older build is refused instead of misreading the job's arguments.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use crate::inside::interface::INTERFACE;

/// The file name of the worker program next to the server binary.
pub(crate) const WORKER_PROGRAM_NAME: &str = "atelier-worker";

/// How long a candidate may take to print its interface stamp (it does nothing else).
const INTERFACE_CHECK_TIMEOUT: Duration = Duration::from_secs(5);
const INTERFACE_CHECK_POLL: Duration = Duration::from_millis(5);
/// A stamp is one short line; anything longer is not one.
const INTERFACE_BYTES_MAX: u64 = 256;

/// The program chosen, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerProgram {
    pub path: PathBuf,
    pub source: ProgramSource,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProgramSource {
    /// Named by configuration (ATELIER_WORKER_PROGRAM).
    Configured,
    /// `atelier-worker` next to the server binary.
    Sibling,
    /// The server binary's own hidden modes: no worker program next to it.
    Server,
    /// The server binary's own hidden modes, because the one next to it was refused.
    ServerInsteadOf { refused: PathBuf, why: ProgramError },
}

#[derive(Debug, Clone)]
pub enum ProgramError {
    /// It could not be started (or waited for): `doing` says which, `source` why. Shared, so
    /// the error stays cloneable for the `ProgramSource` that reports it.
    CannotRun { path: PathBuf, doing: &'static str, source: Arc<std::io::Error> },
    /// `__interface` did not exit cleanly.
    Failed { path: PathBuf, status: std::process::ExitStatus },
    /// It did not answer within [`INTERFACE_CHECK_TIMEOUT`] (it was killed).
    TimedOut { path: PathBuf },
    /// It was built from other sources than this server.
    Mismatch { path: PathBuf, found: String, expected: String },
}

impl fmt::Display for ProgramError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProgramError::CannotRun { path, doing, source } => {
                write!(f, "worker program {}: {doing}: {source}", path.display())
            }
            ProgramError::Failed { path, status } => {
                write!(f, "worker program {}: `__interface` ended with {status}", path.display())
            }
            ProgramError::TimedOut { path } => write!(
                f,
                "worker program {}: no answer to `__interface` within {} s",
                path.display(),
                INTERFACE_CHECK_TIMEOUT.as_secs()
            ),
            ProgramError::Mismatch { path, found, expected } => write!(
                f,
                "worker program {} was built from other sources (interface '{found}', this server '{expected}'); rebuild it (`cargo build-worker`)",
                path.display()
            ),
        }
    }
}

/// Equal when they say the same: an I/O cause compares by its kind and message.
impl PartialEq for ProgramError {
    fn eq(&self, other: &ProgramError) -> bool {
        use ProgramError::*;
        match (self, other) {
            (
                CannotRun { path: p1, doing: d1, source: s1 },
                CannotRun { path: p2, doing: d2, source: s2 },
            ) => (p1, d1, s1.kind(), s1.to_string()) == (p2, d2, s2.kind(), s2.to_string()),
            (Failed { path: p1, status: s1 }, Failed { path: p2, status: s2 }) => (p1, s1) == (p2, s2),
            (TimedOut { path: p1 }, TimedOut { path: p2 }) => p1 == p2,
            (
                Mismatch { path: p1, found: f1, expected: e1 },
                Mismatch { path: p2, found: f2, expected: e2 },
            ) => (p1, f1, e1) == (p2, f2, e2),
            _ => false,
        }
    }
}

impl Eq for ProgramError {}

impl std::error::Error for ProgramError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ProgramError::CannotRun { source, .. } => Some(&**source),
            _ => None,
        }
    }
}

/// Picks the worker program for a server running as `server_exe`. A configured program must
/// pass the interface check (an error otherwise: the operator asked for it); a sibling that
/// fails it is set aside for the server's own modes, with the reason in the result.
pub fn choose_worker_program(
    server_exe: &Path,
    configured: Option<PathBuf>,
) -> Result<WorkerProgram, ProgramError> {
    if let Some(path) = configured {
        // Absolute: a job's trampoline runs in another working directory.
        let path = std::fs::canonicalize(&path).map_err(|e| ProgramError::CannotRun {
            path: path.clone(),
            doing: "cannot start it",
            source: Arc::new(e),
        })?;
        check_interface(&path)?;
        return Ok(WorkerProgram { path, source: ProgramSource::Configured });
    }
    let server = || server_exe.to_path_buf();
    let Some(sibling) = server_exe.parent().map(|dir| dir.join(WORKER_PROGRAM_NAME)) else {
        return Ok(WorkerProgram { path: server(), source: ProgramSource::Server });
    };
    if !sibling.is_file() {
        return Ok(WorkerProgram { path: server(), source: ProgramSource::Server });
    }
    match check_interface(&sibling) {
        Ok(()) => Ok(WorkerProgram { path: sibling, source: ProgramSource::Sibling }),
        Err(why) => Ok(WorkerProgram {
            path: server(),
            source: ProgramSource::ServerInsteadOf { refused: sibling, why },
        }),
    }
}

/// Runs `path __interface` and compares its answer with [`INTERFACE`].
pub(crate) fn check_interface(path: &Path) -> Result<(), ProgramError> {
    let cannot = |doing: &'static str| {
        move |e: std::io::Error| ProgramError::CannotRun {
            path: path.to_path_buf(),
            doing,
            source: Arc::new(e),
        }
    };
    let mut child = Command::new(path)
        .arg("__interface")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .env_clear()
        .spawn()
        .map_err(cannot("cannot start it"))?;
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() < INTERFACE_CHECK_TIMEOUT => {
                std::thread::sleep(INTERFACE_CHECK_POLL)
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(ProgramError::TimedOut { path: path.to_path_buf() });
            }
            Err(e) => return Err(cannot("cannot wait for it")(e)),
        }
    };
    let mut answer = String::new();
    if let Some(out) = child.stdout.take() {
        // The child has exited, so this read ends; a non-UTF-8 answer is simply a mismatch.
        let _ = out.take(INTERFACE_BYTES_MAX).read_to_string(&mut answer);
    }
    if !status.success() {
        return Err(ProgramError::Failed { path: path.to_path_buf(), status });
    }
    let found = answer.trim();
    if found != INTERFACE {
        return Err(ProgramError::Mismatch {
            path: path.to_path_buf(),
            found: found.to_string(),
            expected: INTERFACE.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A fresh dir to stand in for the server's own, removed when the guard drops.
    fn dir(name: &str) -> tempfile::TempDir {
        tempfile::Builder::new().prefix(&format!("atelier-program-{name}-")).tempdir().unwrap()
    }

    fn script(path: &Path, body: &str) {
        std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn no_sibling_means_the_server_itself() {
        let d = dir("none");
        let server = d.path().join("atelier");
        let chosen = choose_worker_program(&server, None).unwrap();
        assert_eq!(chosen, WorkerProgram { path: server, source: ProgramSource::Server });
    }

    #[test]
    fn a_sibling_with_the_same_interface_is_used() {
        let d = dir("same");
        let sibling = d.path().join(WORKER_PROGRAM_NAME);
        script(&sibling, &format!("[ \"$1\" = __interface ] && echo '{INTERFACE}'"));
        let chosen = choose_worker_program(&d.path().join("atelier"), None).unwrap();
        assert_eq!(chosen, WorkerProgram { path: sibling, source: ProgramSource::Sibling });
    }

    #[test]
    fn a_stale_sibling_is_set_aside_with_the_reason() {
        let d = dir("stale");
        let sibling = d.path().join(WORKER_PROGRAM_NAME);
        script(&sibling, "echo 0.0.1+0000000000000000");
        let server = d.path().join("atelier");
        let chosen = choose_worker_program(&server, None).unwrap();
        assert_eq!(chosen.path, server);
        match chosen.source {
            ProgramSource::ServerInsteadOf {
                refused,
                why: ProgramError::Mismatch { found, expected, .. },
            } => {
                assert_eq!(refused, sibling);
                assert_eq!(found, "0.0.1+0000000000000000");
                assert_eq!(expected, INTERFACE);
            }
            other => panic!("expected a mismatch, got {other:?}"),
        }
    }

    #[test]
    fn a_sibling_that_fails_is_set_aside() {
        let d = dir("fails");
        script(&d.path().join(WORKER_PROGRAM_NAME), "exit 3");
        let chosen = choose_worker_program(&d.path().join("atelier"), None).unwrap();
        match &chosen.source {
            ProgramSource::ServerInsteadOf { why: why @ ProgramError::Failed { status, .. }, .. } => {
                assert_eq!(status.code(), Some(3), "{chosen:?}");
                assert!(why.to_string().contains("exit status: 3"), "{why}");
            }
            other => panic!("expected a failed check, got {other:?}"),
        }
    }

    #[test]
    fn a_configured_program_must_pass_the_check() {
        let d = dir("configured");
        let good = d.path().join("good");
        script(&good, &format!("echo '{INTERFACE}'"));
        let chosen = choose_worker_program(&d.path().join("atelier"), Some(good.clone())).unwrap();
        assert_eq!(chosen, WorkerProgram { path: good, source: ProgramSource::Configured });

        let missing = d.path().join("missing");
        let err = choose_worker_program(&d.path().join("atelier"), Some(missing)).unwrap_err();
        assert!(matches!(err, ProgramError::CannotRun { .. }), "{err:?}");
        assert!(err.to_string().contains("cannot start it"), "{err}");

        let old = d.path().join("old");
        script(&old, "echo nope");
        let err = choose_worker_program(&d.path().join("atelier"), Some(old)).unwrap_err();
        assert!(err.to_string().contains("built from other sources"), "{err}");
    }

    #[test]
    fn the_stamp_names_the_version_and_a_source_hash() {
        let (version, hash) = INTERFACE.split_once('+').unwrap();
        assert_eq!(version, env!("CARGO_PKG_VERSION"));
        assert_eq!(hash.len(), 16);
        assert!(hash.bytes().all(|b| b.is_ascii_hexdigit()), "{INTERFACE}");
    }
}
