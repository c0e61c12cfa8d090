//! Releases and their rollouts: pure functions over an installation record,
//! no I/O. An upgrade or a rollback adds a release and starts its rollout;
//! each node's verdict moves it on (the next nodes, the end) or ends it
//! rolled back; a node that never becomes healthy fails it at its deadline.
//!
//! Every step is one change of the record, made in the same write as what
//! caused it (the call, the report, the deadline check), so a manager that
//! stops at any point resumes from the record: the desired state each node
//! gets follows from `release`, `addon` and `rollout` alone.

use std::time::Duration;

use addons_descriptor::{Descriptor, Privilege};
use chrono::{DateTime, Utc};

use crate::model::{
    Installation, InstallationStatus, NodeRollout, NodeState, Release, ReleaseOutcome, Rollout,
    ServicePhase,
};

/// Releases kept in an installation's history.
pub const MAX_HISTORY: usize = 20;
/// How long a node must keep a new release healthy, unless asked otherwise.
pub const DEFAULT_MIN_HEALTHY_TIME: Duration = Duration::from_secs(10);
/// The longest `min_healthy_time` a request may ask for.
pub const MAX_MIN_HEALTHY_TIME: Duration = Duration::from_secs(3600);
/// How much longer than `min_healthy_time` a node may take, unless asked
/// otherwise.
pub const DEFAULT_DEADLINE_MARGIN: Duration = Duration::from_secs(300);
/// The longest progress deadline a request may ask for.
pub const MAX_PROGRESS_DEADLINE: Duration = Duration::from_secs(24 * 3600);

/// How a rollout proceeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RolloutOptions {
    /// Nodes upgraded at once (at least 1).
    pub max_parallel: u32,
    /// How long a node must keep the release healthy.
    pub min_healthy_time: Duration,
    /// How long a node may take to become healthy.
    pub progress_deadline: Duration,
}

impl Default for RolloutOptions {
    fn default() -> Self {
        Self {
            max_parallel: 1,
            min_healthy_time: DEFAULT_MIN_HEALTHY_TIME,
            progress_deadline: DEFAULT_MIN_HEALTHY_TIME + DEFAULT_DEADLINE_MARGIN,
        }
    }
}

/// A release to roll out.
#[derive(Debug, Clone)]
pub struct NewRelease {
    /// The marketplace addon it comes from.
    pub marketplace_id: String,
    /// Its snapshot, images pinned.
    pub addon: Descriptor,
    /// What is granted to it.
    pub granted_privileges: Vec<Privilege>,
    /// Who asks.
    pub requested_by: String,
    /// For a rollback, the release it returns to.
    pub rollback_of: Option<u64>,
}

/// What a node says of a release rolling out on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Running, not healthy long enough yet.
    Progressing,
    /// Healthy for the minimum time.
    Healthy,
    /// Failed; the node went back to the previous release.
    Failed(String),
}

/// Gives a record made before releases its release 1, from what it runs.
pub fn ensure_history(installation: &mut Installation) {
    if installation.history.is_empty() {
        installation.history.push(Release {
            number: installation.release,
            marketplace_id: installation.marketplace_id.clone(),
            addon: installation.addon.clone(),
            granted_privileges: installation.granted_privileges.clone(),
            create_time: installation.create_time,
            requested_by: String::new(),
            outcome: ReleaseOutcome::Deployed,
            reason: String::new(),
            rollback_of: None,
        });
    }
}

/// Release `number` of the kept history.
pub fn find(installation: &Installation, number: u64) -> Option<&Release> {
    installation.history.iter().find(|r| r.number == number)
}

/// The nodes a rollout goes through: those that reported the installation
/// and are not disconnected, in id order.
fn rollout_nodes(installation: &Installation) -> Vec<String> {
    let mut nodes: Vec<String> = installation
        .services
        .iter()
        .filter(|s| s.phase != ServicePhase::Unknown)
        .map(|s| s.node_id.clone())
        .collect();
    nodes.sort();
    nodes.dedup();
    nodes
}

