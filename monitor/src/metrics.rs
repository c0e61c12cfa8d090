//! The monitor's own metrics (besides every server's call metrics):
//! reconcile passes and the actions they take, pulls, restarts, swaps and
//! restores. No installation, service or container id is a label.

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
