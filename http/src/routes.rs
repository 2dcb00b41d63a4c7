//! The route table, authentication, and the handlers. The table is data: the router, the
//! OpenAPI document and its test all read it.

use std::sync::Arc;

use atelier_engine::{time, Command, Commission, Ctx, NewCommission, Rejection, RetryPolicy, State};
use atelier_storage::{create, execute, Created, Filter, ListQuery, StorageError};
use serde_json::{json, Value};

use crate::auth::{Identity, TokenError};
use crate::sse::{self, StreamSpec};
use crate::{error, now_ms, render, Reply, Req, Shared};

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
}

const fn r(
    method: &'static str,
    path: &'static str,
    name: &'static str,
    access: Access,
    summary: &'static str,
) -> Route {
    Route { method, path, name, access, summary }
}

pub const ROUTES: &[Route] = &[
    r(
        "POST",
        "/api/commissions",
        "create_commission",
        Access::User,
        "Create a commission (201; 200 with the first one for a repeated idempotency_key)",
    ),
    r("GET", "/api/commissions/{id}", "get_commission", Access::User, "A commission's snapshot"),
    r("GET", "/api/progress/{id}/status", "get_status", Access::User, "A commission's snapshot (alias)"),
    r("POST", "/api/commissions/{id}/cancel", "cancel", Access::User, "Cancel (409 if terminal)"),
    r(
        "POST",
        "/api/commissions/{id}/retry",
        "retry",
        Access::User,
        "Retry a failed commission (409 unless failed)",
    ),
    r("GET", "/api/commissions/{id}/jobs", "commission_jobs", Access::User, "A commission's job records"),
    r(
        "GET",
        "/api/commissions/user/{user}",
        "list_user",
        Access::User,
        "A user's commissions, newest first: ?limit= (max 200), ?cursor=, ?state=",
    ),
    r(
        "GET",
        "/api/progress/{id}/stream",
        "stream_commission",
        Access::User,
        "SSE of one commission's events; ends after a terminal event",
    ),
    r(
        "GET",
        "/api/commissions/user/{user}/stream",
        "stream_user",
        Access::User,
        "SSE of all a user's commissions",
    ),
    r("GET", "/api/events/stream", "stream_all", Access::Admin, "SSE of every event (admin)"),
    r(
        "POST",
        "/api/jobs/create",
        "create_job",
        Access::Admin,
        "Queue a job for a commission now: a queued one, one waiting on its backoff, or a failed one (admin)",
    ),
    r("GET", "/api/jobs/{id}/status", "job_status", Access::User, "A job record"),
    r("GET", "/api/jobs/{id}/logs", "job_logs", Access::User, "A job's captured stdout and stderr"),
    r("GET", "/api/me", "me", Access::User, "Who the token belongs to"),
    r("GET", "/healthz", "healthz", Access::Public, "The process is up"),
    r("GET", "/readyz", "readyz", Access::Public, "The store is open and the job controller running"),
    r(
        "GET",
        "/metrics",
        "metrics",
        Access::Admin,
        "Prometheus metrics (public with ATELIER_METRICS_PUBLIC=1)",
    ),
    r("GET", "/api/openapi.json", "openapi", Access::Public, "This API as OpenAPI 3.1"),
    r("GET", "/", "page_index", Access::Public, "The status page (?token= signs in)"),
    r("GET", "/commissions/{id}", "page_commission", Access::Public, "The progress view"),
    r("GET", "/assets/{file}", "asset", Access::Public, "Page assets"),
    r("GET", "/artifacts/{file}", "artifact", Access::Public, "Content-addressed artifacts (PNG)"),
];

