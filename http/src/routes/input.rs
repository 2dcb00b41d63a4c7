//! The handlers' checks of what a request carries (ids, JSON bodies, Last-Event-ID): pure
//! functions of the request, so the fuzz target runs them without a store.

use serde_json::Value;

use crate::reply::{error, Reply};
use crate::request::Req;

pub(crate) fn parse_id(s: &str, what: &str) -> Result<u64, Reply> {
    s.parse::<u64>()
        .map_err(|_| error(400, "bad_id", format!("{what} must be a positive integer, got '{s}'")))
}

pub(crate) fn last_event_id(req: &Req) -> Result<Option<u64>, Reply> {
    let raw = req.header("last-event-id").or_else(|| req.query("last_event_id"));
    match raw.map(str::trim) {
        None | Some("") => Ok(None),
        Some(v) => v.parse::<u64>().map(Some).map_err(|_| {
            error(400, "invalid_field", format!("Last-Event-ID: must be an event id (an integer), got '{v}'"))
        }),
    }
}

pub(crate) fn json_body(req: &Req) -> Result<Value, Reply> {
    if req.body.is_empty() {
        return Err(error(400, "bad_json", "a JSON body is required"));
    }
    serde_json::from_slice(&req.body)
        .map_err(|e| error(400, "bad_json", format!("the body is not valid JSON: {e}")))
}
