//! End-to-end: the fair-share limits against the real binary. For each: the request past the
//! limit gets 429 with Retry-After and an error naming it, nothing is appended, an admin is
//! not limited, and the user gets through again once the limit allows. The priority range is
//! refused with 400 and the range.

use std::path::Path;
use std::time::Duration;

use atelier_tests::*;

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_atelier"))
}

fn queued(title: &str) -> Value {
    json!({"context": {"title": title}, "pipeline": "noop", "scheduled_for": "2099-01-01T00:00:00Z"})
}

/// A 429 naming `code` (and the setting in its message), with a Retry-After of `retry_after`.
fn assert_beyond(r: &Response, code: &str, setting: &str, retry_after: &str) {
    assert_eq!((r.status, r.code().as_str()), (429, code), "{}", r.text());
    assert_eq!(r.header("Retry-After"), Some(retry_after));
    let message = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(message.contains(setting), "{message}");
}

#[test]
fn a_users_priority_stays_in_the_range_and_an_admins_does_not() {
    let dir = temp_dir("shares-priority");
    let s = Server::start(exe(), dir.path(), &[("ATELIER_USER_PRIORITY_MAX", "5")]);
    let (alice, admin) = (token("alice", false), token("root", true));
    let before = s.head_seq();
    for p in [6, -6, i32::MAX] {
        let mut body = queued("too high");
        body["priority"] = json!(p);
        let r = s.post("/api/commissions", Some(&alice), &body);
        assert_eq!((r.status, r.code().as_str()), (400, "invalid_field"), "{p}");
        assert!(r.text().contains("-5..=5"), "{}", r.text());
    }
    assert_eq!(s.head_seq(), before, "nothing appended");
    for p in [5, -5] {
        let mut body = queued("in range");
        body["priority"] = json!(p);
        assert_eq!(s.create(&alice, body)["priority"], p);
    }
    let mut body = queued("an admin's");
    body["priority"] = json!(1_000_000);
    body["user_id"] = json!("alice");
    assert_eq!(s.create(&admin, body)["priority"], 1_000_000);
    // The document this server serves states the users' range, to all but an admin.
    let range = |token: Option<&str>| {
        let doc = s.get("/api/openapi.json", token).json();
        let priority = &doc["components"]["schemas"]["CreateCommission"]["properties"]["priority"];
        (priority["minimum"].clone(), priority["maximum"].clone())
    };
    assert_eq!(range(None), (json!(-5), json!(5)));
    assert_eq!(range(Some(&alice)), (json!(-5), json!(5)));
    assert_eq!(range(Some(&admin)), (json!(i32::MIN), json!(i32::MAX)));
}

#[test]
fn active_commissions_per_user() {
    let dir = temp_dir("shares-active");
    let s = Server::start(exe(), dir.path(), &[("ATELIER_USER_ACTIVE_MAX", "2")]);
    let (alice, bob, admin) = (token("alice", false), token("bob", false), token("root", true));
    let first = s.create(&alice, queued("one"))["task_id"].as_u64().unwrap();
    s.create(&alice, queued("two"));
    let before = s.head_seq();
    let r = s.post("/api/commissions", Some(&alice), &queued("three"));
    assert_beyond(&r, "too_many_active", "ATELIER_USER_ACTIVE_MAX", "10");
    assert_eq!(s.head_seq(), before, "nothing appended");
    // Others are not limited by alice's share, nor is an admin (also creating for alice).
    s.create(&bob, queued("bob's"));
    let mut for_alice = queued("by an admin");
    for_alice["user_id"] = json!("alice");
    s.create(&admin, for_alice.clone());
    s.create(&admin, for_alice);
    // One of alice's ends: she may create again, up to the limit.
    let r = s.post(&format!("/api/commissions/{first}/cancel"), Some(&alice), &json!({}));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["state"], "cancelled");
    let r = s.post("/api/commissions", Some(&alice), &queued("after the cancel"));
    // The admin's two for her count too: four active, still beyond.
    assert_beyond(&r, "too_many_active", "ATELIER_USER_ACTIVE_MAX", "10");
    let mine = s.get("/api/commissions/user/alice?state=created&limit=200", Some(&alice)).json();
    for c in mine["items"].as_array().unwrap() {
        let id = c["task_id"].as_u64().unwrap();
        assert_eq!(s.post(&format!("/api/commissions/{id}/cancel"), Some(&alice), &json!({})).status, 200);
    }
    assert_eq!(s.post("/api/commissions", Some(&alice), &queued("again")).status, 201);
    assert_eq!(s.post("/api/commissions", Some(&alice), &queued("and again")).status, 201);
    assert_eq!(s.post("/api/commissions", Some(&alice), &queued("past")).status, 429);
}

