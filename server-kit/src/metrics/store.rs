//! The metrics of a server's store, told by the store's observer.

use super::kinds::{Counter, EncodeLabelSet, Family, Latencies, latencies};

use super::Metrics;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreLabels {
    operation: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: &'static str,
}

/// The metrics of a server's store: each database operation by kind and
/// outcome (`ok`, or the error's kind: `conflict` is optimistic
/// concurrency at work, `unavailable` and `backend` are failures), and
/// its time.
#[derive(Debug, Clone)]
pub struct StoreMetrics {
    operations: Family<StoreLabels, Counter>,
    seconds: Latencies<OperationLabels>,
}

impl StoreMetrics {
    /// The store's metrics, registered in `metrics`.
    pub fn new(metrics: &Metrics) -> Self {
        Self {
            operations: metrics.add(
                "addons_store_operations",
                "Database operations of the store, by operation and outcome (ok, or the error's kind)",
                Family::default(),
            ),
            seconds: metrics.add(
                "addons_store_operation_seconds",
                "Time of one database operation, by operation",
                latencies(),
            ),
        }
    }
}

impl addons_store::Observer for StoreMetrics {
    fn observe(
        &self,
        operation: &'static str,
        elapsed: std::time::Duration,
        outcome: Result<(), &addons_store::Error>,
    ) {
        let outcome = match outcome {
            Ok(()) => "ok",
            Err(err) => err.kind(),
        };
        self.operations
            .get_or_create(&StoreLabels { operation, outcome })
            .inc();
        self.seconds
            .get_or_create(&OperationLabels { operation })
            .observe(elapsed.as_secs_f64());
    }
}
