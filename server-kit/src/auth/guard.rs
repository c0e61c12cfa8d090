//! The guard in front of every service: authenticates each call, checks
//! the roles its method needs in the service's permission table, puts the
//! [`Identity`] into the request's extensions, and answers UNAUTHENTICATED
//! or PERMISSION_DENIED (with an `ErrorInfo` reason) itself.

use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use futures::future::BoxFuture;
use tonic::{
    Code, Status,
    body::Body,
    transport::server::{TcpConnectInfo, TlsConnectInfo},
};

use super::{Identity, Role, Security, Source, subject::common_name};
use crate::ApiError;

/// The roles some methods need: holding any of them (or one that grants
/// it) is enough. A method not in a service's table is open to no role.
#[derive(Debug, Clone, Copy)]
pub struct MethodAccess {
    /// Roles that may call them.
    pub roles: &'static [Role],
    /// The methods' names, as in the `.proto`.
    pub methods: &'static [&'static str],
}

struct Tables {
    security: Security,
    services: HashMap<&'static str, &'static [MethodAccess]>,
    /// Where refusals are counted.
    metrics: crate::metrics::GrpcMetrics,
}

/// The guard as a tower layer for `tonic::transport::Server::layer`.
#[derive(Clone)]
pub struct AuthLayer {
    tables: Arc<Tables>,
}

impl std::fmt::Debug for AuthLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthLayer")
            .field("services", &self.tables.services.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl AuthLayer {
    /// Guards the services of `permissions` (service name → its table).
    pub(crate) fn new(
        security: Security,
        permissions: HashMap<&'static str, &'static [MethodAccess]>,
        metrics: crate::metrics::GrpcMetrics,
    ) -> Self {
        Self {
            tables: Arc::new(Tables {
                security,
                services: permissions,
                metrics,
            }),
        }
    }
}

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = Guarded<S>;

    fn layer(&self, inner: S) -> Guarded<S> {
        Guarded {
            inner,
            tables: self.tables.clone(),
        }
    }
}

/// The guard's authentication alone, for what must know the caller before
/// it reads a body (the REST gateway).
#[derive(Clone)]
pub(crate) struct Authenticator(Arc<Tables>);

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator").finish_non_exhaustive()
    }
}

impl AuthLayer {
    /// The authentication of this guard.
    pub(crate) fn authenticator(&self) -> Authenticator {
        Authenticator(self.tables.clone())
    }
}

/// A service behind the guard.
#[derive(Clone)]
pub struct Guarded<S> {
    inner: S,
    tables: Arc<Tables>,
}

impl<S> std::fmt::Debug for Guarded<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guarded").finish_non_exhaustive()
    }
}

layer_service!(Guarded);

impl<S: crate::HttpService> Guarded<S> {
    fn respond(
        &mut self,
        mut request: http::Request<Body>,
    ) -> BoxFuture<'static, Result<http::Response<Body>, S::Error>> {
        let status = match self.tables.check(&request) {
            Ok(identity) => {
                request.extensions_mut().insert(identity);
                return Box::pin(self.inner.call(request));
            }
            Err(status) => status,
        };
        let metrics = self.tables.metrics.clone();
        let refused = move |request: &http::Request<Body>, status: Status| {
            metrics.refused(status.code(), crate::reason_of(&status).unwrap_or_default());
            tracing::info!(
                target: "audit",
                method = request.uri().path(),
                outcome = ?status.code(),
                reason = crate::reason_of(&status).unwrap_or_default(),
                "call refused",
            );
            Ok(status.into_http::<Body>())
        };
        let Some(key) = self.tables.fetched_key_to_retry(&request, &status) else {
            return Box::pin(async move { refused(&request, status) });
        };
        // The issuer may have rotated its key: fetch it (rate-limited) and
        // check the token once more. The service made ready goes with the
        // request (tower's contract).
        let tables = self.tables.clone();
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            // Checked again whether this call fetched or not: a fetch that
            // was under way (another token's, or the periodic one) may
            // have brought the key this token needs.
            key.refresh_after_failure().await;
            match tables.check(&request) {
                Ok(identity) => {
                    request.extensions_mut().insert(identity);
                    inner.call(request).await
                }
                Err(status) => refused(&request, status),
            }
        })
    }
}