/// Whether a job's logs are past the keep time, so the job-dir sweep has removed them.
/// Decided by time, not by the dir: a job that never wrote anything never had a dir (it is
/// made on first use), and its logs are empty, not gone.
fn logs_swept(completed_at: Option<time::Millis>, keep_ms: Option<u64>, now: time::Millis) -> bool {
    match (completed_at, keep_ms) {
        (Some(ended), Some(keep)) => ended.saturating_add(i64::try_from(keep).unwrap_or(i64::MAX)) <= now,
        _ => false,
    }
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
    let who = match route.access {
        Access::Public => authenticate(req, shared).ok(),
        Access::User | Access::Admin => match authenticate(req, shared) {
            Ok(id) => Some(id),
            Err(reply) if route.name == "metrics" && shared.config.metrics_public => {
                drop(reply);
                None
            }
            Err(reply) => return (route.name, reply),
        },
    };
    if route.access == Access::Admin
        && !who.as_ref().is_some_and(Identity::is_admin)
        && !(route.name == "metrics" && shared.config.metrics_public)
    {
        return (route.name, error(403, "forbidden", "this needs an admin token"));
    }
    let reply = match handle(route, &params, who.as_ref(), req, shared) {
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

fn ctx() -> Ctx {
    let now = now_ms();
    Ctx { now, jitter_seed: now as u64, retry: RetryPolicy::default() }
}

fn parse_id(s: &str, what: &str) -> Result<u64, Reply> {
    s.parse::<u64>()
        .map_err(|_| error(400, "bad_id", format!("{what} must be a positive integer, got '{s}'")))
}

fn rejection(r: Rejection) -> Reply {
    match r {
        Rejection::NotFound => error(404, "not_found", "no such commission"),
        Rejection::Invalid { field, reason } => error(400, "invalid_field", format!("{field}: {reason}")),
        other => error(409, other.code(), other.to_string()),
    }
}

/// Loads a commission the caller may see; another user's is 404, as if it did not exist.
fn visible(shared: &Shared, who: &Identity, id: u64) -> Result<Result<Commission, Reply>, StorageError> {
    Ok(match shared.store.commission(id)? {
        Some(c) if who.may_access(&c.user_id) => Ok(c),
        _ => Err(error(404, "not_found", format!("no commission {id}"))),
    })
}

macro_rules! tri {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(reply) => return Ok(reply),
        }
    };
}

