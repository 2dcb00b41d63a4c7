//! The worker's fault modes (`--behave MODE`): crash, hang, flood, lie, on purpose, so the
//! fault-matrix tests can show that every way a worker can fail ends in one recorded outcome.
//! Test scaffolding: built only with the `test-faults` feature, never in a shipped binary.
//! It only ever hurts the job that asks.

use std::io::Write;
use std::time::Duration;

use atelier_engine::Stage;

use super::pipe::{PipeReporter, EXIT_OK, EXIT_PIPE, EXIT_USAGE, PROTOCOL_FD};
use super::pipeline::{Reporter, RunEnv};
use super::protocol::{Message, PROTOCOL_LINE_BYTES_MAX};

/// What `--behave exit-nonzero` exits with.
pub const EXIT_BEHAVE: i32 = 7;
/// `--behave fork-bomb` stops here where RLIMIT_NPROC does not stop it (it does not bind root).
const FORK_BOMB_PROCESSES_MAX: usize = 256;
/// `--behave huge-line`: one protocol line of 10 MiB, far past PROTOCOL_LINE_BYTES_MAX.
const HUGE_LINE_BYTES: usize = 10 << 20;
const _: () = assert!(HUGE_LINE_BYTES > PROTOCOL_LINE_BYTES_MAX);

/// The orphan of `fork-orphan`: holds the inherited pipes and says nothing.
pub(super) fn sleep_forever() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Test modes. Returns an exit code to stop with, or `None` to go on with the pipeline.
///
/// Long because it has one short arm per mode, so the list of modes is one `match`
/// that the README's list can be checked against.
pub(super) fn misbehave(mode: &str, rep: &mut PipeReporter, env: &RunEnv) -> Option<i32> {
    let first = Message::Stage { stage: Stage::FIRST };
    let forever = |rep: &mut PipeReporter, beat: bool| -> ! {
        loop {
            std::thread::sleep(env.tick);
            if beat {
                let _ = rep.send(Message::Heartbeat {});
            }
        }
    };
    match mode {
        "sigkill" | "abort" | "segfault" | "oom" | "spin" | "hang" | "no-heartbeat" | "ignore-term"
        | "exit-nonzero" | "fork-bomb" | "join-server-group" => {
            let _ = rep.send(first);
        }
        _ => {}
    }
    match mode {
        "sigkill" => {
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
            Some(EXIT_BEHAVE)
        }
        "abort" => std::process::abort(),
        // The wait status of an invalid memory access, without writing one (undefined
        // behaviour in Rust, which the compiler may remove). std's own SIGSEGV handler (stack
        // overflow detection) would swallow a raised one, so the default action goes back first.
        "segfault" => {
            use nix::sys::signal::{raise, signal, SigHandler, Signal};
            // SAFETY: SIG_DFL runs no code of ours in signal context.
            let _ = unsafe { signal(Signal::SIGSEGV, SigHandler::SigDfl) };
            let _ = raise(Signal::SIGSEGV);
            Some(EXIT_BEHAVE)
        }
        "fork-bomb" => {
            // Children that only wait, until fork fails (RLIMIT_NPROC) or, where the limit
            // does not hold (root), FORK_BOMB_PROCESSES_MAX of them; then wait to be killed.
            for n in 0..FORK_BOMB_PROCESSES_MAX {
                // SAFETY: the child only calls pause(2), async-signal-safe, until it is killed.
                match unsafe { nix::unistd::fork() } {
                    Ok(nix::unistd::ForkResult::Child) => loop {
                        nix::unistd::pause();
                    },
                    Ok(nix::unistd::ForkResult::Parent { .. }) => {}
                    Err(e) => {
                        let error = format!("fork failed after {n} children: {e}");
                        let _ = rep.send(Message::Error { error, retryable: false });
                        return Some(EXIT_BEHAVE);
                    }
                }
            }
            forever(rep, true)
        }
        "oom" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                // Touch every page so the memory is really used, not only reserved.
                hoard.push(vec![1u8; 16 << 20]);
                let _ = rep.send(Message::Heartbeat {});
            }
        }
        "spin" => {
            let mut x = 0u64;
            loop {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        "join-server-group" => {
            // Tries to leave the job's process group for the server's (the worker's parent, as
            // the trampoline runs the worker in place), where a kill of the job's group
            // could not reach it; the worker's session of its own refuses that (EPERM). If it
            // got there, it waits, beating, to be ended.
            use nix::unistd::{getpgid, getppid, setpgid, Pid};
            let moved = getpgid(Some(getppid())).and_then(|g| setpgid(Pid::from_raw(0), g));
            if let Err(e) = moved {
                let error = format!("setpgid into the server's group: {e}");
                let _ = rep.send(Message::Error { error, retryable: false });
                return Some(EXIT_BEHAVE);
            }
            forever(rep, true)
        }
        "hang" => forever(rep, true),
        "no-heartbeat" => forever(rep, false),
        "ignore-term" => {
            // SAFETY: installing SIG_IGN runs no code in the handler context.
            let _ = unsafe {
                nix::sys::signal::signal(
                    nix::sys::signal::Signal::SIGTERM,
                    nix::sys::signal::SigHandler::SigIgn,
                )
            };
            forever(rep, true)
        }
        "exit-nonzero" => Some(EXIT_BEHAVE),
        "flood" => loop {
            if rep.send(Message::Heartbeat {}).is_err() {
                return Some(EXIT_PIPE);
            }
        },
        "garbage" => {
            let _ = rep.pipe.write_all(b"this is not json\n");
            forever(rep, true)
        }
        "huge-line" => {
            let line = vec![b'x'; HUGE_LINE_BYTES];
            let _ = rep.pipe.write_all(&line);
            let _ = rep.pipe.write_all(b"\n");
            forever(rep, true)
        }
        "out-of-order" => {
            let _ = rep.send(Message::Stage { stage: Stage::CreatingImages });
            forever(rep, true)
        }
        "no-result" => {
            for stage in Stage::ALL {
                let _ = rep.send(Message::Stage { stage });
            }
            Some(EXIT_OK)
        }
        "fork-orphan" => {
            // A grandchild that outlives us in our process group, holding all our pipes open
            // (the protocol pipe too), so the controller cannot rely on EOF.
            let _ =
                nix::fcntl::fcntl(PROTOCOL_FD, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()));
            if let Ok(exe) = std::env::current_exe() {
                let _ = std::process::Command::new(exe)
                    .args(["__worker", "--input", "-", "--pipeline-file", "-", "--behave", "sleep"])
                    .spawn();
            }
            None
        }
        other => {
            let _ = rep
                .send(Message::Error { error: format!("unknown --behave mode '{other}'"), retryable: false });
            Some(EXIT_USAGE)
        }
    }
}
