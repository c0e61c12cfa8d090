//! REST routes on the gRPC port, as a gateway in front of the server's own
//! gRPC services: each REST request becomes one or more gRPC calls that go
//! through the same stack as a gRPC client's (authentication, the roles of
//! each method, validation, audit), made in-process as the REST caller
//! (its `authorization` and other headers, its connection's peer address
//! and certificates). The REST side only translates: no rule lives here.
//!
//! Errors come back in the shape of Oakestra's Flask servers:
//! `{"code": 404, "status": "Not Found", "message": "..."}`, with
//! `"errors": {"json": {"field": ["reason"]}}` for a body that does not
//! validate (422, as flask-smorest answers), plus our `reason` (the
//! `ErrorInfo` reason of the gRPC error).

use std::{
    collections::BTreeMap,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use futures::future::BoxFuture;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited};
use tonic::{Code, Status, body::Body};
use tonic_types::StatusExt as _;
use tower::{BoxError, Service as _, util::BoxCloneSyncService};

/// Largest REST request body read: a descriptor is bounded at 1 MiB.
pub const MAX_REST_BODY: usize = 2 * 1024 * 1024;

/// One server's REST routes: every request that is not gRPC (or gRPC-Web)
/// comes here, and what is not a route is answered 404.
pub trait RestRoutes: std::fmt::Debug + Send + Sync + 'static {
    /// Answers one request, calling the server's services through `grpc`.
    fn handle(&self, request: RestRequest, grpc: Grpc) -> BoxFuture<'static, Reply>;
}

/// A REST request, its body read.
#[derive(Debug, Clone)]
pub struct RestRequest {
    /// The method.
    pub method: Method,
    /// The path, without the query and without a trailing `/`.
    pub path: String,
    /// The query's parameters, decoded.
    pub query: Vec<(String, String)>,
    /// The body, at most [`MAX_REST_BODY`] bytes.
    pub body: Bytes,
    /// The `Idempotency-Key` header: the `request_id` of the gRPC call a
    /// mutating route makes, so a retried POST takes effect once.
    pub idempotency_key: String,
}

impl RestRequest {
    /// Where the path points under a collection route `prefix`: `None` for
    /// the collection itself, the id for `prefix/{id}`, and a 404 for
    /// anything else.
    pub fn resource(&self, prefix: &str) -> Result<Option<String>, Reply> {
        let no_route = || Reply::error(StatusCode::NOT_FOUND, "no such route");
        match self.path.strip_prefix(prefix).ok_or_else(no_route)? {
            "" => Ok(None),
            rest => rest
                .strip_prefix('/')
                .filter(|id| is_id(id))
                .map(|id| Some(id.to_owned()))
                .ok_or_else(no_route),
        }
    }

    /// The value of query parameter `name`, if given.
    pub fn query(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// A REST answer: a status and a JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// HTTP status.
    pub status: StatusCode,
    /// JSON body.
    pub body: serde_json::Value,
}

impl Reply {
    /// `body` with `status`.
    pub fn json(status: StatusCode, body: serde_json::Value) -> Self {
        Self { status, body }
    }

    /// An error in Oakestra's shape.
    pub fn error(status: StatusCode, message: impl Into<String>) -> Self {
        Self::json(status, error_body(status, &message.into()))
    }

    /// 405 naming the methods the route answers.
    pub fn method_not_allowed(allowed: &str) -> Self {
        Self::error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("this route answers {allowed}"),
        )
    }

    /// 422 with the fields of `location` (`json` or `query`) that do not
    /// validate, as flask-smorest answers.
    pub fn invalid(location: &str, violations: &[(String, String)]) -> Self {
        let status = StatusCode::UNPROCESSABLE_ENTITY;
        let mut fields: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (field, reason) in violations {
            let field = if field.is_empty() { "_schema" } else { field };
            fields
                .entry(field.to_owned())
                .or_default()
                .push(reason.clone());
        }
        let mut body = error_body(status, "the request does not validate");
        body["errors"] = serde_json::json!({ location: fields });
        Self::json(status, body)
    }

    /// A gRPC error as a REST one. `rename` turns a request field path of
    /// the gRPC message into the REST body's (e.g. drops `addon.`).
    pub fn from_status(status: &Status, rename: impl Fn(&str) -> String) -> Self {
        let http = http_status(status.code());
        let mut body = error_body(http, status.message());
        if let Some(reason) = crate::reason_of(status) {
            body["reason"] = reason.into();
        }
        if let Some(bad) = status.get_details_bad_request() {
            let mut fields: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for violation in bad.field_violations {
                fields
                    .entry(rename(&violation.field))
                    .or_default()
                    .push(violation.description);
            }
            if !fields.is_empty() {
                body["errors"] = serde_json::json!({ "json": fields });
            }
        }
        if let Some(failure) = status.get_details_precondition_failure() {
            body["violations"] = failure
                .violations
                .into_iter()
                .map(|v| {
                    serde_json::json!({
                        "type": v.r#type,
                        "subject": v.subject,
                        "description": v.description,
                    })
                })
                .collect();
        }
        Self::json(http, body)
    }