fn handle(
    route: &Route,
    params: &[&str],
    who: Option<&Identity>,
    req: &Req,
    shared: &Arc<Shared>,
) -> Result<Reply, StorageError> {
    let me = || who.expect("invariant: authenticated routes have an identity");
    Ok(match route.name {
        "healthz" => Reply::Json(200, json!({"status": "ok"})),
        "readyz" => {
            let controller = shared.executors.as_ref().is_some_and(|e| e.is_running());
            let body = json!({"store": "open", "executors": controller, "head_seq": shared.store.head_seq()});
            Reply::Json(if controller { 200 } else { 503 }, body)
        }
        "metrics" => {
            let mut extra = String::new();
            extra.push_str("# TYPE atelier_commissions gauge\n");
            for (state, n) in shared.store.state_counts()? {
                extra.push_str(&format!("atelier_commissions{{state=\"{}\"}} {n}\n", state.as_str()));
            }
            extra.push_str(&format!(
                "# TYPE atelier_log_head_seq gauge\natelier_log_head_seq {}\n",
                shared.store.head_seq()
            ));
            // Their ratio is the mean group: how many appends shared one fsync.
            let (commits, requests) = shared.store.group_commit_totals();
            extra.push_str(&format!(
                "# TYPE atelier_log_group_commits_total counter\natelier_log_group_commits_total {commits}\n\
                 # TYPE atelier_log_group_commit_appends_total counter\natelier_log_group_commit_appends_total {requests}\n"
            ));
            extra.push_str(&format!(
                "# TYPE atelier_http_accept_errors_total counter\natelier_http_accept_errors_total {}\n",
                shared.accept_errors.load(std::sync::atomic::Ordering::Relaxed)
            ));
            if let Some(e) = &shared.executors {
                extra.push_str(&e.metrics_text());
            }
            Reply::Bytes(
                200,
                "text/plain; version=0.0.4",
                shared.metrics.render(&extra, shared.store.dropped_slow_total()).into_bytes(),
                vec![],
            )
        }
        "openapi" => Reply::Json(200, crate::openapi()),
        "me" => Reply::Json(200, json!({"user_id": me().user_id, "role": me().role.as_str()})),
        "create_commission" => create_commission(req, me(), shared)?,
        "get_commission" | "get_status" => {
            let id = tri!(parse_id(params[0], "task id"));
            Reply::Json(200, render::snapshot(&tri!(visible(shared, me(), id)?)))
        }
        "cancel" | "retry" => {
            let id = tri!(parse_id(params[0], "task id"));
            tri!(visible(shared, me(), id)?);
            let cmd = if route.name == "cancel" { Command::RequestCancel } else { Command::ManualRetry };
            let started = std::time::Instant::now();
            match execute(&*shared.store, id, cmd, &ctx())? {
                Ok(c) => {
                    crate::metrics::APPEND_DURATION.observe(started.elapsed().as_secs_f64());
                    Reply::Json(200, render::snapshot(&c))
                }
                Err(r) => rejection(r),
            }
        }
        "commission_jobs" => {
            let id = tri!(parse_id(params[0], "task id"));
            tri!(visible(shared, me(), id)?);
            let jobs: Vec<Value> = shared.store.jobs_of(id)?.iter().map(render::job).collect();
            Reply::Json(200, json!({"items": jobs}))
        }
        "job_status" | "job_logs" => {
            let id = tri!(parse_id(params[0], "job id"));
            let job = match shared.store.job(id)? {
                Some(j) => j,
                None => return Ok(error(404, "not_found", format!("no job {id}"))),
            };
            tri!(visible(shared, me(), job.commission_id)?);
            if route.name == "job_status" {
                Reply::Json(200, render::job(&job))
            } else {
                let Some(ex) = &shared.executors else {
                    return Ok(error(404, "not_found", "no executor keeps logs here"));
                };
                let (out, err) = ex.job_log_paths(id);
                if logs_swept(job.completed_at, ex.job_dirs_keep_ms(), now_ms()) {
                    return Ok(error(410, "gone", format!("no logs are kept for job {id}: its working dir is gone (a finished job's dir is removed ATELIER_JOB_DIRS_KEEP_DAYS after it ended)")));
                }
                let read = |p: &std::path::Path| {
                    std::fs::read(p).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
                };
                Reply::Json(200, json!({"job_id": id, "stdout": read(&out), "stderr": read(&err)}))
            }
        }
        "list_user" => {
            let user = crate::percent_decode(params[0]);
            if !me().may_access(&user) {
                // Another user's list is as empty as an unknown user's.
                return Ok(Reply::Json(200, json!({"items": [], "next_cursor": null})));
            }
            let limit = match req.query("limit") {
                None => LIST_LIMIT_DEFAULT,
                Some(l) => match l.parse::<usize>() {
                    Ok(n) if (1..=LIST_LIMIT_MAX).contains(&n) => n,
                    _ => {
                        return Ok(error(
                            400,
                            "invalid_field",
                            format!("limit: must be 1..={LIST_LIMIT_MAX}"),
                        ))
                    }
                },
            };
            let cursor = match req.query("cursor") {
                None | Some("") => None,
                Some(c) => Some(tri!(parse_id(c, "cursor"))),
            };
            let state = match req.query("state") {
                None | Some("") => None,
                Some(s) => match State::parse(s) {
                    Some(s) => Some(s),
                    None => return Ok(error(400, "invalid_field", format!("state: unknown state '{s}'"))),
                },
            };
            let page = shared.store.list_user(&user, &ListQuery { limit, cursor, state })?;
            Reply::Json(
                200,
                json!({
                    "items": page.items.iter().map(render::snapshot).collect::<Vec<_>>(),
                    "next_cursor": page.next_cursor.map(|c| c.to_string()),
                }),
            )
        }
        "stream_commission" | "stream_user" | "stream_all" => {
            let after = tri!(last_event_id(req));
            let (filter, end_on_terminal) = match route.name {
                "stream_commission" => {
                    let id = tri!(parse_id(params[0], "task id"));
                    let c = tri!(visible(shared, me(), id)?);
                    if c.state.is_terminal() && after.is_some_and(|a| a >= c.last_seq) {
                        return Ok(Reply::Empty(204));
                    }
                    (Filter::Commission(id), true)
                }
                "stream_user" => {
                    let user = crate::percent_decode(params[0]);
                    if !me().may_access(&user) {
                        return Ok(error(404, "not_found", format!("no user {user}")));
                    }
                    (Filter::User(user), false)
                }
                _ => (Filter::All, false),
            };
            // Subscribed, with its first history read, here on the handler thread (see `sse::open`).
            sse::open(StreamSpec { filter, after: after.unwrap_or(0), end_on_terminal }, shared)
        }
        "create_job" => {
            let body: Value = tri!(json_body(req));
            let Some(id) = body.get("task_id").and_then(Value::as_u64) else {
                return Ok(error(400, "invalid_field", "task_id: required, a positive integer"));
            };
            let c = tri!(visible(shared, me(), id)?);
            match c.state {
                State::Created => Reply::Json(
                    201,
                    json!({"job_id": null, "task_id": id, "status": "pending", "executor": null}),
                ),
                // Failed: a manual retry. Waiting on its backoff: run it now, not at `next_retry_at`.
                State::Failed | State::Retrying => {
                    let cmd = if c.state == State::Failed { Command::ManualRetry } else { Command::RetryNow };
                    match execute(&*shared.store, id, cmd, &ctx())? {
                        Ok(_) => Reply::Json(
                            201,
                            json!({"job_id": null, "task_id": id, "status": "pending", "executor": null}),
                        ),
                        Err(r) => rejection(r),
                    }
                }
                s => match c.active_job.map(|j| shared.store.job(j)).transpose()?.flatten() {
                    Some(job) => {
                        error(409, "job_active", format!("job {} is already running it ({s})", job.job_id))
                    }
                    None => error(
                        409,
                        "not_runnable",
                        format!("the commission is {s}; it is not waiting for a job"),
                    ),
                },
            }
        }
        "page_index" => {
            if let Some(token) = req.query("token") {
                // Sign in once from the URL, then keep the token in an HttpOnly cookie.
                if shared.keys.verify(token, now_ms() / 1000).is_err() {
                    return Ok(page(
                        crate::assets::INDEX,
                        vec![(
                            "Set-Cookie",
                            "atelier_token=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict".into(),
                        )],
                    ));
                }
                let cookie = format!("atelier_token={token}; Path=/; HttpOnly; SameSite=Strict");
                return Ok(Reply::Bytes(
                    303,
                    "text/plain",
                    Vec::new(),
                    vec![("Set-Cookie", cookie), ("Location", "/".into())],
                ));
            }
            page(crate::assets::INDEX, vec![])
        }
        "page_commission" => page(crate::assets::COMMISSION, vec![]),
        "asset" => match params[0] {
            "app.js" => Reply::Bytes(
                200,
                "text/javascript; charset=utf-8",
                crate::assets::APP_JS.as_bytes().to_vec(),
                vec![],
            ),
            "style.css" => Reply::Bytes(
                200,
                "text/css; charset=utf-8",
                crate::assets::STYLE_CSS.as_bytes().to_vec(),
                vec![],
            ),
            other => error(404, "not_found", format!("no asset {other}")),
        },
        "artifact" => {
            let name = params[0];
            let hash = name.strip_suffix(".png").unwrap_or("");
            if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
                return Ok(error(
                    404,
                    "not_found",
                    "artifacts are named by their sha-256, e.g. /artifacts/<64 hex>.png",
                ));
            }
            // Without executors nothing makes artifacts: there is none to serve.
            let stored = shared.executors.as_ref().map(|e| e.artifacts_dir().join(name));
            match stored.map(std::fs::read) {
                Some(Ok(bytes)) => Reply::Bytes(
                    200,
                    "image/png",
                    bytes,
                    vec![("Cache-Control", "public, max-age=31536000, immutable".into())],
                ),
                _ => error(404, "not_found", format!("no artifact {name}")),
            }
        }
        other => unreachable!("invariant: every route has a handler ({other})"),
    })
}

