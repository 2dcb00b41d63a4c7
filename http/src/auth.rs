//! Bearer tokens: standard HS256 JWTs (`sub`, `role`, `exp`), so other identity systems can
//! mint tokens Atelier accepts. `jsonwebtoken` does the framing and the HMAC (a constant-time
//! comparison); this module says which tokens are acceptable: HS256 only, `exp` required and
//! compared with the caller's clock, no leeway, and a size cap checked before any parsing.

use jsonwebtoken::errors::{Error as JwtError, ErrorKind as JwtErrorKind};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Bytes a token may have; longer ones are refused before any parsing.
pub const TOKEN_BYTES_MAX: usize = 4096;

/// The only algorithm signed or accepted: a shared secret, no key confusion.
const ALGORITHM: Algorithm = Algorithm::HS256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Admin => "admin",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub user_id: String,
    pub role: Role,
}

impl Identity {
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// Admins act on everything; a user only on their own.
    pub fn may_access(&self, owner: &str) -> bool {
        self.is_admin() || self.user_id == owner
    }
}

/// The claims issued and read, fields in the order the issued JSON has always had them
/// (sorted). `role` may be absent (or null) in tokens other systems mint: a user.
#[derive(Serialize, Deserialize)]
struct Claims {
    exp: i64,
    #[serde(default)]
    role: Option<Role>,
    sub: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenError {
    /// Not a JWT, too long, or claims of the wrong shape; `source` is the parser's complaint
    /// where there is one (none for a token refused by its size or an empty `sub`).
    Malformed {
        source: Option<JwtError>,
    },
    BadSignature,
    Expired,
    UnsupportedAlgorithm,
}

impl TokenError {
    fn malformed(source: JwtError) -> TokenError {
        TokenError::Malformed { source: Some(source) }
    }
}

impl std::fmt::Display for TokenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TokenError::Malformed { .. } => "the token is not a well-formed JWT",
            TokenError::BadSignature => "the token's signature does not match",
            TokenError::Expired => "the token has expired",
            TokenError::UnsupportedAlgorithm => "only HS256 tokens are accepted",
        })
    }
}

impl std::error::Error for TokenError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TokenError::Malformed { source: Some(e) } => Some(e),
            _ => None,
        }
    }
}

#[derive(Clone)]
pub struct Keys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl Keys {
    pub fn new(secret: &[u8]) -> Keys {
        // HMAC pads its key with zero bytes to the block size (RFC 2104), so an empty secret
        // signs exactly as the one-byte secret [0]. `jsonwebtoken` refuses an empty slice;
        // this keeps an empty secret file working as it always has.
        let secret = if secret.is_empty() { &[0u8][..] } else { secret };
        let encoding = EncodingKey::from_secret(secret).expect("invariant: the secret is not empty");
        let decoding = DecodingKey::from_secret(secret).expect("invariant: the secret is not empty");
        let mut validation = Validation::new(ALGORITHM);
        validation.algorithms = vec![ALGORITHM];
        validation.set_required_spec_claims(&["exp"]);
        // Expiry is compared in `verify` with the caller's `now`, with no leeway: a token is
        // dead at its `exp` second.
        validation.validate_exp = false;
        validation.leeway = 0;
        // Atelier has one audience; an `aud` minted by another system is not its concern.
        validation.validate_aud = false;
        Keys { encoding, decoding, validation }
    }

    /// Signs a token for `user` valid until `exp` (seconds since the epoch).
    pub fn issue(&self, user: &str, role: Role, exp: i64) -> String {
        let claims = Claims { exp, role: Some(role), sub: user.to_string() };
        jsonwebtoken::encode(&Header::new(ALGORITHM), &claims, &self.encoding)
            .expect("invariant: an HS256 key signs any claims that serialize")
    }

