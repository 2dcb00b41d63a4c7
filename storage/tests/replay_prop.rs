//! Model-based property test of the store. Random, mostly valid command sequences over several
//! commissions run against the store and against a model kept in the test's memory: the pure
//! engine (`decide`, `apply`) over the model's own snapshots, with the store's rules written
//! out independently (ids and seqs assigned in order, versions checked, idempotency keys
//! answered with the first commission, an append folded all or nothing). Every append's
//! outcome (appended with which seqs, duplicate, conflict, or refused with which rejection)
//! and every snapshot, history and log read must match the model. Restarts come clean (close
//! and reopen) and dirty: a child process (this test binary again) makes the next appends
//! and is SIGKILLed as soon as they are acknowledged, before its projections are written
//! back. `replay_check` must be clean after every restart.
//!
//! A failing case prints its ops; proptest keeps its seed in
//! storage/tests/replay_prop.proptest-regressions and replays it first next time. More cases:
//! ATELIER_PROPTEST_CASES=2000.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command as Proc, Stdio};
use std::sync::Arc;

use atelier_engine::{
    apply, decide, Command, Commission, Envelope, Event, Executor, Rejection, Stage, State,
};
use atelier_storage::{
    check, AppendOutcome, AppendRequest, AppendTarget, EventStore, SledStore, StoreConfig,
};
use common::*;
use proptest::prelude::*;

const CHILD_ENV: &str = "ATELIER_PROP_CHILD_DIR";

#[derive(Clone, Debug)]
enum Op {
    Create {
        user: u8,
        key: Option<u8>,
    },
    /// One of the commands that move commission `c` on from where it is (`choice` picks).
    Advance {
        c: u8,
        choice: u8,
    },
    /// Any command, whatever the state: mostly refused.
    Random {
        c: u8,
        cmd: RandomCmd,
    },
    /// The events last accepted for `c`, appended again at its current version: the store
    /// must accept or refuse them exactly as the engine's fold does.
    Repeat {
        c: u8,
    },
    /// A valid append at a version that is no longer current: a conflict, nothing written.
    Stale {
        c: u8,
        choice: u8,
    },
    Restart,
    /// Like `Advance`, made by a child process that is SIGKILLed once it is acknowledged.
    DirtyRestart {
        c: u8,
        choice: u8,
    },
}

#[derive(Clone, Debug)]
enum RandomCmd {
    Start,
    Stage { stage: u8 },
    Progress { stage: u8, percent: u8 },
    Complete,
    Fail { retryable: bool },
    RetryDue,
    Cancel,
    ConfirmCancel,
    ManualRetry,
}

fn random_cmd() -> impl Strategy<Value = RandomCmd> {
    prop_oneof![
        Just(RandomCmd::Start),
        (0u8..4).prop_map(|stage| RandomCmd::Stage { stage }),
        (0u8..4, 0u8..=110).prop_map(|(stage, percent)| RandomCmd::Progress { stage, percent }),
        Just(RandomCmd::Complete),
        any::<bool>().prop_map(|retryable| RandomCmd::Fail { retryable }),
        Just(RandomCmd::RetryDue),
        Just(RandomCmd::Cancel),
        Just(RandomCmd::ConfirmCancel),
        Just(RandomCmd::ManualRetry),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..3, proptest::option::of(0u8..3)).prop_map(|(user, key)| Op::Create { user, key }),
        16 => (any::<u8>(), any::<u8>()).prop_map(|(c, choice)| Op::Advance { c, choice }),
        3 => (any::<u8>(), random_cmd()).prop_map(|(c, cmd)| Op::Random { c, cmd }),
        1 => any::<u8>().prop_map(|c| Op::Repeat { c }),
        1 => (any::<u8>(), any::<u8>()).prop_map(|(c, choice)| Op::Stale { c, choice }),
        1 => Just(Op::Restart),
        1 => (any::<u8>(), any::<u8>()).prop_map(|(c, choice)| Op::DirtyRestart { c, choice }),
    ]
}

