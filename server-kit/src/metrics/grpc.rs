//! The metrics of every gRPC call a server answers, as go-grpc-prometheus
//! names them (`grpc_server_started_total`, `grpc_server_handled_total`,
//! `grpc_server_handling_seconds`, and the calls in flight), and the
//! guard's refusals. Method labels come only from the server's own tables.

use std::{collections::HashMap, sync::Arc, time::Instant};

use oakestra_addons_proto::code_name;

use super::kinds::{Counter, EncodeLabelSet, Family, Gauge, Latencies, latencies};

use super::Metrics;

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
    handling: Latencies<MethodLabels>,
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
        Self {
            methods: Arc::new(methods),
            started: metrics.add(
                "grpc_server_started",
                "gRPC calls started on the server",
                Family::default(),
            ),
            handled: metrics.add(
                "grpc_server_handled",
                "gRPC calls completed on the server, by status code",
                Family::default(),
            ),
            handling: metrics.add(
                "grpc_server_handling_seconds",
                "Time from a gRPC call's start to its end (for streams, their life)",
                latencies(),
            ),
            in_flight: metrics.add(
                "grpc_server_in_flight",
                "gRPC calls under way (for watches and links, the streams open)",
                Family::default(),
            ),
            refused: metrics.add(
                "addons_guard_refusals",
                "Calls the guard refused, by status code and reason",
                Family::default(),
            ),
        }
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
