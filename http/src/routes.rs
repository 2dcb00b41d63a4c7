//! The route table. The table is data: each entry names its handler and says what the route
//! reads and answers (query parameters, body, a response per status), and the router (in
//! `dispatch`), the OpenAPI document and its tests all read it. The document's schemas are
//! derived from the types `render` builds every body from, so the two cannot drift. The handlers live in the folder
//! beside this file, one file per area of the API; what they share with the table (the call a
//! handler is given, its signature) lives in `call`, so that they never import from this file,
//! which knows them only through the table. The route serving the OpenAPI document is here,
//! beside the table it describes, for the same reason.

use atelier_engine::State;
use atelier_storage::{StorageError, LIST_LIMIT_MAX};
use schemars::generate::SchemaSettings;
use schemars::SchemaGenerator;
use serde_json::{json, Map, Value};

use crate::render;
use crate::reply::Reply;
use call::{Call, Handler};

pub(crate) mod call;
mod commissions;
pub(crate) mod input;
mod jobs;
mod ops;
mod pages;
mod streams;
mod worker_files;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Public,
    User,
    Admin,
}

/// What a request or a response carries, for the document: each JSON one is a type in
/// `render`, whose schema is derived from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    Snapshot,
    ListPage,
    JobList,
    Job,
    JobLogs,
    JobQueued,
    Me,
    /// The nodes sharing the log.
    Cluster,
    Error,
    CreateCommission,
    QueueJob,
    SignIn,
    /// `{"status":"ok"}`.
    Health,
    /// The store, the job controller and the log's head.
    Ready,
    /// This document.
    OpenApi,
    /// Server-Sent Events whose `data:` is an `EventData`.
    Events,
    Html,
    /// A script or a style sheet.
    Asset,
    Png,
    /// Prometheus' text exposition.
    Metrics,
    /// The log as JSON lines (`atelier export`'s format), chunked.
    Backup,
    /// No body (204, and the sign-in's 303).
    Empty,
}

/// A query parameter (or, for `LastEventId`, a header) a route reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Query {
    Limit,
    Cursor,
    State,
    /// The `Last-Event-ID` header, or `?last_event_id=` where a client cannot set headers.
    LastEventId,
    /// `?token=` on the status page: signs in.
    Token,
}

#[derive(Clone, Copy, Debug)]
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    pub name: &'static str,
    pub access: Access,
    pub summary: &'static str,
    pub query: &'static [Query],
    /// The JSON body the route requires, if any.
    pub body: Option<Body>,
    /// Each status the route itself answers and what with; the document adds those every
    /// route shares (401/403 by access, 400/413/415 for a body, 503 over capacity).
    pub responses: &'static [(u16, Body)],
    /// Whether the handler parses the path's `{id}` as an integer (the pages take any text).
    pub typed_path: bool,
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
    Route {
        method,
        path,
        name,
        access,
        summary,
        query: &[],
        body: None,
        responses: &[],
        typed_path: true,
        handler,
    }
}

impl Route {
    const fn answers(self, responses: &'static [(u16, Body)]) -> Route {
        Route { responses, ..self }
    }

    const fn reads(self, query: &'static [Query]) -> Route {
        Route { query, ..self }
    }

    const fn takes(self, body: Body) -> Route {
        Route { body: Some(body), ..self }
    }

    const fn untyped_path(self) -> Route {
        Route { typed_path: false, ..self }
    }
}

