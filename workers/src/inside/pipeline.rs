//! The pipeline code both executors run: the four stages in order, each a built-in step or an
//! external command, reported through the worker protocol.
//!
//! The worker process reports by writing lines to fd 3; the task runner hands the same
//! messages straight to its session. Because the code and its inputs are the same, both
//! executors produce the same result for the same commission, and every built-in step is
//! deterministic in the commission's context (no clock, no randomness).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use atelier_engine::Stage;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::config::{Builtin, PipelineConfig, StageSpec};
use crate::inside::private;
use crate::inside::protocol::Message;

/// A test delay in the context (`delay_ms`) is cut to this, per stage.
pub const DELAY_MS_MAX: u64 = 60_000;
/// `progress_steps` in the context is cut to this (refused above it on create; a commission
/// logged before that check still has its steps cut here).
pub use atelier_engine::limits::PROGRESS_STEPS_MAX;
pub const IMAGE_SIDE_PX: u32 = 256;
/// Ideas derived per commission.
pub const IDEAS_COUNT: usize = 3;
/// Title and text are cut to this many characters before ideas are derived from them.
const TITLE_CHARS_MAX: usize = 120;

/// What a job runs on, written by the executor for the worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobInput {
    pub commission_id: u64,
    pub job_id: u64,
    pub attempt: u32,
    pub pipeline: String,
    pub context: Value,
}

/// Where a running pipeline keeps files.
#[derive(Clone, Debug)]
pub struct RunEnv {
    /// The job's own directory; it may not exist yet (see [`RunEnv::make_job_dir`]).
    pub job_dir: PathBuf,
    pub artifacts_dir: PathBuf,
    /// How often to show signs of life while waiting (heartbeats; cancel checks in-process).
    pub tick: Duration,
}

impl RunEnv {
    /// The job's directory, made if it is not there yet. A job's directory is made when
    /// something goes in it (a rendered image, a stage command's working directory, a log):
    /// a `mkdir` is a measurable share of a short job's whole CPU cost (BENCHMARKS.md, "Job
    /// controller"), and most `noop` jobs never put anything there.
    pub fn make_job_dir(&self) -> Result<&Path, String> {
        private::create_dir_all(&self.job_dir)
            .map_err(|e| format!("cannot create {}: {e}", self.job_dir.display()))?;
        Ok(&self.job_dir)
    }
}

/// The reporter refused a message: the job is being cancelled, or its channel is gone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stop(pub String);

pub trait Reporter {
    fn send(&mut self, msg: Message) -> Result<(), Stop>;

    /// Called while waiting without anything to send: `Err` when the job must stop.
    fn check(&mut self) -> Result<(), Stop> {
        Ok(())
    }

    /// Sends messages that were all ready at once (an instant pipeline's whole run). A
    /// reporter may deliver them together (one write, one append) instead of one by one.
    fn send_all(&mut self, msgs: Vec<Message>) -> Result<(), Stop> {
        msgs.into_iter().try_for_each(|m| self.send(m))
    }
}

/// Gathers an instant run's messages for one `send_all`.
struct Gather(Vec<Message>);

impl Reporter for Gather {
    fn send(&mut self, msg: Message) -> Result<(), Stop> {
        self.0.push(msg);
        Ok(())
    }
}

/// Whether the whole run is instant: every stage a `noop` step and no test delay. Such a run
/// reports everything in one go (`Reporter::send_all`): for the noop pipeline, one write and
/// one wake-up of the job's watcher instead of five. Any other run reports as it goes, so
/// progress and heartbeats are never held back.
fn instant(spec: &PipelineConfig, input: &JobInput) -> bool {
    spec.stages.iter().all(|s| matches!(s, StageSpec::Builtin(Builtin::Noop)))
        && input.context.get("delay_ms").is_none()
}

/// A step failed; the pipeline reports it as the worker's `error` line.
#[derive(Debug)]
enum StepError {
    Fail { error: String, retryable: bool },
    Stop(Stop),
}

