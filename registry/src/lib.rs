//! Reading OCI registries without trusting them. The marketplace checks a
//! publisher's images and every node pulls them; the publisher names the
//! registry. So every request here:
//!
//! - goes only where [`RegistryPolicy`] allows, judged on the addresses a
//!   name resolves to (the connection uses exactly the checked addresses),
//!   and again for every redirect and every token realm a registry names;
//! - goes over plain HTTP only to a registry named insecure (no redirect
//!   from `https` down to `http` elsewhere), and never through a proxy
//!   from the environment;
//! - reads at most what it can use: manifests and configurations up to
//!   4 MiB, layers up to the size their manifest declares;
//! - reports a failure by its status code and a fixed text, never with
//!   what the registry answered, which whoever runs it chose.

mod credentials;
mod policy;

use std::{
    collections::HashMap,
    error::Error as _,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use bytes::Bytes;
use futures::{Stream, StreamExt as _};
use reqwest::{StatusCode, header};
use sha2::{Digest as _, Sha256};

pub use crate::{
    credentials::read_credentials,
    policy::{RegistryPolicy, is_public, split_host_port},
};

/// Largest manifest or image configuration read.
pub const MAX_DOCUMENT_BYTES: u64 = 4 << 20;
/// Most redirects followed for one request.
const MAX_REDIRECTS: usize = 5;
/// Largest token answer read.
const MAX_TOKEN_BYTES: u64 = 64 << 10;

/// Why a registry request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The policy forbids reaching where the request would go.
    #[error("refused: {0}")]
    Refused(String),
    /// 404.
    #[error("not found in its registry")]
    NotFound,
    /// 401 or 403, after the credentials the process has.
    #[error("not authorized with the configured credentials")]
    Unauthorized,
    /// Any other status.
    #[error("the registry answered {0}")]
    Status(u16),
    /// The answer is larger than what is read.
    #[error("the registry's answer is over the {limit}-byte limit")]
    TooLarge {
        /// The limit.
        limit: u64,
    },
    /// The content is not what its digest says.
    #[error("the content does not match its digest {expected}")]
    Digest {
        /// The digest asked for.
        expected: String,
    },
    /// The answer cannot be used (a token answer without a token, say).
    #[error("the registry's answer is invalid: {0}")]
    Invalid(&'static str),
    /// The registry could not be reached or stopped answering.
    #[error("unreachable: {0}")]
    Unreachable(String),
}

impl RegistryError {
    /// Whether trying again later may help.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable(_) => true,
            Self::Status(code) => *code == 429 || *code >= 500,
            _ => false,
        }
    }
}

/// How a [`Registry`] reaches registries.
#[derive(Clone, Default)]
pub struct RegistryOptions {
    /// Where it may go.
    pub policy: RegistryPolicy,
    /// `user`, `password` per registry host (as in a docker config).
    pub credentials: HashMap<String, (String, String)>,
    /// Longest wait for a connection.
    pub connect_timeout: Option<Duration>,
    /// Longest silence within an answer.
    pub read_timeout: Option<Duration>,
    /// The `User-Agent`.
    pub user_agent: &'static str,
}

