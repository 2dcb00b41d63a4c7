//! JSON shapes of the API: snapshots, jobs, SSE event data, errors. One place, so that the
//! snapshot tests pin every body the API sends.

use atelier_engine::time::format_rfc3339_ms;
use atelier_engine::{Commission, Envelope, Event, Job};
use atelier_storage::ViewAfter;
use serde_json::{json, Map, Value};

fn parse_or_string(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}

pub fn snapshot(c: &Commission) -> Value {
    json!({
        "task_id": c.id,
        "user_id": c.user_id,
        "pipeline": c.pipeline,
        "priority": c.priority,
        "state": c.state.as_str(),
        "stage": c.stage.map(|s| s.as_str()),
        "progress_percent": c.progress_percent(),
        "stages": c.stages().iter().map(|s| json!({
            "name": s.name.as_str(), "state": s.state, "progress_percent": s.progress_percent,
        })).collect::<Vec<_>>(),
        "attempt": c.attempt,
        "max_attempts": c.max_attempts,
        "message": c.message,
        "error": c.error,
        "result": c.result.as_deref().map(parse_or_string),
        "context": parse_or_string(&c.context),
        "artifacts": c.artifacts.iter().map(|a| json!({"stage": a.stage.as_str(), "kind": a.kind, "uri": a.uri})).collect::<Vec<_>>(),
        "scheduled_for": c.scheduled_for.map(format_rfc3339_ms),
        "next_retry_at": c.next_retry_at.map(format_rfc3339_ms),
        "cancel_requested": c.cancel_requested,
        "created_at": format_rfc3339_ms(c.created_at),
        "updated_at": format_rfc3339_ms(c.updated_at),
        "last_event_id": c.last_seq,
    })
}

pub fn job(j: &Job) -> Value {
    json!({
        "job_id": j.job_id,
        "task_id": j.commission_id,
        "executor": j.executor.as_str(),
        "job_name": j.job_name,
        "attempt": j.attempt,
        "process_id": j.process_id,
        "status": j.status.as_str(),
        "created_at": format_rfc3339_ms(j.created_at),
        "started_at": j.started_at.map(format_rfc3339_ms),
        "completed_at": j.completed_at.map(format_rfc3339_ms),
        "exit_code": j.exit_code,
        "signal": j.signal,
        "error_message": j.error_message,
        "max_rss_bytes": j.max_rss_bytes,
        "cpu_ms": j.cpu_ms,
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
    json!({"error": {"code": code, "message": message}})
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
}
