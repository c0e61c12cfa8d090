//! What the installations' metrics remember of each record, and what
//! happened between two sightings of it: pure functions, no I/O.
//!
//! The change feed gives each record after its write; comparing it with
//! the last sighting says what the write did (a status left and another
//! entered, a rollout started, a node moved on, a rollout ended), however
//! the write was caused (a call, a report, a deadline) and even when the
//! feed lagged and writes in between were missed.

use std::collections::BTreeMap;

use crate::model::{Installation, InstallationStatus, NodeState, ReleaseOutcome};

/// What the metrics remember of one installation record.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Sighting {
    /// Its status; `None` before it was seen.
    pub(crate) status: Option<InstallationStatus>,
    /// Each release's outcome, and whether it is a rollback.
    releases: BTreeMap<u64, (ReleaseOutcome, bool)>,
    /// The release rolling out, and where each of its nodes is.
    rollout: Option<(u64, BTreeMap<String, NodeState>)>,
}

impl Sighting {
    /// What to remember of `installation`.
    pub(crate) fn of(installation: &Installation) -> Self {
        Self {
            status: Some(installation.status),
            releases: installation
                .history
                .iter()
                .map(|r| (r.number, (r.outcome, r.rollback_of.is_some())))
                .collect(),
            rollout: installation.rollout.as_ref().map(|rollout| {
                (
                    rollout.to_release,
                    rollout
                        .nodes
                        .iter()
                        .map(|n| (n.node_id.clone(), n.state))
                        .collect(),
                )
            }),
        }
    }
}

/// Something a write did to a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RolloutEvent {
    /// A release started rolling out: an upgrade, or a rollback to an
    /// earlier release.
    Started {
        /// Whether it is a rollback.
        rollback: bool,
    },
    /// A node of a rollout moved on: to the new release (`Upgrading`), or
    /// healthy on it long enough (`Healthy`).
    Node(NodeState),
    /// A rollout ended: the release deployed everywhere, or rolled back.
    Ended(ReleaseOutcome),
}

/// What happened to an installation's rollouts between `before` and
/// `after`. The first release of a new installation is no rollout; a
/// release that went from nothing to its end in one write (an upgrade of
/// an installation on no node) both starts and ends.
pub(crate) fn rollout_events(before: &Sighting, after: &Sighting) -> Vec<RolloutEvent> {
    let mut events = Vec::new();
    let known = before.status.is_some();
    for (number, &(outcome, rollback)) in &after.releases {
        let earlier = before.releases.get(number).map(|&(outcome, _)| outcome);
        if earlier.is_none() && known {
            events.push(RolloutEvent::Started { rollback });
        }
        let ended = matches!(
            outcome,
            ReleaseOutcome::Deployed | ReleaseOutcome::RolledBack
        );
        let was_open = match earlier {
            Some(earlier) => earlier == ReleaseOutcome::InProgress,
            None => known,
        };
        if ended && was_open {
            events.push(RolloutEvent::Ended(outcome));
        }
    }
    if let Some((release, nodes)) = &after.rollout {
        let earlier = before
            .rollout
            .as_ref()
            .filter(|(number, _)| number == release)
            .map(|(_, nodes)| nodes);
        for (node, &state) in nodes {
            let was = earlier
                .and_then(|nodes| nodes.get(node).copied())
                .unwrap_or(NodeState::Waiting);
            if state != was {
                events.push(RolloutEvent::Node(state));
            }
        }
    }
    // A rollout deployed in this write: its last nodes became healthy in
    // it, and the record keeps no rollout. (One that rolled back keeps no
    // trace of its failed node: the release's reason names it.)
    if let Some((release, nodes)) = &before.rollout
        && after.rollout.as_ref().is_none_or(|(now, _)| now != release)
        && after
            .releases
            .get(release)
            .is_some_and(|&(outcome, _)| outcome == ReleaseOutcome::Deployed)
    {
        events.extend(
            nodes
                .values()
                .filter(|&&state| state != NodeState::Healthy)
                .map(|_| RolloutEvent::Node(NodeState::Healthy)),
        );
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sighting(
        status: InstallationStatus,
        releases: &[(u64, ReleaseOutcome, bool)],
        rollout: Option<(u64, &[(&str, NodeState)])>,
    ) -> Sighting {
        Sighting {
            status: Some(status),
            releases: releases
                .iter()
                .map(|&(number, outcome, rollback)| (number, (outcome, rollback)))
                .collect(),
            rollout: rollout.map(|(release, nodes)| {
                (
                    release,
                    nodes
                        .iter()
                        .map(|&(node, state)| (node.to_owned(), state))
                        .collect(),
                )
            }),
        }
    }

    use InstallationStatus::{Active, Upgrading};
    use NodeState::{Healthy, Upgrading as Up, Waiting};
    use ReleaseOutcome::{Deployed, InProgress, RolledBack, Superseded};

    #[test]
    fn a_new_installation_starts_no_rollout() {
        let after = sighting(Active, &[(1, Deployed, false)], None);
        assert_eq!(rollout_events(&Sighting::default(), &after), []);
    }

    #[test]
    fn an_upgrade_over_two_nodes_is_counted_step_by_step() {
        let deployed = sighting(Active, &[(1, Deployed, false)], None);
        let started = sighting(
            Upgrading,
            &[(1, Deployed, false), (2, InProgress, false)],
            Some((2, &[("a", Up), ("b", Waiting)])),
        );
        assert_eq!(
            rollout_events(&deployed, &started),
            [
                RolloutEvent::Started { rollback: false },
                RolloutEvent::Node(Up)
            ]
        );
        let next = sighting(
            Upgrading,
            &[(1, Deployed, false), (2, InProgress, false)],
            Some((2, &[("a", Healthy), ("b", Up)])),
        );
        assert_eq!(
            rollout_events(&started, &next),
            [RolloutEvent::Node(Healthy), RolloutEvent::Node(Up)]
        );
        let done = sighting(
            Active,
            &[(1, Superseded, false), (2, Deployed, false)],
            None,
        );
        assert_eq!(
            rollout_events(&next, &done),
            [RolloutEvent::Ended(Deployed), RolloutEvent::Node(Healthy)]
        );
        assert_eq!(rollout_events(&done, &done), [], "nothing happened");
    }

    #[test]
    fn a_failed_node_rolls_the_release_back() {
        let rolling = sighting(
            Upgrading,
            &[(1, Deployed, false), (2, InProgress, false)],
            Some((2, &[("a", Up)])),
        );
        let rolled = sighting(
            InstallationStatus::RolledBack,
            &[(1, Deployed, false), (2, RolledBack, false)],
            None,
        );
        assert_eq!(
            rollout_events(&rolling, &rolled),
            [RolloutEvent::Ended(RolledBack)]
        );
    }

    #[test]
    fn a_rollback_on_no_node_starts_and_ends_in_one_write() {
        let before = sighting(
            Active,
            &[(1, Superseded, false), (2, Deployed, false)],
            None,
        );
        let after = sighting(
            Active,
            &[
                (1, Superseded, false),
                (2, Superseded, false),
                (3, Deployed, true),
            ],
            None,
        );
        assert_eq!(
            rollout_events(&before, &after),
            [
                RolloutEvent::Started { rollback: true },
                RolloutEvent::Ended(Deployed)
            ]
        );
    }
}
