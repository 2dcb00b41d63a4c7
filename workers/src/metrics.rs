//! Counters and histograms of both executors, in a `prometheus` registry of their own and
//! rendered as Prometheus text. The series names, labels and bucket bounds are an interface
//! (dashboards and alerts read them): the snapshot test at the end pins all of them.

use std::time::Duration;

use atelier_engine::Executor;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::router::RollbackReason;

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

/// The metrics of both executors. The series that are always shown (per executor, per
/// rollback reason) are created at zero up front; `atelier_jobs_finished_total` shows only
/// the outcomes that happened.
pub(crate) struct Metrics {
    registry: Registry,
    started: IntCounterVec,
    finished: IntCounterVec,
    duration: HistogramVec,
    running: IntGaugeVec,
    spawn: Histogram,
    max_rss: Histogram,
    pickup: Histogram,
    coalesced: IntCounter,
    /// Processes ended because they had left their job's process group (`contain`).
    escapees: IntCounter,
    routing: IntCounterVec,
    rollback_active: IntGauge,
    rollbacks: IntCounterVec,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let counters = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels)
                .expect("invariant: a valid metric name and labels")
        };
        let histogram = |name: &str, help: &str, buckets: &[f64]| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
                .expect("invariant: a valid metric name and buckets")
        };
        let m = Metrics {
            registry: Registry::new(),
            started: counters("atelier_jobs_started_total", "Jobs started, by executor.", &["executor"]),
            finished: counters(
                "atelier_jobs_finished_total",
                "Jobs finished, by executor and outcome.",
                &["executor", "outcome"],
            ),
            duration: HistogramVec::new(
                HistogramOpts::new("atelier_job_duration_seconds", "Wall time of finished jobs.")
                    .buckets(DURATION_BUCKETS_SECONDS.to_vec()),
                &["executor"],
            )
            .expect("invariant: a valid metric name and buckets"),
            running: IntGaugeVec::new(Opts::new("atelier_jobs_running", "Jobs running now."), &["executor"])
                .expect("invariant: a valid metric name and labels"),
            spawn: histogram(
                "atelier_job_spawn_seconds",
                "Time to spawn a worker process.",
                &SPAWN_BUCKETS_SECONDS,
            ),
            max_rss: histogram(
                "atelier_job_max_rss_bytes",
                "Peak RSS of worker processes (kernel rusage).",
                &MAX_RSS_BUCKETS_BYTES,
            ),
            pickup: histogram(
                "atelier_job_pickup_seconds",
                "From a free slot to a running worker (job controller).",
                &PICKUP_BUCKETS_SECONDS,
            ),
            coalesced: IntCounter::new(
                "atelier_progress_events_coalesced_total",
                "Progress reports dropped for a newer one.",
            )
            .expect("invariant: a valid metric name"),
            escapees: IntCounter::new(
                "atelier_job_escapees_killed_total",
                "Processes ended because they outlived their job outside its process group.",
            )
            .expect("invariant: a valid metric name"),
            routing: counters(
                "atelier_executor_routing",
                "Commissions routed to each executor.",
                &["executor"],
            ),
            rollback_active: IntGauge::new(
                "atelier_rollback_active",
                "1 while jobs are rolled back to the task runner.",
            )
            .expect("invariant: a valid metric name"),
            rollbacks: counters(
                "atelier_rollbacks_total",
                "Rollbacks to the task runner, by reason.",
                &["reason"],
            ),
        };
        m.register_all();
        m
    }
}

impl Metrics {
    fn register_all(&self) {
        let all: [Box<dyn prometheus::core::Collector>; 12] = [
            Box::new(self.started.clone()),
            Box::new(self.finished.clone()),
            Box::new(self.duration.clone()),
            Box::new(self.running.clone()),
            Box::new(self.spawn.clone()),
            Box::new(self.max_rss.clone()),
            Box::new(self.pickup.clone()),
            Box::new(self.coalesced.clone()),
            Box::new(self.escapees.clone()),
            Box::new(self.routing.clone()),
            Box::new(self.rollback_active.clone()),
            Box::new(self.rollbacks.clone()),
        ];
        for c in all {
            self.registry.register(c).expect("invariant: each metric is registered once");
        }
        for e in EXECUTORS {
            let l = [e.as_str()];
            self.started.with_label_values(&l);
            self.duration.with_label_values(&l);
            self.running.with_label_values(&l);
            self.routing.with_label_values(&l);
        }
        for reason in RollbackReason::ALL {
            self.rollbacks.with_label_values(&[reason.as_str()]);
        }
    }

    pub(crate) fn job_started(&self, e: Executor) {
        self.started.with_label_values(&[e.as_str()]).inc();
        self.running.with_label_values(&[e.as_str()]).inc();
    }

    pub(crate) fn job_finished(&self, e: Executor, outcome: &'static str, took: Duration) {
        self.finished.with_label_values(&[e.as_str(), outcome]).inc();
        self.duration.with_label_values(&[e.as_str()]).observe(took.as_secs_f64());
        self.running.with_label_values(&[e.as_str()]).dec();
    }

