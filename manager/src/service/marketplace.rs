//! The addons an installation is made from, read from the marketplace
//! (or, in unit tests, from anything that answers as it does).

use futures::future::BoxFuture;
use tracing::Instrument as _;

use super::*;

/// Where the addons of installations come from: the marketplace's
/// `GetAddon` and `ListAddons`, as the manager uses them.
pub trait AddonSource: std::fmt::Debug + Send + Sync + 'static {
    /// The addon `id`, in any status; `NOT_FOUND` when there is none.
    fn get(&self, id: &str) -> BoxFuture<'_, Result<mpb::Addon, tonic::Status>>;
    /// Every version of the addon `name`, in any status (at most 500).
    fn versions(&self, name: &str) -> BoxFuture<'_, Result<Vec<mpb::Addon>, tonic::Status>>;
    /// Every addon's state and then its changes, from after
    /// `since_revision` (0: the current state first), as `WatchAddons`.
    fn watch(&self, since_revision: u64) -> BoxFuture<'_, Result<AddonEvents, tonic::Status>> {
        let _ = since_revision;
        Box::pin(async { Err(tonic::Status::unimplemented("no watch")) })
    }
}

/// The events of [`AddonSource::watch`].
pub type AddonEvents =
    futures::stream::BoxStream<'static, Result<mpb::WatchAddonsResponse, tonic::Status>>;

/// The marketplace over gRPC.
#[derive(Debug, Clone)]
pub(super) struct GrpcMarketplace(pub(super) MarketplaceClient);

impl AddonSource for GrpcMarketplace {
    fn watch(&self, since_revision: u64) -> BoxFuture<'_, Result<AddonEvents, tonic::Status>> {
        let request = mpb::WatchAddonsRequest {
            name: String::new(),
            since_revision,
        };
        let mut client = self.0.clone();
        Box::pin(async move {
            use futures::StreamExt as _;
            Ok(client.watch_addons(request).await?.into_inner().boxed())
        })
    }

    fn get(&self, id: &str) -> BoxFuture<'_, Result<mpb::Addon, tonic::Status>> {
        let request = mpb::GetAddonRequest { id: id.to_owned() };
        let mut client = self.0.clone();
        Box::pin(
            async move {
                Ok(client
                    .get_addon(request)
                    .await?
                    .into_inner()
                    .addon
                    .unwrap_or_default())
            }
            .instrument(client_span("GetAddon")),
        )
    }

    fn versions(&self, name: &str) -> BoxFuture<'_, Result<Vec<mpb::Addon>, tonic::Status>> {
        let request = mpb::ListAddonsRequest {
            statuses: vec![
                mpb::AddonStatus::Approved.into(),
                mpb::AddonStatus::UnderReview.into(),
                mpb::AddonStatus::FailedVerification.into(),
                mpb::AddonStatus::Revoked.into(),
            ],
            name: name.to_owned(),
            page_size: 500,
            page_token: String::new(),
        };
        let mut client = self.0.clone();
        Box::pin(
            async move { Ok(client.list_addons(request).await?.into_inner().addons) }
                .instrument(client_span("ListAddons")),
        )
    }
}

/// The span of a call to the marketplace: the marketplace's own span of
/// it is its child (the call carries its `traceparent`).
fn client_span(method: &'static str) -> tracing::Span {
    tracing::info_span!(
        "marketplace.call",
        otel.name = %format_args!("oakestra.addons.marketplace.v1.MarketplaceService/{method}"),
        otel.kind = "client",
        rpc.system = "grpc",
        rpc.method = method,
    )
}

impl Manager {
    /// Approved version `version` of addon `name`: its marketplace id and
    /// its descriptor, images pinned.
    pub(super) async fn fetch_version(
        &self,
        name: &str,
        version: &str,
    ) -> Result<(String, Descriptor), Error> {
        let versions = self
            .marketplace
            .versions(name)
            .await
            .map_err(|status| Error::MarketplaceUnavailable(status.message().to_owned()))?;
        let Some(found) = versions.into_iter().find(|a| a.version == version) else {
            return Err(Error::AddonNotFound(format!("{name}@{version}")));
        };
        let id = found.id.clone();
        Ok((id.clone(), approved(&id, found)?))
    }

    pub(super) async fn fetch_approved(&self, marketplace_id: &str) -> Result<Descriptor, Error> {
        let addon = match self.marketplace.get(marketplace_id).await {
            Ok(addon) => addon,
            Err(status) if status.code() == Code::NotFound => {
                return Err(Error::AddonNotFound(marketplace_id.to_owned()));
            }
            Err(status) => return Err(Error::MarketplaceUnavailable(status.message().to_owned())),
        };
        approved(marketplace_id, addon)
    }
}

/// The descriptor of marketplace addon `marketplace_id`, if it is approved
/// with every image pinned.
pub(super) fn approved(marketplace_id: &str, addon: mpb::Addon) -> Result<Descriptor, Error> {
    let status = mpb::AddonStatus::try_from(addon.status).unwrap_or_default();
    if status != mpb::AddonStatus::Approved {
        return Err(Error::NotApproved {
            marketplace_id: marketplace_id.to_owned(),
            status: status.as_str_name().to_owned(),
        });
    }
    let descriptor = Descriptor::from_proto(addon);
    if let Some(service) = descriptor
        .services
        .iter()
        .find(|s| s.resolved_image.is_none())
    {
        return Err(Error::ImageNotPinned {
            marketplace_id: marketplace_id.to_owned(),
            service: service.service_name.clone(),
        });
    }
    Ok(descriptor)
}
