//! JSON shapes of the API: snapshots, jobs, SSE event data, errors. One place, so that the
//! snapshot tests pin every body the API sends.

use atelier_engine::time::format_rfc3339_ms;
use atelier_engine::{Commission, Envelope, Event, EventKind, Executor, Job, JobStatus, Stage, State};
use atelier_storage::ViewAfter;
use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

fn parse_or_string(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}

/// Every body is built from these types and turned into a `Value`, whose keys serde_json
/// keeps sorted: so the field order here does not change a byte on the wire.
fn to_value(body: &impl Serialize) -> Value {
    serde_json::to_value(body).expect("invariant: API bodies serialize")
}

/// A commission as the API shows it: `GET /api/commissions/{id}`, and the answer to create,
/// cancel and retry.
#[derive(Serialize, JsonSchema)]
pub struct Snapshot {
    pub task_id: u64,
    pub user_id: String,
    pub pipeline: String,
    /// Higher runs first.
    pub priority: i32,
    #[schemars(schema_with = "state_schema")]
    pub state: &'static str,
    /// The stage most recently entered in the current (or last) attempt.
    #[schemars(schema_with = "stage_or_null_schema")]
    pub stage: Option<&'static str>,
    #[schemars(schema_with = "percent_schema")]
    pub progress_percent: u8,
    pub stages: Vec<StageProgress>,
    /// Attempts started so far (the current one included).
    pub attempt: u32,
    pub max_attempts: u32,
    pub message: Option<String>,
    pub error: Option<String>,
    /// What the pipeline produced: its JSON value (a string if it was not JSON).
    pub result: Option<Value>,
    /// The JSON object the commission was created with.
    pub context: Value,
    pub artifacts: Vec<ArtifactRef>,
    #[schemars(schema_with = "time_or_null_schema")]
    pub scheduled_for: Option<String>,
    #[schemars(schema_with = "time_or_null_schema")]
    pub next_retry_at: Option<String>,
    pub cancel_requested: bool,
    #[schemars(schema_with = "time_schema")]
    pub created_at: String,
    #[schemars(schema_with = "time_schema")]
    pub updated_at: String,
    /// The id of the commission's latest event: a stream resumes after it.
    pub last_event_id: u64,
}

/// One stage of a commission and how far it got.
#[derive(Serialize, JsonSchema)]
pub struct StageProgress {
    #[schemars(schema_with = "stage_schema")]
    pub name: &'static str,
    #[schemars(schema_with = "stage_state_schema")]
    pub state: &'static str,
    #[schemars(schema_with = "percent_schema")]
    pub progress_percent: u8,
}

/// An artifact a stage made: `uri` is served under `/artifacts/`.
#[derive(Serialize, JsonSchema)]
pub struct ArtifactRef {
    #[schemars(schema_with = "stage_schema")]
    pub stage: &'static str,
    pub kind: String,
    pub uri: String,
}

/// One page of a user's commissions, newest first.
#[derive(Serialize, JsonSchema)]
pub struct ListPage {
    pub items: Vec<Snapshot>,
    /// Pass as `?cursor=` for the next page; `null` on the last one.
    #[schemars(schema_with = "cursor_schema")]
    pub next_cursor: Option<String>,
}

/// A commission's job records, oldest first.
#[derive(Serialize, JsonSchema)]
pub struct JobList {
    pub items: Vec<JobRecord>,
}

/// One job: which executor ran which attempt, and how it ended.
#[derive(Serialize, JsonSchema)]
pub struct JobRecord {
    pub job_id: u64,
    pub task_id: u64,
    #[schemars(schema_with = "executor_schema")]
    pub executor: &'static str,
    pub job_name: String,
    pub attempt: u32,
    pub process_id: Option<u32>,
    #[schemars(schema_with = "job_status_schema")]
    pub status: &'static str,
    #[schemars(schema_with = "time_schema")]
    pub created_at: String,
    #[schemars(schema_with = "time_or_null_schema")]
    pub started_at: Option<String>,
    #[schemars(schema_with = "time_or_null_schema")]
    pub completed_at: Option<String>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub error_message: Option<String>,
    pub max_rss_bytes: u64,
    pub cpu_ms: u64,
}

