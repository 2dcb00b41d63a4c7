//! Tests of the commission state machine from the outside, through the crate's public API.
//!
//! The engine is the one place where the rules of a commission's life live; storage, the HTTP
//! API and the workers all trust `decide`/`apply` and the `TRANSITIONS` table. This file exists
//! to pin those rules down so they cannot drift silently:
//!
//! * [`model`]: a model-based property test. Random command sequences run against the engine
//!   and against a tiny reference model written independently of the engine code; both must
//!   agree on every accept/reject and on the resulting state. Every accepted event is checked
//!   against the transition table, the invariants of a commission are checked after every
//!   event, and replaying the log from scratch must rebuild exactly the live commission.
//! * [`retry`]: the retry policy (backoff window, attempt budget, permanent errors, cancels).
//! * [`table`]: `transition` against the table data for every state × event kind.
//! * [`rules`]: one unit test per `Rejection` variant, through a `check(steps, expected)` helper.
//! * [`snapshots`]: insta snapshots of the table's Markdown rendering and of `stages()`.
//!
//! Replaying a property-test failure:
//! * every run prints its RNG seed to stderr (shown by `cargo test` only for failing tests);
//!   rerun the same cases with `PROPTEST_RNG_SEED=<seed> cargo test -p atelier-engine --test
//!   machine <test name>`;
//! * proptest also appends the failing case's own seed (a `cc …` line) to
//!   `engine/proptest-regressions/machine.txt`; every later run replays those first, so commit
//!   that file together with the fix;
//! * `ATELIER_PROPTEST_CASES=<n>` raises the number of cases (default 256); `PROPTEST_CASES`
//!   works too and wins over it.

use atelier_engine::limits;
use atelier_engine::time::Millis;
use atelier_engine::{
    apply, decide, transition, transitions_markdown, Allowed, Command, Commission, Ctx, Envelope, Event,
    EventKind, Executor, JobEnd, JobStatus, NewCommission, Rejection, RetryPolicy, Stage, State, Target,
    TRANSITIONS,
};

/// An arbitrary fixed instant (2023-11-14T22:13:20Z): nothing in the engine reads a clock.
const T0: Millis = 1_700_000_000_000;
const COMMISSION_ID: u64 = 7;

// ---------------------------------------------------------------------------------------------
// Harness: runs commands through `decide` + `apply` and checks every event on the way.
// ---------------------------------------------------------------------------------------------

/// One commission's live fold and its log, as storage would keep them.
struct Harness {
    live: Option<Commission>,
    log: Vec<Envelope>,
    now: Millis,
    retry: RetryPolicy,
    jitter_seed: u64,
}

impl Harness {
    fn new() -> Self {
        Harness { live: None, log: Vec::new(), now: T0, retry: RetryPolicy::default(), jitter_seed: 42 }
    }

    fn ctx(&self) -> Ctx {
        Ctx { now: self.now, jitter_seed: self.jitter_seed, retry: self.retry }
    }

    fn commission(&self) -> &Commission {
        self.live.as_ref().expect("the commission exists")
    }

    /// Decides `cmd`; appends and folds the events if accepted. Checks the per-event invariants
    /// (see [`check_event`]) and the per-decision ones.
    fn exec(&mut self, cmd: Command) -> Result<Vec<Event>, Rejection> {
        let before = self.live.clone();
        let ctx = self.ctx();
        let decided = decide(self.live.as_ref(), cmd.clone(), &ctx);
        assert_eq!(
            decide(self.live.as_ref(), cmd.clone(), &ctx),
            decided,
            "decide is not deterministic for {cmd:?}"
        );
        match &decided {
            Err(_) => {
                // A rejected command appends nothing, so the commission is exactly as it was.
                assert_eq!(self.live, before, "a rejected command changed the commission");
            }
            Ok(events) => {
                for event in events {
                    self.append(event.clone());
                }
                if events.is_empty() {
                    assert_eq!(self.live, before, "an empty decision changed the commission");
                }
                check_decision(before.as_ref(), self.commission(), events);
            }
        }
        decided
    }

    /// Like [`Harness::exec`], but the command must be accepted.
    fn ok(&mut self, cmd: Command) -> Vec<Event> {
        let shown = format!("{cmd:?}");
        self.exec(cmd).unwrap_or_else(|r| panic!("{shown} was rejected: {r:?}"))
    }

    fn append(&mut self, event: Event) {
        let before = self.live.clone();
        let version = before.as_ref().map_or(1, |c| c.version + 1);
        let env = Envelope {
            seq: self.log.len() as u64 + 1,
            commission_id: COMMISSION_ID,
            version,
            at: self.now,
            event,
        };
        let after = apply(before.clone(), &env)
            .unwrap_or_else(|r| panic!("decided event {env:?} does not apply: {r:?}"));
        check_event(before.as_ref(), &env, &after);
        self.live = Some(after);
        self.log.push(env);
    }

    /// Folds the log from scratch, after a round trip through its JSON form.
    fn replay(&self) -> Option<Commission> {
        let stored = serde_json::to_string(&self.log).expect("envelopes serialize");
        let log: Vec<Envelope> = serde_json::from_str(&stored).expect("envelopes deserialize");
        assert_eq!(log, self.log, "the log does not survive a JSON round trip");
        let mut folded = None;
        for env in &log {
            folded = Some(apply(folded, env).unwrap_or_else(|r| panic!("replay refused {env:?}: {r:?}")));
        }
        folded
    }

    fn assert_replays(&self) {
        assert_eq!(self.replay(), self.live, "replaying the log does not rebuild the live commission");
        if let Some(c) = &self.live {
            assert_eq!(c.version, self.log.len() as u64);
            assert_eq!(c.last_seq, self.log.last().map_or(0, |e| e.seq));
            assert_eq!(c.id, COMMISSION_ID);
        }
    }
}

/// The state an event leads to by the table's `NextStage`, written out by hand.
fn next_stage_state(from: State) -> Option<State> {
    match from {
        State::Processing => Some(State::GeneratingIdeas),
        State::GeneratingIdeas => Some(State::CreatingImages),
        State::CreatingImages => Some(State::Uploading),
        State::Uploading => Some(State::CreatingProducts),
        _ => None,
    }
}

/// Does some row of `TRANSITIONS` allow `kind` from `from` (None: no commission yet) to `to`?
fn table_allows(from: Option<State>, kind: EventKind, to: State) -> bool {
    TRANSITIONS.iter().filter(|(k, _, _)| *k == kind).any(|(_, allowed, target)| {
        let from_ok = match (allowed, from) {
            (Allowed::New, None) => true,
            (Allowed::Any(states), Some(s)) => states.contains(&s),
            _ => false,
        };
        let to_ok = match (target, from) {
            (Target::To(s), _) => *s == to,
            (Target::Stay, Some(s)) => s == to,
            (Target::NextStage, Some(s)) => next_stage_state(s) == Some(to),
            _ => false,
        };
        from_ok && to_ok
    })
}

/// Invariants of one event: table, terminal states, stage order, progress, the active job.
fn check_event(before: Option<&Commission>, env: &Envelope, after: &Commission) {
    let kind = env.event.kind();
    let from = before.map(|c| c.state);
    assert!(
        table_allows(from, kind, after.state),
        "{from:?} --{}--> {} has no row in TRANSITIONS",
        kind.as_str(),
        after.state
    );
    assert_eq!(transition(before, &env.event), Ok(after.state), "transition() disagrees with apply()");
    assert!(after.stage_progress.iter().all(|&p| p <= 100), "progress over 100: {:?}", after.stage_progress);
    assert!(after.progress_percent() <= 100);
    let Some(b) = before else {
        assert_eq!(kind, EventKind::Created, "the first event must be created");
        return;
    };
    if b.state.is_terminal() {
        assert!(
            b.state == State::Failed && kind == EventKind::RetryRequested,
            "{} after terminal state {}",
            kind.as_str(),
            b.state
        );
    }
    if kind == EventKind::JobStarted {
        // At most one active job: a job only starts when no other is active.
        assert_eq!(b.active_job, None, "a job started while job {:?} was active", b.active_job);
        assert_eq!(after.stage, None);
        assert_eq!(after.stage_progress, [0; 4], "a new attempt starts from zero");
        assert_eq!(after.attempt, b.attempt + 1);
        assert!(after.attempt <= after.max_attempts);
    } else {
        // Within an attempt, stages only move forward and progress never goes down.
        assert!(after.stage >= b.stage, "stage went back from {:?} to {:?}", b.stage, after.stage);
        for i in 0..4 {
            assert!(
                after.stage_progress[i] >= b.stage_progress[i],
                "progress of stage {i} went down: {:?} -> {:?}",
                b.stage_progress,
                after.stage_progress
            );
        }
        assert_eq!(after.attempt, b.attempt, "only job_started changes the attempt");
    }
    if let Event::StageEntered { stage } = &env.event {
        let expected = match b.stage {
            None => Some(Stage::GeneratingIdeas),
            Some(s) => Stage::ALL.iter().position(|x| *x == s).and_then(|i| Stage::ALL.get(i + 1).copied()),
        };
        assert_eq!(Some(*stage), expected, "stage entered out of order after {:?}", b.stage);
        assert_eq!(after.stage, Some(*stage));
    }
    if kind != EventKind::StageEntered && kind != EventKind::JobStarted {
        assert_eq!(after.stage, b.stage, "only stage_entered and job_started move the stage");
    }
}

/// Invariants that hold between decisions (inside one, `job_finished` briefly clears the job).
fn check_decision(before: Option<&Commission>, after: &Commission, events: &[Event]) {
    assert_eq!(
        after.active_job.is_some(),
        after.state.is_running(),
        "a job is active exactly while running: {:?} in {}",
        after.active_job,
        after.state
    );
    if after.state.stage().is_some() {
        assert_eq!(
            after.stage,
            after.state.stage(),
            "the snapshot's stage is the state's stage while in a stage"
        );
    }
    if after.state == State::Retrying {
        assert!(after.next_retry_at.is_some());
    } else {
        assert_eq!(after.next_retry_at, None, "next_retry_at outside retrying");
    }
    assert!(after.artifacts.len() <= limits::ARTIFACTS_MAX);
    // A job may only be finished by the job that is active.
    for e in events {
        if let Event::JobFinished(end) = e {
            assert_eq!(Some(end.job_id), before.and_then(|b| b.active_job), "a stale job was finished");
        }
    }
}