    /// Checks size, algorithm, signature and expiry (`now` in seconds since the epoch).
    pub fn verify(&self, token: &str, now: i64) -> Result<Identity, TokenError> {
        if token.len() > TOKEN_BYTES_MAX || token.split('.').count() != 3 {
            return Err(TokenError::Malformed { source: None });
        }
        // The header is read on its own first so that a token naming another algorithm (or
        // none) is told so, whether or not `jsonwebtoken` knows that algorithm's name.
        match jsonwebtoken::decode_header(token) {
            Ok(header) if header.alg == ALGORITHM => {}
            Ok(_) => return Err(TokenError::UnsupportedAlgorithm),
            Err(e) if names_an_unknown_algorithm(&e) => return Err(TokenError::UnsupportedAlgorithm),
            Err(e) => return Err(TokenError::malformed(e)),
        }
        let claims = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                JwtErrorKind::InvalidSignature => TokenError::BadSignature,
                JwtErrorKind::InvalidAlgorithm => TokenError::UnsupportedAlgorithm,
                _ => TokenError::malformed(e),
            })?
            .claims;
        if claims.exp <= now {
            return Err(TokenError::Expired);
        }
        if claims.sub.is_empty() {
            return Err(TokenError::Malformed { source: None });
        }
        Ok(Identity { user_id: claims.sub, role: claims.role.unwrap_or(Role::User) })
    }
}

