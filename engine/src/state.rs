//! Commission states and pipeline stages.

use serde::{Deserialize, Serialize};

/// Where a commission is in its life. `Completed`, `Failed` and `Cancelled` are terminal.
///
/// The declaration order is also the on-disk variant index (bincode): only append new variants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Queued: waiting for an executor to start a job.
    Created,
    /// A job has started but has not entered its first stage yet.
    Processing,
    GeneratingIdeas,
    CreatingImages,
    Uploading,
    CreatingProducts,
    Completed,
    Failed,
    /// An attempt failed with a retryable error; waiting for its backoff to run out.
    Retrying,
    Cancelled,
}

impl State {
    pub const ALL: [State; 10] = [
        State::Created,
        State::Processing,
        State::GeneratingIdeas,
        State::CreatingImages,
        State::Uploading,
        State::CreatingProducts,
        State::Completed,
        State::Failed,
        State::Retrying,
        State::Cancelled,
    ];

    pub fn is_terminal(self) -> bool {
        matches!(self, State::Completed | State::Failed | State::Cancelled)
    }

    /// A job is active exactly while the commission is in one of these states.
    pub fn is_running(self) -> bool {
        matches!(self, State::Processing) || self.stage().is_some()
    }

    pub fn stage(self) -> Option<Stage> {
        match self {
            State::GeneratingIdeas => Some(Stage::GeneratingIdeas),
            State::CreatingImages => Some(Stage::CreatingImages),
            State::Uploading => Some(Stage::Uploading),
            State::CreatingProducts => Some(Stage::CreatingProducts),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            State::Created => "created",
            State::Processing => "processing",
            State::GeneratingIdeas => "generating_ideas",
            State::CreatingImages => "creating_images",
            State::Uploading => "uploading",
            State::CreatingProducts => "creating_products",
            State::Completed => "completed",
            State::Failed => "failed",
            State::Retrying => "retrying",
            State::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        State::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The four stages of every pipeline, run in declaration order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    GeneratingIdeas,
    CreatingImages,
    Uploading,
    CreatingProducts,
}

impl Stage {
    pub const ALL: [Stage; 4] =
        [Stage::GeneratingIdeas, Stage::CreatingImages, Stage::Uploading, Stage::CreatingProducts];
    pub const FIRST: Stage = Stage::GeneratingIdeas;
    pub const LAST: Stage = Stage::CreatingProducts;

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn next(self) -> Option<Stage> {
        Stage::ALL.get(self.index() + 1).copied()
    }

    pub fn state(self) -> State {
        match self {
            Stage::GeneratingIdeas => State::GeneratingIdeas,
            Stage::CreatingImages => State::CreatingImages,
            Stage::Uploading => State::Uploading,
            Stage::CreatingProducts => State::CreatingProducts,
        }
    }

    pub fn as_str(self) -> &'static str {
        self.state().as_str()
    }

    pub fn parse(s: &str) -> Option<Stage> {
        Stage::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
