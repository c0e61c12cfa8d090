//! The tonic adapters of `oakestra.addons.engine.v1`: convert, delegate to
//! [`Manager`], map errors.

use addons_descriptor::FieldViolation;
use addons_server_kit::Shutdown;
use oakestra_addons_proto::engine::v1::{
    self as pb,
    addons_manager_service_server::{AddonsManagerService, AddonsManagerServiceServer},
    monitor_link_service_server::{MonitorLinkService, MonitorLinkServiceServer},
};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::{Stream, StreamExt as _, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};

use crate::{
    Error, Manager, convert,
    link::LinkHub,
    service::{WatchEnd, WatchEvent},
};

/// How many changes a watcher may have in flight before it is dropped.
const WATCH_BUFFER: usize = 256;

/// The gRPC face of the manager's install API.
#[derive(Debug, Clone)]
pub struct ManagerApi {
    core: Manager,
    shutdown: Shutdown,
}

impl ManagerApi {
    /// Serves `core`; watch streams end when `shutdown` fires.
    pub fn new(core: Manager, shutdown: Shutdown) -> Self {
        Self { core, shutdown }
    }

    /// The tonic service.
    pub fn into_service(self) -> AddonsManagerServiceServer<Self> {
        AddonsManagerServiceServer::new(self)
    }
}

fn required<'a>(field: &str, value: &'a str) -> Result<&'a str, Status> {
    if value.is_empty() {
        return Err(Error::required(field).into());
    }
    Ok(value)
}

type BoxStream<T> = std::pin::Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AddonsManagerService for ManagerApi {
    async fn install_addon(
        &self,
        request: Request<pb::InstallAddonRequest>,
    ) -> Result<Response<pb::InstallAddonResponse>, Status> {
        let marketplace_id = required("marketplace_id", &request.get_ref().marketplace_id)?;
        let installation = self
            .core
            .install(
                marketplace_id,
                request.get_ref().keep_core_stopped_on_failure,
            )
            .await?;
        tracing::info!(id = %installation.value.id, %marketplace_id, "addon installed");
        Ok(Response::new(pb::InstallAddonResponse {
            installation: Some(convert::installation_to_proto(installation)),
        }))
    }

    async fn uninstall_addon(
        &self,
        request: Request<pb::UninstallAddonRequest>,
    ) -> Result<Response<pb::UninstallAddonResponse>, Status> {
        let id = required("id", &request.get_ref().id)?;
        let installation = self.core.uninstall(id, request.get_ref().purge).await?;
        Ok(Response::new(pb::UninstallAddonResponse {
            installation: installation.map(convert::installation_to_proto),
        }))
    }

    async fn get_installation(
        &self,
        request: Request<pb::GetInstallationRequest>,
    ) -> Result<Response<pb::GetInstallationResponse>, Status> {
        let installation = self
            .core
            .get(required("id", &request.get_ref().id)?)
            .await?;
        Ok(Response::new(pb::GetInstallationResponse {
            installation: Some(convert::installation_to_proto(installation)),
        }))
    }

    async fn list_installations(
        &self,
        request: Request<pb::ListInstallationsRequest>,
    ) -> Result<Response<pb::ListInstallationsResponse>, Status> {
        let request = request.into_inner();
        let (statuses, page_size) = addons_descriptor::list_request(
            &request.statuses,
            request.page_size,
            convert::status_from_proto,
        )
        .map_err(Error::Invalid)?;
        let token = Some(request.page_token.as_str()).filter(|t| !t.is_empty());
        let page = self.core.list(&statuses, page_size, token).await?;
        Ok(Response::new(pb::ListInstallationsResponse {
            installations: page
                .items
                .into_iter()
                .map(convert::installation_to_proto)
                .collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }

    type WatchInstallationsStream = BoxStream<pb::WatchInstallationsResponse>;

    async fn watch_installations(
        &self,
        request: Request<pb::WatchInstallationsRequest>,
    ) -> Result<Response<Self::WatchInstallationsStream>, Status> {
        let ids = request.into_inner().ids;
        if let Some(i) = ids.iter().position(String::is_empty) {
            return Err(
                Error::Invalid(vec![FieldViolation::new(format!("ids[{i}]"), "empty")]).into(),
            );
        }
        // Unknown ids fail the call itself, before the stream starts.
        for id in &ids {
            self.core.get(id).await?;
        }
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let (end_tx, end_rx) = oneshot::channel();
        let core = self.core.clone();
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let end = core.watch(ids, tx, shutdown.fired()).await;
            let _ = end_tx.send(end);
        });
        let events = ReceiverStream::new(rx).map(|event| {
            Ok(match event {
                WatchEvent::Changed(record) => pb::WatchInstallationsResponse {
                    installation: Some(convert::installation_to_proto(record)),
                    deleted: false,
                },
                WatchEvent::Deleted(record) => pb::WatchInstallationsResponse {
                    installation: Some(convert::installation_to_proto(record)),
                    deleted: true,
                },
            })
        });
        // After the last event, say why the stream ended if it was not the
        // client's or the server's choice.
        let ending = futures::stream::once(async move {
            match end_rx.await {
                Ok(Ok(WatchEnd::Done)) | Err(_) => None,
                Ok(Ok(WatchEnd::TooSlow)) => Some(Err(Status::resource_exhausted(
                    "watcher fell too far behind the changes; watch again to resume from the current state",
                ))),
                Ok(Err(err)) => Some(Err(Status::from(err))),
            }
        });
        let stream = events.chain(ending.filter_map(|end| end));
        Ok(Response::new(Box::pin(stream)))
    }
}

/// The manager's end of the monitor link.
#[derive(Debug, Clone)]
pub struct MonitorLinkApi {
    hub: LinkHub,
}

impl MonitorLinkApi {
    /// Serves links through `hub`.
    pub fn new(hub: LinkHub) -> Self {
        Self { hub }
    }

    /// The tonic service.
    pub fn into_service(self) -> MonitorLinkServiceServer<Self> {
        MonitorLinkServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl MonitorLinkService for MonitorLinkApi {
    type ConnectStream = BoxStream<pb::ConnectResponse>;

    async fn connect(
        &self,
        request: Request<Streaming<pb::ConnectRequest>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let outbound = self.hub.connect(request.into_inner()).await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(outbound))))
    }
}
