//! The manager's own metrics (besides every server's call metrics): the
//! monitor links and the reports that come over them, and the desired
//! state's generation. No node or installation id is a label.

use addons_server_kit::metrics::{
    Metrics,
    kinds::{Counter, EncodeLabelSet, Family, Gauge, Histogram, latency},
};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReasonLabels {
    reason: &'static str,
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
                "Status reports not stored, by reason: not_placed (about an installation never placed on the node), not_stored (the store failed; the monitor sends it again)",
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
        };
        // Both reasons from the start: an alert on drops finds a zero,
        // not nothing.
        for reason in ["not_placed", "not_stored"] {
            let _ = this.reports_dropped.get_or_create(&ReasonLabels { reason });
        }
        this
    }

    /// A report was not stored, for `reason`.
    pub(crate) fn dropped(&self, reason: &'static str) {
        self.reports_dropped
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }
}
