//! The monitor's own metrics (besides every server's call metrics):
//! reconcile passes and the actions they take, pulls, restarts, swaps and
//! restores. No installation, service or container id is a label.

use oakestra_addons_proto::engine::v1 as pb;

use crate::view::NodeView;
use addons_server_kit::metrics::{
    Metrics,
    kinds::{Counter, EncodeLabelSet, Family, Histogram, long},
};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    action: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// The monitor's metrics; clones share them. The default is registered
/// nowhere (for tests).
#[derive(Debug, Clone)]
pub struct MonitorMetrics {
    passes: Family<OutcomeLabels, Counter>,
    pass_seconds: Histogram,
    actions: Family<ActionLabels, Counter>,
    pulls: Family<OutcomeLabels, Counter>,
    pull_seconds: Histogram,
    pulled_bytes: Counter,
}

impl Default for MonitorMetrics {
    fn default() -> Self {
        Self::new(&Metrics::new())
    }
}

impl MonitorMetrics {
    /// The monitor's metrics, registered in `metrics`.
    pub fn new(metrics: &Metrics) -> Self {
        Self {
            passes: metrics.add(
                "addons_reconcile_passes",
                "Reconcile passes, by outcome: ok, error (retried at the next resync)",
                Family::default(),
            ),
            pass_seconds: metrics.add(
                "addons_reconcile_pass_seconds",
                "Time of one reconcile pass",
                long(),
            ),
            actions: metrics.add(
                "addons_reconcile_actions",
                "Actions reconcile passes took, by kind (create, start, restart, swap, take_over, restore, run_core, exited, remove, phase) and outcome (ok, error)",
                Family::default(),
            ),
            pulls: metrics.add(
                "addons_pulls",
                "Image pulls, by outcome: ok, error",
                Family::default(),
            ),
            pull_seconds: metrics.add(
                "addons_pull_seconds",
                "Time of one image pull (resolve, fetch and unpack)",
                long(),
            ),
            pulled_bytes: metrics.add(
                "addons_pulled_bytes",
                "Bytes fetched from registries by pulls",
                Counter::default(),
            ),
        }
    }

    /// A pass ended, `ok` or not, after `elapsed`.
    pub(crate) fn pass(&self, ok: bool, elapsed: std::time::Duration) {
        self.passes
            .get_or_create(&OutcomeLabels {
                outcome: if ok { "ok" } else { "error" },
            })
            .inc();
        self.pass_seconds.observe(elapsed.as_secs_f64());
    }

    /// An action of kind `action` was taken, `ok` or not.
    pub(crate) fn action(&self, action: &'static str, ok: bool) {
        self.actions
            .get_or_create(&ActionLabels {
                action,
                outcome: if ok { "ok" } else { "error" },
            })
            .inc();
    }

    /// A pull ended, `ok` or not, after `elapsed`, having fetched `bytes`.
    pub(crate) fn pulled(&self, ok: bool, elapsed: std::time::Duration, bytes: u64) {
        self.pulls
            .get_or_create(&OutcomeLabels {
                outcome: if ok { "ok" } else { "error" },
            })
            .inc();
        self.pull_seconds.observe(elapsed.as_secs_f64());
        self.pulled_bytes.inc_by(bytes);
    }
}

/// Registers the gauges read from what the last pass published: addon
/// containers by phase and by health-check result, and the applied
/// generation.
pub fn register_view(metrics: &Metrics, view: tokio::sync::watch::Receiver<NodeView>) {
    for (name, help, label, by) in [
        (
            "addons_services",
            "Addon containers the monitor knows on this node, by phase (every phase listed, 0 when none)",
            "phase",
            By::Phase,
        ),
        (
            "addons_service_health",
            "Addon containers with a health check, by its last result (starting, healthy, unhealthy)",
            "health",
            By::Health,
        ),
    ] {
        let view = view.clone();
        metrics.register_gauges_fn(name, help, label, move || {
            count_by(&view.borrow().services, by)
        });
    }
    metrics.register_gauge_fn(
        "addons_reconcile_applied_generation",
        "Generation of the desired state the last pass applied (0: none yet)",
        move || i64::try_from(view.borrow().applied_generation).unwrap_or(i64::MAX),
    );
}

type Services = std::collections::BTreeMap<String, pb::ServiceStatus>;

/// What addon containers are counted by.
#[derive(Debug, Clone, Copy)]
pub enum By {
    /// Their phase.
    Phase,
    /// Their health check's last result (those without one are not
    /// counted).
    Health,
}

/// How many of `services` have each value of `by`: every value (not
/// UNSPECIFIED), 0 when none (a missing series is no zero to an alert),
/// named by its last word in lower case (`SERVICE_PHASE_RUNNING` is
/// `running`).
pub fn count_by(services: &Services, by: By) -> Vec<(String, i64)> {
    let name_of = |n: i32| match by {
        By::Phase => pb::ServicePhase::try_from(n).ok().map(|p| p.as_str_name()),
        By::Health => pb::ServiceHealth::try_from(n).ok().map(|h| h.as_str_name()),
    };
    let value_of = |s: &pb::ServiceStatus| match by {
        By::Phase => s.phase().as_str_name(),
        By::Health => s.health().as_str_name(),
    };
    (1..)
        .map_while(name_of)
        .map(|name| {
            let count = services.values().filter(|s| value_of(s) == name).count();
            let short = name
                .strip_prefix("SERVICE_PHASE_")
                .or_else(|| name.strip_prefix("SERVICE_HEALTH_"))
                .unwrap_or(name);
            (
                short.to_ascii_lowercase(),
                i64::try_from(count).unwrap_or(i64::MAX),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use oakestra_addons_proto::engine::v1::{ServiceHealth, ServicePhase, ServiceStatus};

    #[test]
    fn every_phase_is_counted_and_unspecified_is_none() {
        let services = [
            ("a", ServicePhase::Running, ServiceHealth::Healthy),
            ("b", ServicePhase::Running, ServiceHealth::Unspecified),
            ("c", ServicePhase::Failed, ServiceHealth::Unhealthy),
        ]
        .into_iter()
        .map(|(id, phase, health)| {
            let mut status = ServiceStatus::default();
            status.set_phase(phase);
            status.set_health(health);
            (id.to_owned(), status)
        })
        .collect();
        let phases = count_by(&services, By::Phase);
        assert_eq!(phases.len(), 9, "{phases:?}");
        assert!(phases.contains(&("running".to_owned(), 2)));
        assert!(phases.contains(&("failed".to_owned(), 1)));
        assert!(phases.contains(&("pulling".to_owned(), 0)));
        let health = count_by(&services, By::Health);
        assert_eq!(
            health,
            vec![
                ("starting".to_owned(), 0),
                ("healthy".to_owned(), 1),
                ("unhealthy".to_owned(), 1)
            ]
        );
    }
}