impl From<Stop> for StepError {
    fn from(s: Stop) -> Self {
        StepError::Stop(s)
    }
}

fn fail(error: impl Into<String>, retryable: bool) -> StepError {
    StepError::Fail { error: error.into(), retryable }
}

/// Runs the pipeline to its `result` or `error` line. `Err` only when the reporter stopped it.
pub fn run(
    spec: &PipelineConfig,
    input: &JobInput,
    env: &RunEnv,
    rep: &mut dyn Reporter,
) -> Result<(), Stop> {
    if instant(spec, input) {
        let mut gathered = Gather(Vec::new());
        run_steps(spec, input, env, &mut gathered)?;
        return rep.send_all(gathered.0);
    }
    run_steps(spec, input, env, rep)
}

fn run_steps(
    spec: &PipelineConfig,
    input: &JobInput,
    env: &RunEnv,
    rep: &mut dyn Reporter,
) -> Result<(), Stop> {
    let mut state = Map::new();
    for stage in Stage::ALL {
        rep.send(Message::Stage { stage })?;
        let outcome = test_hooks(stage, input, env, rep).and_then(|()| match &spec.stages[stage.index()] {
            StageSpec::Builtin(b) => run_builtin(*b, stage, input, env, &mut state, rep),
            StageSpec::Command(argv) => run_command(argv, stage, input, env, &mut state, rep),
        });
        match outcome {
            Ok(()) => {}
            Err(StepError::Stop(s)) => return Err(s),
            Err(StepError::Fail { error, retryable }) => {
                return rep.send(Message::Error { error: format!("{stage}: {error}"), retryable });
            }
        }
    }
    rep.send(Message::Result { result: result_of(state) })
}

/// The result: ideas and product when the pipeline made them, else the state without
/// executor-local paths, else `{"ok": true}`.
fn result_of(mut state: Map<String, Value>) -> Value {
    if let (Some(ideas), Some(product)) = (state.get("ideas"), state.get("product")) {
        return json!({ "ideas": ideas, "product": product });
    }
    state.remove("image_path");
    if state.is_empty() {
        return json!({ "ok": true });
    }
    Value::Object(state)
}

/// Context switches for tests and demos: `delay_ms` (per stage), `fail` ("retryable" or
/// "permanent") in `fail_stage` (default the first) while `attempt <= fail_attempts` (default
/// always). They only slow or fail the commission that asks for them.
fn test_hooks(stage: Stage, input: &JobInput, env: &RunEnv, rep: &mut dyn Reporter) -> Result<(), StepError> {
    let ctx = &input.context;
    if let Some(ms) = ctx.get("delay_ms").and_then(Value::as_u64) {
        wait(Duration::from_millis(ms.min(DELAY_MS_MAX)), env.tick, rep)?;
    }
    let fail_stage =
        ctx.get("fail_stage").and_then(Value::as_str).and_then(Stage::parse).unwrap_or(Stage::FIRST);
    let fail_attempts = ctx.get("fail_attempts").and_then(Value::as_u64).unwrap_or(u64::MAX);
    if stage == fail_stage && u64::from(input.attempt) <= fail_attempts {
        match ctx.get("fail").and_then(Value::as_str) {
            Some("retryable") => return Err(fail("asked to fail (retryable)", true)),
            Some("permanent") => return Err(fail("asked to fail (permanent)", false)),
            _ => {}
        }
    }
    Ok(())
}

/// Waits `total`, with a heartbeat every `tick` (which is also when a cancel is noticed).
fn wait(total: Duration, tick: Duration, rep: &mut dyn Reporter) -> Result<(), Stop> {
    let end = Instant::now() + total;
    loop {
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        std::thread::sleep((end - now).min(tick));
        rep.send(Message::Heartbeat {})?;
    }
}

fn progress(rep: &mut dyn Reporter, stage: Stage, percent: u32, message: &str) -> Result<(), Stop> {
    rep.send(Message::Progress { stage, percent, message: Some(message.to_string()) })
}

