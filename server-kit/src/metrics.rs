//! Prometheus metrics: the registry every part of a server registers its
//! metrics in, the metrics of every gRPC call (as go-grpc-prometheus names
//! them, so existing dashboards and alerts apply), and the scrape endpoint
//! (`--metrics-listen`).
//!
//! Label values come only from bounded sets: method names from the
//! server's own tables (a method nobody serves is `unknown`), status codes,
//! our own reasons. Never an id.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::Instant,
};

use anyhow::Context as _;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Metric, Registry},
};

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

    /// Registers a gauge whose value `read` gives at each scrape: for what
    /// a server already keeps (a queue's length, a link's state).
    pub fn register_gauge_fn(
        &self,
        name: &'static str,
        help: &'static str,
        read: impl Fn() -> i64 + Send + Sync + 'static,
    ) {
        self.registry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .register_collector(Box::new(GaugeFn {
                name,
                help,
                read: Box::new(read),
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

/// A gauge read at each scrape.
struct GaugeFn {
    name: &'static str,
    help: &'static str,
    read: Box<dyn Fn() -> i64 + Send + Sync>,
}

impl std::fmt::Debug for GaugeFn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GaugeFn").field("name", &self.name).finish()
    }
}

impl prometheus_client::collector::Collector for GaugeFn {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric as _;
        let metric = encoder.encode_descriptor(
            self.name,
            self.help,
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        prometheus_client::metrics::gauge::ConstGauge::new((self.read)()).encode(metric)
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
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreLabels {
    operation: &'static str,
    outcome: &'static str,
}

#[cfg(feature = "store")]
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: &'static str,
}

/// The metrics of a server's store: each database operation by kind and
/// outcome (`ok`, or the error's kind: `conflict` is optimistic
/// concurrency at work, `unavailable` and `backend` are failures), and
/// its time.
#[cfg(feature = "store")]
#[derive(Debug, Clone)]
pub struct StoreMetrics {
    operations: Family<StoreLabels, Counter>,
    seconds: Family<OperationLabels, Histogram>,
}

#[cfg(feature = "store")]
impl StoreMetrics {
    /// The store's metrics, registered in `metrics`.
    pub fn new(metrics: &Metrics) -> Self {
        let this = Self {
            operations: Family::default(),
            seconds: Family::new_with_constructor(|| {
                // 0.1 ms to 2.4 s.
                Histogram::new(exponential_buckets(0.0001, 2.5, 12))
            }),
        };
        metrics.register(
            "addons_store_operations",
            "Database operations of the store, by operation and outcome (ok, or the error's kind)",
            this.operations.clone(),
        );
        metrics.register(
            "addons_store_operation_seconds",
            "Time of one database operation, by operation",
            this.seconds.clone(),
        );
        this
    }
}

#[cfg(feature = "store")]
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

/// A gRPC method, as a label set.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct MethodLabels {
    grpc_service: &'static str,
    grpc_method: &'static str,
}

/// A gRPC method and the code it ended with, as a label set.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandledLabels {
    grpc_service: &'static str,
    grpc_method: &'static str,
    grpc_code: &'static str,
}

/// Why the guard refused a call, as a label set.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    grpc_code: &'static str,
    reason: String,
}

/// The metrics of every gRPC call a server answers.
#[derive(Debug, Clone)]
pub(crate) struct GrpcMetrics {
    methods: Arc<HashMap<String, MethodLabels>>,
    started: Family<MethodLabels, Counter>,
    handled: Family<HandledLabels, Counter>,
    handling: Family<MethodLabels, Histogram>,
    in_flight: Family<MethodLabels, Gauge>,
    refused: Family<RefusalLabels, Counter>,
}

/// The label set of a method no table names: a stranger's paths never
/// grow the label sets.
const UNKNOWN: MethodLabels = MethodLabels {
    grpc_service: "unknown",
    grpc_method: "unknown",
};

impl GrpcMetrics {
    /// The metrics of the methods `methods` (`(service, method)`),
    /// registered in `metrics`.
    pub(crate) fn new(
        metrics: &Metrics,
        methods: impl IntoIterator<Item = (&'static str, &'static str)>,
    ) -> Self {
        let methods = methods
            .into_iter()
            .map(|(grpc_service, grpc_method)| {
                (
                    format!("/{grpc_service}/{grpc_method}"),
                    MethodLabels {
                        grpc_service,
                        grpc_method,
                    },
                )
            })
            .collect();
        let this = Self {
            methods: Arc::new(methods),
            started: Family::default(),
            handled: Family::default(),
            handling: Family::new_with_constructor(|| {
                // 0.5 ms to 12 s.
                Histogram::new(exponential_buckets(0.0005, 2.5, 12))
            }),
            in_flight: Family::default(),
            refused: Family::default(),
        };
        metrics.register(
            "grpc_server_started",
            "gRPC calls started on the server",
            this.started.clone(),
        );
        metrics.register(
            "grpc_server_handled",
            "gRPC calls completed on the server, by status code",
            this.handled.clone(),
        );
        metrics.register(
            "grpc_server_handling_seconds",
            "Time from a gRPC call's start to its end (for streams, their life)",
            this.handling.clone(),
        );
        metrics.register(
            "grpc_server_in_flight",
            "gRPC calls under way (for watches and links, the streams open)",
            this.in_flight.clone(),
        );
        metrics.register(
            "addons_guard_refusals",
            "Calls the guard refused, by status code and reason",
            this.refused.clone(),
        );
        this
    }

