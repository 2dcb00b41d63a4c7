//! `atelier __worker`: the built-in worker process. Runs a pipeline and reports it as protocol
//! lines on fd 3, which the trampoline connected to the controller.
//!
//! `--behave MODE` makes it misbehave on purpose (crash, hang, flood, lie); the fault-matrix
//! tests use it through a pipeline's `worker_args`. The modes are test scaffolding
//! (`faults.rs`), built only with the `test-faults` feature; without it every mode is refused.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::time::Duration;

use super::pipe::{PipeReporter, EXIT_OK, EXIT_PIPE, EXIT_USAGE, PROTOCOL_FD};
use crate::config::PipelineConfig;
use crate::inside::pipeline::{self, JobInput, Reporter, RunEnv, Stop};
use crate::inside::protocol::Message;

/// `--input` value meaning "read the input from stdin" (where the job controller puts it).
pub const INPUT_STDIN: &str = "-";
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

/// Entry point of `atelier __worker ...`.
pub fn worker_main(args: &[String]) -> i32 {
    let args = match WorkerArgs::parse(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("atelier __worker: {e}");
            return EXIT_USAGE;
        }
    };
    #[cfg(feature = "test-faults")]
    if args.behave.as_deref() == Some("sleep") {
        super::faults::sleep_forever();
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
        if let Some(code) = behave(mode, &mut rep, &env) {
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

#[cfg(feature = "test-faults")]
fn behave(mode: &str, rep: &mut PipeReporter, env: &RunEnv) -> Option<i32> {
    super::faults::misbehave(mode, rep, env)
}

/// Without the fault modes built in, asking for one fails the job: a shipped worker never
/// misbehaves on purpose.
#[cfg(not(feature = "test-faults"))]
fn behave(mode: &str, rep: &mut PipeReporter, _env: &RunEnv) -> Option<i32> {
    let error =
        format!("unknown --behave mode '{mode}' (fault modes are built only with the test-faults feature)");
    let _ = rep.send(Message::Error { error, retryable: false });
    Some(EXIT_USAGE)
}