fn page(html: &'static str, extra: Vec<(&'static str, String)>) -> Reply {
    Reply::Bytes(200, "text/html; charset=utf-8", html.as_bytes().to_vec(), extra)
}

fn last_event_id(req: &Req) -> Result<Option<u64>, Reply> {
    let raw = req.header("last-event-id").or_else(|| req.query("last_event_id"));
    match raw.map(str::trim) {
        None | Some("") => Ok(None),
        Some(v) => v.parse::<u64>().map(Some).map_err(|_| {
            error(400, "invalid_field", format!("Last-Event-ID: must be an event id (an integer), got '{v}'"))
        }),
    }
}

fn json_body(req: &Req) -> Result<Value, Reply> {
    if req.body.is_empty() {
        return Err(error(400, "bad_json", "a JSON body is required"));
    }
    serde_json::from_slice(&req.body)
        .map_err(|e| error(400, "bad_json", format!("the body is not valid JSON: {e}")))
}

/// Page size of a listing without `?limit=`; the largest allowed is storage's.
const LIST_LIMIT_DEFAULT: usize = 20;
use atelier_storage::LIST_LIMIT_MAX;

const CREATE_FIELDS: &[&str] =
    &["context", "pipeline", "priority", "scheduled_for", "max_attempts", "idempotency_key", "user_id"];

