//! Fixed sample values for tests and examples in every crate: one event of every kind, so
//! that each encoding and API body can be pinned for all of them.

use crate::{Event, Executor, JobEnd, JobStatus, Stage};

/// One event of every kind, in `EventKind::ALL` order, with fixed field values.
pub fn one_of_each() -> Vec<Event> {
    vec![
        Event::Created {
            user_id: "alice".into(),
            pipeline: "commission".into(),
            priority: 5,
            scheduled_for: Some(1_795_964_430_123),
            context: r#"{"title":"Hello"}"#.into(),
            idempotency_key: Some("k-1".into()),
            max_attempts: 3,
        },
        Event::JobStarted {
            attempt: 1,
            job_id: 42,
            executor: Executor::JobController,
            job_name: "commission".into(),
            pid: Some(4242),
        },
        Event::StageEntered { stage: Stage::GeneratingIdeas },
        Event::Progress { stage: Stage::GeneratingIdeas, percent: 50, message: Some("half way".into()) },
        Event::Artifact {
            stage: Stage::CreatingImages,
            kind: "image".into(),
            uri: "/artifacts/ab.png".into(),
        },
        Event::AttemptFailed {
            attempt: 1,
            error: "boom".into(),
            retryable: true,
            next_retry_at: 1_795_964_432_123,
        },
        Event::RetryDue,
        Event::Completed { result: r#"{"ok":true}"#.into() },
        Event::Failed { attempt: 3, error: "gave up".into(), retryable: false },
        Event::CancelRequested,
        Event::Cancelled,
        Event::RetryRequested,
        Event::JobFinished(JobEnd {
            job_id: 42,
            status: JobStatus::Succeeded,
            exit_code: Some(0),
            signal: None,
            error: None,
            max_rss_bytes: 1 << 20,
            cpu_ms: 17,
        }),
    ]
}