/// A job's captured output.
#[derive(Serialize, JsonSchema)]
pub struct JobLogs {
    pub job_id: u64,
    pub stdout: String,
    pub stderr: String,
}

/// The answer to queueing a job: the job controller picks the commission up; its job id is
/// not known yet.
#[derive(Serialize, JsonSchema)]
pub struct JobQueued {
    /// Always `null`: the job does not exist yet.
    pub job_id: Option<u64>,
    pub task_id: u64,
    #[schemars(schema_with = "pending_schema")]
    pub status: &'static str,
    /// Always `null`: the executor is chosen when the job starts.
    pub executor: Option<String>,
}

/// The servers sharing the log (`GET /api/cluster`); one node, `shared: false`, on sled.
#[derive(Serialize, JsonSchema)]
pub struct Cluster {
    /// The node that answered; none on sled.
    pub node: Option<String>,
    /// Whether the log is shared by nodes (PostgreSQL).
    pub shared: bool,
    pub nodes: Vec<ClusterNode>,
}

/// One node: its lease (by the database's clock) and the jobs it runs.
#[derive(Serialize, JsonSchema)]
pub struct ClusterNode {
    pub id: String,
    /// Which run of the node this is: one more at each start or rejoin.
    pub incarnation: u64,
    pub host: String,
    pub pid: u32,
    pub started_at: String,
    pub heartbeat_at: String,
    pub lease_until: String,
    /// Whether its lease holds now.
    pub alive: bool,
    /// Whether it runs the maintenance (lost jobs, retention).
    pub maintainer: bool,
    pub running: Vec<ClusterJob>,
}

#[derive(Serialize, JsonSchema)]
pub struct ClusterJob {
    pub commission_id: u64,
    pub job_id: u64,
}

impl Cluster {
    pub fn new(node: Option<String>, nodes: Vec<atelier_storage::NodeInfo>) -> Cluster {
        let shared = node.is_some();
        let nodes = nodes
            .into_iter()
            .map(|n| ClusterNode {
                running: n
                    .running
                    .iter()
                    .map(|&(commission_id, job_id)| ClusterJob { commission_id, job_id })
                    .collect(),
                id: n.id,
                incarnation: n.incarnation,
                host: n.host,
                pid: n.pid,
                started_at: n.started_at,
                heartbeat_at: n.heartbeat_at,
                lease_until: n.lease_until,
                alive: n.alive,
                maintainer: n.maintainer,
            })
            .collect();
        Cluster { node, shared, nodes }
    }
}

/// Who a token belongs to.
#[derive(Serialize, JsonSchema)]
pub struct Me {
    pub user_id: String,
    #[schemars(schema_with = "role_schema")]
    pub role: &'static str,
}

/// Every error the API answers.
#[derive(Serialize, JsonSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, JsonSchema)]
pub struct ErrorDetail {
    /// Stable, for programs: `not_found`, `invalid_field`, `bad_json`, `forbidden`, ...
    pub code: String,
    /// For people.
    pub message: String,
}

// The handler checks each field itself, to name the field that is wrong; a test keeps its
// list of fields equal to this type's.
/// The body of `POST /api/commissions`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCommission {
    /// Anything the pipeline needs, at most 64 KiB encoded.
    pub context: Map<String, Value>,
    /// One of the server's pipelines; its default one if absent.
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[a-z0-9_-]+$"))]
    pub pipeline: Option<String>,
    /// Higher runs first; 0 if absent. A user's must be within ±ATELIER_USER_PRIORITY_MAX (10
    /// unless configured); an admin's may be any.
    #[schemars(range(min = i32::MIN, max = i32::MAX))]
    pub priority: Option<i32>,
    /// Not to start before this time (RFC 3339).
    #[serde(default)]
    #[schemars(schema_with = "time_or_null_schema")]
    pub scheduled_for: Option<String>,
    /// Attempts allowed in total; 3 if absent.
    #[schemars(range(min = 1, max = 100))]
    pub max_attempts: Option<u32>,
    /// A repeated key answers with the commission the first request made (200). At most 128
    /// bytes as UTF-8.
    #[schemars(length(min = 1, max = 128))]
    pub idempotency_key: Option<String>,
    /// Whose commission it is: the caller if absent; only an admin may name another user. At
    /// most 128 bytes as UTF-8.
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[^/\u0000-\u001f\u007f-\u009f]+$"))]
    pub user_id: Option<String>,
}

