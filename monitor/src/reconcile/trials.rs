//! Release trials on this node: loaded at start, judged after each pass.

use super::*;

impl<R: Runtime, N: Network> Reconciler<R, N> {
    /// Reads the trials an earlier run of the monitor kept, once.
    pub(super) fn load_trials(&mut self) {
        if std::mem::replace(&mut self.trials_loaded, true) {
            return;
        }
        let Ok(entries) = std::fs::read_dir(self.cx.state.trials()) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match StateDir::read_json::<Trial>(&path) {
                Ok(Some(trial)) => {
                    self.trials.insert(trial.installation.clone(), trial);
                }
                Ok(None) => {}
                // Lost: the release is judged again from now on.
                Err(err) => {
                    tracing::warn!(error = %err, "unreadable release trial; starting it again")
                }
            }
        }
    }

    /// Judges this node's trials from what it reported, keeps them under
    /// the state dir, and returns when to judge again. A trial that failed
    /// takes effect at the next pass, which runs the release before.
    pub(super) fn judge_trials(&mut self, desired: &pb::DesiredState) -> Option<Instant> {
        let now_ms = crate::restarts::unix_millis(std::time::SystemTime::now());
        let mut wake: Option<Instant> = None;
        let mut failed_now = false;
        for installation in &desired.installations {
            let Some(trial) = self.trials.get_mut(&installation.installation_id) else {
                continue;
            };
            let Some(rollout) = &installation.rollout else {
                continue;
            };
            let expected = installation.addon.as_ref().map_or(0, |a| a.services.len());
            let services: Vec<&pb::ServiceStatus> = self
                .tracked
                .iter()
                .filter(|(id, t)| {
                    t.installation_id == installation.installation_id
                        && self.current.contains(*id)
                        && t.status.release == trial.release
                })
                .map(|(_, t)| &t.status)
                .collect();
            let min_healthy = rollout
                .min_healthy_time
                .and_then(|d| Duration::try_from(d).ok())
                .unwrap_or_default();
            let before = trial.clone();
            if let Some(due) = trial.judge(&services, expected, min_healthy, now_ms) {
                let at = Instant::now() + Duration::from_millis(due.saturating_sub(now_ms));
                wake = Some(wake.map_or(at, |w| w.min(at)));
            }
            if *trial != before {
                if let release::Outcome::Failed(reason) = &trial.outcome {
                    tracing::warn!(installation = %trial.installation, release = trial.release, %reason, "release failed on this node; going back to the release before");
                    failed_now = true;
                }
                if let Err(err) = self
                    .cx
                    .state
                    .trial(&trial.installation)
                    .and_then(|path| StateDir::write_json(&path, trial))
                {
                    tracing::warn!(error = %err, "cannot save the release trial");
                }
            }
        }
        if failed_now {
            // The release before runs from the next pass on, right away.
            return Some(Instant::now());
        }
        wake
    }
}