// Command builders shared by the unit tests.

fn new_commission(max_attempts: u32) -> NewCommission {
    NewCommission {
        user_id: "user-1".into(),
        pipeline: "etsy_listing".into(),
        priority: 0,
        scheduled_for: None,
        context: r#"{"theme":"owls"}"#.into(),
        idempotency_key: None,
        max_attempts,
    }
}

fn start_cmd(job_id: u64) -> Command {
    Command::StartJob {
        job_id,
        executor: Executor::JobController,
        job_name: format!("job-{job_id}"),
        pid: Some(4242),
    }
}

fn job_end(job_id: u64, status: JobStatus) -> JobEnd {
    JobEnd {
        job_id,
        status,
        exit_code: Some(0),
        signal: None,
        error: None,
        max_rss_bytes: 1 << 20,
        cpu_ms: 15,
    }
}

fn policy_ceiling(policy: RetryPolicy, attempt: u32) -> u64 {
    let factor = 1u64.checked_shl(attempt - 1).unwrap_or(u64::MAX);
    policy.base_ms.saturating_mul(factor).min(policy.cap_ms)
}

/// Two rejections are the same rule; for `Invalid`, the same field (the reason is prose).
fn same_rejection(a: &Rejection, b: &Rejection) -> bool {
    match (a, b) {
        (Rejection::Invalid { field: fa, .. }, Rejection::Invalid { field: fb, .. }) => fa == fb,
        _ => a == b,
    }
}

// ---------------------------------------------------------------------------------------------
// Model-based property test.
// ---------------------------------------------------------------------------------------------

mod model {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::{FileFailurePersistence, RngSeed};

    /// Where failing cases are kept and replayed from (see the module comment).
    const REGRESSIONS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/proptest-regressions/machine.txt");

