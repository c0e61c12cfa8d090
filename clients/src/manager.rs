//! The manager client: install, uninstall, get, list (every page) and
//! watch (resumed after a dropped stream).

use futures::{Stream, StreamExt as _};
use oakestra_addons_proto::engine::v1::{
    self as pb, addons_manager_service_client::AddonsManagerServiceClient,
};
use std::time::Duration;

use tonic::transport::Channel;

use crate::{
    ClientError, ClientOptions, RetryPolicy,
    watch::{Cursor, new_request_id, resumed},
};

/// How to install.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstallOptions {
    /// Leave a replaced core component stopped when its replacement fails
    /// for good.
    pub keep_core_stopped_on_failure: bool,
    /// The privileges granted: they must cover every privilege the addon
    /// needs (see the addon's `required_privileges`).
    pub accepted_privileges: Vec<pb::Privilege>,
    /// Labels a node must have to run the addon; empty: every node.
    pub node_selector: std::collections::BTreeMap<String, String>,
}

/// How an upgrade or a rollback rolls out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RolloutOptions {
    /// Privileges the release needs beyond what the installation (or, for
    /// a rollback, that release) was granted.
    pub accepted_privileges: Vec<pb::Privilege>,
    /// Nodes upgraded at once; 0 means 1.
    pub max_parallel: u32,
    /// How long each node must keep the release healthy; `None` means the
    /// manager's default (10 s).
    pub min_healthy_time: Option<Duration>,
}

impl RolloutOptions {
    fn min_healthy_time(&self) -> Option<prost_types::Duration> {
        self.min_healthy_time
            .and_then(|d| prost_types::Duration::try_from(d).ok())
    }
}

/// An upgrade or a rollback request (both carry the same rollout fields)
/// with `$options` and a new `request_id`.
macro_rules! rollout_request {
    ($request:path { $($field:ident $(: $value:expr)?),* $(,)? }, $options:expr) => {{
        let options: RolloutOptions = $options;
        $request {
            $($field $(: $value)?,)*
            min_healthy_time: options.min_healthy_time(),
            accepted_privileges: options.accepted_privileges,
            request_id: new_request_id(),
            max_parallel: options.max_parallel,
            expected_revision: None,
            progress_deadline: None,
        }
    }};
}

/// One change seen by [`ManagerClient::watch`].
#[derive(Debug, Clone, PartialEq)]
pub struct InstallationEvent {
    /// The installation as it is now (its last state when deleted).
    pub installation: pb::Installation,
    /// What happened: added (or part of the initial state), modified, or
    /// deleted (purged).
    pub change: pb::ChangeType,
    /// The change's position in the manager's change sequence.
    pub sequence: u64,
    /// It was purged.
    pub deleted: bool,
}

typed_client!(
    ManagerClient,
    AddonsManagerServiceClient,
    "the Addons Manager"
);

impl ManagerClient {
    /// Installs an approved addon. Retried on `UNAVAILABLE` with one
    /// `request_id`, so the manager installs it once however often the
    /// request arrives.
    pub async fn install(
        &self,
        marketplace_id: &str,
        options: InstallOptions,
    ) -> Result<pb::Installation, ClientError> {
        let request = pb::InstallAddonRequest {
            marketplace_id: marketplace_id.to_owned(),
            keep_core_stopped_on_failure: options.keep_core_stopped_on_failure,
            request_id: new_request_id(),
            accepted_privileges: options.accepted_privileges,
            node_selector: options.node_selector,
        };
        let response = self
            .call(request, |mut c, r| async move { c.install_addon(r).await })
            .await?;
        Ok(response.installation.unwrap_or_default())
    }

    /// Starts upgrading installation `id` to `version` of its addon.
    /// Retried on `UNAVAILABLE` with one `request_id`.
    pub async fn upgrade(
        &self,
        id: &str,
        version: &str,
        options: RolloutOptions,
    ) -> Result<pb::Installation, ClientError> {
        let request = rollout_request!(
            pb::UpgradeInstallationRequest {
                id: id.to_owned(),
                version: version.to_owned(),
            },
            options
        );
        let response = self
            .call(request, |mut c, r| async move {
                c.upgrade_installation(r).await
            })
            .await?;
        Ok(response.installation.unwrap_or_default())
    }

    /// Starts returning installation `id` to release `release` (0: the one
    /// before the current). Retried on `UNAVAILABLE` with one `request_id`.
    pub async fn rollback(
        &self,
        id: &str,
        release: u64,
        options: RolloutOptions,
    ) -> Result<pb::Installation, ClientError> {
        let request = rollout_request!(
            pb::RollbackInstallationRequest {
                id: id.to_owned(),
                release,
            },
            options
        );
        let response = self
            .call(request, |mut c, r| async move {
                c.rollback_installation(r).await
            })
            .await?;
        Ok(response.installation.unwrap_or_default())
    }

