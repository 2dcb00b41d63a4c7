//! Server-Sent Events: a stream runs on its connection's thread and writes the events that are
//! ready together in one write. A stream resumes strictly after Last-Event-ID (the global seq).

use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use atelier_storage::{Delivery, Filter, StorageError, Subscription, SubscriptionEnd};

use crate::pool::Job;
use crate::render;
use crate::shares::StreamTicket;
use crate::state::Shared;

/// The `retry:` hint sent first: how long a browser waits before reconnecting.
pub const RETRY_HINT_MS: u64 = 2_000;
/// How often a stream thread looks at the shutdown flag while idle. Each look wakes the
/// thread (and crossbeam spins a little before it sleeps again): 10,000 idle streams at
/// 500 ms cost a tenth of a core; `Server::shutdown` waits up to 3 s for them.
const SHUTDOWN_POLL: Duration = Duration::from_millis(2_000);
/// Events ready at once are gathered into one write up to about this many bytes.
const SSE_WRITE_BYTES_TARGET: usize = 64 * 1024;
/// A stream's write buffer beyond this is given back after the write.
const SSE_IDLE_BUFFER_BYTES_MAX: usize = 4 * 1024;

pub(crate) struct StreamSpec {
    pub filter: Filter,
    pub after: u64,
    /// A per-commission stream ends after a terminal event.
    pub end_on_terminal: bool,
    /// The stream's place in its user's share, held until the stream ends.
    pub ticket: Option<StreamTicket>,
}

/// A stream ready to run: subscribed, its first chunk of history read.
pub(crate) struct Opened {
    sub: Subscription,
    end_on_terminal: bool,
    /// The secret's generation its token was checked under: a rotation ends the stream (its
    /// client resumes with a new token and Last-Event-ID), so a revoked token keeps nothing.
    generation: u64,
    /// Given back when the stream ends, with this value.
    _ticket: Option<StreamTicket>,
}

/// Why a stream could not be opened; the route answers it (500 and 503).
#[derive(Debug)]
pub(crate) enum OpenError {
    /// Subscribing or reading the first history failed.
    Storage(StorageError),
    /// The subscription closed before its first read: the server is stopping.
    ShuttingDown,
}

/// Subscribes and reads the first chunk of history, on the handler thread that routed the
/// request: most streams start with a short history (a commission just created), and reading
/// it here spares the stream's thread a round trip to the pool before its first write.
pub(crate) fn open(spec: StreamSpec, shared: &Arc<Shared>) -> Result<Opened, OpenError> {
    let generation = shared.keys.generation();
    let mut sub = shared.store.subscribe(spec.after, spec.filter).map_err(OpenError::Storage)?;
    match sub.read_history() {
        Ok(()) => Ok(Opened { sub, end_on_terminal: spec.end_on_terminal, generation, _ticket: spec.ticket }),
        Err(SubscriptionEnd::Failed(e)) => {
            tracing::error!(error = %e, "a stream failed reading the log");
            Err(OpenError::Storage(e))
        }
        Err(_) => Err(OpenError::ShuttingDown),
    }
}

/// How a stream's bytes are framed on the connection.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// The body runs to the connection's close (HTTP/1.0, `Connection: close`, and streams
    /// that never end on their own).
    UntilClose,
    /// `Transfer-Encoding: chunked`: a stream that ends (a commission's, at its terminal event)
    /// ends with the last chunk, and the connection serves the client's next request. Why: a
    /// client following one commission after another otherwise pays a TCP connect, and the
    /// server a thread, per commission.
    Chunked,
}

impl Opened {
    /// Whether this stream ends by itself (and so can hand its connection back).
    pub(crate) fn ends(&self) -> bool {
        self.end_on_terminal
    }
}

/// Runs a stream on its connection's thread until the client goes, the stream ends or the
/// server shuts down. True when the stream ended at its terminal event with its body complete
/// (chunked framing): the connection can take another request.
pub(crate) fn serve(w: &mut dyn Write, opened: Opened, framing: Framing, shared: &Arc<Shared>) -> bool {
    shared.streams.fetch_add(1, Ordering::SeqCst);
    shared.metrics.sse_connections.inc();
    let completed = run(w, opened, framing, shared);
    shared.metrics.sse_connections.dec();
    shared.streams.fetch_sub(1, Ordering::SeqCst);
    completed && framing == Framing::Chunked
}

/// A stream's pending output: the response head until it is sent, then body bytes, framed
/// on the way out.
struct Out {
    head: Option<String>,
    body: String,
    framing: Framing,
    /// The bytes of one write (head, framed body), reused.
    wire: Vec<u8>,
}

