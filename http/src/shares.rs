//! Fair shares: what one user may take of the server, so that one cannot take everything. Each
//! limit has a setting and a default; admins are exempt from all of them.
//!
//! - `priority`: a user's commissions run within a range of priorities (out of it is refused
//!   with 400 and the range: a silent clamp would hide why a commission runs later than asked).
//! - Active (non-terminal) commissions per user.
//! - Open streams per user.
//! - Requests per second per user: a token bucket (a burst, then a steady rate). All of a
//!   user's tokens share one bucket, so more tokens do not buy more requests.
//!
//! Beyond a limit the answer is 429 with `Retry-After` and an error naming the limit, and the
//! request has changed nothing.
//!
//! Active commissions are counted from the log: a follower subscribed to every event keeps
//! each user's set of live commissions (started from the live index, then event by event), so a
//! create costs a map lookup, not a scan of the user's commissions. The follower only drains
//! its live queue; it never reads the store itself (see `sse::on_pool` for why threads that
//! touch sled are kept few).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use atelier_engine::State;
use atelier_storage::{EventStore, Filter, StorageError, Subscription, SubscriptionEnd};

use crate::reply::Reply;

/// A user's commissions may have priorities in `-PRIORITY_MAX..=PRIORITY_MAX`. The scheduler
/// runs higher first: a range of 21 levels orders a user's own work, and keeps any user from
/// jumping every other user's queue with `i32::MAX`.
pub const USER_PRIORITY_MAX_DEFAULT: i32 = 10;
/// Active commissions a user may have. The executors run a few jobs at once, so a thousand
/// queued is hours of work: a backlog no interactive user needs, while a script that submits
/// in bulk fits. 0: no limit.
pub const USER_ACTIVE_MAX_DEFAULT: u64 = 1_000;
/// Streams a user may hold open. A browser opens at most six connections to a host over
/// HTTP/1.1, and a dashboard or a few `atelier watch` add a handful: 32 serves a user with
/// several tabs and tools, while the 10,000 connection slots take 300 such users. 0: no limit.
pub const USER_STREAMS_MAX_DEFAULT: u64 = 32;
/// Requests per second a user's bucket refills with: a page makes a few per commission event
/// it shows, a script a steady stream; 50 a second is far more than either needs and a
/// fraction of what the handler pool serves. 0: no limit.
pub const USER_RATE_PER_S_DEFAULT: u32 = 50;
/// Requests a user may make at once before the rate applies (a page load, a burst of
/// submits).
pub const USER_BURST_DEFAULT: u32 = 200;

/// `Retry-After` when a user has too many active commissions: they end on their own time, so
/// this only paces a client that retries.
const ACTIVE_RETRY_AFTER_S: u64 = 10;
/// `Retry-After` when a user holds too many streams: a closed one is free at once.
const STREAMS_RETRY_AFTER_S: u64 = 5;
/// Buckets kept before full ones (users idle long enough to refill) are forgotten.
const BUCKETS_KEPT_MAX: usize = 10_000;
/// How often the follower of the log looks at the shutdown flag while idle.
const FOLLOW_POLL: Duration = Duration::from_millis(1_000);

/// The configured limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShareLimits {
    pub priority_max: i32,
    pub active_max: u64,
    pub streams_max: u64,
    pub rate_per_s: u32,
    pub burst: u32,
}

impl Default for ShareLimits {
    fn default() -> ShareLimits {
        ShareLimits {
            priority_max: USER_PRIORITY_MAX_DEFAULT,
            active_max: USER_ACTIVE_MAX_DEFAULT,
            streams_max: USER_STREAMS_MAX_DEFAULT,
            rate_per_s: USER_RATE_PER_S_DEFAULT,
            burst: USER_BURST_DEFAULT,
        }
    }
}

/// A limit a request went beyond, and when to try again.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Beyond {
    code: &'static str,
    message: String,
    retry_after_s: u64,
}

impl Beyond {
    /// The 429 that says so.
    pub(crate) fn reply(&self) -> Reply {
        let body = crate::render::error(self.code, &self.message);
        let bytes = serde_json::to_vec(&body).expect("invariant: JSON serializes");
        Reply::Bytes(429, "application/json", bytes, vec![("Retry-After", self.retry_after_s.to_string())])
    }
}

/// The limits and what each user holds of them, for one server.
#[derive(Debug)]
pub struct Shares {
    limits: ShareLimits,
    buckets: Mutex<HashMap<String, Bucket>>,
    streams: Mutex<HashMap<String, u64>>,
    active: Mutex<Active>,
}

/// A token bucket.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Each user's live commissions, as the log has shown them.
#[derive(Debug, Default)]
struct Active {
    /// Whether a follower is subscribed and the sets are up to date with it.
    following: bool,
    /// The highest seq the follower has handed in.
    seen_seq: u64,
    /// Live commission → its user and the seq its state was last taken at.
    live: HashMap<u64, (Arc<str>, u64)>,
    per_user: HashMap<Arc<str>, u64>,
}

