//! The task runner: the fallback executor. A pool of threads runs the same pipeline code as
//! the worker processes, in the server's own process: no isolation and no resource limits
//! (only the wall-clock limit, checked at each report), but nothing to spawn either.
//!
//! It refuses pipelines that run programs (a `command` stage, or a worker program of their
//! own): such a program is code a team wrote, and here it would run as the server's user (root
//! too), with the server's environment (its secret), no limits, no process group of its own
//! and no death with the server. Giving it the job controller's trampoline would make this
//! executor a second job controller, with none of the fallback's point (nothing to spawn);
//! the scheduler sends those jobs to the job controller whenever it is enabled, and only
//! without one do they reach this refusal.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use atelier_engine::{Command, Commission, Executor, JobStatus, Stage};
use atelier_storage::execute;
use crossbeam_channel::Sender;

use crate::config::{PipelineConfig, StageSpec};
use crate::executor::signal::{JobSignal, Request};
use crate::inside::pipeline::{self, Reporter, RunEnv, Stop};
use crate::inside::protocol::Message;
use crate::session::{ctx, job_end, record_finish, Finish, Halt, Session};
use crate::shared::{commission_span, job_span, Shared};

/// How often an in-process job checks for cancel while it waits.
const TICK_MS_MAX: u64 = 200;

pub(crate) struct TaskJob {
    pub(crate) commission: Commission,
    pub(crate) signal: Arc<JobSignal>,
    /// Called once the job is recorded, or its code panicked (true).
    pub(crate) done: Box<dyn FnOnce(bool) + Send>,
}

pub(crate) struct Pool {
    tx: Sender<TaskJob>,
    threads: Vec<JoinHandle<()>>,
}

impl Pool {
    pub(crate) fn start(shared: Arc<Shared>, size: usize) -> std::io::Result<Pool> {
        let (tx, rx) = crossbeam_channel::unbounded::<TaskJob>();
        let mut threads = Vec::with_capacity(size);
        for i in 0..size.max(1) {
            let (rx, shared) = (rx.clone(), shared.clone());
            threads.push(std::thread::Builder::new().name(format!("atelier-task-{i}")).spawn(move || {
                for job in rx {
                    let id = job.commission.id;
                    // A panic outside the pipeline (which has its own guard) is a bug; keep the
                    // thread and the slot alive anyway.
                    let panicked =
                        catch_unwind(AssertUnwindSafe(|| run_task(&shared, job.commission, &job.signal)))
                            .is_err();
                    if panicked {
                        tracing::error!(commission = id, "task runner job panicked");
                    }
                    (job.done)(panicked);
                }
            })?);
        }
        Ok(Pool { tx, threads })
    }

    pub(crate) fn sender(&self) -> Sender<TaskJob> {
        self.tx.clone()
    }

    /// Waits for the running jobs (already asked to stop) and the threads.
    pub(crate) fn join(self) {
        drop(self.tx);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Hands messages straight to the session; refuses once the job must stop.
struct InProcess<'a> {
    session: Session,
    signal: &'a JobSignal,
    deadline: Instant,
    halted: Option<Halt>,
    timed_out: bool,
}

impl Reporter for InProcess<'_> {
    fn check(&mut self) -> Result<(), Stop> {
        if self.signal.get() != Request::None {
            return Err(Stop("asked to stop".into()));
        }
        if Instant::now() >= self.deadline {
            self.timed_out = true;
            return Err(Stop("timed out".into()));
        }
        let r = self.session.flush_due().and_then(|()| self.session.commit());
        self.stop_on(r)
    }

    /// An instant run's messages are recorded with the job's end, in its one append (as the
    /// job controller records a worker's last batch of lines).
    fn send_all(&mut self, msgs: Vec<Message>) -> Result<(), Stop> {
        self.check()?;
        let session = &mut self.session;
        let r = msgs.into_iter().try_for_each(|msg| session.handle(msg));
        self.stop_on(r)
    }

    fn send(&mut self, msg: Message) -> Result<(), Stop> {
        self.check()?;
        // In-process steps report as they go, so each report is recorded at once.
        let r = self.session.handle(msg).and_then(|()| self.session.commit());
        self.stop_on(r)
    }
}

impl InProcess<'_> {
    /// A halt of the session stops the pipeline; the halt is kept for the job's outcome.
    fn stop_on(&mut self, r: Result<(), Halt>) -> Result<(), Stop> {
        r.map_err(|h| {
            let stop = Stop(format!("{h:?}"));
            self.halted = Some(h);
            stop
        })
    }
}

/// Why the task runner will not run pipeline `p`, if it runs a program (see the module docs).
pub(crate) fn runs_programs(p: &PipelineConfig) -> Option<String> {
    let stage = Stage::ALL.into_iter().find(|s| matches!(p.stages[s.index()], StageSpec::Command(_)));
    let what = match (&p.command, stage) {
        (Some(_), _) => "a worker program of its own".to_string(),
        (None, Some(stage)) => format!("a command in stage {}", stage.as_str()),
        (None, None) => return None,
    };
    Some(format!(
        "the task runner does not run pipeline '{}': it runs {what}, and the task runner runs no \
         programs (they would run without a worker's user, limits or cleared environment); it \
         runs on the job controller",
        p.name
    ))
}

