//! The manager's own metrics (besides every server's call metrics): the
//! monitor links and the reports that come over them, the desired state's
//! generation, the installations by status and their rollouts. No node or
//! installation id is a label.

mod tally;

use std::collections::HashMap;

use addons_server_kit::metrics::{
    Metrics,
    kinds::{Counter, EncodeLabelSet, Family, Gauge, Histogram, latency},
};

use crate::model::{Installation, InstallationStatus, NodeState, ReleaseOutcome};

use self::tally::{RolloutEvent, Sighting, rollout_events};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

/// The manager's metrics; clones share them. The default is registered
/// nowhere (for tests and tools).
#[derive(Debug, Clone)]
pub struct ManagerMetrics {
    /// Monitors linked now.
    pub(crate) monitors_linked: Gauge,
    /// Status reports received over links.
    pub(crate) reports_received: Counter,
    /// Status reports stored and acked.
    pub(crate) reports_acked: Counter,
    /// Status reports not stored, by reason.
    pub(crate) reports_dropped: Family<ReasonLabels, Counter>,
    /// Time from a report's arrival to its ack (stored).
    pub(crate) report_stored_seconds: Histogram,
    /// The generation of the desired state the links send.
    pub(crate) desired_generation: Gauge,
    /// Installation records by status.
    installations: Family<StatusLabels, Gauge>,
    /// Rollouts started, upgrades and rollbacks.
    rollouts_started: Family<KindLabels, Counter>,
    /// Rollouts ended, deployed or rolled back.
    rollouts_ended: Family<OutcomeLabels, Counter>,
    /// Nodes of rollouts that moved on.
    rollout_node_steps: Family<StateLabels, Counter>,
}

impl Default for ManagerMetrics {
    fn default() -> Self {
        Self::new(&Metrics::new())
    }
}

impl ManagerMetrics {
    /// The manager's metrics, registered in `metrics`.
    pub fn new(metrics: &Metrics) -> Self {
        let this = Self {
            monitors_linked: metrics.add(
                "addons_monitors_linked",
                "Monitors whose link to this manager is open",
                Gauge::default(),
            ),
            reports_received: metrics.add(
                "addons_link_reports_received",
                "Status reports received from monitors",
                Counter::default(),
            ),
            reports_acked: metrics.add(
                "addons_link_reports_acked",
                "Status reports stored and acked to their monitor",
                Counter::default(),
            ),
            reports_dropped: metrics.add(
                "addons_link_reports_dropped",
                "Status reports not stored, by reason: not_placed (about an installation never placed on the node), not_stored (the store failed, or the report's link ended first; the monitor sends it again)",
                Family::default(),
            ),
            report_stored_seconds: metrics.add(
                "addons_link_report_stored_seconds",
                "Time from a report's arrival to its ack, once it is durable",
                latency(),
            ),
            desired_generation: metrics.add(
                "addons_desired_generation",
                "Generation of the desired state the links send",
                Gauge::default(),
            ),
            installations: metrics.add(
                "addons_installations",
                "Installation records of this manager's plane, by status (disabled ones until they are deleted)",
                Family::default(),
            ),
            rollouts_started: metrics.add(
                "addons_rollouts_started",
                "Releases that started rolling out, by kind: upgrade, or rollback (to an earlier release, on request)",
                Family::default(),
            ),
            rollouts_ended: metrics.add(
                "addons_rollouts_ended",
                "Rollouts that ended, by outcome: deployed (healthy on every node), or rolled_back (a node failed or missed its deadline; the release before runs again)",
                Family::default(),
            ),
            rollout_node_steps: metrics.add(
                "addons_rollout_node_steps",
                "Nodes of rollouts that moved on, by the state they reached: upgrading (given the new release), healthy (kept it healthy long enough)",
                Family::default(),
            ),
        };
        // Every label value from the start: an alert on drops or
        // rollbacks finds a zero, not nothing.
        for reason in ["not_placed", "not_stored"] {
            let _ = this.reports_dropped.get_or_create(&ReasonLabels { reason });
        }
        for status in InstallationStatus::ALL {
            let _ = this.installations.get_or_create(&StatusLabels {
                status: status.as_str(),
            });
        }
        for kind in ["upgrade", "rollback"] {
            let _ = this.rollouts_started.get_or_create(&KindLabels { kind });
        }
        for outcome in [ReleaseOutcome::Deployed, ReleaseOutcome::RolledBack] {
            let _ = this.rollouts_ended.get_or_create(&OutcomeLabels {
                outcome: outcome_name(outcome),
            });
        }
        for state in [NodeState::Upgrading, NodeState::Healthy] {
            let _ = this.rollout_node_steps.get_or_create(&StateLabels {
                state: state_name(state),
            });
        }
        this
    }

    fn count(&self, event: RolloutEvent) {
        match event {
            RolloutEvent::Started { rollback } => {
                let kind = if rollback { "rollback" } else { "upgrade" };
                self.rollouts_started
                    .get_or_create(&KindLabels { kind })
                    .inc();
            }
            RolloutEvent::Ended(outcome) => {
                self.rollouts_ended
                    .get_or_create(&OutcomeLabels {
                        outcome: outcome_name(outcome),
                    })
                    .inc();
            }
            RolloutEvent::Node(state) => {
                self.rollout_node_steps
                    .get_or_create(&StateLabels {
                        state: state_name(state),
                    })
                    .inc();
            }
        }
    }