fn hash(parts: &[&str]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0u8]);
    }
    h.finalize().into()
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs one built-in stage. Long because it has one arm per built-in, each short, so the
/// built-ins are read as one list.
fn run_builtin(
    b: Builtin,
    stage: Stage,
    input: &JobInput,
    env: &RunEnv,
    state: &mut Map<String, Value>,
    rep: &mut dyn Reporter,
) -> Result<(), StepError> {
    match b {
        Builtin::Noop => {
            // Without steps the stage completes at once: entering the next stage (or the
            // result) says so, and a "100%" line would only be one more event per stage.
            let steps = input
                .context
                .get("progress_steps")
                .and_then(Value::as_u64)
                .unwrap_or(0)
                .min(PROGRESS_STEPS_MAX);
            for i in 0..steps {
                let percent = u32::try_from(i * 100 / steps).expect("invariant: below 100");
                progress(rep, stage, percent, "working")?;
            }
            if steps > 0 {
                progress(rep, stage, 100, "done")?;
            }
        }
        Builtin::Fail => {
            let retryable = input.context.get("fail").and_then(Value::as_str) == Some("retryable");
            return Err(fail("the fail pipeline always fails", retryable));
        }
        Builtin::Ideas => {
            let ideas = derive_ideas(&input.context);
            for i in 1..=ideas.len() {
                let percent = u32::try_from(i * 100 / ideas.len()).expect("invariant: at most 100");
                progress(rep, stage, percent, &format!("idea {i} of {}", ideas.len()))?;
            }
            state.insert("ideas".into(), Value::Array(ideas));
        }
        Builtin::RenderImage => {
            let title = first_idea_title(state)?;
            let seed = hash(&["image", &title]);
            let side = IMAGE_SIDE_PX;
            let rgb = render(side, &seed, |row| {
                if row % 64 == 63 {
                    let percent = (row + 1) * 100 / side;
                    progress(rep, stage, percent, &format!("rendered {} of {side} rows", row + 1))
                } else {
                    Ok(())
                }
            })?;
            let png = crate::inside::png::encode_rgb(side, side, &rgb);
            let path = env.make_job_dir().map_err(|e| fail(e, true))?.join("image.png");
            write_atomic(&path, &png)
                .map_err(|e| fail(format!("cannot write {}: {e}", path.display()), true))?;
            state.insert("image_path".into(), Value::String(path.display().to_string()));
        }
        Builtin::ArtifactStore => {
            let path = state
                .get("image_path")
                .and_then(Value::as_str)
                .map(PathBuf::from)
                .ok_or_else(|| fail("no image to store (no creating_images step made one)", false))?;
            let bytes = std::fs::read(&path)
                .map_err(|e| fail(format!("cannot read {}: {e}", path.display()), true))?;
            let digest = hex(&Sha256::digest(&bytes));
            let dest = env.artifacts_dir.join(format!("{digest}.png"));
            // Written even when a file of that name is there: another job may have left one
            // under this name with other content (the server serves only what hashes to its
            // name, but this job's image must be what is there). The rename also renews the
            // file's age, by which the janitor removes unreferenced artifacts.
            private::create_dir_all(&env.artifacts_dir)
                .map_err(|e| fail(format!("cannot create {}: {e}", env.artifacts_dir.display()), true))?;
            write_atomic(&dest, &bytes)
                .map_err(|e| fail(format!("cannot store {}: {e}", dest.display()), true))?;
            let uri = format!("/artifacts/{digest}.png");
            rep.send(Message::Artifact { stage, kind: "image".into(), uri: uri.clone() })?;
            progress(rep, stage, 100, "stored")?;
            state.insert("image_url".into(), Value::String(uri));
            state.insert("image_sha256".into(), Value::String(digest));
        }
        Builtin::Product => {
            let idea = state
                .get("ideas")
                .and_then(Value::as_array)
                .and_then(|a| a.first())
                .cloned()
                .ok_or_else(|| fail("no idea to make a product of", false))?;
            let title = idea.get("title").and_then(Value::as_str).unwrap_or("Untitled").to_string();
            let pitch = idea.get("pitch").and_then(Value::as_str).unwrap_or("").to_string();
            let image_url = state.get("image_url").cloned().unwrap_or(Value::Null);
            let h = hash(&["price", &title]);
            let price_cents = 1500 + (u64::from(u16::from_be_bytes([h[0], h[1]])) % 35) * 100 + 99;
            let product = json!({
                "title": title,
                "description": pitch,
                "image_url": image_url,
                "price_cents": price_cents,
                "currency": "USD",
            });
            progress(rep, stage, 100, "product ready")?;
            state.insert("product".into(), product);
        }
    }
    Ok(())
}

