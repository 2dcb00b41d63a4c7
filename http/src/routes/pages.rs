//! The web page, its assets and the artifacts it shows: public routes, served as bytes.

use atelier_storage::StorageError;

use serde_json::Value;

use super::call::{tri, Call};
use super::input::json_body;
use crate::assets;
use crate::auth::{Identity, Role};
use crate::clock::now_ms;
use crate::cookie::{self, COOKIE_NAME};
use crate::reply::{error, Reply};

/// The status page; `?token=` signs in (see [`signing_in`]).
pub(super) fn index(call: &Call<'_>) -> Result<Reply, StorageError> {
    Ok(signing_in(call, assets::INDEX))
}

/// The progress view; `?token=` signs in and lands here (see [`signing_in`]).
pub(super) fn commission(call: &Call<'_>) -> Result<Reply, StorageError> {
    Ok(signing_in(call, assets::COMMISSION))
}

/// A page, or a sign-in from its URL. A valid `?token=` goes into an HttpOnly cookie and the
/// browser is sent back to the same page without it; an invalid one clears the cookie. When
/// the browser is signed in as someone else already, the page asks first: a link must not
/// switch accounts silently (a link is all it takes to sign a browser into a stranger's
/// account, and then whatever it creates is theirs).
fn signing_in(call: &Call<'_>, html: &'static str) -> Reply {
    let Some(token) = call.req.query("token") else {
        return page(html, vec![]);
    };
    let (now, scheme) = (now_ms() / 1000, call.shared.config.scheme());
    let keys = &call.shared.keys;
    let Ok((who, exp)) = keys.verify_until(token, now) else {
        return page(html, vec![("Set-Cookie", cookie::clear(scheme))]);
    };
    let here = call.req.path.clone();
    let current = call.req.cookie(COOKIE_NAME).and_then(|c| keys.verify(c, now).ok());
    if let Some(current) = current.filter(|c| *c != who) {
        return switch_page(&current, &who, token, &here);
    }
    let headers = vec![("Set-Cookie", cookie::set(token, exp, now, scheme)), ("Location", here)];
    Reply::Bytes(303, "text/plain", Vec::new(), headers)
}

/// The page that asks before signing in as `next` over `current`; its button posts the token
/// to `/api/session` from this origin (see `sign_in`), its other choice goes to `here` as is.
fn switch_page(current: &Identity, next: &Identity, token: &str, here: &str) -> Reply {
    let html = assets::SWITCH
        .replace("{current}", &escape(&describe(current)))
        .replace("{next}", &escape(&describe(next)))
        .replace("{token}", &escape(token))
        .replace("{here}", &escape(here));
    Reply::Bytes(200, "text/html; charset=utf-8", html.into_bytes(), vec![])
}

fn describe(who: &Identity) -> String {
    match who.role {
        Role::Admin => format!("{} (admin)", who.user_id),
        Role::User => who.user_id.clone(),
    }
}

/// Text for an HTML text node or a quoted attribute. Braces too, so that no filled-in text
/// can spell a placeholder that a later substitution would fill.
fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('{', "&#123;")
        .replace('}', "&#125;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// Signs the browser in with the body's token: 204 and the cookie. Only the server's own page
/// may (its origin and the page's header, as for any cookie-borne change): a cross-site page
/// must not be able to sign a browser into an account of its choosing.
pub(super) fn sign_in(call: &Call<'_>) -> Result<Reply, StorageError> {
    let scheme = call.shared.config.scheme();
    tri!(cookie::check_own_page(call.req, scheme));
    let body = tri!(json_body(call.req));
    let Some(token) = body.get("token").and_then(Value::as_str) else {
        return Ok(error(400, "invalid_field", "token: required (a string)"));
    };
    let now = now_ms() / 1000;
    Ok(match call.shared.keys.verify_until(token, now) {
        Ok((_, exp)) => Reply::Bytes(
            204,
            "text/plain",
            vec![],
            vec![("Set-Cookie", cookie::set(token, exp, now, scheme))],
        ),
        Err(e) => error(401, "unauthorized", e.to_string()),
    })
}

pub(super) fn asset(call: &Call<'_>) -> Result<Reply, StorageError> {
    Ok(match call.params[0] {
        "app.js" => {
            Reply::Bytes(200, "text/javascript; charset=utf-8", assets::APP_JS.as_bytes().to_vec(), vec![])
        }
        "style.css" => {
            Reply::Bytes(200, "text/css; charset=utf-8", assets::STYLE_CSS.as_bytes().to_vec(), vec![])
        }
        other => error(404, "not_found", format!("no asset {other}")),
    })
}

/// The largest artifact served; a file above it is not (a worker could leave any size there).
pub const ARTIFACT_SERVED_BYTES_MAX: u64 = 64 * 1024 * 1024;

/// A content-addressed artifact: named by its sha-256, so it is cached for good. Workers fill
/// the artifacts dir, and a job could leave a file under the name of content another job is
/// about to make: what is served must hash to its name, or it is not served at all.
pub(super) fn artifact(call: &Call<'_>) -> Result<Reply, StorageError> {
    let name = call.params[0];
    let hash = name.strip_suffix(".png").unwrap_or("");
    if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
        return Ok(error(
            404,
            "not_found",
            "artifacts are named by their sha-256, e.g. /artifacts/<64 hex>.png",
        ));
    }
    // Without executors nothing makes artifacts: there is none to serve.
    let stored = call.shared.executors.as_ref().map(|e| e.artifacts_dir().join(name));
    let read = stored.and_then(|p| super::worker_files::read_capped(&p, ARTIFACT_SERVED_BYTES_MAX + 1));
    let verified = read.filter(|bytes| {
        let ok = bytes.len() as u64 <= ARTIFACT_SERVED_BYTES_MAX && sha256_hex(bytes) == hash;
        if !ok {
            tracing::warn!(artifact = %name, bytes = bytes.len(), "an artifact file that does not hash to its name (or is too large) was not served");
        }
        ok
    });
    Ok(match verified {
        Some(bytes) => Reply::Bytes(
            200,
            "image/png",
            bytes,
            vec![("Cache-Control", "public, max-age=31536000, immutable".into())],
        ),
        _ => error(404, "not_found", format!("no artifact {name}")),
    })
}

/// Lowercase hex of the SHA-256 of `bytes`: an artifact's name.
fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    use std::fmt::Write;
    sha2::Sha256::digest(bytes).iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn page(html: &'static str, extra: Vec<(&'static str, String)>) -> Reply {
    Reply::Bytes(200, "text/html; charset=utf-8", html.as_bytes().to_vec(), extra)
}
