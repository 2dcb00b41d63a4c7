//! Counters and histograms of both executors, rendered as Prometheus text.
//!
//! One mutex guards them all: they change a few times per job, far from contention.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use atelier_engine::Executor;

use crate::router::{idx, RollbackReason};

const DURATION_BUCKETS_SECONDS: [f64; 10] = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];
const SPAWN_BUCKETS_SECONDS: [f64; 9] = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5];
/// Finer around the 5 ms a pickup should stay under.
const PICKUP_BUCKETS_SECONDS: [f64; 13] =
    [0.0005, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.5];
/// Peak RSS of a worker process, 4 MiB to 4 GiB (the memory limit's range).
const MAX_RSS_BUCKETS_BYTES: [f64; 11] = [
    4_194_304.0,
    8_388_608.0,
    16_777_216.0,
    33_554_432.0,
    67_108_864.0,
    134_217_728.0,
    268_435_456.0,
    536_870_912.0,
    1_073_741_824.0,
    2_147_483_648.0,
    4_294_967_296.0,
];
const EXECUTORS: [Executor; 2] = [Executor::JobController, Executor::TaskRunner];

#[derive(Clone, Debug, Default)]
struct Histogram {
    /// Cumulative counts per bucket bound.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, bounds: &[f64], v: f64) {
        if self.counts.len() != bounds.len() {
            self.counts = vec![0; bounds.len()];
        }
        for (i, b) in bounds.iter().enumerate() {
            if v <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str, bounds: &[f64]) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, b) in bounds.iter().enumerate() {
            let c = self.counts.get(i).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", self.count);
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

#[derive(Default)]
struct Inner {
    started: [u64; 2],
    finished: BTreeMap<(usize, &'static str), u64>,
    duration: [Histogram; 2],
    running: [i64; 2],
    spawn: Histogram,
    pickup: Histogram,
    max_rss: Histogram,
    routing: [u64; 2],
}

#[derive(Default)]
pub(crate) struct Metrics {
    inner: Mutex<Inner>,
    coalesced: AtomicU64,
    pub(crate) rollback_active: AtomicBool,
    /// Processes ended because they had left their job's process group (`contain`).
    pub(crate) escapees_ended: AtomicU64,
    /// Rollbacks to the task runner, by reason (`RollbackReason::ALL` order).
    rollbacks: [AtomicU64; 3],
}

impl Metrics {
    fn with(&self, f: impl FnOnce(&mut Inner)) {
        // A poisoned lock only means a panic elsewhere mid-update; the counters are still usable.
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g);
    }

    pub(crate) fn job_started(&self, e: Executor) {
        self.with(|m| {
            m.started[idx(e)] += 1;
            m.running[idx(e)] += 1;
        });
    }

    pub(crate) fn job_finished(&self, e: Executor, outcome: &'static str, took: Duration) {
        self.with(|m| {
            *m.finished.entry((idx(e), outcome)).or_default() += 1;
            m.duration[idx(e)].observe(&DURATION_BUCKETS_SECONDS, took.as_secs_f64());
            m.running[idx(e)] -= 1;
        });
    }

    /// A worker process was reaped with this peak RSS (kernel rusage).
    pub(crate) fn worker_max_rss(&self, bytes: u64) {
        // Exact to the byte up to 2^53 (8 PiB): far past any memory limit.
        #[allow(clippy::cast_precision_loss)]
        let bytes = bytes as f64;
        self.with(|m| m.max_rss.observe(&MAX_RSS_BUCKETS_BYTES, bytes));
    }

    pub(crate) fn spawned(&self, took: Duration) {
        self.with(|m| m.spawn.observe(&SPAWN_BUCKETS_SECONDS, took.as_secs_f64()));
    }

    /// A job-controller job's worker is running: `took` is from the scheduler handing it a
    /// free slot to the spawn's return (job id, job dir, spawn; not the start's append).
    pub(crate) fn picked_up(&self, took: Duration) {
        self.with(|m| m.pickup.observe(&PICKUP_BUCKETS_SECONDS, took.as_secs_f64()));
    }

    pub(crate) fn rolled_back(&self, reason: RollbackReason) {
        self.rollbacks[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn rollbacks(&self) -> [u64; 3] {
        std::array::from_fn(|i| self.rollbacks[i].load(Ordering::Relaxed))
    }

    pub(crate) fn routed(&self, e: Executor) {
        self.with(|m| m.routing[idx(e)] += 1);
    }

    pub(crate) fn progress_coalesced(&self) {
        self.coalesced.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn coalesced_total(&self) -> u64 {
        self.coalesced.load(Ordering::Relaxed)
    }

    pub(crate) fn render(&self) -> String {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        let l = |e: Executor| format!("executor=\"{}\"", e.as_str());
        out.push_str("# HELP atelier_jobs_started_total Jobs started, by executor.\n# TYPE atelier_jobs_started_total counter\n");
        for e in EXECUTORS {
            let _ = writeln!(out, "atelier_jobs_started_total{{{}}} {}", l(e), g.started[idx(e)]);
        }
        out.push_str("# HELP atelier_jobs_finished_total Jobs finished, by executor and outcome.\n# TYPE atelier_jobs_finished_total counter\n");
        for ((i, outcome), n) in &g.finished {
            let _ = writeln!(
                out,
                "atelier_jobs_finished_total{{{},outcome=\"{outcome}\"}} {n}",
                l(EXECUTORS[*i])
            );
        }
        out.push_str("# HELP atelier_job_duration_seconds Wall time of finished jobs.\n# TYPE atelier_job_duration_seconds histogram\n");
        for e in EXECUTORS {
            g.duration[idx(e)].render(
                &mut out,
                "atelier_job_duration_seconds",
                &l(e),
                &DURATION_BUCKETS_SECONDS,
            );
        }
        out.push_str("# HELP atelier_jobs_running Jobs running now.\n# TYPE atelier_jobs_running gauge\n");
        for e in EXECUTORS {
            let _ = writeln!(out, "atelier_jobs_running{{{}}} {}", l(e), g.running[idx(e)]);
        }
        out.push_str("# HELP atelier_job_spawn_seconds Time to spawn a worker process.\n# TYPE atelier_job_spawn_seconds histogram\n");
        g.spawn.render(&mut out, "atelier_job_spawn_seconds", "", &SPAWN_BUCKETS_SECONDS);
        out.push_str("# HELP atelier_job_max_rss_bytes Peak RSS of worker processes (kernel rusage).\n# TYPE atelier_job_max_rss_bytes histogram\n");
        g.max_rss.render(&mut out, "atelier_job_max_rss_bytes", "", &MAX_RSS_BUCKETS_BYTES);
        out.push_str("# HELP atelier_job_pickup_seconds From a free slot to a running worker (job controller).\n# TYPE atelier_job_pickup_seconds histogram\n");
        g.pickup.render(&mut out, "atelier_job_pickup_seconds", "", &PICKUP_BUCKETS_SECONDS);
        out.push_str("# HELP atelier_progress_events_coalesced_total Progress reports dropped for a newer one.\n# TYPE atelier_progress_events_coalesced_total counter\n");
        let _ = writeln!(out, "atelier_progress_events_coalesced_total {}", self.coalesced_total());
        out.push_str("# HELP atelier_job_escapees_killed_total Processes ended because they outlived their job outside its process group.\n# TYPE atelier_job_escapees_killed_total counter\n");
        let _ = writeln!(
            out,
            "atelier_job_escapees_killed_total {}",
            self.escapees_ended.load(Ordering::Relaxed)
        );
        out.push_str("# HELP atelier_executor_routing Commissions routed to each executor.\n# TYPE atelier_executor_routing counter\n");
        for e in EXECUTORS {
            let _ = writeln!(out, "atelier_executor_routing{{{}}} {}", l(e), g.routing[idx(e)]);
        }
        out.push_str("# HELP atelier_rollback_active 1 while jobs are rolled back to the task runner.\n# TYPE atelier_rollback_active gauge\n");
        let _ = writeln!(
            out,
            "atelier_rollback_active {}",
            u8::from(self.rollback_active.load(Ordering::Relaxed))
        );
        out.push_str("# HELP atelier_rollbacks_total Rollbacks to the task runner, by reason.\n# TYPE atelier_rollbacks_total counter\n");
        for (reason, n) in RollbackReason::ALL.iter().zip(self.rollbacks()) {
            let _ = writeln!(out, "atelier_rollbacks_total{{reason=\"{}\"}} {n}", reason.as_str());
        }
        out
    }
}