/// The body of `POST /api/session`: the token the browser signs in with.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SignIn {
    /// A token this server accepts; it goes into the HttpOnly cookie.
    #[schemars(length(min = 1, max = 4096))]
    pub token: String,
}

/// The body of `POST /api/jobs/create`.
#[derive(Deserialize, JsonSchema)]
pub struct QueueJob {
    /// The commission to run now.
    #[schemars(range(max = i64::MAX))]
    pub task_id: u64,
}

/// The `data:` of an SSE message: the event's envelope and the commission's state after it;
/// each kind of event adds its own fields (see `type`).
#[derive(Serialize, JsonSchema)]
#[schemars(extend("additionalProperties" = true))]
pub struct EventData {
    /// The event's id in the log: send it back as Last-Event-ID to resume.
    pub seq: u64,
    pub task_id: u64,
    /// The commission's version after this event.
    pub version: u64,
    #[schemars(schema_with = "event_kind_schema")]
    pub r#type: &'static str,
    #[schemars(schema_with = "state_schema")]
    pub state: &'static str,
    #[schemars(schema_with = "stage_or_null_schema")]
    pub stage: Option<&'static str>,
    #[schemars(schema_with = "percent_schema")]
    pub progress_percent: u8,
    pub stage_progress_percent: Option<u8>,
    pub message: Option<String>,
    pub user_id: String,
    #[schemars(schema_with = "time_schema")]
    pub at: String,
}

fn one_of_names(names: impl IntoIterator<Item = &'static str>) -> Vec<Value> {
    names.into_iter().map(Value::from).collect()
}

fn state_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "string", "enum": one_of_names(State::ALL.map(State::as_str))})
}

fn stage_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "string", "enum": one_of_names(Stage::ALL.map(Stage::as_str))})
}

fn stage_or_null_schema(_: &mut SchemaGenerator) -> Schema {
    let mut names = one_of_names(Stage::ALL.map(Stage::as_str));
    names.push(Value::Null);
    json_schema!({"type": ["string", "null"], "enum": names})
}

fn stage_state_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "string", "enum": ["pending", "running", "done", "failed", "cancelled"]})
}

fn event_kind_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "string", "enum": one_of_names(EventKind::ALL.map(EventKind::as_str))})
}

/// Every executor, for the schema (the engine keeps no list; a test keeps this one whole).
const EXECUTORS: [Executor; 2] = [Executor::JobController, Executor::TaskRunner];

/// Every job status, as [`EXECUTORS`].
const JOB_STATUSES: [JobStatus; 6] = [
    JobStatus::Pending,
    JobStatus::Running,
    JobStatus::Succeeded,
    JobStatus::Failed,
    JobStatus::Killed,
    JobStatus::TimedOut,
];

fn executor_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "string", "enum": one_of_names(EXECUTORS.map(Executor::as_str))})
}

fn job_status_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "string", "enum": one_of_names(JOB_STATUSES.map(JobStatus::as_str))})
}

fn pending_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"const": "pending"})
}

fn role_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "string", "enum": ["user", "admin"]})
}

fn percent_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "integer", "minimum": 0, "maximum": atelier_engine::limits::PERCENT_MAX})
}

fn time_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "string", "format": "date-time"})
}

fn time_or_null_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": ["string", "null"], "format": "date-time"})
}

fn cursor_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": ["string", "null"], "pattern": "^[0-9]+$"})
}

pub fn snapshot(c: &Commission) -> Value {
    to_value(&snapshot_of(c))
}

