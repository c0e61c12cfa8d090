//! The one OTLP set-up of the servers and the command-line tool: what the
//! OpenTelemetry environment variables say about trace export (as the
//! specification defines them), and the tracer provider they ask for.

use opentelemetry_otlp::WithTonicConfig as _;
use opentelemetry_sdk::{Resource, trace::SdkTracerProvider};

/// The tracer provider of a process, as the environment asks for it.
#[derive(Debug)]
pub struct Tracing {
    /// Spans get OpenTelemetry contexts whether or not they are exported,
    /// so trace context always passes through.
    pub provider: SdkTracerProvider,
    /// Whether spans are exported (the environment asked, and the exporter
    /// could be set up).
    pub exporting: bool,
    /// Why spans are not exported although the environment asked.
    pub export_error: Option<anyhow::Error>,
}

/// The tracer provider of `service_name` (unless `OTEL_SERVICE_NAME`, or
/// `service.name` in `OTEL_RESOURCE_ATTRIBUTES`, names another): exporting
/// over OTLP/gRPC when the environment asks for it ([`exports_traces`]),
/// with TLS as its variables say ([`otlp_tls`]). An exporter that cannot
/// be set up leaves the provider without one and says why.
pub fn tracer_provider(service_name: &'static str) -> Tracing {
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
    Tracing {
        provider: builder.build(),
        exporting,
        export_error,
    }
}

/// Whether the OpenTelemetry environment asks for OTLP trace export, as
/// the specification's variables say: not when `OTEL_SDK_DISABLED` is
/// `true` or `OTEL_TRACES_EXPORTER` does not name `otlp`; otherwise when an
/// endpoint is set (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
/// `OTEL_EXPORTER_OTLP_ENDPOINT`) or `OTEL_TRACES_EXPORTER` names `otlp`
/// outright (its default endpoint). Nothing set: no export, so a server
/// never sends traces nobody asked for.
pub fn exports_traces(env: impl Fn(&str) -> Option<String>) -> bool {
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
pub fn otlp_tls(
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
pub fn names_service(env: impl Fn(&str) -> Option<String>) -> bool {
    env("OTEL_SERVICE_NAME").is_some_and(|name| !name.trim().is_empty())
        || env("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|attributes| {
            attributes
                .split(',')
                .filter_map(|pair| pair.split_once('='))
                .any(|(key, value)| key.trim() == "service.name" && !value.trim().is_empty())
        })
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