    /// A report was not stored, for `reason`.
    pub(crate) fn dropped(&self, reason: &'static str) {
        self.reports_dropped
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }
}

fn outcome_name(outcome: ReleaseOutcome) -> &'static str {
    match outcome {
        ReleaseOutcome::InProgress => "in_progress",
        ReleaseOutcome::Deployed => "deployed",
        ReleaseOutcome::Superseded => "superseded",
        ReleaseOutcome::RolledBack => "rolled_back",
    }
}

fn state_name(state: NodeState) -> &'static str {
    match state {
        NodeState::Waiting => "waiting",
        NodeState::Upgrading => "upgrading",
        NodeState::Healthy => "healthy",
        NodeState::Failed => "failed",
    }
}

/// The installations' metrics, kept from every record the change feed
/// gives: the gauges by status and the rollouts' counters.
#[derive(Debug)]
pub(crate) struct Tally {
    metrics: ManagerMetrics,
    seen: HashMap<String, Sighting>,
}

impl Tally {
    /// The tally of the records there are at start (which count in the
    /// gauges; their past rollouts count nowhere).
    pub(crate) fn new<'a>(
        metrics: ManagerMetrics,
        records: impl IntoIterator<Item = &'a Installation>,
    ) -> Self {
        let mut tally = Self {
            metrics,
            seen: HashMap::new(),
        };
        for record in records {
            tally.enter(&record.id, Sighting::of(record));
        }
        tally
    }

    /// The metrics it keeps.
    pub(crate) fn metrics(&self) -> &ManagerMetrics {
        &self.metrics
    }

    /// Record `id` is now `record` (`None`: deleted).
    pub(crate) fn saw(&mut self, id: &str, record: Option<&Installation>) {
        let after = record.map(Sighting::of).unwrap_or_default();
        let before = self.seen.get(id).cloned().unwrap_or_default();
        for event in rollout_events(&before, &after) {
            self.metrics.count(event);
        }
        self.enter(id, after);
    }

    /// Every record there is now: those missing were deleted.
    pub(crate) fn saw_all(&mut self, records: &[&Installation]) {
        let there: std::collections::HashSet<&str> =
            records.iter().map(|r| r.id.as_str()).collect();
        let gone: Vec<String> = self
            .seen
            .keys()
            .filter(|id| !there.contains(id.as_str()))
            .cloned()
            .collect();
        for id in gone {
            self.saw(&id, None);
        }
        for record in records {
            self.saw(&record.id, Some(record));
        }
    }

    fn enter(&mut self, id: &str, sighting: Sighting) {
        let status = |status: InstallationStatus| {
            self.metrics.installations.get_or_create(&StatusLabels {
                status: status.as_str(),
            })
        };
        let before = match sighting.status {
            Some(_) => self.seen.insert(id.to_owned(), sighting.clone()),
            None => self.seen.remove(id),
        };
        if let Some(old) = before.and_then(|b| b.status) {
            status(old).dec();
        }
        if let Some(new) = sighting.status {
            status(new).inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::tests::installation;

    fn record(id: &str, status: InstallationStatus) -> Installation {
        Installation {
            id: id.into(),
            status,
            ..installation(&["s"])
        }
    }

    /// The `addons_installations` gauge of `status`, as scraped.
    fn gauge(metrics: &Metrics, status: &str) -> String {
        let text = metrics.encode();
        let line = format!("addons_installations{{status=\"{status}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&line))
            .unwrap_or_else(|| panic!("{line} in {text}"))
            .to_owned()
    }

    #[test]
    fn the_status_gauges_follow_every_record_and_its_deletion() {
        let metrics = Metrics::new();
        let (a, b) = (
            record("a", InstallationStatus::Active),
            record("b", InstallationStatus::Active),
        );
        let mut tally = Tally::new(ManagerMetrics::new(&metrics), [&a, &b]);
        assert_eq!(gauge(&metrics, "active"), "2");
        assert_eq!(gauge(&metrics, "failed"), "0", "every status shows");
        tally.saw("a", Some(&record("a", InstallationStatus::Failed)));
        tally.saw("c", Some(&record("c", InstallationStatus::Installing)));
        assert_eq!(gauge(&metrics, "active"), "1");
        assert_eq!(gauge(&metrics, "failed"), "1");
        assert_eq!(gauge(&metrics, "installing"), "1");
        tally.saw("b", None);
        tally.saw("b", None);
        assert_eq!(gauge(&metrics, "active"), "0", "a deletion counts once");
        // After a lagged feed, the records there are say it all.
        tally.saw_all(&[&record("c", InstallationStatus::Active)]);
        assert_eq!(gauge(&metrics, "active"), "1");
        assert_eq!(gauge(&metrics, "failed"), "0");
        assert_eq!(gauge(&metrics, "installing"), "0");
    }
}
