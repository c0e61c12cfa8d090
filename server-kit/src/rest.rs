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

mod gateway;
mod grpc;
mod json;
mod reply;

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Method, StatusCode};

pub use self::{
    gateway::{Gateway, RestLayer},
    grpc::Grpc,
    json::{MAX_LISTED, enum_name, every_page, privilege_json, timestamp},
    reply::{Reply, http_status},
};

/// Largest REST request body read: a descriptor is bounded at 1 MiB.
pub const MAX_REST_BODY: usize = 2 * 1024 * 1024;

/// One server's REST routes: every request that is not gRPC (or gRPC-Web)
/// comes here, and what is not a route is answered 404.
pub trait RestRoutes: std::fmt::Debug + Send + Sync + 'static {
    /// Answers one request, calling the server's services through `grpc`.
    fn handle(&self, request: RestRequest, grpc: Grpc) -> BoxFuture<'static, Reply>;

    /// The template of the route `path` (without a trailing `/`) matches,
    /// for metrics: `/api/v1/addons/:id` (not `{id}`, which simple
    /// text-format parsers take for the end of the labels); `None` for no
    /// route.
    fn route(&self, path: &str) -> Option<String>;
}

/// A server's REST routes as Oakestra lays them out: one collection at
/// [`PREFIX`](Self::PREFIX), where GET lists and POST creates, and its
/// items at `PREFIX/{id}`, where GET reads and DELETE removes; each answer
/// made of the server's own gRPC calls through [`Grpc`]. Every collection
/// is [`RestRoutes`]: the one dispatch of both servers' routes.
pub trait RestCollection: std::fmt::Debug + Send + Sync + 'static {
    /// The collection's path, such as `/api/v1/addons`.
    const PREFIX: &'static str;

    /// `GET PREFIX`.
    fn list(
        request: &RestRequest,
        grpc: &Grpc,
    ) -> impl Future<Output = Result<Reply, Reply>> + Send;

    /// `POST PREFIX`.
    fn create(
        request: &RestRequest,
        grpc: &Grpc,
    ) -> impl Future<Output = Result<Reply, Reply>> + Send;

    /// `GET PREFIX/{id}`.
    fn get(id: String, grpc: &Grpc) -> impl Future<Output = Result<Reply, Reply>> + Send;

    /// `DELETE PREFIX/{id}`.
    fn delete(id: String, grpc: &Grpc) -> impl Future<Output = Result<Reply, Reply>> + Send;

    /// The answer to any other method on an item: 405, naming GET and
    /// DELETE.
    fn other_item_method(_method: &Method) -> Reply {
        Reply::method_not_allowed("GET, DELETE")
    }
}

impl<C: RestCollection> RestRoutes for C {
    fn handle(&self, request: RestRequest, grpc: Grpc) -> BoxFuture<'static, Reply> {
        Box::pin(async move {
            let id = match request.resource(C::PREFIX) {
                Ok(id) => id,
                Err(reply) => return reply,
            };
            let outcome = match (&request.method, id) {
                (&Method::GET, None) => C::list(&request, &grpc).await,
                (&Method::POST, None) => C::create(&request, &grpc).await,
                (&Method::GET, Some(id)) => C::get(id, &grpc).await,
                (&Method::DELETE, Some(id)) => C::delete(id, &grpc).await,
                (_, None) => Err(Reply::method_not_allowed("GET, POST")),
                (method, Some(_)) => Err(C::other_item_method(method)),
            };
            outcome.unwrap_or_else(|reply| reply)
        })
    }

    fn route(&self, path: &str) -> Option<String> {
        match path.strip_prefix(C::PREFIX)? {
            "" => Some(C::PREFIX.to_owned()),
            rest => rest
                .strip_prefix('/')
                .filter(|id| is_id(id))
                .map(|_| format!("{}/:id", C::PREFIX)),
        }
    }
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

/// Whether a path segment can be a record id (ours are ULIDs; Oakestra's
/// were ObjectIds): letters, digits, `-` and `_`, at most 64.
pub fn is_id(segment: &str) -> bool {
    !segment.is_empty()
        && segment.len() <= 64
        && segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests;