fn first_idea_title(state: &Map<String, Value>) -> Result<String, StepError> {
    state
        .get("ideas")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .and_then(|i| i.get("title"))
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| fail("no idea to draw (no generating_ideas step made one)", false))
}

const STYLES: [&str; 8] =
    ["Minimal", "Vintage", "Bold", "Pastel", "Geometric", "Botanical", "Retro", "Cosmic"];
const PRODUCTS: [&str; 8] =
    ["Poster", "Mug", "T-shirt", "Tote bag", "Notebook", "Sticker set", "Phone case", "Pillow"];

fn text_field(ctx: &Value, key: &str) -> String {
    let s = ctx.get(key).and_then(Value::as_str).unwrap_or("").trim();
    s.chars().take(TITLE_CHARS_MAX).collect()
}

/// Three ideas from the context's title and text, the same for the same input.
pub fn derive_ideas(ctx: &Value) -> Vec<Value> {
    let mut title = text_field(ctx, "title");
    if title.is_empty() {
        title = "Untitled".into();
    }
    let text = text_field(ctx, "text");
    let h = hash(&["ideas", &title, &text]);
    let mut used = Vec::new();
    (0..IDEAS_COUNT)
        .map(|i| {
            let style = STYLES[usize::from(h[2 * i]) % STYLES.len()];
            // Three different products, so the ideas are really alternatives.
            let mut p = usize::from(h[2 * i + 1]) % PRODUCTS.len();
            while used.contains(&p) {
                p = (p + 1) % PRODUCTS.len();
            }
            used.push(p);
            let product = PRODUCTS[p];
            let about = if text.is_empty() { String::new() } else { format!(", after \"{text}\"") };
            json!({
                "title": format!("{style} {product}: {title}"),
                "pitch": format!("A {} {} inspired by \"{title}\"{about}", style.to_lowercase(), product.to_lowercase()),
            })
        })
        .collect()
}

fn color(seed: &[u8], at: usize) -> [u8; 3] {
    [seed[at % 32], seed[(at + 1) % 32], seed[(at + 2) % 32]]
}

/// A `side`×`side` RGB image: a vertical gradient between two seed colours, diagonal bands
/// and a disc, all from the seed. `on_row` is called after each row (for progress).
fn render(
    side: u32,
    seed: &[u8; 32],
    mut on_row: impl FnMut(u32) -> Result<(), Stop>,
) -> Result<Vec<u8>, Stop> {
    let (top, bottom, band, disc) = (color(seed, 0), color(seed, 3), color(seed, 6), color(seed, 9));
    let bands = 3 + u32::from(seed[12] % 5);
    let band_px = 8 + u32::from(seed[13] % 16);
    let (cx, cy) = (
        i64::from(side / 4 + u32::from(seed[14]) % (side / 2)),
        i64::from(side / 4 + u32::from(seed[15]) % (side / 2)),
    );
    let r = i64::from(side / 8 + u32::from(seed[16]) % (side / 6));
    let period = side / bands;
    let cap = usize::try_from(side * side * 3).expect("invariant: small image");
    let mut rgb = Vec::with_capacity(cap);
    for y in 0..side {
        for x in 0..side {
            let (dx, dy) = (i64::from(x) - cx, i64::from(y) - cy);
            let px = if dx * dx + dy * dy <= r * r {
                disc
            } else if (x + y) % period < band_px {
                band
            } else {
                let t = y * 255 / (side - 1);
                let mix = |a: u8, b: u8| -> u8 {
                    let v = (u32::from(a) * (255 - t) + u32::from(b) * t) / 255;
                    u8::try_from(v).expect("invariant: a weighted mean of bytes is a byte")
                };
                [mix(top[0], bottom[0]), mix(top[1], bottom[1]), mix(top[2], bottom[2])]
            };
            rgb.extend_from_slice(&px);
        }
        on_row(y)?;
    }
    Ok(rgb)
}

