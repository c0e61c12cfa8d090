//! The manager's domain core: what each API call does, on records. Here
//! install, uninstall and the reads; `admission.rs` what an install may be
//! given, `marketplace.rs` the addons it is made from, `upgrades.rs`
//! upgrades, rollbacks and their deadlines.

use anyhow::Context as _;
use std::{
    collections::{BTreeMap, HashSet},
    time::Duration,
};

use addons_descriptor::{
    Descriptor, Privilege,
    policy::{CoreRules, Policy, Violation},
    privileges,
};
use addons_store::{Event, Filter, FollowEnd, Page, Start, Versioned};
use oakestra_addons_proto::marketplace::v1::{
    self as mpb, marketplace_service_client::MarketplaceServiceClient,
};
use tokio::sync::mpsc;
use tonic::{Code, service::interceptor::InterceptedService, transport::Channel};

use crate::{
    Error,
    model::{Installation, InstallationStatus, Plane, Release, ReleaseOutcome},
    records::Installations,
    rollout::{self, NewRelease, RolloutOptions},
    status,
};

mod admission;
mod marketplace;
mod revocations;
mod upgrades;

use self::admission::check_accepted;
pub use self::{marketplace::AddonSource, upgrades::Rollout};

/// Listing page size when the request names none.
const DEFAULT_PAGE_SIZE: usize = 50;

/// Largest listing page.
const MAX_PAGE_SIZE: usize = 500;

type MarketplaceClient =
    MarketplaceServiceClient<InterceptedService<Channel, addons_server_kit::Authorize>>;

/// An install, as [`Manager::install`] takes it.
#[derive(Debug, Clone, Default)]
pub struct Install<'a> {
    /// The approved addon.
    pub marketplace_id: &'a str,
    /// Keep a replaced core component stopped when its replacement fails.
    pub keep_core_stopped_on_failure: bool,
    /// Privileges the caller accepts.
    pub accepted: Vec<Privilege>,
    /// Labels a node needs to run it.
    pub node_selector: BTreeMap<String, String>,
    /// The install's own `request_id`, if it has one: a live installation
    /// of the addon made by the same request is returned as it is.
    pub request_id: Option<&'a str>,
    /// Who asked.
    pub requested_by: &'a str,
}

/// The manager over its store and the marketplace. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Manager {
    installations: Installations,
    marketplace: std::sync::Arc<dyn AddonSource>,
    plane: Plane,
    /// Held from the service-name check to the insert, so two installs
    /// claiming the same names (and so the same containers and core
    /// components) cannot both pass. The manager is the only writer of
    /// installations, so an in-process lock makes it atomic.
    claims: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// What may be granted at all.
    policy: std::sync::Arc<Policy>,
    /// Ports no addon may publish: the manager's own.
    reserved_ports: Vec<u16>,
}

