//! Routing and rollback, in one place: which executor takes a job, and when the job
//! controller is rolled back to the task runner (it fails too often, is much slower than
//! the task runner, or cannot spawn). Pure policy over what it is told: it reads no clock
//! and counts nothing itself; a rollback it begins is returned, for the caller to count
//! (`atelier_rollbacks_total`).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use atelier_engine::Executor;

use crate::config::WorkersConfig;

/// An executor's slot in the per-executor arrays (here and in the metrics).
pub(crate) fn idx(e: Executor) -> usize {
    match e {
        Executor::JobController => 0,
        Executor::TaskRunner => 1,
    }
}

/// Why the router rolled back to the task runner (the `reason` label of
/// `atelier_rollbacks_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RollbackReason {
    // The discriminants index the counters, in `ALL` order.
    FailureRate = 0,
    Slow = 1,
    SpawnFailed = 2,
}

impl RollbackReason {
    pub(crate) const ALL: [RollbackReason; 3] =
        [RollbackReason::FailureRate, RollbackReason::Slow, RollbackReason::SpawnFailed];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            RollbackReason::FailureRate => "failure_rate",
            RollbackReason::Slow => "slow",
            RollbackReason::SpawnFailed => "spawn_failed",
        }
    }
}

/// Decides which executor takes a job, and rolls back to the task runner when the job
/// controller fails too often, is much slower than the task runner, or cannot spawn.
pub(crate) struct Router {
    /// Recent controller jobs: true for a failure of the controller's own machinery.
    window: VecDeque<bool>,
    /// Wall times of recent succeeded jobs, per executor (`idx`).
    took: [VecDeque<Duration>; 2],
    rollback_until: Option<Instant>,
}

fn median(v: &VecDeque<Duration>) -> Option<Duration> {
    let mut sorted: Vec<Duration> = v.iter().copied().collect();
    sorted.sort_unstable();
    sorted.get(sorted.len() / 2).copied()
}

impl Router {
    pub(crate) fn new() -> Router {
        Router { window: VecDeque::new(), took: [VecDeque::new(), VecDeque::new()], rollback_until: None }
    }

    /// Whether a rollback's cooldown runs at `now` (without ending it; see `rollback_active`).
    pub(crate) fn in_cooldown(&self, now: Instant) -> bool {
        self.rollback_until.is_some_and(|t| now < t)
    }

    pub(crate) fn rollback_active(&mut self, cfg: &WorkersConfig, now: Instant) -> bool {
        match self.rollback_until {
            Some(t) if now < t && cfg.auto_rollback => true,
            Some(_) => {
                // The cooldown is over: the controller gets traffic again, judged afresh.
                self.rollback_until = None;
                self.window.clear();
                self.took[idx(Executor::JobController)].clear();
                tracing::info!("the rollback is over; the job controller takes work again");
                false
            }
            None => false,
        }
    }

    pub(crate) fn route(&mut self, cfg: &WorkersConfig, commission_id: u64, now: Instant) -> Executor {
        let rolled_back = self.rollback_active(cfg, now);
        let in_rollout = cfg.job_controller_rollout_percent >= 100
            || atelier_engine::retry::splitmix64(commission_id) % 100
                < u64::from(cfg.job_controller_rollout_percent);
        let controller = cfg.use_job_controller && !rolled_back && in_rollout;
        match (controller, cfg.keep_task_runner) {
            (true, true) if cfg.task_runner_priority > cfg.job_controller_priority => Executor::TaskRunner,
            (true, _) => Executor::JobController,
            (false, true) => Executor::TaskRunner,
            // Nowhere else to go: the controller takes it even while rolled back.
            (false, false) => Executor::JobController,
        }
    }

    /// Rolls back (or extends the rollback); returns `reason` if this began a rollback.
    fn trip(
        &mut self,
        cfg: &WorkersConfig,
        now: Instant,
        reason: RollbackReason,
        why: &str,
    ) -> Option<RollbackReason> {
        if !cfg.auto_rollback || !cfg.keep_task_runner {
            return None;
        }
        let began = self.rollback_until.is_none();
        if began {
            tracing::warn!(
                reason = reason.as_str(),
                why,
                cooldown_ms = cfg.rollback_cooldown_ms,
                "rolling back to the task runner"
            );
        }
        self.rollback_until = Some(now + Duration::from_millis(cfg.rollback_cooldown_ms));
        self.window.clear();
        self.took[idx(Executor::JobController)].clear();
        began.then_some(reason)
    }