    /// A worker process was reaped with this peak RSS (kernel rusage).
    pub(crate) fn worker_max_rss(&self, bytes: u64) {
        // Exact to the byte up to 2^53 (8 PiB): far past any memory limit.
        #[allow(clippy::cast_precision_loss)]
        let bytes = bytes as f64;
        self.max_rss.observe(bytes);
    }

    pub(crate) fn spawned(&self, took: Duration) {
        self.spawn.observe(took.as_secs_f64());
    }

    /// A job-controller job's worker is running: `took` is from the scheduler handing it a
    /// free slot to the spawn's return (job id, job dir, spawn; not the start's append).
    pub(crate) fn picked_up(&self, took: Duration) {
        self.pickup.observe(took.as_secs_f64());
    }

    pub(crate) fn rolled_back(&self, reason: RollbackReason) {
        self.rollbacks.with_label_values(&[reason.as_str()]).inc();
    }

    pub(crate) fn set_rollback_active(&self, active: bool) {
        self.rollback_active.set(i64::from(active));
    }

    /// A sweep ended `n` processes that had left their job's process group.
    pub(crate) fn escapees_ended(&self, n: usize) {
        self.escapees.inc_by(u64::try_from(n).unwrap_or(u64::MAX));
    }

    pub(crate) fn routed(&self, e: Executor) {
        self.routing.with_label_values(&[e.as_str()]).inc();
    }

    pub(crate) fn progress_coalesced(&self) {
        self.coalesced.inc();
    }

    pub(crate) fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .expect("invariant: the text encoding of valid metrics succeeds")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every series name, label and bucket bound, with values after a known sequence: a change
    /// to any of them shows here first.
    #[test]
    fn the_series_are_stable() {
        let m = Metrics::default();
        m.job_started(Executor::JobController);
        m.job_finished(Executor::JobController, "succeeded", Duration::from_millis(1500));
        m.job_started(Executor::TaskRunner);
        m.job_finished(Executor::TaskRunner, "failed", Duration::from_millis(200));
        m.job_started(Executor::TaskRunner);
        m.worker_max_rss(10 << 20);
        m.spawned(Duration::from_millis(3));
        m.picked_up(Duration::from_millis(4));
        m.rolled_back(RollbackReason::Slow);
        m.routed(Executor::JobController);
        m.routed(Executor::JobController);
        m.routed(Executor::TaskRunner);
        m.progress_coalesced();
        m.escapees_ended(2);
        m.set_rollback_active(true);
        assert_eq!(m.render(), EXPECTED);
    }

