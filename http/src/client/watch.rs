//! `atelier watch`: follows one commission over the client's SSE stream and draws per-stage
//! progress bars (plain lines when stdout is not a terminal), reconnecting from the last event
//! it saw when the connection breaks. It sits beside the client it drives; the binary only
//! turns the [`Outcome`] into an exit code. What the server sends is made printable as it
//! arrives (workers write the messages), so nothing below prints raw text.

use std::time::Duration;

use serde_json::Value;

use super::printable::{printable, printable_json};
use super::{Client, ClientError, StreamEvent};

/// How often `watch` tries to reconnect before giving up.
pub const WATCH_RECONNECTS_MAX: u32 = 120;
/// The pause between two reconnection attempts.
pub const WATCH_RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// How the watched commission ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    Failed,
    Cancelled,
}

#[derive(Debug)]
pub enum WatchError {
    /// A request failed.
    Client(ClientError),
    /// The server refused the stream (a 4xx: no such commission, not yours, a bad token).
    Refused(ClientError),
    /// The server stayed unreachable for this many tries.
    GaveUp { tries: u32 },
}

impl std::fmt::Display for WatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WatchError::Client(e) => e.fmt(f),
            WatchError::Refused(_) => write!(f, "the server refused to stream the commission"),
            WatchError::GaveUp { tries } => write!(f, "lost the server for {tries} tries; giving up"),
        }
    }
}

impl std::error::Error for WatchError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            // Displayed as itself above, so its own source comes next in the chain.
            WatchError::Client(e) => e.source(),
            WatchError::Refused(e) => Some(e),
            WatchError::GaveUp { .. } => None,
        }
    }
}

impl From<ClientError> for WatchError {
    fn from(e: ClientError) -> Self {
        WatchError::Client(e)
    }
}

fn is_terminal_state(state: &str) -> bool {
    matches!(state, "completed" | "failed" | "cancelled")
}

fn state_of(v: &Value) -> String {
    v["state"].as_str().unwrap_or("").to_string()
}

/// The commission's snapshot, made printable.
fn snapshot(c: &Client, path: &str) -> Result<Value, ClientError> {
    Ok(printable_json(&c.json("GET", path, None)?.1))
}

/// Follows commission `id` until it ends, drawing its progress on stdout.
pub fn watch(c: &Client, id: u64) -> Result<Outcome, WatchError> {
    let snapshot_path = format!("/api/commissions/{id}");
    let snap = snapshot(c, &snapshot_path)?;
    let bars = Bars::new(&snap);
    let mut last = snap["last_event_id"].as_u64();
    let mut state = state_of(&snap);
    let mut reconnects = 0;
    let mut announced = false;
    while !is_terminal_state(&state) {
        match c.stream(&format!("/api/progress/{id}/stream"), last) {
            Ok(Some(mut stream)) => {
                // Until the stream ends or breaks (then resume after `last`).
                while let Ok(Some(e)) = stream.next() {
                    reconnects = 0;
                    announced = false;
                    if e.id.is_some() {
                        last = e.id;
                    }
                    let e = StreamEvent { event: printable(&e.event), data: printable_json(&e.data), ..e };
                    state = state_of(&e.data);
                    bars.apply(&e);
                }
            }
            Ok(None) => {
                // 204: finished, nothing newer than what we saw.
                state = state_of(&snapshot(c, &snapshot_path)?);
            }
            Err(e @ ClientError::Api { status, .. }) if status < 500 => return Err(WatchError::Refused(e)),
            Err(e) => tracing::debug!(error = %e, "watch: connection failed"),
        }
        if is_terminal_state(&state) {
            break;
        }
        if !announced {
            bars.line("reconnecting…");
            announced = true;
        }
        reconnects += 1;
        if reconnects > WATCH_RECONNECTS_MAX {
            return Err(WatchError::GaveUp { tries: WATCH_RECONNECTS_MAX });
        }
        std::thread::sleep(WATCH_RECONNECT_DELAY);
    }
    let snap = snapshot(c, &snapshot_path)?;
    Ok(bars.finish(&state, &snap))
}

