//! Bearer tokens: JWTs signed with an HS256 secret or an RS256/ES256 key,
//! with `sub` and `exp` required and roles in a `roles` array claim.

use std::collections::BTreeSet;

use anyhow::Context as _;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};

use super::Role;

/// The claims the servers read.
#[derive(Debug, serde::Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    roles: Vec<String>,
}

/// Verifies bearer tokens.
#[derive(Clone)]
pub(crate) struct JwtVerifier {
    keys: Vec<(Algorithm, DecodingKey)>,
    issuer: Option<String>,
    audience: Option<String>,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("JwtVerifier")
            .field(
                "algorithms",
                &self.keys.iter().map(|(a, _)| *a).collect::<Vec<_>>(),
            )
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish()
    }
}

impl JwtVerifier {
    /// A verifier for tokens signed with `secret` (HS256) and/or the public
    /// key `public` (RS256 or ES256, PEM).
    pub(crate) fn new(
        secret: Option<&[u8]>,
        public: Option<&[u8]>,
        issuer: Option<String>,
        audience: Option<String>,
    ) -> anyhow::Result<Self> {
        let mut keys = Vec::new();
        if let Some(secret) = secret {
            let secret = trim_newline(secret);
            anyhow::ensure!(
                secret.len() >= 32,
                "the JWT secret must have at least 32 bytes"
            );
            keys.push((Algorithm::HS256, DecodingKey::from_secret(secret)));
        }
        if let Some(public) = public {
            match DecodingKey::from_rsa_pem(public) {
                Ok(key) => keys.push((Algorithm::RS256, key)),
                Err(_) => keys.push((
                    Algorithm::ES256,
                    DecodingKey::from_ec_pem(public)
                        .context("the JWT public key is neither an RSA nor an EC key in PEM")?,
                )),
            }
        }
        Ok(Self {
            keys,
            issuer,
            audience,
        })
    }

    /// The subject and roles of a valid token, or why it is not.
    pub(crate) fn verify(&self, token: &str) -> Result<(String, BTreeSet<Role>), String> {
        let header = decode_header(token).map_err(|err| format!("malformed token: {err}"))?;
        let (algorithm, key) = self
            .keys
            .iter()
            .find(|(algorithm, _)| *algorithm == header.alg)
            .ok_or_else(|| format!("tokens signed with {:?} are not accepted", header.alg))?;
        let mut validation = Validation::new(*algorithm);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 30;
        // A token not valid yet is not valid.
        validation.validate_nbf = true;
        match &self.issuer {
            Some(issuer) => validation.set_issuer(&[issuer]),
            None => validation.iss = None,
        }
        match &self.audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        let claims = decode::<Claims>(token, key, &validation)
            .map_err(|err| format!("invalid token: {err}"))?
            .claims;
        if claims.sub.trim().is_empty() {
            return Err("invalid token: empty `sub`".into());
        }
        // Unknown roles are ignored: tokens may carry Oakestra's own.
        let roles = claims
            .roles
            .iter()
            .filter_map(|r| r.parse::<Role>().ok())
            .collect();
        Ok((claims.sub, roles))
    }
}

fn trim_newline(bytes: &[u8]) -> &[u8] {
    let mut end = bytes.len();
    while end > 0 && matches!(bytes[end - 1], b'\n' | b'\r') {
        end -= 1;
    }
    &bytes[..end]
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{EncodingKey, Header, encode};

    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn token(secret: &[u8], sub: &str, exp: i64, roles: &[&str]) -> String {
        encode(
            &Header::default(),
            &serde_json::json!({ "sub": sub, "exp": exp, "roles": roles }),
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    #[test]
    fn accepts_valid_tokens_only() {
        let verifier = JwtVerifier::new(Some(SECRET), None, None, None).unwrap();
        let (sub, roles) = verifier
            .verify(&token(
                SECRET,
                "alice",
                now() + 60,
                &["operator", "oakestra-admin"],
            ))
            .unwrap();
        assert_eq!(sub, "alice");
        assert_eq!(roles, BTreeSet::from([Role::Operator]));
        let expired = verifier.verify(&token(SECRET, "alice", now() - 3600, &[]));
        assert!(expired.unwrap_err().contains("Expired"));
        let other_key = verifier.verify(&token(
            b"another secret of thirty-two bytes!",
            "alice",
            now() + 60,
            &[],
        ));
        assert!(other_key.unwrap_err().contains("InvalidSignature"));
        assert!(verifier.verify("not.a.token").is_err());
        assert!(JwtVerifier::new(Some(b"short"), None, None, None).is_err());
        // Not valid before an hour from now: refused until then.
        let early = encode(
            &Header::default(),
            &serde_json::json!({ "sub": "alice", "exp": now() + 7200, "nbf": now() + 3600, "roles": ["admin"] }),
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        assert!(
            verifier
                .verify(&early)
                .unwrap_err()
                .contains("ImmatureSignature")
        );
    }
}