/// Makes `new` the installation's next release and starts rolling it out.
/// The caller has checked that no rollout runs and the installation is not
/// being uninstalled.
pub fn begin(
    installation: &mut Installation,
    new: NewRelease,
    options: RolloutOptions,
    now: DateTime<Utc>,
) {
    ensure_history(installation);
    let number = installation
        .history
        .iter()
        .map(|r| r.number)
        .max()
        .unwrap_or(0)
        .max(installation.release)
        + 1;
    let from = installation.release;
    installation.history.push(Release {
        number,
        marketplace_id: new.marketplace_id.clone(),
        addon: new.addon.clone(),
        granted_privileges: new.granted_privileges.clone(),
        create_time: now,
        requested_by: new.requested_by,
        outcome: ReleaseOutcome::InProgress,
        reason: String::new(),
        rollback_of: new.rollback_of,
    });
    let excess = installation.history.len().saturating_sub(MAX_HISTORY);
    installation.history.drain(..excess);
    installation.release = number;
    installation.marketplace_id = new.marketplace_id;
    installation.addon = new.addon;
    installation.granted_privileges = new.granted_privileges;
    installation.rolled_back = None;
    installation.rollout = Some(Rollout {
        from_release: from,
        to_release: number,
        nodes: rollout_nodes(installation)
            .into_iter()
            .map(|node_id| NodeRollout {
                node_id,
                state: NodeState::Waiting,
                since: now,
                reason: String::new(),
            })
            .collect(),
        max_parallel: options.max_parallel.max(1),
        min_healthy_time: options.min_healthy_time,
        progress_deadline: options.progress_deadline,
    });
    advance(installation, now);
}

/// Applies node `node`'s verdict on `release`. Returns whether the record
/// changed.
pub fn on_verdict(
    installation: &mut Installation,
    node: &str,
    release: u64,
    verdict: &Verdict,
    now: DateTime<Utc>,
) -> bool {
    let Some(rollout) = installation.rollout.as_mut() else {
        return false;
    };
    if rollout.to_release != release {
        return false;
    }
    let Some(entry) = rollout
        .nodes
        .iter_mut()
        .find(|n| n.node_id == node && n.state == NodeState::Upgrading)
    else {
        return false;
    };
    match verdict {
        Verdict::Progressing => false,
        Verdict::Healthy => {
            entry.state = NodeState::Healthy;
            entry.since = now;
            advance(installation, now);
            true
        }
        Verdict::Failed(reason) => {
            entry.state = NodeState::Failed;
            entry.since = now;
            entry.reason.clone_from(reason);
            let reason = format!("failed on node {node}: {reason}");
            abort(installation, &reason, now);
            true
        }
    }
}

/// Fails the rollout when a node took longer than the deadline. Returns
/// whether the record changed.
pub fn on_tick(installation: &mut Installation, now: DateTime<Utc>) -> bool {
    let Some(rollout) = &installation.rollout else {
        return false;
    };
    let deadline =
        chrono::Duration::from_std(rollout.progress_deadline).unwrap_or(chrono::Duration::MAX);
    let late = rollout
        .nodes
        .iter()
        .find(|n| n.state == NodeState::Upgrading && n.since + deadline <= now)
        .map(|n| n.node_id.clone());
    let Some(node) = late else {
        return false;
    };
    let reason = format!(
        "node {node} did not keep it healthy within the progress deadline of {:?}",
        rollout.progress_deadline
    );
    abort(installation, &reason, now);
    true
}

/// Takes a forgotten node out of the rollout, which goes on without it.
/// Returns whether the record changed.
pub fn forget_node(installation: &mut Installation, node: &str, now: DateTime<Utc>) -> bool {
    let Some(rollout) = installation.rollout.as_mut() else {
        return false;
    };
    let before = rollout.nodes.len();
    rollout.nodes.retain(|n| n.node_id != node);
    if rollout.nodes.len() == before {
        return false;
    }
    advance(installation, now);
    true
}