pub const ROUTES: &[Route] = &[
    r(
        "POST",
        "/api/commissions",
        "create_commission",
        Access::User,
        "Create a commission (201; 200 with the first one for a repeated idempotency_key)",
        commissions::create,
    )
    .takes(Body::CreateCommission)
    .answers(&[(201, Body::Snapshot), (200, Body::Snapshot), (403, Body::Error), (409, Body::Error)]),
    r(
        "GET",
        "/api/commissions/{id}",
        "get_commission",
        Access::User,
        "A commission's snapshot",
        commissions::get,
    )
    .answers(&[(200, Body::Snapshot), (400, Body::Error), (404, Body::Error)]),
    r(
        "GET",
        "/api/progress/{id}/status",
        "get_status",
        Access::User,
        "A commission's snapshot (alias)",
        commissions::get,
    )
    .answers(&[(200, Body::Snapshot), (400, Body::Error), (404, Body::Error)]),
    r(
        "POST",
        "/api/commissions/{id}/cancel",
        "cancel",
        Access::User,
        "Cancel (409 if terminal)",
        commissions::cancel,
    )
    .answers(&[(200, Body::Snapshot), (400, Body::Error), (404, Body::Error), (409, Body::Error)]),
    r(
        "POST",
        "/api/commissions/{id}/retry",
        "retry",
        Access::User,
        "Retry a failed commission (409 unless failed)",
        commissions::retry,
    )
    .answers(&[(200, Body::Snapshot), (400, Body::Error), (404, Body::Error), (409, Body::Error)]),
    r(
        "GET",
        "/api/commissions/{id}/jobs",
        "commission_jobs",
        Access::User,
        "A commission's job records",
        commissions::jobs,
    )
    .answers(&[(200, Body::JobList), (400, Body::Error), (404, Body::Error)]),
    r(
        "GET",
        "/api/commissions/user/{user}",
        "list_user",
        Access::User,
        "A user's commissions, newest first: ?limit= (max 200), ?cursor=, ?state=",
        commissions::list_user,
    )
    .reads(&[Query::Limit, Query::Cursor, Query::State])
    .answers(&[(200, Body::ListPage), (400, Body::Error)]),
    r(
        "GET",
        "/api/progress/{id}/stream",
        "stream_commission",
        Access::User,
        "SSE of one commission's events; ends after a terminal event",
        streams::commission,
    )
    .reads(&[Query::LastEventId])
    .answers(&[
        (200, Body::Events),
        (204, Body::Empty),
        (400, Body::Error),
        (404, Body::Error),
        (500, Body::Error),
    ]),
    r(
        "GET",
        "/api/commissions/user/{user}/stream",
        "stream_user",
        Access::User,
        "SSE of all a user's commissions",
        streams::user,
    )
    .reads(&[Query::LastEventId])
    .answers(&[(200, Body::Events), (400, Body::Error), (404, Body::Error), (500, Body::Error)]),
    r("GET", "/api/events/stream", "stream_all", Access::Admin, "SSE of every event (admin)", streams::all)
        .reads(&[Query::LastEventId])
        .answers(&[(200, Body::Events), (400, Body::Error), (500, Body::Error)]),
    r(
        "POST",
        "/api/jobs/create",
        "create_job",
        Access::Admin,
        "Queue a job for a commission now: a queued one, one waiting on its backoff, or a failed one (admin)",
        jobs::create,
    )
    .takes(Body::QueueJob)
    .answers(&[(201, Body::JobQueued), (404, Body::Error), (409, Body::Error)]),
    r("GET", "/api/jobs/{id}/status", "job_status", Access::User, "A job record", jobs::status).answers(&[
        (200, Body::Job),
        (400, Body::Error),
        (404, Body::Error),
    ]),
    r(
        "GET",
        "/api/jobs/{id}/logs",
        "job_logs",
        Access::User,
        "A job's captured stdout and stderr",
        jobs::logs,
    )
    .answers(&[(200, Body::JobLogs), (400, Body::Error), (404, Body::Error), (410, Body::Error)]),
    r("GET", "/api/me", "me", Access::User, "Who the token belongs to", ops::me).answers(&[(200, Body::Me)]),
    r("GET", "/healthz", "healthz", Access::Public, "The process is up", ops::healthz)
        .answers(&[(200, Body::Health)]),
    r(
        "GET",
        "/readyz",
        "readyz",
        Access::Public,
        "The store is open and the job controller running",
        ops::readyz,
    )
    .answers(&[(200, Body::Ready), (503, Body::Ready)]),
    r(
        "GET",
        "/metrics",
        "metrics",
        Access::Admin,
        "Prometheus metrics (public with ATELIER_METRICS_PUBLIC=1)",
        ops::metrics,
    )
    .answers(&[(200, Body::Metrics)]),
    r(
        "GET",
        "/api/admin/backup",
        "backup",
        Access::Admin,
        "A backup: the log through its head now, as JSON lines (what atelier backup imports; admin)",
        ops::backup,
    )
    .answers(&[(200, Body::Backup)]),
    r(
        "GET",
        "/api/cluster",
        "cluster",
        Access::Admin,
        "The servers sharing the log: each node's lease, whether it is alive, and the jobs it runs (admin)",
        ops::cluster,
    )
    .answers(&[(200, Body::Cluster)]),
    r("GET", "/api/openapi.json", "openapi", Access::Public, "This API as OpenAPI 3.1", serve_openapi)
        .answers(&[(200, Body::OpenApi)]),
    r(
        "POST",
        "/api/session",
        "sign_in",
        Access::Public,
        "Signs this browser in with a token (from the server's own page only: Origin and X-Atelier-Request)",
        pages::sign_in,
    )
    .takes(Body::SignIn)
    .answers(&[(204, Body::Empty), (401, Body::Error), (403, Body::Error)]),
    r(
        "GET",
        "/",
        "page_index",
        Access::Public,
        "The status page (?token= signs in; another user's asks first)",
        pages::index,
    )
    .reads(&[Query::Token])
    .answers(&[(200, Body::Html), (303, Body::Empty)]),
    r(
        "GET",
        "/commissions/{id}",
        "page_commission",
        Access::Public,
        "The progress view (?token= signs in; another user's asks first)",
        pages::commission,
    )
    .untyped_path()
    .reads(&[Query::Token])
    .answers(&[(200, Body::Html), (303, Body::Empty)]),
    r("GET", "/assets/{file}", "asset", Access::Public, "Page assets", pages::asset)
        .answers(&[(200, Body::Asset), (404, Body::Error)]),
    r(
        "GET",
        "/artifacts/{file}",
        "artifact",
        Access::Public,
        "Content-addressed artifacts (PNG)",
        pages::artifact,
    )
    .answers(&[(200, Body::Png), (404, Body::Error)]),
];

