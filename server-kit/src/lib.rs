//! What the three Oakestra addons servers share, so each of them is only its
//! own services: the one start-up path (flags, logging, telemetry, store),
//! the gRPC server with health and reflection, graceful shutdown on
//! SIGTERM/SIGINT, trace-context propagation, and the mapping of storage
//! errors to gRPC statuses.

/// The `Service` impl of a layer of the HTTP stack (`$layer<S>` with its
/// service beneath in `inner`): the types every layer shares, readiness
/// from the service beneath, and `call` as the layer's own `respond`.
macro_rules! layer_service {
    ($layer:ident) => {
        impl<S: crate::HttpService> tower_service::Service<http::Request<tonic::body::Body>>
            for $layer<S>
        {
            type Response = http::Response<tonic::body::Body>;
            type Error = S::Error;
            type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

            fn poll_ready(
                &mut self,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<Result<(), Self::Error>> {
                self.inner.poll_ready(cx)
            }

            fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
                self.respond(request)
            }
        }
    };
}

mod args;
pub mod auth;
pub mod browser;
pub mod health;
mod limits;
pub mod metrics;
pub use crate::limits::ConnectionLimits;
mod client;
mod errors;
mod registry_auth;
#[cfg(feature = "store")]
mod requests;
pub mod rest;
mod server;
mod shutdown;
#[cfg(feature = "store")]
mod status;
mod telemetry;
mod tls;
#[cfg(feature = "store")]
mod watch;

#[cfg(feature = "store")]
pub use crate::{
    args::StoreArgs,
    requests::{MAX_REQUEST_ID, Mutation, REMEMBERED_FOR, Requests, check_request_id},
    status::store_error_to_status,
    watch::{WatchStream, watch_stream},
};
pub use crate::{
    args::{CommonArgs, LogFormat, parse_config, parse_duration},
    auth::{AuthArgs, Identity, MethodAccess, Role, Security, audit},
    client::{Authorize, ClientCredentials, is_loopback_url},
    errors::{ApiError, ERROR_DOMAIN, reason_of, watch_too_slow},
    registry_auth::RegistryArgs,
    server::{
        MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES, Server, announce, bind, bind_quietly,
        install_crypto, main_with, server_main,
    },
    shutdown::Shutdown,
    telemetry::{
        TelemetryGuard, continue_trace, current_traceparent, init_telemetry, inject_trace_context,
        record_ids,
    },
};

/// A record's time as a protobuf `Timestamp`.
pub fn timestamp(time: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    std::time::SystemTime::from(time).into()
}

/// What each layer of a server's HTTP stack wraps (the layer beneath, down
/// to the routes): a service of HTTP requests, cloned per request, whose
/// futures and errors may cross tasks.
pub trait HttpService:
    tower_service::Service<
        http::Request<tonic::body::Body>,
        Response = http::Response<tonic::body::Body>,
        Error: Into<tower::BoxError> + Send + 'static,
        Future: Send + 'static,
    > + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> HttpService for S where
    S: tower_service::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error: Into<tower::BoxError> + Send + 'static,
            Future: Send + 'static,
        > + Clone
        + Send
        + Sync
        + 'static
{
}

#[doc(hidden)]
pub use tonic as __tonic;

/// The unary methods of a generated tonic service trait, one line each
/// inside its `#[tonic::async_trait]` impl, each calling the API's
/// use-case method of the same request:
///
/// - `mutating`: through [`Requests::serve`] (on the API's `requests`
///   field), so the use case takes the [`Mutation`]: identity, request id
///   and request, answered once per request id and audited;
/// - `read`: the use case takes the request message.
///
/// ```ignore
/// #[tonic::async_trait]
/// impl MarketplaceService for MarketplaceApi {
///     addons_server_kit::unary! {
///         mutating delete_addon(pb::DeleteAddonRequest) -> pb::DeleteAddonResponse = delete;
///         read get_addon(pb::GetAddonRequest) -> pb::GetAddonResponse = get;
///     }
///     // the streaming methods, as written
/// }
/// ```
///
/// It writes what `async_trait` makes of an `async fn` (the methods it
/// expands are not seen by `async_trait`, which runs first).
#[macro_export]
macro_rules! unary {
    ($($kind:ident $method:ident($request:ty) -> $response:ty = $use_case:ident;)*) => {
        $(
            fn $method<'life0, 'async_trait>(
                &'life0 self,
                request: $crate::__tonic::Request<$request>,
            ) -> ::std::pin::Pin<::std::boxed::Box<
                dyn ::std::future::Future<
                    Output = ::std::result::Result<
                        $crate::__tonic::Response<$response>,
                        $crate::__tonic::Status,
                    >,
                > + ::std::marker::Send + 'async_trait,
            >>
            where
                'life0: 'async_trait,
                Self: 'async_trait,
            {
                ::std::boxed::Box::pin(async move {
                    $crate::unary!(@call $kind self request $use_case)
                })
            }
        )*
    };
    (@call mutating $api:ident $request:ident $use_case:ident) => {
        $api.requests.serve($request, async |call| $api.$use_case(call).await).await
    };
    (@call read $api:ident $request:ident $use_case:ident) => {
        $api.$use_case($request.into_inner()).await.map($crate::__tonic::Response::new)
    };
}

/// A generated tonic server with the message size limits every service
/// sets: [`MAX_REQUEST_BYTES`] in, [`MAX_RESPONSE_BYTES`] out.
#[macro_export]
macro_rules! limited {
    ($server:expr) => {
        $server
            .max_decoding_message_size($crate::MAX_REQUEST_BYTES)
            .max_encoding_message_size($crate::MAX_RESPONSE_BYTES)
    };
}
