//! From a parsed request to a reply, on a handler thread: the body's media type, the route
//! the table names (404 and 405 without one), the caller's token against the route's access,
//! the handler (a panic is a 500 and the server keeps running), and the request's metrics.

use std::sync::Arc;
use std::time::Instant;

use crate::auth::{Identity, TokenError};
use crate::clock::now_ms;
use crate::cookie::{self, COOKIE_NAME};
use crate::render;
use crate::reply::{error, Reply};
use crate::request::Req;
use crate::routes::call::Call;
use crate::routes::{Access, Route, ROUTES};
use crate::state::Shared;

/// Runs one request on a handler thread: the body's media type, routing, the handler (a
/// panic is a 500 and the server keeps running), metrics.
pub(crate) fn handle(req: &Req, started: Instant, shared: &Arc<Shared>) -> Reply {
    let (route, reply) = match check_media_type(req) {
        Err(reply) => ("body", reply),
        Ok(()) => {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| dispatch(req, shared)));
            match outcome {
                Ok(r) => r,
                Err(_) => {
                    tracing::error!(path = %req.path, "a handler panicked");
                    (
                        "panic",
                        error(
                            500,
                            "internal",
                            "the server hit a bug handling this request; it keeps running",
                        ),
                    )
                }
            }
        }
    };
    let status = match &reply {
        Reply::Json(s, _) | Reply::Bytes(s, ..) | Reply::Empty(s) => *s,
        Reply::Stream(_) | Reply::Backup(_) => 200,
    };
    shared.metrics.request(route, status, started.elapsed().as_secs_f64());
    reply
}

/// A body must be JSON (its size was checked while reading it).
fn check_media_type(req: &Req) -> Result<(), Reply> {
    if !req.body.is_empty() {
        let ctype = req.header("content-type").unwrap_or("");
        let mime = ctype.split(';').next().unwrap_or("").trim();
        if !mime.eq_ignore_ascii_case("application/json") {
            return Err(error(
                415,
                "unsupported_media_type",
                format!("send JSON with Content-Type: application/json (got '{ctype}')"),
            ));
        }
    }
    Ok(())
}

/// Matches a path against a pattern, returning its `{...}` parameters.
fn matches<'a>(pattern: &str, path: &'a str) -> Option<Vec<&'a str>> {
    let mut params = Vec::new();
    let mut p = pattern.split('/');
    let mut s = path.split('/');
    loop {
        match (p.next(), s.next()) {
            (None, None) => return Some(params),
            (Some(pp), Some(ss)) if pp.starts_with('{') => {
                if ss.is_empty() {
                    return None;
                }
                params.push(ss);
            }
            (Some(pp), Some(ss)) if pp == ss => {}
            _ => return None,
        }
    }
}

/// The route for a method and path, the path's parameters, or the methods the path allows.
pub(crate) fn find<'a>(
    method: &str,
    path: &'a str,
) -> Result<(&'static Route, Vec<&'a str>), Vec<&'static str>> {
    // Literal segments win over parameters: patterns with fewer parameters are tried first.
    // The order is worked out once, not on every request.
    static CANDIDATES: std::sync::LazyLock<Vec<&'static Route>> = std::sync::LazyLock::new(|| {
        let mut v: Vec<&'static Route> = ROUTES.iter().collect();
        v.sort_by_key(|r| r.path.matches('{').count());
        v
    });
    let mut allowed = Vec::new();
    for &route in CANDIDATES.iter() {
        if let Some(params) = matches(route.path, path) {
            if route.method == method || (method == "HEAD" && route.method == "GET") {
                return Ok((route, params));
            }
            allowed.push(route.method);
        }
    }
    Err(allowed)
}

