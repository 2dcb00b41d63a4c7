//! `decide` and `apply`, and the transition table both of them read.

use crate::commission::{Artifact, Commission};
use crate::event::{Envelope, Event, EventKind, Executor, JobEnd, JobStatus};
use crate::limits::{self, truncate};
use crate::retry::RetryPolicy;
use crate::state::{Stage, State};
use crate::time::Millis;

/// Where an event may move a commission.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    To(State),
    /// The stage after the current one (the first stage from `processing`).
    NextStage,
    Stay,
}

/// Which states an event may be applied in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allowed {
    /// Only to a commission that does not exist yet.
    New,
    Any(&'static [State]),
}

use State::*;
const STAGES: &[State] = &[GeneratingIdeas, CreatingImages, Uploading, CreatingProducts];
const RUNNING: &[State] = &[Processing, GeneratingIdeas, CreatingImages, Uploading, CreatingProducts];
const BEFORE_LAST_STAGE: &[State] = &[Processing, GeneratingIdeas, CreatingImages, Uploading];
const LIVE: &[State] =
    &[Created, Processing, GeneratingIdeas, CreatingImages, Uploading, CreatingProducts, Retrying];

/// The one table of allowed transitions. `transition` enforces it, the property tests check
/// `apply` against it, and ARCHITECTURE.md embeds its rendering (a test keeps them equal).
pub const TRANSITIONS: &[(EventKind, Allowed, Target)] = &[
    (EventKind::Created, Allowed::New, Target::To(Created)),
    (EventKind::JobStarted, Allowed::Any(&[Created]), Target::To(Processing)),
    (EventKind::StageEntered, Allowed::Any(BEFORE_LAST_STAGE), Target::NextStage),
    (EventKind::Progress, Allowed::Any(STAGES), Target::Stay),
    (EventKind::Artifact, Allowed::Any(STAGES), Target::Stay),
    (EventKind::AttemptFailed, Allowed::Any(RUNNING), Target::To(Retrying)),
    (EventKind::RetryDue, Allowed::Any(&[Retrying]), Target::To(Created)),
    (EventKind::Completed, Allowed::Any(&[CreatingProducts]), Target::To(Completed)),
    (EventKind::Failed, Allowed::Any(RUNNING), Target::To(Failed)),
    (EventKind::CancelRequested, Allowed::Any(LIVE), Target::Stay),
    (EventKind::Cancelled, Allowed::Any(LIVE), Target::To(Cancelled)),
    (EventKind::RetryRequested, Allowed::Any(&[Failed]), Target::To(Created)),
    (EventKind::JobFinished, Allowed::Any(RUNNING), Target::Stay),
];

/// Why a command or event was refused. Every rule of the state machine has its own variant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rejection {
    NotFound,
    AlreadyExists,
    /// Nothing leaves a terminal state (but an explicit manual retry of `failed`).
    Terminal {
        state: State,
    },
    /// The transition table has no row for this event in this state.
    IllegalTransition {
        from: State,
        event: EventKind,
    },
    /// Stages run forward, one after the other.
    StageOutOfOrder {
        current: Option<Stage>,
        requested: Stage,
    },
    /// Progress, artifacts: only for the stage that is running.
    NotInStage {
        requested: Stage,
        current: Option<Stage>,
    },
    ProgressDecrease {
        stage: Stage,
        current: u8,
        requested: u8,
    },
    ProgressOutOfRange {
        percent: u32,
    },
    /// A report from a job that is not the commission's active job.
    StaleJob {
        active: Option<u64>,
        got: u64,
    },
    /// A new attempt would exceed `max_attempts`.
    AttemptsExhausted {
        max_attempts: u32,
    },
    NotYetScheduled {
        scheduled_for: Millis,
    },
    RetryNotDue {
        next_retry_at: Millis,
    },
    /// Only a failed commission can be retried by hand.
    NotFailed {
        state: State,
    },
    /// A cancel is pending: the job may only end now.
    CancelPending,
    TooManyArtifacts,
    /// An event's version does not follow the commission's (a broken or reordered log).
    VersionGap {
        expected: u64,
        got: u64,
    },
    Invalid {
        field: &'static str,
        reason: String,
    },
}

