//! Bearer tokens: standard HS256 JWTs (`sub`, `role`, `exp`), so other identity systems can
//! mint tokens Atelier accepts. HMAC comes from the RustCrypto `hmac` crate; only the JWT
//! framing (base64url JSON) is written here.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes a token may have; longer ones are refused before any parsing.
pub const TOKEN_BYTES_MAX: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenError {
    Malformed,
    BadSignature,
    Expired,
    UnsupportedAlgorithm,
}

impl std::fmt::Display for TokenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TokenError::Malformed => "the token is not a well-formed JWT",
            TokenError::BadSignature => "the token's signature does not match",
            TokenError::Expired => "the token has expired",
            TokenError::UnsupportedAlgorithm => "only HS256 tokens are accepted",
        })
    }
}

#[derive(Clone)]
pub struct Keys {
    secret: Vec<u8>,
}

impl Keys {
    pub fn new(secret: &[u8]) -> Keys {
        Keys { secret: secret.to_vec() }
    }

    fn mac(&self) -> Hmac<Sha256> {
        Hmac::<Sha256>::new_from_slice(&self.secret).expect("invariant: HMAC takes keys of any length")
    }

    /// Signs a token for `user` valid until `exp` (seconds since the epoch).
    pub fn issue(&self, user: &str, role: Role, exp: i64) -> String {
        let header = B64.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let claims = serde_json::json!({"sub": user, "role": role.as_str(), "exp": exp});
        let payload = B64.encode(claims.to_string());
        let signing_input = format!("{header}.{payload}");
        let mut mac = self.mac();
        mac.update(signing_input.as_bytes());
        let sig = B64.encode(mac.finalize().into_bytes());
        format!("{signing_input}.{sig}")
    }

    /// Checks signature, algorithm and expiry (`now` in seconds since the epoch).
    pub fn verify(&self, token: &str, now: i64) -> Result<Identity, TokenError> {
        if token.len() > TOKEN_BYTES_MAX {
            return Err(TokenError::Malformed);
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let header: serde_json::Value =
            serde_json::from_slice(&B64.decode(h).map_err(|_| TokenError::Malformed)?)
                .map_err(|_| TokenError::Malformed)?;
        if header.get("alg").and_then(|a| a.as_str()) != Some("HS256") {
            return Err(TokenError::UnsupportedAlgorithm);
        }
        let sig = B64.decode(s).map_err(|_| TokenError::Malformed)?;
        let mut mac = self.mac();
        mac.update(h.as_bytes());
        mac.update(b".");
        mac.update(p.as_bytes());
        mac.verify_slice(&sig).map_err(|_| TokenError::BadSignature)?;
        let claims: serde_json::Value =
            serde_json::from_slice(&B64.decode(p).map_err(|_| TokenError::Malformed)?)
                .map_err(|_| TokenError::Malformed)?;
        let exp = claims.get("exp").and_then(|e| e.as_i64()).ok_or(TokenError::Malformed)?;
        if exp <= now {
            return Err(TokenError::Expired);
        }
        let user_id = claims
            .get("sub")
            .and_then(|s| s.as_str())
            .filter(|s| !s.is_empty())
            .ok_or(TokenError::Malformed)?;
        let role = match claims.get("role").and_then(|r| r.as_str()) {
            Some("admin") => Role::Admin,
            Some("user") | None => Role::User,
            Some(_) => return Err(TokenError::Malformed),
        };
        Ok(Identity { user_id: user_id.to_string(), role })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_verify_round_trip_and_failures() {
        let k = Keys::new(b"secret");
        let t = k.issue("alice", Role::Admin, 2_000);
        assert_eq!(k.verify(&t, 1_000), Ok(Identity { user_id: "alice".into(), role: Role::Admin }));
        assert_eq!(k.verify(&t, 2_000), Err(TokenError::Expired));
        assert_eq!(Keys::new(b"other").verify(&t, 1_000), Err(TokenError::BadSignature));
        assert_eq!(k.verify("a.b", 0), Err(TokenError::Malformed));
        // Swap the payload for one claiming admin: the signature no longer matches.
        let forged_payload = B64.encode(r#"{"sub":"mallory","role":"admin","exp":9999999999}"#);
        let parts: Vec<&str> = t.split('.').collect();
        let forged = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
        assert_eq!(k.verify(&forged, 1_000), Err(TokenError::BadSignature));
        // alg=none is refused.
        let none = format!("{}.{}.", B64.encode(r#"{"alg":"none"}"#), parts[1]);
        assert_eq!(k.verify(&none, 1_000), Err(TokenError::UnsupportedAlgorithm));
    }
}