impl Authenticator {
    /// Who sent `request`, or the UNAUTHENTICATED status it gets. When a
    /// token fails with a fetched key, the key is fetched again
    /// (rate-limited) and the token tried once more.
    pub(crate) async fn authenticate_fresh<B>(
        &self,
        request: &http::Request<B>,
    ) -> Result<Identity, Status> {
        let status = match self.0.authenticate(request) {
            Ok(identity) => return Ok(identity),
            Err(status) => status,
        };
        match self.0.fetched_key_to_retry(request, &status) {
            Some(key) => {
                key.refresh_after_failure().await;
                self.0.authenticate(request)
            }
            None => Err(status),
        }
    }
}

fn unauthenticated(reason: &'static str, message: impl Into<String>) -> Status {
    ApiError::new(Code::Unauthenticated, reason, message).into()
}

impl Tables {
    /// The fetched key to fetch again when `status` refused a request's
    /// bearer token: only for a token that failed its check, never for a
    /// missing role.
    fn fetched_key_to_retry<B>(
        &self,
        request: &http::Request<B>,
        status: &Status,
    ) -> Option<Arc<super::jwt::FetchedKey>> {
        let key = self.security.jwt.as_ref()?.fetched()?;
        (status.code() == Code::Unauthenticated
            && crate::reason_of(status).as_deref() == Some("TOKEN_INVALID")
            && request.headers().contains_key(http::header::AUTHORIZATION))
        .then(|| key.clone())
    }

    fn check<B>(&self, request: &http::Request<B>) -> Result<Identity, Status> {
        let path = request.uri().path().trim_start_matches('/');
        let (service, method) = path.split_once('/').unwrap_or((path, ""));
        if service.starts_with("grpc.health.") || service.starts_with("grpc.reflection.") {
            // Open for probes and grpcurl.
            return Ok(Identity {
                subject: String::new(),
                roles: Default::default(),
                source: Source::Anonymous,
            });
        }
        let identity = self.authenticate(request)?;
        let Some(table) = self.services.get(service) else {
            // Not ours: the router answers UNIMPLEMENTED.
            return Ok(identity);
        };
        let access = table.iter().find(|m| m.methods.contains(&method));
        let allowed = access.is_some_and(|access| access.roles.iter().any(|r| identity.has(*r)));
        if allowed {
            return Ok(identity);
        }
        let needed: Vec<&str> = access
            .map(|a| a.roles.iter().map(|r| r.as_str()).collect())
            .unwrap_or_default();
        let message = if needed.is_empty() {
            format!("{service}/{method} is not open to any role")
        } else {
            let who = if identity.subject.is_empty() {
                "the caller"
            } else {
                identity.subject.as_str()
            };
            format!(
                "{who} may not call {service}/{method}: it needs the role {}",
                needed.join(" or ")
            )
        };
        Err(
            ApiError::new(Code::PermissionDenied, "ROLE_REQUIRED", message)
                .metadata("required_roles", needed.join(","))
                .into(),
        )
    }

    fn authenticate<B>(&self, request: &http::Request<B>) -> Result<Identity, Status> {
        let security = &self.security;
        if !security.authenticates() {
            return Ok(Identity::anonymous());
        }
        // A certificate that does not chain to the client CA is refused
        // even beside a valid token: whoever shows it is not who it says.
        let tls = request.extensions().get::<TlsConnectInfo<TcpConnectInfo>>();
        let certificates = tls
            .and_then(TlsConnectInfo::peer_certs)
            .filter(|chain| !chain.is_empty());
        if let Some(chain) = &certificates {
            let verdict = match &security.client_certificates {
                Some(trusted) => trusted.verify(chain),
                None => Err("this server accepts no client certificates".to_owned()),
            };
            verdict.map_err(|reason| unauthenticated("CERTIFICATE_UNTRUSTED", reason))?;
        }
        if let Some(value) = request.headers().get(http::header::AUTHORIZATION) {
            let token = value
                .to_str()
                .ok()
                .and_then(|v| {
                    v.strip_prefix("Bearer ")
                        .or_else(|| v.strip_prefix("bearer "))
                })
                .ok_or_else(|| {
                    unauthenticated(
                        "CREDENTIALS_INVALID",
                        "the authorization header must be `Bearer <token>`",
                    )
                })?;
            let Some(jwt) = &security.jwt else {
                return Err(unauthenticated(
                    "TOKENS_NOT_ACCEPTED",
                    "this server accepts no bearer tokens",
                ));
            };
            let (subject, roles) = jwt
                .verify(token.trim())
                .map_err(|reason| unauthenticated("TOKEN_INVALID", reason))?;
            return Ok(Identity {
                subject,
                roles,
                source: Source::Token,
            });
        }
        if let Some(leaf) = certificates.as_ref().and_then(|chain| chain.first()) {
            let subject = common_name(leaf.as_ref()).ok_or_else(|| {
                unauthenticated(
                    "CERTIFICATE_INVALID",
                    "the client certificate has no subject CN",
                )
            })?;
            return Ok(Identity {
                roles: security.roles_of(&subject),
                subject,
                source: Source::Certificate,
            });
        }
        if let Some(header) = &security.trusted_header
            && let Some(value) = request.headers().get(header)
            && peer(request).is_some_and(|p| p.ip().is_loopback())
        {
            let subject = mesh_identity(value.to_str().unwrap_or_default());
            if !subject.is_empty() {
                return Ok(Identity {
                    roles: security.roles_of(&subject),
                    subject,
                    source: Source::Mesh,
                });
            }
        }
        Err(unauthenticated(
            "CREDENTIALS_MISSING",
            "no bearer token, client certificate or trusted identity",
        ))
    }
}

