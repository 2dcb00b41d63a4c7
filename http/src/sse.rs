//! Server-Sent Events: one thread per stream, writing through the request's raw writer and
//! flushing after every event. A stream resumes strictly after Last-Event-ID (the global seq).

use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use atelier_storage::{Filter, SubscriptionEnd};

use crate::{render, Shared};

/// The `retry:` hint sent first: how long a browser waits before reconnecting.
pub const RETRY_HINT_MS: u64 = 2_000;
/// How often a stream thread looks at the shutdown flag while idle.
const SHUTDOWN_POLL: Duration = Duration::from_millis(500);

pub(crate) struct StreamSpec {
    pub filter: Filter,
    pub after: u64,
    /// A per-commission stream ends after a terminal event.
    pub end_on_terminal: bool,
}

pub(crate) fn spawn(request: tiny_http::Request, spec: StreamSpec, shared: Arc<Shared>) {
    shared.streams.fetch_add(1, Ordering::SeqCst);
    shared.metrics.sse_connections.fetch_add(1, Ordering::Relaxed);
    let spawned = std::thread::Builder::new().name("atelier-sse".into()).stack_size(64 * 1024).spawn({
        let shared = shared.clone();
        move || {
            run(request, spec, &shared);
            shared.metrics.sse_connections.fetch_sub(1, Ordering::Relaxed);
            shared.streams.fetch_sub(1, Ordering::SeqCst);
        }
    });
    if spawned.is_err() {
        tracing::warn!("could not start a stream thread");
        shared.metrics.sse_connections.fetch_sub(1, Ordering::Relaxed);
        shared.streams.fetch_sub(1, Ordering::SeqCst);
    }
}

fn run(request: tiny_http::Request, spec: StreamSpec, shared: &Shared) {
    let mut sub = match shared.store.subscribe(spec.after, spec.filter.clone()) {
        Ok(s) => s,
        Err(e) => {
            let body = render::error("storage", &e.to_string()).to_string();
            let _ = request.respond(tiny_http::Response::from_string(body).with_status_code(500));
            return;
        }
    };
    let mut w = request.into_writer();
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: close\r\nX-Accel-Buffering: no\r\n\r\nretry: {RETRY_HINT_MS}\n\n"
    );
    if w.write_all(head.as_bytes()).and_then(|_| w.flush()).is_err() {
        return;
    }
    let heartbeat = Duration::from_millis(shared.config.heartbeat_ms.max(1));
    let mut last_write = Instant::now();
    loop {
        if shared.shutting_down.load(Ordering::SeqCst) {
            return;
        }
        match sub.next_timeout(heartbeat.min(SHUTDOWN_POLL)) {
            Ok(Some(d)) => {
                let msg = render::sse_message(&d.env, &d.view);
                if w.write_all(msg.as_bytes()).and_then(|_| w.flush()).is_err() {
                    return;
                }
                last_write = Instant::now();
                shared.metrics.sse_events_sent.fetch_add(1, Ordering::Relaxed);
                if spec.end_on_terminal && d.env.event.kind().is_terminal() {
                    return;
                }
            }
            Ok(None) => {
                if last_write.elapsed() >= heartbeat {
                    if w.write_all(b": heartbeat\n\n").and_then(|_| w.flush()).is_err() {
                        return;
                    }
                    last_write = Instant::now();
                }
            }
            Err(SubscriptionEnd::Overflow { last_seq }) => {
                tracing::info!(last_seq, "dropped a slow stream; the client can resume");
                return;
            }
            Err(SubscriptionEnd::Closed) => return,
            Err(SubscriptionEnd::Failed(e)) => {
                tracing::error!(error = %e, "a stream failed reading the log");
                return;
            }
        }
    }
}