impl Rejection {
    /// A stable machine-readable name, used as the API's error code.
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::NotFound => "not_found",
            Rejection::AlreadyExists => "already_exists",
            Rejection::Terminal { .. } => "terminal_state",
            Rejection::IllegalTransition { .. } => "illegal_transition",
            Rejection::StageOutOfOrder { .. } => "stage_out_of_order",
            Rejection::NotInStage { .. } => "not_in_stage",
            Rejection::ProgressDecrease { .. } => "progress_decrease",
            Rejection::ProgressOutOfRange { .. } => "progress_out_of_range",
            Rejection::StaleJob { .. } => "stale_job",
            Rejection::AttemptsExhausted { .. } => "attempts_exhausted",
            Rejection::NotYetScheduled { .. } => "not_yet_scheduled",
            Rejection::RetryNotDue { .. } => "retry_not_due",
            Rejection::NotFailed { .. } => "not_failed",
            Rejection::CancelPending => "cancel_pending",
            Rejection::TooManyArtifacts => "too_many_artifacts",
            Rejection::VersionGap { .. } => "version_gap",
            Rejection::Invalid { .. } => "invalid_field",
        }
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejection::NotFound => write!(f, "no such commission"),
            Rejection::AlreadyExists => write!(f, "the commission already exists"),
            Rejection::Terminal { state } => {
                write!(f, "the commission is {state}, a terminal state: nothing may follow")
            }
            Rejection::IllegalTransition { from, event } => {
                write!(f, "'{}' is not allowed in state {from}", event.as_str())
            }
            Rejection::StageOutOfOrder { current, requested } => match current {
                Some(c) => write!(f, "stage {requested} cannot follow {c}: stages run forward in order"),
                None => write!(f, "stage {requested} cannot come first: stages run forward in order"),
            },
            Rejection::NotInStage { requested, current } => match current {
                Some(c) => write!(f, "stage {requested} is not running (the current stage is {c})"),
                None => write!(f, "stage {requested} is not running (no stage is)"),
            },
            Rejection::ProgressDecrease { stage, current, requested } => {
                write!(f, "progress of {stage} cannot go down from {current}% to {requested}%")
            }
            Rejection::ProgressOutOfRange { percent } => {
                write!(f, "progress {percent}% is outside 0..=100")
            }
            Rejection::StaleJob { active, got } => match active {
                Some(a) => write!(f, "job {got} is stale: job {a} is the active one"),
                None => write!(f, "job {got} is stale: no job is active"),
            },
            Rejection::AttemptsExhausted { max_attempts } => {
                write!(f, "all {max_attempts} attempts are used")
            }
            Rejection::NotYetScheduled { scheduled_for } => write!(
                f,
                "the commission is scheduled for {}",
                crate::time::format_rfc3339_ms(*scheduled_for)
            ),
            Rejection::RetryNotDue { next_retry_at } => {
                write!(f, "the retry is due at {}", crate::time::format_rfc3339_ms(*next_retry_at))
            }
            Rejection::NotFailed { state } => {
                write!(f, "only a failed commission can be retried; this one is {state}")
            }
            Rejection::CancelPending => write!(f, "a cancel is pending"),
            Rejection::TooManyArtifacts => {
                write!(f, "at most {} artifacts per commission", limits::ARTIFACTS_MAX)
            }
            Rejection::VersionGap { expected, got } => {
                write!(f, "event version {got} does not follow version {expected}")
            }
            Rejection::Invalid { field, reason } => write!(f, "{field}: {reason}"),
        }
    }
}

impl std::error::Error for Rejection {}

/// A request to create a commission, validated by [`decide`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewCommission {
    pub user_id: String,
    pub pipeline: String,
    pub priority: i32,
    pub scheduled_for: Option<Millis>,
    /// Must be a JSON object.
    pub context: String,
    pub idempotency_key: Option<String>,
    pub max_attempts: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Create(NewCommission),
    StartJob {
        job_id: u64,
        executor: Executor,
        job_name: String,
        pid: Option<u32>,
    },
    EnterStage {
        job_id: u64,
        stage: Stage,
    },
    ReportProgress {
        job_id: u64,
        stage: Stage,
        percent: u32,
        message: Option<String>,
    },
    RecordArtifact {
        job_id: u64,
        stage: Stage,
        kind: String,
        uri: String,
    },
    /// The job produced its result and (if `job` is given) has ended.
    Complete {
        job_id: u64,
        result: String,
        job: Option<JobEnd>,
    },
    /// The attempt failed; retried with backoff while `retryable` and attempts remain.
    FailAttempt {
        job_id: u64,
        error: String,
        retryable: bool,
        job: Option<JobEnd>,
    },
    RetryDue,
    /// An operator's "run it now" for a commission waiting on its backoff: the retry is due
    /// at once, whatever `next_retry_at` says.
    RetryNow,
    RequestCancel,
    /// The cancelled job's processes are gone (or there were none).
    ConfirmCancelled {
        job: Option<JobEnd>,
    },
    ManualRetry,
}

