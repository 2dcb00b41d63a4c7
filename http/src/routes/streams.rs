//! The Server-Sent Events routes: one commission's events, a user's, or every event (admin).
//! Each resumes after Last-Event-ID; `sse` runs the stream once it is open.

use atelier_storage::{Filter, StorageError};

use super::call::{tri, Call};
use super::commissions::visible;
use super::input::{last_event_id, parse_id};
use crate::reply::{error, Reply};
use crate::request::percent_decode;
use crate::sse::{self, OpenError, StreamSpec};

/// One commission's events; the stream ends after its terminal event, and a client that has
/// seen that event already is answered 204 so it stops reconnecting.
pub(super) fn commission(call: &Call<'_>) -> Result<Reply, StorageError> {
    let after = tri!(last_event_id(call.req));
    let id = tri!(parse_id(call.params[0], "task id"));
    let c = tri!(visible(call.shared, call.me(), id)?);
    if c.state.is_terminal() && after.is_some_and(|a| a >= c.last_seq) {
        return Ok(Reply::Empty(204));
    }
    Ok(open(call, Filter::Commission(id), after, true))
}

pub(super) fn user(call: &Call<'_>) -> Result<Reply, StorageError> {
    let after = tri!(last_event_id(call.req));
    let user = percent_decode(call.params[0]);
    if !call.me().may_access(&user) {
        return Ok(error(404, "not_found", format!("no user {user}")));
    }
    Ok(open(call, Filter::User(user), after, false))
}

pub(super) fn all(call: &Call<'_>) -> Result<Reply, StorageError> {
    let after = tri!(last_event_id(call.req));
    Ok(open(call, Filter::All, after, false))
}

/// Subscribed, with its first history read, here on the handler thread (see `sse::open`). A
/// user's stream holds one of their share of streams while it runs (an admin's holds none).
fn open(call: &Call<'_>, filter: Filter, after: Option<u64>, end_on_terminal: bool) -> Reply {
    let who = call.me();
    let ticket = match who.is_admin() {
        true => None,
        false => match call.shared.config.shares.take_stream(&who.user_id) {
            Ok(ticket) => Some(ticket),
            Err(beyond) => return beyond.reply(),
        },
    };
    let spec = StreamSpec { filter, after: after.unwrap_or(0), end_on_terminal, ticket };
    match sse::open(spec, call.shared) {
        Ok(opened) => Reply::Stream(Box::new(opened)),
        Err(OpenError::Storage(e)) => error(500, "storage", e.to_string()),
        Err(OpenError::ShuttingDown) => error(503, "shutting_down", "the server is stopping"),
    }
}
