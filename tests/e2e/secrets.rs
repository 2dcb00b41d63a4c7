//! End-to-end: the token secret, token lifetimes and file modes through the real binary. A
//! start with a secret that is short, empty or open to others is refused with the fix and
//! writes nothing; expired, not-yet-valid and over-long tokens get 401 with the reason; after
//! a run nothing under the data dir is open to group or others; and what a worker writes
//! reaches `watch` and `status` without its escape sequences.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use atelier_tests::*;

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_atelier"))
}

/// Every entry under `dir` with its mode bits, sorted.
fn listing(dir: &Path) -> Vec<(PathBuf, u32)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries {
            let path = e.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                todo.push(path.clone());
            }
            out.push((path, meta.permissions().mode() & 0o7777));
        }
    }
    out.sort();
    out
}

/// Runs `atelier serve` on `data_dir` with `secret` as ATELIER_SECRET; it must exit on its
/// own. Returns its exit code and stderr.
fn serve_refused(scratch: &Path, data_dir: &Path, secret: &str) -> (Option<i32>, String) {
    let mut child = Command::new(exe())
        .arg("serve")
        .current_dir(scratch)
        .env_remove("ATELIER_CONFIG")
        .env("ATELIER_LISTEN", "127.0.0.1:0")
        .env("ATELIER_DATA_DIR", data_dir)
        .env("ATELIER_SECRET", secret)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_for(Duration::from_secs(20), || child.try_wait().unwrap());
    if status.is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    assert!(status.is_some(), "the server started: {}", String::from_utf8_lossy(&out.stderr));
    (status.and_then(|s| s.code()), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn start_refuses_a_weak_or_exposed_secret_and_writes_nothing() {
    let scratch = temp_dir("secrets-refused");
    let data = scratch.path().join("data");

    // An 8-byte ATELIER_SECRET: the data dir is not even made.
    let (code, err) = serve_refused(scratch.path(), &data, "8 bytes!");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("ATELIER_SECRET is too short"), "{err}");
    assert!(err.contains("head -c 32 /dev/urandom | base64"), "{err}");
    assert!(err.contains("8 bytes"), "{err}");
    assert!(!data.exists(), "the data dir is untouched");

    // An empty secret file (a write cut short): never used as a key, and left as it is.
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    let secret_file = data.join("secret");
    std::fs::write(&secret_file, "").unwrap();
    std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let before = listing(&data);
    let (code, err) = serve_refused(scratch.path(), &data, "");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("is too short to sign tokens"), "{err}");
    assert!(err.contains("head -c 32 /dev/urandom | base64"), "{err}");
    assert_eq!(listing(&data), before, "the data dir is untouched");
    assert_eq!(std::fs::read(&secret_file).unwrap(), b"");

    // A good secret that others may read: refused with the exact chmod.
    std::fs::write(&secret_file, "0123456789abcdef0123456789abcdef0123456789abcdef").unwrap();
    std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let before = listing(&data);
    let (code, err) = serve_refused(scratch.path(), &data, "");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(&format!("run `chmod 600 {}`", secret_file.display())), "{err}");
    assert_eq!(listing(&data), before, "the data dir is untouched");
}

#[test]
fn expired_not_yet_valid_and_over_long_tokens_get_401_with_the_reason() {
    let dir = temp_dir("secrets-tokens");
    let s = Server::start(exe(), dir.path(), &[]);
    let unbounded = keys_for(SECRET).with_ttl_max_s(i64::MAX);
    let user = atelier_http::Role::User;
    let cases = [
        (expired_token("alice"), "the token has expired"),
        (unbounded.issue("alice", user, now_s() + 3600, 60).unwrap(), "the token is not yet valid"),
        (unbounded.issue("alice", user, now_s(), 31 * 86_400).unwrap(), "longer than the 2592000s"),
    ];
    for (token, reason) in cases {
        let r = s.get("/api/me", Some(&token));
        assert_eq!((r.status, r.code().as_str()), (401, "unauthorized"), "{reason}: {}", r.text());
        let message = r.json()["error"]["message"].as_str().unwrap_or_default().to_string();
        assert!(message.contains(reason), "{reason}: {message}");
    }
    // At the maximum the token works.
    let month = unbounded.issue("alice", user, now_s(), 30 * 86_400).unwrap();
    assert_eq!(s.get("/api/me", Some(&month)).status, 200);
}