/// The OpenAPI 3.1 document, generated from [`ROUTES`] and the types in `render`.
pub fn openapi() -> Value {
    let mut generator = SchemaSettings::draft2020_12()
        .with(|s| s.definitions_path = "/components/schemas".into())
        .into_generator();
    let mut paths = Map::new();
    for route in ROUTES {
        let entry = paths.entry(route.path.to_string()).or_insert_with(|| json!({}));
        entry[route.method.to_ascii_lowercase()] = operation(route, &mut generator);
    }
    let mut schemas = generator.take_definitions(true);
    // The SSE payload is no response body of its own: named here so `Events` can point at it.
    let event_data = generator.subschema_for::<render::EventData>();
    schemas.extend(generator.take_definitions(true));
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Atelier", "version": env!("CARGO_PKG_VERSION")},
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "cookie": {"type": "apiKey", "in": "cookie", "name": "atelier_token"},
                "access_token": {"type": "apiKey", "in": "query", "name": "access_token",
                    "description": "Only on streams: an EventSource cannot send headers."},
            },
        },
        "x-sse-event-data": event_data,
        "paths": paths,
    })
}

/// One route's operation: its parameters, its body, and a response per status.
fn operation(route: &Route, generator: &mut SchemaGenerator) -> Value {
    let stream = route.path.ends_with("/stream");
    let mut params: Vec<Value> = route
        .path
        .split('/')
        .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .map(|name| path_param(route, name))
        .collect();
    params.extend(route.query.iter().flat_map(|q| query_params(*q)));
    let security = match route.access {
        Access::Public => json!([]),
        _ if stream => json!([{"bearer": []}, {"cookie": []}, {"access_token": []}]),
        _ => json!([{"bearer": []}, {"cookie": []}]),
    };
    let mut responses = Map::new();
    let mut answer = |status: u16, body: Body, generator: &mut SchemaGenerator| {
        responses.entry(status.to_string()).or_insert_with(|| response(status, body, generator));
    };
    for &(status, body) in route.responses {
        answer(status, body, generator);
    }
    if route.access != Access::Public {
        answer(401, Body::Error, generator);
    }
    // An admin route to a user; a change signed in by the cookie from another origin.
    if route.access == Access::Admin || (route.access != Access::Public && route.method != "GET") {
        answer(403, Body::Error, generator);
    }
    // A user's fair share of requests (and of streams and active commissions).
    if route.access != Access::Public {
        answer(429, Body::Error, generator);
    }
    if route.body.is_some() {
        answer(400, Body::Error, generator);
        answer(413, Body::Error, generator);
        answer(415, Body::Error, generator);
    }
    // Storage failures, a stopping server, and connections over the cap.
    answer(503, Body::Error, generator);
    let mut op = json!({
        "operationId": route.name,
        "summary": route.summary,
        "parameters": params,
        "security": security,
        "responses": responses,
    });
    if let Some(body) = route.body {
        op["requestBody"] = json!({
            "required": true,
            "content": {"application/json": {"schema": schema_of(body, generator)}},
        });
    }
    op
}

