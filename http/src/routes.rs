//! The route table, authentication, and dispatch. The table is data: each entry names its
//! handler, and the router, the OpenAPI document and its test all read it. The handlers live
//! in the folder beside this file, one file per area of the API; they import from this file,
//! and this file knows them only through the table.

use std::sync::Arc;

use atelier_storage::StorageError;
use serde_json::{json, Value};

use crate::auth::{Identity, TokenError};
use crate::{error, now_ms, render, Reply, Req, Shared};

/// Ends a handler with the reply carried by an `Err` (an input or access check that failed),
/// keeping `?` for storage failures.
macro_rules! tri {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(reply) => return Ok(reply),
        }
    };
}

mod commissions;
mod input;
mod jobs;
mod ops;
mod pages;
mod streams;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Public,
    User,
    Admin,
}

/// What a handler is given: the request, its path's `{...}` parameters in order, the caller
/// (always there on `User` and `Admin` routes, but for `/metrics` made public) and the server.
pub(crate) struct Call<'a> {
    pub req: &'a Req,
    pub params: &'a [&'a str],
    pub who: Option<&'a Identity>,
    pub shared: &'a Arc<Shared>,
}

impl Call<'_> {
    /// The caller of a route that needs a token.
    pub fn me(&self) -> &Identity {
        self.who.expect("invariant: authenticated routes have an identity")
    }
}

/// A route's handler. `Err` is a storage failure (503); every other outcome is a reply.
pub(crate) type Handler = fn(&Call<'_>) -> Result<Reply, StorageError>;

#[derive(Clone, Copy, Debug)]
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    pub name: &'static str,
    pub access: Access,
    pub summary: &'static str,
    pub(crate) handler: Handler,
}

const fn r(
    method: &'static str,
    path: &'static str,
    name: &'static str,
    access: Access,
    summary: &'static str,
    handler: Handler,
) -> Route {
    Route { method, path, name, access, summary, handler }
}

pub const ROUTES: &[Route] = &[
    r(
        "POST",
        "/api/commissions",
        "create_commission",
        Access::User,
        "Create a commission (201; 200 with the first one for a repeated idempotency_key)",
        commissions::create,
    ),
    r(
        "GET",
        "/api/commissions/{id}",
        "get_commission",
        Access::User,
        "A commission's snapshot",
        commissions::get,
    ),
    r(
        "GET",
        "/api/progress/{id}/status",
        "get_status",
        Access::User,
        "A commission's snapshot (alias)",
        commissions::get,
    ),
    r(
        "POST",
        "/api/commissions/{id}/cancel",
        "cancel",
        Access::User,
        "Cancel (409 if terminal)",
        commissions::cancel,
    ),
    r(
        "POST",
        "/api/commissions/{id}/retry",
        "retry",
        Access::User,
        "Retry a failed commission (409 unless failed)",
        commissions::retry,
    ),
    r(
        "GET",
        "/api/commissions/{id}/jobs",
        "commission_jobs",
        Access::User,
        "A commission's job records",
        commissions::jobs,
    ),
    r(
        "GET",
        "/api/commissions/user/{user}",
        "list_user",
        Access::User,
        "A user's commissions, newest first: ?limit= (max 200), ?cursor=, ?state=",
        commissions::list_user,
    ),
    r(
        "GET",
        "/api/progress/{id}/stream",
        "stream_commission",
        Access::User,
        "SSE of one commission's events; ends after a terminal event",
        streams::commission,
    ),
    r(
        "GET",
        "/api/commissions/user/{user}/stream",
        "stream_user",
        Access::User,
        "SSE of all a user's commissions",
        streams::user,
    ),
    r("GET", "/api/events/stream", "stream_all", Access::Admin, "SSE of every event (admin)", streams::all),
    r(
        "POST",
        "/api/jobs/create",
        "create_job",
        Access::Admin,
        "Queue a job for a commission now: a queued one, one waiting on its backoff, or a failed one (admin)",
        jobs::create,
    ),
    r("GET", "/api/jobs/{id}/status", "job_status", Access::User, "A job record", jobs::status),
    r(
        "GET",
        "/api/jobs/{id}/logs",
        "job_logs",
        Access::User,
        "A job's captured stdout and stderr",
        jobs::logs,
    ),
    r("GET", "/api/me", "me", Access::User, "Who the token belongs to", ops::me),
    r("GET", "/healthz", "healthz", Access::Public, "The process is up", ops::healthz),
    r(
        "GET",
        "/readyz",
        "readyz",
        Access::Public,
        "The store is open and the job controller running",
        ops::readyz,
    ),
    r(
        "GET",
        "/metrics",
        "metrics",
        Access::Admin,
        "Prometheus metrics (public with ATELIER_METRICS_PUBLIC=1)",
        ops::metrics,
    ),
    r("GET", "/api/openapi.json", "openapi", Access::Public, "This API as OpenAPI 3.1", ops::openapi),
    r("GET", "/", "page_index", Access::Public, "The status page (?token= signs in)", pages::index),
    r("GET", "/commissions/{id}", "page_commission", Access::Public, "The progress view", pages::commission),
    r("GET", "/assets/{file}", "asset", Access::Public, "Page assets", pages::asset),
    r(
        "GET",
        "/artifacts/{file}",
        "artifact",
        Access::Public,
        "Content-addressed artifacts (PNG)",
        pages::artifact,
    ),
];

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