    /// A controller job ended: `infra_failure` if the controller's own machinery failed it,
    /// `took` its wall time if it succeeded. Returns the rollback this began, if any.
    pub(crate) fn record(
        &mut self,
        cfg: &WorkersConfig,
        infra_failure: bool,
        took: Option<Duration>,
        now: Instant,
    ) -> Option<RollbackReason> {
        let window_max = usize::try_from(cfg.rollback_window_jobs).unwrap_or(usize::MAX);
        self.window.push_back(infra_failure);
        while self.window.len() > window_max {
            self.window.pop_front();
        }
        let n = self.window.len() as u64;
        let failed = self.window.iter().filter(|f| **f).count() as u64;
        if n >= u64::from(cfg.rollback_min_jobs)
            && failed * 100 > u64::from(cfg.rollback_failure_rate_percent) * n
        {
            return self.trip(
                cfg,
                now,
                RollbackReason::FailureRate,
                &format!("{failed} of the last {n} controller jobs failed"),
            );
        }
        took.and_then(|took| self.record_took(cfg, Executor::JobController, took, now))
    }

    /// A job succeeded in `took`; judges the controller's speed against the task runner's.
    /// Returns the rollback this began, if any.
    pub(crate) fn record_took(
        &mut self,
        cfg: &WorkersConfig,
        executor: Executor,
        took: Duration,
        now: Instant,
    ) -> Option<RollbackReason> {
        let window_max = usize::try_from(cfg.rollback_window_jobs).unwrap_or(usize::MAX);
        let times = &mut self.took[idx(executor)];
        times.push_back(took);
        while times.len() > window_max {
            times.pop_front();
        }
        let min = usize::try_from(cfg.rollback_min_jobs).unwrap_or(usize::MAX);
        let [controller, runner] = &self.took;
        if cfg.rollback_slowdown_percent == 0 || controller.len() < min || runner.len() < min {
            return None;
        }
        let (Some(c), Some(r)) = (median(controller), median(runner)) else { return None };
        if c.as_micros() * 100 > r.as_micros() * u128::from(cfg.rollback_slowdown_percent) {
            let why = format!(
                "the controller's median job time {} ms is over {}% of the task runner's {} ms",
                c.as_millis(),
                cfg.rollback_slowdown_percent,
                r.as_millis()
            );
            return self.trip(cfg, now, RollbackReason::Slow, &why);
        }
        None
    }

