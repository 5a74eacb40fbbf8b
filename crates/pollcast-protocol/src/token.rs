//! Bearer tokens: signed claims an edge can check without a database.
//!
//! Format: `v1.<base64url(claims JSON)>.<base64url(HMAC-SHA256(secret, "v1." + claims))>`.
//! The claims name the session, the role, the participant (for participants) and
//! the expiry. Tokens are credentials: never log them.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use uuid::Uuid;

use crate::Role;

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Malformed, forged, or inconsistent claims.
    #[error("invalid token")]
    Invalid,
    /// Past its expiry.
    #[error("token expired")]
    Expired,
}

const PREFIX: &str = "v1.";
/// Longest token accepted; bounds the work a forged token can cause.
const MAX_TOKEN_LEN: usize = 1024;

/// What a valid token says about its bearer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Session the token belongs to.
    #[serde(rename = "sid")]
    pub session_id: Uuid,
    /// Presenter or participant.
    pub role: Role,
    /// The participant, for participant tokens.
    #[serde(rename = "pid", default, skip_serializing_if = "Option::is_none")]
    pub participant_id: Option<Uuid>,
    /// Expiry, seconds since the Unix epoch.
    #[serde(rename = "exp")]
    pub expires_at: i64,
}

/// Signs and verifies tokens with one secret.
#[derive(Clone)]
pub struct TokenKeys {
    mac: Hmac<Sha256>,
    lifetime: Duration,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKeys")
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

impl TokenKeys {
    /// Keys from a secret (any length; 32 random bytes recommended) issuing tokens
    /// valid for `lifetime`.
    pub fn new(secret: &[u8], lifetime: Duration) -> Self {
        // HMAC accepts keys of any length, so this cannot fail.
        let mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        Self { mac, lifetime }
    }

    /// Issues a token for the claims, expiring `lifetime` from now.
    pub fn issue(&self, session_id: Uuid, role: Role, participant_id: Option<Uuid>) -> String {
        let lifetime = i64::try_from(self.lifetime.as_secs()).unwrap_or(i64::MAX);
        let claims = Claims {
            session_id,
            role,
            participant_id,
            expires_at: chrono::Utc::now().timestamp().saturating_add(lifetime),
        };
        self.sign(&claims)
    }

    /// Signs exactly these claims (tests use it to make expired tokens).
    pub fn sign(&self, claims: &Claims) -> String {
        // Serialising a struct of ids and numbers cannot fail.
        let json = serde_json::to_vec(claims).unwrap_or_default();
        let body = format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(json));
        let mut mac = self.mac.clone();
        mac.update(body.as_bytes());
        let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{body}.{signature}")
    }

    /// Checks signature and expiry and returns the claims.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        const BAD: TokenError = TokenError::Invalid;
        if token.len() > MAX_TOKEN_LEN || !token.starts_with(PREFIX) {
            return Err(BAD);
        }
        let (body, signature) = token.rsplit_once('.').ok_or(BAD)?;
        let signature = URL_SAFE_NO_PAD.decode(signature).map_err(|_| BAD)?;
        let mut mac = self.mac.clone();
        mac.update(body.as_bytes());
        // Constant-time comparison.
        mac.verify_slice(&signature).map_err(|_| BAD)?;
        let json = URL_SAFE_NO_PAD
            .decode(&body[PREFIX.len()..])
            .map_err(|_| BAD)?;
        let claims: Claims = serde_json::from_slice(&json).map_err(|_| BAD)?;
        if claims.expires_at <= chrono::Utc::now().timestamp() {
            return Err(TokenError::Expired);
        }
        let consistent = match claims.role {
            Role::Presenter => claims.participant_id.is_none(),
            Role::Participant => claims.participant_id.is_some(),
        };
        if !consistent {
            return Err(BAD);
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> TokenKeys {
        TokenKeys::new(b"test secret", Duration::from_secs(60))
    }

    #[test]
    fn issued_token_verifies_to_its_claims() {
        let session = Uuid::now_v7();
        let participant = Uuid::now_v7();
        let token = keys().issue(session, Role::Participant, Some(participant));
        let claims = keys().verify(&token).expect("valid");
        assert_eq!(claims.session_id, session);
        assert_eq!(claims.role, Role::Participant);
        assert_eq!(claims.participant_id, Some(participant));
    }

    #[test]
    fn token_signed_with_another_secret_is_refused() {
        let other = TokenKeys::new(b"other", Duration::from_secs(60));
        let token = other.issue(Uuid::now_v7(), Role::Presenter, None);
        assert_eq!(keys().verify(&token), Err(TokenError::Invalid));
    }

    #[test]
    fn tampered_claims_are_refused() {
        let token = keys().issue(Uuid::now_v7(), Role::Participant, Some(Uuid::now_v7()));
        let forged_claims = Claims {
            session_id: Uuid::now_v7(),
            role: Role::Presenter,
            participant_id: None,
            expires_at: i64::MAX,
        };
        let forged_body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged_claims).expect("json"));
        let signature = token.rsplit_once('.').expect("dot").1;
        let forged = format!("{PREFIX}{forged_body}.{signature}");
        assert!(keys().verify(&forged).is_err());
    }

    #[test]
    fn expired_token_is_refused() {
        let token = keys().sign(&Claims {
            session_id: Uuid::now_v7(),
            role: Role::Presenter,
            participant_id: None,
            expires_at: chrono::Utc::now().timestamp() - 1,
        });
        assert_eq!(keys().verify(&token), Err(TokenError::Expired));
    }

    #[test]
    fn garbage_is_refused_without_panicking() {
        for junk in [
            "",
            "v1.",
            "v1..",
            "v1.%%%.###",
            "Bearer x",
            "v1.e30.",
            &"v1.a".repeat(500),
        ] {
            assert!(keys().verify(junk).is_err(), "{junk:?}");
        }
    }
}