    pub(crate) fn into_response(self) -> http::Response<Body> {
        let bytes = serde_json::to_vec(&self.body).unwrap_or_default();
        let mut response = http::Response::new(Body::new(Full::new(Bytes::from(bytes))));
        *response.status_mut() = self.status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response
    }
}

fn error_body(status: StatusCode, message: &str) -> serde_json::Value {
    serde_json::json!({
        "code": status.as_u16(),
        "status": status.canonical_reason().unwrap_or_default(),
        "message": message,
    })
}

/// The HTTP status of a gRPC code, as Oakestra's servers answer the same
/// failures: 400 for a request that cannot go ahead (an addon already
/// installed, not approved, privileges not accepted), 422 for one that
/// does not validate, 404, 401 and 403.
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::UNPROCESSABLE_ENTITY,
        Code::FailedPrecondition | Code::AlreadyExists => StatusCode::BAD_REQUEST,
        Code::Aborted => StatusCode::CONFLICT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

type Inner = BoxCloneSyncService<http::Request<Body>, http::Response<Body>, BoxError>;

/// The server's own gRPC services, called as the REST caller.
#[derive(Clone)]
pub struct Grpc {
    service: Inner,
    headers: HeaderMap,
    extensions: http::Extensions,
}

impl std::fmt::Debug for Grpc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grpc").finish_non_exhaustive()
    }
}

impl Grpc {
    /// Calls the unary method `path` (`/package.Service/Method`).
    pub async fn call<Q, R>(&self, path: &str, message: Q) -> Result<R, Status>
    where
        Q: prost::Message,
        R: prost::Message + Default,
    {
        let mut frame = BytesMut::with_capacity(5 + message.encoded_len());
        frame.put_u8(0);
        frame.put_u32(u32::try_from(message.encoded_len()).unwrap_or(u32::MAX));
        message
            .encode(&mut frame)
            .map_err(|err| Status::internal(format!("cannot encode the request: {err}")))?;
        let mut request = http::Request::new(Body::new(Full::new(frame.freeze())));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = path
            .parse()
            .map_err(|_| Status::internal(format!("bad method path {path}")))?;
        *request.version_mut() = http::Version::HTTP_2;
        *request.headers_mut() = self.headers.clone();
        *request.extensions_mut() = self.extensions.clone();
        let headers = request.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        let mut service = self.service.clone();
        let response = tower::ServiceExt::ready(&mut service)
            .await
            .map_err(|err| Status::internal(err.to_string()))?
            .call(request)
            .await
            .map_err(|err| Status::internal(err.to_string()))?;
        let (parts, body) = response.into_parts();
        if let Some(status) = Status::from_header_map(&parts.headers)
            && status.code() != Code::Ok
        {
            return Err(status);
        }
        let collected = body
            .collect()
            .await
            .map_err(|err| Status::internal(format!("cannot read the response: {err}")))?;
        if let Some(trailers) = collected.trailers()
            && let Some(status) = Status::from_header_map(trailers)
            && status.code() != Code::Ok
        {
            return Err(status);
        }
        let mut data = collected.to_bytes();
        if data.len() < 5 {
            return Err(Status::internal("the response carries no message"));
        }
        if data.get_u8() != 0 {
            // Nothing asked for compression.
            return Err(Status::internal("the response message is compressed"));
        }
        let length = data.get_u32() as usize;
        if data.len() < length {
            return Err(Status::internal("the response message is cut short"));
        }
        R::decode(data.slice(..length))
            .map_err(|err| Status::internal(format!("cannot decode the response: {err}")))
    }
}

/// The gateway as a tower layer for `tonic::transport::Server::layer`.
#[derive(Clone)]
pub struct RestLayer {
    routes: Option<Arc<dyn RestRoutes>>,
    authenticator: Option<crate::auth::Authenticator>,
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
    /// body is read.
    pub(crate) fn new(
        routes: Option<Arc<dyn RestRoutes>>,
        authenticator: Option<crate::auth::Authenticator>,
    ) -> Self {
        Self {
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
        }
    }
}

/// A service behind the gateway.
#[derive(Clone)]
pub struct Gateway<S> {
    inner: S,
    routes: Option<Arc<dyn RestRoutes>>,
    authenticator: Option<crate::auth::Authenticator>,
}

impl<S> std::fmt::Debug for Gateway<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").finish_non_exhaustive()
    }
}

impl<S> tower_service::Service<http::Request<Body>> for Gateway<S>
where
    S: tower_service::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Error: Into<BoxError> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let routes = match &self.routes {
            Some(routes) if !is_grpc(&request) => routes.clone(),
            _ => return Box::pin(self.inner.call(request)),
        };
        // Oakestra's servers answer their root `ok`, and its dashboard
        // checks that they are up by fetching it, without a token.
        if request.uri().path() == "/" && matches!(*request.method(), Method::GET | Method::HEAD) {
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
            let grpc = Grpc {
                service: BoxCloneSyncService::new(tower::ServiceExt::map_err(inner, Into::into)),
                headers,
                extensions: parts.extensions,
            };
            let reply = routes.handle(request, grpc).await;
            Ok(reply.into_response())
        })
    }
}