/// The nodes that run the new release now.
pub fn targets(rollout: &Rollout) -> Vec<String> {
    rollout
        .nodes
        .iter()
        .filter(|n| matches!(n.state, NodeState::Upgrading | NodeState::Healthy))
        .map(|n| n.node_id.clone())
        .collect()
}

/// Starts the next nodes, or ends the rollout when every node is healthy.
fn advance(installation: &mut Installation, now: DateTime<Utc>) {
    let Some(rollout) = installation.rollout.as_mut() else {
        return;
    };
    if rollout.nodes.iter().all(|n| n.state == NodeState::Healthy) {
        let (from, to) = (rollout.from_release, rollout.to_release);
        installation.rollout = None;
        for release in &mut installation.history {
            if release.number == to {
                release.outcome = ReleaseOutcome::Deployed;
            } else if release.number == from && release.outcome == ReleaseOutcome::Deployed {
                release.outcome = ReleaseOutcome::Superseded;
            }
        }
        return;
    }
    let upgrading = rollout
        .nodes
        .iter()
        .filter(|n| n.state == NodeState::Upgrading)
        .count();
    let max = usize::try_from(rollout.max_parallel.max(1)).unwrap_or(usize::MAX);
    for node in rollout
        .nodes
        .iter_mut()
        .filter(|n| n.state == NodeState::Waiting)
        .take(max.saturating_sub(upgrading))
    {
        node.state = NodeState::Upgrading;
        node.since = now;
    }
}

/// Ends the rollout: every node goes back to the release before.
fn abort(installation: &mut Installation, reason: &str, now: DateTime<Utc>) {
    let Some(rollout) = installation.rollout.take() else {
        return;
    };
    let version = installation.addon.version.clone();
    let Some(previous) = find(installation, rollout.from_release).cloned() else {
        // Cannot happen: the release before is the newest but one, and the
        // history keeps many. Keep the new release rather than guess.
        tracing::error!(id = %installation.id, release = rollout.from_release, "previous release missing from the history");
        return;
    };
    for release in &mut installation.history {
        if release.number == rollout.to_release {
            release.outcome = ReleaseOutcome::RolledBack;
            release.reason = reason.to_owned();
        }
    }
    installation.release = previous.number;
    installation.marketplace_id = previous.marketplace_id;
    installation.addon = previous.addon;
    installation.granted_privileges = previous.granted_privileges;
    installation.rolled_back = Some(format!(
        "release {} ({version}) rolled back to release {} ({}): {reason}",
        rollout.to_release, previous.number, installation.addon.version
    ));
    installation.update_time = now;
}

/// The status shown over the services' aggregate: UPGRADING while a
/// rollout runs, ROLLED_BACK while the release before runs everywhere
/// after a failed one.
pub fn overlay(
    installation: &Installation,
    status: InstallationStatus,
    message: String,
) -> (InstallationStatus, String) {
    if matches!(
        status,
        InstallationStatus::Disabling | InstallationStatus::Disabled
    ) {
        return (status, message);
    }
    if let Some(rollout) = &installation.rollout {
        let nodes: Vec<String> = rollout
            .nodes
            .iter()
            .map(|n| {
                let state = match n.state {
                    NodeState::Waiting => "waiting",
                    NodeState::Upgrading => "upgrading",
                    NodeState::Healthy => "healthy",
                    NodeState::Failed => "failed",
                };
                format!("{} {state}", n.node_id)
            })
            .collect();
        return (
            InstallationStatus::Upgrading,
            format!(
                "rolling out release {} ({}): {}; {message}",
                rollout.to_release,
                installation.addon.version,
                nodes.join(", ")
            ),
        );
    }
    match &installation.rolled_back {
        Some(reason) if status == InstallationStatus::Active => (
            InstallationStatus::RolledBack,
            format!("{reason}; {message}"),
        ),
        _ => (status, message),
    }
}

#[cfg(test)]
mod tests;
