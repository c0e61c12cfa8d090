//! The gateway in front of a server's services: REST requests to its
//! routes, everything else passed on.

use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{HeaderValue, Method, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited};
use tonic::body::Body;

use super::{Grpc, MAX_REST_BODY, Reply, RestRequest, RestRoutes};
use crate::metrics::{Metrics, OTHER_ROUTE, RestMetrics};

/// The gateway as a tower layer for `tonic::transport::Server::layer`.
#[derive(Clone)]
pub struct RestLayer {
    routes: Option<Arc<dyn RestRoutes>>,
    authenticator: Option<crate::auth::Authenticator>,
    metrics: Option<RestMetrics>,
}

impl std::fmt::Debug for RestLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestLayer")
            .field("routes", &self.routes.is_some())
            .finish()
    }
}

impl RestLayer {
    /// A gateway for `routes`; none passes everything on. With an
    /// `authenticator`, a caller it refuses is answered 401 before any
    /// body is read. Each request to routes is metered in `metrics`.
    pub(crate) fn new(
        routes: Option<Arc<dyn RestRoutes>>,
        authenticator: Option<crate::auth::Authenticator>,
        metrics: &Metrics,
    ) -> Self {
        Self {
            metrics: routes.is_some().then(|| RestMetrics::new(metrics)),
            routes,
            authenticator,
        }
    }
}

impl<S> tower_layer::Layer<S> for RestLayer {
    type Service = Gateway<S>;

    fn layer(&self, inner: S) -> Gateway<S> {
        Gateway {
            inner,
            routes: self.routes.clone(),
            authenticator: self.authenticator.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

/// A service behind the gateway.
#[derive(Clone)]
pub struct Gateway<S> {
    inner: S,
    routes: Option<Arc<dyn RestRoutes>>,
    authenticator: Option<crate::auth::Authenticator>,
    metrics: Option<RestMetrics>,
}

impl<S> std::fmt::Debug for Gateway<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").finish_non_exhaustive()
    }
}

layer_service!(Gateway);

impl<S: crate::HttpService> Gateway<S> {
    fn respond(
        &mut self,
        request: http::Request<Body>,
    ) -> BoxFuture<'static, Result<http::Response<Body>, S::Error>> {
        let routes = match &self.routes {
            Some(routes) if !is_grpc(&request) => routes.clone(),
            _ => return Box::pin(self.inner.call(request)),
        };
        let path = request.uri().path().trim_end_matches('/');
        let root = path.is_empty();
        let route = if root {
            Some("/".to_owned())
        } else {
            routes.route(path)
        };
        let metered = self.metrics.as_ref().map(|metrics| {
            metrics.start(
                request.method(),
                route.unwrap_or_else(|| OTHER_ROUTE.to_owned()),
            )
        });
        let answer = self.answer(routes, root, request);
        Box::pin(async move {
            let response = answer.await;
            if let (Some(metered), Ok(response)) = (metered, &response) {
                metered.end(response.status());
            }
            response
        })
    }

    fn answer(
        &mut self,
        routes: Arc<dyn RestRoutes>,
        root: bool,
        request: http::Request<Body>,
    ) -> BoxFuture<'static, Result<http::Response<Body>, S::Error>> {
        // Oakestra's servers answer their root `ok`, and its dashboard
        // checks that they are up by fetching it, without a token.
        if root && matches!(*request.method(), Method::GET | Method::HEAD) {
            let mut response = http::Response::new(Body::new(Full::new(Bytes::from_static(b"ok"))));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            return Box::pin(async move { Ok(response) });
        }
        let authenticator = self.authenticator.clone();
        // The service made ready goes with the request (tower's contract);
        // a clone stays for the next one.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            // A stranger's body is never read: the caller is known first.
            let head = http::Request::from_parts(parts, ());
            if let Some(authenticator) = &authenticator
                && let Err(status) = authenticator.authenticate_fresh(&head).await
            {
                return Ok(Reply::from_status(&status, str::to_owned).into_response());
            }
            let (parts, ()) = head.into_parts();
            // Only the routes that take a body read one: a GET costs no
            // more than the guard's answer to it.
            let body = if !matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) {
                drop(body);
                Bytes::new()
            } else {
                match Limited::new(body, MAX_REST_BODY).collect().await {
                    Ok(collected) => collected.to_bytes(),
                    Err(err) => {
                        let too_large = err.is::<http_body_util::LengthLimitError>();
                        let reply = if too_large {
                            Reply::error(
                                StatusCode::PAYLOAD_TOO_LARGE,
                                format!("the body is larger than {MAX_REST_BODY} bytes"),
                            )
                        } else {
                            Reply::error(
                                StatusCode::BAD_REQUEST,
                                format!("cannot read the body: {err}"),
                            )
                        };
                        return Ok(reply.into_response());
                    }
                }
            };
            let request = RestRequest {
                method: parts.method.clone(),
                path: parts.uri.path().trim_end_matches('/').to_owned(),
                query: parts
                    .uri
                    .query()
                    .map(|q| {
                        url_form(q)
                            .map(|(k, v)| (k.into_owned(), v.into_owned()))
                            .collect()
                    })
                    .unwrap_or_default(),
                body,
                idempotency_key: parts
                    .headers
                    .get("idempotency-key")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned(),
            };
            // The caller's credentials and identity headers go on; what
            // describes the REST message or its connection does not.
            let mut headers = parts.headers;
            for name in [
                header::CONTENT_LENGTH,
                header::CONTENT_TYPE,
                header::CONTENT_ENCODING,
                header::HOST,
                header::TE,
                header::CONNECTION,
                header::TRANSFER_ENCODING,
                header::UPGRADE,
            ] {
                headers.remove(name);
            }
            headers.remove("grpc-encoding");
            headers.remove("grpc-accept-encoding");
            let grpc = Grpc::new(inner, headers, parts.extensions);
            let reply = routes.handle(request, grpc).await;
            Ok(reply.into_response())
        })
    }
}

/// Whether a request is gRPC (or gRPC-Web), which the gateway passes on.
fn is_grpc<B>(request: &http::Request<B>) -> bool {
    request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// `application/x-www-form-urlencoded` pairs, as in a query string.
pub(super) fn url_form(
    query: &str,
) -> impl Iterator<Item = (std::borrow::Cow<'_, str>, std::borrow::Cow<'_, str>)> {
    query.split('&').filter(|p| !p.is_empty()).map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(key), percent_decode(value))
    })
}

fn percent_decode(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains(['%', '+']) {
        return std::borrow::Cow::Borrowed(text);
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(byte) => {
                        out.push(byte);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    std::borrow::Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}
