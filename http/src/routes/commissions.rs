//! The commission routes: create, read, cancel, retry, a commission's jobs, a user's list;
//! and the helpers every route on a commission uses (who may see it, what a rejection answers).

use atelier_engine::{time, Command, Commission, Ctx, NewCommission, Rejection, RetryPolicy, State};
use atelier_storage::{execute, Created, ListQuery, StorageError, LIST_LIMIT_MAX};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde_json::Value;

use super::call::{tri, Call};
use super::input::{json_body, json_int, json_uint, parse_id};
use crate::auth::Identity;
use crate::clock::now_ms;
use crate::render;
use crate::reply::{error, Reply};
use crate::request::percent_decode;
use crate::state::Shared;

/// Page size of a listing without `?limit=`; the largest allowed is storage's.
const LIST_LIMIT_DEFAULT: usize = 20;

const CREATE_FIELDS: &[&str] =
    &["context", "pipeline", "priority", "scheduled_for", "max_attempts", "idempotency_key", "user_id"];

/// Creates a commission (201), or answers with the one a repeated idempotency key made (200).
pub(super) fn create(call: &Call<'_>) -> Result<Reply, StorageError> {
    let shared = call.shared;
    let body = tri!(json_body(call.req));
    let new = tri!(new_commission(&body, call.me(), shared));
    tri!(within_active_share(call)?);
    let started = std::time::Instant::now();
    let out = atelier_storage::create(&*shared.store, new, &ctx())?;
    shared.metrics.append_duration.observe(started.elapsed().as_secs_f64());
    Ok(match out {
        Ok(Created::New(c)) => {
            shared.metrics.events_appended.inc();
            shared.config.shares.saw(c.id, &c.user_id, c.last_seq, c.state);
            Reply::Json(201, render::snapshot(&c))
        }
        Ok(Created::Existing(c)) => Reply::Json(200, render::snapshot(&c)),
        Err(r) => rejection(r),
    })
}

/// The commission a create request's body describes, or the 400 (403 for another user's
/// commission asked by a non-admin) that says what is wrong with it.
fn new_commission(body: &Value, who: &Identity, shared: &Shared) -> Result<NewCommission, Reply> {
    let Value::Object(fields) = body else {
        return Err(error(400, "bad_json", "the body must be a JSON object"));
    };
    if let Some(unknown) = fields.keys().find(|k| !CREATE_FIELDS.contains(&k.as_str())) {
        return Err(error(
            400,
            "invalid_field",
            format!("{unknown}: unknown field (expected one of {})", CREATE_FIELDS.join(", ")),
        ));
    }
    let context = match fields.get("context") {
        Some(v @ Value::Object(_)) => v.to_string(),
        Some(_) => return Err(error(400, "invalid_field", "context: must be a JSON object")),
        None => return Err(error(400, "invalid_field", "context: required (a JSON object)")),
    };
    let str_field = |name: &str| -> Result<Option<String>, Reply> {
        match fields.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(error(400, "invalid_field", format!("{name}: must be a string"))),
        }
    };
    let pipeline = str_field("pipeline")?.unwrap_or_else(|| shared.config.default_pipeline.clone());
    if let Some(ex) = &shared.executors {
        if !ex.pipeline_exists(&pipeline) {
            return Err(error(400, "invalid_field", format!("pipeline: no pipeline named '{pipeline}'")));
        }
    }
    let priority = match fields.get("priority") {
        None | Some(Value::Null) => 0,
        Some(v) => match json_int(v).and_then(|p| i32::try_from(p).ok()) {
            Some(p) => p,
            None => {
                return Err(error(400, "invalid_field", "priority: must be an integer (higher runs first)"))
            }
        },
    };
    if !who.is_admin() {
        shared.config.shares.check_priority(priority).map_err(|e| error(400, "invalid_field", e))?;
    }
    let max_attempts = match fields.get("max_attempts") {
        None | Some(Value::Null) => atelier_engine::limits::ATTEMPTS_DEFAULT,
        Some(v) => match json_uint(v).and_then(|p| u32::try_from(p).ok()) {
            Some(p) => p,
            None => return Err(error(400, "invalid_field", "max_attempts: must be a positive integer")),
        },
    };
    let scheduled_for = match str_field("scheduled_for")? {
        None => None,
        Some(s) => match time::parse_rfc3339(&s) {
            Some(t) => Some(t),
            None => {
                return Err(error(
                    400,
                    "invalid_field",
                    format!("scheduled_for: '{s}' is not an RFC 3339 time"),
                ))
            }
        },
    };
    let user_id = match str_field("user_id")? {
        Some(u) if u != who.user_id && !who.is_admin() => {
            return Err(error(
                403,
                "forbidden",
                "user_id: only an admin may create commissions for another user",
            ));
        }
        Some(u) => u,
        None => who.user_id.clone(),
    };
    Ok(NewCommission {
        user_id,
        pipeline,
        priority,
        scheduled_for,
        context,
        idempotency_key: str_field("idempotency_key")?,
        max_attempts,
    })
}

