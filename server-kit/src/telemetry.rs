//! Logging, OpenTelemetry trace export, and W3C trace-context propagation.

use opentelemetry::{
    global,
    propagation::{Extractor, Injector},
    trace::TracerProvider as _,
};
use opentelemetry_otlp::WithTonicConfig as _;
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

/// Installs logging to stderr filtered by `RUST_LOG` (default `info`), and
/// export of traces over OTLP/gRPC when the OpenTelemetry environment asks
/// for it ([`exports_traces`]). The service name is `service_name` unless
/// `OTEL_SERVICE_NAME` (or `service.name` in `OTEL_RESOURCE_ATTRIBUTES`)
/// names another. An exporter that cannot be set up is a warning, never a
/// server that does not start: tracing is not what it serves. The W3C
/// trace-context propagator is installed either way, so trace context
/// passes through this process even without export.
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
    let env = |name: &str| std::env::var(name).ok();
    let mut resource = Resource::builder();
    if !names_service(env) {
        resource = resource.with_service_name(service_name);
    }
    let mut builder = SdkTracerProvider::builder().with_resource(resource.build());
    let mut export_error = None;
    let exporting = exports_traces(env)
        && match otlp_tls(env).and_then(|tls| {
            let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic();
            let exporter = match tls {
                Some(tls) => exporter.with_tls_config(tls),
                None => exporter,
            };
            exporter.build().map_err(anyhow::Error::from)
        }) {
            Ok(exporter) => {
                builder = builder.with_batch_exporter(exporter);
                true
            }
            Err(err) => {
                export_error = Some(err);
                false
            }
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
    if let Some(err) = export_error {
        tracing::warn!(error = %err, "traces are NOT exported: the OTLP exporter cannot be set up");
    }
    Ok(TelemetryGuard {
        provider: exporting.then_some(provider),
    })
}

/// Whether the OpenTelemetry environment asks for OTLP trace export, as
/// the specification's variables say: not when `OTEL_SDK_DISABLED` is
/// `true` or `OTEL_TRACES_EXPORTER` does not name `otlp`; otherwise when an
/// endpoint is set (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
/// `OTEL_EXPORTER_OTLP_ENDPOINT`) or `OTEL_TRACES_EXPORTER` names `otlp`
/// outright (its default endpoint). Nothing set: no export, so a server
/// never sends traces nobody asked for.
fn exports_traces(env: impl Fn(&str) -> Option<String>) -> bool {
    let set = |name: &str| env(name).filter(|value| !value.trim().is_empty());
    if set("OTEL_SDK_DISABLED").is_some_and(|value| value.trim().eq_ignore_ascii_case("true")) {
        return false;
    }
    match set("OTEL_TRACES_EXPORTER") {
        Some(exporters) => exporters
            .split(',')
            .any(|exporter| exporter.trim().eq_ignore_ascii_case("otlp")),
        None => {
            set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
                || set("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
        }
    }
}

/// The TLS of OTLP export, from the specification's variables: the CA to
/// trust (`OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE`, else
/// `OTEL_EXPORTER_OTLP_CERTIFICATE`) and a client certificate and key for
/// mTLS (`..._CLIENT_CERTIFICATE`, `..._CLIENT_KEY`), all PEM files. None
/// set: an `https://` endpoint gets TLS without a CA of its own (tonic's,
/// so a CA is then needed).
fn otlp_tls(
    env: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<Option<tonic::transport::ClientTlsConfig>> {
    use anyhow::Context as _;
    let file = |suffix: &str| -> anyhow::Result<Option<Vec<u8>>> {
        let name = [
            format!("OTEL_EXPORTER_OTLP_TRACES_{suffix}"),
            format!("OTEL_EXPORTER_OTLP_{suffix}"),
        ]
        .into_iter()
        .find(|name| env(name).is_some_and(|value| !value.trim().is_empty()));
        let Some(name) = name else { return Ok(None) };
        let path = env(&name).unwrap_or_default();
        std::fs::read(path.trim())
            .map(Some)
            .with_context(|| format!("{name}: cannot read {}", path.trim()))
    };
    let ca = file("CERTIFICATE")?;
    let identity = match (file("CLIENT_CERTIFICATE")?, file("CLIENT_KEY")?) {
        (Some(cert), Some(key)) => Some(tonic::transport::Identity::from_pem(cert, key)),
        (None, None) => None,
        _ => anyhow::bail!(
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and OTEL_EXPORTER_OTLP_CLIENT_KEY go together"
        ),
    };
    if ca.is_none() && identity.is_none() {
        return Ok(None);
    }
    let mut tls = tonic::transport::ClientTlsConfig::new();
    if let Some(ca) = ca {
        tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(ca));
    }
    if let Some(identity) = identity {
        tls = tls.identity(identity);
    }
    Ok(Some(tls))
}

/// Whether the environment names the service (`OTEL_SERVICE_NAME`, or
/// `service.name` in `OTEL_RESOURCE_ATTRIBUTES`): an operator's name wins
/// over the binary's.
fn names_service(env: impl Fn(&str) -> Option<String>) -> bool {
    env("OTEL_SERVICE_NAME").is_some_and(|name| !name.trim().is_empty())
        || env("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|attributes| {
            attributes
                .split(',')
                .filter_map(|pair| pair.split_once('='))
                .any(|(key, value)| key.trim() == "service.name" && !value.trim().is_empty())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| (*value).to_owned())
        }
    }

    #[test]
    fn export_follows_the_specification_variables() {
        assert!(!exports_traces(env(&[])), "nothing set: no export");
        for endpoint in [
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        ] {
            assert!(
                exports_traces(env(&[(endpoint, "http://c:4317")])),
                "{endpoint}"
            );
            assert!(!exports_traces(env(&[(endpoint, " ")])), "{endpoint} empty");
            assert!(
                !exports_traces(env(&[
                    (endpoint, "http://c:4317"),
                    ("OTEL_SDK_DISABLED", "TRUE")
                ])),
                "{endpoint} with the SDK disabled"
            );
            assert!(
                !exports_traces(env(&[
                    (endpoint, "http://c:4317"),
                    ("OTEL_TRACES_EXPORTER", "none")
                ])),
                "{endpoint} with exporter none"
            );
        }
        assert!(exports_traces(env(&[(
            "OTEL_TRACES_EXPORTER",
            "console, otlp"
        )])));
        assert!(!exports_traces(env(&[("OTEL_TRACES_EXPORTER", "console")])));
        assert!(exports_traces(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_SDK_DISABLED", "false"),
        ])));
    }

    #[test]
    fn an_operators_service_name_wins() {
        assert!(!names_service(env(&[])));
        assert!(names_service(env(&[("OTEL_SERVICE_NAME", "edge-manager")])));
        assert!(!names_service(env(&[("OTEL_SERVICE_NAME", "")])));
        assert!(names_service(env(&[(
            "OTEL_RESOURCE_ATTRIBUTES",
            "deployment.environment=prod, service.name=edge-manager"
        )])));
        assert!(!names_service(env(&[(
            "OTEL_RESOURCE_ATTRIBUTES",
            "service.namespace=oakestra"
        )])));
    }
}
