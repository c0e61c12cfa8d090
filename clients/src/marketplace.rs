//! The marketplace client: publish, get, list (every page), delete,
//! reverify and watch (resumed after a dropped stream).

use futures::{Stream, StreamExt as _};
use oakestra_addons_proto::marketplace::v1::{
    self as pb, marketplace_service_client::MarketplaceServiceClient,
};
use std::time::Duration;

use tonic::transport::Channel;

use crate::{
    ClientError, ClientOptions, RetryPolicy,
    watch::{Cursor, new_request_id, resumed},
};

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
                pb::AddonStatus::Revoked,
            ],
            name: None,
        }
    }
}

typed_client!(
    MarketplaceClient,
    MarketplaceServiceClient,
    "the marketplace"
);

impl MarketplaceClient {
    /// Publishes an addon; it starts under review. Retried on
    /// `UNAVAILABLE` with one `request_id`, so it is published once.
    pub async fn publish(&self, addon: pb::Addon) -> Result<pb::Addon, ClientError> {
        let request = pb::PublishAddonRequest {
            addon: Some(addon),
            request_id: new_request_id(),
        };
        let response = self
            .call(request, |mut c, r| async move { c.publish_addon(r).await })
            .await?;
        Ok(response.addon.unwrap_or_default())
    }

    /// The addon with `id`, whatever its status.
    pub async fn get(&self, id: &str) -> Result<pb::Addon, ClientError> {
        let request = pb::GetAddonRequest { id: id.to_owned() };
        let response = self
            .call(request, |mut c, r| async move { c.get_addon(r).await })
            .await?;
        Ok(response.addon.unwrap_or_default())
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
        self.call(request, |mut c, r| async move { c.list_addons(r).await })
            .await
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

    /// Deletes the addon. Retried on `UNAVAILABLE` with one `request_id`
    /// (a retry after a lost answer succeeds); a new call after the addon is
    /// gone answers `NOT_FOUND`.
    pub async fn delete(&self, id: &str) -> Result<(), ClientError> {
        let request = pb::DeleteAddonRequest {
            id: id.to_owned(),
            request_id: new_request_id(),
            expected_revision: None,
        };
        self.call(request, |mut c, r| async move { c.delete_addon(r).await })
            .await?;
        Ok(())
    }

    /// Revokes the addon with `reason` (reviewer or admin).
    pub async fn revoke(&self, id: &str, reason: &str) -> Result<pb::Addon, ClientError> {
        let request = pb::RevokeAddonRequest {
            id: id.to_owned(),
            reason: reason.to_owned(),
            request_id: new_request_id(),
            expected_revision: None,
        };
        let response = self
            .call(request, |mut c, r| async move { c.revoke_addon(r).await })
            .await?;
        Ok(response.addon.unwrap_or_default())
    }

    /// Puts the addon back under review and verifies it again.
    pub async fn reverify(&self, id: &str) -> Result<pb::Addon, ClientError> {
        let request = pb::ReverifyAddonRequest {
            id: id.to_owned(),
            request_id: new_request_id(),
            expected_revision: None,
        };
        let response = self
            .call(request, |mut c, r| async move { c.reverify_addon(r).await })
            .await?;
        Ok(response.addon.unwrap_or_default())
    }

    /// The addon's states as they change, starting with the current one.
    /// A dropped stream is reopened (with backoff) from the last sequence
    /// received, so no change is lost or repeated; the stream ends after the
    /// addon's deletion (its last state) or on a definite error.
    pub fn watch(
        &self,
        id: &str,
    ) -> impl Stream<Item = Result<pb::Addon, ClientError>> + Send + 'static {
        let client = self.clone();
        let id = id.to_owned();
        resumed(
            self.retry,
            move |since_revision| {
                let mut inner = client.inner.clone();
                let id = id.clone();
                async move {
                    let stream = inner
                        .watch_addon(pb::WatchAddonRequest { id, since_revision })
                        .await?
                        .into_inner();
                    Ok(stream.map(|item| item.map(WatchedAddon)))
                }
            },
            |item: &WatchedAddon| Cursor {
                sequence: item.0.sequence,
                marker: item.0.in_sync,
                last: item.0.r#type() == pb::ChangeType::Deleted,
            },
        )
        .map(|item| item.map(|watched| watched.0.addon.unwrap_or_default()))
    }
}

/// One message of a marketplace watch.
#[derive(Debug)]
struct WatchedAddon(pb::WatchAddonResponse);