impl Manager {
    /// The manager of `plane`, over `store`, installing from the marketplace
    /// at `marketplace_url`. The marketplace is connected lazily, so the
    /// manager starts even when the marketplace does not run yet.
    pub async fn new(
        installations: Installations,
        marketplace_url: &str,
        credentials: &addons_server_kit::ClientCredentials,
        plane: Plane,
        policy: Policy,
        reserved_ports: Vec<u16>,
    ) -> anyhow::Result<Self> {
        let channel = credentials
            .endpoint(marketplace_url)
            .with_context(|| format!("invalid marketplace URL `{marketplace_url}`"))?
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(10))
            .connect_lazy();
        let marketplace =
            MarketplaceServiceClient::with_interceptor(channel, credentials.authorize()?);
        Ok(Self::with_source(
            installations,
            std::sync::Arc::new(marketplace::GrpcMarketplace(marketplace)),
            plane,
            policy,
            reserved_ports,
        ))
    }

    /// The manager of `plane`, installing addons from `source`.
    pub fn with_source(
        installations: Installations,
        source: std::sync::Arc<dyn AddonSource>,
        plane: Plane,
        policy: Policy,
        reserved_ports: Vec<u16>,
    ) -> Self {
        Self {
            installations,
            marketplace: source,
            plane,
            claims: Default::default(),
            policy: std::sync::Arc::new(policy),
            reserved_ports,
        }
    }

    /// Installs an approved addon: snapshots its descriptor, images pinned.
    /// `request_id` is the install's own, if it has one: a live installation
    /// of the addon made by the same request is returned as it is.
    ///
    /// The `accepted` privileges must cover everything the addon needs, and
    /// the manager's policy must allow it; both are checked before anything
    /// is written.
    pub async fn install(&self, install: Install<'_>) -> Result<Versioned<Installation>, Error> {
        let Install {
            marketplace_id,
            keep_core_stopped_on_failure,
            accepted,
            node_selector,
            request_id,
            requested_by,
        } = install;
        check_accepted(&accepted)?;
        let violations =
            addons_descriptor::labels::validate_labels(&node_selector, "node_selector");
        if !violations.is_empty() {
            return Err(Error::Invalid(violations));
        }
        let addon = self.fetch_approved(marketplace_id).await?;
        let mut accepted = accepted;
        accepted.extend(self.admit(
            marketplace_id,
            &addon,
            keep_core_stopped_on_failure,
            &accepted,
        )?);
        let _claims = self.claims.lock().await;
        self.check_service_names(marketplace_id, None, &addon)
            .await?;
        let now = chrono::Utc::now();
        let first = Release {
            number: 1,
            marketplace_id: marketplace_id.to_owned(),
            addon: addon.clone(),
            granted_privileges: accepted.clone(),
            create_time: now,
            requested_by: requested_by.to_owned(),
            outcome: ReleaseOutcome::Deployed,
            reason: "installed".to_owned(),
            rollback_of: None,
        };
        let installation = Installation {
            id: addons_store::new_id(),
            marketplace_id: marketplace_id.to_owned(),
            addon,
            plane: self.plane,
            status: InstallationStatus::Installing,
            status_message: "waiting for a monitor to start the services".to_owned(),
            services: Vec::new(),
            report_sequences: Default::default(),
            changed: Vec::new(),
            purge_requested: false,
            keep_core_stopped_on_failure,
            granted_privileges: accepted,
            request_id: request_id.map(str::to_owned),
            create_time: now,
            update_time: now,
            release: 1,
            history: vec![first],
            rollout: None,
            rolled_back: None,
            revoked: None,
            node_selector,
            unconfirmed_nodes: Vec::new(),
            trace_parent: addons_server_kit::current_traceparent(),
        };
        match self.installations.insert(installation).await {
            Ok(stored) => Ok(stored),
            Err(addons_store::Error::AlreadyExists { .. }) => {
                match self.installations.by_unique_key(marketplace_id).await? {
                    // A retry of the caller's own install; another
                    // caller's request_id is not theirs to reuse.
                    Some(made)
                        if request_id.is_some()
                            && made.value.request_id.as_deref() == request_id
                            && made
                                .value
                                .history
                                .first()
                                .is_some_and(|first| first.requested_by == requested_by) =>
                    {
                        Ok(made)
                    }
                    holder => Err(Error::AlreadyInstalled {
                        marketplace_id: marketplace_id.to_owned(),
                        installation_id: holder.map(|i| i.value.id).unwrap_or_default(),
                    }),
                }
            }
            Err(err) => Err(err.into()),
        }
    }

    /// Starts uninstalling: `DISABLING` until the monitors report every
    /// service removed, then `DISABLED`. With `purge`, a `DISABLED` record is
    /// deleted, now or as soon as it gets there, and the monitors delete the
    /// addon's named volumes. Returns the record after the call, or `None`
    /// when it was deleted.
    pub async fn uninstall(
        &self,
        id: &str,
        purge: bool,
        expected_revision: Option<u64>,
    ) -> Result<Option<Versioned<Installation>>, Error> {
        // Taken here: the write may run on another task.
        let trace_parent = addons_server_kit::current_traceparent();
        let record = self
            .installations
            .modify_at(id, expected_revision, |installation| {
                let mut changed = false;
                if purge && !installation.purge_requested {
                    installation.purge_requested = true;
                    changed = true;
                }
                if !matches!(
                    installation.status,
                    InstallationStatus::Disabling | InstallationStatus::Disabled
                ) {
                    installation.status = InstallationStatus::Disabling;
                    // Nothing reported running anywhere: nothing to wait for.
                    status::recompute(installation);
                    changed = true;
                }
                if changed {
                    installation.update_time = chrono::Utc::now();
                    installation.trace_parent.clone_from(&trace_parent);
                }
                Ok(changed)
            })
            .await
            .map_err(Error::not_found_as(id))?;
        if self.installations.purge_if_done(&record).await? {
            return Ok(None);
        }
        Ok(Some(record))
    }

    /// One installation.
    pub async fn get(&self, id: &str) -> Result<Versioned<Installation>, Error> {
        self.installations
            .get(id)
            .await?
            .ok_or_else(|| Error::NotFound(id.to_owned()))
    }

    /// A page of installations; no statuses means all.
    pub async fn list(
        &self,
        statuses: &[InstallationStatus],
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<Page<Installation>, Error> {
        let filter = Filter {
            statuses: statuses.iter().map(|s| s.as_str().to_owned()).collect(),
            ..Filter::default()
        };
        let page_size = match page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        Ok(self
            .installations
            .list(&filter, page_size, page_token)
            .await?)
    }

    /// Fills a watched record's `services`: every node's statuses, now.
    pub(crate) fn hydrate(&self, installation: &mut Installation) {
        self.installations.hydrate(installation);
    }

    /// Sends the current state of the selected installations (all when `ids`
    /// is empty; whole, every node's statuses in `services`), or from a
    /// cursor the changes after it (as stored: the statuses each write
    /// changed in `changed`), then the in-sync
    /// marker, then every change, until `out` closes, `stop` fires or the
    /// watcher falls behind (rather than slowing writers or other watchers).
    pub async fn watch(
        &self,
        ids: Vec<String>,
        start: Start,
        out: mpsc::Sender<Event<Installation>>,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<FollowEnd, Error> {
        let selected: HashSet<String> = ids.iter().cloned().collect();
        let whole = &self.installations;
        let result = self
            .installations
            .follow(
                start,
                async || {
                    if ids.is_empty() {
                        return whole.list_all(&Filter::default()).await;
                    }
                    let mut found = Vec::new();
                    for id in &ids {
                        found.push(whole.require(id).await?);
                    }
                    Ok(found)
                },
                |change| selected.is_empty() || selected.contains(&change.record.value.id),
                out,
                stop,
            )
            .await;
        match result {
            Err(addons_store::Error::NotFound { id, .. }) => Err(Error::NotFound(id)),
            other => Ok(other?),
        }
    }
}

#[cfg(test)]
mod tests;