fn create_commission(req: &Req, who: &Identity, shared: &Shared) -> Result<Reply, StorageError> {
    let body = tri!(json_body(req));
    let Value::Object(fields) = &body else {
        return Ok(error(400, "bad_json", "the body must be a JSON object"));
    };
    if let Some(unknown) = fields.keys().find(|k| !CREATE_FIELDS.contains(&k.as_str())) {
        return Ok(error(
            400,
            "invalid_field",
            format!("{unknown}: unknown field (expected one of {})", CREATE_FIELDS.join(", ")),
        ));
    }
    let context = match fields.get("context") {
        Some(v @ Value::Object(_)) => v.to_string(),
        Some(_) => return Ok(error(400, "invalid_field", "context: must be a JSON object")),
        None => return Ok(error(400, "invalid_field", "context: required (a JSON object)")),
    };
    let str_field = |name: &str| -> Result<Option<String>, Reply> {
        match fields.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(error(400, "invalid_field", format!("{name}: must be a string"))),
        }
    };
    let pipeline = tri!(str_field("pipeline")).unwrap_or_else(|| shared.config.default_pipeline.clone());
    if let Some(ex) = &shared.executors {
        if !ex.pipeline_exists(&pipeline) {
            return Ok(error(400, "invalid_field", format!("pipeline: no pipeline named '{pipeline}'")));
        }
    }
    let priority = match fields.get("priority") {
        None | Some(Value::Null) => 0,
        Some(v) => match v.as_i64().and_then(|p| i32::try_from(p).ok()) {
            Some(p) => p,
            None => {
                return Ok(error(400, "invalid_field", "priority: must be an integer (higher runs first)"))
            }
        },
    };
    let max_attempts = match fields.get("max_attempts") {
        None | Some(Value::Null) => atelier_engine::limits::ATTEMPTS_DEFAULT,
        Some(v) => match v.as_u64().and_then(|p| u32::try_from(p).ok()) {
            Some(p) => p,
            None => return Ok(error(400, "invalid_field", "max_attempts: must be a positive integer")),
        },
    };
    let scheduled_for = match tri!(str_field("scheduled_for")) {
        None => None,
        Some(s) => match time::parse_rfc3339(&s) {
            Some(t) => Some(t),
            None => {
                return Ok(error(
                    400,
                    "invalid_field",
                    format!("scheduled_for: '{s}' is not an RFC 3339 time"),
                ))
            }
        },
    };
    let user_id = match tri!(str_field("user_id")) {
        Some(u) if u != who.user_id && !who.is_admin() => {
            return Ok(error(
                403,
                "forbidden",
                "user_id: only an admin may create commissions for another user",
            ));
        }
        Some(u) => u,
        None => who.user_id.clone(),
    };
    let new = NewCommission {
        user_id,
        pipeline,
        priority,
        scheduled_for,
        context,
        idempotency_key: tri!(str_field("idempotency_key")),
        max_attempts,
    };
    let started = std::time::Instant::now();
    let out = create(&*shared.store, new, &ctx())?;
    crate::metrics::APPEND_DURATION.observe(started.elapsed().as_secs_f64());
    Ok(match out {
        Ok(Created::New(c)) => {
            shared.metrics.events_appended.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Reply::Json(201, render::snapshot(&c))
        }
        Ok(Created::Existing(c)) => Reply::Json(200, render::snapshot(&c)),
        Err(r) => rejection(r),
    })
}

/// Runs the pure input checks of the handlers (no store needed) for the fuzz target.
pub(crate) fn fuzz_inputs(req: &Req) {
    let _ = last_event_id(req);
    let _ = json_body(req);
    let _ = token_of(req, true);
    if let Ok((_, params)) = find(&req.method, &req.path) {
        for p in params {
            let _ = parse_id(p, "id");
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
    fn a_jobs_logs_are_gone_only_past_the_keep_time() {
        let day: u64 = 86_400_000;
        let later = |ms: u64| 1_000 + i64::try_from(ms).unwrap();
        assert!(!logs_swept(None, Some(day), i64::MAX), "a running job's logs are never gone");
        assert!(!logs_swept(Some(1_000), None, i64::MAX), "keep for good");
        assert!(!logs_swept(Some(1_000), Some(day), later(day) - 1));
        assert!(logs_swept(Some(1_000), Some(day), later(day)));
        assert!(!logs_swept(Some(1_000), Some(u64::MAX), i64::MAX - 1), "no overflow");
    }

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