impl Out {
    /// Writes the head (if not yet sent) and the pending body in one write; `last` ends a
    /// chunked body in the same write, so the client sees the terminal event and the end
    /// of the response together.
    fn write(&mut self, w: &mut dyn Write, last: bool) -> std::io::Result<()> {
        self.wire.clear();
        if let Some(head) = self.head.take() {
            self.wire.extend_from_slice(head.as_bytes());
        }
        match self.framing {
            Framing::UntilClose => self.wire.extend_from_slice(self.body.as_bytes()),
            Framing::Chunked => {
                // A zero-size chunk would end the body; an empty write sends none.
                if !self.body.is_empty() {
                    self.wire.extend_from_slice(format!("{:x}\r\n", self.body.len()).as_bytes());
                    self.wire.extend_from_slice(self.body.as_bytes());
                    self.wire.extend_from_slice(b"\r\n");
                }
                if last {
                    self.wire.extend_from_slice(b"0\r\n\r\n");
                }
            }
        }
        w.write_all(&self.wire)?;
        // The connection's writer buffers small writes; an event must not wait there.
        w.flush()?;
        self.body.clear();
        // A long history's buffers are not kept by an idle stream (10,000 may be open).
        if self.body.capacity() > SSE_IDLE_BUFFER_BYTES_MAX {
            self.body = String::new();
        }
        if self.wire.capacity() > SSE_IDLE_BUFFER_BYTES_MAX {
            self.wire = Vec::new();
        }
        Ok(())
    }

    fn pending(&self) -> bool {
        self.head.is_some() || !self.body.is_empty()
    }
}

/// True when the stream ended at its terminal event and every byte of it was written.
fn run(w: &mut dyn Write, opened: Opened, framing: Framing, shared: &Arc<Shared>) -> bool {
    let Opened { mut sub, end_on_terminal, generation, _ticket } = opened;
    let length = match framing {
        Framing::UntilClose => "Connection: close",
        Framing::Chunked => "Transfer-Encoding: chunked",
    };
    // The head goes out with the first events when history is read first (one write, one
    // wake-up for the client), on its own otherwise, so a client waiting for the future
    // still sees the stream open at once. The `retry:` field takes effect as its line is
    // read; it needs no blank line of its own (one line fewer for every client to parse).
    let mut out = Out {
        head: Some(format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n{length}\r\nX-Accel-Buffering: no\r\n\r\n"
        )),
        body: format!("retry: {RETRY_HINT_MS}\n"),
        framing,
        wire: Vec::new(),
    };
    let heartbeat = Duration::from_millis(shared.config.heartbeat_ms.max(1));
    let mut last_write = Instant::now();
    loop {
        if shared.shutting_down.load(Ordering::SeqCst) || shared.keys.generation() != generation {
            // A chunked body gets its last chunk, so the client reads a complete response
            // (and resumes with Last-Event-ID, after a rotation with a new token) rather than
            // a cut one.
            let _ = out.write(w, true);
            return false;
        }
        // History is read on the handler pool, never on this thread (see `on_pool`).
        if sub.wants_history() {
            match on_pool(shared, sub) {
                Some(moved) => sub = moved,
                None => return false,
            }
            continue;
        }
        // Everything ready now goes out in one write: a worker's reports arrive as one
        // append, and one write instead of one per event spares the client (and loopback)
        // a wake-up per event.
        let mut ended = false;
        while out.body.len() < SSE_WRITE_BYTES_TARGET {
            let Some(d) = sub.try_next() else { break };
            ended = add(&mut out.body, &d, end_on_terminal, shared);
            if ended {
                break;
            }
        }
        if out.pending() || ended {
            if out.write(w, ended).is_err() {
                return false;
            }
            last_write = Instant::now();
        }
        if ended {
            return true;
        }
        // Drained the history read so far: the next chunk (or the registration for live
        // events, which reads what landed meanwhile) is read on the pool, at the top. Left
        // to `next_timeout`, it would read the store on this thread.
        if sub.wants_history() {
            continue;
        }
        match sub.next_timeout(heartbeat.min(SHUTDOWN_POLL)) {
            // Written at the top of the loop, with whatever else is ready by then.
            Ok(Some(d)) => {
                if add(&mut out.body, &d, end_on_terminal, shared) {
                    return out.write(w, true).is_ok();
                }
            }
            Ok(None) => {
                if last_write.elapsed() >= heartbeat {
                    out.body.push_str(": heartbeat\n\n");
                    if out.write(w, false).is_err() {
                        return false;
                    }
                    last_write = Instant::now();
                }
            }
            Err(SubscriptionEnd::Overflow { last_seq }) => {
                tracing::info!(last_seq, "dropped a slow stream; the client can resume");
                return false;
            }
            Err(SubscriptionEnd::Closed) => return false,
            Err(SubscriptionEnd::Failed(e)) => {
                tracing::error!(error = %e, "a stream failed reading the log");
                return false;
            }
        }
    }
}

/// Renders one event onto `out`; true if the stream ends with it.
fn add(out: &mut String, d: &Delivery, end_on_terminal: bool, shared: &Shared) -> bool {
    render::push_sse_message(out, &d.env, &d.view);
    shared.metrics.sse_events_sent.inc();
    end_on_terminal && d.env.event.kind().is_terminal()
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
    let job: Job = Box::new(move || {
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