fn thread_cpu_ms() -> u64 {
    // SAFETY: rusage is plain data that getrusage fills in.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_THREAD with a valid pointer to a local.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut u) } != 0 {
        return 0;
    }
    let ms = |t: libc::timeval| {
        u64::try_from(t.tv_sec).unwrap_or(0) * 1000 + u64::try_from(t.tv_usec).unwrap_or(0) / 1000
    };
    ms(u.ru_utime) + ms(u.ru_stime)
}

fn run_task(shared: &Shared, c: Commission, signal: &JobSignal) {
    let executor = Executor::TaskRunner;
    let _commission = commission_span(&c).entered();
    let Some((job_id, p)) = shared.begin_job(&c, executor) else { return };
    let _job = job_span(job_id, executor).entered();
    if let Some(why) = runs_programs(&p) {
        let retryable = shared.config.use_job_controller;
        tracing::warn!(commission = c.id, job = job_id, "{why}");
        shared.fail_unstarted(&c, job_id, executor, why, retryable);
        return;
    }
    let (dir, input) = match shared.job_input(&c, job_id) {
        Ok(v) => v,
        Err(e) => {
            shared.fail_unstarted(&c, job_id, executor, format!("could not prepare the job: {e}"), true);
            return;
        }
    };
    let start = Command::StartJob { job_id, executor, job_name: p.name.clone(), pid: None };
    match execute(&*shared.store, c.id, start, &ctx(shared.config.retry)) {
        Ok(Ok(_)) => {}
        Ok(Err(r)) => {
            tracing::info!(commission = c.id, job = job_id, rejection = %r, "start refused");
            return;
        }
        Err(e) => {
            tracing::error!(commission = c.id, job = job_id, error = %e, "cannot start job");
            return;
        }
    }
    tracing::info!(commission = c.id, job = job_id, pipeline = %p.name, "task started");
    shared.metrics.job_started(executor);
    let started = Instant::now();
    let cpu_before = thread_cpu_ms();
    let heartbeat_ms = shared.config.heartbeat_timeout_ms_for(&p);
    let env = RunEnv {
        job_dir: dir,
        artifacts_dir: shared.data_dir.artifacts(),
        tick: Duration::from_millis((heartbeat_ms / 4).clamp(10, TICK_MS_MAX)),
    };
    let session = shared.session(c.id, job_id);
    let mut rep = InProcess {
        session,
        signal,
        deadline: started + Duration::from_secs(p.limits.timeout_seconds),
        halted: None,
        timed_out: false,
    };
    let ran = catch_unwind(AssertUnwindSafe(|| pipeline::run(&p, &input, &env, &mut rep)));
    let cpu_ms = thread_cpu_ms().saturating_sub(cpu_before);
    let end = |status: JobStatus, error: Option<String>| atelier_engine::JobEnd {
        cpu_ms,
        ..job_end(job_id, status, error)
    };
    let fail = |error: String, retryable: bool, status: JobStatus| Finish::Fail {
        error: error.clone(),
        retryable,
        end: end(status, Some(error)),
    };
    let finish = match (&ran, signal.get(), &rep.halted) {
        (_, Request::Cancel, _) | (_, _, Some(Halt::Cancelled)) => {
            Finish::Cancelled { end: end(JobStatus::Killed, Some("cancelled".into())) }
        }
        (_, Request::Shutdown, _) => fail("server shut down".into(), true, JobStatus::Killed),
        (_, Request::Abandon, _) => fail("this node lost its lease".into(), true, JobStatus::Killed),
        (_, _, Some(Halt::Protocol(e))) => fail(format!("protocol error: {e}"), false, JobStatus::Failed),
        (_, _, Some(Halt::Stale(_))) => Finish::Nothing,
        (_, _, Some(Halt::Storage(e))) => fail(format!("controller error: {e}"), true, JobStatus::Failed),
        _ if rep.timed_out => fail(
            format!("timed out after {} s (wall-clock limit)", p.limits.timeout_seconds),
            true,
            JobStatus::TimedOut,
        ),
        (Err(panic), _, _) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".into());
            fail(format!("the pipeline panicked: {what}"), false, JobStatus::Failed)
        }
        (Ok(Err(Stop(e))), _, _) => fail(format!("stopped: {e}"), true, JobStatus::Failed),
        (Ok(Ok(())), _, _) => match (&rep.session.result, &rep.session.worker_error) {
            (Some(result), _) => {
                Finish::Complete { result: result.clone(), end: end(JobStatus::Succeeded, None) }
            }
            (None, Some((e, retryable))) => fail(e.clone(), *retryable, JobStatus::Failed),
            (None, None) => fail("the pipeline ended without a result".into(), false, JobStatus::Failed),
        },
    };
    let took = started.elapsed();
    if matches!(finish, Finish::Complete { .. }) {
        // The rollback compares the controller's job times with these.
        shared.judge(|r, cfg| r.record_took(cfg, executor, took, Instant::now()));
    }
    shared.metrics.job_finished(executor, finish.outcome(), took);
    record_finish(&*shared.store, shared.config.retry, c.id, executor, rep.session.take_batch(), finish);
}