fn cases() -> u32 {
    std::env::var("ATELIER_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48)
}

/// What the store must hold: the engine's fold of every accepted append, kept apart from it.
#[derive(Default)]
struct Model {
    commissions: BTreeMap<u64, Commission>,
    /// Every accepted event, in seq order.
    log: Vec<Envelope>,
    last_accepted: HashMap<u64, Vec<Event>>,
    idempotency: HashMap<(String, String), u64>,
    next_id: u64,
    next_job: u64,
}

/// What an append must come to.
#[derive(Debug, PartialEq)]
enum Outcome {
    Appended { commission: Commission, first_seq: u64, last_seq: u64 },
    Duplicate(Commission),
    Conflict(u64),
    Rejected(Rejection),
}

impl From<AppendOutcome> for Outcome {
    fn from(o: AppendOutcome) -> Outcome {
        match o {
            AppendOutcome::Appended { commission, first_seq, last_seq } => {
                Outcome::Appended { commission, first_seq, last_seq }
            }
            AppendOutcome::Duplicate { commission } => Outcome::Duplicate(commission),
            AppendOutcome::Conflict { current_version } => Outcome::Conflict(current_version),
            AppendOutcome::Rejected(r) => Outcome::Rejected(r),
        }
    }
}

impl Model {
    fn new() -> Model {
        Model { next_id: 1, next_job: 1, ..Model::default() }
    }

    /// The outcome the store owes `req`; an accepted append is recorded.
    fn append(&mut self, req: &AppendRequest) -> Outcome {
        let head = self.log.len() as u64;
        let (cid, current) = match &req.target {
            AppendTarget::Existing(id) => (*id, self.commissions.get(id).cloned()),
            AppendTarget::New { idempotency } => {
                if let Some(id) = idempotency.as_ref().and_then(|k| self.idempotency.get(k)) {
                    return Outcome::Duplicate(self.commissions[id].clone());
                }
                (self.next_id, None)
            }
        };
        let version = current.as_ref().map_or(0, |c| c.version);
        if version != req.expected_version {
            return Outcome::Conflict(version);
        }
        let mut c = current;
        let mut envs = Vec::new();
        for (i, event) in (1u64..).zip(&req.events) {
            let env = Envelope {
                seq: head + i,
                commission_id: cid,
                version: version + i,
                at: req.at,
                event: event.clone(),
            };
            match apply(c, &env) {
                Ok(next) => c = Some(next),
                Err(r) => return Outcome::Rejected(r),
            }
            envs.push(env);
        }
        let commission = c.expect("the model appends at least one event");
        if let AppendTarget::New { idempotency } = &req.target {
            self.next_id += 1;
            if let Some(k) = idempotency {
                self.idempotency.insert(k.clone(), cid);
            }
        }
        self.log.extend(envs);
        self.last_accepted.insert(cid, req.events.clone());
        self.commissions.insert(cid, commission.clone());
        Outcome::Appended { commission, first_seq: head + 1, last_seq: self.log.len() as u64 }
    }

    fn pick(&self, c: u8) -> Option<u64> {
        let n = self.commissions.len();
        (n > 0).then(|| *self.commissions.keys().nth(usize::from(c) % n).expect("in range"))
    }

    fn fresh_job(&mut self) -> u64 {
        self.next_job += 1;
        self.next_job
    }

    /// A command that moves `c` on from its state (most are accepted).
    fn advance(&mut self, id: u64, choice: u8) -> Command {
        let c = &self.commissions[&id];
        let job_id = c.active_job.unwrap_or(0);
        if c.cancel_requested && choice.is_multiple_of(2) {
            return Command::ConfirmCancelled { job: None };
        }
        match (c.state, c.state.stage()) {
            (State::Created, _) => self.start(),
            (State::Processing, _) => Command::EnterStage { job_id, stage: Stage::ALL[0] },
            (_, Some(stage)) => {
                let i = stage.index();
                let percent = u32::from(c.stage_progress[i]);
                match choice % 10 {
                    0..=3 if i + 1 < Stage::ALL.len() => {
                        Command::EnterStage { job_id, stage: Stage::ALL[i + 1] }
                    }
                    0..=3 => Command::Complete { job_id, result: r#"{"ok":true}"#.into(), job: None },
                    4..=6 => Command::ReportProgress {
                        job_id,
                        stage,
                        percent: (percent + u32::from(choice % 40)).min(100),
                        message: Some("on".into()),
                    },
                    7 => Command::FailAttempt { job_id, error: "x".into(), retryable: true, job: None },
                    8 => Command::FailAttempt { job_id, error: "x".into(), retryable: false, job: None },
                    _ => Command::RequestCancel,
                }
            }
            (State::Retrying, _) => Command::RetryDue,
            (State::Failed, _) => Command::ManualRetry,
            _ => Command::RequestCancel,
        }
    }

    fn start(&mut self) -> Command {
        Command::StartJob {
            job_id: self.fresh_job(),
            executor: Executor::JobController,
            job_name: "p".into(),
            pid: Some(1),
        }
    }

    fn random(&mut self, id: u64, cmd: &RandomCmd) -> Command {
        let job_id = self.commissions[&id].active_job.unwrap_or(0);
        let stage = |s: u8| Stage::ALL[usize::from(s)];
        match cmd {
            RandomCmd::Start => self.start(),
            RandomCmd::Stage { stage: s } => Command::EnterStage { job_id, stage: stage(*s) },
            RandomCmd::Progress { stage: s, percent } => Command::ReportProgress {
                job_id,
                stage: stage(*s),
                percent: u32::from(*percent),
                message: None,
            },
            RandomCmd::Complete => Command::Complete { job_id, result: "{}".into(), job: None },
            RandomCmd::Fail { retryable } => {
                Command::FailAttempt { job_id, error: "x".into(), retryable: *retryable, job: None }
            }
            RandomCmd::RetryDue => Command::RetryDue,
            RandomCmd::Cancel => Command::RequestCancel,
            RandomCmd::ConfirmCancel => Command::ConfirmCancelled { job: None },
            RandomCmd::ManualRetry => Command::ManualRetry,
        }
    }
}

/// Counts that the coverage guard reads.
#[derive(Default)]
struct Stats {
    commands: u32,
    /// Of `commands`.
    accepted_commands: u32,
    /// Appends of any kind.
    accepted: u32,
    rejected: u32,
    conflicts: u32,
    dirty_restarts: u32,
    states: BTreeSet<State>,
}

/// The store's answer to one append, against the model's.
fn append(
    store: &SledStore,
    m: &mut Model,
    req: AppendRequest,
    stats: &mut Stats,
) -> Result<(), TestCaseError> {
    let expected = m.append(&req);
    let got = Outcome::from(store.append(req.clone()).expect("no storage failure"));
    match &got {
        Outcome::Appended { commission, .. } => {
            stats.accepted += 1;
            stats.states.insert(commission.state);
        }
        Outcome::Rejected(_) => stats.rejected += 1,
        Outcome::Conflict(_) => stats.conflicts += 1,
        Outcome::Duplicate(_) => {}
    }
    prop_assert_eq!(got, expected, "{:?}", req);
    Ok(())
}

/// The request a command comes to when decided on the model's snapshot, or its rejection.
fn decided(m: &Model, id: u64, cmd: Command, now: i64) -> Result<Option<AppendRequest>, Rejection> {
    let current = &m.commissions[&id];
    let events = decide(Some(current), cmd, &ctx(now))?;
    Ok((!events.is_empty()).then_some(AppendRequest {
        target: AppendTarget::Existing(id),
        expected_version: current.version,
        events,
        at: now,
    }))
}

/// Decides `cmd` on the model; the store must refuse what the engine refuses (through
/// `execute`, which decides on the store's own snapshot) and append what it accepts.
fn command(
    store: &SledStore,
    m: &mut Model,
    id: u64,
    cmd: Command,
    now: i64,
    stats: &mut Stats,
) -> Result<(), TestCaseError> {
    stats.commands += 1;
    match decided(m, id, cmd.clone(), now) {
        Ok(Some(req)) => {
            let before = stats.accepted;
            append(store, m, req, stats)?;
            stats.accepted_commands += stats.accepted - before;
            Ok(())
        }
        Ok(None) => {
            let got =
                atelier_storage::execute(store, id, cmd.clone(), &ctx(now)).expect("no storage failure");
            prop_assert_eq!(got.ok(), m.commissions.get(&id).cloned(), "{:?} changes nothing", cmd);
            Ok(())
        }
        Err(want) => {
            stats.rejected += 1;
            let got =
                atelier_storage::execute(store, id, cmd.clone(), &ctx(now)).expect("no storage failure");
            prop_assert_eq!(got.err(), Some(want), "{:?}", cmd);
            Ok(())
        }
    }
}

/// Every read the store offers agrees with the model.
fn assert_matches(store: &SledStore, m: &Model, full: bool) -> Result<(), TestCaseError> {
    for (id, c) in &m.commissions {
        prop_assert_eq!(store.commission(*id).unwrap(), Some(c.clone()), "commission {}", id);
    }
    prop_assert_eq!(store.head_seq(), m.log.len() as u64);
    if full {
        for id in m.commissions.keys() {
            let want: Vec<&Envelope> = m.log.iter().filter(|e| e.commission_id == *id).collect();
            let got = store.events_of(*id).unwrap();
            prop_assert_eq!(got.iter().collect::<Vec<_>>(), want, "history of {}", id);
        }
        prop_assert_eq!(&store.read_log(0, usize::MAX).unwrap(), &m.log);
        let report = check::replay_check(store).unwrap();
        prop_assert!(report.diff.is_empty(), "{:?}", report.diff);
    }
    Ok(())
}

/// One dirty restart's appends, handed to the child: (commission, expected version, events, at).
type ChildAppend = (u64, u64, Vec<Event>, i64);

/// Child mode: opens the store, makes the appends read from stdin (one JSON line), prints each
/// outcome, then waits to be killed.
#[test]
fn dirty_restart_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else { return };
    let store = SledStore::open(StoreConfig::new(&dir)).expect("the child opens the store");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).expect("read the appends");
    let appends: Vec<ChildAppend> = serde_json::from_str(&line).expect("the appends as JSON");
    let mut out = std::io::stdout();
    // The test harness has printed "test dirty_restart_child ... " without a newline.
    writeln!(out).expect("write to the parent");
    for (id, expected_version, events, at) in appends {
        let req = AppendRequest { target: AppendTarget::Existing(id), expected_version, events, at };
        match store.append(req).expect("the child appends") {
            AppendOutcome::Appended { first_seq, last_seq, .. } => {
                writeln!(out, "APPENDED {first_seq} {last_seq}")
            }
            other => writeln!(out, "NOT APPENDED {other:?}"),
        }
        .expect("write to the parent");
    }
    writeln!(out, "DONE").expect("write to the parent");
    out.flush().expect("write to the parent");
    std::thread::sleep(std::time::Duration::from_secs(60));
}