fn token_of(req: &Req, allow_query: bool) -> Option<String> {
    if let Some(h) = req.header("authorization") {
        return Some(
            h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")).unwrap_or(h).trim().to_string(),
        );
    }
    if let Some(c) = req.cookie("atelier_token") {
        return Some(c.to_string());
    }
    if allow_query {
        return req.query("access_token").map(str::to_string);
    }
    None
}

fn authenticate(req: &Req, shared: &Shared) -> Result<Identity, Reply> {
    let sse = req.path.ends_with("/stream");
    let token = token_of(req, sse).ok_or_else(|| {
        error(
            401,
            "unauthorized",
            "send a token: Authorization: Bearer T (or the atelier_token cookie; ?access_token= on streams)",
        )
    })?;
    shared
        .keys
        .verify(&token, now_ms() / 1000)
        .map_err(|e: TokenError| error(401, "unauthorized", e.to_string()))
}

/// Runs the pure input checks of the handlers (no store needed) for the fuzz target.
pub(crate) fn fuzz_inputs(req: &Req) {
    let _ = input::last_event_id(req);
    let _ = input::json_body(req);
    let _ = token_of(req, true);
    if let Ok((_, params)) = find(&req.method, &req.path) {
        for p in params {
            let _ = input::parse_id(p, "id");
            let _ = crate::percent_decode(p);
        }
    }
}

/// The OpenAPI 3.1 document, generated from [`ROUTES`].
pub fn openapi() -> Value {
    let mut paths = serde_json::Map::new();
    for route in ROUTES {
        let entry = paths.entry(route.path.to_string()).or_insert_with(|| json!({}));
        let params: Vec<Value> = route
            .path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        let security = match route.access {
            Access::Public => json!([]),
            _ => json!([{"bearer": []}, {"cookie": []}]),
        };
        entry[route.method.to_ascii_lowercase()] = json!({
            "operationId": route.name,
            "summary": route.summary,
            "parameters": params,
            "security": security,
            "responses": {"default": {"description": "JSON; errors are {\"error\":{\"code\",\"message\"}}"}},
        });
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Atelier", "version": env!("CARGO_PKG_VERSION")},
        "components": {"securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
            "cookie": {"type": "apiKey", "in": "cookie", "name": "atelier_token"},
        }},
        "paths": paths,
    })
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

    #[test]
    fn openapi_documents_every_route_and_nothing_else() {
        let doc = openapi();
        let paths = doc["paths"].as_object().unwrap();
        let mut documented = Vec::new();
        for (path, ops) in paths {
            for method in ops.as_object().unwrap().keys() {
                documented.push(format!("{} {path}", method.to_ascii_uppercase()));
                // Every documented operation is routed (with a sample parameter value).
                let sample = path
                    .split('/')
                    .map(|s| if s.starts_with('{') { "1" } else { s })
                    .collect::<Vec<_>>()
                    .join("/");
                assert!(
                    find(&method.to_ascii_uppercase(), &sample).is_ok(),
                    "{method} {path} is documented but not routed"
                );
            }
        }
        assert_eq!(documented.len(), ROUTES.len());
    }
}