/// The sign-in link `serve` prints lands in the service's log: it lives 15 minutes, says so,
/// and signs in as admin.
#[test]
fn the_printed_sign_in_link_lives_fifteen_minutes_and_says_so() {
    let dir = temp_dir("secrets-link");
    let s = Server::start(exe(), dir.path(), &[]);
    assert!(s.sign_in_line.contains("works for 15 minutes"), "{}", s.sign_in_line);
    let token = s.sign_in_line.rsplit("?token=").next().expect("a token in the link").to_string();
    let claims = jwt_claims(&token);
    let (iat, exp) = (claims["iat"].as_i64().unwrap(), claims["exp"].as_i64().unwrap());
    assert_eq!(exp - iat, 15 * 60, "{claims}");
    let me = s.get("/api/me", Some(&token));
    assert_eq!((me.status, me.json()["role"].as_str()), (200, Some("admin")), "{}", me.text());
}

#[test]
fn atelier_token_refuses_a_ttl_beyond_the_maximum() {
    let dir = temp_dir("secrets-token-ttl");
    let token = |ttl: &str, max: &str| {
        Command::new(exe())
            .args(["token", "--user", "alice", "--ttl", ttl])
            .current_dir(dir.path())
            .env_remove("ATELIER_CONFIG")
            .env("ATELIER_DATA_DIR", dir.path().join("data"))
            .env("ATELIER_SECRET", SECRET)
            .env("ATELIER_TOKEN_TTL_MAX", max)
            .output()
            .unwrap()
    };
    let out = token("31d", "");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--ttl: ") && err.contains("ATELIER_TOKEN_TTL_MAX"), "{err}");
    assert!(out.stdout.is_empty());
    assert_eq!(token("30d", "").status.code(), Some(0));
    assert_eq!(token("2h", "1h").status.code(), Some(2));
    assert_eq!(token("1h", "1h").status.code(), Some(0));
}

/// A worker that writes to stderr and sends stage messages with escape sequences in them,
/// slowly enough for a watch to see them.
const NOISY_PIPELINE: &str = r#"
[pipelines.noisy]
command = ["sh", "-c", '''cat >/dev/null; echo 'worker log line' >&2; sleep 1; for s in generating_ideas creating_images uploading creating_products; do printf '{"type":"stage","stage":"%s"}\n' $s >&3; printf '%s\n' '{"type":"progress","stage":"'$s'","percent":50,"message":"\u001b]0;pwned\u0007\u001b[31mred alert\u001b[0m \u009b2J"}' >&3; sleep 0.2; done; printf '{"type":"result","result":{"ok":true}}\n' >&3''']
env = { PATH = "/usr/bin:/bin" }
"#;

#[test]
fn after_a_run_nothing_in_the_data_dir_is_open_to_others() {
    let scratch = temp_dir("secrets-modes");
    let data = scratch.path().join("data");
    let config = scratch.path().join("atelier.toml");
    std::fs::write(&config, NOISY_PIPELINE).unwrap();
    // No ATELIER_SECRET: the server makes and keeps its own.
    let s =
        Server::start(exe(), &data, &[("ATELIER_SECRET", ""), ("ATELIER_CONFIG", config.to_str().unwrap())]);
    let alice = token_from_file(&data, "alice");
    let drawn = s.create(&alice, json!({"context": {"title": "Cats", "text": "meow"}}))["task_id"].clone();
    let noisy = s.create(&alice, json!({"context": {}, "pipeline": "noisy"}))["task_id"].clone();
    for id in [drawn, noisy] {
        let done = wait_for(Duration::from_secs(30), || {
            let snap = s.get(&format!("/api/commissions/{id}"), Some(&alice)).json();
            (snap["state"] == "completed").then_some(())
        });
        assert!(done.is_some(), "commission {id} completed");
    }
    s.stop();
    let entries = listing(&data);
    assert!(entries.iter().any(|(p, _)| p.ends_with("secret")), "{entries:?}");
    assert!(entries.iter().any(|(p, _)| p.ends_with("stderr.log")), "a job log: {entries:?}");
    assert!(
        entries.iter().any(|(p, _)| p.extension().is_some_and(|e| e == "png")),
        "an artifact: {entries:?}"
    );
    let mode = std::fs::metadata(&data).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "the data dir");
    let open: Vec<_> = entries.iter().filter(|(_, mode)| mode & 0o077 != 0).collect();
    assert!(open.is_empty(), "open to group or others: {open:?}");
}

/// A token signed with the secret the server keeps in `data_dir`.
fn token_from_file(data_dir: &Path, user: &str) -> String {
    let secret = std::fs::read_to_string(data_dir.join("secret")).unwrap();
    keys_for(secret.trim()).issue(user, atelier_http::Role::User, now_s(), 3600).unwrap()
}