/// Per-stage progress bars; plain lines when stdout is not a terminal.
struct Bars {
    multi: indicatif::MultiProgress,
    stages: Vec<(String, indicatif::ProgressBar)>,
    plain: bool,
}

impl Bars {
    fn new(snap: &Value) -> Bars {
        use std::io::IsTerminal;
        let plain = !std::io::stdout().is_terminal();
        let multi = indicatif::MultiProgress::new();
        if plain {
            multi.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        let style = indicatif::ProgressStyle::with_template("{prefix:>18} [{bar:30}] {pos:>3}% {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> ");
        let stages = snap["stages"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| {
                let bar = multi.add(indicatif::ProgressBar::new(100));
                bar.set_style(style.clone());
                bar.set_prefix(s["name"].as_str().unwrap_or("").replace('_', " "));
                bar.set_position(s["progress_percent"].as_u64().unwrap_or(0));
                (s["name"].as_str().unwrap_or("").to_string(), bar)
            })
            .collect();
        let bars = Bars { multi, stages, plain };
        if plain {
            // Without a terminal there are no bars: print where the commission stands first, so
            // output that starts mid-way (the watch began after some events) is still complete.
            bars.line(&format!(
                "commission {}: {} {}%",
                snap["task_id"],
                snap["state"].as_str().unwrap_or("?"),
                snap["progress_percent"].as_u64().unwrap_or(0)
            ));
            for s in snap["stages"].as_array().into_iter().flatten() {
                bars.line(&format!(
                    "  {:<18} {:<10} {:>3}%",
                    s["name"].as_str().unwrap_or(""),
                    s["state"].as_str().unwrap_or(""),
                    s["progress_percent"].as_u64().unwrap_or(0)
                ));
            }
        }
        bars
    }

    fn line(&self, text: &str) {
        if self.plain {
            println!("{text}");
        } else {
            let _ = self.multi.println(text);
        }
    }

    fn apply(&self, e: &StreamEvent) {
        let d = &e.data;
        let stage = d["stage"].as_str().unwrap_or("");
        let state = d["state"].as_str().unwrap_or("");
        let mut reached = true;
        for (name, bar) in &self.stages {
            if name == stage {
                reached = false;
                if let Some(p) = d["stage_progress_percent"].as_u64() {
                    bar.set_position(p);
                }
                if let Some(m) = d["message"].as_str() {
                    bar.set_message(m.to_string());
                }
            } else if reached && !stage.is_empty() || state == "completed" {
                bar.set_position(100);
            }
        }
        self.line(&format!(
            "{:>6} {:<16} {:<18} {:<18} {:>3}%{}",
            e.id.map(|i| i.to_string()).unwrap_or_default(),
            e.event,
            state,
            if stage.is_empty() { "-" } else { stage },
            d["progress_percent"].as_u64().unwrap_or(0),
            d["message"].as_str().map(|m| format!("  {m}")).unwrap_or_default()
        ));
    }

    /// Leaves the bars as they stand and prints how the commission ended.
    fn finish(&self, state: &str, snap: &Value) -> Outcome {
        for (_, bar) in &self.stages {
            bar.abandon();
        }
        match state {
            "completed" => {
                let product = &snap["result"]["product"];
                self.line(&format!(
                    "completed: {}",
                    product["title"].as_str().unwrap_or("(no product title)")
                ));
                if let Some(img) = product["image_url"].as_str() {
                    self.line(&format!("image: {img}"));
                }
                Outcome::Completed
            }
            "failed" => {
                self.line(&format!("failed: {}", snap["error"].as_str().unwrap_or("(no error message)")));
                Outcome::Failed
            }
            _ => {
                self.line("cancelled");
                Outcome::Cancelled
            }
        }
    }
}