/// Routes a request: 404 or 405 without a route, then the route's access check, then its
/// handler. Answers the route's name too, the label of its metrics.
pub(crate) fn dispatch(req: &Req, shared: &Arc<Shared>) -> (&'static str, Reply) {
    let (route, params) = match find(&req.method, &req.path) {
        Ok(found) => found,
        Err(allowed) if allowed.is_empty() => {
            return ("unknown", error(404, "not_found", format!("no route for {}", req.path)));
        }
        Err(mut allowed) => {
            allowed.sort();
            allowed.dedup();
            let allow = allowed.join(", ");
            let body = render::error(
                "method_not_allowed",
                &format!("{} is not allowed here; use {allow}", req.method),
            );
            let bytes = serde_json::to_vec(&body).expect("invariant: JSON serializes");
            return ("method", Reply::Bytes(405, "application/json", bytes, vec![("Allow", allow)]));
        }
    };
    let open_by_config = route.name == "metrics" && shared.config.metrics_public;
    let who = match route.access {
        Access::Public => authenticate(req, shared).ok(),
        Access::User | Access::Admin => match authenticate(req, shared) {
            Ok(id) => Some(id),
            Err(_) if open_by_config => None,
            Err(reply) => return (route.name, reply),
        },
    };
    if route.access == Access::Admin && !who.as_ref().is_some_and(Identity::is_admin) && !open_by_config {
        return (route.name, error(403, "forbidden", "this needs an admin token"));
    }
    // Fair shares: a user's requests come out of their bucket (admins are exempt), checked
    // before the handler runs, so a refused request changes nothing.
    if let Some(id) = who.as_ref().filter(|id| route.access != Access::Public && !id.is_admin()) {
        if let Err(beyond) = shared.config.shares.take_request(&id.user_id, Instant::now()) {
            return (route.name, beyond.reply());
        }
    }
    let call = Call { req, params: &params, who: who.as_ref(), shared };
    let reply = match (route.handler)(&call) {
        Ok(reply) => reply,
        Err(e) => {
            tracing::error!(error = %e, route = route.name, "storage failure");
            error(503, "storage_unavailable", e.to_string())
        }
    };
    (route.name, reply)
}

/// How a request carried its token: the cookie alone authorizes less (see `cookie`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Carrier {
    Bearer,
    Cookie,
    /// `?access_token=`, on streams only (an EventSource cannot send headers).
    Query,
}

pub(crate) fn token_of(req: &Req, allow_query: bool) -> Option<(String, Carrier)> {
    if let Some(h) = req.header("authorization") {
        let t = h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")).unwrap_or(h).trim();
        return Some((t.to_string(), Carrier::Bearer));
    }
    if let Some(c) = req.cookie(COOKIE_NAME) {
        return Some((c.to_string(), Carrier::Cookie));
    }
    if allow_query {
        return req.query("access_token").map(|t| (t.to_string(), Carrier::Query));
    }
    None
}

fn authenticate(req: &Req, shared: &Shared) -> Result<Identity, Reply> {
    let sse = req.path.ends_with("/stream");
    let (token, carrier) = token_of(req, sse).ok_or_else(|| {
        error(
            401,
            "unauthorized",
            "send a token: Authorization: Bearer T (or the atelier_token cookie; ?access_token= on streams)",
        )
    })?;
    let who = shared
        .keys
        .verify(&token, now_ms() / 1000)
        .map_err(|e: TokenError| error(401, "unauthorized", e.to_string()))?;
    if carrier == Carrier::Cookie && !cookie::reads_only(&req.method) {
        cookie::check_own_page(req, shared.config.scheme())?;
    }
    Ok(who)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn router_prefers_literal_segments_and_reports_allowed_methods() {
        assert_eq!(find("GET", "/api/commissions/user/alice").unwrap().0.name, "list_user");
        assert_eq!(find("GET", "/api/commissions/12").unwrap().0.name, "get_commission");
        assert_eq!(find("GET", "/api/commissions/user/alice/stream").unwrap().0.name, "stream_user");
        assert_eq!(find("DELETE", "/api/commissions/12").unwrap_err(), vec!["GET"]);
        assert!(find("GET", "/nope").unwrap_err().is_empty());
        assert!(find("GET", "/api/commissions/").is_err());
    }
}