/// The inputs a decision may depend on besides state and command. Never read inside.
#[derive(Clone, Copy, Debug)]
pub struct Ctx {
    pub now: Millis,
    pub jitter_seed: u64,
    pub retry: RetryPolicy,
}

/// Checks `event` against the table and the rules, and returns the state it leads to.
pub fn transition(state: Option<&Commission>, event: &Event) -> Result<State, Rejection> {
    let kind = event.kind();
    let (_, from, target) = TRANSITIONS
        .iter()
        .find(|(k, _, _)| *k == kind)
        .expect("invariant: every event kind has a row in TRANSITIONS");
    let c = match (from, state) {
        (Allowed::New, None) => return Ok(Created),
        (Allowed::New, Some(_)) => return Err(Rejection::AlreadyExists),
        (Allowed::Any(_), None) => return Err(Rejection::NotFound),
        (Allowed::Any(allowed), Some(c)) => {
            if !allowed.contains(&c.state) {
                if c.state.is_terminal() {
                    return Err(Rejection::Terminal { state: c.state });
                }
                return Err(Rejection::IllegalTransition { from: c.state, event: kind });
            }
            c
        }
    };
    match event {
        Event::JobStarted { attempt, .. } => {
            if *attempt > c.max_attempts {
                return Err(Rejection::AttemptsExhausted { max_attempts: c.max_attempts });
            }
            if *attempt != c.attempt + 1 {
                return Err(Rejection::Invalid {
                    field: "attempt",
                    reason: format!("must be {}, got {attempt}", c.attempt + 1),
                });
            }
        }
        Event::StageEntered { stage } => {
            let expected = match c.state.stage() {
                None => Some(Stage::FIRST),
                Some(cur) => cur.next(),
            };
            if expected != Some(*stage) {
                return Err(Rejection::StageOutOfOrder { current: c.state.stage(), requested: *stage });
            }
        }
        Event::Progress { stage, percent, .. } => {
            check_in_stage(c, *stage)?;
            if *percent > limits::PERCENT_MAX {
                return Err(Rejection::ProgressOutOfRange { percent: u32::from(*percent) });
            }
            let current = c.stage_progress[stage.index()];
            if *percent < current {
                return Err(Rejection::ProgressDecrease { stage: *stage, current, requested: *percent });
            }
        }
        Event::Artifact { stage, .. } => {
            check_in_stage(c, *stage)?;
            if c.artifacts.len() >= limits::ARTIFACTS_MAX {
                return Err(Rejection::TooManyArtifacts);
            }
        }
        Event::JobFinished(end) if c.active_job != Some(end.job_id) => {
            return Err(Rejection::StaleJob { active: c.active_job, got: end.job_id });
        }
        _ => {}
    }
    Ok(match target {
        Target::To(s) => *s,
        Target::Stay => c.state,
        Target::NextStage => match event {
            Event::StageEntered { stage } => stage.state(),
            _ => unreachable!("invariant: only stage_entered has Target::NextStage"),
        },
    })
}

fn check_in_stage(c: &Commission, stage: Stage) -> Result<(), Rejection> {
    if c.state.stage() != Some(stage) {
        return Err(Rejection::NotInStage { requested: stage, current: c.state.stage() });
    }
    Ok(())
}