/// Whether a header is JSON of the wrong shape (in practice an `alg` that is missing, `none`
/// or one `jsonwebtoken` does not know) rather than bytes that are not JSON at all.
fn names_an_unknown_algorithm(e: &JwtError) -> bool {
    match e.kind() {
        JwtErrorKind::Json(json) => json.classify() == serde_json::error::Category::Data,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use base64::Engine as _;

    use super::*;

    fn malformed() -> Result<Identity, TokenError> {
        Err(TokenError::Malformed { source: None })
    }

    /// A token with `header` and `payload` (JSON) and the signature of `signed_by`.
    fn forge(header: &str, payload: &str, signed_by: &Keys) -> String {
        let real = signed_by.issue("x", Role::User, 1);
        let sig = real.rsplit('.').next().unwrap();
        format!("{}.{}.{sig}", B64.encode(header), B64.encode(payload))
    }

    #[test]
    fn issue_verify_round_trip_and_failures() {
        let k = Keys::new(b"secret");
        let t = k.issue("alice", Role::Admin, 2_000);
        assert_eq!(k.verify(&t, 1_000), Ok(Identity { user_id: "alice".into(), role: Role::Admin }));
        assert_eq!(k.verify(&t, 2_000), Err(TokenError::Expired));
        assert_eq!(Keys::new(b"other").verify(&t, 1_000), Err(TokenError::BadSignature));
        assert_eq!(k.verify("a.b", 0), malformed());
        // Swap the payload for one claiming admin: the signature no longer matches.
        let forged_payload = B64.encode(r#"{"sub":"mallory","role":"admin","exp":9999999999}"#);
        let parts: Vec<&str> = t.split('.').collect();
        let forged = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
        assert_eq!(k.verify(&forged, 1_000), Err(TokenError::BadSignature));
        // alg=none is refused.
        let none = format!("{}.{}.", B64.encode(r#"{"alg":"none"}"#), parts[1]);
        assert_eq!(k.verify(&none, 1_000), Err(TokenError::UnsupportedAlgorithm));
    }

    /// Tokens minted before `jsonwebtoken` signed them (header `{"alg":"HS256","typ":"JWT"}`,
    /// claims `{"exp","role","sub"}`) keep verifying, an empty secret's too.
    #[test]
    fn tokens_in_the_earlier_layout_still_verify() {
        let alice = Ok(Identity { user_id: "alice".into(), role: Role::Admin });
        let signed = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.\
            eyJleHAiOjQwMDAwMDAwMDAsInJvbGUiOiJhZG1pbiIsInN1YiI6ImFsaWNlIn0.";
        let by_secret = format!("{signed}84UqI5taZjFJNMd0-DY_3yA1CZJt_6c98rvP8Rm7r5k");
        let by_empty = format!("{signed}6Cvz813wN0Ls1H8F4TVSFbxp2IM3w65kT9hEOjaZ-Bs");
        assert_eq!(Keys::new(b"secret").verify(&by_secret, 1_000), alice);
        assert_eq!(Keys::new(b"").verify(&by_empty, 1_000), alice);
        // And the claims issued today are the same JSON.
        let t = Keys::new(b"secret").issue("alice", Role::Admin, 4_000_000_000);
        let payload = B64.decode(t.split('.').nth(1).unwrap()).unwrap();
        assert_eq!(payload, br#"{"exp":4000000000,"role":"admin","sub":"alice"}"#);
    }

    #[test]
    fn only_hs256_is_accepted() {
        let k = Keys::new(b"secret");
        let claims = r#"{"sub":"mallory","role":"admin","exp":9999999999}"#;
        for header in [
            r#"{"alg":"none","typ":"JWT"}"#,
            r#"{"alg":"HS512","typ":"JWT"}"#,
            r#"{"alg":"HS384"}"#,
            r#"{"alg":"RS256","typ":"JWT"}"#,
            r#"{"alg":"ES256"}"#,
            r#"{"typ":"JWT"}"#,
        ] {
            assert_eq!(
                k.verify(&forge(header, claims, &k), 1_000),
                Err(TokenError::UnsupportedAlgorithm),
                "{header}"
            );
        }
        // An HS512 token correctly signed with the same secret is refused too.
        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &Claims { exp: 9_999_999_999, role: Some(Role::Admin), sub: "mallory".into() },
            &EncodingKey::from_secret(b"secret").unwrap(),
        )
        .unwrap();
        assert_eq!(k.verify(&hs512, 1_000), Err(TokenError::UnsupportedAlgorithm));
    }

    #[test]
    fn a_token_without_exp_is_refused() {
        let k = Keys::new(b"secret");
        let no_exp = jsonwebtoken::encode(
            &Header::new(ALGORITHM),
            &serde_json::json!({"sub": "alice", "role": "admin"}),
            &EncodingKey::from_secret(b"secret").unwrap(),
        )
        .unwrap();
        let err = k.verify(&no_exp, 1_000).unwrap_err();
        assert!(matches!(err, TokenError::Malformed { source: Some(_) }), "{err:?}");
        // The parser's complaint is kept as the source.
        let source = std::error::Error::source(&err).expect("a source").to_string();
        assert!(source.contains("exp"), "{source}");
    }

    #[test]
    fn an_oversized_token_is_refused_before_parsing() {
        let k = Keys::new(b"secret");
        // Correctly signed, so only its size can refuse it; no parser error is the source.
        let big = k.issue(&"a".repeat(TOKEN_BYTES_MAX), Role::User, 9_999_999_999);
        assert!(big.len() > TOKEN_BYTES_MAX);
        assert_eq!(k.verify(&big, 1_000), malformed());
        let fits = k.issue(&"a".repeat(TOKEN_BYTES_MAX / 2), Role::User, 9_999_999_999);
        assert!(k.verify(&fits, 1_000).is_ok());
    }

    #[test]
    fn a_tampered_signature_is_refused() {
        let k = Keys::new(b"secret");
        let t = k.issue("alice", Role::User, 9_999_999_999);
        let (signed, sig) = t.rsplit_once('.').unwrap();
        let mut bytes = B64.decode(sig).unwrap();
        bytes[0] ^= 1;
        let tampered = format!("{signed}.{}", B64.encode(&bytes));
        assert_eq!(k.verify(&tampered, 1_000), Err(TokenError::BadSignature));
        let truncated = format!("{signed}.{}", B64.encode(&bytes[..16]));
        assert_eq!(k.verify(&truncated, 1_000), Err(TokenError::BadSignature));
        assert_eq!(k.verify(&format!("{signed}."), 1_000), Err(TokenError::BadSignature));
    }

    #[test]
    fn claims_of_the_wrong_shape_are_malformed() {
        let k = Keys::new(b"secret");
        let sign = |claims: serde_json::Value| {
            jsonwebtoken::encode(
                &Header::new(ALGORITHM),
                &claims,
                &EncodingKey::from_secret(b"secret").unwrap(),
            )
            .unwrap()
        };
        let user = Ok(Identity { user_id: "bob".into(), role: Role::User });
        assert_eq!(k.verify(&sign(serde_json::json!({"sub": "bob", "exp": 9_999_999_999_i64})), 1_000), user);
        assert_eq!(
            k.verify(&sign(serde_json::json!({"sub": "", "exp": 9_999_999_999_i64})), 1_000),
            malformed()
        );
        for bad in [
            serde_json::json!({"sub": "bob", "role": "root", "exp": 9_999_999_999_i64}),
            serde_json::json!({"sub": 7, "exp": 9_999_999_999_i64}),
            serde_json::json!({"exp": 9_999_999_999_i64}),
            serde_json::json!({"sub": "bob", "exp": "never"}),
        ] {
            let err = k.verify(&sign(bad.clone()), 1_000).unwrap_err();
            assert!(matches!(err, TokenError::Malformed { .. }), "{bad}: {err:?}");
        }
    }
}
