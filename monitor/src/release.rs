//! Releases on this node: which release of each installation the node
//! runs, and its judgement of a release rolling out on it. Pure, no I/O.
//!
//! While a release rolls out, the desired state names the nodes that run it
//! and carries the release before for the others. A node that runs the new
//! release keeps a [`Trial`]: it fails the moment one of the release's
//! services fails (an exit, a failed start, an unhealthy check), and passes
//! once every service has run for `min_healthy_time` without one. A failed
//! trial sends the node back to the release before by itself, without
//! waiting for the manager; the verdict goes to the manager with the next
//! report.

use std::{collections::HashMap, time::Duration};

use oakestra_addons_proto::engine::v1::{self as pb, ServicePhase};
use serde::{Deserialize, Serialize};

/// How a trial went so far.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Not every service runs yet, or not for long enough.
    Progressing,
    /// Every service ran for the minimum time.
    Healthy,
    /// A service failed; the node went back to the release before.
    Failed(String),
}

/// This node's trial of a release rolling out on it. Times are wall-clock
/// milliseconds, so a trial survives a restart of the monitor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trial {
    /// The installation.
    pub installation: String,
    /// The release on trial.
    pub release: u64,
    /// When every service of the release last started running together.
    pub running_since_ms: Option<u64>,
    /// How it went.
    pub outcome: Outcome,
}

impl Trial {
    /// A new trial of `release`.
    pub fn new(installation: &str, release: u64) -> Self {
        Self {
            installation: installation.to_owned(),
            release,
            running_since_ms: None,
            outcome: Outcome::Progressing,
        }
    }

    /// The verdict the manager gets.
    pub fn verdict(&self) -> pb::ReleaseVerdict {
        let (state, reason) = match &self.outcome {
            Outcome::Progressing => (pb::ReleaseVerdictState::Progressing, String::new()),
            Outcome::Healthy => (pb::ReleaseVerdictState::Healthy, String::new()),
            Outcome::Failed(reason) => (pb::ReleaseVerdictState::Failed, reason.clone()),
        };
        pb::ReleaseVerdict {
            release: self.release,
            state: state.into(),
            reason,
        }
    }

    /// Judges the trial from the statuses of the release's services on the
    /// node, at `now_ms`. Returns when to judge again (the time the
    /// services will have run long enough), if that is still ahead.
    pub fn judge(
        &mut self,
        services: &[&pb::ServiceStatus],
        expected: usize,
        min_healthy_time: Duration,
        now_ms: u64,
    ) -> Option<u64> {
        if self.outcome != Outcome::Progressing {
            return None;
        }
        if let Some(failed) = services.iter().find(|s| {
            matches!(s.phase(), ServicePhase::Backoff | ServicePhase::Failed)
                || s.restart_count > 0
                || s.health() == pb::ServiceHealth::Unhealthy
        }) {
            let reason = if failed.reason.is_empty() {
                format!("{} failed", failed.service_name)
            } else {
                format!("{}: {}", failed.service_name, failed.reason)
            };
            self.outcome = Outcome::Failed(reason);
            return None;
        }
        let all_running = services.len() >= expected
            && services.iter().all(|s| {
                s.phase() == ServicePhase::Running
                    && matches!(
                        s.health(),
                        pb::ServiceHealth::Unspecified | pb::ServiceHealth::Healthy
                    )
            });
        if !all_running {
            self.running_since_ms = None;
            return None;
        }
        // Wall-clock time: a clock that went back since the count began
        // begins it again, so a trial never waits longer than its time.
        let since = *self.running_since_ms.insert(
            self.running_since_ms
                .map_or(now_ms, |since| since.min(now_ms)),
        );
        let due =
            since.saturating_add(u64::try_from(min_healthy_time.as_millis()).unwrap_or(u64::MAX));
        if now_ms >= due {
            self.outcome = Outcome::Healthy;
            None
        } else {
            Some(due)
        }
    }
}

/// Whether this node runs the rolling-out release of `installation`.
fn runs_new(installation: &pb::DesiredInstallation, node: &str, trial: Option<&Trial>) -> bool {
    let Some(rollout) = &installation.rollout else {
        return true;
    };
    rollout.target_nodes.iter().any(|n| n == node)
        && !trial.is_some_and(|t| {
            t.release == installation.release && matches!(t.outcome, Outcome::Failed(_))
        })
}

/// The desired state as this node runs it: an installation rolling out
/// shows the release this node runs (the new one when it is a target and
/// its trial did not fail, else the one before), and no rollout.
pub fn resolve(
    desired: &pb::DesiredState,
    node: &str,
    trials: &HashMap<String, Trial>,
) -> pb::DesiredState {
    let mut resolved = desired.clone();
    for installation in &mut resolved.installations {
        let trial = trials.get(&installation.installation_id);
        let new = runs_new(installation, node, trial);
        let Some(rollout) = installation.rollout.take() else {
            continue;
        };
        if !new {
            installation.release = rollout.previous_release;
            installation.addon = rollout.previous_addon;
            installation.granted_privileges = rollout.previous_granted_privileges;
        }
    }
    resolved
}

