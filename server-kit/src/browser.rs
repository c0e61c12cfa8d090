//! What a web browser may ask of a server. A page on any site can make the
//! browser of someone on the server's machine or network send requests:
//! simple POSTs without a preflight (CSRF), and, with a DNS name that
//! rebinds to the server's address, requests whose answers the page reads.
//! With no authentication configured, a loopback caller is an anonymous
//! admin, so such a request could publish and install addons.
//!
//! Every request that is not native gRPC (which no browser can send) is
//! judged here, before anything reads its body or runs:
//! - its `Host` must be an IP address, `localhost`, this machine's host
//!   name or a name given by `--allowed-host` (421 otherwise): a rebound
//!   name is none of them;
//! - an `Origin` it carries must be the server's own (the same host and
//!   port as `Host`) or one `--cors-allow-origin` allows (403 otherwise);
//! - a REST body (POST, PUT, PATCH) must be `application/json` (415
//!   otherwise), which no page can send to another origin without a
//!   preflight.

use std::sync::Arc;

use futures::future::BoxFuture;
use http::{HeaderMap, Method, StatusCode, header};
use tonic::body::Body;

use crate::rest::Reply;

/// Who may call from a browser.
#[derive(Debug, Clone, Default)]
pub struct BrowserPolicy {
    /// Host names (lowercase) besides IP addresses and `localhost`.
    hosts: Vec<String>,
    /// Allowed cross origins (lowercase); `None`: any.
    origins: Option<Vec<String>>,
}

impl BrowserPolicy {
    /// The policy for `allowed_hosts` (plus this machine's host name) and
    /// the CORS origins (`*`: any).
    pub fn new(allowed_hosts: &[String], cors_origins: &[String]) -> Self {
        let mut hosts: Vec<String> = allowed_hosts
            .iter()
            .map(|h| h.trim().trim_end_matches('.').to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .collect();
        if let Ok(name) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
            let name = name.trim().to_ascii_lowercase();
            if !name.is_empty() {
                hosts.push(name);
            }
        }
        let origins = if cors_origins.iter().any(|o| o == "*") {
            None
        } else {
            Some(
                cors_origins
                    .iter()
                    .map(|o| o.to_ascii_lowercase())
                    .collect(),
            )
        };
        Self { hosts, origins }
    }

    /// Judges a request that is not native gRPC, from its method, URI and
    /// headers: `Err` is the answer it gets instead.
    pub fn judge(
        &self,
        method: &Method,
        uri: &http::Uri,
        headers: &HeaderMap,
    ) -> Result<(), Reply> {
        let authority = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| uri.authority().map(http::uri::Authority::as_str))
            .unwrap_or_default()
            .to_ascii_lowercase();
        let host = host_of(&authority);
        if !self.host_allowed(host) {
            return Err(Reply::error(
                StatusCode::MISDIRECTED_REQUEST,
                format!(
                    "this server does not answer for host {}: name it with --allowed-host",
                    quoted(host)
                ),
            ));
        }
        if let Some(origin) = headers.get(header::ORIGIN) {
            let origin = origin.to_str().unwrap_or("null").to_ascii_lowercase();
            let own = origin.split_once("://").is_some_and(|(scheme, rest)| {
                // A browser leaves a default port out of both.
                matches!(scheme, "http" | "https") && rest == authority
            });
            let allowed = own
                || self
                    .origins
                    .as_ref()
                    .is_none_or(|origins| origins.contains(&origin));
            if !allowed {
                return Err(Reply::error(
                    StatusCode::FORBIDDEN,
                    format!(
                        "requests from pages of {} are not allowed: see --cors-allow-origin",
                        quoted(&origin)
                    ),
                ));
            }
        }
        let grpc_web = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc-web"));
        if !grpc_web && matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
            let json = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(|v| {
                    v.split(';')
                        .next()
                        .unwrap_or_default()
                        .trim()
                        .to_ascii_lowercase()
                })
                .is_some_and(|media| media == "application/json" || media.ends_with("+json"));
            if !json {
                return Err(Reply::error(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "the body must be JSON, sent as content-type: application/json",
                ));
            }
        }
        Ok(())
    }

    fn host_allowed(&self, host: &str) -> bool {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        !host.is_empty()
            && (bare.parse::<std::net::IpAddr>().is_ok()
                || host == "localhost"
                || self.hosts.iter().any(|h| h == host.trim_end_matches('.')))
    }
}

