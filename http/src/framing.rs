//! How a request's body is framed, decided from its head alone before any route or auth
//! runs. (A chunked body's chunk-size lines are read by the vendored tiny_http's strict
//! decoder, bounded by the same body limit.)
//!
//! Pure functions over headers and bytes, so that whichever layer reads the socket calls the
//! same checks. They are strict on purpose: a proxy in front of the server and the server
//! itself must never disagree on where a request ends (request smuggling), so anything with
//! two readings (Transfer-Encoding with Content-Length, a repeated or signed length, a coding
//! list ending in `chunked`) is refused rather than guessed at.

/// How the body of a request is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BodyFraming {
    /// No body.
    None,
    /// Exactly this many bytes follow the head.
    Length(usize),
    /// Chunks follow, each announced by a chunk-size line, up to a zero-size chunk.
    Chunked,
}

/// A request refused for its framing: the status and JSON error code to answer with, then
/// the connection is closed (its remaining bytes cannot be trusted to start a request).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) status: u16,
    pub(crate) code: &'static str,
    pub(crate) message: String,
}

impl Refusal {
    fn bad(message: impl Into<String>) -> Refusal {
        Refusal { status: 400, code: "bad_request", message: message.into() }
    }

    pub(crate) fn too_large(body_bytes_max: usize) -> Refusal {
        Refusal {
            status: 413,
            code: "body_too_large",
            message: format!("the body is over {body_bytes_max} bytes"),
        }
    }
}

/// Decides the framing of a request's body from its headers (names compared without case).
/// A body longer than `body_bytes_max` is refused here when its length is declared.
pub(crate) fn body_framing(
    headers: &[(String, String)],
    body_bytes_max: usize,
) -> Result<BodyFraming, Refusal> {
    let values = |name: &'static str| -> Vec<&str> {
        headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim()).collect()
    };
    let encodings = values("transfer-encoding");
    let lengths = values("content-length");
    if !encodings.is_empty() {
        if !lengths.is_empty() {
            return Err(Refusal::bad("Transfer-Encoding and Content-Length together are ambiguous"));
        }
        return match encodings.as_slice() {
            [te] if te.eq_ignore_ascii_case("chunked") => Ok(BodyFraming::Chunked),
            [te] => Err(Refusal::bad(format!(
                "Transfer-Encoding '{}' is not supported; only 'chunked' is",
                printable(te)
            ))),
            _ => Err(Refusal::bad("Transfer-Encoding is given more than once")),
        };
    }
    let n = match lengths.as_slice() {
        [] => return Ok(BodyFraming::None),
        [v] => content_length(v, body_bytes_max)?,
        _ => return Err(Refusal::bad("Content-Length is given more than once")),
    };
    Ok(if n == 0 { BodyFraming::None } else { BodyFraming::Length(n) })
}

/// A Content-Length value: one or more ASCII digits, nothing else (no sign, no list).
fn content_length(v: &str, body_bytes_max: usize) -> Result<usize, Refusal> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Refusal::bad(format!("Content-Length '{}' is not a number", printable(v))));
    }
    let mut n: usize = 0;
    for d in v.bytes() {
        n = n
            .checked_mul(10)
            .and_then(|n| n.checked_add(usize::from(d - b'0')))
            .ok_or_else(|| Refusal::too_large(body_bytes_max))?;
    }
    if n > body_bytes_max {
        return Err(Refusal::too_large(body_bytes_max));
    }
    Ok(n)
}

/// Whether a header name is an RFC 9110 token: visible ASCII without delimiters.
pub(crate) fn is_token(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// At most 80 characters of a client's value, for a message that quotes it.
fn printable(v: &str) -> String {
    v.chars().take(80).filter(|c| !c.is_control()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAX: usize = 1024;

    fn framing(headers: &[(&str, &str)]) -> Result<BodyFraming, u16> {
        let headers: Vec<(String, String)> =
            headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        body_framing(&headers, MAX).map_err(|r| r.status)
    }

    #[test]
    fn framing_of_heads() {
        use BodyFraming::*;
        for (headers, expected) in [
            (&[][..], Ok(None)),
            (&[("Content-Length", "0")][..], Ok(None)),
            (&[("content-length", " 12 ")][..], Ok(Length(12))),
            (&[("Content-Length", "1024")][..], Ok(Length(1024))),
            (&[("Content-Length", "1025")][..], Err(413)),
            (&[("Content-Length", "99999999999999999999999999")][..], Err(413)),
            (&[("Content-Length", "+5")][..], Err(400)),
            (&[("Content-Length", "-1")][..], Err(400)),
            (&[("Content-Length", "5, 5")][..], Err(400)),
            (&[("Content-Length", "0x10")][..], Err(400)),
            (&[("Content-Length", "")][..], Err(400)),
            (&[("Content-Length", "5"), ("Content-Length", "5")][..], Err(400)),
            (&[("Transfer-Encoding", "chunked")][..], Ok(Chunked)),
            (&[("transfer-encoding", "Chunked")][..], Ok(Chunked)),
            (&[("Transfer-Encoding", "xchunked")][..], Err(400)),
            (&[("Transfer-Encoding", "gzip, chunked")][..], Err(400)),
            (&[("Transfer-Encoding", "chunked, chunked")][..], Err(400)),
            (&[("Transfer-Encoding", "identity")][..], Err(400)),
            (&[("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")][..], Err(400)),
            (&[("Transfer-Encoding", "chunked"), ("Content-Length", "5")][..], Err(400)),
            (&[("Content-Length", "5"), ("Transfer-Encoding", "gzip")][..], Err(400)),
        ] {
            assert_eq!(framing(headers), expected, "{headers:?}");
        }
    }

    proptest! {
        #[test]
        fn content_length_is_accepted_exactly_when_it_is_a_small_number(v in "[0-9+ ,a-f-]{0,24}") {
            let headers = vec![("Content-Length".to_string(), v.clone())];
            let digits = !v.trim().is_empty() && v.trim().bytes().all(|b| b.is_ascii_digit());
            match body_framing(&headers, MAX) {
                Ok(BodyFraming::None) => prop_assert!(digits && v.trim().parse::<u128>() == Ok(0)),
                Ok(BodyFraming::Length(n)) => {
                    prop_assert!(digits);
                    prop_assert_eq!(v.trim().parse::<u128>().ok(), Some(n as u128));
                    prop_assert!(n <= MAX);
                }
                Ok(BodyFraming::Chunked) => prop_assert!(false, "no Transfer-Encoding was given"),
                Err(r) if r.status == 413 => prop_assert!(digits),
                Err(r) => prop_assert!(r.status == 400 && !digits),
            }
        }
    }
}
