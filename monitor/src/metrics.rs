//! The monitor's own metrics (besides every server's call metrics):
//! reconcile passes and the actions they take, pulls, restarts, swaps and
//! restores. No installation, service or container id is a label.

use addons_server_kit::metrics::Metrics;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        histogram::{Histogram, exponential_buckets},
    },
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
        Self {
            passes: Family::default(),
            // 1 ms to 30 s.
            pass_seconds: Histogram::new(exponential_buckets(0.001, 2.5, 12)),
            actions: Family::default(),
            pulls: Family::default(),
            // 10 ms to 10 min.
            pull_seconds: Histogram::new(exponential_buckets(0.01, 3.0, 13)),
            pulled_bytes: Counter::default(),
        }
    }
}

impl MonitorMetrics {
    /// The monitor's metrics, registered in `metrics`.
    pub fn new(metrics: &Metrics) -> Self {
        let this = Self::default();
        metrics.register(
            "addons_reconcile_passes",
            "Reconcile passes, by outcome: ok, error (retried at the next resync)",
            this.passes.clone(),
        );
        metrics.register(
            "addons_reconcile_pass_seconds",
            "Time of one reconcile pass",
            this.pass_seconds.clone(),
        );
        metrics.register(
            "addons_reconcile_actions",
            "Actions reconcile passes took, by kind (create, start, restart, swap, take_over, restore, run_core, exited, remove, phase) and outcome (ok, error)",
            this.actions.clone(),
        );
        metrics.register(
            "addons_pulls",
            "Image pulls, by outcome: ok, error",
            this.pulls.clone(),
        );
        metrics.register(
            "addons_pull_seconds",
            "Time of one image pull (resolve, fetch and unpack)",
            this.pull_seconds.clone(),
        );
        metrics.register(
            "addons_pulled_bytes",
            "Bytes fetched from registries by pulls",
            this.pulled_bytes.clone(),
        );
        this
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
