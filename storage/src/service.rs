//! Decide-then-append with optimistic concurrency: what every writer of commands uses.

use atelier_engine::{decide, Command, Commission, Ctx, NewCommission, Rejection};

use crate::error::StorageError;
use crate::event_store::{AppendOutcome, AppendRequest, AppendTarget, EventStore};

/// Times a command is decided again after losing a version race before giving up.
pub const CONFLICT_RETRIES_MAX: usize = 64;

#[derive(Clone, Debug)]
pub enum Created {
    New(Commission),
    /// The idempotency key was used before; this is the first commission.
    Existing(Commission),
}

pub fn create(
    store: &dyn EventStore,
    new: NewCommission,
    ctx: &Ctx,
) -> Result<Result<Created, Rejection>, StorageError> {
    let idempotency = new.idempotency_key.clone().map(|k| (new.user_id.clone(), k));
    let events = match decide(None, Command::Create(new), ctx) {
        Ok(e) => e,
        Err(r) => return Ok(Err(r)),
    };
    let req =
        AppendRequest { target: AppendTarget::New { idempotency }, expected_version: 0, events, at: ctx.now };
    Ok(match store.append(req)? {
        AppendOutcome::Appended { commission, .. } => Ok(Created::New(commission)),
        AppendOutcome::Duplicate { commission } => Ok(Created::Existing(commission)),
        AppendOutcome::Rejected(r) => Err(r),
        AppendOutcome::Conflict { .. } => Err(Rejection::AlreadyExists),
    })
}

/// Runs `cmd` against commission `id`: decide on the current snapshot, append at its version,
/// and decide again if another writer got there first.
pub fn execute(
    store: &dyn EventStore,
    id: u64,
    cmd: Command,
    ctx: &Ctx,
) -> Result<Result<Commission, Rejection>, StorageError> {
    for _ in 0..CONFLICT_RETRIES_MAX {
        let Some(current) = store.commission(id)? else {
            return Ok(Err(Rejection::NotFound));
        };
        let events = match decide(Some(&current), cmd.clone(), ctx) {
            Ok(e) => e,
            Err(r) => return Ok(Err(r)),
        };
        if events.is_empty() {
            return Ok(Ok(current));
        }
        let req = AppendRequest {
            target: AppendTarget::Existing(id),
            expected_version: current.version,
            events,
            at: ctx.now,
        };
        match store.append(req)? {
            AppendOutcome::Appended { commission, .. } => return Ok(Ok(commission)),
            AppendOutcome::Conflict { .. } => continue,
            AppendOutcome::Rejected(r) => return Ok(Err(r)),
            AppendOutcome::Duplicate { commission } => return Ok(Ok(commission)),
        }
    }
    Err(StorageError::Contention { commission: id })
}
