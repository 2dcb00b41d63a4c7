//! The operator's routes: liveness, readiness, Prometheus metrics, and who a token belongs
//! to. (The OpenAPI document is served beside the table it describes, in `routes`.)

use std::sync::atomic::Ordering;

use atelier_storage::StorageError;
use serde_json::json;

use super::call::Call;
use crate::reply::Reply;

pub(super) fn healthz(_: &Call<'_>) -> Result<Reply, StorageError> {
    Ok(Reply::Json(200, json!({"status": "ok"})))
}

pub(super) fn readyz(call: &Call<'_>) -> Result<Reply, StorageError> {
    let shared = call.shared;
    let controller = shared.executors.as_ref().is_some_and(|e| e.is_running());
    let body = json!({"store": "open", "executors": controller, "head_seq": shared.store.head_seq()});
    Ok(Reply::Json(if controller { 200 } else { 503 }, body))
}

pub(super) fn metrics(call: &Call<'_>) -> Result<Reply, StorageError> {
    let shared = call.shared;
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
        shared.accept_errors.load(Ordering::Relaxed)
    ));
    if let Some(e) = &shared.executors {
        extra.push_str(&e.metrics_text());
    }
    Ok(Reply::Bytes(
        200,
        "text/plain; version=0.0.4",
        shared.metrics.render(&extra, shared.store.dropped_slow_total()).into_bytes(),
        vec![],
    ))
}

pub(super) fn me(call: &Call<'_>) -> Result<Reply, StorageError> {
    let me = call.me();
    Ok(Reply::Json(200, json!({"user_id": me.user_id, "role": me.role.as_str()})))
}