impl Active {
    /// Takes in a commission's state as of `seq`, unless something newer is known of it.
    fn take(&mut self, id: u64, user: &Arc<str>, seq: u64, state: State) {
        if self.live.get(&id).is_some_and(|(_, at)| *at >= seq) {
            return;
        }
        if state.is_terminal() {
            if let Some((user, _)) = self.live.remove(&id) {
                if let Some(n) = self.per_user.get_mut(&user) {
                    *n -= 1;
                    if *n == 0 {
                        self.per_user.remove(&user);
                    }
                }
            }
        } else if self.live.insert(id, (user.clone(), seq)).is_none() {
            *self.per_user.entry(user.clone()).or_default() += 1;
        }
    }
}

/// A stream's hold on its user's share; given back when dropped (the stream ended).
pub(crate) struct StreamTicket {
    shares: Arc<Shares>,
    user: String,
}

impl Drop for StreamTicket {
    fn drop(&mut self) {
        let mut streams = lock(&self.shares.streams);
        if let Some(n) = streams.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                streams.remove(&self.user);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The maps stay consistent at every await-free step; a panic elsewhere does not taint them.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shares {
    pub fn new(limits: ShareLimits) -> Shares {
        Shares { limits, buckets: Mutex::default(), streams: Mutex::default(), active: Mutex::default() }
    }

    pub fn limits(&self) -> ShareLimits {
        self.limits
    }

    /// Whether a user's commission may have `priority`; the error names the range.
    pub(crate) fn check_priority(&self, priority: i32) -> Result<(), String> {
        let max = self.limits.priority_max;
        if (-max..=max).contains(&priority) {
            return Ok(());
        }
        Err(format!(
            "priority: must be within -{max}..={max} for a user's commission (ATELIER_USER_PRIORITY_MAX; \
             an admin may set any)"
        ))
    }

    /// Takes one request from `user`'s bucket.
    pub(crate) fn take_request(&self, user: &str, now: Instant) -> Result<(), Beyond> {
        let ShareLimits { rate_per_s, burst, .. } = self.limits;
        if rate_per_s == 0 {
            return Ok(());
        }
        let (rate, burst) = (f64::from(rate_per_s), f64::from(burst.max(1)));
        let mut buckets = lock(&self.buckets);
        if buckets.len() >= BUCKETS_KEPT_MAX && !buckets.contains_key(user) {
            buckets
                .retain(|_, b| b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst);
        }
        let b = buckets.entry(user.to_string()).or_insert(Bucket { tokens: burst, at: now });
        b.tokens = (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Ok(());
        }
        let wait_s = ((1.0 - b.tokens) / rate).ceil().max(1.0);
        Err(Beyond {
            code: "rate_limited",
            message: format!(
                "more than {rate_per_s} requests a second (after a burst of {burst}) from this user \
                 (ATELIER_USER_RATE, ATELIER_USER_BURST); try again shortly"
            ),
            // Whole seconds of at most `1 / rate` (rate ≥ 1): no overflow.
            retry_after_s: wait_s as u64,
        })
    }

    /// Takes a stream of `user`'s share, given back when the ticket drops.
    pub(crate) fn take_stream(self: &Arc<Self>, user: &str) -> Result<StreamTicket, Beyond> {
        let max = self.limits.streams_max;
        let mut streams = lock(&self.streams);
        let n = streams.entry(user.to_string()).or_default();
        if max != 0 && *n >= max {
            return Err(Beyond {
                code: "too_many_streams",
                message: format!(
                    "this user holds {n} open streams, the most allowed (ATELIER_USER_STREAMS_MAX); \
                     close one first"
                ),
                retry_after_s: STREAMS_RETRY_AFTER_S,
            });
        }
        *n += 1;
        Ok(StreamTicket { shares: self.clone(), user: user.to_string() })
    }

    /// Whether `user` may have one more active commission. Starts following the log first if
    /// nothing follows it (this runs on a handler thread, which may read the store).
    pub(crate) fn check_active(
        self: &Arc<Self>,
        user: &str,
        store: &Arc<dyn EventStore>,
        stopping: &Arc<dyn Fn() -> bool + Send + Sync>,
    ) -> Result<Result<(), Beyond>, StorageError> {
        let max = self.limits.active_max;
        if max == 0 {
            return Ok(Ok(()));
        }
        self.follow(store, stopping)?;
        let n = lock(&self.active).per_user.get(user).copied().unwrap_or(0);
        if n < max {
            return Ok(Ok(()));
        }
        Ok(Err(Beyond {
            code: "too_many_active",
            message: format!(
                "this user has {n} active commissions, the most allowed (ATELIER_USER_ACTIVE_MAX); \
                 wait for one to end, or cancel one"
            ),
            retry_after_s: ACTIVE_RETRY_AFTER_S,
        }))
    }

    /// Takes in a commission this server just changed (its state as of `seq`), so that the
    /// next check sees it even before the follower does.
    pub(crate) fn saw(&self, id: u64, user: &str, seq: u64, state: State) {
        let mut active = lock(&self.active);
        if active.following && seq > active.seen_seq {
            active.take(id, &Arc::from(user), seq, state);
        }
    }

    /// Subscribes to the log and counts what is live, once; a thread then follows the log.
    fn follow(
        self: &Arc<Self>,
        store: &Arc<dyn EventStore>,
        stopping: &Arc<dyn Fn() -> bool + Send + Sync>,
    ) -> Result<(), StorageError> {
        let mut active = lock(&self.active);
        if active.following {
            return Ok(());
        }
        // Subscribed before the live index is read: an event in between reaches both, and
        // `take` keeps the newer of the two.
        let head = store.head_seq();
        let mut sub = store.subscribe(head, Filter::All)?;
        while sub.wants_history() {
            match sub.read_history() {
                Ok(()) => {}
                Err(SubscriptionEnd::Failed(e)) => return Err(e),
                Err(_) => return Ok(()),
            }
        }
        *active = Active { following: true, seen_seq: head, ..Active::default() };
        for c in store.live_commissions()? {
            active.take(c.id, &Arc::from(c.user_id.as_str()), c.last_seq, c.state);
        }
        drop(active);
        let (shares, stopping) = (self.clone(), stopping.clone());
        let spawned = std::thread::Builder::new()
            .name("atelier-shares".into())
            .spawn(move || shares.follow_loop(sub, &*stopping));
        if let Err(e) = spawned {
            lock(&self.active).following = false;
            tracing::warn!(error = %e, "could not start the follower of active commissions");
        }
        Ok(())
    }

    /// Drains the subscription into the counts until the server stops or the subscription
    /// ends (too slow, say); then the next check subscribes afresh.
    fn follow_loop(&self, mut sub: Subscription, stopping: &(dyn Fn() -> bool + Send + Sync)) {
        while !stopping() {
            // Registered before this thread started: this never reads the store.
            match sub.next_timeout(FOLLOW_POLL) {
                Ok(Some(d)) => {
                    let mut active = lock(&self.active);
                    active.take(d.env.commission_id, &d.view.user_id, d.env.seq, d.view.state);
                    active.seen_seq = d.env.seq;
                }
                Ok(None) => {}
                Err(_) => break,
            }
        }
        lock(&self.active).following = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let shares = Shares::new(ShareLimits { rate_per_s: 2, burst: 3, ..ShareLimits::default() });
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(shares.take_request("alice", t0), Ok(()));
        }
        let beyond = shares.take_request("alice", t0).unwrap_err();
        assert_eq!((beyond.code, beyond.retry_after_s), ("rate_limited", 1));
        assert_eq!(shares.take_request("bob", t0), Ok(()), "each user has a bucket");
        assert!(shares.take_request("alice", t0 + Duration::from_millis(400)).is_err());
        assert_eq!(shares.take_request("alice", t0 + Duration::from_millis(500)), Ok(()));
        let off = Shares::new(ShareLimits { rate_per_s: 0, ..ShareLimits::default() });
        assert!((0..10_000).all(|_| off.take_request("alice", t0).is_ok()));
    }

    #[test]
    fn stream_tickets_are_given_back_when_dropped() {
        let shares = Arc::new(Shares::new(ShareLimits { streams_max: 2, ..ShareLimits::default() }));
        let a = shares.take_stream("alice").unwrap();
        let _b = shares.take_stream("alice").unwrap();
        assert_eq!(shares.take_stream("alice").err().map(|b| b.code), Some("too_many_streams"));
        assert!(shares.take_stream("bob").is_ok());
        drop(a);
        assert!(shares.take_stream("alice").is_ok());
    }

    #[test]
    fn the_newer_state_of_a_commission_wins() {
        let mut active = Active::default();
        let alice: Arc<str> = Arc::from("alice");
        active.take(1, &alice, 5, State::Created);
        active.take(1, &alice, 4, State::Created);
        active.take(2, &alice, 6, State::Processing);
        assert_eq!(active.per_user.get("alice"), Some(&2));
        active.take(1, &alice, 5, State::Completed);
        assert_eq!(active.per_user.get("alice"), Some(&2), "not newer than what is known");
        active.take(1, &alice, 7, State::Completed);
        active.take(2, &alice, 8, State::Cancelled);
        assert_eq!(active.per_user.get("alice"), None);
        // A retry brings a failed commission back.
        active.take(2, &alice, 9, State::Created);
        assert_eq!(active.per_user.get("alice"), Some(&1));
    }

    #[test]
    fn priorities_outside_the_range_are_refused_with_it() {
        let shares = Shares::new(ShareLimits::default());
        assert!(shares.check_priority(10).is_ok() && shares.check_priority(-10).is_ok());
        let e = shares.check_priority(11).unwrap_err();
        assert!(e.contains("-10..=10"), "{e}");
        assert!(shares.check_priority(i32::MIN).is_err());
    }
}
