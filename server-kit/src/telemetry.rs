//! Logging, OpenTelemetry trace export, and W3C trace-context propagation.

use opentelemetry::{
    global,
    propagation::{Extractor, Injector},
    trace::TracerProvider as _,
};
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
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

/// Installs logging to stderr filtered by `RUST_LOG` (default `info`), and,
/// when the standard `OTEL_EXPORTER_OTLP_ENDPOINT` is set, export of traces
/// over OTLP/gRPC. The W3C trace-context propagator is installed either way,
/// so trace context passes through this process even without export.
pub fn init_telemetry(
    service_name: &'static str,
    format: LogFormat,
) -> anyhow::Result<TelemetryGuard> {
    global::set_text_map_propagator(TraceContextPropagator::new());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    // Spans get OpenTelemetry contexts even when nothing is exported, so a
    // caller's trace context always passes through to the calls this server
    // makes.
    let mut builder = SdkTracerProvider::builder()
        .with_resource(Resource::builder().with_service_name(service_name).build());
    let exporting = match std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Ok(endpoint) if !endpoint.trim().is_empty() => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build()
                .map_err(|err| anyhow::anyhow!("cannot set up OTLP export to {endpoint}: {err}"))?;
            builder = builder.with_batch_exporter(exporter);
            true
        }
        _ => false,
    };
    let provider = builder.build();
    global::set_tracer_provider(provider.clone());
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer(service_name));
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|err| anyhow::anyhow!("cannot install logging: {err}"))?;
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
    );
    let parent =
        global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(request.headers())));
    let _ = span.set_parent(parent);
    span
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