fn snapshot_of(c: &Commission) -> Snapshot {
    Snapshot {
        task_id: c.id,
        user_id: c.user_id.clone(),
        pipeline: c.pipeline.clone(),
        priority: c.priority,
        state: c.state.as_str(),
        stage: c.stage.map(|s| s.as_str()),
        progress_percent: c.progress_percent(),
        stages: c
            .stages()
            .iter()
            .map(|s| StageProgress {
                name: s.name.as_str(),
                state: s.state,
                progress_percent: s.progress_percent,
            })
            .collect(),
        attempt: c.attempt,
        max_attempts: c.max_attempts,
        message: c.message.clone(),
        error: c.error.clone(),
        result: c.result.as_deref().map(parse_or_string),
        context: parse_or_string(&c.context),
        artifacts: c
            .artifacts
            .iter()
            .map(|a| ArtifactRef { stage: a.stage.as_str(), kind: a.kind.clone(), uri: a.uri.clone() })
            .collect(),
        scheduled_for: c.scheduled_for.map(format_rfc3339_ms),
        next_retry_at: c.next_retry_at.map(format_rfc3339_ms),
        cancel_requested: c.cancel_requested,
        created_at: format_rfc3339_ms(c.created_at),
        updated_at: format_rfc3339_ms(c.updated_at),
        last_event_id: c.last_seq,
    }
}

pub fn job(j: &Job) -> Value {
    to_value(&job_record(j))
}

fn job_record(j: &Job) -> JobRecord {
    JobRecord {
        job_id: j.job_id,
        task_id: j.commission_id,
        executor: j.executor.as_str(),
        job_name: j.job_name.clone(),
        attempt: j.attempt,
        process_id: j.process_id,
        status: j.status.as_str(),
        created_at: format_rfc3339_ms(j.created_at),
        started_at: j.started_at.map(format_rfc3339_ms),
        completed_at: j.completed_at.map(format_rfc3339_ms),
        exit_code: j.exit_code,
        signal: j.signal,
        error_message: j.error_message.clone(),
        max_rss_bytes: j.max_rss_bytes,
        cpu_ms: j.cpu_ms,
    }
}

pub fn jobs(jobs: &[Job]) -> Value {
    to_value(&JobList { items: jobs.iter().map(job_record).collect() })
}

pub fn job_logs(job_id: u64, stdout: String, stderr: String) -> Value {
    to_value(&JobLogs { job_id, stdout, stderr })
}

pub fn job_queued(task_id: u64) -> Value {
    to_value(&JobQueued { job_id: None, task_id, status: "pending", executor: None })
}

pub fn list_page(items: &[Commission], next_cursor: Option<u64>) -> Value {
    to_value(&ListPage {
        items: items.iter().map(snapshot_of).collect(),
        next_cursor: next_cursor.map(|c| c.to_string()),
    })
}

/// The `data:` of one SSE message: the envelope, the state after it, and the event's fields.
pub fn event_data(env: &Envelope, view: &ViewAfter) -> Value {
    let mut m = Map::new();
    // The event's own fields first, so the envelope's names win on a clash.
    if let Ok(Value::Object(outer)) = serde_json::to_value(&env.event) {
        for (_, inner) in outer {
            match inner {
                Value::Object(fields) => m.extend(fields),
                other => {
                    m.insert("value".into(), other);
                }
            }
        }
    }
    // Times are RFC 3339 strings everywhere in the API, as in snapshots and `at` (the log
    // keeps them as epoch milliseconds).
    match &env.event {
        Event::Created { context, scheduled_for, .. } => {
            m.insert("context".into(), parse_or_string(context));
            m.insert("scheduled_for".into(), json!(scheduled_for.map(format_rfc3339_ms)));
        }
        Event::AttemptFailed { next_retry_at, .. } => {
            m.insert("next_retry_at".into(), json!(format_rfc3339_ms(*next_retry_at)));
        }
        Event::Completed { result } => {
            m.insert("result".into(), parse_or_string(result));
        }
        Event::Progress { stage, percent, .. } => {
            m.insert("stage".into(), json!(stage.as_str()));
            m.insert("stage_progress_percent".into(), json!(percent));
        }
        _ => {}
    }
    m.insert("seq".into(), json!(env.seq));
    m.insert("task_id".into(), json!(env.commission_id));
    m.insert("version".into(), json!(env.version));
    m.insert("type".into(), json!(env.event.kind().as_str()));
    m.insert("state".into(), json!(view.state.as_str()));
    if !matches!(env.event, Event::Progress { .. } | Event::Artifact { .. }) {
        m.insert("stage".into(), json!(view.stage.map(|s| s.as_str())));
    }
    m.insert("progress_percent".into(), json!(view.progress_percent));
    m.entry("stage_progress_percent").or_insert(json!(view.stage_progress_percent));
    m.insert("message".into(), json!(view.message));
    m.insert("user_id".into(), json!(&*view.user_id));
    m.insert("at".into(), json!(format_rfc3339_ms(env.at)));
    Value::Object(m)
}