/// Folds one stored event into the commission it belongs to.
///
/// Replaying a log is `apply` over its events in order; an event the table forbids (only
/// possible in a damaged or hand-made log) is an error, never a silent skip.
pub fn apply(state: Option<Commission>, env: &Envelope) -> Result<Commission, Rejection> {
    let next_state = transition(state.as_ref(), &env.event)?;
    let expected = state.as_ref().map_or(1, |c| c.version + 1);
    if env.version != expected {
        return Err(Rejection::VersionGap { expected, got: env.version });
    }
    let mut c = match (state, &env.event) {
        (None, Event::Created { .. }) => new_commission(env),
        (Some(c), _) => c,
        (None, _) => unreachable!("invariant: transition() refuses non-create events for a new commission"),
    };
    match &env.event {
        Event::Created { .. } => {}
        Event::JobStarted { attempt, job_id, .. } => {
            c.attempt = *attempt;
            c.active_job = Some(*job_id);
            c.stage = None;
            c.stage_progress = [0; 4];
            c.artifacts.clear();
            c.message = None;
            c.error = None;
        }
        Event::StageEntered { stage } => c.stage = Some(*stage),
        Event::Progress { stage, percent, message } => {
            c.stage_progress[stage.index()] = *percent;
            if message.is_some() {
                c.message = message.clone();
            }
        }
        Event::Artifact { stage, kind, uri } => {
            c.artifacts.push(Artifact { stage: *stage, kind: kind.clone(), uri: uri.clone() })
        }
        Event::AttemptFailed { error, next_retry_at, .. } => {
            c.error = Some(error.clone());
            c.active_job = None;
            c.next_retry_at = Some(*next_retry_at);
        }
        Event::RetryDue => c.next_retry_at = None,
        Event::Completed { result } => {
            c.result = Some(result.clone());
            c.active_job = None;
            if let Some(s) = c.stage {
                c.stage_progress[s.index()] = limits::PERCENT_MAX;
            }
            c.stage_progress = [limits::PERCENT_MAX; 4];
        }
        Event::Failed { error, .. } => {
            c.error = Some(error.clone());
            c.active_job = None;
            c.next_retry_at = None;
        }
        Event::CancelRequested => c.cancel_requested = true,
        Event::Cancelled => {
            c.active_job = None;
            c.next_retry_at = None;
        }
        Event::RetryRequested => {
            c.max_attempts = c.attempt.saturating_add(c.attempt_budget);
            c.error = None;
        }
        Event::JobFinished(_) => c.active_job = None,
    }
    c.state = next_state;
    c.version = env.version;
    c.last_seq = env.seq;
    c.updated_at = env.at;
    Ok(c)
}

/// The commission a `Created` event starts.
fn new_commission(env: &Envelope) -> Commission {
    let Event::Created { user_id, pipeline, priority, scheduled_for, context, idempotency_key, max_attempts } =
        &env.event
    else {
        unreachable!("invariant: called for a Created event only")
    };
    Commission {
        id: env.commission_id,
        user_id: user_id.clone(),
        pipeline: pipeline.clone(),
        priority: *priority,
        scheduled_for: *scheduled_for,
        context: context.clone(),
        idempotency_key: idempotency_key.clone(),
        max_attempts: *max_attempts,
        attempt_budget: *max_attempts,
        attempt: 0,
        state: Created,
        stage: None,
        stage_progress: [0; 4],
        message: None,
        error: None,
        result: None,
        artifacts: Vec::new(),
        active_job: None,
        cancel_requested: false,
        next_retry_at: None,
        created_at: env.at,
        updated_at: env.at,
        version: 0,
        last_seq: 0,
    }
}

/// Turns a command into the events that record it, or a typed rejection. Empty means the
/// command is already satisfied (a repeated cancel, say).
pub fn decide(state: Option<&Commission>, cmd: Command, ctx: &Ctx) -> Result<Vec<Event>, Rejection> {
    let events = decide_events(state, cmd, ctx)?;
    // Check the whole decision against the table before anyone appends it.
    let mut probe = state.cloned();
    for (i, event) in events.iter().enumerate() {
        let version = probe.as_ref().map_or(1, |c| c.version + 1);
        let env = Envelope { seq: 0, commission_id: 0, version, at: ctx.now, event: event.clone() };
        probe = Some(apply(probe, &env)?);
        debug_assert!(i < 4, "decisions are at most a few events");
    }
    Ok(events)
}

