//! Bearer tokens: JWTs signed with an HS256 secret or an RS256/ES256 key
//! (a file, or fetched from an issuer's key endpoint and followed across
//! its rotations), with `sub` and `exp` required and roles in a `roles`
//! array claim: ours by name, others (Oakestra's `Admin`, ...) through a
//! role map.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex, RwLock, Weak},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};

use super::Role;

/// The claims the servers read.
#[derive(Debug, serde::Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    roles: Vec<String>,
    /// flask_jwt_extended's `access` or `refresh`.
    #[serde(default, rename = "type")]
    token_type: Option<String>,
}

/// Roles of other issuers, as ours.
pub(crate) type RoleMap = BTreeMap<String, BTreeSet<Role>>;

/// The role map without `--jwt-role-map`: Oakestra's roles, as its system
/// manager writes them into its login tokens.
pub(crate) fn oakestra_roles() -> RoleMap {
    use Role::*;
    [
        ("Admin", &[Admin][..]),
        ("Organization_Admin", &[Operator, Publisher, Reviewer][..]),
        ("Infrastructure_Provider", &[Operator][..]),
        ("Application_Provider", &[Publisher][..]),
    ]
    .into_iter()
    .map(|(name, roles)| (name.to_owned(), roles.iter().copied().collect()))
    .collect()
}

/// Reads `ROLE=ours,ours` (a `--jwt-role`).
pub(crate) fn parse_role_entry(text: &str) -> anyhow::Result<(String, BTreeSet<Role>)> {
    let (name, roles) = text
        .split_once('=')
        .with_context(|| format!("`{text}` is not ROLE=ours,ours"))?;
    anyhow::ensure!(!name.trim().is_empty(), "`{text}`: the role name is empty");
    let roles = roles
        .split(',')
        .filter(|r| !r.trim().is_empty())
        .map(|r| r.trim().parse::<Role>().map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<BTreeSet<_>>>()
        .with_context(|| format!("in `{text}`"))?;
    Ok((name.trim().to_owned(), roles))
}

/// Verifies bearer tokens.
#[derive(Clone)]
pub(crate) struct JwtVerifier {
    keys: Vec<(Algorithm, DecodingKey)>,
    fetched: Option<Arc<FetchedKey>>,
    issuer: Option<String>,
    audience: Option<String>,
    roles: RoleMap,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("JwtVerifier")
            .field(
                "algorithms",
                &self.keys.iter().map(|(a, _)| *a).collect::<Vec<_>>(),
            )
            .field("fetched", &self.fetched.as_ref().map(|k| k.url.as_str()))
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish()
    }
}

/// A key read as PEM: RS256 for an RSA key, else ES256.
fn decoding_key(pem: &[u8]) -> anyhow::Result<(Algorithm, DecodingKey)> {
    match DecodingKey::from_rsa_pem(pem) {
        Ok(key) => Ok((Algorithm::RS256, key)),
        Err(_) => Ok((
            Algorithm::ES256,
            DecodingKey::from_ec_pem(pem)
                .context("the JWT public key is neither an RSA nor an EC key in PEM")?,
        )),
    }
}

impl JwtVerifier {
    /// A verifier for tokens signed with `secret` (HS256) and/or the public
    /// key `public` (RS256 or ES256, PEM) and/or the key of `fetched`.
    pub(crate) fn new(
        secret: Option<&[u8]>,
        public: Option<&[u8]>,
        fetched: Option<Arc<FetchedKey>>,
        issuer: Option<String>,
        audience: Option<String>,
        roles: RoleMap,
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
            keys.push(decoding_key(public)?);
        }
        Ok(Self {
            keys,
            fetched,
            issuer,
            audience,
            roles,
        })
    }

    /// The key fetched from an issuer, if tokens are checked with one.
    pub(crate) fn fetched(&self) -> Option<&Arc<FetchedKey>> {
        self.fetched.as_ref()
    }

    /// The subject and roles of a valid token, or why it is not.
    pub(crate) fn verify(&self, token: &str) -> Result<(String, BTreeSet<Role>), String> {
        let header = decode_header(token).map_err(|err| format!("malformed token: {err}"))?;
        let fetched = self.fetched.as_ref().and_then(|f| f.current());
        let (algorithm, key) = self
            .keys
            .iter()
            .chain(fetched.as_deref())
            .find(|(algorithm, _)| *algorithm == header.alg)
            .ok_or_else(|| match &self.fetched {
                Some(f) if fetched.is_none() => format!(
                    "no key yet to check tokens with: {} has not answered",
                    f.url
                ),
                _ => format!("tokens signed with {:?} are not accepted", header.alg),
            })?;
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
        // A refresh token (Oakestra's last 30 days) only gets new access
        // tokens from its issuer; it is not a login.
        if let Some(kind) = claims.token_type.as_deref()
            && kind != "access"
        {
            return Err(format!(
                "invalid token: a `{kind}` token is not an access token"
            ));
        }
        // Ours by name, others through the map; the rest are ignored.
        let roles = claims
            .roles
            .iter()
            .flat_map(|r| match r.parse::<Role>() {
                Ok(role) => BTreeSet::from([role]),
                Err(_) => self.roles.get(r).cloned().unwrap_or_default(),
            })
            .collect();
        Ok((claims.sub, roles))
    }
}

