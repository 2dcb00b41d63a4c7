//! End-to-end: what the sign-in cookie may do. It reads; a change it authorizes must come from
//! the server's own page (its Origin and the page's X-Atelier-Request header), so a page of
//! another origin on the same host cannot cancel, retry or create; bearer tokens are not
//! affected. Sign-in links land on the page they name, and one naming another user asks first.

use std::path::Path;
use std::time::Duration;

use atelier_tests::*;

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_atelier"))
}

/// A POST with the cookie `token` and `headers`, a JSON body.
fn cookie_post(s: &Server, path: &str, token: &str, headers: &[(&str, &str)], body: &Value) -> Response {
    let cookie = format!("atelier_token={token}");
    let mut all = vec![("Cookie", cookie.as_str()), ("Content-Type", "application/json")];
    all.extend_from_slice(headers);
    request(s.addr, "POST", path, None, &all, Some(body.to_string().as_bytes()))
}

fn queued(title: &str) -> Value {
    json!({"context": {"title": title}, "pipeline": "noop", "scheduled_for": "2099-01-01T00:00:00Z"})
}

#[test]
fn a_cookie_changes_nothing_without_the_own_origin_and_the_page_header() {
    let dir = temp_dir("cookie-csrf");
    let s = Server::start(exe(), dir.path(), &[]);
    let alice = token("alice", false);
    let own_origin = format!("http://{}", s.addr);
    let queued_id = s.create(&alice, queued("to cancel"))["task_id"].as_u64().unwrap();
    let failing = s.create(
        &alice,
        json!({"context": {"title": "Flaky", "fail": "permanent", "fail_attempts": 1}, "pipeline": "commission"}),
    );
    let failed_id = failing["task_id"].as_u64().unwrap();
    wait_for(Duration::from_secs(30), || {
        let st = s.get(&format!("/api/commissions/{failed_id}"), Some(&alice)).json()["state"].clone();
        (st == "failed").then_some(())
    })
    .expect("the commission fails");

    let cancel = format!("/api/commissions/{queued_id}/cancel");
    let retry = format!("/api/commissions/{failed_id}/retry");
    let create = "/api/commissions".to_string();
    let bodies = [(&cancel, json!({})), (&retry, json!({})), (&create, queued("from a cookie"))];
    let other_port = format!("http://{}:3000", s.addr.ip());
    let refused: [&[(&str, &str)]; 6] = [
        &[],
        &[("X-Atelier-Request", "1")],
        &[("Origin", &other_port), ("X-Atelier-Request", "1")],
        &[("Origin", "null"), ("X-Atelier-Request", "1")],
        &[("Origin", &own_origin)],
        &[("Sec-Fetch-Site", "same-site"), ("X-Atelier-Request", "1")],
    ];
    for (path, body) in &bodies {
        for headers in refused {
            let before = s.head_seq();
            let r = cookie_post(&s, path, &alice, headers, body);
            assert_eq!(
                (r.status, r.code().as_str()),
                (403, "cross_origin"),
                "{path} {headers:?}: {}",
                r.text()
            );
            assert_eq!(s.head_seq(), before, "{path} {headers:?}: nothing appended");
        }
    }
    // An empty body is no way around it (it skips the JSON content-type check).
    let before = s.head_seq();
    let empty =
        request(s.addr, "POST", &cancel, None, &[("Cookie", &format!("atelier_token={alice}"))], None);
    assert_eq!(empty.status, 403);
    assert_eq!(s.head_seq(), before);
    let state = s.get(&format!("/api/commissions/{queued_id}"), Some(&alice)).json()["state"].clone();
    assert_eq!(state, "created", "still queued");

    // The page's own requests: its origin (or Sec-Fetch-Site) and its header.
    let own = [("Origin", own_origin.as_str()), ("X-Atelier-Request", "1")];
    let r = cookie_post(&s, &cancel, &alice, &own, &json!({}));
    assert_eq!(r.status, 200, "{}", r.text());
    let r = cookie_post(&s, &retry, &alice, &own, &json!({}));
    assert_eq!(r.status, 200, "{}", r.text());
    let fetch_site = [("Sec-Fetch-Site", "same-origin"), ("X-Atelier-Request", "1")];
    let r = cookie_post(&s, &create, &alice, &fetch_site, &queued("from the page"));
    assert_eq!(r.status, 201, "{}", r.text());

    // Bearer tokens: no origin, no header, as before.
    let id = s.create(&alice, queued("bearer"))["task_id"].as_u64().unwrap();
    let r = s.post(&format!("/api/commissions/{id}/cancel"), Some(&alice), &json!({}));
    assert_eq!(r.status, 200);
    // Reads by cookie alone still work.
    let r = request(
        s.addr,
        "GET",
        &format!("/api/commissions/{id}"),
        None,
        &[("Cookie", &format!("atelier_token={alice}"))],
        None,
    );
    assert_eq!(r.status, 200);
}

