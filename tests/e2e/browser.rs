//! The web page in a real browser (headless Chromium through chromedriver) against the real
//! server: create from the form and watch the bars reach 100% and the preview appear; a server
//! restart mid-commission shows "reconnecting…" and then catches up; a failure shows its error
//! and Retry works; a link for another user asks before it switches, and that user does not see
//! the first one's commissions. Screenshots of each state go to
//! target/test-artifacts/.

use std::path::Path;
use std::time::Duration;

use atelier_tests::webdriver::Browser;
use atelier_tests::*;

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_atelier"))
}

const WAIT: Duration = Duration::from_secs(30);

fn shot(b: &Browser, name: &str) {
    eprintln!("browser test: {name}");
    b.screenshot(&artifacts_dir().join(format!("{name}.png")));
}

fn percent(b: &Browser, css: &str) -> u64 {
    b.attr(css, "aria-valuenow").and_then(|v| v.parse().ok()).unwrap_or(0)
}

#[test]
fn the_page_in_a_real_browser() {
    let dir = temp_dir("browser");
    let mut s = Server::start(exe(), dir.path(), &[]);
    let alice = token("alice", false);
    let base = format!("http://{}", s.addr);
    let b = Browser::start();

    // Signed out: a sign-in prompt, not a broken page.
    b.goto(&format!("{base}/"));
    b.wait_until("sign-in prompt", WAIT, |b| b.text("#signin-prompt").is_some_and(|t| !t.is_empty()));
    shot(&b, "01-signed-out");

    // Sign in once by URL; the cookie keeps it.
    b.goto(&format!("{base}/?token={alice}"));
    b.wait_until("signed in", WAIT, |b| b.text("#signed-in-user").is_some_and(|t| t.contains("alice")));
    assert!(
        !b.js("return location.search").as_str().unwrap_or("").contains("token"),
        "the token leaves the address bar"
    );

    // Create from the form; the row reaches 100% and shows the product preview.
    b.type_into("#post-title", "Cats in hats");
    b.type_into("#post-text", "A post about cats wearing hats");
    b.click("#create-button");
    b.wait_until("a new row", WAIT, |b| b.exists(".commission[data-task-id]"));
    let id = b.attr(".commission[data-task-id]", "data-task-id").unwrap();
    let row = format!(".commission[data-task-id=\"{id}\"]");
    b.wait_until("the row at 100% with a preview", WAIT, |b| {
        percent(b, &format!("{row} [role=progressbar]")) == 100 && b.exists(&format!("{row} .preview img"))
    });
    let img = b.attr(&format!("{row} .preview img"), "src").unwrap();
    assert!(img.contains("/artifacts/") && img.ends_with(".png"), "{img}");
    let loaded = b.js(&format!(
        "return document.querySelector('{} .preview img').naturalWidth",
        row.replace('\'', "\\'")
    ));
    assert!(loaded.as_u64().unwrap_or(0) > 0, "the preview image loads");
    shot(&b, "02-list-completed");

    // The progress view of the finished commission.
    b.goto(&format!("{base}/commissions/{id}"));
    b.wait_until("completed view", WAIT, |b| b.attr("#state", "data-state").as_deref() == Some("completed"));
    for stage in ["generating_ideas", "creating_images", "uploading", "creating_products"] {
        assert_eq!(percent(&b, &format!(".stage-bar[data-stage=\"{stage}\"]")), 100, "{stage}");
    }
    assert!(b.text("#result").is_some_and(|t| !t.is_empty()));
    shot(&b, "03-progress-completed");

    // A slow commission; restart the server while it runs: "reconnecting…", then every stage.
    let slow = s
        .create(&alice, json!({"context": {"title": "Slow one", "delay_ms": 700}, "pipeline": "commission"}));
    let sid = slow["task_id"].as_u64().unwrap();
    b.goto(&format!("{base}/commissions/{sid}"));
    b.wait_until("live", WAIT, |b| b.text("#connection-status").as_deref() == Some("live"));
    b.wait_until("a stage running", WAIT, |b| b.attr("#state", "data-state").is_some_and(|s| s != "created"));
    let addr = s.addr.to_string();
    s.kill();
    b.wait_until("reconnecting shown", WAIT, |b| {
        b.text("#connection-status").is_some_and(|t| t.contains("reconnecting"))
    });
    shot(&b, "04-reconnecting");
    s = Server::start_on(exe(), dir.path(), &[], &addr);
    b.wait_until("caught up and completed after the restart", Duration::from_secs(60), |b| {
        b.attr("#state", "data-state").as_deref() == Some("completed")
    });
    for stage in ["generating_ideas", "creating_images", "uploading", "creating_products"] {
        assert_eq!(
            percent(&b, &format!(".stage-bar[data-stage=\"{stage}\"]")),
            100,
            "{stage} after the restart"
        );
    }
    assert_eq!(percent(&b, "#overall"), 100);
    shot(&b, "05-caught-up");

    // A failure shows its error; Retry runs it again (it only fails on the first attempt).
    let failing = s.create(&alice, json!({"context": {"title": "Flaky", "fail": "permanent", "fail_attempts": 1}, "pipeline": "commission"}));
    let fid = failing["task_id"].as_u64().unwrap();
    b.goto(&format!("{base}/commissions/{fid}"));
    b.wait_until("the error", WAIT, |b| b.text("#error").is_some_and(|t| t.contains("asked to fail")));
    shot(&b, "06-failed");
    b.click("#retry-button");
    b.wait_until("completed after retry", WAIT, |b| {
        b.attr("#state", "data-state").as_deref() == Some("completed")
    });
    assert!(b.text("#attempt").is_some_and(|t| t.contains("attempt 2")), "{:?}", b.text("#attempt"));
    shot(&b, "07-retried");

    // Phone-sized screen: no horizontal scrolling.
    b.set_window(375, 800);
    b.goto(&format!("{base}/"));
    b.wait_until("list on a phone", WAIT, |b| b.exists(".commission[data-task-id]"));
    let overflow = b.js("return document.documentElement.scrollWidth > window.innerWidth");
    assert_eq!(overflow, json!(false), "no horizontal scroll at 375px");
    shot(&b, "08-phone");
    let errors: Vec<String> =
        b.console_errors().into_iter().filter(|e| !e.contains("Failed to load resource")).collect();
    assert!(errors.is_empty(), "console errors: {errors:?}");

    // Another user: alice's commissions are not visible.
    b.set_window(1280, 900);
    // A link naming another user asks before it switches; the page's button switches.
    b.goto(&format!("{base}/?token={}", token("bob", false)));
    b.wait_until("asked to switch", WAIT, |b| b.text("#switch-next").is_some_and(|t| t.contains("bob")));
    assert_eq!(b.text("#switch-current").as_deref(), Some("alice"));
    shot(&b, "09-switch-account");
    b.click("#switch-button");
    b.wait_until("signed in as bob", WAIT, |b| b.text("#signed-in-user").is_some_and(|t| t.contains("bob")));
    // The empty state shows once bob's list has loaded and holds nothing.
    b.wait_until("bob's empty list", WAIT, |b| {
        b.js("return !document.querySelector('#empty-state').hidden") == json!(true)
    });
    assert!(!b.exists(".commission[data-task-id]"), "bob sees none of alice's commissions");
    b.goto(&format!("{base}/commissions/{id}"));
    b.wait_until("not found for bob", WAIT, |b| b.text("#notice").is_some_and(|t| !t.is_empty()));
    assert_ne!(b.attr("#state", "data-state").as_deref(), Some("completed"));
    shot(&b, "10-other-user");
}
