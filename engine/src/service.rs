//! The manager's domain core: what each API call does, on records.

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

/// Listing page size when the request names none.
const DEFAULT_PAGE_SIZE: usize = 50;
/// Largest listing page.
const MAX_PAGE_SIZE: usize = 500;

type MarketplaceClient =
    MarketplaceServiceClient<InterceptedService<Channel, addons_server_kit::Authorize>>;

/// The manager over its store and the marketplace. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Manager {
    installations: Installations,
    marketplace: MarketplaceClient,
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

/// Most privileges one install may accept.
pub const MAX_ACCEPTED_PRIVILEGES: usize = 1024;

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
        Ok(Self {
            installations,
            marketplace,
            plane,
            claims: Default::default(),
            policy: std::sync::Arc::new(policy),
            reserved_ports,
        })
    }

    /// Installs an approved addon: snapshots its descriptor, images pinned.
    /// `request_id` is the install's own, if it has one: a live installation
    /// of the addon made by the same request is returned as it is.
    ///
    /// The `accepted` privileges must cover everything the addon needs, and
    /// the manager's policy must allow it; both are checked before anything
    /// is written.
    pub async fn install(
        &self,
        marketplace_id: &str,
        keep_core_stopped_on_failure: bool,
        accepted: Vec<Privilege>,
        node_selector: BTreeMap<String, String>,
        request_id: Option<&str>,
        requested_by: &str,
    ) -> Result<Versioned<Installation>, Error> {
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
            node_selector,
            unconfirmed_nodes: Vec::new(),
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

    /// Whether `addon` may run with `granted`: the grants, with what the
    /// policy's `consent` gives, cover what it needs, and the manager's
    /// policy allows it. Returns what the consent gives (marked, and in the
    /// audit log), to be granted beside `granted`.
    fn admit(
        &self,
        marketplace_id: &str,
        addon: &Descriptor,
        keep_core_stopped_on_failure: bool,
        granted: &[Privilege],
    ) -> Result<Vec<Privilege>, Error> {
        let needs = privileges::for_install(addon, keep_core_stopped_on_failure);
        let by_policy = self
            .policy
            .consent
            .grants(&addon.name, &privileges::missing(&needs, granted));
        let missing: Vec<Privilege> = privileges::missing(&needs, granted)
            .into_iter()
            .filter(|need| !by_policy.iter().any(|grant| grant.covers(need)))
            .collect();
        if !missing.is_empty() {
            return Err(Error::PrivilegesNotAccepted {
                marketplace_id: marketplace_id.to_owned(),
                missing,
            });
        }
        let mut violations: Vec<Violation> = self.policy.check_all(
            &needs,
            &self.reserved_ports,
            &self.policy.core_rules(CoreRules::any()),
        );
        violations.extend(
            addon
                .services
                .iter()
                .filter_map(|service| self.policy.limits(service).err()),
        );
        if !violations.is_empty() {
            return Err(Error::PolicyViolation {
                marketplace_id: marketplace_id.to_owned(),
                violations,
            });
        }
        for grant in &by_policy {
            tracing::info!(
                target: "audit",
                marketplace_id,
                addon = %addon.name,
                privilege = %grant,
                granted_by = "policy",
                "privilege granted by the policy's consent",
            );
        }
        Ok(by_policy)
    }

    /// Upgrades installation `id` to `version` of its addon: checks it like
    /// an install (the grants it already has plus `accepted` must cover the
    /// new version) and starts the rollout of a new release.
    pub async fn upgrade(
        &self,
        id: &str,
        version: &str,
        accepted: Vec<Privilege>,
        options: RolloutOptions,
        expected_revision: Option<u64>,
        requested_by: &str,
    ) -> Result<Versioned<Installation>, Error> {
        check_accepted(&accepted)?;
        let current = self.get(id).await?;
        check_can_roll_out(&current.value)?;
        if current.value.addon.version == version {
            return Err(Error::AlreadyAtVersion {
                id: id.to_owned(),
                version: version.to_owned(),
            });
        }
        let (marketplace_id, addon) = self
            .fetch_version(&current.value.addon.name, version)
            .await?;
        let mut granted = current.value.granted_privileges.clone();
        granted.extend(accepted);
        let by_policy = self.admit(
            &marketplace_id,
            &addon,
            current.value.keep_core_stopped_on_failure,
            &granted,
        )?;
        granted.extend(by_policy);
        let new = NewRelease {
            marketplace_id,
            addon,
            granted_privileges: granted,
            requested_by: requested_by.to_owned(),
            rollback_of: None,
        };
        self.roll_out(id, new, options, expected_revision).await
    }

    /// Returns installation `id` to release `release` of its history (0:
    /// the one before the current release), as a new release.
    pub async fn rollback(
        &self,
        id: &str,
        release: u64,
        accepted: Vec<Privilege>,
        options: RolloutOptions,
        expected_revision: Option<u64>,
        requested_by: &str,
    ) -> Result<Versioned<Installation>, Error> {
        check_accepted(&accepted)?;
        let mut current = self.get(id).await?.value;
        check_can_roll_out(&current)?;
        rollout::ensure_history(&mut current);
        let target = if release == 0 {
            current
                .history
                .iter()
                .rev()
                .find(|r| r.number < current.release)
        } else {
            rollout::find(&current, release)
        };
        let Some(target) = target.filter(|r| r.number != current.release).cloned() else {
            return Err(Error::ReleaseNotFound {
                id: id.to_owned(),
                release,
                kept: current.history.iter().map(|r| r.number).collect(),
                current: current.release,
            });
        };
        let mut granted = target.granted_privileges.clone();
        granted.extend(accepted);
        let by_policy = self.admit(
            &target.marketplace_id,
            &target.addon,
            current.keep_core_stopped_on_failure,
            &granted,
        )?;
        granted.extend(by_policy);
        let new = NewRelease {
            marketplace_id: target.marketplace_id,
            addon: target.addon,
            granted_privileges: granted,
            requested_by: requested_by.to_owned(),
            rollback_of: Some(target.number),
        };
        self.roll_out(id, new, options, expected_revision).await
    }

    /// Starts rolling `new` out on installation `id`, after the same name
    /// and port checks as an install, in one conditional write.
    async fn roll_out(
        &self,
        id: &str,
        new: NewRelease,
        options: RolloutOptions,
        expected_revision: Option<u64>,
    ) -> Result<Versioned<Installation>, Error> {
        let _claims = self.claims.lock().await;
        self.check_service_names(&new.marketplace_id, Some(id), &new.addon)
            .await?;
        let mut refused = None;
        let result = self
            .installations
            .modify_at(id, expected_revision, |installation| {
                if let Err(err) = check_can_roll_out(installation) {
                    refused = Some(err);
                    return Ok(false);
                }
                let now = chrono::Utc::now();
                rollout::begin(installation, new.clone(), options, now);
                status::recompute(installation);
                installation.update_time = now;
                Ok(true)
            })
            .await
            .map_err(|err| match err {
                addons_store::Error::NotFound { .. } => Error::NotFound(id.to_owned()),
                err => err.into(),
            })?;
        match refused {
            Some(err) => Err(err),
            None => Ok(result),
        }
    }

    /// Checks the rollouts' deadlines every second until `shutdown` fires.
    pub fn spawn_rollout_deadlines(&self, shutdown: addons_server_kit::Shutdown) {
        let manager = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = shutdown.fired() => return,
                    _ = tick.tick() => {}
                }
                if let Err(err) = manager.check_rollout_deadlines().await {
                    tracing::warn!(error = %err, "cannot check the rollouts' deadlines");
                }
            }
        });
    }

    /// Fails rollouts whose node took longer than their deadline.
    pub async fn check_rollout_deadlines(&self) -> Result<(), Error> {
        let filter = Filter {
            statuses: vec![InstallationStatus::Upgrading.as_str().to_owned()],
            ..Filter::default()
        };
        for record in self.installations.list_all(&filter).await? {
            let now = chrono::Utc::now();
            let mut probe = record.value.clone();
            if !rollout::on_tick(&mut probe, now) {
                continue;
            }
            let result = self
                .installations
                .modify(&record.value.id, |installation| {
                    let now = chrono::Utc::now();
                    if !rollout::on_tick(installation, now) {
                        return Ok(false);
                    }
                    status::recompute(installation);
                    installation.update_time = now;
                    Ok(true)
                })
                .await;
            match result {
                Ok(stored) => {
                    tracing::warn!(id = %stored.value.id, reason = ?stored.value.rolled_back, "rollout failed at its deadline");
                }
                Err(addons_store::Error::NotFound { .. }) => {}
                Err(err) => return Err(err.into()),
            }
        }
        Ok(())
    }

    /// Approved version `version` of addon `name`: its marketplace id and
    /// its descriptor, images pinned.
    async fn fetch_version(
        &self,
        name: &str,
        version: &str,
    ) -> Result<(String, Descriptor), Error> {
        let response = self
            .marketplace
            .clone()
            .list_addons(mpb::ListAddonsRequest {
                statuses: vec![
                    mpb::AddonStatus::Approved.into(),
                    mpb::AddonStatus::UnderReview.into(),
                    mpb::AddonStatus::FailedVerification.into(),
                ],
                name: name.to_owned(),
                page_size: 500,
                page_token: String::new(),
            })
            .await
            .map_err(|status| Error::MarketplaceUnavailable(status.message().to_owned()))?;
        let Some(found) = response
            .into_inner()
            .addons
            .into_iter()
            .find(|a| a.version == version)
        else {
            return Err(Error::AddonNotFound(format!("{name}@{version}")));
        };
        let id = found.id.clone();
        Ok((id.clone(), approved(&id, found)?))
    }

    /// Containers are named `<plane>_<service_name>` on every node, so two
    /// live installations must not share a service name; nor may they
    /// publish the same host port. `except` is the installation being
    /// upgraded, whose own names are its to keep.
    async fn check_service_names(
        &self,
        marketplace_id: &str,
        except: Option<&str>,
        addon: &Descriptor,
    ) -> Result<(), Error> {
        let live = self
            .installations
            .list_all(&Filter::default())
            .await?
            .into_iter()
            .filter(|r| {
                r.value.status != InstallationStatus::Disabled
                    && r.value.marketplace_id != marketplace_id
                    && Some(r.value.id.as_str()) != except
            });
        for other in live {
            if let Some(service) = addon.services.iter().find(|s| {
                other
                    .value
                    .addon
                    .services
                    .iter()
                    .any(|o| o.service_name == s.service_name)
            }) {
                return Err(Error::ServiceNameTaken {
                    service: service.service_name.clone(),
                    installation_id: other.value.id.clone(),
                    addon: other.value.addon.name.clone(),
                });
            }
            for service in &addon.services {
                for port in &service.ports {
                    let holder = other.value.addon.services.iter().find(|o| {
                        o.ports
                            .iter()
                            .any(|p| p.host_port == port.host_port && p.protocol == port.protocol)
                    });
                    if let Some(holder) = holder {
                        return Err(Error::HostPortInUse {
                            port: format!("{}/{}", port.host_port, port.protocol),
                            service: service.service_name.clone(),
                            installation_id: other.value.id.clone(),
                            holder: holder.service_name.clone(),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    async fn fetch_approved(&self, marketplace_id: &str) -> Result<Descriptor, Error> {
        let response = self
            .marketplace
            .clone()
            .get_addon(mpb::GetAddonRequest {
                id: marketplace_id.to_owned(),
            })
            .await;
        let addon = match response {
            Ok(response) => response.into_inner().addon.unwrap_or_default(),
            Err(status) if status.code() == Code::NotFound => {
                return Err(Error::AddonNotFound(marketplace_id.to_owned()));
            }
            Err(status) => return Err(Error::MarketplaceUnavailable(status.message().to_owned())),
        };
        approved(marketplace_id, addon)
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
                }
                Ok(changed)
            })
            .await
            .map_err(|err| match err {
                addons_store::Error::NotFound { .. } => Error::NotFound(id.to_owned()),
                err => err.into(),
            })?;
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
            .records()
            .follow(
                start,
                async |_| {
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
                |_| false,
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

/// The descriptor of marketplace addon `marketplace_id`, if it is approved
/// with every image pinned.
fn approved(marketplace_id: &str, addon: mpb::Addon) -> Result<Descriptor, Error> {
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

/// Refuses a rollout while another runs or the installation goes away.
fn check_can_roll_out(installation: &Installation) -> Result<(), Error> {
    if let Some(rollout) = &installation.rollout {
        return Err(Error::RolloutInProgress {
            id: installation.id.clone(),
            release: rollout.to_release,
        });
    }
    if matches!(
        installation.status,
        InstallationStatus::Disabling | InstallationStatus::Disabled
    ) {
        return Err(Error::NotRunning {
            id: installation.id.clone(),
            status: installation.status.as_str(),
        });
    }
    Ok(())
}

/// Checks the accepted privileges of a request: bounded, each with a kind
/// and a bounded value.
fn check_accepted(accepted: &[Privilege]) -> Result<(), Error> {
    use addons_descriptor::FieldViolation;
    if accepted.len() > MAX_ACCEPTED_PRIVILEGES {
        return Err(Error::invalid(
            "accepted_privileges",
            format!("at most {MAX_ACCEPTED_PRIVILEGES} entries"),
        ));
    }
    let mut violations = Vec::new();
    for (i, grant) in accepted.iter().enumerate() {
        if grant.kind.is_none() {
            violations.push(FieldViolation::new(
                format!("accepted_privileges[{i}].kind"),
                "required (PRIVILEGE_KIND_UNSPECIFIED is not a privilege)",
            ));
        }
        if grant.value.len() > 4096 {
            violations.push(FieldViolation::new(
                format!("accepted_privileges[{i}].value"),
                "at most 4096 bytes",
            ));
        }
        if grant.service_name.len() > 63 {
            violations.push(FieldViolation::new(
                format!("accepted_privileges[{i}].service_name"),
                "at most 63 bytes",
            ));
        }
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(Error::Invalid(violations))
    }
}
