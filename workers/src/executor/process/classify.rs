//! How a finished worker ended, as exactly one outcome: what it said, how the kernel says it
//! exited, why the controller ended it and the tail of its stderr go in; a recorded `Finish`
//! and whether the controller's own machinery is to blame come out. Pure, so the whole fault
//! matrix is a table test.

use atelier_engine::{JobEnd, JobStatus};
use nix::sys::signal::Signal;

use crate::session::{job_end, Finish};

/// A failed memory limit's error text starts with this; the next attempt's memory is
/// doubled once per such failure in a row.
pub const MEMORY_ERROR_PREFIX: &str = "memory limit exceeded";
/// Exit codes of the trampoline (see `inside/trampoline.rs`).
const TRAMPOLINE_EXIT_CODES: std::ops::RangeInclusive<i32> = 124..=127;

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum KillReason {
    Cancel,
    Shutdown,
    Timeout {
        seconds: u64,
    },
    Stalled {
        ms: u64,
    },
    Protocol(String),
    /// Over `lines_max` protocol lines in one second: what the job's own code wrote, so the
    /// job's failure, never the controller's.
    Flood {
        lines_max: u32,
    },
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
    /// Processes of the job the kernel's OOM killer killed at the job cgroup's memory limit
    /// (0 without a memory cgroup).
    pub(crate) oom_kills: u64,
}

/// The limits this attempt ran under.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Applied {
    pub(crate) memory_mb: u64,
    pub(crate) memory_max_mb: u64,
    pub(crate) cpu_seconds: u64,
    pub(crate) timeout_seconds: u64,
    pub(crate) heartbeat_ms: u64,
    /// The whole job is the pipeline's own `command`: once it runs, how it ends (a crash, a
    /// stall, a bad line, an exit code) is that program's doing, not the controller's.
    pub(crate) own_program: bool,
}

/// The result of watching: how it ended, and whether the failure was the controller's
/// machinery (as opposed to the job's own doing), which feeds the rollback rate.
pub(crate) struct Ended {
    pub(crate) finish: Finish,
    pub(crate) infra_failure: bool,
}

