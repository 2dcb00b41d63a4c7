//! The web page, its assets and the artifacts it shows: public routes, served as bytes.

use atelier_storage::StorageError;

use super::call::Call;
use crate::assets;
use crate::clock::now_ms;
use crate::reply::{error, Reply};

/// The status page. `?token=` signs in once from the URL: a valid token goes into an
/// HttpOnly cookie and the browser is sent back to `/` without it; an invalid one clears it.
pub(super) fn index(call: &Call<'_>) -> Result<Reply, StorageError> {
    let Some(token) = call.req.query("token") else {
        return Ok(page(assets::INDEX, vec![]));
    };
    if call.shared.keys.verify(token, now_ms() / 1000).is_err() {
        return Ok(page(
            assets::INDEX,
            vec![("Set-Cookie", "atelier_token=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict".into())],
        ));
    }
    let cookie = format!("atelier_token={token}; Path=/; HttpOnly; SameSite=Strict");
    Ok(Reply::Bytes(303, "text/plain", Vec::new(), vec![("Set-Cookie", cookie), ("Location", "/".into())]))
}

pub(super) fn commission(_: &Call<'_>) -> Result<Reply, StorageError> {
    Ok(page(assets::COMMISSION, vec![]))
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
