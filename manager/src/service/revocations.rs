//! Revocations: the manager follows every addon of the marketplace and,
//! when one is revoked, flags each installation of it and, under
//! `--on-revoke uninstall`, uninstalls it. Installs and upgrades to a
//! revoked addon are refused by the approval check itself.

use std::time::Duration;

use addons_backoff::Backoff;
use addons_server_kit::Shutdown;
use futures::StreamExt as _;

use super::*;
use crate::{config::OnRevoke, model::Revocation};

impl Manager {
    /// Follows the marketplace's addons until `shutdown` fires, applying
    /// each revocation to the installations of the addon.
    pub fn spawn_revocations(&self, on_revoke: OnRevoke, shutdown: Shutdown) {
        let core = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = shutdown.fired() => {}
                () = core.follow_revocations(on_revoke) => {}
            }
        });
    }

    async fn follow_revocations(&self, on_revoke: OnRevoke) {
        let backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
        let mut failures = 0_u32;
        // The last sequence seen: a watch again resumes after it.
        let mut since = 0_u64;
        loop {
            match self.marketplace.watch(since).await {
                Ok(mut events) => {
                    while let Some(event) = events.next().await {
                        let event = match event {
                            Ok(event) => event,
                            Err(status) => {
                                if status.code() == Code::OutOfRange {
                                    since = 0;
                                }
                                tracing::warn!(error = %status.message(), "the marketplace's addon watch broke; watching again");
                                break;
                            }
                        };
                        failures = 0;
                        if let Some(addon) = &event.addon
                            && addon.status() == mpb::AddonStatus::Revoked
                            && let Err(err) = self.apply_revocation(addon, on_revoke).await
                        {
                            // Everything again, from the current state.
                            tracing::warn!(addon = %addon.id, error = %err, "cannot apply a revocation; watching again");
                            since = 0;
                            break;
                        }
                        if event.sequence > 0 {
                            since = event.sequence;
                        }
                    }
                }
                Err(status) => {
                    tracing::debug!(error = %status.message(), "cannot watch the marketplace's addons");
                }
            }
            failures = failures.saturating_add(1);
            tokio::time::sleep(backoff.jittered(failures.saturating_sub(1))).await;
        }
    }

    /// Flags every installation of the revoked `addon` and, under
    /// `uninstall`, uninstalls it. Flagged ones are left as they are.
    pub(crate) async fn apply_revocation(
        &self,
        addon: &mpb::Addon,
        on_revoke: OnRevoke,
    ) -> Result<(), Error> {
        let reason = addon
            .revocation
            .as_ref()
            .map(|r| r.reason.clone())
            .unwrap_or_default();
        let installations = self.installations.list_records().await?;
        for record in installations {
            if record.value.marketplace_id != addon.id || record.value.revoked.is_some() {
                continue;
            }
            let id = record.value.id.clone();
            let uninstall = on_revoke == OnRevoke::Uninstall
                && !matches!(
                    record.value.status,
                    InstallationStatus::Disabling | InstallationStatus::Disabled
                );
            self.installations
                .modify_at(&id, None, |installation| {
                    if installation.revoked.is_some() {
                        return Ok(false);
                    }
                    installation.revoked = Some(Revocation {
                        reason: reason.clone(),
                        time: chrono::Utc::now(),
                        uninstalled: uninstall,
                    });
                    installation.update_time = chrono::Utc::now();
                    Ok(true)
                })
                .await
                .map_err(Error::not_found_as(&id))?;
            tracing::warn!(installation = %id, addon = %addon.id, %reason, uninstall, "the addon of an installation was revoked");
            if uninstall {
                match self.uninstall(&id, false, None).await {
                    Ok(_) | Err(Error::NotFound(_)) => {}
                    Err(err) => return Err(err),
                }
            }
        }
        Ok(())
    }
}