/// What the worker said before it ended.
#[derive(Clone, Debug, Default)]
pub(crate) struct Reported {
    pub(crate) job_id: u64,
    pub(crate) result: Option<String>,
    pub(crate) worker_error: Option<(String, bool)>,
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
///
/// Long because its `return`s are a precedence order (our own
/// kill reason, then what the worker reported, then memory, CPU and file-size limits, then
/// signals, then exit codes), read top to bottom; split into helpers, that order would be
/// spread over several places.
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
    // Whether a failure after the worker program started is the controller's machinery (the
    // built-in worker is ours) or the pipeline's own program.
    let machinery = !applied.own_program;
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
            return fail(
                format!("stalled: no protocol line for {ms} ms"),
                true,
                JobStatus::TimedOut,
                machinery,
            )
        }
        Some(KillReason::Protocol(e)) => {
            return fail(format!("protocol error: {e}"), false, JobStatus::Failed, machinery)
        }
        Some(KillReason::Flood { lines_max }) => {
            return fail(
                format!("protocol error: flooding: over {lines_max} protocol lines in one second"),
                false,
                JobStatus::Failed,
                false,
            )
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
    let crashed = exit.signal.is_some() || exit.code.is_some_and(|c| c != 0);
    // A stage command's stderr is the job's: one that ran out of memory (Python's
    // `MemoryError`, an allocation failure) left that as the last line before the worker
    // reported the stage's failure, which is then the memory outcome, not the error it said.
    // Under a memory cgroup the kernel kills instead (SIGKILL, to the worker or to a stage
    // command, which the worker then reports), and its OOM-kill count is what tells that
    // SIGKILL from any other.
    let out_of_memory = exit.oom_kills > 0
        || match &session.worker_error {
            Some(_) => last_line(stderr_tail).is_some_and(looks_like_oom),
            None => crashed && looks_like_oom(stderr_tail),
        };
    if let (Some((error, retryable)), false) = (&session.worker_error, out_of_memory) {
        return fail(error.clone(), *retryable, JobStatus::Failed, false);
    }
    if out_of_memory {
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
                machinery,
            )
        }
        None => {}
    }
    match exit.code {
        Some(0) => fail("the worker exited 0 without a result".into(), false, JobStatus::Failed, machinery),
        Some(127) => fail(
            with_stderr("could not start the worker program (exit 127)".into()),
            false,
            JobStatus::Failed,
            machinery,
        ),
        Some(c) if TRAMPOLINE_EXIT_CODES.contains(&c) => fail(
            with_stderr(format!("could not set up the worker (exit {c})")),
            true,
            JobStatus::Failed,
            true,
        ),
        Some(c) => {
            fail(with_stderr(format!("the worker exited with code {c}")), true, JobStatus::Failed, machinery)
        }
        None => fail("the worker ended in an unknown way".into(), true, JobStatus::Failed, machinery),
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
        Applied {
            memory_mb: 128,
            memory_max_mb: 256,
            cpu_seconds: 2,
            timeout_seconds: 5,
            heartbeat_ms: 400,
            own_program: false,
        }
    }

    fn exit(code: Option<i32>, signal: Option<i32>) -> ExitInfo {
        ExitInfo { code, signal, max_rss_bytes: 0, cpu_ms: 0, oom_kills: 0 }
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
            // The cgroup's OOM killer: the worker itself, or a stage command the worker then
            // reported, killed at the memory limit.
            (
                &none,
                ExitInfo { oom_kills: 1, ..exit(None, Some(9)) },
                None,
                "",
                "killed",
                Some(true),
                "memory limit exceeded (128 MiB); the next attempt gets 256 MiB",
                false,
            ),
            (
                &err,
                ExitInfo { oom_kills: 1, ..exit(Some(1), None) },
                None,
                "",
                "killed",
                Some(true),
                "memory limit exceeded (128 MiB)",
                false,
            ),
            (
                &err,
                exit(Some(1), None),
                None,
                "Traceback (most recent call last):\n  File \"<string>\", line 1\nMemoryError\n",
                "killed",
                Some(true),
                "memory limit exceeded (128 MiB); the next attempt gets 256 MiB",
                false,
            ),
            (
                &err,
                exit(Some(1), None),
                None,
                "MemoryError\nbut it recovered and failed for another reason\n",
                "failed",
                Some(true),
                "boom",
                false,
            ),
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
            (
                &none,
                exit(None, Some(9)),
                Some(KillReason::Flood { lines_max: 10 }),
                "",
                "failed",
                Some(false),
                "flooding: over 10 protocol lines",
                false,
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

    /// A pipeline's own program failing is its own failure: none of it feeds the rollback,
    /// except the trampoline's set-up codes (before the program ran).
    #[test]
    fn a_pipelines_own_program_failing_is_not_the_controllers_failure() {
        let own = Applied { own_program: true, ..applied() };
        let none = Reported { job_id: 1, ..Reported::default() };
        let endings = [
            (exit(None, Some(9)), Some(KillReason::Protocol("x".into()))),
            (exit(None, Some(9)), Some(KillReason::Stalled { ms: 400 })),
            (exit(None, Some(11)), None),
            (exit(Some(3), None), None),
            (exit(Some(0), None), None),
            (exit(Some(127), None), None),
        ];
        for (i, (ex, kill)) in endings.iter().enumerate() {
            assert!(!classify(&none, ex, kill.as_ref(), "", &own).infra_failure, "case {i}");
            assert!(classify(&none, ex, kill.as_ref(), "", &applied()).infra_failure, "case {i}");
        }
        assert!(classify(&none, &exit(Some(124), None), None, "", &own).infra_failure);
    }

    #[test]
    fn signal_names() {
        assert_eq!(signal_name(9), "SIGKILL");
        assert_eq!(signal_name(24), "SIGXCPU");
    }
}
