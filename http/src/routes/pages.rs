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

/// A content-addressed artifact: named by its sha-256, so it is cached for good.
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
    Ok(match stored.map(std::fs::read) {
        Some(Ok(bytes)) => Reply::Bytes(
            200,
            "image/png",
            bytes,
            vec![("Cache-Control", "public, max-age=31536000, immutable".into())],
        ),
        _ => error(404, "not_found", format!("no artifact {name}")),
    })
}

fn page(html: &'static str, extra: Vec<(&'static str, String)>) -> Reply {
    Reply::Bytes(200, "text/html; charset=utf-8", html.as_bytes().to_vec(), extra)
}
