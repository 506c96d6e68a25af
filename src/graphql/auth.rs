//! Who a request is: the verified JWT claims and the PostgreSQL role they map to.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};

use crate::config::GraphqlConfig;

/// The identity a request runs as inside PostgreSQL.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The claims as JSON, for `request.jwt.claims`.
    pub claims_json: String,
    pub claims: serde_json::Value,
    /// `SET LOCAL ROLE` target, if any.
    pub role: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AuthError {
    #[error("this endpoint needs an `Authorization: Bearer <JWT>` header")]
    Missing,
    #[error("the Authorization header must be `Bearer <JWT>`")]
    NotBearer,
    #[error("invalid token: {0}")]
    Invalid(String),
}

enum Keys {
    Single(DecodingKey, Algorithm),
    Jwks(JwkSet),
    None,
}

/// Verifies bearer tokens against the configured key, issuer and audience.
pub struct Authenticator {
    keys: Keys,
    issuer: Option<String>,
    audience: Option<String>,
    role_claim: String,
    leeway: u64,
    anonymous_role: Option<String>,
    verified: Mutex<HashMap<String, Verified>>,
}

/// A token that passed verification, kept until it expires: checking a signature costs more
/// than the rest of a small request, and clients send the same token for many requests.
struct Verified {
    identity: Identity,
    /// Unix seconds after which the token is refused (`exp` plus the leeway).
    valid_until: u64,
}

/// Verified tokens kept before the cache starts over.
const VERIFIED_TOKENS: usize = 4096;
/// Longer tokens are verified every time rather than kept.
const MAX_CACHED_TOKEN_BYTES: usize = 8 * 1024;