fn decide_events(state: Option<&Commission>, cmd: Command, ctx: &Ctx) -> Result<Vec<Event>, Rejection> {
    let c = match (state, cmd) {
        (None, Command::Create(new)) => return create(new),
        (Some(_), Command::Create(_)) => return Err(Rejection::AlreadyExists),
        (None, _) => return Err(Rejection::NotFound),
        (Some(c), cmd) => (c, cmd),
    };
    let (c, cmd) = c;
    if c.state.is_terminal() && !(c.state == Failed && cmd == Command::ManualRetry) {
        return Err(Rejection::Terminal { state: c.state });
    }
    match cmd {
        Command::Create(_) => unreachable!("handled above"),
        Command::StartJob { job_id, executor, job_name, pid } => {
            if c.state == Created {
                if let Some(t) = c.scheduled_for.filter(|t| *t > ctx.now) {
                    return Err(Rejection::NotYetScheduled { scheduled_for: t });
                }
            }
            if let Some(active) = c.active_job {
                return Err(Rejection::StaleJob { active: Some(active), got: job_id });
            }
            Ok(vec![Event::JobStarted { attempt: c.attempt + 1, job_id, executor, job_name, pid }])
        }
        Command::EnterStage { job_id, stage } => {
            check_job(c, job_id)?;
            Ok(vec![Event::StageEntered { stage }])
        }
        Command::ReportProgress { job_id, stage, percent, message } => {
            check_job(c, job_id)?;
            let percent = u8::try_from(percent)
                .ok()
                .filter(|p| *p <= limits::PERCENT_MAX)
                .ok_or(Rejection::ProgressOutOfRange { percent })?;
            let message = message.map(|m| truncate(m, limits::MESSAGE_BYTES_MAX));
            Ok(vec![Event::Progress { stage, percent, message }])
        }
        Command::RecordArtifact { job_id, stage, kind, uri } => {
            check_job(c, job_id)?;
            check_len("kind", &kind, limits::ARTIFACT_KIND_BYTES_MAX)?;
            check_len("uri", &uri, limits::ARTIFACT_URI_BYTES_MAX)?;
            Ok(vec![Event::Artifact { stage, kind, uri }])
        }
        Command::Complete { job_id, result, job } => complete(c, job_id, result, job),
        Command::FailAttempt { job_id, error, retryable, job } => {
            fail_attempt(c, ctx, job_id, error, retryable, job)
        }
        Command::RetryDue => match (c.state, c.next_retry_at) {
            (Retrying, Some(t)) if t > ctx.now => Err(Rejection::RetryNotDue { next_retry_at: t }),
            (Retrying, _) => Ok(vec![Event::RetryDue]),
            (from, _) => Err(Rejection::IllegalTransition { from, event: EventKind::RetryDue }),
        },
        Command::RetryNow => match c.state {
            Retrying => Ok(vec![Event::RetryDue]),
            from => Err(Rejection::IllegalTransition { from, event: EventKind::RetryDue }),
        },
        Command::RequestCancel => {
            if c.cancel_requested {
                return Ok(vec![]);
            }
            if c.active_job.is_some() {
                Ok(vec![Event::CancelRequested])
            } else {
                Ok(vec![Event::CancelRequested, Event::Cancelled])
            }
        }
        Command::ConfirmCancelled { job } => confirm_cancelled(c, job),
        Command::ManualRetry => {
            if c.state != Failed {
                return Err(Rejection::NotFailed { state: c.state });
            }
            Ok(vec![Event::RetryRequested])
        }
    }
}

fn complete(
    c: &Commission,
    job_id: u64,
    result: String,
    job: Option<JobEnd>,
) -> Result<Vec<Event>, Rejection> {
    check_job(c, job_id)?;
    if result.len() > limits::RESULT_BYTES_MAX {
        return Err(invalid("result", format!("over {} bytes", limits::RESULT_BYTES_MAX)));
    }
    if serde_json::from_str::<serde_json::Value>(&result).is_err() {
        return Err(invalid("result", "not valid JSON".into()));
    }
    let mut events = job_finished(job, job_id, JobStatus::Succeeded);
    events.push(Event::Completed { result });
    Ok(events)
}

fn fail_attempt(
    c: &Commission,
    ctx: &Ctx,
    job_id: u64,
    error: String,
    retryable: bool,
    job: Option<JobEnd>,
) -> Result<Vec<Event>, Rejection> {
    if c.active_job != Some(job_id) {
        return Err(Rejection::StaleJob { active: c.active_job, got: job_id });
    }
    let error = truncate(error, limits::ERROR_BYTES_MAX);
    let mut events = job_finished(job, job_id, JobStatus::Failed);
    if c.cancel_requested {
        events.push(Event::Cancelled);
    } else if retryable && c.attempt < c.max_attempts {
        let next_retry_at = ctx.now.saturating_add(ctx.retry.backoff_ms(c.attempt, ctx.jitter_seed));
        events.push(Event::AttemptFailed { attempt: c.attempt, error, retryable, next_retry_at });
    } else {
        events.push(Event::Failed { attempt: c.attempt, error, retryable });
    }
    Ok(events)
}

