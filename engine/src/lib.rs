//! The pure core of Atelier: the commission state machine.
//!
//! Everything here is deterministic: no I/O, no clock, no randomness. Time, ids and the jitter
//! seed come in as arguments, which is what makes replaying the event log rebuild exactly the
//! same state, and what makes the property tests cheap.
//!
//! The two entry points are [`decide`] (command + state → events or a typed rejection) and
//! [`apply`] (state + event → state). Both consult the one transition table, [`TRANSITIONS`].

mod commission;
mod event;
#[doc(hidden)]
pub mod fixtures;
mod job;
pub mod limits;
mod machine;
pub mod retry;
mod state;
pub mod time;

pub use commission::{Artifact, Commission, StageView};
pub use event::{Envelope, Event, EventKind, Executor, JobEnd, JobStatus};
pub use job::{apply_job, Job};
pub use machine::{
    apply, decide, transition, transitions_markdown, Allowed, Command, Ctx, NewCommission, Rejection, Target,
    TRANSITIONS,
};
pub use retry::RetryPolicy;
pub use state::{Stage, State};