/// Makes `appends` in a child process and SIGKILLs it once they are acknowledged; returns
/// what it printed for each.
fn in_killed_child(dir: &std::path::Path, appends: &[ChildAppend]) -> Vec<String> {
    let mut child = Proc::new(std::env::current_exe().unwrap())
        .args(["--exact", "dirty_restart_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "{}", serde_json::to_string(appends).unwrap()).unwrap();
    let mut lines = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if line == "DONE" {
            break;
        }
        if line.contains("APPENDED") {
            lines.push(line);
        }
    }
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let status = child.wait().unwrap();
    let mut errors = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut errors).unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL), "the child ended on its own ({status}): {errors}");
    lines
}

/// Runs one at a time. A child forked by one test thread holds a copy of every descriptor
/// the process has until its exec, the other thread's store lock included, and a store
/// reopened in that window would be refused as locked by this very process.
static ONE_RUN_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

// Long because it is the whole model-based run: one arm per op, each checking the store.
fn run(ops: Vec<Op>) -> Result<Stats, TestCaseError> {
    let _one = ONE_RUN_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = temp_dir("prop");
    let mut store: Arc<SledStore> = SledStore::open(StoreConfig::new(dir.path())).unwrap();
    let mut m = Model::new();
    let mut stats = Stats::default();
    let mut now = 1_000i64;
    for op in ops {
        now += 1_000;
        match op {
            Op::Create { user, key } => {
                let mut new = new_commission(&format!("u{user}"), None);
                new.idempotency_key = key.map(|k| format!("k{k}"));
                let idempotency = new.idempotency_key.clone().map(|k| (new.user_id.clone(), k));
                let events = decide(None, Command::Create(new), &ctx(now)).expect("a valid create");
                let req = AppendRequest {
                    target: AppendTarget::New { idempotency },
                    expected_version: 0,
                    events,
                    at: now,
                };
                append(&store, &mut m, req, &mut stats)?;
            }
            Op::Advance { c, choice } => {
                let Some(id) = m.pick(c) else { continue };
                if m.commissions[&id].state == State::Retrying {
                    now += 400_000; // past any backoff
                }
                let cmd = m.advance(id, choice);
                command(&store, &mut m, id, cmd, now, &mut stats)?;
            }
            Op::Random { c, cmd } => {
                let Some(id) = m.pick(c) else { continue };
                let cmd = m.random(id, &cmd);
                command(&store, &mut m, id, cmd, now, &mut stats)?;
            }
            Op::Repeat { c } => {
                let Some(id) = m.pick(c) else { continue };
                let Some(events) = m.last_accepted.get(&id).cloned() else { continue };
                let req = AppendRequest {
                    target: AppendTarget::Existing(id),
                    expected_version: m.commissions[&id].version,
                    events,
                    at: now,
                };
                append(&store, &mut m, req, &mut stats)?;
            }
            Op::Stale { c, choice } => {
                let Some(id) = m.pick(c) else { continue };
                let cmd = m.advance(id, choice);
                let Ok(Some(mut req)) = decided(&m, id, cmd, now) else { continue };
                if req.expected_version == 0 {
                    continue;
                }
                req.expected_version -= 1;
                append(&store, &mut m, req, &mut stats)?;
            }
            Op::Restart => {
                store.close();
                drop(store);
                store = SledStore::open(StoreConfig::new(dir.path())).unwrap();
                assert_matches(&store, &m, true)?;
            }
            Op::DirtyRestart { c, choice } => {
                stats.dirty_restarts += 1;
                store.close();
                drop(store);
                let mut appends = Vec::new();
                let mut want = Vec::new();
                if let Some(id) = m.pick(c) {
                    let cmd = m.advance(id, choice);
                    if let Ok(Some(req)) = decided(&m, id, cmd, now) {
                        appends.push((id, req.expected_version, req.events.clone(), req.at));
                        match m.append(&req) {
                            Outcome::Appended { first_seq, last_seq, .. } => {
                                stats.accepted += 1;
                                want.push(format!("APPENDED {first_seq} {last_seq}"));
                            }
                            other => want.push(format!("NOT APPENDED {other:?}")),
                        }
                    }
                }
                let got = in_killed_child(dir.path(), &appends);
                store = SledStore::open(StoreConfig::new(dir.path())).unwrap();
                if want.iter().any(|w| w.starts_with("NOT")) {
                    // The model refused: the child must have too (its text is the store's).
                    prop_assert!(got.iter().all(|g| g.starts_with("NOT")), "{:?}", got);
                } else {
                    prop_assert_eq!(got, want);
                }
                assert_matches(&store, &m, true)?;
            }
        }
        assert_matches(&store, &m, false)?;
    }
    assert_matches(&store, &m, true)?;
    Ok(stats)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn store_agrees_with_the_model_across_clean_and_dirty_restarts(ops in proptest::collection::vec(op(), 1..60)) {
        if std::env::var(CHILD_ENV).is_ok() {
            return Ok(());
        }
        run(ops)?;
    }
}

