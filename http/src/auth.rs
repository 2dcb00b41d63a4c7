//! Bearer tokens: standard HS256 JWTs (`sub`, `role`, `exp`, `iat`), so other identity systems
//! can mint tokens Atelier accepts. `jsonwebtoken` does the framing and the HMAC (a
//! constant-time comparison); this module says which tokens are acceptable: HS256 only, `exp`
//! required, `iat` and `nbf` honoured when present, all compared with the caller's clock with
//! no leeway, a token lifetime no longer than the configured maximum, and a size cap checked
//! before any parsing. The secret can be rotated while the server runs (`Keys::rotate`):
//! tokens signed with the earlier one stop verifying at once.

use std::sync::{Arc, RwLock};

use jsonwebtoken::errors::{Error as JwtError, ErrorKind as JwtErrorKind};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::secret::Secret;

/// Bytes a token may have; longer ones are refused before any parsing.
pub const TOKEN_BYTES_MAX: usize = 4096;

/// The only algorithm signed or accepted: a shared secret, no key confusion.
const ALGORITHM: Algorithm = Algorithm::HS256;

/// The longest a token may live, `exp` − `iat` (or `exp` − now for a token without `iat`),
/// unless the server is configured otherwise. A token cannot be revoked but by rotating the
/// secret, so a leaked one is dangerous for its whole life: 30 days covers a monthly
/// automation token while keeping that window bounded.
pub const TOKEN_TTL_MAX_S_DEFAULT: i64 = 30 * 86_400;

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
/// (sorted). `role` may be absent (or null) in tokens other systems mint: a user. `iat` is
/// absent from tokens issued before it was, and `nbf` is never issued but honoured.
#[derive(Serialize, Deserialize)]
struct Claims {
    exp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nbf: Option<i64>,
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
    /// `nbf` or `iat` is later than now.
    NotYetValid,
    /// The token lives longer than the server allows (`exp` − `iat`, or `exp` − now).
    TtlTooLong {
        ttl_s: i64,
        max_s: i64,
    },
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
            TokenError::NotYetValid => "the token is not yet valid",
            TokenError::TtlTooLong { ttl_s, max_s } => {
                return write!(
                    f,
                    "the token lives {ttl_s}s, longer than the {max_s}s this server allows (token_ttl_max)"
                )
            }
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

/// The keys of one secret.
struct KeySet {
    encoding: EncodingKey,
    decoding: DecodingKey,
    /// Counts rotations: a stream opened under an earlier secret ends when it changes.
    generation: u64,
}

impl KeySet {
    fn of(secret: &Secret, generation: u64) -> KeySet {
        let secret = secret.as_bytes();
        let encoding = EncodingKey::from_secret(secret).expect("invariant: a Secret is not empty");
        let decoding = DecodingKey::from_secret(secret).expect("invariant: a Secret is not empty");
        KeySet { encoding, decoding, generation }
    }
}

/// The signing keys. Clones share one current secret: [`Keys::rotate`] on any of them (the
/// binary's, when the secret file changes) switches every holder (the server's) at once.
#[derive(Clone)]
pub struct Keys {
    current: Arc<RwLock<Arc<KeySet>>>,
    validation: Validation,
    ttl_max_s: i64,
}

impl Keys {
    /// Keys for `secret`, which is long enough by construction, accepting tokens that live up
    /// to [`TOKEN_TTL_MAX_S_DEFAULT`].
    pub fn new(secret: &Secret) -> Keys {
        let mut validation = Validation::new(ALGORITHM);
        validation.algorithms = vec![ALGORITHM];
        validation.set_required_spec_claims(&["exp"]);
        // Expiry and `nbf` are compared in `verify` with the caller's `now`, with no leeway: a
        // token is dead at its `exp` second and alive from its `nbf` second.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.leeway = 0;
        // Atelier has one audience; an `aud` minted by another system is not its concern.
        validation.validate_aud = false;
        Keys {
            current: Arc::new(RwLock::new(Arc::new(KeySet::of(secret, 0)))),
            validation,
            ttl_max_s: TOKEN_TTL_MAX_S_DEFAULT,
        }
    }