/// A path parameter: ids are integers the handler parses; a user id or a file name is text.
fn path_param(route: &Route, name: &str) -> Value {
    let schema = match name {
        "id" if route.typed_path => id_schema(),
        _ => json!({"type": "string", "minLength": 1}),
    };
    json!({"name": name, "in": "path", "required": true, "schema": schema})
}

/// Commission, job and event ids: the handlers take any `u64`, ids are given out from 1 up.
fn id_schema() -> Value {
    json!({"type": "integer", "format": "int64", "minimum": 0, "maximum": i64::MAX})
}

fn query_params(q: Query) -> Vec<Value> {
    let one = |name: &str, schema: Value, description: &str| json!({"name": name, "in": "query", "required": false, "schema": schema, "description": description});
    match q {
        Query::Limit => vec![one(
            "limit",
            json!({"type": "integer", "minimum": 1, "maximum": LIST_LIMIT_MAX}),
            "Page size (20 if absent)",
        )],
        Query::Cursor => vec![one(
            "cursor",
            json!({"type": "string", "pattern": "^[0-9]{0,19}$"}),
            "A page's next_cursor: the page after it",
        )],
        Query::State => {
            let mut states: Vec<Value> = State::ALL.iter().map(|s| json!(s.as_str())).collect();
            states.push(json!(""));
            vec![one("state", json!({"type": "string", "enum": states}), "Only commissions in this state")]
        }
        Query::LastEventId => {
            let id = id_schema();
            vec![
                json!({"name": "Last-Event-ID", "in": "header", "required": false, "schema": id,
                    "description": "Resume after this event id"}),
                one("last_event_id", id, "Resume after this event id, for clients that cannot send headers"),
            ]
        }
        Query::Token => vec![one(
            "token",
            json!({"type": "string"}),
            "Signs in: set as an HttpOnly cookie, and the page is loaded again without it",
        )],
    }
}

fn response(status: u16, body: Body, generator: &mut SchemaGenerator) -> Value {
    let description = match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        303 => "See Other",
        400 => "The request is malformed or a field is invalid",
        401 => "No token, or a bad one",
        403 => "Not allowed for this token",
        404 => "Not found (or not visible to this caller)",
        409 => "Refused in the commission's current state",
        410 => "Gone",
        413 => "The body is too large",
        415 => "The body is not JSON",
        429 => "Beyond a user's fair share (requests, streams or active commissions); see Retry-After",
        500 => "The stream could not be opened",
        503 => "Storage is failing, the server is stopping, or too many connections are open",
        _ => "",
    };
    let content = match body {
        Body::Empty => return json!({"description": description}),
        Body::Html => json!({"text/html": {"schema": {"type": "string"}}}),
        Body::Asset => json!({
            "text/javascript": {"schema": {"type": "string"}},
            "text/css": {"schema": {"type": "string"}},
        }),
        Body::Png => json!({"image/png": {"schema": {"type": "string", "contentMediaType": "image/png"}}}),
        Body::Metrics => json!({"text/plain": {"schema": {"type": "string"}}}),
        Body::Backup => json!({"application/x-ndjson": {"schema": {
            "type": "string",
            "description": "One event envelope per line, in seq order, through the seq in the \
                X-Atelier-Backup-Seq header (the log's head when the request came)",
        }}}),
        Body::Events => json!({"text/event-stream": {"schema": {
            "type": "string",
            "description": "Messages of `id:` (the event's seq), `event:` (its type) and `data:` \
                (an EventData, in components/schemas)",
        }}}),
        json_body => json!({"application/json": {"schema": schema_of(json_body, generator)}}),
    };
    json!({"description": description, "content": content})
}

