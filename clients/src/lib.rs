//! Rust client library for the Oakestra addons system, and the library
//! behind the `oak-addons` command-line tool.
//!
//! - [`MarketplaceClient`] and [`ManagerClient`]: typed clients over the
//!   generated stubs. Idempotent calls are retried with backoff when the
//!   server is `UNAVAILABLE` ([`RetryPolicy`]); listings stream every page;
//!   watches reopen a dropped stream and skip what was already seen.
//! - [`oakestra::parse_descriptor`]: Oakestra's marketplace JSON (or YAML)
//!   descriptor to the protobuf one, so existing descriptors publish
//!   unchanged.
//! - [`json`]: messages as canonical proto3 JSON with proto field names.
//! - [`probe`]: a server's services through reflection, with their health.

use std::time::Duration;

/// A typed client over the generated stub `$stub`: the struct (the stub,
/// the retry policy, the call timeout), its constructors (`connect`, `new`,
/// `with_bearer`) and the one shape of its unary calls (`call`).
macro_rules! typed_client {
    ($client:ident, $stub:ident, $what:literal) => {
        #[doc = concat!("A typed client of ", $what, ".")]
        #[derive(Debug, Clone)]
        pub struct $client {
            inner: $stub<crate::AuthChannel>,
            retry: RetryPolicy,
            timeout: Duration,
        }

        impl $client {
            #[doc = concat!("A client of ", $what, " at `url`.")]
            pub fn connect(url: &str, options: &ClientOptions) -> Result<Self, ClientError> {
                let bearer = crate::Bearer::new(&options.credentials)?
                    .with_traceparent(options.traceparent.as_deref());
                Ok(Self::with_bearer(
                    crate::channel_with(url, options)?,
                    bearer,
                    options,
                ))
            }

            /// A client on an existing channel (a token in `options` that is
            /// not header text is left out).
            pub fn new(channel: Channel, options: &ClientOptions) -> Self {
                let bearer = crate::Bearer::new(&options.credentials)
                    .unwrap_or_default()
                    .with_traceparent(options.traceparent.as_deref());
                Self::with_bearer(channel, bearer, options)
            }

            fn with_bearer(
                channel: Channel,
                bearer: crate::Bearer,
                options: &ClientOptions,
            ) -> Self {
                Self {
                    inner: $stub::with_interceptor(channel, bearer),
                    retry: options.retry,
                    timeout: options.timeout,
                }
            }

            /// Calls `method` with `request` on a clone of the stub, within
            /// the timeout, retried on `UNAVAILABLE` per the retry policy:
            /// for idempotent calls only (mutating ones carry one
            /// `request_id` through their retries).
            async fn call<Req, Resp, Fut>(
                &self,
                request: Req,
                method: impl Fn($stub<crate::AuthChannel>, Req) -> Fut,
            ) -> Result<Resp, ClientError>
            where
                Req: Clone,
                Fut: std::future::Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
            {
                let response = self
                    .retry
                    .run(|| {
                        crate::retry::within(
                            self.timeout,
                            method(self.inner.clone(), request.clone()),
                        )
                    })
                    .await?;
                Ok(response.into_inner())
            }
        }
    };
}

mod error;
pub mod json;
mod manager;
mod marketplace;
mod paging;
mod retry;
mod watch;

pub use crate::{
    error::{ClientError, code_name, describe},
    manager::{InstallOptions, InstallationEvent, ManagerClient, RolloutOptions},
    marketplace::{AddonFilter, MarketplaceClient},
    retry::RetryPolicy,
};
/// Oakestra's descriptor format (it lives with the descriptor, which the
/// marketplace's REST routes read too).
pub use addons_descriptor::oakestra;
pub use oakestra_addons_proto as proto;

/// How clients connect and call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientOptions {
    /// Limit of each unary call (not of streams).
    pub timeout: Duration,
    /// Limit of connecting.
    pub connect_timeout: Duration,
    /// Retries of idempotent calls.
    pub retry: RetryPolicy,
    /// TLS and bearer token.
    pub credentials: Credentials,
    /// A W3C `traceparent` sent with every call, so the servers' spans of
    /// it join the caller's trace.
    pub traceparent: Option<String>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(3),
            retry: RetryPolicy::default(),
            credentials: Credentials::default(),
            traceparent: None,
        }
    }
}

/// Whom a client trusts and how it proves who it is.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    /// CA certificate (PEM) the servers' TLS certificates must chain to;
    /// needed for `https://` URLs (the system's roots are not loaded).
    pub ca_pem: Option<Vec<u8>>,
    /// Client certificate and key (PEM), for mTLS.
    pub identity_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// Bearer token sent with every call.
    pub token: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token or the key.
        f.debug_struct("Credentials")
            .field("ca", &self.ca_pem.is_some())
            .field("client_certificate", &self.identity_pem.is_some())
            .field("token", &self.token.is_some())
            .finish()
    }
}

/// Adds `authorization: Bearer <token>` to every call, and the caller's
/// `traceparent` when it has one.
#[derive(Debug, Clone, Default)]
pub struct Bearer {
    token: Option<MetadataValue<Ascii>>,
    traceparent: Option<MetadataValue<Ascii>>,
}

