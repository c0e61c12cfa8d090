//! The marketplace client: publish, get, list (every page), delete,
//! reverify and watch (resumed after a dropped stream).

use futures::{Stream, StreamExt as _};
use oakestra_addons_proto::marketplace::v1::{
    self as pb, marketplace_service_client::MarketplaceServiceClient,
};
use std::time::Duration;

use tonic::transport::Channel;

use crate::{ClientError, ClientOptions, RetryPolicy, watch::resumed};

/// A typed client of the marketplace.
#[derive(Debug, Clone)]
pub struct MarketplaceClient {
    inner: MarketplaceServiceClient<Channel>,
    retry: RetryPolicy,
    timeout: Duration,
}

/// Which addons a listing returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddonFilter {
    /// Statuses to include; empty means approved only (the server's
    /// default), see [`AddonFilter::all`].
    pub statuses: Vec<pb::AddonStatus>,
    /// Only addons with this exact name.
    pub name: Option<String>,
}

impl AddonFilter {
    /// Every addon, whatever its status.
    pub fn all() -> Self {
        Self {
            statuses: vec![
                pb::AddonStatus::UnderReview,
                pb::AddonStatus::Approved,
                pb::AddonStatus::FailedVerification,
            ],
            name: None,
        }
    }
}

impl MarketplaceClient {
    /// A client of the marketplace at `url`.
    pub fn connect(url: &str, options: &ClientOptions) -> Result<Self, ClientError> {
        Ok(Self::new(crate::channel_with(url, options)?, options))
    }

    /// A client on an existing channel.
    pub fn new(channel: Channel, options: &ClientOptions) -> Self {
        Self {
            inner: MarketplaceServiceClient::new(channel),
            retry: options.retry,
            timeout: options.timeout,
        }
    }

    /// Publishes an addon; it starts under review. Not retried: a lost
    /// answer could mean it was published.
    pub async fn publish(&self, addon: pb::Addon) -> Result<pb::Addon, ClientError> {
        let response = crate::retry::within(
            self.timeout,
            self.inner
                .clone()
                .publish_addon(pb::PublishAddonRequest { addon: Some(addon) }),
        )
        .await?;
        Ok(response.into_inner().addon.unwrap_or_default())
    }

    /// The addon with `id`, whatever its status.
    pub async fn get(&self, id: &str) -> Result<pb::Addon, ClientError> {
        let response = self
            .retry
            .run(|| {
                let mut inner = self.inner.clone();
                let timeout = self.timeout;
                let request = pb::GetAddonRequest { id: id.to_owned() };
                crate::retry::within(timeout, async move { inner.get_addon(request).await })
            })
            .await?;
        Ok(response.into_inner().addon.unwrap_or_default())
    }

    /// One page of addons.
    pub async fn list_page(
        &self,
        filter: &AddonFilter,
        page_size: i32,
        page_token: &str,
    ) -> Result<pb::ListAddonsResponse, ClientError> {
        let request = pb::ListAddonsRequest {
            statuses: filter.statuses.iter().map(|s| i32::from(*s)).collect(),
            name: filter.name.clone().unwrap_or_default(),
            page_size,
            page_token: page_token.to_owned(),
        };
        let response = self
            .retry
            .run(|| {
                let mut inner = self.inner.clone();
                let timeout = self.timeout;
                let request = request.clone();
                crate::retry::within(timeout, async move { inner.list_addons(request).await })
            })
            .await?;
        Ok(response.into_inner())
    }

    /// Every matching addon, page after page.
    pub fn list(
        &self,
        filter: AddonFilter,
    ) -> impl Stream<Item = Result<pb::Addon, ClientError>> + Send + 'static {
        let client = self.clone();
        crate::paging::every_page(move |token| {
            let client = client.clone();
            let filter = filter.clone();
            async move {
                let page = client.list_page(&filter, 0, &token).await?;
                Ok((page.addons, page.next_page_token))
            }
        })
    }

    /// Deletes the addon; deleting it again answers `NOT_FOUND`.
    pub async fn delete(&self, id: &str) -> Result<(), ClientError> {
        crate::retry::within(
            self.timeout,
            self.inner
                .clone()
                .delete_addon(pb::DeleteAddonRequest { id: id.to_owned() }),
        )
        .await?;
        Ok(())
    }

    /// Puts the addon back under review and verifies it again.
    pub async fn reverify(&self, id: &str) -> Result<pb::Addon, ClientError> {
        let response = self
            .retry
            .run(|| {
                let mut inner = self.inner.clone();
                let timeout = self.timeout;
                let request = pb::ReverifyAddonRequest { id: id.to_owned() };
                crate::retry::within(timeout, async move { inner.reverify_addon(request).await })
            })
            .await?;
        Ok(response.into_inner().addon.unwrap_or_default())
    }

    /// The addon's states as they change, starting with the current one.
    /// A dropped stream is reopened (with backoff) and states already seen
    /// (by revision) are skipped; the stream ends on a definite error.
    pub fn watch(
        &self,
        id: &str,
    ) -> impl Stream<Item = Result<pb::Addon, ClientError>> + Send + 'static {
        let client = self.clone();
        let id = id.to_owned();
        resumed(
            self.retry,
            move || {
                let mut inner = client.inner.clone();
                let id = id.clone();
                async move {
                    let stream = inner
                        .watch_addon(pb::WatchAddonRequest { id })
                        .await?
                        .into_inner();
                    Ok(stream.map(|item| item.map(|r| r.addon.unwrap_or_default())))
                }
            },
            |addon: &pb::Addon| (addon.id.clone(), addon.revision),
        )
    }
}