    /// 256 cases (or `ATELIER_PROPTEST_CASES`), a seed printed for replay, failures persisted.
    pub(crate) fn config() -> ProptestConfig {
        let cases = std::env::var("ATELIER_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
        let seed = match std::env::var("PROPTEST_RNG_SEED") {
            Ok(v) => v.parse().unwrap_or_else(|_| panic!("PROPTEST_RNG_SEED={v} is not a u64")),
            Err(_) => fresh_seed(),
        };
        // Captured by the test harness: it only shows up when the test fails.
        eprintln!("proptest: replay this run with PROPTEST_RNG_SEED={seed} (cases: {cases})");
        ProptestConfig {
            cases,
            rng_seed: RngSeed::Fixed(seed),
            failure_persistence: Some(Box::new(FileFailurePersistence::Direct(REGRESSIONS))),
            ..ProptestConfig::default()
        }
    }

    fn fresh_seed() -> u64 {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()),
        );
        h.finish()
    }

    // --- The reference model. Deliberately its own vocabulary: it knows nothing of TRANSITIONS.

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Phase {
        Queued,
        /// A job runs but has not entered a stage.
        Starting,
        /// A job runs in stage 0..=3.
        InStage(usize),
        Backoff,
        Done,
        Dead,
        Gone,
    }

    const STAGE_COUNT: usize = 4;

    fn state_name(p: Phase) -> State {
        match p {
            Phase::Queued => State::Created,
            Phase::Starting => State::Processing,
            Phase::InStage(0) => State::GeneratingIdeas,
            Phase::InStage(1) => State::CreatingImages,
            Phase::InStage(2) => State::Uploading,
            Phase::InStage(_) => State::CreatingProducts,
            Phase::Backoff => State::Retrying,
            Phase::Done => State::Completed,
            Phase::Dead => State::Failed,
            Phase::Gone => State::Cancelled,
        }
    }

    fn stage_at(i: usize) -> Stage {
        [Stage::GeneratingIdeas, Stage::CreatingImages, Stage::Uploading, Stage::CreatingProducts][i]
    }

    fn stage_pos(s: Stage) -> usize {
        match s {
            Stage::GeneratingIdeas => 0,
            Stage::CreatingImages => 1,
            Stage::Uploading => 2,
            Stage::CreatingProducts => 3,
        }
    }

    #[derive(Clone, Debug)]
    struct Model {
        exists: bool,
        phase: Phase,
        /// The stage last entered in this (or the last) attempt.
        stage: Option<usize>,
        percent: [u8; STAGE_COUNT],
        job: Option<u64>,
        attempt: u32,
        max_attempts: u32,
        budget: u32,
        cancel: bool,
        retry_at: Option<Millis>,
        scheduled_for: Option<Millis>,
        artifacts: usize,
        has_error: bool,
    }

    /// What the model expects of an accepted command, beyond the event kinds.
    #[derive(Debug, Default)]
    struct Expect {
        /// `attempt_failed` must carry a `next_retry_at` in this window; the model adopts it.
        retry_window: Option<(Millis, Millis)>,
    }

    impl Model {
        fn new() -> Self {
            Model {
                exists: false,
                phase: Phase::Queued,
                stage: None,
                percent: [0; STAGE_COUNT],
                job: None,
                attempt: 0,
                max_attempts: 0,
                budget: 0,
                cancel: false,
                retry_at: None,
                scheduled_for: None,
                artifacts: 0,
                has_error: false,
            }
        }

        fn is_over(&self) -> bool {
            matches!(self.phase, Phase::Done | Phase::Dead | Phase::Gone)
        }

        /// A job's report must come from the running job, and not while a cancel is pending.
        fn check_reporter(&self, job_id: u64) -> Result<(), Rejection> {
            if self.job != Some(job_id) {
                return Err(Rejection::StaleJob { active: self.job, got: job_id });
            }
            if self.cancel {
                return Err(Rejection::CancelPending);
            }
            Ok(())
        }

        fn in_stage(&self, event: EventKind, stage: Stage) -> Result<usize, Rejection> {
            match self.phase {
                Phase::InStage(i) if i == stage_pos(stage) => Ok(i),
                Phase::InStage(i) => {
                    Err(Rejection::NotInStage { requested: stage, current: Some(stage_at(i)) })
                }
                p => Err(Rejection::IllegalTransition { from: state_name(p), event }),
            }
        }

        fn field_ok(field: &'static str, v: &str, max: usize) -> Result<(), Rejection> {
            if v.is_empty() || v.len() > max {
                return Err(Rejection::Invalid { field, reason: String::new() });
            }
            Ok(())
        }

        /// Predicts `cmd` at `now`. On acceptance, updates the model and returns the event kinds.
        fn step(
            &mut self,
            cmd: &Command,
            now: Millis,
            policy: RetryPolicy,
        ) -> Result<(Vec<EventKind>, Expect), Rejection> {
            use EventKind as K;
            let mut expect = Expect::default();
            if !self.exists {
                let Command::Create(new) = cmd else { return Err(Rejection::NotFound) };
                if !(1..=100).contains(&new.max_attempts) {
                    return Err(Rejection::Invalid { field: "max_attempts", reason: String::new() });
                }
                *self = Model {
                    exists: true,
                    max_attempts: new.max_attempts,
                    budget: new.max_attempts,
                    scheduled_for: new.scheduled_for,
                    ..Model::new()
                };
                return Ok((vec![K::Created], expect));
            }
            if let Command::Create(_) = cmd {
                return Err(Rejection::AlreadyExists);
            }
            let retry_of_failed = self.phase == Phase::Dead && *cmd == Command::ManualRetry;
            if self.is_over() && !retry_of_failed {
                return Err(Rejection::Terminal { state: state_name(self.phase) });
            }
            let kinds = match cmd {
                Command::Create(_) => unreachable!(),
                Command::StartJob { job_id, .. } => match self.phase {
                    Phase::Queued => {
                        if let Some(t) = self.scheduled_for.filter(|t| *t > now) {
                            return Err(Rejection::NotYetScheduled { scheduled_for: t });
                        }
                        if self.attempt >= self.max_attempts {
                            return Err(Rejection::AttemptsExhausted { max_attempts: self.max_attempts });
                        }
                        self.phase = Phase::Starting;
                        self.attempt += 1;
                        self.job = Some(*job_id);
                        self.stage = None;
                        self.percent = [0; STAGE_COUNT];
                        self.artifacts = 0;
                        self.has_error = false;
                        vec![K::JobStarted]
                    }
                    Phase::Backoff => {
                        return Err(Rejection::IllegalTransition {
                            from: State::Retrying,
                            event: K::JobStarted,
                        })
                    }
                    _ => return Err(Rejection::StaleJob { active: self.job, got: *job_id }),
                },
                Command::EnterStage { job_id, stage } => {
                    self.check_reporter(*job_id)?;
                    let (current, next) = match self.phase {
                        Phase::Starting => (None, 0),
                        Phase::InStage(i) if i + 1 < STAGE_COUNT => (Some(stage_at(i)), i + 1),
                        p => {
                            return Err(Rejection::IllegalTransition {
                                from: state_name(p),
                                event: K::StageEntered,
                            })
                        }
                    };
                    if stage_pos(*stage) != next {
                        return Err(Rejection::StageOutOfOrder { current, requested: *stage });
                    }
                    self.phase = Phase::InStage(next);
                    self.stage = Some(next);
                    vec![K::StageEntered]
                }
                Command::ReportProgress { job_id, stage, percent, .. } => {
                    self.check_reporter(*job_id)?;
                    if *percent > 100 {
                        return Err(Rejection::ProgressOutOfRange { percent: *percent });
                    }
                    let i = self.in_stage(K::Progress, *stage)?;
                    let p = *percent as u8;
                    if p < self.percent[i] {
                        return Err(Rejection::ProgressDecrease {
                            stage: *stage,
                            current: self.percent[i],
                            requested: p,
                        });
                    }
                    self.percent[i] = p;
                    vec![K::Progress]
                }
                Command::RecordArtifact { job_id, stage, kind, uri } => {
                    self.check_reporter(*job_id)?;
                    Self::field_ok("kind", kind, 64)?;
                    Self::field_ok("uri", uri, 2048)?;
                    self.in_stage(K::Artifact, *stage)?;
                    if self.artifacts >= 64 {
                        return Err(Rejection::TooManyArtifacts);
                    }
                    self.artifacts += 1;
                    vec![K::Artifact]
                }
                Command::Complete { job_id, result, .. } => {
                    self.check_reporter(*job_id)?;
                    if serde_json::from_str::<serde_json::Value>(result).is_err() {
                        return Err(Rejection::Invalid { field: "result", reason: String::new() });
                    }
                    if self.phase != Phase::InStage(STAGE_COUNT - 1) {
                        return Err(Rejection::IllegalTransition {
                            from: state_name(self.phase),
                            event: K::Completed,
                        });
                    }
                    self.phase = Phase::Done;
                    self.job = None;
                    self.percent = [100; STAGE_COUNT];
                    vec![K::JobFinished, K::Completed]
                }
                Command::FailAttempt { job_id, retryable, .. } => {
                    if self.job != Some(*job_id) {
                        return Err(Rejection::StaleJob { active: self.job, got: *job_id });
                    }
                    self.job = None;
                    if self.cancel {
                        self.phase = Phase::Gone;
                        vec![K::JobFinished, K::Cancelled]
                    } else if *retryable && self.attempt < self.max_attempts {
                        self.phase = Phase::Backoff;
                        self.has_error = true;
                        let ceiling = policy_ceiling(policy, self.attempt) as i64;
                        expect.retry_window = Some((now, now.saturating_add(ceiling)));
                        vec![K::JobFinished, K::AttemptFailed]
                    } else {
                        self.phase = Phase::Dead;
                        self.has_error = true;
                        vec![K::JobFinished, K::Failed]
                    }
                }
                Command::RetryDue | Command::RetryNow => {
                    if self.phase != Phase::Backoff {
                        return Err(Rejection::IllegalTransition {
                            from: state_name(self.phase),
                            event: K::RetryDue,
                        });
                    }
                    if let Some(t) = self.retry_at.filter(|t| *t > now && matches!(cmd, Command::RetryDue)) {
                        return Err(Rejection::RetryNotDue { next_retry_at: t });
                    }
                    self.phase = Phase::Queued;
                    self.retry_at = None;
                    vec![K::RetryDue]
                }
                Command::RequestCancel => {
                    if self.cancel {
                        vec![]
                    } else if self.job.is_some() {
                        self.cancel = true;
                        vec![K::CancelRequested]
                    } else {
                        self.cancel = true;
                        self.phase = Phase::Gone;
                        self.retry_at = None;
                        vec![K::CancelRequested, K::Cancelled]
                    }
                }
                Command::ConfirmCancelled { job } => {
                    if !self.cancel {
                        return Err(Rejection::Invalid { field: "cancel", reason: String::new() });
                    }
                    if let Some(end) = job {
                        if self.job != Some(end.job_id) {
                            return Err(Rejection::StaleJob { active: self.job, got: end.job_id });
                        }
                    }
                    let had_job = self.job.take().is_some();
                    self.phase = Phase::Gone;
                    self.retry_at = None;
                    if had_job {
                        vec![K::JobFinished, K::Cancelled]
                    } else {
                        vec![K::Cancelled]
                    }
                }
                Command::ManualRetry => {
                    if self.phase != Phase::Dead {
                        return Err(Rejection::NotFailed { state: state_name(self.phase) });
                    }
                    self.phase = Phase::Queued;
                    self.max_attempts = self.attempt + self.budget;
                    self.has_error = false;
                    vec![K::RetryRequested]
                }
            };
            Ok((kinds, expect))
        }

        /// The model and the engine's commission describe the same thing.
        fn assert_matches(&self, c: Option<&Commission>) {
            let Some(c) = c else {
                assert!(!self.exists, "the model has a commission, the engine has none");
                return;
            };
            assert!(self.exists, "the engine has a commission, the model has none");
            assert_eq!(c.state, state_name(self.phase), "state");
            assert_eq!(c.stage, self.stage.map(stage_at), "stage");
            assert_eq!(c.stage_progress, self.percent, "stage progress");
            assert_eq!(c.active_job, self.job, "active job");
            assert_eq!(c.attempt, self.attempt, "attempt");
            assert_eq!(c.max_attempts, self.max_attempts, "max_attempts");
            assert_eq!(c.attempt_budget, self.budget, "attempt_budget");
            assert_eq!(c.cancel_requested, self.cancel, "cancel_requested");
            assert_eq!(c.next_retry_at, self.retry_at, "next_retry_at");
            assert_eq!(c.scheduled_for, self.scheduled_for, "scheduled_for");
            assert_eq!(c.artifacts.len(), self.artifacts, "artifacts");
            assert_eq!(c.error.is_some(), self.has_error, "error");
            assert_eq!(c.result.is_some(), self.phase == Phase::Done, "result");
        }
    }

    // --- Generated inputs. References (`JobRef`, `StageRef`, …) are resolved against the model
    // when the step runs, so sequences stay meaningful while proptest shrinks them.

    #[derive(Clone, Debug)]
    enum JobRef {
        /// The model's active job (or the last job started, which is then stale).
        Active,
        /// A job id never used before.
        Fresh,
        /// One of the job ids used before (or an arbitrary one).
        Old(u8),
    }

    #[derive(Clone, Debug)]
    enum StageRef {
        Next,
        Current,
        Exact(Stage),
    }

    #[derive(Clone, Debug)]
    enum PercentRef {
        /// The stage's current percent plus this.
        Bump(u32),
        /// The stage's current percent minus this (a report that goes back a little).
        Drop(u8),
        Exact(u32),
    }

    #[derive(Clone, Debug)]
    enum Op {
        Create { max_attempts: u32, scheduled_in: Option<Millis> },
        StartJob { job: JobRef },
        EnterStage { job: JobRef, stage: StageRef },
        ReportProgress { job: JobRef, stage: StageRef, percent: PercentRef, message: bool },
        RecordArtifact { job: JobRef, stage: StageRef, valid_kind: bool },
        Complete { job: JobRef, valid_result: bool, with_end: bool },
        FailAttempt { job: JobRef, retryable: bool, with_end: bool },
        RetryDue,
        RetryNow,
        RequestCancel,
        ConfirmCancelled { job: Option<JobRef> },
        ManualRetry,
    }

    #[derive(Clone, Debug)]
    struct Step {
        op: Op,
        /// The clock moves forward by this before the step.
        advance_ms: Millis,
        jitter_seed: u64,
    }

    fn job_ref() -> impl Strategy<Value = JobRef> {
        prop_oneof![8 => Just(JobRef::Active), 1 => Just(JobRef::Fresh), 1 => (0u8..4).prop_map(JobRef::Old)]
    }

    /// Weights of the next stage, the current one and any stage.
    fn stage_ref(next: u32, current: u32, any: u32) -> impl Strategy<Value = StageRef> {
        prop_oneof![
            next => Just(StageRef::Next),
            current => Just(StageRef::Current),
            any => prop::sample::select(Stage::ALL.to_vec()).prop_map(StageRef::Exact),
        ]
    }

    fn percent_ref() -> impl Strategy<Value = PercentRef> {
        prop_oneof![
            6 => (0u32..=40).prop_map(PercentRef::Bump),
            1 => (1u8..=2).prop_map(PercentRef::Drop),
            2 => (0u32..=120).prop_map(PercentRef::Exact),
        ]
    }

    fn create_op(max_attempts: impl Strategy<Value = u32>) -> impl Strategy<Value = Op> {
        let delay = prop_oneof![prop::sample::select(vec![0i64, 1, 500, 1_000, 2_000]), 0i64..10_000];
        (max_attempts, prop::option::weighted(0.2, delay))
            .prop_map(|(max_attempts, scheduled_in)| Op::Create { max_attempts, scheduled_in })
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            1 => create_op(0u32..=4),
            4 => prop_oneof![4 => Just(JobRef::Fresh), 1 => job_ref()].prop_map(|job| Op::StartJob { job }),
            6 => (job_ref(), stage_ref(5, 1, 2)).prop_map(|(job, stage)| Op::EnterStage { job, stage }),
            8 => (job_ref(), stage_ref(1, 6, 2), percent_ref(), any::<bool>())
                .prop_map(|(job, stage, percent, message)| Op::ReportProgress { job, stage, percent, message }),
            2 => (job_ref(), stage_ref(1, 6, 2), prop::bool::weighted(0.9))
                .prop_map(|(job, stage, valid_kind)| Op::RecordArtifact { job, stage, valid_kind }),
            3 => (job_ref(), prop::bool::weighted(0.9), any::<bool>())
                .prop_map(|(job, valid_result, with_end)| Op::Complete { job, valid_result, with_end }),
            3 => (job_ref(), prop::bool::weighted(0.7), any::<bool>())
                .prop_map(|(job, retryable, with_end)| Op::FailAttempt { job, retryable, with_end }),
            3 => Just(Op::RetryDue),
            1 => Just(Op::RetryNow),
            1 => Just(Op::RequestCancel),
            1 => prop::option::of(job_ref()).prop_map(|job| Op::ConfirmCancelled { job }),
            1 => Just(Op::ManualRetry),
        ]
    }

    fn step() -> impl Strategy<Value = Step> {
        // Round steps too, so that boundaries (due exactly now) are hit, not only straddled.
        let advance = prop_oneof![
            3 => Just(0i64),
            2 => prop::sample::select(vec![1i64, 500, 1_000, 2_000]),
            3 => 0i64..5_000,
            1 => 0i64..400_000,
        ];
        (op(), advance, any::<u64>()).prop_map(|(op, advance_ms, jitter_seed)| Step {
            op,
            advance_ms,
            jitter_seed,
        })
    }

    fn policy() -> impl Strategy<Value = RetryPolicy> {
        (prop::sample::select(vec![0u64, 1, 1_000, 2_000]), prop::sample::select(vec![0u64, 5_000, 300_000]))
            .prop_map(|(base_ms, cap_ms)| RetryPolicy { base_ms, cap_ms })
    }

    /// A scenario: usually starts with a valid create, then random steps.
    fn scenario() -> impl Strategy<Value = (RetryPolicy, Option<Op>, Vec<Step>)> {
        (policy(), prop::option::weighted(0.95, create_op(1u32..=4)), prop::collection::vec(step(), 1..60))
    }

    /// Turns a generated op into a concrete command, using the model only to pick inputs.
    struct Resolver {
        used_jobs: Vec<u64>,
        next_job: u64,
    }

    impl Resolver {
        fn job(&mut self, r: &JobRef, m: &Model) -> u64 {
            match r {
                JobRef::Active => m.job.or(self.used_jobs.last().copied()).unwrap_or(1),
                JobRef::Fresh => {
                    self.next_job += 1;
                    self.next_job
                }
                JobRef::Old(i) => {
                    if self.used_jobs.is_empty() {
                        3
                    } else {
                        self.used_jobs[*i as usize % self.used_jobs.len()]
                    }
                }
            }
        }

        fn stage(r: &StageRef, m: &Model) -> Stage {
            match r {
                StageRef::Next => match m.phase {
                    Phase::InStage(i) => stage_at((i + 1).min(STAGE_COUNT - 1)),
                    _ => stage_at(0),
                },
                StageRef::Current => stage_at(m.stage.unwrap_or(0)),
                StageRef::Exact(s) => *s,
            }
        }

        fn command(&mut self, op: &Op, m: &Model, now: Millis) -> Command {
            match op {
                Op::Create { max_attempts, scheduled_in } => Command::Create(NewCommission {
                    scheduled_for: scheduled_in.map(|d| now + d),
                    ..new_commission(*max_attempts)
                }),
                Op::StartJob { job } => {
                    let id = self.job(job, m);
                    self.used_jobs.push(id);
                    start_cmd(id)
                }
                Op::EnterStage { job, stage } => {
                    Command::EnterStage { job_id: self.job(job, m), stage: Self::stage(stage, m) }
                }
                Op::ReportProgress { job, stage, percent, message } => {
                    let stage = Self::stage(stage, m);
                    let percent = match percent {
                        PercentRef::Bump(b) => u32::from(m.percent[stage_pos(stage)]) + b,
                        PercentRef::Drop(d) => u32::from(m.percent[stage_pos(stage)].saturating_sub(*d)),
                        PercentRef::Exact(p) => *p,
                    };
                    Command::ReportProgress {
                        job_id: self.job(job, m),
                        stage,
                        percent,
                        message: message.then(|| format!("{percent}% done")),
                    }
                }
                Op::RecordArtifact { job, stage, valid_kind } => Command::RecordArtifact {
                    job_id: self.job(job, m),
                    stage: Self::stage(stage, m),
                    kind: if *valid_kind { "image".into() } else { String::new() },
                    uri: "s3://atelier/owl.png".into(),
                },
                Op::Complete { job, valid_result, with_end } => {
                    let job_id = self.job(job, m);
                    Command::Complete {
                        job_id,
                        result: if *valid_result { r#"{"listings":3}"#.into() } else { "{not json".into() },
                        job: with_end.then(|| job_end(job_id, JobStatus::Succeeded)),
                    }
                }
                Op::FailAttempt { job, retryable, with_end } => {
                    let job_id = self.job(job, m);
                    Command::FailAttempt {
                        job_id,
                        error: "upstream timed out".into(),
                        retryable: *retryable,
                        job: with_end.then(|| job_end(job_id, JobStatus::Failed)),
                    }
                }
                Op::RetryDue => Command::RetryDue,
                Op::RetryNow => Command::RetryNow,
                Op::RequestCancel => Command::RequestCancel,
                Op::ConfirmCancelled { job } => Command::ConfirmCancelled {
                    job: job.as_ref().map(|r| job_end(self.job(r, m), JobStatus::Killed)),
                },
                Op::ManualRetry => Command::ManualRetry,
            }
        }
    }

    /// Runs one scenario, checking everything; returns the states it went through.
    fn run(policy: RetryPolicy, first: Option<Op>, steps: Vec<Step>) -> Vec<State> {
        let mut h = Harness::new();
        h.retry = policy;
        let mut m = Model::new();
        let mut r = Resolver { used_jobs: Vec::new(), next_job: 100 };
        let steps = first.map(|op| Step { op, advance_ms: 0, jitter_seed: 0 }).into_iter().chain(steps);
        let mut states_seen = Vec::new();
        for (n, step) in steps.enumerate() {
            h.now += step.advance_ms;
            h.jitter_seed = step.jitter_seed;
            let cmd = r.command(&step.op, &m, h.now);
            let before = m.clone();
            let predicted = m.step(&cmd, h.now, policy);
            let actual = h.exec(cmd.clone());
            match (&predicted, &actual) {
                (Ok((kinds, expect)), Ok(events)) => {
                    let got: Vec<EventKind> = events.iter().map(Event::kind).collect();
                    assert_eq!(&got, kinds, "step {n}: {cmd:?} emitted other events than the model predicts");
                    for e in events {
                        match e {
                            Event::AttemptFailed { attempt, next_retry_at, .. } => {
                                let (lo, hi) = expect.retry_window.expect("model expects attempt_failed");
                                assert!(
                                    (lo..=hi).contains(next_retry_at),
                                    "step {n}: next_retry_at {next_retry_at} outside [{lo}, {hi}]"
                                );
                                assert_eq!(*attempt, before.attempt);
                                m.retry_at = Some(*next_retry_at);
                            }
                            Event::Failed { attempt, .. } => assert_eq!(*attempt, before.attempt),
                            Event::JobStarted { attempt, .. } => assert_eq!(*attempt, m.attempt),
                            _ => {}
                        }
                    }
                }
                (Err(want), Err(got)) => {
                    assert!(
                        same_rejection(want, got),
                        "step {n}: {cmd:?}: model rejects with {want:?}, engine with {got:?}"
                    );
                }
                (want, got) => {
                    panic!(
                        "step {n}: {cmd:?} in {:?}: model says {want:?}, engine says {got:?}",
                        before.phase
                    )
                }
            }
            m.assert_matches(h.live.as_ref());
            if let Some(c) = &h.live {
                states_seen.push(c.state);
            }
        }
        h.assert_replays();
        states_seen
    }

    proptest! {
        #![proptest_config(config())]

        /// Engine and model agree on every command; invariants, table rows and replay hold.
        #[test]
        fn engine_agrees_with_reference_model((policy, first, steps) in scenario()) {
            run(policy, first, steps);
        }
    }

    /// The generator is not so random that it never gets anywhere: over a fixed batch of
    /// scenarios, every state is reached (otherwise the property above proves little).
    #[test]
    fn scenarios_reach_every_state() {
        use proptest::strategy::ValueTree;
        use proptest::test_runner::TestRunner;
        let mut runner = TestRunner::deterministic();
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..256 {
            let (policy, first, steps) = scenario().new_tree(&mut runner).expect("a scenario").current();
            seen.extend(run(policy, first, steps));
        }
        let missing: Vec<State> = State::ALL.into_iter().filter(|s| !seen.contains(s)).collect();
        assert!(missing.is_empty(), "the generator never reaches {missing:?}");
    }

    /// The model itself: a known happy path, so a model bug cannot hide behind an engine bug.
    #[test]
    fn model_happy_path() {
        let mut m = Model::new();
        let p = RetryPolicy::default();
        let cmds = [
            Command::Create(new_commission(2)),
            start_cmd(1),
            Command::EnterStage { job_id: 1, stage: Stage::GeneratingIdeas },
            Command::EnterStage { job_id: 1, stage: Stage::CreatingImages },
            Command::EnterStage { job_id: 1, stage: Stage::Uploading },
            Command::EnterStage { job_id: 1, stage: Stage::CreatingProducts },
            Command::Complete { job_id: 1, result: "null".into(), job: None },
        ];
        for cmd in &cmds {
            m.step(cmd, T0, p).unwrap_or_else(|r| panic!("model rejects {cmd:?}: {r:?}"));
        }
        assert_eq!(m.phase, Phase::Done);
        assert_eq!(
            m.step(&Command::RequestCancel, T0, p).unwrap_err(),
            Rejection::Terminal { state: State::Completed }
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Retry policy.
// ---------------------------------------------------------------------------------------------

mod retry {
    use super::*;
    use proptest::prelude::*;

    /// A harness whose commission is running job `job_id` as attempt 1.
    fn running(max_attempts: u32, policy: RetryPolicy) -> Harness {
        let mut h = Harness::new();
        h.retry = policy;
        h.ok(Command::Create(new_commission(max_attempts)));
        h.ok(start_cmd(1));
        h
    }

    fn fail(job_id: u64, retryable: bool) -> Command {
        Command::FailAttempt { job_id, error: "boom".into(), retryable, job: None }
    }

    proptest! {
        #![proptest_config(super::model::config())]

        /// Retryable failures back off within [now, now + min(cap, base·2^(attempt-1))] until
        /// the budget is spent; the last one fails for good; a manual retry grants a new budget.
        #[test]
        fn retryable_failures_back_off_then_fail(
            max_attempts in 1u32..=8,
            base_ms in 0u64..5_000,
            cap_ms in 0u64..400_000,
            seeds in prop::collection::vec(any::<u64>(), 8),
            stage_reached in 0usize..=4,
        ) {
            let policy = RetryPolicy { base_ms, cap_ms };
            let mut h = running(max_attempts, policy);
            for attempt in 1..=max_attempts {
                if attempt > 1 {
                    h.ok(start_cmd(u64::from(attempt)));
                }
                let job = u64::from(attempt);
                for &stage in &Stage::ALL[..stage_reached] {
                    h.ok(Command::EnterStage { job_id: job, stage });
                }
                h.jitter_seed = seeds[attempt as usize - 1];
                let now = h.now;
                let events = h.ok(fail(job, true));
                prop_assert_eq!(events.len(), 2);
                prop_assert_eq!(&events[0], &Event::JobFinished(JobEnd {
                    job_id: job, status: JobStatus::Failed, exit_code: None, signal: None, error: None,
                    max_rss_bytes: 0, cpu_ms: 0,
                }));
                if attempt < max_attempts {
                    let Event::AttemptFailed { attempt: a, next_retry_at, retryable, .. } = events[1].clone() else {
                        panic!("attempt {attempt}/{max_attempts}: expected attempt_failed, got {:?}", events[1]);
                    };
                    prop_assert_eq!(a, attempt);
                    prop_assert!(retryable);
                    let ceiling = policy_ceiling(policy, attempt) as i64;
                    prop_assert!(
                        next_retry_at >= now && next_retry_at <= now + ceiling,
                        "attempt {}: {} not in [{}, {}]", attempt, next_retry_at, now, now + ceiling
                    );
                    prop_assert_eq!(h.commission().state, State::Retrying);
                    prop_assert_eq!(h.commission().next_retry_at, Some(next_retry_at));
                    // Not due a millisecond early; due exactly on time.
                    if next_retry_at > now {
                        h.now = next_retry_at - 1;
                        prop_assert_eq!(h.exec(Command::RetryDue), Err(Rejection::RetryNotDue { next_retry_at }));
                    }
                    h.now = next_retry_at;
                    h.ok(Command::RetryDue);
                    prop_assert_eq!(h.commission().state, State::Created);
                } else {
                    prop_assert_eq!(&events[1], &Event::Failed { attempt, error: "boom".into(), retryable: true });
                    prop_assert_eq!(h.commission().state, State::Failed);
                }
            }
            // The budget is spent: a manual retry grants `max_attempts` more.
            h.ok(Command::ManualRetry);
            prop_assert_eq!(h.commission().max_attempts, 2 * max_attempts);
            prop_assert_eq!(h.commission().state, State::Created);
            h.ok(start_cmd(1000));
            prop_assert_eq!(h.commission().attempt, max_attempts + 1);
            h.assert_replays();
        }

        /// A permanent error fails the commission at once, whatever attempts remain.
        #[test]
        fn permanent_failure_fails_at_once(max_attempts in 1u32..=10, retries_before in 0u32..10) {
            let mut h = running(max_attempts, RetryPolicy { base_ms: 0, cap_ms: 0 });
            let retries_before = retries_before.min(max_attempts - 1);
            for attempt in 1..=retries_before {
                h.ok(fail(u64::from(attempt), true));
                h.ok(Command::RetryDue);
                h.ok(start_cmd(u64::from(attempt) + 1));
            }
            let job = u64::from(retries_before) + 1;
            let events = h.ok(fail(job, false));
            prop_assert_eq!(
                events.last(),
                Some(&Event::Failed { attempt: retries_before + 1, error: "boom".into(), retryable: false })
            );
            prop_assert_eq!(h.commission().state, State::Failed);
            prop_assert_eq!(h.commission().error.as_deref(), Some("boom"));
            prop_assert_eq!(h.commission().active_job, None);
            h.assert_replays();
        }

        /// With a cancel pending, a failed attempt ends the commission as cancelled: no retry.
        #[test]
        fn failure_with_cancel_pending_cancels(max_attempts in 1u32..=5, retryable: bool, stage_reached in 0usize..=4) {
            let mut h = running(max_attempts, RetryPolicy::default());
            for &stage in &Stage::ALL[..stage_reached] {
                h.ok(Command::EnterStage { job_id: 1, stage });
            }
            prop_assert_eq!(h.ok(Command::RequestCancel), vec![Event::CancelRequested]);
            let events = h.ok(fail(1, retryable));
            let kinds: Vec<EventKind> = events.iter().map(Event::kind).collect();
            prop_assert_eq!(kinds, vec![EventKind::JobFinished, EventKind::Cancelled]);
            prop_assert_eq!(h.commission().state, State::Cancelled);
            prop_assert_eq!(h.commission().next_retry_at, None);
            prop_assert_eq!(h.exec(Command::ManualRetry), Err(Rejection::Terminal { state: State::Cancelled }));
            h.assert_replays();
        }
    }

    // Regression: backoff_ms overflowed on `ceiling + 1` (panic) when a policy had no cap (cap_ms = u64::MAX).
    #[test]
    fn backoff_without_cap_does_not_overflow() {
        let policy = RetryPolicy { base_ms: u64::MAX, cap_ms: u64::MAX };
        for seed in 0..64 {
            let delay = policy.backoff_ms(3, seed);
            assert!(delay >= 0);
        }
        let mut h = running(3, policy);
        let events = h.ok(fail(1, true));
        let Some(Event::AttemptFailed { next_retry_at, .. }) = events.last() else { panic!("{events:?}") };
        assert!(*next_retry_at >= T0);
    }

    #[test]
    fn same_seed_same_schedule() {
        let mut a = running(3, RetryPolicy::default());
        let mut b = running(3, RetryPolicy::default());
        assert_eq!(a.ok(fail(1, true)), b.ok(fail(1, true)));
        a.assert_replays();
    }
}

// ---------------------------------------------------------------------------------------------
// The transition table, exhaustively.
// ---------------------------------------------------------------------------------------------

mod table {
    use super::*;

    /// A reachable commission in `state`, built through `decide`.
    pub(crate) fn reach(state: State) -> Commission {
        let mut h = Harness::new();
        h.retry = RetryPolicy { base_ms: 1_000, cap_ms: 1_000 };
        h.ok(Command::Create(new_commission(3)));
        let stages_before = |s: State| Stage::ALL.iter().position(|st| st.state() == s).map_or(0, |i| i + 1);
        match state {
            State::Created => {}
            State::Retrying => {
                h.ok(start_cmd(1));
                h.ok(Command::FailAttempt { job_id: 1, error: "x".into(), retryable: true, job: None });
            }
            State::Failed => {
                h.ok(start_cmd(1));
                h.ok(Command::FailAttempt { job_id: 1, error: "x".into(), retryable: false, job: None });
            }
            State::Cancelled => {
                h.ok(Command::RequestCancel);
            }
            State::Completed => {
                h.ok(start_cmd(1));
                for stage in Stage::ALL {
                    h.ok(Command::EnterStage { job_id: 1, stage });
                }
                h.ok(Command::Complete { job_id: 1, result: "{}".into(), job: None });
            }
            running => {
                h.ok(start_cmd(1));
                for &stage in &Stage::ALL[..stages_before(running)] {
                    h.ok(Command::EnterStage { job_id: 1, stage });
                }
            }
        }
        assert_eq!(h.commission().state, state);
        h.live.unwrap()
    }

    /// An event of `kind` that satisfies every rule but the state one, for `c`.
    fn well_formed(kind: EventKind, c: &Commission) -> Event {
        let stage = c.state.stage().unwrap_or(Stage::GeneratingIdeas);
        match kind {
            EventKind::Created => Event::Created {
                user_id: "u".into(),
                pipeline: "p".into(),
                priority: 0,
                scheduled_for: None,
                context: "{}".into(),
                idempotency_key: None,
                max_attempts: 3,
            },
            EventKind::JobStarted => Event::JobStarted {
                attempt: c.attempt + 1,
                job_id: 9,
                executor: Executor::TaskRunner,
                job_name: "j".into(),
                pid: None,
            },
            EventKind::StageEntered => Event::StageEntered {
                stage: match c.state.stage() {
                    None => Stage::GeneratingIdeas,
                    Some(s) => s.next().unwrap_or(Stage::GeneratingIdeas),
                },
            },
            EventKind::Progress => Event::Progress { stage, percent: 100, message: None },
            EventKind::Artifact => Event::Artifact { stage, kind: "k".into(), uri: "u".into() },
            EventKind::AttemptFailed => Event::AttemptFailed {
                attempt: c.attempt,
                error: "e".into(),
                retryable: true,
                next_retry_at: T0,
            },
            EventKind::RetryDue => Event::RetryDue,
            EventKind::Completed => Event::Completed { result: "1".into() },
            EventKind::Failed => Event::Failed { attempt: c.attempt, error: "e".into(), retryable: false },
            EventKind::CancelRequested => Event::CancelRequested,
            EventKind::Cancelled => Event::Cancelled,
            EventKind::RetryRequested => Event::RetryRequested,
            EventKind::JobFinished => {
                Event::JobFinished(job_end(c.active_job.unwrap_or(9), JobStatus::Succeeded))
            }
        }
    }

    /// For every state × event kind, `transition` accepts exactly what the table allows, leads
    /// where the table says, and names the right rule when it refuses.
    #[test]
    fn transition_follows_the_table_everywhere() {
        let mut allowed_pairs = 0;
        for state in State::ALL {
            let c = reach(state);
            for kind in EventKind::ALL {
                let event = well_formed(kind, &c);
                let row = TRANSITIONS.iter().find(|(k, _, _)| *k == kind).expect("a row");
                let in_table = matches!(row.1, Allowed::Any(states) if states.contains(&state));
                match transition(Some(&c), &event) {
                    Ok(to) => {
                        assert!(
                            in_table,
                            "{state} --{}--> {to} accepted but not in the table",
                            kind.as_str()
                        );
                        assert!(
                            table_allows(Some(state), kind, to),
                            "{state} --{}--> {to}: wrong target",
                            kind.as_str()
                        );
                        allowed_pairs += 1;
                    }
                    Err(r) => {
                        assert!(
                            !in_table,
                            "{state} --{}--> refused ({r:?}) though the table allows it",
                            kind.as_str()
                        );
                        let expected = if kind == EventKind::Created {
                            Rejection::AlreadyExists
                        } else if state.is_terminal() {
                            Rejection::Terminal { state }
                        } else {
                            Rejection::IllegalTransition { from: state, event: kind }
                        };
                        assert_eq!(r, expected, "{state} --{}-->", kind.as_str());
                    }
                }
            }
        }
        // Cross-check with a count taken straight from the table's data.
        let table_pairs: usize = TRANSITIONS
            .iter()
            .map(|(_, allowed, _)| match allowed {
                Allowed::New => 0,
                Allowed::Any(states) => states.len(),
            })
            .sum();
        assert_eq!(allowed_pairs, table_pairs);
    }

    #[test]
    fn only_created_applies_to_nothing() {
        for kind in EventKind::ALL {
            let event = well_formed(kind, &reach(State::Created));
            let got = transition(None, &event);
            if kind == EventKind::Created {
                assert_eq!(got, Ok(State::Created));
            } else {
                assert_eq!(got, Err(Rejection::NotFound), "{}", kind.as_str());
            }
        }
    }

    #[test]
    fn table_shape() {
        for kind in EventKind::ALL {
            let rows = TRANSITIONS.iter().filter(|(k, _, _)| *k == kind).count();
            assert_eq!(rows, 1, "{} has {rows} rows", kind.as_str());
        }
        for (kind, allowed, target) in TRANSITIONS {
            if let Allowed::Any(states) = allowed {
                for s in *states {
                    // Nothing leaves a terminal state but a manual retry of a failed commission.
                    assert!(!s.is_terminal() || (*kind == EventKind::RetryRequested && *s == State::Failed));
                }
                if let Target::NextStage = target {
                    assert!(states.iter().all(|s| next_stage_state(*s).is_some()));
                }
            }
            assert_eq!(
                kind.is_terminal(),
                matches!(target, Target::To(s) if s.is_terminal()),
                "{}",
                kind.as_str()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Rules: one test per rejection variant.
// ---------------------------------------------------------------------------------------------

mod rules {
    use super::*;

    enum Step {
        Do(Command),
        /// The clock moves forward.
        Wait(Millis),
    }
    use Step::{Do, Wait};

    fn create() -> Step {
        Do(Command::Create(new_commission(3)))
    }
    fn create_with(f: impl FnOnce(&mut NewCommission)) -> Step {
        let mut n = new_commission(3);
        f(&mut n);
        Do(Command::Create(n))
    }
    fn start(job_id: u64) -> Step {
        Do(start_cmd(job_id))
    }
    fn enter(job_id: u64, stage: Stage) -> Step {
        Do(Command::EnterStage { job_id, stage })
    }
    fn progress(job_id: u64, stage: Stage, percent: u32) -> Step {
        Do(Command::ReportProgress { job_id, stage, percent, message: None })
    }
    fn artifact(job_id: u64, stage: Stage, kind: &str) -> Step {
        Do(Command::RecordArtifact { job_id, stage, kind: kind.into(), uri: "s3://a/b".into() })
    }
    fn complete(job_id: u64, result: &str) -> Step {
        Do(Command::Complete { job_id, result: result.into(), job: None })
    }
    fn fail(job_id: u64, retryable: bool) -> Step {
        Do(Command::FailAttempt { job_id, error: "boom".into(), retryable, job: None })
    }
    fn cancel() -> Step {
        Do(Command::RequestCancel)
    }
    fn confirm(job: Option<u64>) -> Step {
        Do(Command::ConfirmCancelled { job: job.map(|id| job_end(id, JobStatus::Killed)) })
    }
    fn retry_due() -> Step {
        Do(Command::RetryDue)
    }
    fn manual_retry() -> Step {
        Do(Command::ManualRetry)
    }
    /// Create, start job 1 and enter every stage up to and including `stage`.
    fn up_to(stage: Stage) -> Vec<Step> {
        let mut v = vec![create(), start(1)];
        v.extend(Stage::ALL.iter().filter(|s| **s <= stage).map(|s| enter(1, *s)));
        v
    }
    fn with(mut steps: Vec<Step>, more: impl IntoIterator<Item = Step>) -> Vec<Step> {
        steps.extend(more);
        steps
    }

    /// Runs `steps`: all but the last must be accepted, the last must be refused with
    /// `expected` (for `Invalid`: the same field). The refusal must leave the commission as it was.
    fn check(steps: Vec<Step>, expected: Rejection) -> Harness {
        let mut h = Harness::new();
        h.retry = RetryPolicy { base_ms: 1_000, cap_ms: 1_000 };
        let n = steps.len();
        for (i, step) in steps.into_iter().enumerate() {
            match step {
                Wait(ms) => h.now += ms,
                Do(cmd) if i + 1 < n => {
                    h.ok(cmd);
                }
                Do(cmd) => {
                    let before = h.live.clone();
                    let got = h.exec(cmd.clone());
                    match got {
                        Err(r) => {
                            assert!(
                                same_rejection(&r, &expected),
                                "{cmd:?}: expected {expected:?}, got {r:?}"
                            );
                            assert_eq!(r.code(), expected.code());
                            assert!(!r.to_string().is_empty());
                        }
                        Ok(events) => panic!("{cmd:?} was accepted ({events:?}); expected {expected:?}"),
                    }
                    assert_eq!(h.live, before);
                }
            }
        }
        h.assert_replays();
        h
    }

    fn invalid(field: &'static str) -> Rejection {
        Rejection::Invalid { field, reason: String::new() }
    }

    /// Fails to compile when a variant is added, reminding whoever adds it to add a test below.
    fn variant(r: &Rejection) -> &'static str {
        match r {
            Rejection::NotFound => "NotFound",
            Rejection::AlreadyExists => "AlreadyExists",
            Rejection::Terminal { .. } => "Terminal",
            Rejection::IllegalTransition { .. } => "IllegalTransition",
            Rejection::StageOutOfOrder { .. } => "StageOutOfOrder",
            Rejection::NotInStage { .. } => "NotInStage",
            Rejection::ProgressDecrease { .. } => "ProgressDecrease",
            Rejection::ProgressOutOfRange { .. } => "ProgressOutOfRange",
            Rejection::StaleJob { .. } => "StaleJob",
            Rejection::AttemptsExhausted { .. } => "AttemptsExhausted",
            Rejection::NotYetScheduled { .. } => "NotYetScheduled",
            Rejection::RetryNotDue { .. } => "RetryNotDue",
            Rejection::NotFailed { .. } => "NotFailed",
            Rejection::CancelPending => "CancelPending",
            Rejection::TooManyArtifacts => "TooManyArtifacts",
            Rejection::VersionGap { .. } => "VersionGap",
            Rejection::Invalid { .. } => "Invalid",
        }
    }

    #[test]
    fn codes_are_distinct_and_stable() {
        let all = [
            Rejection::NotFound,
            Rejection::AlreadyExists,
            Rejection::Terminal { state: State::Completed },
            Rejection::IllegalTransition { from: State::Created, event: EventKind::RetryDue },
            Rejection::StageOutOfOrder { current: None, requested: Stage::Uploading },
            Rejection::NotInStage { requested: Stage::Uploading, current: None },
            Rejection::ProgressDecrease { stage: Stage::Uploading, current: 2, requested: 1 },
            Rejection::ProgressOutOfRange { percent: 101 },
            Rejection::StaleJob { active: None, got: 1 },
            Rejection::AttemptsExhausted { max_attempts: 1 },
            Rejection::NotYetScheduled { scheduled_for: T0 },
            Rejection::RetryNotDue { next_retry_at: T0 },
            Rejection::NotFailed { state: State::Created },
            Rejection::CancelPending,
            Rejection::TooManyArtifacts,
            Rejection::VersionGap { expected: 1, got: 2 },
            invalid("x"),
        ];
        let variants: std::collections::BTreeSet<_> = all.iter().map(variant).collect();
        let codes: std::collections::BTreeSet<_> = all.iter().map(Rejection::code).collect();
        assert_eq!(variants.len(), all.len());
        assert_eq!(codes.len(), all.len(), "two variants share an API error code");
    }

    #[test]
    fn not_found() {
        check(vec![start(1)], Rejection::NotFound);
        check(vec![Do(Command::RequestCancel)], Rejection::NotFound);
    }

    #[test]
    fn already_exists() {
        check(vec![create(), create()], Rejection::AlreadyExists);
        // Even once the commission is over.
        check(vec![create(), cancel(), create()], Rejection::AlreadyExists);
    }

    fn completed() -> Vec<Step> {
        with(up_to(Stage::CreatingProducts), [complete(1, "{}")])
    }

    #[test]
    fn terminal() {
        check(with(completed(), [cancel()]), Rejection::Terminal { state: State::Completed });
        check(with(completed(), [manual_retry()]), Rejection::Terminal { state: State::Completed });
        check(
            with(completed(), [progress(1, Stage::CreatingProducts, 100)]),
            Rejection::Terminal { state: State::Completed },
        );
        check(vec![create(), cancel(), start(1)], Rejection::Terminal { state: State::Cancelled });
        check(vec![create(), cancel(), cancel()], Rejection::Terminal { state: State::Cancelled });
        check(
            vec![create(), start(1), fail(1, false), start(2)],
            Rejection::Terminal { state: State::Failed },
        );
        check(
            vec![create(), start(1), fail(1, false), cancel()],
            Rejection::Terminal { state: State::Failed },
        );
    }

    #[test]
    fn illegal_transition() {
        check(
            vec![create(), retry_due()],
            Rejection::IllegalTransition { from: State::Created, event: EventKind::RetryDue },
        );
        // Completing before the last stage.
        check(
            with(up_to(Stage::Uploading), [complete(1, "{}")]),
            Rejection::IllegalTransition { from: State::Uploading, event: EventKind::Completed },
        );
        // Progress before any stage.
        check(
            vec![create(), start(1), progress(1, Stage::GeneratingIdeas, 5)],
            Rejection::IllegalTransition { from: State::Processing, event: EventKind::Progress },
        );
        // No stage after the last one.
        check(
            with(up_to(Stage::CreatingProducts), [enter(1, Stage::CreatingProducts)]),
            Rejection::IllegalTransition { from: State::CreatingProducts, event: EventKind::StageEntered },
        );
        // A retrying commission must become due before a job starts.
        check(
            vec![create(), start(1), fail(1, true), start(2)],
            Rejection::IllegalTransition { from: State::Retrying, event: EventKind::JobStarted },
        );
    }

    #[test]
    fn stage_out_of_order() {
        check(
            vec![create(), start(1), enter(1, Stage::CreatingImages)],
            Rejection::StageOutOfOrder { current: None, requested: Stage::CreatingImages },
        );
        check(
            with(up_to(Stage::CreatingImages), [enter(1, Stage::CreatingProducts)]),
            Rejection::StageOutOfOrder {
                current: Some(Stage::CreatingImages),
                requested: Stage::CreatingProducts,
            },
        );
        check(
            with(up_to(Stage::Uploading), [enter(1, Stage::GeneratingIdeas)]),
            Rejection::StageOutOfOrder { current: Some(Stage::Uploading), requested: Stage::GeneratingIdeas },
        );
        check(
            with(up_to(Stage::GeneratingIdeas), [enter(1, Stage::GeneratingIdeas)]),
            Rejection::StageOutOfOrder {
                current: Some(Stage::GeneratingIdeas),
                requested: Stage::GeneratingIdeas,
            },
        );
    }

    #[test]
    fn not_in_stage() {
        check(
            with(up_to(Stage::CreatingImages), [progress(1, Stage::GeneratingIdeas, 100)]),
            Rejection::NotInStage { requested: Stage::GeneratingIdeas, current: Some(Stage::CreatingImages) },
        );
        check(
            with(up_to(Stage::GeneratingIdeas), [artifact(1, Stage::Uploading, "image")]),
            Rejection::NotInStage { requested: Stage::Uploading, current: Some(Stage::GeneratingIdeas) },
        );
    }

    #[test]
    fn progress_decrease() {
        check(
            with(
                up_to(Stage::GeneratingIdeas),
                [progress(1, Stage::GeneratingIdeas, 40), progress(1, Stage::GeneratingIdeas, 39)],
            ),
            Rejection::ProgressDecrease { stage: Stage::GeneratingIdeas, current: 40, requested: 39 },
        );
        // Equal progress is fine (a repeated report); the next attempt starts again from zero.
        let h = check(
            with(
                up_to(Stage::GeneratingIdeas),
                [
                    progress(1, Stage::GeneratingIdeas, 40),
                    progress(1, Stage::GeneratingIdeas, 40),
                    fail(1, true),
                    Wait(1_000),
                    retry_due(),
                    start(2),
                    enter(2, Stage::GeneratingIdeas),
                    progress(2, Stage::GeneratingIdeas, 10),
                    progress(2, Stage::GeneratingIdeas, 9),
                ],
            ),
            Rejection::ProgressDecrease { stage: Stage::GeneratingIdeas, current: 10, requested: 9 },
        );
        assert_eq!(h.commission().attempt, 2);
    }

    #[test]
    fn progress_out_of_range() {
        check(
            with(up_to(Stage::Uploading), [progress(1, Stage::Uploading, 101)]),
            Rejection::ProgressOutOfRange { percent: 101 },
        );
        // Beyond u8: not wrapped around to a small number.
        check(
            with(up_to(Stage::Uploading), [progress(1, Stage::Uploading, 256 + 50)]),
            Rejection::ProgressOutOfRange { percent: 306 },
        );
        let h = check(
            with(
                up_to(Stage::Uploading),
                [progress(1, Stage::Uploading, 100), progress(1, Stage::Uploading, u32::MAX)],
            ),
            Rejection::ProgressOutOfRange { percent: u32::MAX },
        );
        assert_eq!(h.commission().stage_progress, [0, 0, 100, 0]);
    }

    #[test]
    fn stale_job() {
        check(
            with(up_to(Stage::GeneratingIdeas), [progress(2, Stage::GeneratingIdeas, 5)]),
            Rejection::StaleJob { active: Some(1), got: 2 },
        );
        check(vec![create(), start(1), start(2)], Rejection::StaleJob { active: Some(1), got: 2 });
        check(vec![create(), enter(1, Stage::GeneratingIdeas)], Rejection::StaleJob { active: None, got: 1 });
        check(vec![create(), start(1), fail(7, true)], Rejection::StaleJob { active: Some(1), got: 7 });
        // The job of a previous attempt may not report into the next one.
        check(
            vec![
                create(),
                start(1),
                fail(1, true),
                Wait(1_000),
                retry_due(),
                start(2),
                enter(1, Stage::GeneratingIdeas),
            ],
            Rejection::StaleJob { active: Some(2), got: 1 },
        );
        check(
            vec![create(), start(1), cancel(), confirm(Some(5))],
            Rejection::StaleJob { active: Some(1), got: 5 },
        );
        check(
            with(up_to(Stage::CreatingProducts), [complete(3, "{}")]),
            Rejection::StaleJob { active: Some(1), got: 3 },
        );
    }

    #[test]
    fn attempts_exhausted() {
        // `decide` never proposes an attempt over the budget, so this rule guards the log:
        // a hand-made (or damaged) log with one attempt too many is refused on replay.
        let events = [
            Event::Created {
                user_id: "u".into(),
                pipeline: "p".into(),
                priority: 0,
                scheduled_for: None,
                context: "{}".into(),
                idempotency_key: None,
                max_attempts: 1,
            },
            Event::JobStarted {
                attempt: 1,
                job_id: 1,
                executor: Executor::TaskRunner,
                job_name: "j".into(),
                pid: None,
            },
            Event::AttemptFailed { attempt: 1, error: "e".into(), retryable: true, next_retry_at: T0 },
            Event::RetryDue,
            Event::JobStarted {
                attempt: 2,
                job_id: 2,
                executor: Executor::TaskRunner,
                job_name: "j".into(),
                pid: None,
            },
        ];
        let mut c = None;
        for (i, event) in events.iter().enumerate() {
            let env = Envelope {
                seq: i as u64 + 1,
                commission_id: 1,
                version: i as u64 + 1,
                at: T0,
                event: event.clone(),
            };
            match apply(c.clone(), &env) {
                Ok(next) => c = Some(next),
                Err(r) => {
                    assert_eq!(i, 4);
                    assert_eq!(r, Rejection::AttemptsExhausted { max_attempts: 1 });
                    return;
                }
            }
        }
        panic!("the over-budget job_started was applied");
    }

    #[test]
    fn not_yet_scheduled() {
        let h = check(
            vec![create_with(|n| n.scheduled_for = Some(T0 + 60_000)), Wait(59_999), start(1)],
            Rejection::NotYetScheduled { scheduled_for: T0 + 60_000 },
        );
        assert!(!h.commission().is_runnable(h.now));
        assert!(h.commission().is_runnable(T0 + 60_000));
        // On time is fine.
        check(
            vec![create_with(|n| n.scheduled_for = Some(T0 + 60_000)), Wait(60_000), start(1), start(2)],
            Rejection::StaleJob { active: Some(1), got: 2 },
        );
    }

    #[test]
    fn retry_not_due() {
        // With base = cap = 1000 and seed 42 the delay is fixed; read it from the commission.
        let mut h = Harness::new();
        h.retry = RetryPolicy { base_ms: 1_000, cap_ms: 1_000 };
        h.ok(Command::Create(new_commission(3)));
        h.ok(start_cmd(1));
        h.ok(Command::FailAttempt { job_id: 1, error: "e".into(), retryable: true, job: None });
        let due = h.commission().next_retry_at.expect("retrying");
        assert!((T0..=T0 + 1_000).contains(&due));
        h.now = due - 1;
        assert_eq!(h.exec(Command::RetryDue), Err(Rejection::RetryNotDue { next_retry_at: due }));
        h.now = due;
        h.ok(Command::RetryDue);
        assert_eq!(h.commission().state, State::Created);
        h.assert_replays();
    }

    #[test]
    fn not_failed() {
        check(vec![create(), manual_retry()], Rejection::NotFailed { state: State::Created });
        check(
            vec![create(), start(1), fail(1, true), manual_retry()],
            Rejection::NotFailed { state: State::Retrying },
        );
        check(
            with(up_to(Stage::Uploading), [manual_retry()]),
            Rejection::NotFailed { state: State::Uploading },
        );
    }

    #[test]
    fn cancel_pending() {
        check(
            with(up_to(Stage::GeneratingIdeas), [cancel(), progress(1, Stage::GeneratingIdeas, 5)]),
            Rejection::CancelPending,
        );
        check(
            with(up_to(Stage::GeneratingIdeas), [cancel(), enter(1, Stage::CreatingImages)]),
            Rejection::CancelPending,
        );
        check(with(up_to(Stage::CreatingProducts), [cancel(), complete(1, "{}")]), Rejection::CancelPending);
        check(
            with(up_to(Stage::Uploading), [cancel(), artifact(1, Stage::Uploading, "image")]),
            Rejection::CancelPending,
        );
        // The job may end, though: confirming the cancel is accepted.
        let mut h = check(
            vec![create(), start(1), cancel(), enter(1, Stage::GeneratingIdeas)],
            Rejection::CancelPending,
        );
        let events = h.ok(Command::ConfirmCancelled { job: None });
        assert_eq!(events.len(), 2);
        assert!(
            matches!(&events[0], Event::JobFinished(end) if end.job_id == 1 && end.status == JobStatus::Killed)
        );
        assert_eq!(h.commission().state, State::Cancelled);
    }

    #[test]
    fn too_many_artifacts() {
        let mut steps = up_to(Stage::CreatingImages);
        steps.extend((0..limits::ARTIFACTS_MAX).map(|_| artifact(1, Stage::CreatingImages, "image")));
        steps.push(artifact(1, Stage::CreatingImages, "image"));
        let h = check(steps, Rejection::TooManyArtifacts);
        assert_eq!(h.commission().artifacts.len(), limits::ARTIFACTS_MAX);
    }

    #[test]
    fn version_gap() {
        let mut h = Harness::new();
        h.ok(Command::Create(new_commission(3)));
        let c = h.live.clone();
        let env = |version| Envelope {
            seq: 2,
            commission_id: COMMISSION_ID,
            version,
            at: T0,
            event: Event::CancelRequested,
        };
        assert_eq!(apply(c.clone(), &env(3)), Err(Rejection::VersionGap { expected: 2, got: 3 }));
        assert_eq!(apply(c.clone(), &env(1)), Err(Rejection::VersionGap { expected: 2, got: 1 }));
        assert!(apply(c, &env(2)).is_ok());
        let created = h.log[0].clone();
        assert_eq!(
            apply(None, &Envelope { version: 2, ..created }),
            Err(Rejection::VersionGap { expected: 1, got: 2 })
        );
    }

    #[test]
    fn invalid_fields() {
        check(vec![create_with(|n| n.user_id = String::new())], invalid("user_id"));
        check(vec![create_with(|n| n.user_id = "a/b".into())], invalid("user_id"));
        check(vec![create_with(|n| n.user_id = "a\nb".into())], invalid("user_id"));
        check(
            vec![create_with(|n| n.user_id = "u".repeat(limits::USER_ID_BYTES_MAX + 1))],
            invalid("user_id"),
        );
        check(vec![create_with(|n| n.pipeline = "Etsy".into())], invalid("pipeline"));
        check(vec![create_with(|n| n.pipeline = String::new())], invalid("pipeline"));
        check(vec![create_with(|n| n.context = "[1]".into())], invalid("context"));
        check(vec![create_with(|n| n.context = "{".into())], invalid("context"));
        check(vec![create_with(|n| n.idempotency_key = Some(String::new()))], invalid("idempotency_key"));
        check(vec![create_with(|n| n.max_attempts = 0)], invalid("max_attempts"));
        check(vec![create_with(|n| n.max_attempts = limits::ATTEMPTS_MAX + 1)], invalid("max_attempts"));
        check(with(up_to(Stage::CreatingProducts), [complete(1, "{oops")]), invalid("result"));
        check(with(up_to(Stage::Uploading), [artifact(1, Stage::Uploading, "")]), invalid("kind"));
        check(vec![create(), start(1), confirm(None)], invalid("cancel"));
        // The bounds themselves are accepted.
        let mut h = Harness::new();
        h.ok(Command::Create(NewCommission { max_attempts: limits::ATTEMPTS_MAX, ..new_commission(1) }));
    }

    #[test]
    fn long_texts_are_truncated_on_char_boundaries() {
        let mut h = check(
            vec![create(), start(1), enter(1, Stage::GeneratingIdeas), start(9)],
            Rejection::StaleJob { active: Some(1), got: 9 },
        );
        let message = "é".repeat(limits::MESSAGE_BYTES_MAX); // twice the limit in bytes
        h.ok(Command::ReportProgress {
            job_id: 1,
            stage: Stage::GeneratingIdeas,
            percent: 1,
            message: Some(message),
        });
        let kept = h.commission().message.clone().expect("a message");
        assert_eq!(kept.len(), limits::MESSAGE_BYTES_MAX);
        let error = "ü".repeat(limits::ERROR_BYTES_MAX) + "x";
        h.ok(Command::FailAttempt { job_id: 1, error, retryable: false, job: None });
        let kept = h.commission().error.clone().expect("an error");
        assert!(kept.len() <= limits::ERROR_BYTES_MAX && kept.chars().all(|c| c == 'ü'));
        h.assert_replays();
    }

    /// The whole happy path, event by event.
    #[test]
    fn happy_path_events() {
        let mut h = Harness::new();
        h.ok(Command::Create(new_commission(3)));
        h.ok(start_cmd(1));
        for stage in Stage::ALL {
            assert_eq!(h.ok(Command::EnterStage { job_id: 1, stage }), vec![Event::StageEntered { stage }]);
            h.ok(Command::ReportProgress { job_id: 1, stage, percent: 50, message: None });
        }
        let events = h.ok(Command::Complete {
            job_id: 1,
            result: r#"{"ok":true}"#.into(),
            job: Some(job_end(1, JobStatus::Succeeded)),
        });
        assert_eq!(
            events,
            vec![
                Event::JobFinished(job_end(1, JobStatus::Succeeded)),
                Event::Completed { result: r#"{"ok":true}"#.into() }
            ]
        );
        let c = h.commission();
        assert_eq!(c.state, State::Completed);
        assert_eq!(c.progress_percent(), 100);
        assert_eq!(c.stage_progress, [100; 4]);
        assert!(c.stages().iter().all(|s| s.state == "done" && s.progress_percent == 100));
        assert_eq!(h.log.iter().map(|e| e.event.kind()).filter(|k| k.is_terminal()).count(), 1);
        h.assert_replays();
    }

    #[test]
    fn repeated_cancel_is_a_no_op() {
        let mut h = check(
            vec![create(), start(1), cancel(), cancel(), manual_retry()],
            Rejection::NotFailed { state: State::Processing },
        );
        assert_eq!(h.ok(Command::RequestCancel), vec![]);
        assert_eq!(h.log.iter().filter(|e| e.event.kind() == EventKind::CancelRequested).count(), 1);
    }

    #[test]
    fn manual_retry_of_a_failed_commission() {
        let mut h = check(
            vec![
                create_with(|n| n.max_attempts = 2),
                start(1),
                fail(1, true),
                Wait(1_000),
                retry_due(),
                start(2),
                fail(2, true),
                start(3),
            ],
            Rejection::Terminal { state: State::Failed },
        );
        assert_eq!(h.ok(Command::ManualRetry), vec![Event::RetryRequested]);
        let c = h.commission();
        assert_eq!((c.state, c.attempt, c.max_attempts, c.error.as_deref()), (State::Created, 2, 4, None));
        h.ok(start_cmd(3));
        assert_eq!(h.commission().attempt, 3);
        h.assert_replays();
    }
}

// ---------------------------------------------------------------------------------------------
// Snapshots (engine/tests/snapshots/). Update with `INSTA_UPDATE=always` and review the diff.
// ---------------------------------------------------------------------------------------------

mod snapshots {
    use super::*;

    #[test]
    fn transitions_table_markdown() {
        insta::assert_snapshot!(transitions_markdown());
    }

    /// Mid-pipeline: ideas done, images at 40%, the rest pending.
    #[test]
    fn stages_view_mid_pipeline() {
        let mut h = Harness::new();
        h.ok(Command::Create(new_commission(3)));
        h.ok(start_cmd(1));
        h.ok(Command::EnterStage { job_id: 1, stage: Stage::GeneratingIdeas });
        h.ok(Command::ReportProgress {
            job_id: 1,
            stage: Stage::GeneratingIdeas,
            percent: 100,
            message: None,
        });
        h.ok(Command::EnterStage { job_id: 1, stage: Stage::CreatingImages });
        h.ok(Command::ReportProgress {
            job_id: 1,
            stage: Stage::CreatingImages,
            percent: 40,
            message: Some("image 2 of 5".into()),
        });
        let c = h.commission();
        assert_eq!(c.progress_percent(), 35);
        insta::assert_json_snapshot!(c.stages());
    }

    /// A stage left behind is complete even if it never reported 100% (a quick stage).
    #[test]
    fn a_stage_moved_past_shows_complete() {
        let mut h = Harness::new();
        h.ok(Command::Create(new_commission(3)));
        h.ok(start_cmd(1));
        h.ok(Command::EnterStage { job_id: 1, stage: Stage::GeneratingIdeas });
        h.ok(Command::ReportProgress {
            job_id: 1,
            stage: Stage::GeneratingIdeas,
            percent: 30,
            message: None,
        });
        let c = h.commission();
        assert_eq!((c.stage_percent(Stage::GeneratingIdeas), c.progress_percent()), (30, 7));
        h.ok(Command::EnterStage { job_id: 1, stage: Stage::CreatingImages });
        h.ok(Command::EnterStage { job_id: 1, stage: Stage::Uploading });
        let c = h.commission();
        let percents: Vec<u8> = c.stages().iter().map(|s| s.progress_percent).collect();
        assert_eq!(percents, [100, 100, 0, 0]);
        assert_eq!(c.progress_percent(), 50);
        // What was reported stays in the snapshot; only the view rounds a finished stage up.
        assert_eq!(c.stage_progress[Stage::GeneratingIdeas.index()], 30);
    }

    /// The view of an attempt that failed in its second stage (the last one allowed).
    #[test]
    fn stages_view_failed_mid_pipeline() {
        // Failed before any stage: every stage is still pending.
        let early = table::reach(State::Failed);
        assert!(early.stages().iter().all(|s| s.state == "pending"));
        let mut h = Harness::new();
        h.ok(Command::Create(new_commission(1)));
        h.ok(start_cmd(1));
        h.ok(Command::EnterStage { job_id: 1, stage: Stage::GeneratingIdeas });
        h.ok(Command::EnterStage { job_id: 1, stage: Stage::CreatingImages });
        h.ok(Command::FailAttempt { job_id: 1, error: "gpu lost".into(), retryable: true, job: None });
        let states: Vec<&str> = h.commission().stages().iter().map(|s| s.state).collect();
        assert_eq!(states, ["done", "failed", "pending", "pending"]);
    }
}
