//! Upgrades and rollbacks of installations: new releases rolled out node
//! by node, and the deadlines of rollouts that stall.

use super::*;

/// What an upgrade and a rollback both take.
#[derive(Debug, Clone)]
pub struct Rollout<'a> {
    /// Privileges the new release needs beyond those granted before.
    pub accepted: Vec<Privilege>,
    /// How the release is rolled out.
    pub options: RolloutOptions,
    /// The installation's revision the caller saw, if it is to be checked.
    pub expected_revision: Option<u64>,
    /// Who asked.
    pub requested_by: &'a str,
}

impl Manager {
    /// Upgrades installation `id` to `version` of its addon: checks it like
    /// an install (the grants it already has plus `accepted` must cover the
    /// new version) and starts the rollout of a new release.
    pub async fn upgrade(
        &self,
        id: &str,
        version: &str,
        rollout: Rollout<'_>,
    ) -> Result<Versioned<Installation>, Error> {
        check_accepted(&rollout.accepted)?;
        let current = self.get(id).await?.value;
        check_can_roll_out(&current)?;
        if current.addon.version == version {
            return Err(Error::AlreadyAtVersion {
                id: id.to_owned(),
                version: version.to_owned(),
            });
        }
        let (marketplace_id, addon) = self.fetch_version(&current.addon.name, version).await?;
        let grants = current.granted_privileges.clone();
        self.roll_out_release(&current, (marketplace_id, addon, grants), None, rollout)
            .await
    }

    /// Returns installation `id` to release `release` of its history (0:
    /// the one before the current release), as a new release.
    pub async fn rollback(
        &self,
        id: &str,
        release: u64,
        rollout: Rollout<'_>,
    ) -> Result<Versioned<Installation>, Error> {
        check_accepted(&rollout.accepted)?;
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
        // A release of a revoked addon never runs again. The marketplace
        // unreachable (or the addon deleted) does not block a rollback:
        // the release was approved when it was installed.
        if let Ok(addon) = self.marketplace.get(&target.marketplace_id).await
            && addon.status() == mpb::AddonStatus::Revoked
        {
            return Err(Error::NotApproved {
                marketplace_id: target.marketplace_id,
                status: mpb::AddonStatus::Revoked.as_str_name().to_owned(),
            });
        }
        let release = (
            target.marketplace_id,
            target.addon,
            target.granted_privileges,
        );
        self.roll_out_release(&current, release, Some(target.number), rollout)
            .await
    }

    /// Rolls a release (its marketplace id, addon and the grants it had)
    /// out on `current`: granted those and what `rollout` accepts, plus
    /// what the policy consents to, admitted as an install is.
    async fn roll_out_release(
        &self,
        current: &Installation,
        (marketplace_id, addon, mut granted): (String, Descriptor, Vec<Privilege>),
        rollback_of: Option<u64>,
        rollout: Rollout<'_>,
    ) -> Result<Versioned<Installation>, Error> {
        granted.extend(rollout.accepted);
        let keep_core_stopped = current.keep_core_stopped_on_failure;
        let by_policy = self.admit(&marketplace_id, &addon, keep_core_stopped, &granted)?;
        granted.extend(by_policy);
        let new = NewRelease {
            marketplace_id,
            addon,
            granted_privileges: granted,
            requested_by: rollout.requested_by.to_owned(),
            rollback_of,
        };
        self.roll_out(&current.id, new, rollout.options, rollout.expected_revision)
            .await
    }

    /// Starts rolling `new` out on installation `id`, after the same name
    /// and port checks as an install, in one conditional write.
    pub(super) async fn roll_out(
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
        // Taken here: the write may run on another task.
        let trace_parent = addons_server_kit::current_traceparent();
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
                installation.trace_parent.clone_from(&trace_parent);
                Ok(true)
            })
            .await
            .map_err(Error::not_found_as(id))?;
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
}

/// Refuses a rollout while another runs or the installation goes away.
pub(super) fn check_can_roll_out(installation: &Installation) -> Result<(), Error> {
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