/// One SSE message, terminated by the blank line.
/// Appends one SSE message (`id`, `event`, `data`, blank line) to `out`.
pub fn push_sse_message(out: &mut String, env: &Envelope, view: &ViewAfter) {
    use std::fmt::Write;
    let _ = write!(
        out,
        "id: {}\nevent: {}\ndata: {}\n\n",
        env.seq,
        env.event.kind().as_str(),
        event_data(env, view)
    );
}

pub fn error(code: &str, message: &str) -> Value {
    to_value(&ErrorBody { error: ErrorDetail { code: code.to_string(), message: message.to_string() } })
}

#[cfg(test)]
mod tests {
    use super::*;
    use atelier_engine::{Stage, State};

    /// Every SSE message body, one event of every kind: what browsers and scripts parse.
    #[test]
    fn sse_message_of_every_event_kind() {
        let view = ViewAfter {
            user_id: std::sync::Arc::from("alice"),
            state: State::CreatingImages,
            stage: Some(Stage::CreatingImages),
            progress_percent: 25,
            stage_progress_percent: Some(40),
            message: Some("rendering".into()),
        };
        let mut out = String::new();
        for (i, event) in atelier_engine::fixtures::one_of_each().into_iter().enumerate() {
            let n = u64::try_from(i).expect("a few events") + 1;
            let env = Envelope { seq: 100 + n, commission_id: 7, version: n, at: 1_795_964_430_123, event };
            push_sse_message(&mut out, &env, &view);
        }
        insta::assert_snapshot!(out);
    }

    /// Every SSE message carries each field `EventData` documents, whatever its kind.
    #[test]
    fn sse_data_has_the_documented_fields() {
        let schema = schemars::schema_for!(EventData);
        let documented = schema.as_value()["properties"].as_object().unwrap().clone();
        let view = ViewAfter {
            user_id: std::sync::Arc::from("alice"),
            state: State::Created,
            stage: None,
            progress_percent: 0,
            stage_progress_percent: None,
            message: None,
        };
        for event in atelier_engine::fixtures::one_of_each() {
            let kind = event.kind().as_str();
            let env = Envelope { seq: 1, commission_id: 7, version: 1, at: 0, event };
            let data = event_data(&env, &view);
            for field in documented.keys() {
                assert!(data.get(field).is_some(), "{kind}: no {field} in {data}");
            }
        }
    }

    /// The lists the schemas name hold every variant: a new one stops this match compiling.
    #[test]
    fn the_schemas_list_every_executor_and_job_status() {
        for e in EXECUTORS {
            match e {
                Executor::JobController | Executor::TaskRunner => {}
            }
        }
        assert_eq!(EXECUTORS.len(), 2);
        for s in JOB_STATUSES {
            match s {
                JobStatus::Pending
                | JobStatus::Running
                | JobStatus::Succeeded
                | JobStatus::Failed
                | JobStatus::Killed
                | JobStatus::TimedOut => {}
            }
        }
        assert_eq!(JOB_STATUSES.len(), 6);
    }
}
