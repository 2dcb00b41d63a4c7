//! End-to-end: `atelier submit`, `watch`, `status` and `list` against the real server,
//! including exit codes and a watch that survives a server restart.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use atelier_tests::*;

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_atelier"))
}

fn cli(s_addr: std::net::SocketAddr, token: &str, args: &[&str]) -> std::process::Output {
    Command::new(exe())
        .args(args)
        .env("ATELIER_URL", format!("http://{s_addr}"))
        .env("ATELIER_TOKEN", token)
        .output()
        .unwrap()
}

#[test]
fn submit_watch_status_list_and_exit_codes() {
    let dir = temp_dir("cli-watch");
    let s = Server::start(exe(), dir.path(), &[]);
    let alice = token("alice", false);
    let out = cli(s.addr, &alice, &["submit", "--context", r#"{"title":"Cats","text":"meow"}"#]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let watch = cli(s.addr, &alice, &["watch", &id]);
    let text = String::from_utf8_lossy(&watch.stdout);
    assert_eq!(watch.status.code(), Some(0), "{text}");
    for stage in ["generating_ideas", "creating_images", "uploading", "creating_products"] {
        assert!(text.contains(stage), "watch shows {stage}: {text}");
    }
    // However far the commission got before the watch connected (the stages above may come
    // from the snapshot header alone), the output starts with where it stood and ends with the product.
    assert!(text.starts_with(&format!("commission {id}: ")), "{text}");
    assert!(text.contains("completed: "), "{text}");
    assert!(text.lines().last().unwrap_or("").starts_with("image: /artifacts/"), "{text}");
    let status = cli(s.addr, &alice, &["status", &id]);
    let snap: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(snap["state"], "completed");
    let list = cli(s.addr, &alice, &["list"]);
    assert!(String::from_utf8_lossy(&list.stdout).contains("completed"));

    let failing =
        cli(s.addr, &alice, &["submit", "--pipeline", "fail", "--context", r#"{"fail":"permanent"}"#]);
    let fid = String::from_utf8_lossy(&failing.stdout).trim().to_string();
    let watch = cli(s.addr, &alice, &["watch", &fid]);
    assert_eq!(watch.status.code(), Some(1), "failed → exit 1: {}", String::from_utf8_lossy(&watch.stdout));
    assert!(String::from_utf8_lossy(&watch.stdout).contains("failed: "));

    let queued =
        s.create(&alice, json!({"context": {}, "pipeline": "noop", "scheduled_for": "2099-01-01T00:00:00Z"}));
    let qid = queued["task_id"].to_string();
    let child = Command::new(exe())
        .args(["watch", &qid])
        .env("ATELIER_URL", format!("http://{}", s.addr))
        .env("ATELIER_TOKEN", &alice)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    s.post(&format!("/api/commissions/{qid}/cancel"), Some(&alice), &json!({}));
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(3), "cancelled → exit 3");

    let bad = cli(s.addr, &alice, &["status", "999999"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no commission 999999"));
    let bob = token("bob", false);
    assert_eq!(
        cli(s.addr, &bob, &["watch", &id]).status.code(),
        Some(2),
        "another user's commission is not found"
    );
    assert_eq!(cli(s.addr, "nonsense", &["list"]).status.code(), Some(2));
}

#[test]
fn watch_reconnects_across_a_server_restart() {
    let dir = temp_dir("cli-restart");
    let s = Server::start(exe(), dir.path(), &[]);
    let alice = token("alice", false);
    // Scheduled two seconds ahead: it is still queued while the server restarts.
    let at = atelier_engine::time::format_rfc3339_ms((now_s() + 3) * 1000);
    let id = s
        .create(&alice, json!({"context": {"title": "later"}, "pipeline": "noop", "scheduled_for": at}))
        ["task_id"]
        .to_string();
    let child = Command::new(exe())
        .args(["watch", &id])
        .env("ATELIER_URL", format!("http://{}", s.addr))
        .env("ATELIER_TOKEN", &alice)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let addr = s.addr.to_string();
    s.kill();
    std::thread::sleep(Duration::from_millis(700));
    let s = Server::start_on(exe(), dir.path(), &[], &addr);
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("reconnecting"), "{text}");
    // Every event after the snapshot arrived exactly once, in order.
    let ids: Vec<u64> = text.lines().filter_map(|l| l.split_whitespace().next()?.parse().ok()).collect();
    assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "no gap or duplicate: {ids:?}");
    let snap = s.get(&format!("/api/commissions/{id}"), Some(&alice)).json();
    assert_eq!(ids.last().copied(), snap["last_event_id"].as_u64());
}