    /// A call to `path` starts.
    pub(crate) fn start(&self, path: &str) -> CallMetrics {
        let labels = self.methods.get(path).copied().unwrap_or(UNKNOWN);
        self.started.get_or_create(&labels).inc();
        self.in_flight.get_or_create(&labels).inc();
        CallMetrics {
            metrics: self.clone(),
            labels,
            start: Instant::now(),
            done: false,
        }
    }

    /// The guard refused a call with `code` for `reason`.
    pub(crate) fn refused(&self, code: tonic::Code, reason: String) {
        self.refused
            .get_or_create(&RefusalLabels {
                grpc_code: code_name(code),
                reason,
            })
            .inc();
    }
}

/// One call under way; it counts as ended with `Cancelled` when dropped
/// before [`CallMetrics::end`] (the client went away).
#[derive(Debug)]
pub(crate) struct CallMetrics {
    metrics: GrpcMetrics,
    labels: MethodLabels,
    start: Instant,
    done: bool,
}

impl CallMetrics {
    /// The call ended with `code`.
    pub(crate) fn end(mut self, code: tonic::Code) {
        self.finish(code);
    }

    fn finish(&mut self, code: tonic::Code) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let MethodLabels {
            grpc_service,
            grpc_method,
        } = self.labels;
        self.metrics
            .handled
            .get_or_create(&HandledLabels {
                grpc_service,
                grpc_method,
                grpc_code: code_name(code),
            })
            .inc();
        self.metrics
            .handling
            .get_or_create(&self.labels)
            .observe(self.start.elapsed().as_secs_f64());
        self.metrics.in_flight.get_or_create(&self.labels).dec();
    }
}

impl Drop for CallMetrics {
    fn drop(&mut self) {
        self.finish(tonic::Code::Cancelled);
    }
}

/// A status code's name as gRPC writes it (`OK`, `NOT_FOUND`, ...).
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The layer that meters every gRPC call beneath it.
#[derive(Debug, Clone)]
pub(crate) struct MetricsLayer(pub(crate) GrpcMetrics);

impl<S> tower_layer::Layer<S> for MetricsLayer {
    type Service = Metered<S>;

    fn layer(&self, inner: S) -> Metered<S> {
        Metered {
            inner,
            metrics: self.0.clone(),
        }
    }
}

/// A service whose calls are metered.
#[derive(Debug, Clone)]
pub(crate) struct Metered<S> {
    inner: S,
    metrics: GrpcMetrics,
}

layer_service!(Metered);

impl<S: crate::HttpService> Metered<S> {
    fn respond(
        &mut self,
        request: http::Request<tonic::body::Body>,
    ) -> futures::future::BoxFuture<'static, Result<http::Response<tonic::body::Body>, S::Error>>
    {
        let call = self.metrics.start(request.uri().path());
        let response = self.inner.call(request);
        Box::pin(async move {
            // An error of the service beneath drops `call`: CANCELLED.
            let response = response.await?;
            // A trailers-only answer (every error a handler returns) has
            // its status in the headers; any other ends in trailers.
            if let Some(code) = grpc_status(response.headers()) {
                call.end(code);
                return Ok(response);
            }
            Ok(response.map(|body| {
                tonic::body::Body::new(MeteredBody {
                    inner: body,
                    call: Some(call),
                })
            }))
        })
    }
}

/// The `grpc-status` of `headers`, if they have one.
fn grpc_status(headers: &http::HeaderMap) -> Option<tonic::Code> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    Some(tonic::Code::from_i32(value.trim().parse().ok()?))
}

/// A response body that ends its call's metrics at its trailers.
struct MeteredBody {
    inner: tonic::body::Body,
    call: Option<CallMetrics>,
}

impl http_body::Body for MeteredBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        use std::task::Poll;
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        let code = match &polled {
            Poll::Ready(Some(Ok(frame))) => frame
                .trailers_ref()
                .map(|trailers| grpc_status(trailers).unwrap_or(tonic::Code::Unknown)),
            Poll::Ready(Some(Err(status))) => Some(status.code()),
            // A gRPC response without a status is UNKNOWN, as clients read it.
            Poll::Ready(None) => Some(tonic::Code::Unknown),
            Poll::Pending => None,
        };
        if let Some(code) = code
            && let Some(call) = self.call.take()
        {
            call.end(code);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

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

    #[test]
    fn a_call_dropped_before_its_end_counts_as_cancelled_once() {
        let metrics = Metrics::new();
        let grpc = GrpcMetrics::new(&metrics, [("s.S", "M")]);
        drop(grpc.start("/s.S/M"));
        grpc.start("/s.S/M").end(tonic::Code::NotFound);
        grpc.start("/x/y").end(tonic::Code::Ok);
        let text = metrics.encode();
        for line in [
            r#"grpc_server_started_total{grpc_service="s.S",grpc_method="M"} 2"#,
            r#"grpc_server_handled_total{grpc_service="s.S",grpc_method="M",grpc_code="CANCELLED"} 1"#,
            r#"grpc_server_handled_total{grpc_service="s.S",grpc_method="M",grpc_code="NOT_FOUND"} 1"#,
            r#"grpc_server_handled_total{grpc_service="unknown",grpc_method="unknown",grpc_code="OK"} 1"#,
            r#"grpc_server_in_flight{grpc_service="s.S",grpc_method="M"} 0"#,
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }
}
