//! The one OTLP set-up of the servers and the command-line tool: what the
//! OpenTelemetry environment variables say about trace export (as the
//! specification defines them), and the tracer provider they ask for.

mod http;

use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _, WithTonicConfig as _};
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
/// over OTLP when the environment asks for it ([`exports_traces`]), with
/// the transport ([`transport`]) and TLS ([`TlsFiles::from_env`]) its
/// variables say. An exporter that cannot be set up leaves the provider
/// without one and says why. Call it within a Tokio runtime: both
/// transports run their connections on it.
pub fn tracer_provider(service_name: &'static str) -> Tracing {
    let env = |name: &str| std::env::var(name).ok();
    let mut resource = Resource::builder();
    if !names_service(env) {
        resource = resource.with_service_name(service_name);
    }
    let mut builder = SdkTracerProvider::builder().with_resource(resource.build());
    let mut export_error = None;
    let exporting = exports_traces(env)
        && match span_exporter(env) {
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

/// The span exporter the environment asks for.
fn span_exporter(
    env: impl Fn(&str) -> Option<String> + Copy,
) -> anyhow::Result<opentelemetry_otlp::SpanExporter> {
    let tls = TlsFiles::from_env(env)?;
    let exporter = match transport(env)? {
        Transport::Grpc => {
            let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic();
            match tls.tonic() {
                Some(tls) => exporter.with_tls_config(tls).build()?,
                None => exporter.build()?,
            }
        }
        Transport::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_http_client(http::RuntimeClient::new(&tls, timeout(env)?)?)
            .build()?,
    };
    Ok(exporter)
}

/// How spans go to the collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// OTLP/gRPC (`grpc`), to port 4317 unless an endpoint says otherwise.
    Grpc,
    /// OTLP/HTTP with protobuf bodies (`http/protobuf`), posted to
    /// `/v1/traces` under `OTEL_EXPORTER_OTLP_ENDPOINT` (port 4318 unless
    /// it says otherwise), or to `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` as
    /// it is.
    HttpProtobuf,
}

/// The transport `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` (else
/// `OTEL_EXPORTER_OTLP_PROTOCOL`) names: `grpc` or `http/protobuf`. Unset,
/// gRPC, as this project exported before it spoke HTTP (the specification
/// lets an SDK keep such a default). `http/json` and anything else are an
/// error that says what is supported.
pub fn transport(env: impl Fn(&str) -> Option<String>) -> anyhow::Result<Transport> {
    let named = [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ]
    .into_iter()
    .find_map(|name| {
        env(name)
            .map(|value| value.trim().to_owned())
            .filter(|value| !value.is_empty())
            .map(|value| (name, value))
    });
    match named {
        None => Ok(Transport::Grpc),
        Some((_, value)) if value == "grpc" => Ok(Transport::Grpc),
        Some((_, value)) if value == "http/protobuf" => Ok(Transport::HttpProtobuf),
        Some((name, value)) => {
            anyhow::bail!("{name}={value}: the protocols supported are grpc and http/protobuf")
        }
    }
}

/// The export timeout `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT` (else
/// `OTEL_EXPORTER_OTLP_TIMEOUT`) gives in milliseconds; 10 s unset.
fn timeout(env: impl Fn(&str) -> Option<String>) -> anyhow::Result<std::time::Duration> {
    let named = [
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
        "OTEL_EXPORTER_OTLP_TIMEOUT",
    ]
    .into_iter()
    .find_map(|name| {
        env(name)
            .filter(|v| !v.trim().is_empty())
            .map(|v| (name, v))
    });
    match named {
        None => Ok(std::time::Duration::from_secs(10)),
        Some((name, value)) => value
            .trim()
            .parse()
            .map(std::time::Duration::from_millis)
            .map_err(|_| anyhow::anyhow!("{name}={value}: not a number of milliseconds")),
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

/// The TLS files of OTLP export, from the specification's variables, read:
/// the CA to trust (`OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE`, else
/// `OTEL_EXPORTER_OTLP_CERTIFICATE`) and a client certificate and key for
/// mTLS (`..._CLIENT_CERTIFICATE`, `..._CLIENT_KEY`), all PEM.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    /// The CA certificates to trust.
    pub ca: Option<Vec<u8>>,
    /// The client's certificate chain and key.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl TlsFiles {
    /// The files the environment names, read. A file that cannot be read,
    /// or a certificate without its key, is an error naming the variable.
    pub fn from_env(env: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
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
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => anyhow::bail!(
                "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and OTEL_EXPORTER_OTLP_CLIENT_KEY go together"
            ),
        };
        Ok(Self { ca, identity })
    }

    /// The files as tonic's TLS settings; none without files (an
    /// `https://` endpoint gets TLS all the same, trusting tonic's roots).
    pub fn tonic(&self) -> Option<tonic::transport::ClientTlsConfig> {
        if self.ca.is_none() && self.identity.is_none() {
            return None;
        }
        let mut tls = tonic::transport::ClientTlsConfig::new();
        if let Some(ca) = &self.ca {
            tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(ca));
        }
        if let Some((cert, key)) = &self.identity {
            tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
        }
        Some(tls)
    }
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
    fn the_protocol_variables_choose_the_transport() {
        assert_eq!(transport(env(&[])).unwrap(), Transport::Grpc, "unset");
        assert_eq!(
            transport(env(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")])).unwrap(),
            Transport::HttpProtobuf
        );
        assert_eq!(
            transport(env(&[
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc"),
            ]))
            .unwrap(),
            Transport::Grpc,
            "the traces' own variable wins"
        );
        assert_eq!(
            transport(env(&[("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", " ")])).unwrap(),
            Transport::Grpc,
            "empty is unset"
        );
        let json = transport(env(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")])).unwrap_err();
        assert!(
            json.to_string()
                .contains("OTEL_EXPORTER_OTLP_PROTOCOL=http/json: the protocols supported are grpc and http/protobuf"),
            "{json}"
        );
    }

    #[test]
    fn the_timeout_is_in_milliseconds() {
        assert_eq!(
            timeout(env(&[])).unwrap(),
            std::time::Duration::from_secs(10)
        );
        assert_eq!(
            timeout(env(&[("OTEL_EXPORTER_OTLP_TIMEOUT", "2500")])).unwrap(),
            std::time::Duration::from_millis(2500)
        );
        assert_eq!(
            timeout(env(&[
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
                ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "100")
            ]))
            .unwrap(),
            std::time::Duration::from_millis(100)
        );
        assert!(timeout(env(&[("OTEL_EXPORTER_OTLP_TIMEOUT", "10s")])).is_err());
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