/// Writes via a temporary file in the same directory and a rename, so a reader never sees a
/// partial file (and two writers of the same content-addressed file cannot interleave).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.{:?}.tmp", std::process::id(), std::thread::current().id()));
    let result = (|| {
        let mut f = private::create_file(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// What a stage command's stdout reader hands the runner.
enum FromCommand {
    Line(Result<Message, String>),
    Eof,
}

/// Runs an external stage command. It speaks the worker protocol for its one stage, on its
/// stdout: `progress`, `artifact` and `heartbeat` lines for the stage (relayed as they come),
/// then one `result` line whose value, a JSON object, is merged into the pipeline state, or
/// an `error` line. It gets the stage input as JSON on stdin; its stderr is the job's stderr.
/// Anything else it prints fails the stage.
///
/// The stage command gets SIGKILL when this worker dies: a worker dies with its server
/// (PDEATHSIG), and a stage command left running after its server was SIGKILLed would go on
/// while another node, having taken the job over, runs it again. (What the command itself
/// starts is its own to end; on the next start of that server its process group is killed.)
fn dies_with_this_process(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    let parent = nix::unistd::getpid();
    // SAFETY: between fork and exec this only calls prctl and getppid, both
    // async-signal-safe, and allocates nothing.
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)?;
            // The worker may have died before the prctl took: then no signal would come.
            if nix::unistd::getppid() != parent {
                return Err(std::io::Error::other("the worker is gone"));
            }
            Ok(())
        });
    }
}