/// The host of an authority, without its port (`[::1]` keeps brackets).
fn host_of(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority
            .find(']')
            .map_or(authority, |end| &authority[..=end]);
    }
    authority.split(':').next().unwrap_or_default()
}

/// `text` quoted for a message, at most 64 characters, escaped.
fn quoted(text: &str) -> String {
    let shown: String = text.chars().take(64).collect();
    format!("{shown:?}")
}

/// Whether a request is native gRPC: what no browser can send.
fn is_native_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.starts_with("application/grpc") && !v.starts_with("application/grpc-web")
        })
}

/// The policy as a tower layer, outside the REST gateway.
#[derive(Debug, Clone)]
pub struct BrowserLayer {
    policy: Arc<BrowserPolicy>,
}

impl BrowserLayer {
    /// A layer judging by `policy`.
    pub fn new(policy: BrowserPolicy) -> Self {
        Self {
            policy: Arc::new(policy),
        }
    }
}

impl<S> tower_layer::Layer<S> for BrowserLayer {
    type Service = BrowserGuard<S>;

    fn layer(&self, inner: S) -> BrowserGuard<S> {
        BrowserGuard {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// A service behind the browser policy.
#[derive(Debug, Clone)]
pub struct BrowserGuard<S> {
    inner: S,
    policy: Arc<BrowserPolicy>,
}

layer_service!(BrowserGuard);

impl<S: crate::HttpService> BrowserGuard<S> {
    fn respond(
        &mut self,
        request: http::Request<Body>,
    ) -> BoxFuture<'static, Result<http::Response<Body>, S::Error>> {
        if !is_native_grpc(request.headers())
            && let Err(reply) =
                self.policy
                    .judge(request.method(), request.uri(), request.headers())
        {
            tracing::info!(
                target: "audit",
                method = %request.method(),
                path = request.uri().path(),
                outcome = %reply.status,
                reason = "BROWSER_REFUSED",
                "refused a request a browser may have been made to send"
            );
            return Box::pin(async move { Ok(reply.into_response()) });
        }
        Box::pin(self.inner.call(request))
    }
}

/// CORS (`tower_http`'s) for what a browser may have sent. A native gRPC
/// call without an `Origin` header comes from no browser, so it skips CORS,
/// whose response headers (`Vary`, `Access-Control-Expose-Headers`) only a
/// browser reads: every call of every other client would pay for them, and
/// its client for decoding them. Preflights, gRPC-Web, REST and anything
/// carrying an `Origin` get the full policy.
#[derive(Debug, Clone)]
pub(crate) struct BrowserCorsLayer(pub(crate) tower_http::cors::CorsLayer);

impl<S> tower_layer::Layer<S> for BrowserCorsLayer {
    type Service = BrowserCors<S>;

    fn layer(&self, inner: S) -> BrowserCors<S> {
        BrowserCors {
            inner: self.0.layer(inner),
        }
    }
}

/// A service behind CORS for browsers.
#[derive(Debug, Clone)]
pub(crate) struct BrowserCors<S> {
    inner: tower_http::cors::Cors<S>,
}

layer_service!(BrowserCors);

impl<S: crate::HttpService> BrowserCors<S> {
    fn respond(
        &mut self,
        request: http::Request<Body>,
    ) -> BoxFuture<'static, Result<http::Response<Body>, S::Error>> {
        use tower_service::Service as _;
        if is_native_grpc(request.headers()) && !request.headers().contains_key(header::ORIGIN) {
            // Ready: `poll_ready` of `Cors` is its inner service's.
            Box::pin(self.inner.get_mut().call(request))
        } else {
            Box::pin(self.inner.call(request))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn judge(
        policy: &BrowserPolicy,
        method: Method,
        host: &str,
        headers: &[(&str, &str)],
    ) -> Result<(), StatusCode> {
        let mut map = HeaderMap::new();
        map.insert(header::HOST, host.parse().unwrap());
        for (name, value) in headers {
            map.insert(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        policy
            .judge(&method, &"/api/v1/x".parse().unwrap(), &map)
            .map_err(|reply| reply.status)
    }

    #[test]
    fn rebinding_csrf_and_strangers_origins_are_refused() {
        let policy = BrowserPolicy::new(
            &["oak.example".to_owned()],
            &["https://dashboard.example".to_owned()],
        );
        let json = ("content-type", "application/json");
        // Hosts: addresses, localhost and named hosts; no rebound name.
        for host in [
            "127.0.0.1:11102",
            "[::1]:11102",
            "10.0.0.5",
            "localhost:1",
            "oak.example:1",
        ] {
            assert_eq!(judge(&policy, Method::GET, host, &[]), Ok(()), "{host}");
        }
        for host in [
            "evil.example:11102",
            "",
            "oak.example.evil:1",
            "127.0.0.1.nip.io:1",
        ] {
            assert_eq!(
                judge(&policy, Method::GET, host, &[]),
                Err(StatusCode::MISDIRECTED_REQUEST),
                "{host}"
            );
        }
        // Origins: the server's own and the allowed one.
        for origin in [
            "http://127.0.0.1:11102",
            "https://127.0.0.1:11102",
            "https://dashboard.example",
        ] {
            assert_eq!(
                judge(
                    &policy,
                    Method::POST,
                    "127.0.0.1:11102",
                    &[("origin", origin), json]
                ),
                Ok(()),
                "{origin}"
            );
        }
        for origin in [
            "http://evil.example",
            "null",
            "http://127.0.0.1:9999",
            "https://dashboard.example:1",
        ] {
            assert_eq!(
                judge(
                    &policy,
                    Method::POST,
                    "127.0.0.1:11102",
                    &[("origin", origin), json]
                ),
                Err(StatusCode::FORBIDDEN),
                "{origin}"
            );
        }
        // Bodies: JSON only; gRPC-Web has its own type.
        for kind in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
        ] {
            assert_eq!(
                judge(
                    &policy,
                    Method::POST,
                    "127.0.0.1:1",
                    &[("content-type", kind)]
                ),
                Err(StatusCode::UNSUPPORTED_MEDIA_TYPE),
                "{kind}"
            );
        }
        assert_eq!(
            judge(&policy, Method::POST, "127.0.0.1:1", &[]),
            Err(StatusCode::UNSUPPORTED_MEDIA_TYPE)
        );
        for kind in [
            "application/json; charset=utf-8",
            "application/merge-patch+json",
            "application/grpc-web+proto",
        ] {
            assert_eq!(
                judge(
                    &policy,
                    Method::POST,
                    "127.0.0.1:1",
                    &[("content-type", kind)]
                ),
                Ok(()),
                "{kind}"
            );
        }
        assert_eq!(judge(&policy, Method::DELETE, "127.0.0.1:1", &[]), Ok(()));
        // `*` lets any origin, never any host.
        let open = BrowserPolicy::new(&[], &["*".to_owned()]);
        assert_eq!(
            judge(
                &open,
                Method::GET,
                "127.0.0.1:1",
                &[("origin", "http://evil.example")]
            ),
            Ok(())
        );
        assert_eq!(
            judge(&open, Method::GET, "evil.example:1", &[]),
            Err(StatusCode::MISDIRECTED_REQUEST)
        );
    }

    /// CORS's headers for what a browser may send; none for a native gRPC
    /// call without an `Origin`, which no browser sends.
    #[tokio::test]
    async fn cors_answers_what_a_browser_may_send() {
        use tower::{ServiceExt as _, service_fn};
        let routes = service_fn(|_: http::Request<Body>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(Body::empty()))
        });
        let cors = tower_http::cors::CorsLayer::new()
            .allow_origin(tower_http::cors::Any)
            .expose_headers([http::HeaderName::from_static("grpc-status")]);
        let service = tower_layer::Layer::layer(&BrowserCorsLayer(cors), routes);
        let call = |content_type: &str, origin: Option<&str>| {
            let mut request = http::Request::post("/pkg.Service/Method")
                .header(header::CONTENT_TYPE, content_type);
            if let Some(origin) = origin {
                request = request.header(header::ORIGIN, origin);
            }
            service
                .clone()
                .oneshot(request.body(Body::empty()).unwrap())
        };
        let native = call("application/grpc", None).await.unwrap();
        assert!(native.headers().get(header::VARY).is_none(), "{native:?}");
        let with_origin = call("application/grpc", Some("https://page.example"))
            .await
            .unwrap();
        assert!(
            with_origin
                .headers()
                .contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN),
            "{with_origin:?}"
        );
        let web = call("application/grpc-web+proto", None).await.unwrap();
        assert!(web.headers().contains_key(header::VARY), "{web:?}");
        assert!(
            web.headers()
                .contains_key(header::ACCESS_CONTROL_EXPOSE_HEADERS),
            "{web:?}"
        );
    }
}