/// Most records one REST listing returns: Oakestra's listings have no
/// pages (the gRPC ones page through everything).
pub const MAX_LISTED: usize = 5000;

/// Every page of a listing, as one JSON list of at most [`MAX_LISTED`]:
/// `page` fetches the page after a token (`""` first) and returns its items
/// and the next token (`""` after the last).
pub async fn every_page<F, Fut>(mut page: F) -> Result<Reply, Reply>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<serde_json::Value>, String), Reply>>,
{
    let mut items = Vec::new();
    let mut token = String::new();
    loop {
        let (more, next) = page(token).await?;
        items.extend(more);
        if next.is_empty() || items.len() >= MAX_LISTED {
            break;
        }
        token = next;
    }
    items.truncate(MAX_LISTED);
    Ok(Reply::json(StatusCode::OK, items.into()))
}

/// Whether a path segment can be a record id (ours are ULIDs; Oakestra's
/// were ObjectIds): letters, digits, `-` and `_`, at most 64.
pub fn is_id(segment: &str) -> bool {
    !segment.is_empty()
        && segment.len() <= 64
        && segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A timestamp as RFC 3339 text, `null` when unset.
pub fn timestamp(time: Option<&prost_types::Timestamp>) -> serde_json::Value {
    time.and_then(|t| {
        let nanos = u32::try_from(t.nanos).ok()?;
        chrono::DateTime::from_timestamp(t.seconds, nanos)
    })
    .map_or(serde_json::Value::Null, |t| {
        t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            .into()
    })
}

/// An enum value's name without its type's prefix, in lowercase, as
/// Oakestra writes statuses (`INSTALLATION_STATUS_PARTIALLY_ACTIVE` →
/// `partially_active`).
pub fn enum_name(full: &str, prefix: &str) -> String {
    full.strip_prefix(prefix)
        .unwrap_or(full)
        .to_ascii_lowercase()
}

/// A privilege in JSON: `kind` without its prefix (`host_path`).
pub fn privilege_json(
    kind: &str,
    service_name: &str,
    value: &str,
    read_only: bool,
) -> serde_json::Value {
    serde_json::json!({
        "kind": enum_name(kind, "PRIVILEGE_KIND_"),
        "service_name": service_name,
        "value": value,
        "read_only": read_only,
    })
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
fn url_form(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_ids_and_names_enums() {
        assert!(is_id("01JDX3W0ZK5S9Y2Q8R1V4N6M7T"));
        assert!(!is_id("a/b") && !is_id("") && !is_id(&"x".repeat(65)) && !is_id(".."));
        assert_eq!(
            enum_name(
                "INSTALLATION_STATUS_PARTIALLY_ACTIVE",
                "INSTALLATION_STATUS_"
            ),
            "partially_active"
        );
        let time = prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 5_000_000,
        };
        assert_eq!(timestamp(Some(&time)), "2023-11-14T22:13:20.005Z");
        assert_eq!(timestamp(None), serde_json::Value::Null);
    }

    #[test]
    fn decodes_query_strings() {
        let pairs: Vec<_> = url_form("name=a%20b&status=active&x=1+2&bad=%zz&end=%4")
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("name".into(), "a b".into()),
                ("status".into(), "active".into()),
                ("x".into(), "1 2".into()),
                ("bad".into(), "%zz".into()),
                ("end".into(), "%4".into()),
            ]
        );
    }

    #[test]
    fn maps_grpc_errors_to_oakestra_ones() {
        let status: Status = crate::ApiError::invalid(
            "the addon does not validate",
            [("addon.services[0].image", "must not be empty")],
        )
        .into();
        let reply = Reply::from_status(&status, |f| {
            f.strip_prefix("addon.").unwrap_or(f).to_owned()
        });
        assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(reply.body["code"], 422);
        assert_eq!(reply.body["status"], "Unprocessable Entity");
        assert_eq!(reply.body["reason"], "INVALID_REQUEST");
        assert_eq!(
            reply.body["errors"]["json"]["services[0].image"][0],
            "must not be empty"
        );
        let status: Status =
            crate::ApiError::new(Code::NotFound, "ADDON_NOT_FOUND", "no addon x").into();
        let reply = Reply::from_status(&status, str::to_owned);
        assert_eq!(reply.status, StatusCode::NOT_FOUND);
        assert_eq!(reply.body["message"], "no addon x");
        assert_eq!(http_status(Code::Unauthenticated), StatusCode::UNAUTHORIZED);
        assert_eq!(http_status(Code::AlreadyExists), StatusCode::BAD_REQUEST);
    }
}