    const EXPECTED: &str = r#"# HELP atelier_executor_routing Commissions routed to each executor.
# TYPE atelier_executor_routing counter
atelier_executor_routing{executor="job_controller"} 2
atelier_executor_routing{executor="task_runner"} 1
# HELP atelier_job_duration_seconds Wall time of finished jobs.
# TYPE atelier_job_duration_seconds histogram
atelier_job_duration_seconds_bucket{executor="job_controller",le="0.1"} 0
atelier_job_duration_seconds_bucket{executor="job_controller",le="0.25"} 0
atelier_job_duration_seconds_bucket{executor="job_controller",le="0.5"} 0
atelier_job_duration_seconds_bucket{executor="job_controller",le="1"} 0
atelier_job_duration_seconds_bucket{executor="job_controller",le="2.5"} 1
atelier_job_duration_seconds_bucket{executor="job_controller",le="5"} 1
atelier_job_duration_seconds_bucket{executor="job_controller",le="10"} 1
atelier_job_duration_seconds_bucket{executor="job_controller",le="30"} 1
atelier_job_duration_seconds_bucket{executor="job_controller",le="60"} 1
atelier_job_duration_seconds_bucket{executor="job_controller",le="300"} 1
atelier_job_duration_seconds_bucket{executor="job_controller",le="+Inf"} 1
atelier_job_duration_seconds_sum{executor="job_controller"} 1.5
atelier_job_duration_seconds_count{executor="job_controller"} 1
atelier_job_duration_seconds_bucket{executor="task_runner",le="0.1"} 0
atelier_job_duration_seconds_bucket{executor="task_runner",le="0.25"} 1
atelier_job_duration_seconds_bucket{executor="task_runner",le="0.5"} 1
atelier_job_duration_seconds_bucket{executor="task_runner",le="1"} 1
atelier_job_duration_seconds_bucket{executor="task_runner",le="2.5"} 1
atelier_job_duration_seconds_bucket{executor="task_runner",le="5"} 1
atelier_job_duration_seconds_bucket{executor="task_runner",le="10"} 1
atelier_job_duration_seconds_bucket{executor="task_runner",le="30"} 1
atelier_job_duration_seconds_bucket{executor="task_runner",le="60"} 1
atelier_job_duration_seconds_bucket{executor="task_runner",le="300"} 1
atelier_job_duration_seconds_bucket{executor="task_runner",le="+Inf"} 1
atelier_job_duration_seconds_sum{executor="task_runner"} 0.2
atelier_job_duration_seconds_count{executor="task_runner"} 1
# HELP atelier_job_escapees_killed_total Processes ended because they outlived their job outside its process group.
# TYPE atelier_job_escapees_killed_total counter
atelier_job_escapees_killed_total 2
# HELP atelier_job_max_rss_bytes Peak RSS of worker processes (kernel rusage).
# TYPE atelier_job_max_rss_bytes histogram
atelier_job_max_rss_bytes_bucket{le="4194304"} 0
atelier_job_max_rss_bytes_bucket{le="8388608"} 0
atelier_job_max_rss_bytes_bucket{le="16777216"} 1
atelier_job_max_rss_bytes_bucket{le="33554432"} 1
atelier_job_max_rss_bytes_bucket{le="67108864"} 1
atelier_job_max_rss_bytes_bucket{le="134217728"} 1
atelier_job_max_rss_bytes_bucket{le="268435456"} 1
atelier_job_max_rss_bytes_bucket{le="536870912"} 1
atelier_job_max_rss_bytes_bucket{le="1073741824"} 1
atelier_job_max_rss_bytes_bucket{le="2147483648"} 1
atelier_job_max_rss_bytes_bucket{le="4294967296"} 1
atelier_job_max_rss_bytes_bucket{le="+Inf"} 1
atelier_job_max_rss_bytes_sum 10485760
atelier_job_max_rss_bytes_count 1
# HELP atelier_job_pickup_seconds From a free slot to a running worker (job controller).
# TYPE atelier_job_pickup_seconds histogram
atelier_job_pickup_seconds_bucket{le="0.0005"} 0
atelier_job_pickup_seconds_bucket{le="0.001"} 0
atelier_job_pickup_seconds_bucket{le="0.0015"} 0
atelier_job_pickup_seconds_bucket{le="0.002"} 0
atelier_job_pickup_seconds_bucket{le="0.003"} 0
atelier_job_pickup_seconds_bucket{le="0.004"} 1
atelier_job_pickup_seconds_bucket{le="0.005"} 1
atelier_job_pickup_seconds_bucket{le="0.0075"} 1
atelier_job_pickup_seconds_bucket{le="0.01"} 1
atelier_job_pickup_seconds_bucket{le="0.025"} 1
atelier_job_pickup_seconds_bucket{le="0.05"} 1
atelier_job_pickup_seconds_bucket{le="0.1"} 1
atelier_job_pickup_seconds_bucket{le="0.5"} 1
atelier_job_pickup_seconds_bucket{le="+Inf"} 1
atelier_job_pickup_seconds_sum 0.004
atelier_job_pickup_seconds_count 1
# HELP atelier_job_spawn_seconds Time to spawn a worker process.
# TYPE atelier_job_spawn_seconds histogram
atelier_job_spawn_seconds_bucket{le="0.0005"} 0
atelier_job_spawn_seconds_bucket{le="0.001"} 0
atelier_job_spawn_seconds_bucket{le="0.002"} 0
atelier_job_spawn_seconds_bucket{le="0.005"} 1
atelier_job_spawn_seconds_bucket{le="0.01"} 1
atelier_job_spawn_seconds_bucket{le="0.025"} 1
atelier_job_spawn_seconds_bucket{le="0.05"} 1
atelier_job_spawn_seconds_bucket{le="0.1"} 1
atelier_job_spawn_seconds_bucket{le="0.5"} 1
atelier_job_spawn_seconds_bucket{le="+Inf"} 1
atelier_job_spawn_seconds_sum 0.003
atelier_job_spawn_seconds_count 1
# HELP atelier_jobs_finished_total Jobs finished, by executor and outcome.
# TYPE atelier_jobs_finished_total counter
atelier_jobs_finished_total{executor="job_controller",outcome="succeeded"} 1
atelier_jobs_finished_total{executor="task_runner",outcome="failed"} 1
# HELP atelier_jobs_running Jobs running now.
# TYPE atelier_jobs_running gauge
atelier_jobs_running{executor="job_controller"} 0
atelier_jobs_running{executor="task_runner"} 1
# HELP atelier_jobs_started_total Jobs started, by executor.
# TYPE atelier_jobs_started_total counter
atelier_jobs_started_total{executor="job_controller"} 1
atelier_jobs_started_total{executor="task_runner"} 2
# HELP atelier_progress_events_coalesced_total Progress reports dropped for a newer one.
# TYPE atelier_progress_events_coalesced_total counter
atelier_progress_events_coalesced_total 1
# HELP atelier_rollback_active 1 while jobs are rolled back to the task runner.
# TYPE atelier_rollback_active gauge
atelier_rollback_active 1
# HELP atelier_rollbacks_total Rollbacks to the task runner, by reason.
# TYPE atelier_rollbacks_total counter
atelier_rollbacks_total{reason="failure_rate"} 0
atelier_rollbacks_total{reason="slow"} 1
atelier_rollbacks_total{reason="spawn_failed"} 0
"#;
}