    /// A spawn failed: rolls back at once. Returns the rollback this began, if any.
    pub(crate) fn spawn_failed(&mut self, cfg: &WorkersConfig, now: Instant) -> Option<RollbackReason> {
        self.trip(cfg, now, RollbackReason::SpawnFailed, "the job controller cannot spawn workers")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> WorkersConfig {
        WorkersConfig {
            rollback_min_jobs: 4,
            rollback_window_jobs: 10,
            rollback_cooldown_ms: 1_000,
            ..WorkersConfig::default()
        }
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn failures_of_the_controller_roll_back_until_the_cooldown_ends() {
        let (cfg, t0) = (cfg(), Instant::now());
        let mut r = Router::new();
        assert_eq!(r.route(&cfg, 1, t0), Executor::JobController);
        // 1 failure in 4 is 25% > 5%, but only counted from rollback_min_jobs on.
        let mut began = Vec::new();
        began.extend(r.record(&cfg, true, None, t0));
        assert_eq!(r.route(&cfg, 1, t0), Executor::JobController, "one failure is not a trend");
        for _ in 0..3 {
            began.extend(r.record(&cfg, false, Some(10 * MS), t0));
        }
        assert_eq!(r.route(&cfg, 1, t0), Executor::TaskRunner);
        assert_eq!(began, [RollbackReason::FailureRate], "one rollback, counted once");
        assert_eq!(r.route(&cfg, 1, t0 + 999 * MS), Executor::TaskRunner);
        // Healthy again after the cooldown, judged afresh.
        assert_eq!(r.route(&cfg, 1, t0 + 1_000 * MS), Executor::JobController);
        r.record(&cfg, false, Some(10 * MS), t0 + 1_000 * MS);
        assert_eq!(r.route(&cfg, 1, t0 + 1_000 * MS), Executor::JobController);
    }

    #[test]
    fn a_controller_much_slower_than_the_task_runner_rolls_back() {
        let (cfg, t0) = (cfg(), Instant::now());
        let mut r = Router::new();
        // Slow controller jobs alone are no reason: the task runner has no times to compare.
        let mut began = Vec::new();
        for _ in 0..4 {
            began.extend(r.record(&cfg, false, Some(100 * MS), t0));
        }
        assert_eq!(r.route(&cfg, 1, t0), Executor::JobController);
        // 1.5× of 66 ms is 99 ms: 100 ms is over it once the task runner has its four times.
        for _ in 0..3 {
            began.extend(r.record_took(&cfg, Executor::TaskRunner, 66 * MS, t0));
            assert_eq!(r.route(&cfg, 1, t0), Executor::JobController);
        }
        began.extend(r.record_took(&cfg, Executor::TaskRunner, 66 * MS, t0));
        assert_eq!(r.route(&cfg, 1, t0), Executor::TaskRunner);
        assert_eq!(began, [RollbackReason::Slow], "one rollback, counted once");

        // Exactly 1.5× is not over it; 0 turns the check off.
        for (percent, controller_ms, rolled_back) in [(150, 99, false), (150, 100, true), (0, 1_000, false)] {
            let cfg = WorkersConfig { rollback_slowdown_percent: percent, ..cfg.clone() };
            let mut r = Router::new();
            for _ in 0..4 {
                r.record_took(&cfg, Executor::TaskRunner, 66 * MS, t0);
                r.record(&cfg, false, Some(controller_ms * MS), t0);
            }
            assert_eq!(
                r.route(&cfg, 1, t0) == Executor::TaskRunner,
                rolled_back,
                "{percent}% with {controller_ms} ms"
            );
        }
    }

    #[test]
    fn a_spawn_failure_rolls_back_at_once_unless_there_is_no_fallback() {
        let (cfg, t0) = (cfg(), Instant::now());
        let mut r = Router::new();
        assert_eq!(r.spawn_failed(&cfg, t0), Some(RollbackReason::SpawnFailed));
        assert_eq!(r.route(&cfg, 1, t0), Executor::TaskRunner);
        assert_eq!(r.spawn_failed(&cfg, t0), None, "a rollback already on is not counted again");
        // Without a task runner, or with rollback off, the controller keeps the work.
        for cfg in [
            WorkersConfig { keep_task_runner: false, ..cfg.clone() },
            WorkersConfig { auto_rollback: false, ..cfg.clone() },
        ] {
            let mut r = Router::new();
            assert_eq!(r.spawn_failed(&cfg, t0), None);
            assert_eq!(r.route(&cfg, 1, t0), Executor::JobController);
        }
    }

    #[test]
    fn rollout_sends_a_stable_share_and_priority_picks_the_executor() {
        let t0 = Instant::now();
        let cfg = WorkersConfig { job_controller_rollout_percent: 30, ..cfg() };
        let mut r = Router::new();
        let to_controller: Vec<u64> =
            (1..=10_000).filter(|id| r.route(&cfg, *id, t0) == Executor::JobController).collect();
        assert!((2_700..=3_300).contains(&to_controller.len()), "{} of 10,000", to_controller.len());
        let again: Vec<u64> =
            (1..=10_000).filter(|id| r.route(&cfg, *id, t0) == Executor::JobController).collect();
        assert_eq!(to_controller, again, "the same commissions every time");

        let runner_first = WorkersConfig { task_runner_priority: 20, ..self::cfg() };
        assert_eq!(
            r.route(&runner_first, 1, t0),
            Executor::TaskRunner,
            "the higher priority takes work first"
        );
        let no_controller = WorkersConfig { use_job_controller: false, ..self::cfg() };
        assert_eq!(r.route(&no_controller, 1, t0), Executor::TaskRunner);
    }
}
