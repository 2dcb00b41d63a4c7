//! What the scheduler thread hears: log events (from the feed), rescans, jobs that ended
//! (from the executors) and shutdown. Apart from the scheduler so the feed can speak it
//! without importing the scheduler.

use atelier_engine::time::Millis;
use atelier_engine::EventKind;

/// Messages to the scheduler thread.
pub(super) enum SchedMsg {
    Event {
        commission_id: u64,
        kind: EventKind,
        next_retry_at: Option<Millis>,
    },
    /// Look at every live commission again (at start, and after the feed lost events).
    Rescan,
    /// A job's code is done; `panicked`: it ended in a panic (a bug), so its end may not be
    /// on record.
    JobDone {
        commission_id: u64,
        panicked: bool,
    },
    Shutdown,
}
