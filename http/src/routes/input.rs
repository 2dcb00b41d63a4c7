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

/// A JSON number that is an integer, as JSON Schema counts them: `3` and `3.0` alike (some
/// clients write every number as a float).
pub(crate) fn json_int(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| {
        v.as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= i64::MIN as f64 && *f < i64::MAX as f64)
            .map(|f| f as i64)
    })
}

/// A JSON number that is a non-negative integer (see [`json_int`]).
pub(crate) fn json_uint(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| {
        v.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < u64::MAX as f64).map(|f| f as u64)
    })
}

pub(crate) fn json_body(req: &Req) -> Result<Value, Reply> {
    if req.body.is_empty() {
        return Err(error(400, "bad_json", "a JSON body is required"));
    }
    serde_json::from_slice(&req.body)
        .map_err(|e| error(400, "bad_json", format!("the body is not valid JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn integers_may_be_written_as_floats() {
        assert_eq!(json_int(&json!(-3)), Some(-3));
        assert_eq!(json_int(&json!(69.0)), Some(69));
        assert_eq!(json_int(&json!(69.5)), None);
        assert_eq!(json_int(&json!(1e300)), None);
        assert_eq!(json_int(&json!("3")), None);
        assert_eq!(json_uint(&json!(618020.0)), Some(618020));
        assert_eq!(json_uint(&json!(u64::MAX)), Some(u64::MAX));
        assert_eq!(json_uint(&json!(-1.0)), None);
        assert_eq!(json_uint(&json!(1e20)), None);
    }

    /// serde_json's default float parsing can land an ULP off: `3944749944345138.0` read as
    /// `…137.5`, which is no integer, and a schema-valid id was refused. The workspace turns on
    /// `float_roundtrip`.
    #[test]
    fn integral_floats_are_read_exactly() {
        let v: Value = serde_json::from_str("3944749944345138.0").unwrap();
        assert_eq!(json_uint(&v), Some(3_944_749_944_345_138));
        let v: Value = serde_json::from_str("9007199254740992.0").unwrap();
        assert_eq!(json_int(&v), Some(9_007_199_254_740_992));
    }
}
