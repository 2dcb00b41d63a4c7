//! How every backend decides an append on top of a commission's current state, so that
//! sled and PostgreSQL answer `Conflict`, `Rejected` and `Appended` by the same rules: the
//! expected version first, then a non-empty batch, then every event folded through
//! `engine::apply` (all or nothing).

use atelier_engine::{apply, Commission, Envelope, Rejection, State};

use crate::event_store::{AppendOutcome, AppendRequest};
use crate::subscribe::ViewAfter;

/// One event of an accepted append, and how it moved its commission.
pub(crate) struct Folded {
    pub(crate) env: Envelope,
    pub(crate) before: Option<State>,
    /// The commission right after the event.
    pub(crate) view: ViewAfter,
}

/// Why an append is refused with nothing staged: its outcome, without a commission.
pub(crate) enum Refused {
    Conflict { current_version: u64 },
    Rejected(Rejection),
}

impl From<Refused> for AppendOutcome {
    fn from(r: Refused) -> AppendOutcome {
        match r {
            Refused::Conflict { current_version } => AppendOutcome::Conflict { current_version },
            Refused::Rejected(r) => AppendOutcome::Rejected(r),
        }
    }
}

/// The commission after the append and its events (seqs from `first_seq`, versions after the
/// current one), or the outcome that refuses it with nothing staged.
pub(crate) fn fold_append(
    current: Option<Commission>,
    commission_id: u64,
    req: &AppendRequest,
    first_seq: u64,
) -> Result<(Commission, Vec<Folded>), Refused> {
    let current_version = current.as_ref().map_or(0, |c| c.version);
    if current_version != req.expected_version {
        return Err(Refused::Conflict { current_version });
    }
    if req.events.is_empty() {
        return Err(Refused::Rejected(Rejection::Invalid {
            field: "events",
            reason: "nothing to append".into(),
        }));
    }
    let mut folded = Vec::with_capacity(req.events.len());
    let mut c = current;
    for (i, event) in (0u64..).zip(&req.events) {
        let env = Envelope {
            seq: first_seq + i,
            commission_id,
            version: current_version + 1 + i,
            at: req.at,
            event: event.clone(),
        };
        let before = c.as_ref().map(|c| c.state);
        let next = apply(c.take(), &env).map_err(Refused::Rejected)?;
        folded.push(Folded { env, before, view: ViewAfter::of(&next) });
        c = Some(next);
    }
    Ok((c.expect("invariant: at least one event was folded"), folded))
}