pub(super) fn get(call: &Call<'_>) -> Result<Reply, StorageError> {
    let id = tri!(parse_id(call.params[0], "task id"));
    Ok(Reply::Json(200, render::snapshot(&tri!(visible(call.shared, call.me(), id)?))))
}

pub(super) fn cancel(call: &Call<'_>) -> Result<Reply, StorageError> {
    command(call, Command::RequestCancel)
}

/// A retry makes a failed commission active again: it counts against the caller's share.
pub(super) fn retry(call: &Call<'_>) -> Result<Reply, StorageError> {
    tri!(within_active_share(call)?);
    command(call, Command::ManualRetry)
}

/// Whether the caller may have one more active commission (an admin always may); the 429
/// otherwise.
fn within_active_share(call: &Call<'_>) -> Result<Result<(), Reply>, StorageError> {
    let who = call.me();
    if who.is_admin() {
        return Ok(Ok(()));
    }
    let shared = call.shared.clone();
    let stopping: Arc<dyn Fn() -> bool + Send + Sync> =
        Arc::new(move || shared.shutting_down.load(Ordering::SeqCst));
    let shares = &call.shared.config.shares;
    Ok(shares.check_active(&who.user_id, &call.shared.store, &stopping)?.map_err(|b| b.reply()))
}

/// Runs a caller's command on the commission the path names; a refusal is its rejection.
fn command(call: &Call<'_>, cmd: Command) -> Result<Reply, StorageError> {
    let shared = call.shared;
    let id = tri!(parse_id(call.params[0], "task id"));
    tri!(visible(shared, call.me(), id)?);
    let started = std::time::Instant::now();
    Ok(match execute(&*shared.store, id, cmd, &ctx())? {
        Ok(c) => {
            shared.metrics.append_duration.observe(started.elapsed().as_secs_f64());
            shared.config.shares.saw(c.id, &c.user_id, c.last_seq, c.state);
            Reply::Json(200, render::snapshot(&c))
        }
        Err(r) => rejection(r),
    })
}

pub(super) fn jobs(call: &Call<'_>) -> Result<Reply, StorageError> {
    let id = tri!(parse_id(call.params[0], "task id"));
    tri!(visible(call.shared, call.me(), id)?);
    Ok(Reply::Json(200, render::jobs(&call.shared.store.jobs_of(id)?)))
}

/// A user's commissions, newest first, a page at a time.
pub(super) fn list_user(call: &Call<'_>) -> Result<Reply, StorageError> {
    let user = percent_decode(call.params[0]);
    let limit = match call.req.query("limit") {
        None => LIST_LIMIT_DEFAULT,
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=LIST_LIMIT_MAX).contains(&n) => n,
            _ => return Ok(error(400, "invalid_field", format!("limit: must be 1..={LIST_LIMIT_MAX}"))),
        },
    };
    let cursor = match call.req.query("cursor") {
        None | Some("") => None,
        Some(c) => Some(tri!(parse_id(c, "cursor"))),
    };
    let state = match call.req.query("state") {
        None | Some("") => None,
        Some(s) => match State::parse(s) {
            Some(s) => Some(s),
            None => return Ok(error(400, "invalid_field", format!("state: unknown state '{s}'"))),
        },
    };
    // The query is checked first, so that a bad one is refused whoever's list it asks for.
    if !call.me().may_access(&user) {
        // Another user's list is as empty as an unknown user's.
        return Ok(Reply::Json(200, render::list_page(&[], None)));
    }
    let page = call.shared.store.list_user(&user, &ListQuery { limit, cursor, state })?;
    Ok(Reply::Json(200, render::list_page(&page.items, page.next_cursor)))
}

/// The engine's context for a command decided now.
pub(super) fn ctx() -> Ctx {
    let now = now_ms();
    Ctx { now, jitter_seed: now as u64, retry: RetryPolicy::default() }
}

/// The answer to a command the engine refused.
pub(super) fn rejection(r: Rejection) -> Reply {
    match r {
        Rejection::NotFound => error(404, "not_found", "no such commission"),
        Rejection::Invalid { field, reason } => error(400, "invalid_field", format!("{field}: {reason}")),
        other => error(409, other.code(), other.to_string()),
    }
}

/// Loads a commission the caller may see; another user's is 404, as if it did not exist.
pub(super) fn visible(
    shared: &Shared,
    who: &Identity,
    id: u64,
) -> Result<Result<Commission, Reply>, StorageError> {
    Ok(match shared.store.commission(id)? {
        Some(c) if who.may_access(&c.user_id) => Ok(c),
        _ => Err(error(404, "not_found", format!("no commission {id}"))),
    })
}

#[cfg(test)]
mod tests {
    use super::CREATE_FIELDS;

    /// The handler checks the create body by hand, to name the field that is wrong; the
    /// document describes it from `render::CreateCommission`. Both know the same fields.
    #[test]
    fn create_reads_the_fields_the_document_describes() {
        let schema = schemars::schema_for!(crate::render::CreateCommission);
        let mut documented: Vec<&str> =
            schema.as_value()["properties"].as_object().unwrap().keys().map(String::as_str).collect();
        let mut read = CREATE_FIELDS.to_vec();
        documented.sort_unstable();
        read.sort_unstable();
        assert_eq!(documented, read);
    }
}