impl Bearer {
    /// The token of `credentials` (an empty one is none); one that is not
    /// header text is an error.
    pub fn new(credentials: &Credentials) -> Result<Self, ClientError> {
        let token =
            match credentials.token.as_deref().map(str::trim) {
                None | Some("") => None,
                Some(token) => Some(format!("Bearer {token}").parse().map_err(|_| {
                    ClientError::Input("the token is not valid header text".into())
                })?),
            };
        Ok(Self {
            token,
            traceparent: None,
        })
    }

    /// Also sends `traceparent` (see [`ClientOptions::traceparent`]); one
    /// that is not header text is left out.
    pub fn with_traceparent(mut self, traceparent: Option<&str>) -> Self {
        self.traceparent = traceparent.and_then(|value| value.parse().ok());
        self
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(header) = &self.token {
            request
                .metadata_mut()
                .insert("authorization", header.clone());
        }
        if let Some(header) = &self.traceparent {
            request.metadata_mut().insert("traceparent", header.clone());
        }
        Ok(request)
    }
}

/// A channel whose calls carry the client's token.
pub type AuthChannel = InterceptedService<Channel, Bearer>;

/// A lazily connected channel to `url` (`http://` or `https://`) with
/// `options`. The per-call timeout is set on unary calls by the clients,
/// so streams can live on.
pub fn channel_with(url: &str, options: &ClientOptions) -> Result<Channel, ClientError> {
    // rustls needs one crypto backend for the process; several are linked.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let invalid = |reason: String| ClientError::InvalidUrl {
        url: url.to_owned(),
        reason,
    };
    let mut endpoint =
        Endpoint::from_shared(url.to_owned()).map_err(|err| invalid(err.to_string()))?;
    let scheme = endpoint.uri().scheme_str().unwrap_or_default().to_owned();
    if !matches!(scheme.as_str(), "http" | "https") || endpoint.uri().host().is_none() {
        return Err(invalid(
            "expected http://HOST:PORT or https://HOST:PORT".to_owned(),
        ));
    }
    let credentials = &options.credentials;
    if scheme == "https" {
        let mut tls = ClientTlsConfig::new();
        match &credentials.ca_pem {
            Some(ca) => tls = tls.ca_certificate(Certificate::from_pem(ca)),
            None => {
                return Err(invalid(
                    "an https URL needs a CA certificate (--ca-cert)".to_owned(),
                ));
            }
        }
        if let Some((cert, key)) = &credentials.identity_pem {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|err| ClientError::Input(format!("TLS: {err}")))?;
    }
    Ok(endpoint
        .connect_timeout(options.connect_timeout)
        .tcp_nodelay(true)
        .connect_lazy())
}

/// [`channel_with`], its calls carrying the token of `options`.
pub fn auth_channel(url: &str, options: &ClientOptions) -> Result<AuthChannel, ClientError> {
    Ok(InterceptedService::new(
        channel_with(url, options)?,
        Bearer::new(&options.credentials)?,
    ))
}

use tokio_stream::StreamExt as _;
use tonic::{
    Status,
    metadata::{Ascii, MetadataValue},
    service::interceptor::InterceptedService,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

/// A lazily connected channel to `url` (`http://host:port`) with the given
/// per-call timeout.
pub fn channel(url: &str, timeout: Duration) -> Result<Channel, tonic::transport::Error> {
    Ok(Endpoint::from_shared(url.to_owned())?
        .connect_timeout(Duration::from_secs(3))
        .timeout(timeout)
        .connect_lazy())
}

/// A service a server offers and its health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceHealth {
    /// Full name, such as `oakestra.addons.marketplace.v1.MarketplaceService`.
    pub name: String,
    /// `SERVING`, `NOT_SERVING`, ... or `-` for services health does not
    /// track (reflection).
    pub status: String,
}

/// Lists a server's services through reflection, with the health of each.
pub async fn probe(channel: Channel) -> Result<Vec<ServiceHealth>, tonic::Status> {
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(channel.clone())
        .server_reflection_info(tokio_stream::once(request))
        .await?
        .into_inner();
    let names = match responses
        .next()
        .await
        .transpose()?
        .and_then(|r| r.message_response)
    {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect::<Vec<_>>()
        }
        Some(MessageResponse::ErrorResponse(err)) => {
            return Err(tonic::Status::new(err.error_code.into(), err.error_message));
        }
        _ => return Err(tonic::Status::internal("reflection gave no service list")),
    };
    let mut health = HealthClient::new(channel);
    let mut services = Vec::new();
    for name in names {
        let status = match health
            .check(HealthCheckRequest {
                service: name.clone(),
            })
            .await
        {
            Ok(response) => response.into_inner().status().as_str_name().to_owned(),
            Err(status) if status.code() == tonic::Code::NotFound => "-".to_owned(),
            Err(status) => return Err(status),
        };
        services.push(ServiceHealth { name, status });
    }
    services.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(services)
}

/// A duration as people write one: `500ms`, `10s`, `5m`, `1h`, or a number
/// of seconds.
pub use addons_descriptor::oakestra::parse_duration;
