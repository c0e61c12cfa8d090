//! Logging, OpenTelemetry trace export, and W3C trace-context propagation.

use opentelemetry::{
    global,
    propagation::{Extractor, Injector},
    trace::TracerProvider as _,
};
use opentelemetry_sdk::{propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::{EnvFilter, layer::SubscriberExt as _, util::SubscriberInitExt as _};

use crate::LogFormat;

/// Flushes and stops trace export when dropped.
#[derive(Debug)]
#[must_use = "trace export stops when the guard is dropped"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(err) = provider.shutdown()
        {
            eprintln!("warning: flushing traces failed: {err}");
        }
    }
}

/// Installs logging to stderr filtered by `RUST_LOG` (default `info`), and
/// export of traces over OTLP (gRPC or HTTP) when the OpenTelemetry
/// environment asks for it (`addons_otlp::exports_traces`). The service
/// name is `service_name` unless `OTEL_SERVICE_NAME` (or `service.name`
/// in `OTEL_RESOURCE_ATTRIBUTES`) names another. An exporter that cannot be set up is a warning, never a
/// server that does not start: tracing is not what it serves. The W3C
/// trace-context propagator is installed either way, so trace context
/// passes through this process even without export.
pub fn init_telemetry(
    service_name: &'static str,
    format: LogFormat,
) -> anyhow::Result<TelemetryGuard> {
    global::set_text_map_propagator(TraceContextPropagator::new());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a terminal without `NO_COLOR`: a log file or
    // journal gets plain text, not escape codes around every field.
    let colours = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(colours);
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    let addons_otlp::Tracing {
        provider,
        exporting,
        export_error,
    } = addons_otlp::tracer_provider(service_name);
    global::set_tracer_provider(provider.clone());
    // Spans carry what says what they are (their name and fields), not
    // what every one would repeat at a cost on each call or each poll:
    // the source location, the thread, the target, busy and idle times.
    // Nothing here reads `Context::current()`: trace context is taken
    // from the tracing span (`OpenTelemetrySpanExt::context`), so
    // entering a span need not activate its context.
    let otel = tracing_opentelemetry::layer()
        .with_location(false)
        .with_threads(false)
        .with_target(false)
        .with_tracked_inactivity(false)
        .with_context_activation(false)
        .with_tracer(provider.tracer(service_name));
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|err| anyhow::anyhow!("cannot install logging: {err}"))?;
    if let Some(err) = export_error {
        tracing::warn!(error = %err, "traces are NOT exported: the OTLP exporter cannot be set up");
    }
    Ok(TelemetryGuard {
        provider: exporting.then_some(provider),
    })
}

use tracing_subscriber::Layer as _;

/// The span of an incoming gRPC call, a child of the caller's trace when the
/// request carries a `traceparent` header.
pub(crate) fn server_span(request: &http::Request<()>) -> tracing::Span {
    let path = request.uri().path();
    let (service, method) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or((path, ""));
    let span = tracing::info_span!(
        "grpc.server",
        otel.name = %path.trim_start_matches('/'),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
    );
    let parent =
        global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(request.headers())));
    let _ = span.set_parent(parent);
    record_ids(&span);
    span
}

/// Records the span's OpenTelemetry trace and span ids in its `trace_id`
/// and `span_id` fields, so every log line within it (JSON logs show the
/// current span's fields) names the trace it belongs to.
pub fn record_ids(span: &tracing::Span) {
    use opentelemetry::trace::TraceContextExt as _;
    let context = span.context();
    let ids = context.span().span_context().clone();
    if ids.is_valid() {
        span.record("trace_id", tracing::field::display(ids.trace_id()));
        span.record("span_id", tracing::field::display(ids.span_id()));
    }
}

/// The W3C `traceparent` of the current span, to carry its trace where no
/// request header goes (a desired state, a status report); none outside
/// a trace.
pub fn current_traceparent() -> Option<String> {
    let context = tracing::Span::current().context();
    let mut carrier = std::collections::HashMap::new();
    global::get_text_map_propagator(|p| p.inject_context(&context, &mut carrier));
    carrier.remove("traceparent")
}

/// Makes `span` a child of the trace `traceparent` names (W3C), when it
/// names one; records its ids (see [`record_ids`]).
pub fn continue_trace(span: &tracing::Span, traceparent: &str) {
    if traceparent.is_empty() {
        return;
    }
    let carrier =
        std::collections::HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let parent = global::get_text_map_propagator(|p| p.extract(&carrier));
    let _ = span.set_parent(parent);
    record_ids(span);
}

/// A tonic interceptor for outgoing calls: puts the current span's trace
/// context into the request metadata as W3C `traceparent`/`tracestate`.
#[allow(clippy::result_large_err)]
pub fn inject_trace_context(
    mut request: tonic::Request<()>,
) -> Result<tonic::Request<()>, tonic::Status> {
    let context = tracing::Span::current().context();
    global::get_text_map_propagator(|p| {
        p.inject_context(&context, &mut MetadataInjector(request.metadata_mut()));
    });
    Ok(request)
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            value.parse(),
        ) {
            self.0.insert(key, value);
        }
    }
}