/// Counted from the log, not by this server's own requests: after a restart the live
/// commissions a user already has count.
#[test]
fn active_commissions_count_across_a_restart() {
    let dir = temp_dir("shares-active-restart");
    let env = [("ATELIER_USER_ACTIVE_MAX", "2")];
    let alice = token("alice", false);
    {
        let s = Server::start(exe(), dir.path(), &env);
        s.create(&alice, queued("one"));
        s.create(&alice, queued("two"));
        s.stop();
    }
    let s = Server::start(exe(), dir.path(), &env);
    let before = s.head_seq();
    let r = s.post("/api/commissions", Some(&alice), &queued("three"));
    assert_beyond(&r, "too_many_active", "ATELIER_USER_ACTIVE_MAX", "10");
    assert_eq!(s.head_seq(), before);
}

#[test]
fn open_streams_per_user() {
    let dir = temp_dir("shares-streams");
    // A short heartbeat: a stream whose client left is noticed at its next write.
    let s = Server::start(
        exe(),
        dir.path(),
        &[("ATELIER_USER_STREAMS_MAX", "2"), ("ATELIER_HEARTBEAT_MS", "100")],
    );
    let (alice, admin) = (token("alice", false), token("root", true));
    let id = s.create(&alice, queued("watched"))["task_id"].as_u64().unwrap();
    let user_stream = "/api/commissions/user/alice/stream";
    let one = Sse::open(s.addr, user_stream, &alice, None);
    let two = Sse::open(s.addr, &format!("/api/progress/{id}/stream"), &alice, None);
    assert_eq!((one.status, two.status), (200, 200));
    let r = s.get(user_stream, Some(&alice));
    assert_beyond(&r, "too_many_streams", "ATELIER_USER_STREAMS_MAX", "5");
    // An admin's streams are not counted (alice's included).
    let admin_streams: Vec<Sse> = (0..3).map(|_| Sse::open(s.addr, user_stream, &admin, None)).collect();
    assert!(admin_streams.iter().all(|a| a.status == 200));
    // One of alice's closes: its place is hers again.
    one.shutdown();
    let again = wait_for(Duration::from_secs(10), || {
        let sse = Sse::open(s.addr, user_stream, &alice, None);
        (sse.status == 200).then_some(sse)
    });
    assert!(again.is_some(), "a closed stream gives its place back");
    drop(two);
}

#[test]
fn requests_per_second_per_user() {
    let dir = temp_dir("shares-rate");
    let s = Server::start(exe(), dir.path(), &[("ATELIER_USER_RATE", "2"), ("ATELIER_USER_BURST", "3")]);
    let (alice, bob, admin) = (token("alice", false), token("bob", false), token("root", true));
    for i in 0..3 {
        s.create(&alice, queued(&format!("burst {i}")));
    }
    let before = s.head_seq();
    let r = s.post("/api/commissions", Some(&alice), &queued("past the burst"));
    assert_beyond(&r, "rate_limited", "ATELIER_USER_RATE", "1");
    assert_eq!(s.head_seq(), before, "nothing appended");
    // Any route, and any of alice's tokens: one bucket per user.
    let other_alice = keys_for(SECRET).issue("alice", atelier_http::Role::User, now_s(), 60).unwrap();
    assert_eq!(s.get("/api/me", Some(&other_alice)).status, 429);
    // Bob has his own bucket; an admin has none.
    assert_eq!(s.get("/api/me", Some(&bob)).status, 200);
    for _ in 0..20 {
        assert_eq!(s.get("/api/me", Some(&admin)).status, 200);
    }
    // After the window, alice gets through again.
    std::thread::sleep(Duration::from_millis(1_100));
    assert_eq!(s.post("/api/commissions", Some(&alice), &queued("later")).status, 201);
}
