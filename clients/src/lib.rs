//! Rust client library for the Oakestra addons system.
//!
//! Today it offers the connection helper the typed clients build on and a
//! server probe (what `grpcurl list` and a health check tell). The typed
//! marketplace and manager clients, retries, pagination and watch helpers
//! arrive with the clients issue.

use std::time::Duration;

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