    fn current(&self) -> Arc<KeySet> {
        self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Signs and verifies with `secret` from now on, here and in every clone: tokens signed
    /// with the earlier secret stop verifying.
    pub fn rotate(&self, secret: &Secret) {
        let mut current = self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let generation = current.generation + 1;
        *current = Arc::new(KeySet::of(secret, generation));
    }

    /// How many times the secret was rotated.
    pub fn generation(&self) -> u64 {
        self.current().generation
    }

    /// These keys, accepting (and issuing) tokens that live up to `ttl_max_s` seconds.
    pub fn with_ttl_max_s(self, ttl_max_s: i64) -> Keys {
        Keys { ttl_max_s, ..self }
    }

    pub fn ttl_max_s(&self) -> i64 {
        self.ttl_max_s
    }

    /// Signs a token for `user` issued at `iat` and valid for `ttl_s` seconds after it
    /// (seconds since the epoch); a `ttl_s` beyond the maximum is refused, as `verify` would.
    pub fn issue(&self, user: &str, role: Role, iat: i64, ttl_s: i64) -> Result<String, TokenError> {
        if ttl_s > self.ttl_max_s {
            return Err(TokenError::TtlTooLong { ttl_s, max_s: self.ttl_max_s });
        }
        let claims = Claims {
            exp: iat.saturating_add(ttl_s),
            iat: Some(iat),
            nbf: None,
            role: Some(role),
            sub: user.to_string(),
        };
        Ok(jsonwebtoken::encode(&Header::new(ALGORITHM), &claims, &self.current().encoding)
            .expect("invariant: an HS256 key signs any claims that serialize"))
    }

    /// Checks size, algorithm, signature, expiry, `nbf`, `iat` and lifetime (`now` in seconds
    /// since the epoch).
    pub fn verify(&self, token: &str, now: i64) -> Result<Identity, TokenError> {
        self.verify_until(token, now).map(|(who, _)| who)
    }

    /// [`Keys::verify`], and the token's `exp`: a cookie holding the token expires with it.
    pub fn verify_until(&self, token: &str, now: i64) -> Result<(Identity, i64), TokenError> {
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
        let claims = jsonwebtoken::decode::<Claims>(token, &self.current().decoding, &self.validation)
            .map_err(|e| match e.kind() {
                JwtErrorKind::InvalidSignature => TokenError::BadSignature,
                JwtErrorKind::InvalidAlgorithm => TokenError::UnsupportedAlgorithm,
                _ => TokenError::malformed(e),
            })?
            .claims;
        if claims.exp <= now {
            return Err(TokenError::Expired);
        }
        if claims.nbf.is_some_and(|nbf| nbf > now) || claims.iat.is_some_and(|iat| iat > now) {
            return Err(TokenError::NotYetValid);
        }
        // A token without `iat` (minted before it was issued, or by another system) is judged
        // by what is left of its life, so it keeps working within the maximum.
        let ttl_s = claims.exp.saturating_sub(claims.iat.unwrap_or(now));
        if ttl_s > self.ttl_max_s {
            return Err(TokenError::TtlTooLong { ttl_s, max_s: self.ttl_max_s });
        }
        if claims.sub.is_empty() {
            return Err(TokenError::Malformed { source: None });
        }
        Ok((Identity { user_id: claims.sub, role: claims.role.unwrap_or(Role::User) }, claims.exp))
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

    /// The unit tests' secret, and another of the same length.
    const SECRET: &[u8] = b"secret-for-the-auth-unit-tests!!";
    const OTHER: &[u8] = b"other-secret-for-the-auth-tests!";

    /// Keys for `secret` with no lifetime limit, for the tests of everything else.
    fn keys_for(secret: &[u8]) -> Keys {
        Keys::new(&Secret::new(secret).unwrap()).with_ttl_max_s(i64::MAX)
    }

    fn keys() -> Keys {
        keys_for(SECRET)
    }

    /// A token issued at 0 that expires at `exp`.
    fn issue(k: &Keys, user: &str, role: Role, exp: i64) -> String {
        k.issue(user, role, 0, exp).unwrap()
    }

    fn malformed() -> Result<Identity, TokenError> {
        Err(TokenError::Malformed { source: None })
    }

    /// A token with `header` and `payload` (JSON) and the signature of `signed_by`.
    fn forge(header: &str, payload: &str, signed_by: &Keys) -> String {
        let real = issue(signed_by, "x", Role::User, 1);
        let sig = real.rsplit('.').next().unwrap();
        format!("{}.{}.{sig}", B64.encode(header), B64.encode(payload))
    }

    #[test]
    fn issue_verify_round_trip_and_failures() {
        let k = keys();
        let t = issue(&k, "alice", Role::Admin, 2_000);
        assert_eq!(k.verify(&t, 1_000), Ok(Identity { user_id: "alice".into(), role: Role::Admin }));
        assert_eq!(k.verify(&t, 2_000), Err(TokenError::Expired));
        assert_eq!(keys_for(OTHER).verify(&t, 1_000), Err(TokenError::BadSignature));
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
    /// claims `{"exp","role","sub"}`, no `iat`) keep verifying within the maximum lifetime.
    /// The signature was computed apart from this crate (HMAC-SHA256 of the first two parts).
    #[test]
    fn tokens_in_the_earlier_layout_still_verify() {
        let alice = Ok(Identity { user_id: "alice".into(), role: Role::Admin });
        let signed = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.\
            eyJleHAiOjQwMDAwMDAwMDAsInJvbGUiOiJhZG1pbiIsInN1YiI6ImFsaWNlIn0.";
        let by_secret = format!("{signed}TSHdrDJkpmFz1DUaF6w0LENyyjB3fzhGvErBO4uzZCI");
        let k = Keys::new(&Secret::new(SECRET).unwrap());
        let within_ttl = 4_000_000_000 - TOKEN_TTL_MAX_S_DEFAULT;
        assert_eq!(k.verify(&by_secret, within_ttl), alice);
        let too_early = within_ttl - 1;
        assert_eq!(
            k.verify(&by_secret, too_early),
            Err(TokenError::TtlTooLong {
                ttl_s: TOKEN_TTL_MAX_S_DEFAULT + 1,
                max_s: TOKEN_TTL_MAX_S_DEFAULT
            })
        );
        // The claims issued today are the same JSON with `iat` in its sorted place.
        let t = k.issue("alice", Role::Admin, 3_999_999_000, 1_000).unwrap();
        let payload = B64.decode(t.split('.').nth(1).unwrap()).unwrap();
        assert_eq!(payload, br#"{"exp":4000000000,"iat":3999999000,"role":"admin","sub":"alice"}"#);
    }

    #[test]
    fn iat_nbf_and_the_maximum_lifetime_are_checked() {
        let k = Keys::new(&Secret::new(SECRET).unwrap()).with_ttl_max_s(3_600);
        let sign = |claims: serde_json::Value| {
            jsonwebtoken::encode(&Header::new(ALGORITHM), &claims, &EncodingKey::from_secret(SECRET).unwrap())
                .unwrap()
        };
        let bob = Ok(Identity { user_id: "bob".into(), role: Role::User });
        let t = k.issue("bob", Role::User, 1_000, 3_600).unwrap();
        assert_eq!(k.verify(&t, 1_000), bob);
        assert_eq!(k.verify(&t, 999), Err(TokenError::NotYetValid), "issued in the future");
        assert_eq!(k.verify(&t, 4_600), Err(TokenError::Expired));
        assert_eq!(
            k.issue("bob", Role::User, 1_000, 3_601),
            Err(TokenError::TtlTooLong { ttl_s: 3_601, max_s: 3_600 })
        );
        let nbf = sign(serde_json::json!({"sub": "bob", "nbf": 2_000, "exp": 3_000}));
        assert_eq!(k.verify(&nbf, 1_999), Err(TokenError::NotYetValid));
        assert_eq!(k.verify(&nbf, 2_000), bob);
        let long = sign(serde_json::json!({"sub": "bob", "iat": 1_000, "exp": 4_601}));
        assert_eq!(k.verify(&long, 4_000), Err(TokenError::TtlTooLong { ttl_s: 3_601, max_s: 3_600 }));
        assert!(k.verify(&long, 4_000).unwrap_err().to_string().contains("longer than"));
        // Without `iat`, what is left of the token's life counts.
        let no_iat = sign(serde_json::json!({"sub": "bob", "exp": 4_601}));
        assert!(matches!(k.verify(&no_iat, 1_000), Err(TokenError::TtlTooLong { .. })));
        assert_eq!(k.verify(&no_iat, 1_001), bob);
    }

    #[test]
    fn a_rotation_reaches_every_clone_and_ends_earlier_tokens() {
        let k = keys();
        let server = k.clone();
        let before = issue(&k, "alice", Role::User, 9_999);
        assert!(server.verify(&before, 1_000).is_ok());
        assert_eq!(server.generation(), 0);
        k.rotate(&Secret::new(OTHER).unwrap());
        assert_eq!(server.generation(), 1);
        assert_eq!(server.verify(&before, 1_000), Err(TokenError::BadSignature));
        let after = issue(&k, "alice", Role::User, 9_999);
        assert!(server.verify(&after, 1_000).is_ok());
        assert!(keys_for(OTHER).verify(&after, 1_000).is_ok(), "signed with the new secret");
    }

    #[test]
    fn only_hs256_is_accepted() {
        let k = keys();
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
            &Claims {
                exp: 9_999_999_999,
                iat: None,
                nbf: None,
                role: Some(Role::Admin),
                sub: "mallory".into(),
            },
            &EncodingKey::from_secret(SECRET).unwrap(),
        )
        .unwrap();
        assert_eq!(k.verify(&hs512, 1_000), Err(TokenError::UnsupportedAlgorithm));
    }

    #[test]
    fn a_token_without_exp_is_refused() {
        let k = keys();
        let no_exp = jsonwebtoken::encode(
            &Header::new(ALGORITHM),
            &serde_json::json!({"sub": "alice", "role": "admin"}),
            &EncodingKey::from_secret(SECRET).unwrap(),
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
        let k = keys();
        // Correctly signed, so only its size can refuse it; no parser error is the source.
        let big = issue(&k, &"a".repeat(TOKEN_BYTES_MAX), Role::User, 9_999_999_999);
        assert!(big.len() > TOKEN_BYTES_MAX);
        assert_eq!(k.verify(&big, 1_000), malformed());
        let fits = issue(&k, &"a".repeat(TOKEN_BYTES_MAX / 2), Role::User, 9_999_999_999);
        assert!(k.verify(&fits, 1_000).is_ok());
    }

    #[test]
    fn a_tampered_signature_is_refused() {
        let k = keys();
        let t = issue(&k, "alice", Role::User, 9_999_999_999);
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
        let k = keys();
        let sign = |claims: serde_json::Value| {
            jsonwebtoken::encode(&Header::new(ALGORITHM), &claims, &EncodingKey::from_secret(SECRET).unwrap())
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