/// The `Set-Cookie` of a response, and its Max-Age.
fn max_age(r: &Response) -> i64 {
    let cookie = r.header("Set-Cookie").expect("Set-Cookie");
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "{cookie}");
    assert!(!cookie.contains("Secure"), "no Secure over plain HTTP: {cookie}");
    cookie.split("; ").find_map(|p| p.strip_prefix("Max-Age=")).expect("Max-Age").parse().unwrap()
}

#[test]
fn sign_in_links_land_on_their_page_and_switching_users_asks() {
    let dir = temp_dir("cookie-signin");
    let s = Server::start(exe(), dir.path(), &[]);
    let alice = token("alice", false);
    let bob = keys_for(SECRET).issue("bob", atelier_http::Role::User, now_s(), 600).unwrap();

    // A deep page's link signs in and lands on that page, without the token.
    let r = s.get(&format!("/commissions/7?token={alice}"), None);
    assert_eq!(r.status, 303);
    assert_eq!(r.header("Location"), Some("/commissions/7"));
    assert!((3590..=3600).contains(&max_age(&r)), "the cookie expires with its token");
    let r = s.get(&format!("/?token={bob}"), None);
    assert_eq!((r.status, r.header("Location")), (303, Some("/")));
    assert!((590..=600).contains(&max_age(&r)));

    // Signed in as alice, a link for bob asks; nothing is set until the browser says so.
    let as_alice = format!("atelier_token={alice}");
    let r =
        request(s.addr, "GET", &format!("/commissions/7?token={bob}"), None, &[("Cookie", &as_alice)], None);
    assert_eq!(r.status, 200);
    assert!(r.header("Set-Cookie").is_none(), "no silent switch");
    let page = r.text();
    assert!(
        page.contains("data-page=\"switch\"") && page.contains("alice") && page.contains("bob"),
        "{page}"
    );
    assert!(page.contains("data-here=\"/commissions/7\""), "{page}");
    // The same user's link again just signs in (a fresh cookie).
    let r = request(s.addr, "GET", &format!("/?token={alice}"), None, &[("Cookie", &as_alice)], None);
    assert_eq!(r.status, 303);

    // The question's answer posts the token from the page; from elsewhere it is refused.
    let body = json!({"token": bob});
    let from_elsewhere =
        [("Origin", "http://evil.example"), ("X-Atelier-Request", "1"), ("Content-Type", "application/json")];
    let r = request(s.addr, "POST", "/api/session", None, &from_elsewhere, Some(body.to_string().as_bytes()));
    assert_eq!((r.status, r.header("Set-Cookie")), (403, None));
    let own_origin = format!("http://{}", s.addr);
    let own =
        [("Origin", own_origin.as_str()), ("X-Atelier-Request", "1"), ("Content-Type", "application/json")];
    let r = request(s.addr, "POST", "/api/session", None, &own, Some(body.to_string().as_bytes()));
    assert_eq!(r.status, 204, "{}", r.text());
    assert!((590..=600).contains(&max_age(&r)));
    let bad = json!({"token": "not.a.token"});
    let r = request(s.addr, "POST", "/api/session", None, &own, Some(bad.to_string().as_bytes()));
    assert_eq!((r.status, r.code().as_str()), (401, "unauthorized"));
}