/// The generator is not so random that it never gets anywhere: over a fixed batch of
/// histories, most commands are accepted, every state is reached, and refusals, conflicts
/// and dirty restarts all happen (otherwise the property above proves little).
#[test]
fn generated_histories_reach_every_state() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let mut runner = TestRunner::deterministic();
    let mut all = Stats::default();
    for _ in 0..24 {
        let ops = proptest::collection::vec(op(), 30..60).new_tree(&mut runner).expect("ops").current();
        let s = run(ops).unwrap_or_else(|e| panic!("{e}"));
        all.commands += s.commands;
        all.accepted_commands += s.accepted_commands;
        all.rejected += s.rejected;
        all.conflicts += s.conflicts;
        all.dirty_restarts += s.dirty_restarts;
        all.states.extend(s.states);
    }
    // Shown with --nocapture, and when the guard fails.
    eprintln!(
        "coverage: {} of {} commands accepted, {} refused, {} conflicts, {} dirty restarts",
        all.accepted_commands, all.commands, all.rejected, all.conflicts, all.dirty_restarts
    );
    let missing: Vec<State> = State::ALL.into_iter().filter(|s| !all.states.contains(s)).collect();
    assert!(missing.is_empty(), "the generator never reaches {missing:?}");
    assert!(
        all.accepted_commands * 2 > all.commands,
        "mostly valid histories: {} of {} commands accepted",
        all.accepted_commands,
        all.commands
    );
    assert!(
        all.rejected > 0 && all.conflicts > 0 && all.dirty_restarts > 0,
        "rejected {}, conflicts {}, dirty restarts {}",
        all.rejected,
        all.conflicts,
        all.dirty_restarts
    );
}