impl std::fmt::Debug for RegistryOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print passwords.
        f.debug_struct("RegistryOptions")
            .field("policy", &self.policy)
            .field(
                "credentials_for",
                &self.credentials.keys().collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// Refusal by the policy inside the HTTP stack (resolver, redirects).
#[derive(Debug)]
struct PolicyRefusal(String);

impl std::fmt::Display for PolicyRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PolicyRefusal {}

/// Resolves names and keeps only the addresses the policy allows: the
/// connection goes to exactly what was checked.
struct CheckedResolver(Arc<RegistryPolicy>);

impl reqwest::dns::Resolve for CheckedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.0.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refusal = None;
            let allowed: Vec<SocketAddr> = found
                .into_iter()
                .filter(|address| match policy.check(&host, None, address.ip()) {
                    Ok(()) => true,
                    Err(reason) => {
                        refusal.get_or_insert(reason);
                        false
                    }
                })
                .collect();
            if allowed.is_empty() {
                let reason = refusal.unwrap_or_else(|| format!("{host} does not resolve"));
                return Err(
                    Box::new(PolicyRefusal(reason)) as Box<dyn std::error::Error + Send + Sync>
                );
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Checks a URL before any request to it: its scheme (plain HTTP only to
/// insecure registries) and, when its host is an address, that address
/// (names are checked as they resolve).
fn check_url(policy: &RegistryPolicy, url: &reqwest::Url) -> Result<(), String> {
    let host = url.host_str().unwrap_or_default();
    let port = url.port_or_known_default();
    match url.scheme() {
        "https" => {}
        "http" if policy.is_insecure(host, port) => {}
        "http" => {
            return Err(format!(
                "{host} is not an insecure registry: plain HTTP is refused"
            ));
        }
        other => return Err(format!("the scheme {other} is not HTTP")),
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(address) = bare.parse::<IpAddr>() {
        policy.check(bare, port, address)?;
    }
    Ok(())
}

/// A registry client under a policy.
pub struct Registry {
    http: reqwest::Client,
    policy: Arc<RegistryPolicy>,
    credentials: HashMap<String, (String, String)>,
    /// Bearer tokens per `registry/repository`.
    tokens: Mutex<HashMap<String, String>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// The HTTP API host of `registry` (Docker Hub's differs from its name).
fn api_host(registry: &str) -> &str {
    match registry {
        "docker.io" | "index.docker.io" => "registry-1.docker.io",
        other => other,
    }
}

impl Registry {
    /// A client with `options`.
    pub fn new(options: RegistryOptions) -> Result<Self, String> {
        // ring, as everything else here; a provider installed already wins.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let policy = Arc::new(options.policy);
        let redirects = policy.clone();
        let mut builder = reqwest::Client::builder()
            .no_proxy()
            .user_agent(options.user_agent)
            .dns_resolver(Arc::new(CheckedResolver(policy.clone())))
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() >= MAX_REDIRECTS {
                    return attempt.error(PolicyRefusal("too many redirects".to_owned()));
                }
                match check_url(&redirects, attempt.url()) {
                    Ok(()) => attempt.follow(),
                    Err(reason) => attempt.error(PolicyRefusal(format!("redirect: {reason}"))),
                }
            }));
        if let Some(timeout) = options.connect_timeout {
            builder = builder.connect_timeout(timeout);
        }
        if let Some(timeout) = options.read_timeout {
            builder = builder.read_timeout(timeout);
        }
        let http = builder.build().map_err(|err| err.to_string())?;
        Ok(Self {
            http,
            policy,
            credentials: options.credentials,
            tokens: Mutex::new(HashMap::new()),
        })
    }

    fn url(&self, registry: &str, repository: &str, kind: &str, reference: &str) -> String {
        let host = api_host(registry);
        let (name, port) = split_host_port(host);
        let scheme = if self.policy.is_insecure(name, port) {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://{host}/v2/{repository}/{kind}/{reference}")
    }

    /// GET `url` for `repository` of `registry`, authenticating as the
    /// registry asks; the answer when it is 200.
    async fn get(
        &self,
        registry: &str,
        repository: &str,
        url: &str,
        accept: &str,
    ) -> Result<reqwest::Response, RegistryError> {
        self.send(
            reqwest::Method::GET,
            registry,
            repository,
            url,
            accept,
            None,
        )
        .await
    }

    /// Sends `method` to `url` for `repository` of `registry` with `body`
    /// (its content type and bytes), authenticating as the registry asks;
    /// the answer when it is a success (2xx).
    async fn send(
        &self,
        method: reqwest::Method,
        registry: &str,
        repository: &str,
        url: &str,
        accept: &str,
        body: Option<(&str, Bytes)>,
    ) -> Result<reqwest::Response, RegistryError> {
        let url: reqwest::Url = url
            .parse()
            .map_err(|_| RegistryError::Refused(format!("`{url}` is not a URL")))?;
        check_url(&self.policy, &url).map_err(RegistryError::Refused)?;
        let key = format!("{registry}/{repository}");
        let credentials = self.credentials.get(registry);
        let request = |token: Option<&str>| {
            let mut request = self.http.request(method.clone(), url.clone());
            if !accept.is_empty() {
                request = request.header(header::ACCEPT, accept);
            }
            if let Some((content_type, bytes)) = &body {
                request = request
                    .header(header::CONTENT_TYPE, *content_type)
                    .body(bytes.clone());
            }
            match (token, credentials) {
                (Some(token), _) => request.bearer_auth(token),
                (None, Some((user, password))) => request.basic_auth(user, Some(password)),
                (None, None) => request,
            }
        };
        let cached = self
            .tokens
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
            .cloned();
        let mut response = request(cached.as_deref()).send().await.map_err(transport)?;
        if response.status() == StatusCode::UNAUTHORIZED
            && let Some(challenge) = response
                .headers()
                .get(header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .and_then(bearer_challenge)
        {
            let token = self.token(&challenge, repository, credentials).await?;
            self.tokens
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(key, token.clone());
            response = request(Some(&token)).send().await.map_err(transport)?;
        }
        match response.status() {
            status if status.is_success() => Ok(response),
            StatusCode::NOT_FOUND => Err(RegistryError::NotFound),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(RegistryError::Unauthorized),
            other => Err(RegistryError::Status(other.as_u16())),
        }
    }

    /// A bearer token from the realm a registry named, checked like any
    /// other URL.
    async fn token(
        &self,
        challenge: &Challenge,
        repository: &str,
        credentials: Option<&(String, String)>,
    ) -> Result<String, RegistryError> {
        let mut realm: reqwest::Url = challenge
            .realm
            .parse()
            .map_err(|_| RegistryError::Invalid("the token realm is not a URL"))?;
        check_url(&self.policy, &realm)
            .map_err(|reason| RegistryError::Refused(format!("token realm: {reason}")))?;
        {
            let mut query = realm.query_pairs_mut();
            if let Some(service) = &challenge.service {
                query.append_pair("service", service);
            }
            let scope = challenge
                .scope
                .clone()
                .unwrap_or_else(|| format!("repository:{repository}:pull"));
            query.append_pair("scope", &scope);
        }
        let mut request = self.http.get(realm);
        if let Some((user, password)) = credentials {
            request = request.basic_auth(user, Some(password));
        }
        let response = request.send().await.map_err(transport)?;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                return Err(RegistryError::Unauthorized);
            }
            other => return Err(RegistryError::Status(other.as_u16())),
        }
        #[derive(serde::Deserialize)]
        struct TokenAnswer {
            #[serde(default)]
            token: Option<String>,
            #[serde(default)]
            access_token: Option<String>,
        }
        let body = read_bounded(response, MAX_TOKEN_BYTES).await?;
        let answer: TokenAnswer = serde_json::from_slice(&body)
            .map_err(|_| RegistryError::Invalid("the token answer is not JSON"))?;
        answer
            .token
            .or(answer.access_token)
            .filter(|t| !t.is_empty() && t.len() <= 16 << 10)
            .ok_or(RegistryError::Invalid("the token answer holds no token"))
    }

    /// A manifest (or index) of `repository` by tag or digest, as one of
    /// `accept`; its bytes and their digest. A manifest asked for by
    /// digest must have it.
    pub async fn manifest(
        &self,
        registry: &str,
        repository: &str,
        reference: &str,
        accept: &[&str],
    ) -> Result<(Vec<u8>, String), RegistryError> {
        let url = self.url(registry, repository, "manifests", reference);
        let response = self
            .get(registry, repository, &url, &accept.join(", "))
            .await?;
        let body = read_bounded(response, MAX_DOCUMENT_BYTES).await?;
        let digest = sha256_digest(&body);
        if reference.starts_with("sha256:") && reference != digest {
            return Err(RegistryError::Digest {
                expected: reference.to_owned(),
            });
        }
        Ok((body, digest))
    }

    /// A small blob (an image configuration), checked against its digest;
    /// at most [`MAX_DOCUMENT_BYTES`].
    pub async fn blob(
        &self,
        registry: &str,
        repository: &str,
        digest: &str,
    ) -> Result<Vec<u8>, RegistryError> {
        let url = self.url(registry, repository, "blobs", digest);
        let response = self.get(registry, repository, &url, "").await?;
        let body = read_bounded(response, MAX_DOCUMENT_BYTES).await?;
        if digest.starts_with("sha256:") && sha256_digest(&body) != digest {
            return Err(RegistryError::Digest {
                expected: digest.to_owned(),
            });
        }
        Ok(body)
    }

    /// A blob as a stream of chunks, ending in an error past `size` bytes
    /// (the size its manifest declares). The receiver checks the digest.
    pub async fn blob_stream(
        &self,
        registry: &str,
        repository: &str,
        digest: &str,
        size: u64,
    ) -> Result<impl Stream<Item = Result<Bytes, RegistryError>> + Send + 'static, RegistryError>
    {
        let url = self.url(registry, repository, "blobs", digest);
        let response = self.get(registry, repository, &url, "").await?;
        if response
            .content_length()
            .is_some_and(|length| length > size)
        {
            return Err(RegistryError::TooLarge { limit: size });
        }
        let mut seen = 0_u64;
        Ok(response.bytes_stream().map(move |chunk| {
            let chunk = chunk.map_err(transport)?;
            seen += chunk.len() as u64;
            if seen > size {
                Err(RegistryError::TooLarge { limit: size })
            } else {
                Ok(chunk)
            }
        }))
    }
}

impl Registry {
    /// Uploads `bytes` as a blob of `repository` (monolithically), unless
    /// the registry has it already.
    pub async fn push_blob(
        &self,
        registry: &str,
        repository: &str,
        bytes: &[u8],
    ) -> Result<(), RegistryError> {
        let digest = sha256_digest(bytes);
        let url = self.url(registry, repository, "blobs", &digest);
        match self
            .send(reqwest::Method::HEAD, registry, repository, &url, "", None)
            .await
        {
            Ok(_) => return Ok(()),
            Err(RegistryError::NotFound) => {}
            Err(err) => return Err(err),
        }
        let start = self.url(registry, repository, "blobs", "uploads/");
        let answer = self
            .send(
                reqwest::Method::POST,
                registry,
                repository,
                &start,
                "",
                None,
            )
            .await?;
        let location = answer
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or(RegistryError::Invalid(
                "the upload answer names no location",
            ))?;
        let base: reqwest::Url = start
            .parse()
            .map_err(|_| RegistryError::Invalid("the upload URL is not a URL"))?;
        let mut upload = base
            .join(location)
            .map_err(|_| RegistryError::Invalid("the upload location is not a URL"))?;
        upload.query_pairs_mut().append_pair("digest", &digest);
        self.send(
            reqwest::Method::PUT,
            registry,
            repository,
            upload.as_str(),
            "",
            Some(("application/octet-stream", Bytes::copy_from_slice(bytes))),
        )
        .await?;
        Ok(())
    }

    /// Stores `bytes`, a manifest of `media_type`, as `reference` (a tag)
    /// of `repository`; the blobs it names must be there.
    pub async fn push_manifest(
        &self,
        registry: &str,
        repository: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<(), RegistryError> {
        let url = self.url(registry, repository, "manifests", reference);
        self.send(
            reqwest::Method::PUT,
            registry,
            repository,
            &url,
            "",
            Some((media_type, Bytes::copy_from_slice(bytes))),
        )
        .await?;
        Ok(())
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut text = String::with_capacity(71);
    text.push_str("sha256:");
    for byte in digest {
        text.push_str(&format!("{byte:02x}"));
    }
    text
}

/// Reads an answer's body, at most `limit` bytes.
async fn read_bounded(response: reqwest::Response, limit: u64) -> Result<Vec<u8>, RegistryError> {
    if response
        .content_length()
        .is_some_and(|length| length > limit)
    {
        return Err(RegistryError::TooLarge { limit });
    }
    let mut body = Vec::new();
    let mut chunks = response.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(transport)?;
        if (body.len() + chunk.len()) as u64 > limit {
            return Err(RegistryError::TooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A transport failure, or the policy's refusal found in its causes.
fn transport(err: reqwest::Error) -> RegistryError {
    let mut source = err.source();
    while let Some(cause) = source {
        if let Some(refusal) = cause.downcast_ref::<PolicyRefusal>() {
            return RegistryError::Refused(refusal.0.clone());
        }
        source = cause.source();
    }
    // Our own words for what happened, not the peer's.
    let what = if err.is_timeout() {
        "timed out"
    } else if err.is_connect() {
        "cannot connect"
    } else if err.is_redirect() {
        "bad redirect"
    } else if err.is_body() || err.is_decode() {
        "the answer broke off"
    } else {
        "the request failed"
    };
    let host = err
        .url()
        .and_then(|u| u.host_str())
        .map(|h| format!(" ({h})"))
        .unwrap_or_default();
    RegistryError::Unreachable(format!("{what}{host}"))
}

/// A `Bearer` challenge of `WWW-Authenticate`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Challenge {
    realm: String,
    service: Option<String>,
    scope: Option<String>,
}

/// Parses `Bearer realm="...",service="...",scope="..."`.
fn bearer_challenge(header: &str) -> Option<Challenge> {
    let rest = header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))?;
    let mut params: HashMap<String, String> = HashMap::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = after.trim_start();
        let (value, remaining) = if let Some(quoted) = after.strip_prefix('"') {
            let end = quoted.find('"')?;
            (&quoted[..end], &quoted[end + 1..])
        } else {
            match after.find(',') {
                Some(end) => (&after[..end], &after[end..]),
                None => (after, ""),
            }
        };
        params.insert(key, value.to_owned());
        rest = remaining.trim_start().trim_start_matches(',').trim_start();
    }
    Some(Challenge {
        realm: params.remove("realm")?,
        service: params.remove("service"),
        scope: params.remove("scope"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_challenges() {
        assert_eq!(
            bearer_challenge(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#
            ),
            Some(Challenge {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/busybox:pull".into()),
            })
        );
        assert_eq!(
            bearer_challenge(r#"Bearer realm="http://127.0.0.1:1/t""#).map(|c| c.realm),
            Some("http://127.0.0.1:1/t".into())
        );
        assert_eq!(bearer_challenge(r#"Basic realm="x""#), None);
        assert_eq!(bearer_challenge("Bearer service=x"), None);
    }

    #[test]
    fn urls_are_checked_before_any_request() {
        let policy = RegistryPolicy {
            allowed: Vec::new(),
            insecure: vec!["127.0.0.1:5000".into()],
        };
        let check = |url: &str| check_url(&policy, &url.parse().unwrap());
        assert!(check("http://127.0.0.1:5000/v2/").is_ok());
        assert!(check("http://127.0.0.1:5001/v2/").is_err());
        assert!(check("https://127.0.0.1:6000/v2/").is_err());
        assert!(check("https://169.254.169.254/latest/meta-data").is_err());
        assert!(
            check("http://ghcr.io/v2/").is_err(),
            "no plain HTTP elsewhere"
        );
        assert!(
            check("https://ghcr.io/v2/").is_ok(),
            "names are checked as they resolve"
        );
        assert!(check("file:///etc/passwd").is_err());
    }

    #[test]
    fn digests_are_sha256_in_hex() {
        assert_eq!(
            sha256_digest(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
