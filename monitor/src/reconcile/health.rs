//! Health checks of the tracked services: due probes started, results
//! taken, unhealthy tasks stopped.

use super::*;

impl<R: Runtime, N: Network> Reconciler<R, N> {
    /// Runs the health checks of the running services that declare one:
    /// takes finished probes, starts due ones, shows the health in each
    /// status, and stops the task of a service found unhealthy (its exit
    /// then counts against the restart policy). Returns when the next
    /// probe is due.
    pub(super) async fn check_health(
        &mut self,
        desired: &pb::DesiredState,
    ) -> Result<Option<Instant>, MonitorError> {
        let now = Instant::now();
        self.health.collect(now);
        let mut wake: Option<Instant> = None;
        let mut checked = BTreeSet::new();
        let wanted: Vec<(String, String, addons_descriptor::HealthCheck)> = desired
            .installations
            .iter()
            .filter(|i| i.presence() == DesiredPresence::Running)
            .flat_map(|i| {
                i.addon
                    .iter()
                    .flat_map(|a| &a.services)
                    .filter_map(move |s| {
                        let check = addons_descriptor::Service::from(s.clone()).health_check?;
                        Some((i.installation_id.clone(), s.service_name.clone(), check))
                    })
            })
            .collect();
        for (installation, service, check) in wanted {
            let Some((id, tracked)) = self.tracked.iter().find(|(id, t)| {
                t.installation_id == installation
                    && t.status.service_name == service
                    && self.current.contains(*id)
            }) else {
                continue;
            };
            if tracked.status.phase() != pb::ServicePhase::Running {
                continue;
            }
            let id = id.clone();
            let crate::runtime::TaskState::Running(pid) = self.cx.runtime.task_state(&id).await?
            else {
                continue;
            };
            self.health.track(&id, pid, &check, now);
            checked.insert(id.clone());
            if let Some(next) = self.health.probe_if_due(&id, now, &self.cx.runtime) {
                wake = Some(wake.map_or(next, |w| w.min(next)));
            }
            let Some(state) = self.health.get(&id) else {
                continue;
            };
            let (health, error) = (state.health, state.last_error.clone());
            let Some(tracked) = self.tracked.get_mut(&id) else {
                continue;
            };
            tracked.status.health = match health {
                Health::Starting => pb::ServiceHealth::Starting,
                Health::Healthy => pb::ServiceHealth::Healthy,
                Health::Unhealthy => pb::ServiceHealth::Unhealthy,
            }
            .into();
            if health == Health::Unhealthy && !self.unhealthy_stops.contains_key(&id) {
                let reason = format!("unhealthy: {error}");
                tracked.set(pb::ServicePhase::Running, reason.clone());
                tracing::warn!(container = %id, %reason, "stopping an unhealthy service");
                self.unhealthy_stops.insert(id.clone(), reason);
                self.cx
                    .runtime
                    .stop_task(&id, self.cx.options.stop_grace)
                    .await?;
            }
        }
        self.health.retain(|id| checked.contains(id));
        self.unhealthy_stops
            .retain(|id, _| self.tracked.contains_key(id));
        Ok(wake)
    }
}