/// The schema of a JSON body, as a reference into `components/schemas` for the named types.
fn schema_of(body: Body, generator: &mut SchemaGenerator) -> Value {
    let schema = match body {
        Body::Snapshot => generator.subschema_for::<render::Snapshot>(),
        Body::ListPage => generator.subschema_for::<render::ListPage>(),
        Body::JobList => generator.subschema_for::<render::JobList>(),
        Body::Job => generator.subschema_for::<render::JobRecord>(),
        Body::JobLogs => generator.subschema_for::<render::JobLogs>(),
        Body::JobQueued => generator.subschema_for::<render::JobQueued>(),
        Body::Me => generator.subschema_for::<render::Me>(),
        Body::Cluster => generator.subschema_for::<render::Cluster>(),
        Body::Error => generator.subschema_for::<render::ErrorBody>(),
        Body::CreateCommission => generator.subschema_for::<render::CreateCommission>(),
        Body::QueueJob => generator.subschema_for::<render::QueueJob>(),
        Body::SignIn => generator.subschema_for::<render::SignIn>(),
        Body::Health => {
            return json!({"type": "object", "properties": {"status": {"const": "ok"}}, "required": ["status"]})
        }
        Body::Ready => {
            return json!({"type": "object", "required": ["store", "executors", "head_seq"], "properties": {
                "store": {"const": "open"},
                "executors": {"type": "boolean", "description": "The job controller is running"},
                "head_seq": {"type": "integer", "minimum": 0},
            }})
        }
        Body::OpenApi => return json!({"type": "object", "required": ["openapi", "paths"]}),
        Body::Events | Body::Html | Body::Asset | Body::Png | Body::Metrics | Body::Backup | Body::Empty => {
            unreachable!("invariant: {body:?} is not JSON")
        }
    };
    schema.to_value()
}

/// The document as this server answers it to this caller: a pipeline name must be one it
/// runs, and a user's priority within the users' range.
fn serve_openapi(call: &Call<'_>) -> Result<Reply, StorageError> {
    let mut doc = openapi();
    if let Some(ex) = &call.shared.executors {
        // `null`, like no pipeline at all, names the default one.
        let mut names: Vec<Value> = ex.pipeline_names().into_iter().map(Value::from).collect();
        names.push(Value::Null);
        doc["components"]["schemas"]["CreateCommission"]["properties"]["pipeline"]["enum"] = json!(names);
    }
    // A caller who is not an admin (or not signed in) gets the users' priority range; an
    // admin may use any.
    if !call.who.is_some_and(|who| who.is_admin()) {
        let max = call.shared.config.share_limits().priority_max;
        let priority = &mut doc["components"]["schemas"]["CreateCommission"]["properties"]["priority"];
        priority["minimum"] = json!(-max);
        priority["maximum"] = json!(max);
    }
    Ok(Reply::Json(200, doc))
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

    /// Every operation says what it answers, status by status, and types its parameters.
    #[test]
    fn every_operation_is_complete() {
        let doc = openapi();
        for route in ROUTES {
            let op = &doc["paths"][route.path][route.method.to_ascii_lowercase()];
            let responses = op["responses"].as_object().unwrap();
            assert!(!responses.contains_key("default"), "{}: a default response", route.name);
            assert!(
                responses.keys().any(|s| s.starts_with('2') || s.starts_with('3')),
                "{}: no success response",
                route.name
            );
            for (status, response) in responses {
                let body_documented = response["content"]
                    .as_object()
                    .is_some_and(|c| c.values().all(|m| m["schema"].is_object()));
                assert!(
                    body_documented || status == "204" || status == "303",
                    "{} {status}: no schema",
                    route.name
                );
            }
            for param in op["parameters"].as_array().unwrap() {
                assert!(param["schema"]["type"].is_string(), "{}: {param} untyped", route.name);
            }
            if route.path.contains("{id}") && route.typed_path {
                let id = op["parameters"].as_array().unwrap().iter().find(|p| p["name"] == "id").unwrap();
                assert_eq!(id["schema"]["type"], "integer", "{}", route.name);
            }
            if route.body.is_some() {
                assert_eq!(op["requestBody"]["required"], true, "{}", route.name);
                assert!(op["requestBody"]["content"]["application/json"]["schema"]["$ref"].is_string());
            }
        }
    }

    /// The whole document: a change to the API shows up here as a diff to review.
    #[test]
    fn openapi_document() {
        let mut doc = openapi();
        // Not the API: the release it comes with.
        doc["info"]["version"] = json!("[version]");
        insta::assert_json_snapshot!(doc);
    }
}
