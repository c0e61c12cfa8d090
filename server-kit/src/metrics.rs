//! Prometheus metrics: the registry every part of a server registers its
//! metrics in, the metrics of every gRPC call (as go-grpc-prometheus names
//! them, so existing dashboards and alerts apply), and the scrape endpoint
//! (`--metrics-listen`).
//!
//! Label values come only from bounded sets: method names from the
//! server's own tables (a method nobody serves is `unknown`), status codes,
//! our own reasons. Never an id.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
};

use anyhow::Context as _;
use prometheus_client::registry::{Metric, Registry};

use crate::Shutdown;

/// The registry of one server's metrics; clones share it.
#[derive(Clone, Default)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `metric` as `name` (a counter's `_total` is added) with
    /// `help`. Registering happens at start-up; updating a metric never
    /// touches the registry.
    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        self.registry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .register(name, help, metric);
    }

    /// Registers `metric` as [`Metrics::register`] does and gives it back:
    /// how a part builds the metrics it keeps.
    pub fn add<M: Metric + Clone>(&self, name: &str, help: &str, metric: M) -> M {
        self.register(name, help, metric.clone());
        metric
    }

    /// Registers a gauge whose value `read` gives at each scrape: for what
    /// a server already keeps (a queue's length, a link's state).
    pub fn register_gauge_fn(
        &self,
        name: &'static str,
        help: &'static str,
        read: impl Fn() -> i64 + Send + Sync + 'static,
    ) {
        self.register_read(
            name,
            help,
            None,
            Box::new(move || vec![(String::new(), read())]),
        );
    }

    /// Registers a gauge with one label, `label`, whose values and their
    /// gauges `read` gives at each scrape (a count by phase, say: the
    /// values must come from a bounded set).
    pub fn register_gauges_fn(
        &self,
        name: &'static str,
        help: &'static str,
        label: &'static str,
        read: impl Fn() -> Vec<(String, i64)> + Send + Sync + 'static,
    ) {
        self.register_read(name, help, Some(label), Box::new(read));
    }

    fn register_read(
        &self,
        name: &'static str,
        help: &'static str,
        label: Option<&'static str>,
        read: Box<dyn Fn() -> Vec<(String, i64)> + Send + Sync>,
    ) {
        self.registry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .register_collector(Box::new(GaugesFn {
                name,
                help,
                label,
                read,
            }));
    }

    /// Every metric, in the Prometheus text format (0.0.4).
    pub fn encode(&self) -> String {
        let mut text = String::new();
        let registry = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, &registry);
        text
    }

    /// Serves on `listener` until `shutdown` fires: `GET /metrics`, and
    /// the probes of orchestrators that cannot speak gRPC health to a
    /// loopback address (a host-network pod's): `GET /livez` (200 until
    /// shutdown) and `GET /readyz` (200 while every part of `readiness`
    /// works, else 503 naming the parts that do not). Nothing else.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        readiness: crate::health::Readiness,
        shutdown: Shutdown,
    ) -> anyhow::Result<()> {
        use hyper::{Method, Response, StatusCode, body::Incoming, service::service_fn};
        let stopping = shutdown.clone();
        let serve_one = move |request: http::Request<Incoming>| {
            let metrics = self.clone();
            let readiness = readiness.clone();
            let stopping = stopping.clone();
            async move {
                let text = |status: StatusCode, body: String| {
                    Response::builder()
                        .status(status)
                        .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
                        .body(body)
                };
                let path = request.uri().path();
                let response = match (request.method(), path) {
                    (&Method::GET, "/metrics") => Response::builder()
                        .header(
                            http::header::CONTENT_TYPE,
                            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                        )
                        .body(metrics.encode()),
                    (&Method::GET, "/livez") if stopping.is_fired() => {
                        text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n".into())
                    }
                    (&Method::GET, "/livez") => text(StatusCode::OK, "ok\n".into()),
                    (&Method::GET, "/readyz") => {
                        let failing = readiness.failing();
                        if stopping.is_fired() {
                            text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n".into())
                        } else if failing.is_empty() {
                            text(StatusCode::OK, "ok\n".into())
                        } else {
                            text(
                                StatusCode::SERVICE_UNAVAILABLE,
                                format!("not ready: {}\n", failing.join(", ")),
                            )
                        }
                    }
                    (_, "/metrics" | "/livez" | "/readyz") => Response::builder()
                        .status(StatusCode::METHOD_NOT_ALLOWED)
                        .header(http::header::ALLOW, "GET")
                        .body(String::new()),
                    _ => Response::builder()
                        .status(StatusCode::NOT_FOUND)
                        .body(String::new()),
                };
                response.map(|response| response.map(http_body_util::Full::<bytes::Bytes>::from))
            }
        };
        loop {
            let (stream, _) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        tracing::warn!(error = %err, "metrics endpoint: accept failed");
                        continue;
                    }
                },
                () = shutdown.fired() => return Ok(()),
            };
            let serve_one = serve_one.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(std::time::Duration::from_secs(10))
                    .max_buf_size(16 * 1024)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service_fn(serve_one));
                tokio::select! {
                    _ = connection => {}
                    () = shutdown.fired() => {}
                }
            });
        }
    }
}

