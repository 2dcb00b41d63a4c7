//! The commission snapshot: the projection of one commission's events.

use serde::{Deserialize, Serialize};

use crate::state::{Stage, State};
use crate::time::Millis;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    pub stage: Stage,
    pub kind: String,
    pub uri: String,
}

/// One commission as the log says it is now. Built only by [`crate::apply`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commission {
    pub id: u64,
    pub user_id: String,
    pub pipeline: String,
    /// Higher runs first.
    pub priority: i32,
    pub scheduled_for: Option<Millis>,
    /// A JSON object, as text.
    pub context: String,
    pub idempotency_key: Option<String>,
    /// Attempts allowed in total; a manual retry raises it by `attempt_budget`.
    pub max_attempts: u32,
    /// The `max_attempts` asked for at creation.
    pub attempt_budget: u32,
    /// Attempts started so far (the current one included).
    pub attempt: u32,
    pub state: State,
    /// The stage most recently entered in the current (or last) attempt.
    pub stage: Option<Stage>,
    /// Percent done of each stage, indexed by [`Stage::index`].
    pub stage_progress: [u8; 4],
    pub message: Option<String>,
    pub error: Option<String>,
    /// A JSON value, as text.
    pub result: Option<String>,
    pub artifacts: Vec<Artifact>,
    /// The one job allowed to report for this commission, if any.
    pub active_job: Option<u64>,
    pub cancel_requested: bool,
    pub next_retry_at: Option<Millis>,
    pub created_at: Millis,
    pub updated_at: Millis,
    /// Number of events applied; the optimistic-concurrency token.
    pub version: u64,
    /// Global sequence number of the last event applied.
    pub last_seq: u64,
}

/// How one stage looks from outside.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StageView {
    pub name: Stage,
    /// pending, running, done, failed or cancelled.
    pub state: &'static str,
    pub progress_percent: u8,
}

impl Commission {
    /// Overall percent: each stage weighs a quarter; a completed commission is 100.
    pub fn progress_percent(&self) -> u8 {
        if self.state == State::Completed {
            return 100;
        }
        let sum: u32 = Stage::ALL.iter().map(|&s| u32::from(self.stage_percent(s))).sum();
        u8::try_from(sum / 4).expect("invariant: each stage is at most 100")
    }

    /// A stage's percent as shown: the reported one, except that a stage the commission has
    /// moved past is complete (stages only move forward once finished, and a quick stage may
    /// never report its 100) and every stage of a completed commission is.
    pub fn stage_percent(&self, stage: Stage) -> u8 {
        match self.stage {
            _ if self.state == State::Completed => 100,
            Some(cur) if stage < cur => 100,
            _ => self.stage_progress[stage.index()],
        }
    }

    pub fn stages(&self) -> Vec<StageView> {
        Stage::ALL
            .iter()
            .map(|&stage| {
                let state = match (self.state, self.stage) {
                    (State::Completed, _) => "done",
                    (_, Some(cur)) if stage < cur => "done",
                    (s, Some(cur)) if stage == cur => match s {
                        State::Failed => "failed",
                        State::Cancelled => "cancelled",
                        s if s.is_running() => "running",
                        _ => "pending",
                    },
                    _ => "pending",
                };
                StageView { name: stage, state, progress_percent: self.stage_percent(stage) }
            })
            .collect()
    }

    /// Runnable now by an executor: queued and not scheduled for later.
    pub fn is_runnable(&self, now: Millis) -> bool {
        self.state == State::Created && self.scheduled_for.is_none_or(|t| t <= now)
    }
}