    /// Uninstalls; retried on `UNAVAILABLE` with one `request_id`, so a
    /// purge whose answer was lost succeeds on its retry.
    pub async fn uninstall(&self, id: &str, purge: bool) -> Result<pb::Installation, ClientError> {
        let request = pb::UninstallAddonRequest {
            id: id.to_owned(),
            purge,
            request_id: new_request_id(),
            expected_revision: None,
        };
        let response = self
            .call(
                request,
                |mut c, r| async move { c.uninstall_addon(r).await },
            )
            .await?;
        Ok(response.installation.unwrap_or_default())
    }

    /// The installation with `id`.
    pub async fn get(&self, id: &str) -> Result<pb::Installation, ClientError> {
        let request = pb::GetInstallationRequest { id: id.to_owned() };
        let response = self
            .call(
                request,
                |mut c, r| async move { c.get_installation(r).await },
            )
            .await?;
        Ok(response.installation.unwrap_or_default())
    }

    /// One page of installations.
    pub async fn list_page(
        &self,
        statuses: &[pb::InstallationStatus],
        page_size: i32,
        page_token: &str,
    ) -> Result<pb::ListInstallationsResponse, ClientError> {
        let request = pb::ListInstallationsRequest {
            statuses: statuses.iter().map(|s| i32::from(*s)).collect(),
            page_size,
            page_token: page_token.to_owned(),
        };
        self.call(
            request,
            |mut c, r| async move { c.list_installations(r).await },
        )
        .await
    }

    /// One page of the plane's nodes.
    pub async fn list_nodes_page(
        &self,
        page_size: i32,
        page_token: &str,
    ) -> Result<pb::ListNodesResponse, ClientError> {
        let request = pb::ListNodesRequest {
            page_size,
            page_token: page_token.to_owned(),
        };
        self.call(request, |mut c, r| async move { c.list_nodes(r).await })
            .await
    }

    /// Every node of the plane, page after page.
    pub fn list_nodes(&self) -> impl Stream<Item = Result<pb::Node, ClientError>> + Send + 'static {
        let client = self.clone();
        crate::paging::every_page(move |token| {
            let client = client.clone();
            async move {
                let page = client.list_nodes_page(0, &token).await?;
                Ok((page.nodes, page.next_page_token))
            }
        })
    }

    /// Forgets a node whose monitor is gone for good. Retried on
    /// `UNAVAILABLE`: forgetting twice only answers NOT_FOUND the second
    /// time.
    pub async fn forget_node(&self, node_id: &str) -> Result<pb::Node, ClientError> {
        let request = pb::ForgetNodeRequest {
            node_id: node_id.to_owned(),
        };
        let response = self
            .call(request, |mut c, r| async move { c.forget_node(r).await })
            .await?;
        Ok(response.node.unwrap_or_default())
    }

    /// Every installation with one of `statuses` (all when empty), page
    /// after page.
    pub fn list(
        &self,
        statuses: Vec<pb::InstallationStatus>,
    ) -> impl Stream<Item = Result<pb::Installation, ClientError>> + Send + 'static {
        let client = self.clone();
        crate::paging::every_page(move |token| {
            let client = client.clone();
            let statuses = statuses.clone();
            async move {
                let page = client.list_page(&statuses, 0, &token).await?;
                Ok((page.installations, page.next_page_token))
            }
        })
    }

    /// Changes of the installations `ids` (every installation when empty),
    /// starting with their current states. A dropped stream is reopened
    /// (with backoff) from the last sequence received, so no change is lost
    /// or repeated.
    pub fn watch(
        &self,
        ids: Vec<String>,
    ) -> impl Stream<Item = Result<InstallationEvent, ClientError>> + Send + 'static {
        let client = self.clone();
        resumed(
            self.retry,
            move |since_revision| {
                let mut inner = client.inner.clone();
                let ids = ids.clone();
                async move {
                    let stream = inner
                        .watch_installations(pb::WatchInstallationsRequest {
                            ids,
                            since_revision,
                            changed_services_only: false,
                        })
                        .await?
                        .into_inner();
                    Ok(stream.map(|item| {
                        item.map(|r| InstallationEvent {
                            change: r.r#type(),
                            sequence: r.sequence,
                            deleted: r.r#type() == pb::ChangeType::Deleted,
                            installation: r.installation.unwrap_or_default(),
                        })
                    }))
                }
            },
            |event: &InstallationEvent| Cursor {
                sequence: event.sequence,
                marker: event.change == pb::ChangeType::Unspecified,
                last: false,
            },
        )
    }
}
