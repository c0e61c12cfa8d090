//! The tonic adapter of `oakestra.addons.marketplace.v1.MarketplaceService`:
//! converts, delegates to [`Marketplace`], maps errors.

use addons_descriptor::Descriptor;
use addons_server_kit::Shutdown;
use oakestra_addons_proto::marketplace::v1::{
    self as pb,
    marketplace_service_server::{MarketplaceService, MarketplaceServiceServer},
};
use tokio::sync::mpsc;
use tokio_stream::{StreamExt as _, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};

use crate::{Error, Marketplace, convert};

/// The gRPC face of the marketplace.
#[derive(Debug, Clone)]
pub struct MarketplaceApi {
    core: Marketplace,
    shutdown: Shutdown,
}

impl MarketplaceApi {
    /// Serves `core`; watch streams end when `shutdown` fires.
    pub fn new(core: Marketplace, shutdown: Shutdown) -> Self {
        Self { core, shutdown }
    }

    /// The tonic service.
    pub fn into_service(self) -> MarketplaceServiceServer<Self> {
        MarketplaceServiceServer::new(self)
    }
}

fn required_id(id: &str) -> Result<&str, Status> {
    if id.is_empty() {
        return Err(Error::required("id").into());
    }
    Ok(id)
}

type WatchStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<pb::WatchAddonResponse, Status>> + Send>,
>;

#[tonic::async_trait]
impl MarketplaceService for MarketplaceApi {
    async fn publish_addon(
        &self,
        request: Request<pb::PublishAddonRequest>,
    ) -> Result<Response<pb::PublishAddonResponse>, Status> {
        let addon = request
            .into_inner()
            .addon
            .ok_or_else(|| Error::required("addon"))?;
        let descriptor = Descriptor::from_proto(addon);
        let stored = self.core.publish(descriptor).await?;
        tracing::info!(id = %stored.value.id, name = %stored.value.descriptor.name, "addon published");
        Ok(Response::new(pb::PublishAddonResponse {
            addon: Some(convert::addon_to_proto(stored)),
        }))
    }

    async fn get_addon(
        &self,
        request: Request<pb::GetAddonRequest>,
    ) -> Result<Response<pb::GetAddonResponse>, Status> {
        let addon = self.core.get(required_id(&request.get_ref().id)?).await?;
        Ok(Response::new(pb::GetAddonResponse {
            addon: Some(convert::addon_to_proto(addon)),
        }))
    }

    async fn list_addons(
        &self,
        request: Request<pb::ListAddonsRequest>,
    ) -> Result<Response<pb::ListAddonsResponse>, Status> {
        let request = request.into_inner();
        let (statuses, page_size) = addons_descriptor::list_request(
            &request.statuses,
            request.page_size,
            convert::status_from_proto,
        )
        .map_err(Error::Invalid)?;
        let name = Some(request.name.as_str()).filter(|n| !n.is_empty());
        let token = Some(request.page_token.as_str()).filter(|t| !t.is_empty());
        let page = self.core.list(&statuses, name, page_size, token).await?;
        Ok(Response::new(pb::ListAddonsResponse {
            addons: page
                .items
                .into_iter()
                .map(convert::addon_to_proto)
                .collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }

    async fn delete_addon(
        &self,
        request: Request<pb::DeleteAddonRequest>,
    ) -> Result<Response<pb::DeleteAddonResponse>, Status> {
        let id = required_id(&request.get_ref().id)?;
        self.core.delete(id).await?;
        tracing::info!(%id, "addon deleted");
        Ok(Response::new(pb::DeleteAddonResponse {}))
    }

    async fn reverify_addon(
        &self,
        request: Request<pb::ReverifyAddonRequest>,
    ) -> Result<Response<pb::ReverifyAddonResponse>, Status> {
        let addon = self
            .core
            .reverify(required_id(&request.get_ref().id)?)
            .await?;
        Ok(Response::new(pb::ReverifyAddonResponse {
            addon: Some(convert::addon_to_proto(addon)),
        }))
    }

    type WatchAddonStream = WatchStream;

    async fn watch_addon(
        &self,
        request: Request<pb::WatchAddonRequest>,
    ) -> Result<Response<Self::WatchAddonStream>, Status> {
        let id = required_id(&request.get_ref().id)?.to_owned();
        let (tx, rx) = mpsc::channel(16);
        let core = self.core.clone();
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move { core.watch(&id, tx, shutdown.fired()).await });
        let stream = ReceiverStream::new(rx).map(|item| {
            item.map(|addon| pb::WatchAddonResponse {
                addon: Some(convert::addon_to_proto(addon)),
            })
            .map_err(Status::from)
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
