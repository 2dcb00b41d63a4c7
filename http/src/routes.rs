//! The route table. The table is data: each entry names its handler, and the router (in
//! `dispatch`), the OpenAPI document and its test all read it. The handlers live in the folder
//! beside this file, one file per area of the API; what they share with the table (the call a
//! handler is given, its signature) lives in `call`, so that they never import from this file,
//! which knows them only through the table. The route serving the OpenAPI document is here,
//! beside the table it describes, for the same reason.

use atelier_storage::StorageError;
use serde_json::{json, Value};

use crate::reply::Reply;
use call::{Call, Handler};

pub(crate) mod call;
mod commissions;
pub(crate) mod input;
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
    r("GET", "/api/openapi.json", "openapi", Access::Public, "This API as OpenAPI 3.1", serve_openapi),
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

fn serve_openapi(_: &Call<'_>) -> Result<Reply, StorageError> {
    Ok(Reply::Json(200, openapi()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::find;

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