/// How often a fetched key is fetched again, so a rotation is followed
/// even before a token signed with the new key arrives.
const KEY_REFRESH: Duration = Duration::from_secs(300);
/// How often a key that was never fetched is tried again.
const KEY_RETRY: Duration = Duration::from_secs(5);
/// Shortest time between two fetches that failed tokens may cause.
const KEY_COOLDOWN: Duration = Duration::from_secs(10);
/// Largest key document read.
const MAX_KEY_DOCUMENT: usize = 64 * 1024;

/// A public key fetched from an issuer's key endpoint: Oakestra's
/// `GET /key` answers `{"public_key": "<PEM>"}`; a PEM body is taken too.
pub(crate) struct FetchedKey {
    url: reqwest::Url,
    client: reqwest::Client,
    current: RwLock<Option<Arc<(Algorithm, DecodingKey)>>>,
    /// PEM of the current key, to tell a new key from the same.
    pem: Mutex<Option<String>>,
    last_attempt: Mutex<Option<Instant>>,
    fetching: tokio::sync::Mutex<()>,
}

impl FetchedKey {
    /// A key of `url`, fetched later ([`FetchedKey::watch`]).
    pub(crate) fn new(url: &str, plaintext_ok: bool) -> anyhow::Result<Arc<Self>> {
        let parsed = reqwest::Url::parse(url).with_context(|| format!("`{url}` is not a URL"))?;
        match parsed.scheme() {
            "https" => {}
            "http" => {
                let host = parsed.host_str().unwrap_or_default();
                let loopback = host == "localhost"
                    || host
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback());
                anyhow::ensure!(
                    loopback || plaintext_ok,
                    "refusing to fetch the token key from {url} over plain HTTP: anyone on the path could swap it and sign tokens of their own; use https://, or pass --jwt-public-key-insecure-http where the network is trusted (Oakestra's compose network)"
                );
                if !loopback {
                    tracing::warn!(%url, "fetching the token key over plain HTTP (--jwt-public-key-insecure-http)");
                }
            }
            other => anyhow::bail!("`{url}`: the scheme {other} is not http or https"),
        }
        crate::install_crypto();
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(5))
            .build()
            .context("cannot build the HTTP client of --jwt-public-key-url")?;
        Ok(Arc::new(Self {
            url: parsed,
            client,
            current: RwLock::new(None),
            pem: Mutex::new(None),
            last_attempt: Mutex::new(None),
            fetching: tokio::sync::Mutex::new(()),
        }))
    }

    fn current(&self) -> Option<Arc<(Algorithm, DecodingKey)>> {
        self.current.read().ok().and_then(|key| key.clone())
    }

    /// Fetches the key again if the last attempt is older than the
    /// cooldown (a token signed with a key we do not have may mean the
    /// issuer rotated it); a fetch under way is waited for.
    pub(crate) async fn refresh_after_failure(&self) {
        let recent = self
            .last_attempt
            .lock()
            .ok()
            .and_then(|at| *at)
            .is_some_and(|at| at.elapsed() < KEY_COOLDOWN);
        if recent {
            // Wait for a fetch under way, if any, so its key is used.
            drop(self.fetching.lock().await);
            return;
        }
        self.fetch().await;
    }

    /// Fetches the key once, keeping the one in hand when the answer is
    /// not a key. Concurrent callers share one fetch.
    async fn fetch(&self) {
        let _one = self.fetching.lock().await;
        let recent = self
            .last_attempt
            .lock()
            .ok()
            .and_then(|at| *at)
            .is_some_and(|at| at.elapsed() < Duration::from_millis(200));
        if recent {
            // Another caller fetched while this one waited.
            return;
        }
        if let Ok(mut at) = self.last_attempt.lock() {
            *at = Some(Instant::now());
        }
        let pem = match self.download().await {
            Ok(pem) => pem,
            Err(err) => {
                tracing::warn!(url = %self.url, error = %err, "cannot fetch the token key");
                return;
            }
        };
        let unchanged = self
            .pem
            .lock()
            .ok()
            .is_some_and(|old| old.as_deref() == Some(pem.as_str()));
        if unchanged {
            return;
        }
        match decoding_key(pem.as_bytes()) {
            Ok(key) => {
                if let Ok(mut current) = self.current.write() {
                    *current = Some(Arc::new(key));
                }
                if let Ok(mut old) = self.pem.lock() {
                    *old = Some(pem);
                }
                tracing::info!(url = %self.url, "token key fetched");
            }
            Err(err) => {
                tracing::warn!(url = %self.url, error = %err, "the fetched token key is not a key");
            }
        }
    }

    async fn download(&self) -> anyhow::Result<String> {
        let mut response = self
            .client
            .get(self.url.clone())
            .send()
            .await?
            .error_for_status()?;
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await? {
            anyhow::ensure!(
                body.len() + chunk.len() <= MAX_KEY_DOCUMENT,
                "the key document is larger than {MAX_KEY_DOCUMENT} bytes"
            );
            body.extend_from_slice(&chunk);
        }
        let text = String::from_utf8(body).context("the key document is not UTF-8")?;
        if text.trim_start().starts_with('{') {
            #[derive(serde::Deserialize)]
            struct Document {
                public_key: String,
            }
            let document: Document = serde_json::from_str(&text)
                .context("not {\"public_key\": \"<PEM>\"} as Oakestra's key endpoint answers")?;
            Ok(document.public_key)
        } else {
            Ok(text)
        }
    }

    /// Fetches the key now and keeps it current in the background, every
    /// few seconds until the first key arrives, then every few minutes;
    /// stops when the verifier is gone. Needs a Tokio runtime; without one
    /// (a unit test), nothing is fetched.
    pub(crate) fn watch(self: &Arc<Self>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let key: Weak<Self> = Arc::downgrade(self);
        runtime.spawn(async move {
            loop {
                let wait = {
                    let Some(key) = key.upgrade() else { return };
                    key.fetch().await;
                    if key.current().is_some() {
                        KEY_REFRESH
                    } else {
                        KEY_RETRY
                    }
                };
                tokio::time::sleep(wait).await;
            }
        });
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
    fn maps_oakestra_roles_and_refuses_refresh_tokens() {
        let verifier =
            JwtVerifier::new(Some(SECRET), None, None, None, None, oakestra_roles()).unwrap();
        let sign = |claims: serde_json::Value| {
            encode(
                &Header::default(),
                &claims,
                &EncodingKey::from_secret(SECRET),
            )
            .unwrap()
        };
        let (_, roles) = verifier
            .verify(&sign(serde_json::json!({
                "sub": "Admin", "exp": now() + 600, "iat": now(), "nbf": now(),
                "jti": "x", "type": "access", "fresh": false,
                "roles": ["Admin"], "organization": "root",
            })))
            .unwrap();
        assert_eq!(roles, BTreeSet::from([Role::Admin]));
        let (_, roles) = verifier
            .verify(&sign(serde_json::json!({
                "sub": "ap", "exp": now() + 600, "type": "access",
                "roles": ["Application_Provider", "Somebody_Else"],
            })))
            .unwrap();
        assert_eq!(roles, BTreeSet::from([Role::Publisher]));
        let refresh = verifier.verify(&sign(serde_json::json!({
            "sub": "Admin", "exp": now() + 600, "type": "refresh", "roles": ["Admin"],
        })));
        assert!(refresh.unwrap_err().contains("not an access token"));
        assert_eq!(
            parse_role_entry("Admin=operator, viewer").unwrap(),
            (
                "Admin".to_owned(),
                BTreeSet::from([Role::Operator, Role::Viewer])
            )
        );
        assert!(parse_role_entry("Admin=root").is_err());
        assert!(parse_role_entry("=admin").is_err());
    }

    #[test]
    fn accepts_valid_tokens_only() {
        let verifier =
            JwtVerifier::new(Some(SECRET), None, None, None, None, oakestra_roles()).unwrap();
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
        assert!(JwtVerifier::new(Some(b"short"), None, None, None, None, RoleMap::new()).is_err());
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