fn confirm_cancelled(c: &Commission, job: Option<JobEnd>) -> Result<Vec<Event>, Rejection> {
    if !c.cancel_requested {
        return Err(invalid("cancel", "no cancel was requested".into()));
    }
    let mut events = Vec::new();
    if let Some(end) = job {
        if c.active_job != Some(end.job_id) {
            return Err(Rejection::StaleJob { active: c.active_job, got: end.job_id });
        }
        events.push(Event::JobFinished(end));
    } else if let Some(active) = c.active_job {
        events.push(Event::JobFinished(JobEnd {
            job_id: active,
            status: JobStatus::Killed,
            exit_code: None,
            signal: None,
            error: Some("cancelled".into()),
            max_rss_bytes: 0,
            cpu_ms: 0,
        }));
    }
    events.push(Event::Cancelled);
    Ok(events)
}

fn job_finished(job: Option<JobEnd>, job_id: u64, default_status: JobStatus) -> Vec<Event> {
    let end = job.unwrap_or(JobEnd {
        job_id,
        status: default_status,
        exit_code: None,
        signal: None,
        error: None,
        max_rss_bytes: 0,
        cpu_ms: 0,
    });
    vec![Event::JobFinished(JobEnd { job_id, ..end })]
}

fn check_job(c: &Commission, job_id: u64) -> Result<(), Rejection> {
    if c.active_job != Some(job_id) {
        return Err(Rejection::StaleJob { active: c.active_job, got: job_id });
    }
    if c.cancel_requested {
        return Err(Rejection::CancelPending);
    }
    Ok(())
}

fn invalid(field: &'static str, reason: String) -> Rejection {
    Rejection::Invalid { field, reason }
}

fn check_len(field: &'static str, value: &str, max: usize) -> Result<(), Rejection> {
    if value.is_empty() {
        return Err(invalid(field, "must not be empty".into()));
    }
    if value.len() > max {
        return Err(invalid(field, format!("longer than {max} bytes")));
    }
    Ok(())
}

fn create(new: NewCommission) -> Result<Vec<Event>, Rejection> {
    check_len("user_id", &new.user_id, limits::USER_ID_BYTES_MAX)?;
    if new.user_id.chars().any(|ch| ch.is_control() || ch == '/') {
        return Err(invalid("user_id", "must not contain '/' or control characters".into()));
    }
    check_len("pipeline", &new.pipeline, limits::PIPELINE_NAME_BYTES_MAX)?;
    if !new.pipeline.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-') {
        return Err(invalid("pipeline", "only a-z, 0-9, '_' and '-' are allowed".into()));
    }
    if new.context.len() > limits::CONTEXT_BYTES_MAX {
        return Err(invalid("context", format!("over {} bytes", limits::CONTEXT_BYTES_MAX)));
    }
    match serde_json::from_str::<serde_json::Value>(&new.context) {
        Ok(serde_json::Value::Object(map)) => {
            if let Some(steps) = map.get("progress_steps") {
                if steps.as_u64().is_none_or(|n| n > limits::PROGRESS_STEPS_MAX) {
                    let max = limits::PROGRESS_STEPS_MAX;
                    return Err(invalid("context", format!("progress_steps must be an integer 0..={max}")));
                }
            }
        }
        Ok(_) => return Err(invalid("context", "must be a JSON object".into())),
        Err(e) => return Err(invalid("context", format!("not valid JSON: {e}"))),
    }
    if let Some(key) = &new.idempotency_key {
        check_len("idempotency_key", key, limits::IDEMPOTENCY_KEY_BYTES_MAX)?;
    }
    if new.max_attempts == 0 || new.max_attempts > limits::ATTEMPTS_MAX {
        return Err(invalid("max_attempts", format!("must be 1..={}", limits::ATTEMPTS_MAX)));
    }
    Ok(vec![Event::Created {
        user_id: new.user_id,
        pipeline: new.pipeline,
        priority: new.priority,
        scheduled_for: new.scheduled_for,
        context: new.context,
        idempotency_key: new.idempotency_key,
        max_attempts: new.max_attempts,
    }])
}

/// The transition table as a Markdown table, for ARCHITECTURE.md.
pub fn transitions_markdown() -> String {
    let mut out = String::from("| event | from | to |\n|---|---|---|\n");
    for (kind, from, target) in TRANSITIONS {
        let from = match from {
            Allowed::New => "(new)".to_string(),
            Allowed::Any(states) => states.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "),
        };
        let to = match target {
            Target::To(s) => s.as_str().to_string(),
            Target::NextStage => "the next stage".to_string(),
            Target::Stay => "(same)".to_string(),
        };
        out.push_str(&format!("| {} | {from} | {to} |\n", kind.as_str()));
    }
    out
}
