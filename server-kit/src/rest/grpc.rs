//! The server's own gRPC services, called in-process as the REST caller.

use bytes::{Buf as _, BufMut as _, BytesMut};
use http::{HeaderMap, HeaderValue, Method, header};
use http_body_util::{BodyExt as _, Full};
use tonic::{Code, Status, body::Body};
use tower::{BoxError, Service as _, util::BoxCloneSyncService};

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
    /// The services behind `inner`, called with the REST caller's
    /// `headers` and connection `extensions`.
    pub(super) fn new<S>(inner: S, headers: HeaderMap, extensions: http::Extensions) -> Self
    where
        S: crate::HttpService,
    {
        Self {
            service: BoxCloneSyncService::new(tower::ServiceExt::map_err(inner, Into::into)),
            headers,
            extensions,
        }
    }

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
