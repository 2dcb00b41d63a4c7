//! `atelier __worker`: the built-in worker process. Runs a pipeline and reports it as protocol
//! lines on fd 3, which the trampoline connected to the controller.
//!
//! `--behave MODE` makes it misbehave on purpose (crash, hang, flood, lie); the fault-matrix
//! tests use it through a pipeline's `worker_args`. It only ever hurts the job that asks.

use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::time::Duration;

use atelier_engine::Stage;

use crate::config::PipelineConfig;
use crate::pipeline::{self, JobInput, Reporter, RunEnv, Stop};
use crate::protocol::{Message, PROTOCOL_LINE_BYTES_MAX};

/// `--input` value meaning "read the input from stdin" (where the job controller puts it).
pub const INPUT_STDIN: &str = "-";
/// The protocol pipe's descriptor in a worker.
pub const PROTOCOL_FD: i32 = 3;
pub const EXIT_OK: i32 = 0;
pub const EXIT_USAGE: i32 = 2;
/// The protocol pipe is missing or closed.
pub const EXIT_PIPE: i32 = 3;
/// What `--behave exit-nonzero` exits with.
pub const EXIT_BEHAVE: i32 = 7;
/// `--behave fork-bomb` stops here where RLIMIT_NPROC does not stop it (it does not bind root).
const FORK_BOMB_PROCESSES_MAX: usize = 256;
/// `--behave huge-line`: one protocol line of 10 MiB, far past PROTOCOL_LINE_BYTES_MAX.
const HUGE_LINE_BYTES: usize = 10 << 20;
const _: () = assert!(HUGE_LINE_BYTES > PROTOCOL_LINE_BYTES_MAX);

/// Arguments of `atelier __worker`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerArgs {
    pub input: PathBuf,
    pub pipeline_file: PathBuf,
    pub artifacts_dir: PathBuf,
    /// The job's own directory, created when something is put in it (`RunEnv::make_job_dir`);
    /// the working directory when not given.
    pub job_dir: Option<PathBuf>,
    pub tick_ms: u64,
    pub behave: Option<String>,
}

impl WorkerArgs {
    pub fn to_args(&self) -> Vec<String> {
        let mut v = vec![
            "--input".to_string(),
            self.input.display().to_string(),
            "--pipeline-file".into(),
            self.pipeline_file.display().to_string(),
            "--artifacts-dir".into(),
            self.artifacts_dir.display().to_string(),
            "--tick-ms".into(),
            self.tick_ms.to_string(),
        ];
        if let Some(d) = &self.job_dir {
            v.push("--job-dir".into());
            v.push(d.display().to_string());
        }
        if let Some(b) = &self.behave {
            v.push("--behave".into());
            v.push(b.clone());
        }
        v
    }

    pub fn parse(args: &[String]) -> Result<WorkerArgs, String> {
        let args = match args.first().map(String::as_str) {
            Some("__worker") => &args[1..],
            _ => args,
        };
        let mut w = WorkerArgs {
            input: PathBuf::new(),
            pipeline_file: PathBuf::new(),
            artifacts_dir: PathBuf::new(),
            job_dir: None,
            tick_ms: 250,
            behave: None,
        };
        let mut it = args.iter();
        while let Some(name) = it.next() {
            let value = it.next().ok_or_else(|| format!("{name} needs a value"))?;
            match name.as_str() {
                "--input" => w.input = value.into(),
                "--pipeline-file" => w.pipeline_file = value.into(),
                "--artifacts-dir" => w.artifacts_dir = value.into(),
                "--job-dir" => w.job_dir = Some(value.into()),
                "--tick-ms" => w.tick_ms = value.parse().map_err(|e| format!("--tick-ms {value}: {e}"))?,
                "--behave" => w.behave = Some(value.clone()),
                other => return Err(format!("unknown option {other}")),
            }
        }
        if w.input.as_os_str().is_empty() || w.pipeline_file.as_os_str().is_empty() {
            return Err("--input and --pipeline-file are required".into());
        }
        Ok(w)
    }
}

/// Writes protocol lines to the pipe: whole lines per `write`, so lines never interleave.
struct PipeReporter {
    pipe: File,
}

impl Reporter for PipeReporter {
    fn send(&mut self, msg: Message) -> Result<(), Stop> {
        self.pipe.write_all(msg.to_line().as_bytes()).map_err(|e| Stop(format!("protocol pipe: {e}")))
    }

    /// One write for all of them: the controller's job thread wakes once, not once per line.
    fn send_all(&mut self, msgs: Vec<Message>) -> Result<(), Stop> {
        let lines: String = msgs.iter().map(Message::to_line).collect();
        self.pipe.write_all(lines.as_bytes()).map_err(|e| Stop(format!("protocol pipe: {e}")))
    }
}

/// Entry point of `atelier __worker ...`.
pub fn worker_main(args: &[String]) -> i32 {
    let args = match WorkerArgs::parse(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("atelier __worker: {e}");
            return EXIT_USAGE;
        }
    };
    if args.behave.as_deref() == Some("sleep") {
        // The orphan of `fork-orphan`: holds the inherited pipes and says nothing.
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    if nix::fcntl::fcntl(PROTOCOL_FD, nix::fcntl::FcntlArg::F_GETFD).is_err() {
        eprintln!("atelier __worker: fd {PROTOCOL_FD} (the protocol pipe) is not open");
        return EXIT_PIPE;
    }
    // Stage commands report on their stdout; they must not inherit the job's pipe.
    let _ = nix::fcntl::fcntl(PROTOCOL_FD, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC));
    // SAFETY: fd 3 is open (checked above), was handed to us by the trampoline for exactly
    // this, and nothing else in this process owns it.
    let pipe = unsafe { File::from_raw_fd(PROTOCOL_FD) };
    let mut rep = PipeReporter { pipe };
    let read = |p: &PathBuf| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
    let read_input = |p: &PathBuf| {
        if p.as_os_str() != INPUT_STDIN {
            return read(p);
        }
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut buf)
            .map_err(|e| format!("cannot read stdin: {e}"))?;
        Ok(buf)
    };
    let loaded = read_input(&args.input).and_then(|i| {
        let input: JobInput = serde_json::from_slice(&i).map_err(|e| format!("bad input file: {e}"))?;
        let spec: PipelineConfig = serde_json::from_slice(&read(&args.pipeline_file)?)
            .map_err(|e| format!("bad pipeline file: {e}"))?;
        Ok((input, spec))
    });
    let (input, spec) = match loaded {
        Ok(v) => v,
        Err(e) => {
            eprintln!("atelier __worker: {e}");
            let _ = rep.send(Message::Error { error: format!("worker setup: {e}"), retryable: false });
            return EXIT_USAGE;
        }
    };
    let env = RunEnv {
        job_dir: args
            .job_dir
            .clone()
            .unwrap_or_else(|| std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."))),
        artifacts_dir: args.artifacts_dir.clone(),
        tick: Duration::from_millis(args.tick_ms.max(10)),
    };
    if let Some(mode) = &args.behave {
        if let Some(code) = misbehave(mode, &mut rep, &env) {
            return code;
        }
    }
    match pipeline::run(&spec, &input, &env, &mut rep) {
        Ok(()) => EXIT_OK,
        Err(Stop(e)) => {
            eprintln!("atelier __worker: {e}");
            EXIT_PIPE
        }
    }
}

/// Test modes. Returns an exit code to stop with, or `None` to go on with the pipeline.
fn misbehave(mode: &str, rep: &mut PipeReporter, env: &RunEnv) -> Option<i32> {
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
        | "exit-nonzero" | "fork-bomb" => {
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
