//! Server-Sent Events: a stream runs on its connection's thread and writes each event to the
//! socket in one write. A stream resumes strictly after Last-Event-ID (the global seq).

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use atelier_storage::{Filter, Subscription, SubscriptionEnd};

use crate::conn::{write_response, Body, Close};
use crate::{render, Shared};

/// The `retry:` hint sent first: how long a browser waits before reconnecting.
pub const RETRY_HINT_MS: u64 = 2_000;
/// How often a stream thread looks at the shutdown flag while idle. Each look wakes the
/// thread (and crossbeam spins a little before it sleeps again): 10,000 idle streams at
/// 500 ms cost a tenth of a core; `Server::shutdown` waits up to 3 s for them.
const SHUTDOWN_POLL: Duration = Duration::from_millis(2_000);

pub(crate) struct StreamSpec {
    pub filter: Filter,
    pub after: u64,
    /// A per-commission stream ends after a terminal event.
    pub end_on_terminal: bool,
}

/// Runs a stream on its connection's thread until the client goes, the stream ends or the
/// server shuts down.
pub(crate) fn serve(stream: &TcpStream, spec: StreamSpec, shared: &Arc<Shared>) {
    shared.streams.fetch_add(1, Ordering::SeqCst);
    shared.metrics.sse_connections.fetch_add(1, Ordering::Relaxed);
    run(stream, spec, shared);
    shared.metrics.sse_connections.fetch_sub(1, Ordering::Relaxed);
    shared.streams.fetch_sub(1, Ordering::SeqCst);
}

fn run(stream: &TcpStream, spec: StreamSpec, shared: &Arc<Shared>) {
    let mut sub = match shared.store.subscribe(spec.after, spec.filter.clone()) {
        Ok(s) => s,
        Err(e) => {
            let body = render::error("storage", &e.to_string()).to_string();
            let _ = write_response(stream, 500, "application/json", body.as_bytes(), &[], Close::Yes, Body::Send);
            return;
        }
    };
    let mut w = stream;
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: close\r\nX-Accel-Buffering: no\r\n\r\nretry: {RETRY_HINT_MS}\n\n"
    );
    if w.write_all(head.as_bytes()).is_err() {
        return;
    }
    let heartbeat = Duration::from_millis(shared.config.heartbeat_ms.max(1));
    let mut last_write = Instant::now();
    loop {
        if shared.shutting_down.load(Ordering::SeqCst) {
            return;
        }
        // History is read on the handler pool, never on this thread (see `on_pool`).
        let next = if sub.wants_history() {
            match on_pool(shared, sub) {
                Some(moved) => sub = moved,
                None => return,
            }
            continue;
        } else {
            sub.next_timeout(heartbeat.min(SHUTDOWN_POLL))
        };
        match next {
            Ok(Some(d)) => {
                let msg = render::sse_message(&d.env, &d.view);
                if w.write_all(msg.as_bytes()).is_err() {
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
                    if w.write_all(b": heartbeat\n\n").is_err() {
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

/// Reads a subscription's next chunk of history on a handler thread and hands it back; `None`
/// if the stream should end (an error, or the server is stopping).
///
/// Why: every thread that touches sled joins crossbeam-epoch's collector for good, and each
/// epoch advance walks all of them. With the reads on 10,000 stream threads, 5,000 cancels
/// took 11–17 s instead of 2.5 s and opening the streams 4–11 s instead of 1.7 s (bench-sse);
/// the 8 handler threads are members anyway.
fn on_pool(shared: &Arc<Shared>, mut sub: Subscription) -> Option<Subscription> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    let job: crate::conn::Job = Box::new(move || {
        let read = sub.read_history();
        let _ = tx.send((sub, read));
    });
    shared.jobs.send(job).ok()?;
    match rx.recv().ok()? {
        (sub, Ok(())) => Some(sub),
        (_, Err(SubscriptionEnd::Failed(e))) => {
            tracing::error!(error = %e, "a stream failed reading the log");
            None
        }
        (_, Err(_)) => None,
    }
}