#[test]
fn watch_and_status_print_no_escape_sequences_from_workers() {
    let dir = temp_dir("secrets-watch");
    let config = dir.path().join("atelier.toml");
    std::fs::write(&config, NOISY_PIPELINE).unwrap();
    let s = Server::start(exe(), &dir.path().join("data"), &[("ATELIER_CONFIG", config.to_str().unwrap())]);
    let alice = token("alice", false);
    let id = s.create(&alice, json!({"context": {}, "pipeline": "noisy"}))["task_id"].to_string();
    let cli = |args: &[&str]| {
        Command::new(exe())
            .args(args)
            .env("ATELIER_URL", format!("http://{}", s.addr))
            .env("ATELIER_TOKEN", &alice)
            .output()
            .unwrap()
    };
    let watch = cli(&["watch", &id]);
    let text = String::from_utf8_lossy(&watch.stdout);
    assert_eq!(watch.status.code(), Some(0), "{text}");
    assert!(text.contains("red alert"), "the message itself is shown: {text}");
    let status = cli(&["status", &id]);
    assert_eq!(status.status.code(), Some(0));
    for (what, out) in [("watch", &watch.stdout), ("status", &status.stdout)] {
        let out = String::from_utf8_lossy(out);
        assert!(!out.chars().any(|c| c.is_control() && c != '\n' && c != '\t'), "{what}: {out:?}");
        assert!(
            !out.contains("pwned") && !out.contains("\\u001b") && !out.contains("[31m"),
            "{what}: {out:?}"
        );
    }
}

/// `atelier secret rotate` on `data_dir` (with `env` on top); its exit code and output.
fn rotate(data_dir: &Path, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = Command::new(exe());
    cmd.args(["secret", "rotate", "--data-dir", data_dir.to_str().unwrap()]).env_remove("ATELIER_SECRET");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code(), text)
}

/// A rotation ends every earlier token at the running server (401), a token of the new secret
/// works, a stream opened before ends, and a stream resumes after its Last-Event-ID: event ids
/// are seqs of the log, not of the secret.
#[test]
fn a_rotated_secret_ends_earlier_tokens_and_streams_resume() {
    let dir = temp_dir("secrets-rotate");
    let data = dir.path().join("data");
    // No ATELIER_SECRET: the server keeps its secret in the data dir.
    let s = Server::start(exe(), &data, &[("ATELIER_SECRET", "")]);
    let old = token_from_file(&data, "alice");
    assert_eq!(s.get("/api/me", Some(&old)).status, 200);
    let first = s.create(
        &old,
        json!({"context": {"title": "before"}, "pipeline": "noop", "scheduled_for": "2099-01-01T00:00:00Z"}),
    );
    let mut stream = Sse::open(s.addr, "/api/commissions/user/alice/stream", &old, None);
    assert_eq!(stream.status, 200);
    let seen = stream.next().expect("the created event").id.expect("an id");
    let old_secret = std::fs::read(data.join("secret")).unwrap();

    let (code, out) = rotate(&data, &[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("tokens signed before no longer work"), "{out}");
    assert_ne!(std::fs::read(data.join("secret")).unwrap(), old_secret);
    let mode = std::fs::metadata(data.join("secret")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let refused = wait_for(Duration::from_secs(10), || {
        let r = s.get("/api/me", Some(&old));
        (r.status == 401).then_some(r)
    })
    .expect("the old token stops working");
    assert_eq!(refused.code(), "unauthorized");
    // The stream opened with the old token ends.
    stream.set_timeout(Duration::from_secs(10));
    assert!(stream.next().is_none(), "a stream of the old secret ends");

    let new = token_from_file(&data, "alice");
    assert_eq!(s.get("/api/me", Some(&new)).status, 200);
    let second = s.create(
        &new,
        json!({"context": {"title": "after"}, "pipeline": "noop", "scheduled_for": "2099-01-01T00:00:00Z"}),
    );
    let mut resumed = Sse::open(s.addr, "/api/commissions/user/alice/stream", &new, Some(seen));
    assert_eq!(resumed.status, 200);
    let next = resumed.next().expect("the event after the last seen");
    assert_eq!(next.id, Some(seen + 1));
    assert_eq!(next.data["task_id"], second["task_id"]);
    assert_ne!(first["task_id"], second["task_id"]);
}

/// With ATELIER_SECRET set the file is not what signs: a rotation is refused with the fix.
#[test]
fn rotate_refuses_while_the_secret_comes_from_the_environment() {
    let dir = temp_dir("secrets-rotate-env");
    let (code, out) = rotate(dir.path(), &[("ATELIER_SECRET", SECRET)]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("change ATELIER_SECRET"), "{out}");
    assert!(!dir.path().join("secret").exists(), "nothing written");
}
