//! The operator's routes: liveness, readiness, Prometheus metrics, and who a token belongs
//! to. (The OpenAPI document is served beside the table it describes, in `routes`.)

use std::sync::atomic::Ordering;

use atelier_storage::StorageError;
use serde_json::json;

use super::call::Call;
use crate::backup::Backup;
use crate::render;
use crate::reply::Reply;

pub(super) fn healthz(_: &Call<'_>) -> Result<Reply, StorageError> {
    Ok(Reply::Json(200, json!({"status": "ok"})))
}

/// Not ready while the store refuses writes (a full disk, until space returns; a failed
/// commit, until a restart): a balancer should send traffic elsewhere. Otherwise ready once
/// the executors run.
pub(super) fn readyz(call: &Call<'_>) -> Result<Reply, StorageError> {
    let shared = call.shared;
    if let Err(why) = shared.store.health() {
        return Ok(Reply::Json(503, render::error("not_ready", &format!("the store refuses writes: {why}"))));
    }
    let controller = shared.executors.as_ref().is_some_and(|e| e.is_running());
    let body = json!({"store": "open", "executors": controller, "head_seq": shared.store.head_seq()});
    Ok(Reply::Json(if controller { 200 } else { 503 }, body))
}

/// A backup: the log through its head now, written by the connection's thread (`backup`).
/// The head is taken here, once, so the copy is the log as of one seq.
pub(super) fn backup(call: &Call<'_>) -> Result<Reply, StorageError> {
    Ok(Reply::Backup(Backup { through: call.shared.store.head_seq() }))
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
    // Slots are given back when a connection ends however it ends, so this returns to its
    // baseline once clients are gone.
    extra.push_str(&format!(
        "# TYPE atelier_http_connections gauge\natelier_http_connections {}\n",
        shared.slots.open()
    ));
    extra.push_str(&format!(
        "# TYPE atelier_http_accept_errors_total counter\natelier_http_accept_errors_total {}\n",
        shared.accept_errors.load(Ordering::Relaxed)
    ));
    // Which node answered, as an info series to join on: the scrape's own `instance` label
    // already keeps the nodes' series apart.
    if let Some(node) = shared.store.node_id() {
        extra.push_str(&format!(
            "# TYPE atelier_node_info gauge
atelier_node_info{{node=\"{node}\"}} 1
             # TYPE atelier_node_maintainer gauge
atelier_node_maintainer {}
             # TYPE atelier_node_lease_lost gauge
atelier_node_lease_lost {}
",
            u8::from(shared.store.is_maintainer()),
            u8::from(shared.store.lease_lost())
        ));
    }
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

/// The nodes sharing the log, their leases and running jobs (admin).
pub(super) fn cluster(call: &Call<'_>) -> Result<Reply, StorageError> {
    let store = &call.shared.store;
    let body = render::Cluster::new(store.node_id(), store.cluster()?);
    Ok(Reply::Json(200, serde_json::to_value(body).expect("invariant: JSON serializes")))
}

pub(super) fn me(call: &Call<'_>) -> Result<Reply, StorageError> {
    let me = call.me();
    Ok(Reply::Json(200, json!({"user_id": me.user_id, "role": me.role.as_str()})))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpStream};
    use std::time::Duration;

    use atelier_storage::{SledStore, StoreConfig};
    use serde_json::Value;

    use crate::auth::Keys;
    use crate::config::HttpConfig;
    use crate::server::Server;

    fn get(addr: SocketAddr, path: &str) -> (u16, Value) {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("a timeout");
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").expect("send");
        let mut raw = String::new();
        s.read_to_string(&mut raw).expect("read");
        let status = raw.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        let body = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        (status, serde_json::from_str(body).unwrap_or(Value::Null))
    }

    #[test]
    fn readyz_is_503_with_the_reason_while_the_store_refuses_writes() {
        let dir = std::env::temp_dir().join(format!("atelier-readyz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = SledStore::open(StoreConfig::new(&dir)).expect("open a store");
        let server = Server::start(
            HttpConfig::new("127.0.0.1:0", &dir),
            store.clone(),
            Keys::new(&crate::secret::Secret::new([7; 32]).unwrap()),
            None,
        )
        .expect("start");
        // Without executors the server is not ready either, but the store is open.
        let (status, body) = get(server.local_addr(), "/readyz");
        assert_eq!((status, &body["store"]), (503, &Value::from("open")), "{body}");
        store.close();
        let (status, body) = get(server.local_addr(), "/readyz");
        assert_eq!(status, 503);
        assert_eq!(body["error"]["code"], "not_ready", "{body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.starts_with("the store refuses writes: "), "{message}");
        server.shutdown();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