/// Gauges read at each scrape: one without a label, or one per value of
/// `label`.
struct GaugesFn {
    name: &'static str,
    help: &'static str,
    label: Option<&'static str>,
    read: Box<dyn Fn() -> Vec<(String, i64)> + Send + Sync>,
}

impl std::fmt::Debug for GaugesFn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GaugesFn")
            .field("name", &self.name)
            .finish()
    }
}

impl prometheus_client::collector::Collector for GaugesFn {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric as _;
        let mut metric = encoder.encode_descriptor(
            self.name,
            self.help,
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        let gauges = (self.read)();
        let Some(label) = self.label else {
            let value = gauges.first().map_or(0, |(_, value)| *value);
            return prometheus_client::metrics::gauge::ConstGauge::new(value).encode(metric);
        };
        for (value, gauge) in gauges {
            prometheus_client::metrics::gauge::ConstGauge::new(gauge)
                .encode(metric.encode_family(&[(label, value.as_str())])?)?;
        }
        Ok(())
    }
}

/// Binds `--metrics-listen`: loopback only unless `insecure`
/// (`--metrics-insecure`; the endpoint has no authentication, and what it
/// tells is how the server is used).
pub async fn bind_metrics(
    addr: SocketAddr,
    insecure: bool,
) -> anyhow::Result<tokio::net::TcpListener> {
    if !addr.ip().is_loopback() && !insecure {
        anyhow::bail!(
            "refusing to serve metrics on {addr} without authentication: use a loopback address (a Prometheus agent or a sidecar on the machine), or pass --metrics-insecure"
        );
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for metrics on {addr}"))?;
    println!("metrics on {}", listener.local_addr()?);
    Ok(listener)
}

/// Label values from outside the server's own tables (registry hosts):
/// the first `max` distinct values as they are, any later one `other`, so
/// the label sets stay bounded whatever the inputs.
#[derive(Debug, Clone)]
pub struct BoundedValues {
    seen: Arc<Mutex<std::collections::HashSet<String>>>,
    max: usize,
}

impl BoundedValues {
    /// At most `max` distinct values, then `other`.
    pub fn new(max: usize) -> Self {
        Self {
            seen: Arc::default(),
            max,
        }
    }

    /// `value`, or `other` once `max` other values were seen.
    pub fn get(&self, value: &str) -> String {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.contains(value) {
            return value.to_owned();
        }
        if seen.len() < self.max {
            seen.insert(value.to_owned());
            return value.to_owned();
        }
        "other".to_owned()
    }
}

#[cfg(feature = "store")]
mod store;
#[cfg(feature = "store")]
pub use store::StoreMetrics;

/// What the servers' parts build their metrics of, in one import.
pub mod kinds {
    pub use prometheus_client::{
        encoding::EncodeLabelSet,
        metrics::{
            counter::Counter,
            family::Family,
            gauge::Gauge,
            histogram::{Histogram, exponential_buckets},
        },
    };

    /// A family of [`latency`] histograms, one per label set.
    pub type Latencies<S> = Family<S, Histogram, fn() -> Histogram>;

    /// A histogram of the time of a call or an operation: 0.1 ms to 15 s.
    pub fn latency() -> Histogram {
        Histogram::new(exponential_buckets(0.0001, 2.5, 14))
    }

    /// A histogram of the time of long work (a pass, a pull, a
    /// verification): 1 ms to 20 min.
    pub fn long() -> Histogram {
        Histogram::new(exponential_buckets(0.001, 3.0, 14))
    }

    /// A [`Latencies`] family.
    pub fn latencies<S: Clone + std::hash::Hash + Eq>() -> Latencies<S> {
        Family::new_with_constructor(latency)
    }
}

mod grpc;
mod rest;
pub(crate) use self::{
    grpc::{GrpcMetrics, MetricsLayer},
    rest::{OTHER_ROUTE, RestMetrics},
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_values_keep_the_first_ones_and_fold_the_rest() {
        let values = BoundedValues::new(2);
        assert_eq!(values.get("a"), "a");
        assert_eq!(values.get("b"), "b");
        assert_eq!(values.get("c"), "other");
        assert_eq!(values.get("a"), "a");
        assert_eq!(values.get("d"), "other");
    }
}
