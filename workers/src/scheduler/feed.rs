//! The feed thread: follows the log subscription and forwards to the scheduler the few
//! events that change what may run; when the subscription breaks it resubscribes and asks
//! for a rescan, so nothing is lost in between.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use atelier_engine::{Event, EventKind};
use atelier_storage::{Filter, Subscription, SubscriptionEnd};
use crossbeam_channel::Sender;

use super::messages::SchedMsg;
use crate::shared::Shared;

/// How often the feed thread looks up from the subscription to see whether it should stop.
const FEED_WAKE_MS: u64 = 200;
/// How long to wait before trying a failed resubscribe again.
const RESUBSCRIBE_RETRY_MS: u64 = 1_000;

/// Follows the log and forwards what the scheduler needs.
pub(super) fn feed_loop(shared: Arc<Shared>, mut sub: Subscription, tx: Sender<SchedMsg>) {
    loop {
        if shared.stopping.load(Ordering::Acquire) {
            return;
        }
        match sub.next_timeout(Duration::from_millis(FEED_WAKE_MS)) {
            Ok(Some(d)) => {
                let next_retry_at = match &d.env.event {
                    Event::AttemptFailed { next_retry_at, .. } => Some(*next_retry_at),
                    _ => None,
                };
                let kind = d.env.event.kind();
                let wanted = matches!(
                    kind,
                    EventKind::Created
                        | EventKind::RetryDue
                        | EventKind::RetryRequested
                        | EventKind::AttemptFailed
                        | EventKind::CancelRequested
                ) || kind.is_terminal();
                if wanted
                    && tx
                        .send(SchedMsg::Event { commission_id: d.env.commission_id, kind, next_retry_at })
                        .is_err()
                {
                    return;
                }
            }
            Ok(None) => {}
            Err(SubscriptionEnd::Closed) => return,
            Err(end) => {
                let after = match end {
                    SubscriptionEnd::Overflow { last_seq } => last_seq,
                    _ => sub.last_seq(),
                };
                tracing::warn!(?end, after, "log subscription ended; resubscribing");
                loop {
                    if shared.stopping.load(Ordering::Acquire) {
                        return;
                    }
                    match shared.store.subscribe(after, Filter::All) {
                        Ok(s) => {
                            sub = s;
                            break;
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "cannot resubscribe");
                            std::thread::sleep(Duration::from_millis(RESUBSCRIBE_RETRY_MS));
                        }
                    }
                }
                let _ = tx.send(SchedMsg::Rescan);
            }
        }
    }
}
