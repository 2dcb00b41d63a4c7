//! The request fuzz target's body, in the library so that the fuzz workspace and `cargo
//! test`'s replay of the stored corpus run the same code: an arbitrary method, path, query,
//! headers and body go through parsing, routing and the handlers' input checks without a
//! panic.

use crate::auth::Keys;
use crate::dispatch::{find, token_of};
use crate::request::{percent_decode, Req};
use crate::routes::input;

/// The request fuzz target's body (also run over the stored corpus by `cargo test`): an
/// arbitrary method, path, query, headers and body go through parsing, routing and the
/// handlers' input checks without a panic. Input: lines `METHOD PATH`, then headers, a blank
/// line, then the body.
#[doc(hidden)]
pub fn fuzz_request(data: &[u8]) {
    fuzz_request_lines(data);
}

/// Input as lines `METHOD PATH`, headers, a blank line, then the body — the shape of the
/// seeds, reaching the handlers' checks even where the bytes are not a valid HTTP head.
fn fuzz_request_lines(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (head, body) = text.split_once("\n\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let first = lines.next().unwrap_or("");
    let (method, url) = first.split_once(' ').unwrap_or((first, "/"));
    let (path, query) = url.split_once('?').unwrap_or((url, ""));
    let req = Req {
        method: method.to_ascii_uppercase(),
        path: path.to_string(),
        query: query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (percent_decode(k), percent_decode(v)))
            .collect(),
        headers: lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect(),
        body: body.as_bytes().to_vec(),
    };
    check_request(&req);
}

fn check_request(req: &Req) {
    let _ = find(&req.method, &req.path);
    let _ = req.cookie("atelier_token");
    let secret = crate::secret::Secret::new(*b"fuzz-secret-of-thirty-two-bytes!");
    let keys = Keys::new(&secret.expect("invariant: 32 bytes"));
    if let Some(t) = req.header("authorization") {
        let _ = keys.verify(t.trim_start_matches("Bearer "), 0);
    }
    check_inputs(req);
}

/// Runs the pure input checks of the handlers (no store needed).
fn check_inputs(req: &Req) {
    let _ = input::last_event_id(req);
    let _ = input::json_body(req);
    let _ = token_of(req, true);
    if let Ok((_, params)) = find(&req.method, &req.path) {
        for p in params {
            let _ = input::parse_id(p, "id");
            let _ = percent_decode(p);
        }
    }
}