impl Authenticator {
    pub fn from_config(config: &GraphqlConfig) -> anyhow::Result<Arc<Self>> {
        let auth = &config.auth;
        let keys = if let Some(secret) = &auth.hs256_secret {
            Keys::Single(
                DecodingKey::from_secret(secret.as_bytes()),
                Algorithm::HS256,
            )
        } else if let Some(path) = &auth.rs256_public_key_file {
            let pem = std::fs::read(path).map_err(|e| {
                anyhow::anyhow!("graphql.auth.rs256_public_key_file {}: {e}", path.display())
            })?;
            let key = DecodingKey::from_rsa_pem(&pem).map_err(|e| {
                anyhow::anyhow!(
                    "graphql.auth.rs256_public_key_file {}: not an RSA public key in PEM: {e}",
                    path.display()
                )
            })?;
            Keys::Single(key, Algorithm::RS256)
        } else if let Some(path) = &auth.jwks_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("graphql.auth.jwks_file {}: {e}", path.display()))?;
            let set: JwkSet = serde_json::from_str(&text).map_err(|e| {
                anyhow::anyhow!(
                    "graphql.auth.jwks_file {}: not a JWKS document: {e}",
                    path.display()
                )
            })?;
            Keys::Jwks(set)
        } else {
            Keys::None
        };
        Ok(Arc::new(Self {
            keys,
            issuer: auth.issuer.clone(),
            audience: auth.audience.clone(),
            role_claim: auth.role_claim.clone(),
            leeway: auth.leeway_secs,
            anonymous_role: config.anonymous_role.clone(),
            verified: Mutex::default(),
        }))
    }

    /// The identity for an `Authorization` header value (or its absence).
    pub fn identify(&self, authorization: Option<&str>) -> Result<Identity, AuthError> {
        let Some(header) = authorization.map(str::trim).filter(|h| !h.is_empty()) else {
            return self.anonymous();
        };
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or(AuthError::NotBearer)?
            .trim();
        let now = jsonwebtoken::get_current_timestamp();
        if let Some(identity) = self.cached(token, now) {
            return Ok(identity);
        }
        let claims = self.verify(token)?;
        let role = claims
            .get(&self.role_claim)
            .and_then(|r| r.as_str())
            .map(str::to_owned);
        let identity = Identity {
            claims_json: claims.to_string(),
            claims,
            role,
        };
        self.remember(token, &identity);
        Ok(identity)
    }

    fn cached(&self, token: &str, now: u64) -> Option<Identity> {
        let verified = self.verified.lock().ok()?;
        let entry = verified.get(token)?;
        (now <= entry.valid_until).then(|| entry.identity.clone())
    }

    /// Keeps a just-verified token until its `exp`; `nbf` needs no check on later use because
    /// it had already passed when the token was verified.
    fn remember(&self, token: &str, identity: &Identity) {
        let Some(exp) = identity.claims.get("exp").and_then(|e| e.as_u64()) else {
            return;
        };
        if token.len() > MAX_CACHED_TOKEN_BYTES {
            return;
        }
        let Ok(mut verified) = self.verified.lock() else {
            return;
        };
        if verified.len() >= VERIFIED_TOKENS {
            verified.clear();
        }
        verified.insert(
            token.to_owned(),
            Verified {
                identity: identity.clone(),
                valid_until: exp.saturating_add(self.leeway),
            },
        );
    }

    fn anonymous(&self) -> Result<Identity, AuthError> {
        let role = self.anonymous_role.clone().ok_or(AuthError::Missing)?;
        let claims = serde_json::json!({ self.role_claim.clone(): role });
        Ok(Identity {
            claims_json: claims.to_string(),
            claims,
            role: Some(role),
        })
    }

    fn verify(&self, token: &str) -> Result<serde_json::Value, AuthError> {
        let invalid = |e: jsonwebtoken::errors::Error| AuthError::Invalid(e.to_string());
        let header = decode_header(token).map_err(invalid)?;
        let (key, algorithm) = match &self.keys {
            Keys::Single(key, algorithm) => (key.clone(), *algorithm),
            Keys::Jwks(set) => {
                let jwk = match &header.kid {
                    Some(kid) => set.find(kid),
                    None if set.keys.len() == 1 => set.keys.first(),
                    None => None,
                }
                .ok_or_else(|| {
                    AuthError::Invalid("no key in the JWKS matches the token's kid".into())
                })?;
                // The key, not the token, decides which algorithms are acceptable.
                let allowed: &[Algorithm] = match &jwk.algorithm {
                    AlgorithmParameters::RSA(_) => {
                        &[Algorithm::RS256, Algorithm::RS384, Algorithm::RS512]
                    }
                    AlgorithmParameters::EllipticCurve(_) => &[Algorithm::ES256, Algorithm::ES384],
                    _ => &[],
                };
                if !allowed.contains(&header.alg) {
                    return Err(AuthError::Invalid(format!(
                        "a {:?} token cannot be verified with this JWKS key",
                        header.alg
                    )));
                }
                (DecodingKey::from_jwk(jwk).map_err(invalid)?, header.alg)
            }
            Keys::None => {
                return Err(AuthError::Invalid(
                    "tokens are not accepted: no key is configured (graphql.auth)".into(),
                ))
            }
        };
        if header.alg != algorithm {
            return Err(AuthError::Invalid(format!(
                "signed with {:?}, expected {algorithm:?}",
                header.alg
            )));
        }
        let mut validation = Validation::new(algorithm);
        validation.leeway = self.leeway;
        validation.validate_nbf = true;
        if let Some(issuer) = &self.issuer {
            validation.set_issuer(&[issuer]);
            validation.set_required_spec_claims(&["exp", "iss"]);
        }
        match &self.audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        decode::<serde_json::Value>(token, &key, &validation)
            .map(|data| data.claims)
            .map_err(invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    fn authenticator(anonymous: Option<&str>) -> Arc<Authenticator> {
        let config: GraphqlConfig = toml::from_str(&format!(
            "schema = 's.graphql'\n{}[auth]\nhs256_secret = 'sekrit'\nissuer = 'me'\n",
            anonymous
                .map(|r| format!("anonymous_role = '{r}'\n"))
                .unwrap_or_default()
        ))
        .expect("valid");
        Authenticator::from_config(&config).expect("valid")
    }

    fn token(secret: &str, exp_offset: i64, iss: &str) -> String {
        let exp = jsonwebtoken::get_current_timestamp() as i64 + exp_offset;
        let claims = serde_json::json!({"sub": "u1", "role": "app_user", "user_pk": 7, "exp": exp, "iss": iss});
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("encodes")
    }

    #[test]
    fn good_token_gives_claims_and_role() {
        let auth = authenticator(None);
        let id = auth
            .identify(Some(&format!("Bearer {}", token("sekrit", 600, "me"))))
            .expect("valid");
        assert_eq!(id.role.as_deref(), Some("app_user"));
        assert_eq!(id.claims["user_pk"], 7);
    }

    #[test]
    fn a_verified_token_is_reused_until_it_expires_and_no_longer() {
        let auth = authenticator(None);
        let token = token("sekrit", 600, "me");
        auth.identify(Some(&format!("Bearer {token}")))
            .expect("valid");
        let now = jsonwebtoken::get_current_timestamp();
        let cached = auth.cached(&token, now).expect("kept after verification");
        assert_eq!(cached.claims["user_pk"], 7);
        let expiry = cached.claims["exp"].as_u64().expect("exp") + auth.leeway;
        assert!(auth.cached(&token, expiry).is_some());
        assert!(
            auth.cached(&token, expiry + 1).is_none(),
            "expired tokens are not reused"
        );
        let forged = format!("{token}x");
        assert!(auth.cached(&forged, now).is_none());
        assert!(auth.identify(Some(&format!("Bearer {forged}"))).is_err());
    }

    #[test]
    fn bad_tokens_are_refused() {
        let auth = authenticator(None);
        assert_eq!(auth.identify(None).unwrap_err(), AuthError::Missing);
        assert_eq!(
            auth.identify(Some("Basic abc")).unwrap_err(),
            AuthError::NotBearer
        );
        for bad in [
            token("other", 600, "me"),
            token("sekrit", -600, "me"),
            token("sekrit", 600, "someone-else"),
            "not.a.jwt".to_owned(),
        ] {
            let result = auth.identify(Some(&format!("Bearer {bad}")));
            assert!(
                matches!(result, Err(AuthError::Invalid(_))),
                "{bad}: {result:?}"
            );
        }
    }

    fn rs256_token(kid: Option<&str>, audience: &str) -> String {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = kid.map(str::to_owned);
        let claims = serde_json::json!({"sub": "u2", "aud": audience,
                                        "exp": jsonwebtoken::get_current_timestamp() + 600});
        let key = EncodingKey::from_rsa_pem(include_bytes!("testdata/rs256-private.pem"))
            .expect("test key");
        encode(&header, &claims, &key).expect("encodes")
    }

    fn keyed(key_setting: &str) -> Arc<Authenticator> {
        let dir = env!("CARGO_MANIFEST_DIR");
        let config: GraphqlConfig = toml::from_str(&format!(
            "schema = 's.graphql'\n[auth]\n{key_setting} = '{dir}/src/graphql/testdata/{}'\naudience = 'orders'\n",
            if key_setting == "jwks_file" { "jwks.json" } else { "rs256-public.pem" }
        ))
        .expect("valid");
        Authenticator::from_config(&config).expect("valid")
    }

    #[test]
    fn rs256_public_key_and_jwks_verify_tokens_and_audience() {
        for auth in [keyed("rs256_public_key_file"), keyed("jwks_file")] {
            let id = auth
                .identify(Some(&format!(
                    "Bearer {}",
                    rs256_token(Some("test-key"), "orders")
                )))
                .expect("valid");
            assert_eq!(id.claims["sub"], "u2");
            let wrong_audience = auth.identify(Some(&format!(
                "Bearer {}",
                rs256_token(Some("test-key"), "billing")
            )));
            assert!(
                matches!(wrong_audience, Err(AuthError::Invalid(_))),
                "{wrong_audience:?}"
            );
            // An HS256 token must not pass where RS256 is expected.
            let forged = auth.identify(Some(&format!("Bearer {}", token("sekrit", 600, "me"))));
            assert!(matches!(forged, Err(AuthError::Invalid(_))), "{forged:?}");
        }
        let unknown_kid = keyed("jwks_file").identify(Some(&format!(
            "Bearer {}",
            rs256_token(Some("other"), "orders")
        )));
        assert!(matches!(unknown_kid, Err(AuthError::Invalid(m)) if m.contains("kid")));
    }

    #[test]
    fn anonymous_only_with_a_role() {
        let auth = authenticator(Some("web_anon"));
        let id = auth.identify(None).expect("anonymous allowed");
        assert_eq!(id.role.as_deref(), Some("web_anon"));
    }
}