/// The trials this node must keep: one per installation whose rolling-out
/// release it runs (an existing trial of the same release is kept).
pub fn wanted_trials(
    desired: &pb::DesiredState,
    node: &str,
    trials: &HashMap<String, Trial>,
) -> HashMap<String, Trial> {
    desired
        .installations
        .iter()
        .filter(|i| {
            i.rollout
                .as_ref()
                .is_some_and(|r| r.target_nodes.iter().any(|n| n == node))
        })
        .map(|i| {
            let trial = trials
                .get(&i.installation_id)
                .filter(|t| t.release == i.release)
                .cloned()
                .unwrap_or_else(|| Trial::new(&i.installation_id, i.release));
            (i.installation_id.clone(), trial)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desired(targets: &[&str]) -> pb::DesiredState {
        let addon = |version: &str| pb::AddonSnapshot {
            name: "a".into(),
            version: version.into(),
            ..Default::default()
        };
        pb::DesiredState {
            generation: 1,
            installations: vec![pb::DesiredInstallation {
                installation_id: "i".into(),
                addon: Some(addon("1.1.0")),
                release: 2,
                rollout: Some(pb::RolloutPlan {
                    previous_release: 1,
                    previous_addon: Some(addon("1.0.0")),
                    target_nodes: targets.iter().map(|t| (*t).to_owned()).collect(),
                    ..Default::default()
                }),
                ..Default::default()
            }],
        }
    }

    fn version(state: &pb::DesiredState) -> (u64, String) {
        let i = &state.installations[0];
        assert!(i.rollout.is_none());
        (i.release, i.addon.as_ref().unwrap().version.clone())
    }

    #[test]
    fn targets_run_the_new_release_until_their_trial_fails() {
        let state = desired(&["n1"]);
        let none = HashMap::new();
        assert_eq!(version(&resolve(&state, "n1", &none)), (2, "1.1.0".into()));
        assert_eq!(version(&resolve(&state, "n2", &none)), (1, "1.0.0".into()));
        let mut trials = wanted_trials(&state, "n1", &none);
        assert_eq!(trials["i"].release, 2);
        assert!(wanted_trials(&state, "n2", &none).is_empty());
        trials.get_mut("i").unwrap().outcome = Outcome::Failed("boom".into());
        assert_eq!(
            version(&resolve(&state, "n1", &trials)),
            (1, "1.0.0".into())
        );
        // A trial of another release does not count.
        trials.get_mut("i").unwrap().release = 5;
        assert_eq!(
            version(&resolve(&state, "n1", &trials)),
            (2, "1.1.0".into())
        );
    }

    fn status(phase: ServicePhase, restarts: u32) -> pb::ServiceStatus {
        pb::ServiceStatus {
            service_name: "web".into(),
            phase: phase.into(),
            restart_count: restarts,
            reason: "exited with code 3".into(),
            ..Default::default()
        }
    }

    #[test]
    fn healthy_after_running_long_enough_failed_at_the_first_failure() {
        let min = Duration::from_secs(10);
        let mut trial = Trial::new("i", 2);
        let pulling = status(ServicePhase::Pulling, 0);
        assert_eq!(trial.judge(&[&pulling], 1, min, 0), None);
        let running = status(ServicePhase::Running, 0);
        assert_eq!(trial.judge(&[&running], 1, min, 1_000), Some(11_000));
        assert_eq!(trial.judge(&[&running], 1, min, 5_000), Some(11_000));
        assert_eq!(trial.judge(&[&running], 2, min, 6_000), None, "one missing");
        assert_eq!(trial.running_since_ms, None);
        assert_eq!(trial.judge(&[&running], 1, min, 7_000), Some(17_000));
        assert_eq!(trial.judge(&[&running], 1, min, 17_000), None);
        // The clock goes back an hour mid-trial: due one full time later,
        // not an hour and a time.
        let mut back = Trial::new("i1", 2);
        assert_eq!(back.judge(&[&running], 1, min, 3_600_000), Some(3_610_000));
        assert_eq!(back.judge(&[&running], 1, min, 2_000), Some(12_000));
        assert_eq!(trial.outcome, Outcome::Healthy);
        assert_eq!(trial.verdict().state(), pb::ReleaseVerdictState::Healthy);

        let mut trial = Trial::new("i", 2);
        trial.judge(&[&running], 1, min, 0);
        let backoff = status(ServicePhase::Backoff, 0);
        trial.judge(&[&backoff], 1, min, 1);
        assert_eq!(
            trial.outcome,
            Outcome::Failed("web: exited with code 3".into())
        );
        // A health check: healthy counts as running, starting does not,
        // unhealthy fails.
        let mut checked = status(ServicePhase::Running, 0);
        checked.health = pb::ServiceHealth::Starting.into();
        let mut trial = Trial::new("i", 2);
        assert_eq!(trial.judge(&[&checked], 1, min, 0), None);
        checked.health = pb::ServiceHealth::Healthy.into();
        assert_eq!(trial.judge(&[&checked], 1, min, 1), Some(10_001));
        checked.health = pb::ServiceHealth::Unhealthy.into();
        checked.reason = "unhealthy: GET / answered 500".into();
        trial.judge(&[&checked], 1, min, 2);
        assert_eq!(
            trial.outcome,
            Outcome::Failed("web: unhealthy: GET / answered 500".into())
        );
        // Restarted quickly: a restart counts too.
        let mut trial = Trial::new("i", 2);
        trial.judge(&[&status(ServicePhase::Running, 1)], 1, min, 0);
        assert!(matches!(trial.outcome, Outcome::Failed(_)));
    }
}
