//! The sign-in cookie: how it is set and cleared, and when it may authorize a request.
//!
//! A browser sends a cookie with every request to its host, whichever page started the
//! request: `SameSite=Strict` counts another port of the same host, or a sibling subdomain, as
//! the same site. So the cookie alone is enough only to read (GET, HEAD, streams). A request
//! that changes state and carries only the cookie must also come from this server's own page:
//! its `Origin` is this server's (or, without one, `Sec-Fetch-Site: same-origin`), and it
//! carries [`REQUEST_HEADER`], which a form or a plain link cannot send and a cross-origin
//! script cannot send without a CORS preflight that this server never grants.

use crate::config::Scheme;
use crate::reply::{error, Reply};
use crate::request::Req;

/// The cookie that holds a signed-in browser's token.
pub const COOKIE_NAME: &str = "atelier_token";

/// The header the page sets on every state-changing request it makes with the cookie.
pub const REQUEST_HEADER: &str = "X-Atelier-Request";

/// The `Set-Cookie` value that signs a browser in with `token` until its `exp` (seconds since
/// the epoch): the cookie dies with its token, so the page asks to sign in again instead of
/// sending a token every request would refuse. `Secure` over HTTPS.
pub(crate) fn set(token: &str, exp: i64, now: i64, scheme: Scheme) -> String {
    let max_age = exp.saturating_sub(now).max(0);
    format!("{COOKIE_NAME}={token}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict{}", secure(scheme))
}

/// The `Set-Cookie` value that signs a browser out.
pub(crate) fn clear(scheme: Scheme) -> String {
    format!("{COOKIE_NAME}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict{}", secure(scheme))
}

fn secure(scheme: Scheme) -> &'static str {
    match scheme {
        Scheme::Https => "; Secure",
        Scheme::Http => "",
    }
}

/// Whether a method only reads: the cookie alone may authorize it.
pub(crate) fn reads_only(method: &str) -> bool {
    matches!(method, "GET" | "HEAD")
}

/// Refuses (403) a request that is not from this server's own page: its `Origin` must be this
/// server's (`scheme://Host`), or, without an `Origin`, `Sec-Fetch-Site` must say
/// `same-origin`; and it must carry [`REQUEST_HEADER`].
pub(crate) fn check_own_page(req: &Req, scheme: Scheme) -> Result<(), Reply> {
    let same_origin = match req.header("origin") {
        Some(origin) => req
            .header("host")
            .is_some_and(|host| origin.eq_ignore_ascii_case(&format!("{}://{host}", scheme.as_str()))),
        None => req.header("sec-fetch-site").is_some_and(|s| s.eq_ignore_ascii_case("same-origin")),
    };
    if !same_origin {
        return Err(error(
            403,
            "cross_origin",
            "a request that changes something and is signed in by the cookie must come from this \
             server's own page (its Origin); other clients send Authorization: Bearer",
        ));
    }
    if req.header(REQUEST_HEADER).is_none() {
        return Err(error(
            403,
            "cross_origin",
            format!(
                "a request that changes something and is signed in by the cookie must carry the \
                 {REQUEST_HEADER} header the page sets; other clients send Authorization: Bearer"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &str)]) -> Req {
        Req {
            method: "POST".into(),
            path: "/api/commissions/1/cancel".into(),
            query: vec![],
            headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            body: vec![],
        }
    }

    #[test]
    fn only_the_own_page_with_the_header_passes() {
        let host = ("Host", "127.0.0.1:8080");
        let own = ("Origin", "http://127.0.0.1:8080");
        let marked = (REQUEST_HEADER, "1");
        assert!(check_own_page(&req(&[host, own, marked]), Scheme::Http).is_ok());
        assert!(check_own_page(&req(&[host, own]), Scheme::Http).is_err(), "no header");
        assert!(check_own_page(&req(&[host, marked]), Scheme::Http).is_err(), "no origin");
        assert!(check_own_page(&req(&[host, own, marked]), Scheme::Https).is_err(), "other scheme");
        for other in ["http://127.0.0.1:3000", "http://evil.example", "null", "http://127.0.0.1:8080.evil"] {
            assert!(
                check_own_page(&req(&[host, ("Origin", other), marked]), Scheme::Http).is_err(),
                "{other}"
            );
        }
        let fetch_site = ("Sec-Fetch-Site", "same-origin");
        assert!(check_own_page(&req(&[host, fetch_site, marked]), Scheme::Http).is_ok());
        let same_site = ("Sec-Fetch-Site", "same-site");
        assert!(check_own_page(&req(&[host, same_site, marked]), Scheme::Http).is_err());
        // An Origin, when there is one, decides: Sec-Fetch-Site cannot overrule it.
        let evil = ("Origin", "http://127.0.0.1:3000");
        assert!(check_own_page(&req(&[host, evil, fetch_site, marked]), Scheme::Http).is_err());
    }

    #[test]
    fn the_cookie_lives_as_long_as_its_token_and_is_secure_over_https() {
        assert_eq!(
            set("t", 1_900, 1_000, Scheme::Http),
            "atelier_token=t; Path=/; Max-Age=900; HttpOnly; SameSite=Strict"
        );
        assert!(set("t", 1_900, 1_000, Scheme::Https).ends_with("; Secure"));
        assert!(clear(Scheme::Https).contains("Max-Age=0") && clear(Scheme::Https).ends_with("; Secure"));
        assert!(set("t", 900, 1_000, Scheme::Http).contains("Max-Age=0;"));
    }
}