/// Long because the spawn, the relay of its lines and the wait with its
/// deadline share the child and the channel, and read as one sequence.
fn run_command(
    argv: &[String],
    stage: Stage,
    input: &JobInput,
    env: &RunEnv,
    state: &mut Map<String, Value>,
    rep: &mut dyn Reporter,
) -> Result<(), StepError> {
    let name = &argv[0];
    let stdin_doc = json!({
        "stage": stage,
        "commission_id": input.commission_id,
        "job_id": input.job_id,
        "attempt": input.attempt,
        "context": input.context,
        "state": state,
    });
    let job_dir = env.make_job_dir().map_err(|e| fail(e, true))?;
    let mut command = std::process::Command::new(name);
    dies_with_this_process(&mut command);
    // Known to the sweep until this function returns (it has reaped the command by then, or
    // gave up on it, and then the sweep ends it): see `contain`.
    let (mut child, _known) = crate::contain::spawn(
        command
            .args(&argv[1..])
            .current_dir(job_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit()),
    )
    .map_err(|e| fail(format!("cannot start {name:?}: {e}"), false))?;
    let mut stdin = child.stdin.take().expect("invariant: stdin is piped");
    let mut stdout = child.stdout.take().expect("invariant: stdout is piped");
    let doc = stdin_doc.to_string();
    // Write and read on helper threads: a command that ignores its stdin must not block us,
    // and we keep checking for cancel meanwhile.
    std::thread::spawn(move || {
        let _ = stdin.write_all(doc.as_bytes());
    });
    let (tx, rx) = crossbeam_channel::bounded(64);
    std::thread::spawn(move || {
        let mut lines = crate::inside::protocol::LineBuffer::default();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            match lines.push(&buf[..n]) {
                Ok(complete) => {
                    for l in complete {
                        if tx.send(FromCommand::Line(crate::inside::protocol::parse_line(&l))).is_err() {
                            return;
                        }
                    }
                }
                Err(e) => {
                    let _ = tx.send(FromCommand::Line(Err(e)));
                    break;
                }
            }
        }
        // Keep draining so the command never blocks on a full pipe.
        let _ = std::io::copy(&mut stdout, &mut std::io::sink());
        let _ = tx.send(FromCommand::Eof);
    });
    let outcome = relay(&rx, stage, env.tick, rep);
    let stop_child = |child: &mut std::process::Child| {
        let _ = child.kill();
        let _ = child.wait();
    };
    let (output, said_error) = match outcome {
        Ok(v) => v,
        Err(e) => {
            stop_child(&mut child);
            return Err(match e {
                StepError::Fail { error, retryable } => fail(format!("command {name:?}: {error}"), retryable),
                stop => stop,
            });
        }
    };
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {
                // It closed its stdout but goes on: wait, still noticing a cancel.
                if let Err(stop) = rep.check() {
                    stop_child(&mut child);
                    return Err(StepError::Stop(stop));
                }
                std::thread::sleep(env.tick.min(Duration::from_millis(50)));
            }
            Err(e) => return Err(fail(format!("cannot wait for {name:?}: {e}"), true)),
        }
    };
    if let Some((error, retryable)) = said_error {
        return Err(fail(format!("command {name:?}: {error}"), retryable));
    }
    if !status.success() {
        return Err(fail(format!("command {name:?} ended with {status}"), true));
    }
    match output {
        Some(fields) => {
            state.extend(fields);
            Ok(())
        }
        None => Err(fail(format!("command {name:?} printed no result line"), false)),
    }
}

type CommandOutput = (Option<Map<String, Value>>, Option<(String, bool)>);