/// The peer of a request, over TLS or not.
fn peer<B>(request: &http::Request<B>) -> Option<SocketAddr> {
    let extensions = request.extensions();
    extensions
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|info| info.get_ref().remote_addr())
        })
}

/// The identity in a sidecar's header: Envoy's `x-forwarded-client-cert`
/// names it as `URI=...` (a SPIFFE id) or `Subject="...CN=..."`; Linkerd's
/// `l5d-client-id` is the identity itself. An `x-forwarded-client-cert`
/// can hold one element per proxy the request passed, separated by commas
/// outside quotes; only the last is the one our sidecar added (the others
/// came with the request, from whoever sent it), so only it counts.
fn mesh_identity(value: &str) -> String {
    let element = split_unquoted(value, ',')
        .into_iter()
        .rev()
        .find(|e| !e.trim().is_empty())
        .unwrap_or_default();
    let pairs = split_unquoted(element, ';');
    let is_xfcc = pairs.iter().any(|p| p.contains('='));
    for pair in &pairs {
        if let Some(uri) = pair.trim().strip_prefix("URI=") {
            return uri.trim_matches('"').to_owned();
        }
    }
    for pair in &pairs {
        if let Some(subject) = pair.trim().strip_prefix("Subject=") {
            let subject = subject.trim_matches('"');
            return subject
                .split(',')
                .find_map(|rdn| rdn.trim().strip_prefix("CN="))
                .unwrap_or_default()
                .to_owned();
        }
    }
    if is_xfcc {
        // An element without a URI or a subject names nobody.
        return String::new();
    }
    element.trim().to_owned()
}

/// `text` split at `separator` where it is not inside double quotes.
fn split_unquoted(text: &str, separator: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut quoted = false;
    let mut escaped = false;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == separator && !quoted => {
                parts.push(&text[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mesh_identities() {
        assert_eq!(
            mesh_identity("By=spiffe://a;Hash=x;URI=spiffe://cluster/ns/oak/sa/node-1"),
            "spiffe://cluster/ns/oak/sa/node-1"
        );
        assert_eq!(
            mesh_identity("Hash=x;Subject=\"CN=node-2,O=oak\""),
            "node-2"
        );
        assert_eq!(
            mesh_identity("node-3.oak.serviceaccount.identity.linkerd.cluster.local"),
            "node-3.oak.serviceaccount.identity.linkerd.cluster.local"
        );
        // The request came with an element naming an admin; the sidecar
        // appended its own: only that one counts.
        assert_eq!(
            mesh_identity(
                "URI=spiffe://cluster/sa/admin,By=spiffe://b;Hash=y;Subject=\"CN=node-4,O=oak\";URI=spiffe://cluster/sa/node-4"
            ),
            "spiffe://cluster/sa/node-4"
        );
        assert_eq!(
            mesh_identity("Subject=\"CN=admin\",By=spiffe://b;Hash=y;Subject=\"O=oak,CN=node-5\""),
            "node-5"
        );
        assert_eq!(mesh_identity("URI=spiffe://admin,By=x;Hash=y"), "");
    }
}
