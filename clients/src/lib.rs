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

mod error;
pub mod json;
mod manager;
mod marketplace;
pub mod oakestra;
mod paging;
mod retry;
mod watch;

pub use crate::{
    error::{ClientError, code_name, describe},
    manager::{InstallOptions, InstallationEvent, ManagerClient},
    marketplace::{AddonFilter, MarketplaceClient},
    retry::RetryPolicy,
};
pub use oakestra_addons_proto as proto;

/// How clients connect and call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientOptions {
    /// Limit of each unary call (not of streams).
    pub timeout: Duration,
    /// Limit of connecting.
    pub connect_timeout: Duration,
    /// Retries of idempotent calls.
    pub retry: RetryPolicy,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(3),
            retry: RetryPolicy::default(),
        }
    }
}

/// A lazily connected channel to `url` with `options`. The per-call
/// timeout is set on unary calls by the clients, so streams can live on.
pub fn channel_with(url: &str, options: &ClientOptions) -> Result<Channel, ClientError> {
    let endpoint =
        Endpoint::from_shared(url.to_owned()).map_err(|err| ClientError::InvalidUrl {
            url: url.to_owned(),
            reason: err.to_string(),
        })?;
    if endpoint.uri().scheme_str() != Some("http") || endpoint.uri().host().is_none() {
        return Err(ClientError::InvalidUrl {
            url: url.to_owned(),
            reason: "expected http://HOST:PORT".to_owned(),
        });
    }
    Ok(endpoint
        .connect_timeout(options.connect_timeout)
        .tcp_nodelay(true)
        .connect_lazy())
}

use tokio_stream::StreamExt as _;
use tonic::transport::{Channel, Endpoint};
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