/// Relays a stage command's lines until its stdout closes. Returns its result object and its
/// own error line, if any.
fn relay(
    rx: &crossbeam_channel::Receiver<FromCommand>,
    stage: Stage,
    tick: Duration,
    rep: &mut dyn Reporter,
) -> Result<CommandOutput, StepError> {
    let (mut output, mut said_error) = (None, None);
    loop {
        let msg = match rx.recv_timeout(tick) {
            Ok(FromCommand::Line(Ok(msg))) => msg,
            Ok(FromCommand::Line(Err(e))) => return Err(fail(e, false)),
            Ok(FromCommand::Eof) | Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                return Ok((output, said_error))
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                rep.check()?;
                continue;
            }
        };
        if output.is_some() || said_error.is_some() {
            return Err(fail("printed a line after its result or error".to_string(), false));
        }
        match msg {
            Message::Progress { stage: s, .. } | Message::Artifact { stage: s, .. } if s != stage => {
                return Err(fail(format!("reported for stage {s} while {stage} is running"), false));
            }
            m @ (Message::Progress { .. } | Message::Artifact { .. } | Message::Heartbeat {}) => {
                rep.send(m)?
            }
            Message::Result { result: Value::Object(fields) } => output = Some(fields),
            Message::Result { .. } => return Err(fail("its result is not a JSON object".to_string(), false)),
            Message::Error { error, retryable } => said_error = Some((error, retryable)),
            Message::Stage { .. } => {
                return Err(fail("printed a 'stage' line; the runner enters stages".to_string(), false));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh dir for one run's job and artifacts, removed when the guard drops.
    fn temp_dir(what: &str) -> tempfile::TempDir {
        tempfile::Builder::new().prefix(&format!("atelier-{what}-")).tempdir().expect("temp dir")
    }

    struct Collect(Vec<Message>);
    impl Reporter for Collect {
        fn send(&mut self, msg: Message) -> Result<(), Stop> {
            self.0.push(msg);
            Ok(())
        }
    }

    /// Counts how messages arrive: one by one (`send`) or together (`send_all`).
    #[derive(Default)]
    struct Calls {
        sends: usize,
        batches: Vec<usize>,
    }
    impl Reporter for Calls {
        fn send(&mut self, _: Message) -> Result<(), Stop> {
            self.sends += 1;
            Ok(())
        }
        fn send_all(&mut self, msgs: Vec<Message>) -> Result<(), Stop> {
            self.batches.push(msgs.len());
            Ok(())
        }
    }

    #[test]
    fn an_instant_run_reports_in_one_go_and_any_other_as_it_goes() {
        let dir = temp_dir("pipeline-calls");
        let env = RunEnv {
            job_dir: dir.path().to_path_buf(),
            artifacts_dir: dir.path().to_path_buf(),
            tick: Duration::from_millis(10),
        };
        let input = |context: Value| JobInput {
            commission_id: 1,
            job_id: 1,
            attempt: 1,
            pipeline: "noop".into(),
            context,
        };
        let noop = PipelineConfig::noop();
        // Four stage lines and the result, in one batch.
        let mut calls = Calls::default();
        run(&noop, &input(json!({})), &env, &mut calls).expect("runs");
        assert_eq!((calls.sends, calls.batches.clone()), (0, vec![5]));
        // Progress steps are instant too.
        let mut calls = Calls::default();
        run(&noop, &input(json!({"progress_steps": 2})), &env, &mut calls).expect("runs");
        assert_eq!((calls.sends, calls.batches.clone()), (0, vec![5 + 4 * 3]));
        // A delay is not: heartbeats and stages must go out while it waits.
        let mut calls = Calls::default();
        run(&noop, &input(json!({"delay_ms": 20})), &env, &mut calls).expect("runs");
        assert!(calls.batches.is_empty() && calls.sends >= 5 + 4, "{:?} {}", calls.batches, calls.sends);
        // Nor is a pipeline with real steps.
        let env = RunEnv { artifacts_dir: dir.path().join("artifacts"), ..env };
        let mut calls = Calls::default();
        run(&PipelineConfig::commission(), &input(json!({"title": "Fox"})), &env, &mut calls).expect("runs");
        assert!(calls.batches.is_empty() && calls.sends > 5);
    }

    #[test]
    fn ideas_are_deterministic_and_distinct() {
        let ctx = json!({"title": "Sunset over the bay", "text": "warm colours"});
        let a = derive_ideas(&ctx);
        assert_eq!(a, derive_ideas(&ctx));
        assert_eq!(a.len(), IDEAS_COUNT);
        assert_ne!(a, derive_ideas(&json!({"title": "Other"})));
    }

    #[test]
    fn commission_pipeline_in_process() {
        let dir = temp_dir("pipeline-test");
        let env = RunEnv {
            job_dir: dir.path().to_path_buf(),
            artifacts_dir: dir.path().join("artifacts"),
            tick: Duration::from_millis(50),
        };
        let input = JobInput {
            commission_id: 1,
            job_id: 1,
            attempt: 1,
            pipeline: "commission".into(),
            context: json!({"title": "Fox"}),
        };
        let mut c = Collect(Vec::new());
        run(&PipelineConfig::commission(), &input, &env, &mut c).expect("runs");
        let mut checker = crate::inside::protocol::Checker::default();
        for m in &c.0 {
            checker.check(m).expect("the built-in pipeline follows the protocol");
        }
        let Some(Message::Result { result }) = c.0.last() else { panic!("ends with a result") };
        let url = result["product"]["image_url"].as_str().expect("image url");
        let file = dir.path().join("artifacts").join(url.trim_start_matches("/artifacts/"));
        let png = std::fs::read(&file).expect("artifact stored");
        assert_eq!(format!("/artifacts/{}.png", hex(&Sha256::digest(&png))), url);
    }
}
